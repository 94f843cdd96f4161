//! The wire contract as an AsyncAPI 3.0 document, computed from an app's
//! settings and [`Registry`] (`burrow asyncapi`).
//!
//! The document describes what the app receives: one channel per binding
//! key on the `amqp.exchange` topic exchange (the event type, for every
//! handler that does not subscribe with a wildcard), one `receive`
//! operation per channel naming the handlers and the app queue, and one
//! message per event type with
//!
//! - the payload: the JSON Schema of each handler's view of the event
//!   ([`Event::payload_schema`](crate::Event::payload_schema), derived with
//!   schemars). When several handlers subscribe with different views, a
//!   body must decode into every one of them, so the payload is their
//!   `allOf`;
//! - the headers a publisher may set (`burrow-event-version`,
//!   `burrow-causation-id`; docs/wire-contract.md §2);
//! - the AMQP properties a conforming publisher sets, in the extension
//!   `x-amqp-properties` (AsyncAPI's AMQP binding has no place for
//!   `message_id`, `timestamp` or `app_id`).
//!
//! Everything is plain [`serde_json::Value`] so the same document prints as
//! YAML ([`to_yaml`]) or JSON. Maps are sorted, so the output is stable and
//! `docs/asyncapi.yaml` can be compared byte for byte.

mod yaml;

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

pub use self::yaml::to_yaml;
use crate::{Registry, Settings, handler::RegisteredHandler, wire::headers};

/// The version of AsyncAPI's AMQP bindings the document uses.
const AMQP_BINDING_VERSION: &str = "0.3.0";

/// The JSON Schema (draft-07, the dialect AsyncAPI 3.0 schemas extend) of
/// `T`'s JSON form, for [`Event::payload_schema`](crate::Event::payload_schema).
///
/// ```
/// #[derive(serde::Deserialize, schemars::JsonSchema)]
/// #[serde(rename_all = "camelCase")]
/// struct CardAdded {
///     aggregate_id: String,
///     title: Option<String>,
/// }
///
/// let schema = burrow::asyncapi::json_schema::<CardAdded>();
/// assert_eq!(schema["properties"]["aggregateId"]["type"], "string");
/// assert_eq!(schema["required"], serde_json::json!(["aggregateId"]));
/// ```
pub fn json_schema<T: schemars::JsonSchema>() -> Value {
    let generator = schemars::generate::SchemaSettings::draft07().into_generator();
    generator.into_root_schema_for::<T>().to_value()
}

/// What [`document`] could not describe: event types none of whose
/// handlers' views carries a schema.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Gaps {
    /// `(event type, handler names)` whose payload is undescribed.
    pub undescribed: Vec<(String, Vec<String>)>,
}

/// The AsyncAPI 3.0 document of the app `settings` and `registry` describe,
/// and the event types it could not give a payload schema.
///
/// ```
/// let settings = burrow::Settings::default();
/// let (doc, gaps) = burrow::asyncapi::document(&settings, &burrow::Registry::new());
/// assert_eq!(doc["asyncapi"], "3.0.0");
/// assert!(gaps.undescribed.is_empty());
/// ```
pub fn document(settings: &Settings, registry: &Registry) -> (Value, Gaps) {
    let exchange = &settings.amqp.exchange;
    let queue = settings.app_queue();
    let (server, vhost) = server(settings);

    // Binding key → event type → the handlers of that view.
    let mut channels_by_key: BTreeMap<&str, BTreeMap<&str, Vec<&RegisteredHandler>>> =
        BTreeMap::new();
    for handler in registry.handlers() {
        channels_by_key
            .entry(handler.binding_key())
            .or_default()
            .entry(handler.event_type())
            .or_default()
            .push(handler);
    }

    let mut gaps = Gaps::default();
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    let mut schemas = Map::new();
    schemas.insert("BurrowHeaders".into(), headers_schema());
    for (key, by_event) in &channels_by_key {
        let channel_id = identifier(key);
        let mut channel_messages = Map::new();
        let mut operation_messages = Vec::new();
        let mut handler_names = Vec::new();
        for (event_type, handlers) in by_event {
            let message_id = identifier(event_type);
            let names: Vec<String> = handlers.iter().map(|h| h.name().to_owned()).collect();
            let payload = payload(event_type, handlers, &mut schemas).unwrap_or_else(|| {
                gaps.undescribed
                    .push(((*event_type).to_owned(), names.clone()));
                json!({
                    "type": "object",
                    "description": format!(
                        "not described: the event views of {} implement no Event::payload_schema",
                        names.join(", ")
                    ),
                })
            });
            messages.insert(
                message_id.clone(),
                message(event_type, payload, settings.app.name.as_str()),
            );
            channel_messages.insert(
                message_id.clone(),
                json!({ "$ref": format!("#/components/messages/{message_id}") }),
            );
            operation_messages.push(json!({
                "$ref": format!("#/channels/{channel_id}/messages/{message_id}")
            }));
            handler_names.extend(names);
        }
        channels.insert(
            channel_id.clone(),
            json!({
                "address": key,
                "description": format!(
                    "Events routed with a key matching {key:?} on the {exchange:?} topic exchange, \
                     bound to the app queue {queue:?}."
                ),
                "messages": channel_messages,
                "bindings": { "amqp": {
                    "is": "routingKey",
                    "exchange": {
                        "name": exchange,
                        "type": "topic",
                        "durable": true,
                        "autoDelete": false,
                        "vhost": vhost,
                    },
                    "bindingVersion": AMQP_BINDING_VERSION,
                }},
            }),
        );
        operations.insert(
            format!("receive_{channel_id}"),
            json!({
                "action": "receive",
                "channel": { "$ref": format!("#/channels/{channel_id}") },
                "summary": format!("Handled by {}.", handler_names.join(", ")),
                "description": format!(
                    "Consumed from {queue:?} with manual acks; a failed handler's copy climbs the \
                     retry ladder and ends in {:?} (docs/wire-contract.md §6).",
                    settings.dead_letter_queue()
                ),
                "messages": operation_messages,
                "bindings": { "amqp": { "ack": true, "bindingVersion": AMQP_BINDING_VERSION } },
                "x-burrow-handlers": handler_names,
                "x-burrow-queue": queue,
            }),
        );
    }

    let doc = json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": format!("burrow app {}", settings.app.name),
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "The domain events the app {:?} subscribes to on the {exchange:?} exchange, as \
                 burrow's wire contract (docs/wire-contract.md) defines them. Publish each event \
                 mandatory, persistent and with publisher confirms, the event type as the routing \
                 key, the body as one UTF-8 JSON object with camelCase fields. Generated by \
                 `burrow asyncapi`.",
                settings.app.name
            ),
        },
        "defaultContentType": "application/json",
        "servers": { "broker": server },
        "channels": channels,
        "operations": operations,
        "components": { "messages": messages, "schemas": schemas },
    });
    (doc, gaps)
}

/// The broker as an AsyncAPI server (host and port only: never the
/// userinfo) and the vhost for the exchange binding.
fn server(settings: &Settings) -> (Value, String) {
    let parsed = settings
        .amqp
        .url
        .expose()
        .parse::<lapin::uri::AMQPUri>()
        // `Settings::validate` parses the URL; an unvalidated one that does
        // not parse still gets a document, with lapin's defaults.
        .unwrap_or_default();
    let server = json!({
        "host": format!("{}:{}", parsed.authority.host, parsed.authority.port),
        "protocol": parsed.scheme.to_string(),
        "protocolVersion": "0.9.1",
        "description": "The RabbitMQ broker (amqp.url).",
    });
    (server, parsed.vhost)
}

/// The payload of `event_type`: its views' schemas, definitions moved to
/// `components/schemas`; `None` when no view has one.
fn payload(
    event_type: &str,
    handlers: &[&RegisteredHandler],
    schemas: &mut Map<String, Value>,
) -> Option<Value> {
    let mut views: Vec<Value> = Vec::new();
    for handler in handlers {
        let Some(schema) = handler.payload_schema() else {
            continue;
        };
        let schema = hoist_definitions(event_type, schema, schemas);
        if !views.contains(&schema) {
            views.push(schema);
        }
    }
    match views.len() {
        0 => None,
        1 => views.pop(),
        _ => Some(json!({
            "description": format!(
                "The handlers of {event_type} decode it into different views; a body must \
                 satisfy every one."
            ),
            "allOf": views,
        })),
    }
}

/// Moves a root schema's `definitions` into `components/schemas` under
/// `<event type>_<name>` and points its `$ref`s there: inside an AsyncAPI
/// document, `#/definitions/...` would resolve against the document root.
fn hoist_definitions(
    event_type: &str,
    mut schema: Value,
    schemas: &mut Map<String, Value>,
) -> Value {
    let Some(object) = schema.as_object_mut() else {
        return schema;
    };
    object.remove("$schema");
    let definitions = object.remove("definitions");
    let prefix = identifier(event_type);
    let rewrite = |mut value: Value| {
        rewrite_refs(&mut value, &prefix);
        value
    };
    if let Some(Value::Object(definitions)) = definitions {
        for (name, definition) in definitions {
            schemas.insert(format!("{prefix}_{name}"), rewrite(definition));
        }
    }
    rewrite(schema)
}

fn rewrite_refs(value: &mut Value, prefix: &str) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                if key == "$ref"
                    && let Value::String(target) = inner
                    && let Some(name) = target.strip_prefix("#/definitions/")
                {
                    *target = format!("#/components/schemas/{prefix}_{name}");
                } else {
                    rewrite_refs(inner, prefix);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_refs(v, prefix)),
        _ => {}
    }
}

/// One message: payload, headers and the properties of the contract.
fn message(event_type: &str, payload: Value, app: &str) -> Value {
    json!({
        "name": event_type,
        "title": event_type,
        "contentType": "application/json",
        "headers": { "$ref": "#/components/schemas/BurrowHeaders" },
        "payload": payload,
        "bindings": { "amqp": {
            "messageType": event_type,
            "bindingVersion": AMQP_BINDING_VERSION,
        }},
        "x-amqp-properties": properties_schema(event_type, app),
    })
}

/// The headers a publisher may set (docs/wire-contract.md §2, §4).
fn headers_schema() -> Value {
    json!({
        "type": "object",
        "description": "The AMQP headers table. A publisher sets only these two burrow-* headers: \
            the others belong to burrow's retry and dead-letter copies and change how a message \
            is handled. Other headers are carried through untouched.",
        "properties": {
            headers::EVENT_VERSION: {
                "type": "integer",
                "minimum": 1,
                "description": "Schema version of the body; a message without it is version 1. \
                    Any AMQP integer width.",
            },
            headers::CAUSATION_ID: {
                "type": "string",
                "description": "The id of the message or command that caused the event. A \
                    value that is not a string is dead-lettered as bad_headers.",
            },
        },
    })
}

/// The AMQP properties a conforming publisher sets (docs/wire-contract.md
/// §2). The consumer needs none of them (§7), but without `message_id`
/// two events with identical bodies share a derived id.
fn properties_schema(event_type: &str, app: &str) -> Value {
    json!({
        "type": "object",
        "description": "AMQP basic properties (not headers). burrow's consumer accepts a message \
            without any of them (docs/wire-contract.md §7); a conforming publisher sets all.",
        "required": ["message_id", "correlation_id", "timestamp", "type", "content_type", "app_id", "delivery_mode"],
        "properties": {
            "message_id": { "type": "string", "minLength": 1,
                "description": "Unique per event (a UUID); the same id when publishing the same event again." },
            "correlation_id": { "type": "string",
                "description": "Ties together everything one request caused; the message id when there is none." },
            "timestamp": { "type": "integer", "minimum": 0,
                "description": "When the event occurred, in Unix seconds (not milliseconds)." },
            "type": { "const": event_type, "description": "The event type, equal to the routing key." },
            "content_type": { "const": "application/json" },
            "content_encoding": { "enum": ["", "identity", "utf-8", "UTF-8"],
                "description": "Unset; anything else is dead-lettered as unsupported_encoding." },
            "app_id": { "type": "string", "description": format!("The publishing service's name (this app is {app:?}).") },
            "delivery_mode": { "const": 2, "description": "Persistent." },
        },
    })
}

/// `s` as a component or channel id: AsyncAPI allows `[A-Za-z0-9._-]`.
fn identifier(s: &str) -> String {
    let mut id = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-' => id.push(c),
            // The topic wildcards, spelt out so `card.*` and `card.#` differ.
            '*' => id.push_str("star"),
            '#' => id.push_str("hash"),
            _ => id.push('_'),
        }
    }
    id
}

#[cfg(test)]
mod tests;
