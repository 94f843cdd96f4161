use serde::Deserialize;
use serde_json::json;

use super::*;
use crate::{Context, Event, HandlerError};

// The test views are never handled, only described: their fields are never read.

/// One handler's view of a card event: the fields it reads.
#[allow(dead_code)]
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
struct CardForFeeds {
    aggregate_id: String,
    user_id: String,
}

impl Event for CardForFeeds {
    const EVENT_TYPE: &'static str = "CardAddedToLibraryEvent";
    fn payload_schema() -> Option<Value> {
        Some(json_schema::<Self>())
    }
}

/// Another view of the same event, with a nested type.
#[allow(dead_code)]
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
struct CardForNotifications {
    aggregate_id: String,
    library: Library,
}

#[allow(dead_code)]
#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct Library {
    id: String,
}

impl Event for CardForNotifications {
    const EVENT_TYPE: &'static str = "CardAddedToLibraryEvent";
    fn payload_schema() -> Option<Value> {
        Some(json_schema::<Self>())
    }
}

/// A view written before schemas existed: no `payload_schema`.
#[derive(Debug, Deserialize)]
struct Legacy {}

impl Event for Legacy {
    const EVENT_TYPE: &'static str = "LegacyEvent";
}

fn registry() -> Registry {
    async fn ok() -> Result<(), HandlerError> {
        Ok(())
    }
    let mut registry = Registry::new();
    registry
        .on("feeds.add", |_: CardForFeeds, _: Context| ok())
        .unwrap()
        .on(
            "notifications.notify",
            |_: CardForNotifications, _: Context| ok(),
        )
        .unwrap()
        .on("legacy.audit", |_: Legacy, _: Context| ok())
        .unwrap();
    registry
}

fn settings() -> Settings {
    let mut settings = Settings::default();
    settings.app.name = "library".into();
    settings.amqp.exchange = "domain_events".into();
    settings.amqp.url = crate::config::AmqpUrl::new("amqp://ada:secret@rabbit.internal:5673/prod");
    settings
}

#[test]
fn one_channel_and_operation_per_binding_key() {
    let (doc, _) = document(&settings(), &registry());
    let channels = doc["channels"].as_object().unwrap();
    assert_eq!(
        channels.keys().collect::<Vec<_>>(),
        ["CardAddedToLibraryEvent", "LegacyEvent"]
    );
    let card = &channels["CardAddedToLibraryEvent"];
    assert_eq!(card["address"], "CardAddedToLibraryEvent");
    assert_eq!(
        card["bindings"]["amqp"]["exchange"]["name"],
        "domain_events"
    );
    assert_eq!(card["bindings"]["amqp"]["exchange"]["type"], "topic");
    assert_eq!(card["bindings"]["amqp"]["exchange"]["vhost"], "prod");
    let op = &doc["operations"]["receive_CardAddedToLibraryEvent"];
    assert_eq!(op["action"], "receive");
    assert_eq!(
        op["x-burrow-handlers"],
        json!(["feeds.add", "notifications.notify"])
    );
    assert_eq!(op["x-burrow-queue"], "events_library");
}

#[test]
fn the_server_never_carries_the_password() {
    let (doc, _) = document(&settings(), &registry());
    assert_eq!(doc["servers"]["broker"]["host"], "rabbit.internal:5673");
    assert!(!doc.to_string().contains("secret"));
    assert!(!to_yaml(&doc).contains("ada"));
}

#[test]
fn different_views_of_one_event_must_all_decode() {
    let (doc, gaps) = document(&settings(), &registry());
    let payload = &doc["components"]["messages"]["CardAddedToLibraryEvent"]["payload"];
    let views = payload["allOf"].as_array().expect("two views: allOf");
    assert_eq!(views.len(), 2);
    assert_eq!(views[0]["required"], json!(["aggregateId", "userId"]));
    // The nested type lives in components, and the reference points there.
    assert_eq!(
        views[1]["properties"]["library"]["$ref"],
        "#/components/schemas/CardAddedToLibraryEvent_Library"
    );
    assert_eq!(
        doc["components"]["schemas"]["CardAddedToLibraryEvent_Library"]["required"],
        json!(["id"])
    );
    assert_eq!(
        gaps.undescribed,
        vec![("LegacyEvent".to_owned(), vec!["legacy.audit".to_owned()])]
    );
}

#[test]
fn messages_carry_the_contract_headers_and_properties() {
    let (doc, _) = document(&settings(), &registry());
    let message = &doc["components"]["messages"]["CardAddedToLibraryEvent"];
    assert_eq!(
        message["headers"]["$ref"],
        "#/components/schemas/BurrowHeaders"
    );
    let headers = &doc["components"]["schemas"]["BurrowHeaders"]["properties"];
    assert_eq!(headers["burrow-event-version"]["type"], "integer");
    assert_eq!(headers["burrow-causation-id"]["type"], "string");
    let properties = &message["x-amqp-properties"]["properties"];
    assert_eq!(properties["type"]["const"], "CardAddedToLibraryEvent");
    assert_eq!(properties["delivery_mode"]["const"], 2);
    assert_eq!(
        message["bindings"]["amqp"]["messageType"],
        "CardAddedToLibraryEvent"
    );
}

#[test]
fn wildcard_keys_become_valid_ids() {
    assert_eq!(identifier("card.*"), "card.star");
    assert_eq!(identifier("card.#"), "card.hash");
    assert_eq!(identifier("a b"), "a_b");
}
