//! `burrow asyncapi` for the reference modules in `handlers/`: the document
//! checked in at `docs/asyncapi.yaml` is what the binary prints now, and
//! every reference event type has a payload schema. AsyncAPI's own parser
//! validates the same file in `make asyncapi-check`.

mod common;

use std::process::Output;

use common::{bin::BIN, within};
use tokio::process::Command;

/// The command that regenerates the checked-in document.
const REGENERATE: &str = "cargo run --quiet -- asyncapi > docs/asyncapi.yaml";

/// `burrow asyncapi <args>` with the repository's default settings only: no
/// `BURROW__*` variable or `APP_ENV` of the test's environment leaks in.
async fn asyncapi(args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    for (key, _) in std::env::vars() {
        if key.starts_with("BURROW") || key == "APP_ENV" {
            command.env_remove(key);
        }
    }
    command.arg("asyncapi").args(args).env(
        "BURROW_CONFIG_DIR",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config"),
    );
    let out = within("burrow asyncapi", command.output())
        .await
        .expect("burrow asyncapi runs");
    assert!(
        out.status.success(),
        "burrow asyncapi {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test]
async fn docs_asyncapi_yaml_is_current() {
    let out = asyncapi(&[]).await;
    let printed = String::from_utf8(out.stdout).expect("YAML is UTF-8");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/asyncapi.yaml");
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        printed == checked_in,
        "docs/asyncapi.yaml is not what `burrow asyncapi` prints for the reference modules \
         (handlers/ or the document's generator changed); regenerate it from the repository's \
         root with `{REGENERATE}` and commit it"
    );
    // Every reference view carries a schema: nothing to warn about.
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[tokio::test]
async fn every_reference_event_type_has_a_payload_schema() {
    let out = asyncapi(&["--output", "json"]).await;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert_eq!(
        doc["channels"]["CardAddedToLibraryEvent"]["bindings"]["amqp"]["exchange"]["name"],
        "domain_events"
    );
    let messages = &doc["components"]["messages"];
    // Two handlers read CardAddedToLibraryEvent through different views:
    // a body must satisfy both.
    let card = &messages["CardAddedToLibraryEvent"]["payload"]["allOf"];
    let required: Vec<&str> = card
        .as_array()
        .expect("two views")
        .iter()
        .flat_map(|view| view["required"].as_array().expect("required").iter())
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        required,
        ["aggregateId", "userId", "aggregateId", "libraryId"]
    );
    let collection = &messages["CollectionCreatedEvent"]["payload"];
    assert_eq!(
        collection["required"],
        serde_json::json!(["aggregateId", "name", "authorId"])
    );
    assert_eq!(
        collection["properties"]["dateTimeOccurred"]["format"], "date-time",
        "the schema names the field as TypeScript publishers send it"
    );
}
