//! The conformance suite (`conformance/cases/*.json`) against burrow's
//! consumer: a worker running the reference modules of `handlers/` on a
//! real broker receives every case as its publisher sends it, and each
//! ends as the case expects: handled by the named handlers, dead-lettered
//! with the named reason, or ignored. The TypeScript publisher's tests
//! (clients/typescript) check their output against the same files, so the
//! two sides cannot drift. The format is described in
//! docs/wire-contract.md §11.

mod common;

#[allow(dead_code, unreachable_pub)]
#[path = "../handlers/mod.rs"]
mod handlers;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use burrow::{Registry, Settings, cli::ModuleContext, wire::derive_message_id};
use common::*;
use lapin::{
    BasicProperties,
    options::QueueBindOptions,
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
};
use serde_json::Value;

/// One case file.
struct Case {
    name: String,
    json: Value,
}

fn cases() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/cases");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("a case file");
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            Case { name, json }
        })
        .collect()
}

/// `{"$repeat": {"text": "x", "count": n}}`: the text `n` times.
fn repeated(value: &Value) -> Option<String> {
    let spec = value.get("$repeat")?;
    let text = spec["text"].as_str().expect("$repeat.text");
    let count = spec["count"].as_u64().expect("$repeat.count");
    Some(text.repeat(count as usize))
}

impl Case {
    fn routing_key(&self) -> &str {
        self.json["routingKey"].as_str().expect("routingKey")
    }

    /// The body bytes: `body` (JSON, compact), `bodyText`, `bodyBase64` or `bodyRepeat`.
    fn body(&self) -> Vec<u8> {
        let j = &self.json;
        if let Some(body) = j.get("body") {
            serde_json::to_vec(body).unwrap()
        } else if let Some(text) = j.get("bodyText") {
            text.as_str().expect("bodyText").as_bytes().to_vec()
        } else if let Some(b64) = j.get("bodyBase64") {
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_str().expect("bodyBase64"))
                .expect("base64")
        } else if let Some(spec) = j.get("bodyRepeat") {
            repeated(&serde_json::json!({ "$repeat": spec }))
                .unwrap()
                .into_bytes()
        } else {
            panic!(
                "case {} has no body, bodyText, bodyBase64 or bodyRepeat",
                self.name
            )
        }
    }

    /// The properties as amqplib names them (`persistent`, `messageId`, ...).
    fn properties(&self, app_id: &str) -> BasicProperties {
        let props = self.json["properties"].as_object().expect("properties");
        let mut out = BasicProperties::default();
        for (key, value) in props {
            let text = || {
                let s = value
                    .as_str()
                    .unwrap_or_else(|| panic!("{key} is a string"));
                ShortString::from(if s == "$appId" { app_id } else { s })
            };
            out = match key.as_str() {
                "persistent" if value == true => out.with_delivery_mode(2),
                "persistent" => out,
                "messageId" => out.with_message_id(text()),
                "correlationId" => out.with_correlation_id(text()),
                "type" => out.with_type(text()),
                "contentType" => out.with_content_type(text()),
                "contentEncoding" => out.with_content_encoding(text()),
                "appId" => out.with_app_id(text()),
                "timestamp" => out.with_timestamp(value.as_u64().expect("timestamp")),
                "headers" => out.with_headers(table(value)),
                other => panic!("case {}: unknown property {other:?}", self.name),
            };
        }
        out
    }
}

/// A JSON object as an AMQP table: strings are long strings, integers
/// signed 64-bit, arrays field arrays.
fn table(value: &Value) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in value.as_object().expect("headers is an object") {
        table.insert(ShortString::from(key.as_str()), amqp_value(value));
    }
    table
}

fn amqp_value(value: &Value) -> AMQPValue {
    if let Some(text) = repeated(value) {
        return AMQPValue::LongString(LongString::from(text.into_bytes()));
    }
    match value {
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Number(n) => AMQPValue::LongLongInt(n.as_i64().expect("an integer header")),
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(amqp_value).collect::<Vec<_>>(),
        )),
        Value::Object(_) => AMQPValue::FieldTable(table(value)),
        Value::Null => AMQPValue::Void,
    }
}

#[tokio::test]
async fn every_conformance_case_ends_as_it_says() {
    let cases = cases();
    assert!(cases.len() >= 20, "the suite lost cases: {}", cases.len());
    let settings: Settings = TestApp::new("conformance").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let mut registry = Registry::new();
    let context = ModuleContext::new(&settings).expect("module context");
    for register in handlers::MODULES {
        register(&mut registry, &context).expect("the reference modules register");
    }
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let raw = Raw::connect().await;
    // A case's event type may be one no handler subscribes to (the ignored
    // case): bind it as a stale binding would.
    for case in &cases {
        raw.channel
            .queue_bind(
                settings.app_queue().as_str().into(),
                settings.amqp.exchange.as_str().into(),
                case.routing_key().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("queue.bind");
    }

    let mut failures = Vec::new();
    for case in &cases {
        let body = case.body();
        let properties = case.properties(&settings.app.name);
        let message_id = match properties.message_id() {
            Some(id) => id.to_string(),
            None => derive_message_id(case.routing_key(), &body),
        };
        raw.publish(
            &settings.amqp.exchange,
            case.routing_key(),
            &body,
            properties,
        )
        .await;
        // One publish at a time, so the next outcome is this case's.
        let outcome = next_outcome(&mut outcomes).await;
        let expect = &case.json["expect"];
        let mut problems = Vec::new();
        if outcome.message_id != message_id {
            problems.push(format!(
                "message id {:?}, expected {message_id:?}",
                outcome.message_id
            ));
        }
        if expect["messageId"] == "derived" && !outcome.message_id.starts_with("derived-") {
            problems.push(format!(
                "message id {:?} is not a derived one",
                outcome.message_id
            ));
        }
        let mut succeeded = outcome.succeeded.clone();
        succeeded.sort();
        if let Some(handlers) = expect.get("handlers") {
            let mut wanted: Vec<String> = serde_json::from_value(handlers.clone()).unwrap();
            wanted.sort();
            if succeeded != wanted {
                problems.push(format!("handled by {succeeded:?}, expected {wanted:?}"));
            }
        }
        match expect["outcome"].as_str().expect("expect.outcome") {
            "handled" => {
                if outcome.dead_lettered.is_some() || outcome.retried.is_some() || outcome.ignored {
                    problems.push(format!("expected handled, got {outcome:?}"));
                }
            }
            "dead_lettered" => {
                let reason = expect["reason"].as_str().expect("expect.reason");
                match &outcome.dead_lettered {
                    Some(dead) if dead.reason.as_str() == reason => {}
                    other => problems.push(format!("expected dead letter {reason}, got {other:?}")),
                }
            }
            "ignored" => {
                if !outcome.ignored {
                    problems.push(format!("expected ignored, got {outcome:?}"));
                }
            }
            other => panic!("case {}: unknown expect.outcome {other:?}", case.name),
        }
        if !outcome.acked {
            problems.push("the delivery was not acked".to_owned());
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.name, problems.join("; ")));
        }
    }
    // Every dead-lettered case has its copy in the dead-letter queue.
    let dead = cases
        .iter()
        .filter(|c| c.json["expect"]["outcome"] == "dead_lettered")
        .count() as u32;
    raw.wait_ready(
        &settings.dead_letter_queue(),
        dead,
        "one copy per dead-lettered case",
    )
    .await;
    raw.close().await;
    within("the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops cleanly");
    assert!(
        failures.is_empty(),
        "conformance cases failed:\n{}",
        failures.join("\n")
    );
}
