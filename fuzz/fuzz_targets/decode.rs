//! Fuzzes what a delivery's bytes go through before any handler code runs:
//! the AMQP header table (parsed as the broker sends it), burrow's header
//! reading, the dead-letter reader, and the pipeline's decode-and-decide path.
//!
//! Input layout: byte 0 picks where the header table ends; the rest is the
//! table followed by the body. Invariants checked: nothing panics, the attempt
//! is at least 1, and a message with unreadable burrow headers is
//! dead-lettered as `bad_headers` without running a handler.

#![no_main]

use std::{sync::OnceLock, sync::Arc, time::Duration};

use burrow::{DeadReason, DomainEvent, Event, HandlerError, Registry, RetryLadder, Settlement, internals::{Pipeline, PipelineConfig}};
use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CardAdded {
    aggregate_id: String,
    user_id: Option<String>,
    tags: Option<Vec<String>>,
}

impl Event for CardAdded {
    const EVENT_TYPE: &'static str = "CardAddedToLibraryEvent";
}

impl DomainEvent for CardAdded {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    pipeline: Pipeline,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let mut registry = Registry::new();
        registry
            .on("fuzz.ok", |_: CardAdded, _| async { Ok::<_, HandlerError>(()) })
            .expect("register");
        Harness {
            runtime: tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime"),
            pipeline: Pipeline::new(
                Arc::new(registry),
                PipelineConfig {
                    ladder: RetryLadder::new("events_fuzz", &[Duration::from_secs(1)]),
                    handler_timeout: Duration::from_secs(5),
                    max_body_bytes: 64 * 1024,
                    header_budget: burrow::internals::HeaderBudget::default(),
                },
            ),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let split = (selector as usize * rest.len()) / 256;
    let (table, body) = rest.split_at(split);
    let headers = lapin::types::parsing::parse_field_table(table).map(|(_, t)| t).unwrap_or_default();
    let props = BasicProperties::default().with_headers(headers);

    let incoming = burrow::internals::Incoming::read("domain_events", "CardAddedToLibraryEvent", &props, body);
    assert!(incoming.attempt >= 1);
    let _ = burrow::internals::read_dead_letter("events_fuzz.dead", props.clone(), body.to_vec());

    let h = harness();
    let token = tokio_util::sync::CancellationToken::new();
    let processed = h.runtime.block_on(h.pipeline.process(
        "domain_events",
        "CardAddedToLibraryEvent",
        &props,
        body,
        &token,
    ));
    if incoming.bad_header.is_some() && body.len() <= 64 * 1024 {
        match &processed.settlement {
            // The header budget is checked first (deep nesting fits in a fuzz input).
            Settlement::DeadLetter(d) => assert!(
                matches!(d.reason, DeadReason::BadHeaders | DeadReason::HeadersTooLarge),
                "unreadable headers dead-lettered as {:?}",
                d.reason
            ),
            other => panic!("unreadable headers settled as {other:?}"),
        }
        assert!(processed.runs.is_empty());
    }
});
