//! Reading what arrives. Reading is total: any message, including one with
//! no properties at all (a plain amqplib `publish(exchange, key, body, {
//! persistent: true })`), yields an [`Incoming`]. Headers of the wrong type
//! are reported in [`Incoming::bad_header`] so the consumer can dead-letter the
//! message with a reason instead of guessing.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use sha2::{Digest, Sha256};

use super::headers;

/// Header RabbitMQ adds to messages it dead-letters itself (array of tables,
/// the most recent death first).
pub(crate) const X_DEATH: &str = "x-death";

/// The metadata of one delivery, read leniently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The AMQP `message_id`, or a stable id derived from the event type and
    /// body when the publisher set none (`derived-<hex>`).
    pub message_id: String,
    /// Whether [`Incoming::message_id`] was derived.
    pub message_id_derived: bool,
    /// The event type: the `burrow-event-type` header on copies, else the
    /// routing key (or the `type` property for messages sent straight to a queue).
    pub event_type: String,
    /// The AMQP `correlation_id`, if any.
    pub correlation_id: Option<String>,
    /// The `burrow-causation-id` header, if any.
    pub causation_id: Option<String>,
    /// This delivery's attempt number, from 1.
    pub attempt: u32,
    /// The handlers still to run; `None` means all subscribed handlers.
    pub pending_handlers: Option<Vec<String>>,
    /// When the first failure happened (Unix ms), for copies that failed before.
    pub first_failure_at: Option<i64>,
    /// The first header that could not be read, if any.
    pub bad_header: Option<String>,
}

impl Incoming {
    /// Reads a delivery's metadata. `exchange` and `routing_key` are the
    /// delivery's own; `body` feeds the derived message id.
    pub fn read(
        exchange: &str,
        routing_key: &str,
        properties: &BasicProperties,
        body: &[u8],
    ) -> Self {
        let empty = FieldTable::default();
        let headers = properties.headers().as_ref().unwrap_or(&empty);
        let mut problem = None;
        let mut note = |p: String| {
            if problem.is_none() {
                problem = Some(p);
            }
        };

        let event_type = match string_header(headers, headers::EVENT_TYPE) {
            Ok(Some(t)) if !t.is_empty() => t,
            Ok(_) => match (exchange.is_empty(), properties.kind()) {
                (true, Some(kind)) if !kind.as_str().is_empty() => kind.to_string(),
                _ => routing_key.to_owned(),
            },
            Err(e) => {
                note(e);
                routing_key.to_owned()
            }
        };

        let (message_id, message_id_derived) = match properties.message_id() {
            Some(id) if !id.as_str().is_empty() => (id.to_string(), false),
            _ => (derive_message_id(&event_type, body), true),
        };

        let attempt = match int_header(headers, headers::ATTEMPT) {
            Ok(None) => 1,
            Ok(Some(n)) if (1..=i64::from(u32::MAX)).contains(&n) => n as u32,
            Ok(Some(n)) => {
                note(format!(
                    "header {} = {n} is out of range (must be >= 1)",
                    headers::ATTEMPT
                ));
                1
            }
            Err(e) => {
                note(e);
                1
            }
        };

        let pending_handlers = match headers.inner().get(headers::HANDLERS) {
            None => None,
            Some(AMQPValue::FieldArray(items)) => {
                let mut names = Vec::with_capacity(items.as_slice().len());
                for item in items.as_slice() {
                    match value_as_string(item) {
                        Some(name) => names.push(name),
                        None => {
                            note(format!(
                                "header {} holds a {:?}, expected strings",
                                headers::HANDLERS,
                                item.get_type()
                            ));
                        }
                    }
                }
                Some(names)
            }
            Some(other) => {
                note(format!(
                    "header {} is a {:?}, expected an array of strings",
                    headers::HANDLERS,
                    other.get_type()
                ));
                None
            }
        };

        let first_failure_at = int_header(headers, headers::FIRST_FAILURE_AT).unwrap_or_else(|e| {
            note(e);
            None
        });
        let causation_id = string_header(headers, headers::CAUSATION_ID).unwrap_or_else(|e| {
            note(e);
            None
        });

        Incoming {
            message_id,
            message_id_derived,
            event_type,
            correlation_id: properties.correlation_id().as_ref().map(|c| c.to_string()),
            causation_id,
            attempt,
            pending_handlers,
            first_failure_at,
            bad_header: problem,
        }
    }
}

/// A stable id for a message that arrived without one: the same event type and
/// body always give the same id, so logs and de-duplication can rely on it.
pub fn derive_message_id(event_type: &str, body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(event_type.as_bytes());
    hasher.update([0u8]);
    hasher.update(body);
    let digest = hasher.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("derived-{hex}")
}

fn value_as_string(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

pub(crate) fn string_header(headers: &FieldTable, name: &str) -> Result<Option<String>, String> {
    match headers.inner().get(name) {
        None => Ok(None),
        Some(v) => value_as_string(v)
            .map(Some)
            .ok_or_else(|| format!("header {name} is a {:?}, expected a string", v.get_type())),
    }
}

pub(crate) fn int_header(headers: &FieldTable, name: &str) -> Result<Option<i64>, String> {
    let v = match headers.inner().get(name) {
        None => return Ok(None),
        Some(v) => v,
    };
    let n = match v {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::Timestamp(n) => i64::try_from(*n).unwrap_or(i64::MAX),
        other => {
            return Err(format!(
                "header {name} is a {:?}, expected an integer",
                other.get_type()
            ));
        }
    };
    Ok(Some(n))
}

// Lenient readers, for looking at what is parked (`dlq`): a missing or
// mistyped header is `None` (or empty), never an error.

/// A string header, if it is one.
pub(crate) fn header_string(headers: &FieldTable, name: &str) -> Option<String> {
    string_header(headers, name).ok().flatten()
}

pub(crate) fn header_int(headers: &FieldTable, name: &str) -> Option<i64> {
    int_header(headers, name).ok().flatten()
}

pub(crate) fn header_strings(headers: &FieldTable, name: &str) -> Vec<String> {
    match headers.inner().get(name) {
        Some(AMQPValue::FieldArray(items)) => items
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                AMQPValue::ShortString(s) => Some(s.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The `x-death` entries, most recent first.
pub(crate) fn x_death_entries(headers: &FieldTable) -> Vec<&FieldTable> {
    match headers.inner().get(X_DEATH) {
        Some(AMQPValue::FieldArray(items)) => items
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::FieldTable(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The routing key a broker-dead-lettered message was first published with
/// to a named exchange (the event type), from its oldest `x-death` entry
/// that names one.
pub(crate) fn first_published_routing_key(headers: &FieldTable) -> Option<String> {
    x_death_entries(headers).into_iter().rev().find_map(|d| {
        let exchange = header_string(d, "exchange")?;
        if exchange.is_empty() {
            return None;
        }
        header_strings(d, "routing-keys").into_iter().next()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{long_string, string_array};

    fn props_with(headers: FieldTable) -> BasicProperties {
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn a_message_without_properties_is_read() {
        let body = br#"{"aggregateId":"c1"}"#;
        let inc = Incoming::read(
            "domain_events",
            "CardAddedToLibraryEvent",
            &BasicProperties::default(),
            body,
        );
        assert_eq!(inc.event_type, "CardAddedToLibraryEvent");
        assert!(inc.message_id_derived);
        assert!(inc.message_id.starts_with("derived-"));
        assert_eq!(inc.attempt, 1);
        assert_eq!(inc.pending_handlers, None);
        assert_eq!(inc.bad_header, None);
        // Stable: the same message gets the same id on every delivery.
        let again = Incoming::read(
            "domain_events",
            "CardAddedToLibraryEvent",
            &BasicProperties::default(),
            body,
        );
        assert_eq!(inc.message_id, again.message_id);
        let other = Incoming::read(
            "domain_events",
            "CardAddedToLibraryEvent",
            &BasicProperties::default(),
            b"{}",
        );
        assert_ne!(inc.message_id, other.message_id);
    }

    #[test]
    fn copies_carry_their_event_type_attempt_and_handlers() {
        let mut h = FieldTable::default();
        h.insert(
            headers::EVENT_TYPE.into(),
            long_string("CollectionCreatedEvent"),
        );
        h.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(3));
        h.insert(
            headers::HANDLERS.into(),
            string_array(&["feeds.add".into()]),
        );
        h.insert(
            headers::FIRST_FAILURE_AT.into(),
            AMQPValue::LongLongInt(1700),
        );
        let props = props_with(h).with_message_id("m-1".into());
        let inc = Incoming::read("", "events_app", &props, b"{}");
        assert_eq!(inc.event_type, "CollectionCreatedEvent");
        assert_eq!(inc.message_id, "m-1");
        assert!(!inc.message_id_derived);
        assert_eq!(inc.attempt, 3);
        assert_eq!(inc.pending_handlers, Some(vec!["feeds.add".to_owned()]));
        assert_eq!(inc.first_failure_at, Some(1700));
        assert_eq!(inc.bad_header, None);
    }

    #[test]
    fn a_message_sent_straight_to_the_queue_uses_its_type_property() {
        let props = BasicProperties::default().with_type("CollectionCreatedEvent".into());
        let inc = Incoming::read("", "events_app", &props, b"{}");
        assert_eq!(inc.event_type, "CollectionCreatedEvent");
    }

    #[test]
    fn wrong_header_types_are_reported_not_guessed() {
        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPT.into(), long_string("2"));
        let inc = Incoming::read("x", "T", &props_with(h), b"{}");
        assert_eq!(inc.attempt, 1);
        assert!(inc.bad_header.unwrap().contains(headers::ATTEMPT));

        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPT.into(), AMQPValue::LongInt(-4));
        let inc = Incoming::read("x", "T", &props_with(h), b"{}");
        assert!(inc.bad_header.unwrap().contains("out of range"));

        let mut h = FieldTable::default();
        h.insert(headers::HANDLERS.into(), AMQPValue::LongInt(1));
        let inc = Incoming::read("x", "T", &props_with(h), b"{}");
        assert!(inc.bad_header.unwrap().contains(headers::HANDLERS));
    }
}
