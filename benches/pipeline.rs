//! Micro-benchmarks of the consumer's hot path without a broker:
//! `Incoming::read` (the metadata of one delivery) and `Pipeline::process`
//! (decode → dispatch → settlement decision) on an in-memory ~200-byte body
//! with a no-op typed handler.
//!
//! The `reference/*` group is what a hand-written lapin loop does between
//! receiving a delivery and acking it (serde decode, call the handler), so
//! the pipeline's own cost is the difference. `ack_window/*` is the
//! bookkeeping behind coalesced acks, per prefetch window of 64 deliveries.
//!
//! ```text
//! cargo bench --bench pipeline
//! cargo bench --bench pipeline -- --profile-time 10 'pipeline/process/ack'   # for a profiler
//! ```

use std::{hint::black_box, sync::Arc, time::Duration};

use burrow::{
    Context, DomainEvent, Event, HandlerError, Registry, RetryLadder, Settlement,
    internals::{AckWindow, HeaderBudget, Incoming, Pipeline, PipelineConfig},
    wire::headers,
};
use chrono::{DateTime, Utc};
use criterion::{Criterion, criterion_group, criterion_main};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

const EXCHANGE: &str = "domain_events";
const EVENT_TYPE: &str = "CardAddedToLibraryEvent";
const APP_QUEUE: &str = "events_library";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CardAddedToLibraryEvent {
    aggregate_id: String,
    user_id: String,
    library_id: String,
    date_time_occurred: DateTime<Utc>,
    seq: u64,
    sent_at_ns: u64,
}

impl Event for CardAddedToLibraryEvent {
    const EVENT_TYPE: &'static str = EVENT_TYPE;
}

impl DomainEvent for CardAddedToLibraryEvent {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        self.date_time_occurred
    }
}

/// The same ~190-byte body the end-to-end bench publishes.
fn body() -> Vec<u8> {
    serde_json::to_vec(&CardAddedToLibraryEvent {
        aggregate_id: "card-000000012345-7f3a9c2e4b1d".into(),
        user_id: "user-012345".into(),
        library_id: "library-0345".into(),
        date_time_occurred: "2026-11-23T09:00:00.123456789Z".parse().unwrap(),
        seq: 12_345,
        sent_at_ns: 1_763_888_400_123_456_789,
    })
    .unwrap()
}

/// The properties burrow's publisher sets on an event.
fn published_properties() -> BasicProperties {
    let mut table = FieldTable::default();
    table.insert(headers::EVENT_VERSION.into(), AMQPValue::LongLongInt(1));
    let id = "0b6f2f0e-6a5c-4d5e-9a53-7c1b2f4a9d10";
    BasicProperties::default()
        .with_message_id(ShortString::from(id))
        .with_correlation_id(ShortString::from(id))
        .with_timestamp(1_763_888_400)
        .with_type(ShortString::from(EVENT_TYPE))
        .with_content_type(ShortString::from("application/json"))
        .with_app_id(ShortString::from("library"))
        .with_delivery_mode(2)
        .with_headers(table)
}

/// A copy coming back from retry step 1: burrow's headers on top.
fn retry_copy_properties() -> BasicProperties {
    let mut props = published_properties();
    let mut table = props.headers().clone().unwrap_or_default();
    let long = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    table.insert(headers::EVENT_TYPE.into(), long(EVENT_TYPE));
    table.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(2));
    table.insert(
        headers::HANDLERS.into(),
        AMQPValue::FieldArray(FieldArray::from(vec![long("bench.noop")])),
    );
    table.insert(
        headers::FIRST_FAILURE_AT.into(),
        AMQPValue::LongLongInt(1_763_888_400_000),
    );
    table.insert(
        headers::LAST_ERROR.into(),
        long("bench.noop: transient error: the search service timed out"),
    );
    props = props.with_headers(table);
    props
}

#[derive(Clone, Copy)]
enum Mode {
    Ok,
    Transient,
    Permanent,
}

fn pipeline(mode: Mode) -> Pipeline {
    let mut registry = Registry::new();
    registry
        .on(
            "bench.noop",
            move |event: CardAddedToLibraryEvent, _ctx: Context| {
                black_box(&event);
                std::future::ready(match mode {
                    Mode::Ok => Ok(()),
                    Mode::Transient => Err(HandlerError::transient("timed out")),
                    Mode::Permanent => Err(HandlerError::permanent("bad data")),
                })
            },
        )
        .unwrap();
    Pipeline::new(
        Arc::new(registry),
        PipelineConfig {
            ladder: RetryLadder::new(
                APP_QUEUE,
                &[Duration::from_secs(1), Duration::from_secs(10)],
            ),
            handler_timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            header_budget: HeaderBudget::default(),
        },
    )
}

fn bench_incoming(c: &mut Criterion) {
    let body = body();
    let published = published_properties();
    let copy = retry_copy_properties();
    let bare = BasicProperties::default();
    let mut g = c.benchmark_group("wire/incoming_read");
    g.bench_function("published", |b| {
        b.iter(|| {
            Incoming::read(
                black_box(EXCHANGE),
                black_box(EVENT_TYPE),
                &published,
                &body,
            )
        })
    });
    g.bench_function("retry_copy", |b| {
        b.iter(|| Incoming::read(black_box(""), black_box(APP_QUEUE), &copy, &body))
    });
    // No message id: one is derived from a SHA-256 of the body.
    g.bench_function("no_properties", |b| {
        b.iter(|| Incoming::read(black_box(EXCHANGE), black_box(EVENT_TYPE), &bare, &body))
    });
    g.finish();
}

fn bench_process(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = body();
    let published = published_properties();
    let copy = retry_copy_properties();
    let shutdown = CancellationToken::new();
    let ok = pipeline(Mode::Ok);
    let transient = pipeline(Mode::Transient);
    let permanent = pipeline(Mode::Permanent);

    // Sanity: each case decides what its name says.
    rt.block_on(async {
        let s = |p: &Pipeline, props: &BasicProperties, exchange: &str, key: &str, body: &[u8]| {
            let p = p.clone();
            let props = props.clone();
            let (exchange, key, body) = (exchange.to_owned(), key.to_owned(), body.to_vec());
            let shutdown = shutdown.clone();
            async move {
                p.process(&exchange, &key, &props, &body, &shutdown)
                    .await
                    .settlement
            }
        };
        assert_eq!(
            s(&ok, &published, EXCHANGE, EVENT_TYPE, &body).await,
            Settlement::Ack
        );
        assert!(matches!(
            s(&transient, &published, EXCHANGE, EVENT_TYPE, &body).await,
            Settlement::Retry(_)
        ));
        assert!(matches!(
            s(&permanent, &published, EXCHANGE, EVENT_TYPE, &body).await,
            Settlement::DeadLetter(_)
        ));
        assert!(matches!(
            s(&ok, &published, EXCHANGE, EVENT_TYPE, b"not json").await,
            Settlement::DeadLetter(_)
        ));
        assert_eq!(s(&ok, &copy, "", APP_QUEUE, &body).await, Settlement::Ack);
    });

    let mut g = c.benchmark_group("pipeline/process");
    // name, pipeline, properties, exchange, routing key, body
    type Case<'a> = (
        &'a str,
        &'a Pipeline,
        &'a BasicProperties,
        &'a str,
        &'a str,
        &'a [u8],
    );
    let cases: [Case; 5] = [
        ("ack", &ok, &published, EXCHANGE, EVENT_TYPE, &body),
        ("ack_retry_copy", &ok, &copy, "", APP_QUEUE, &body),
        ("retry", &transient, &published, EXCHANGE, EVENT_TYPE, &body),
        (
            "dead_letter",
            &permanent,
            &published,
            EXCHANGE,
            EVENT_TYPE,
            &body,
        ),
        (
            "undecodable",
            &ok,
            &published,
            EXCHANGE,
            EVENT_TYPE,
            b"not json",
        ),
    ];
    for (name, pipeline, props, exchange, key, body) in cases {
        let shutdown = &shutdown;
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async move {
                pipeline
                    .process(black_box(exchange), black_box(key), props, body, shutdown)
                    .await
            })
        });
    }
    g.finish();

    // What the hand-written loop does instead of `process`.
    let mut g = c.benchmark_group("reference");
    let handler = |event: CardAddedToLibraryEvent| {
        black_box(&event);
        std::future::ready(Ok::<(), HandlerError>(()))
    };
    g.bench_function("serde_decode", |b| {
        b.iter(|| serde_json::from_slice::<CardAddedToLibraryEvent>(black_box(&body)).unwrap())
    });
    g.bench_function("decode_and_call", |b| {
        b.to_async(&rt).iter(|| async {
            let event: CardAddedToLibraryEvent = serde_json::from_slice(black_box(&body)).unwrap();
            handler(event).await
        })
    });
    g.finish();
}

fn bench_ack_window(c: &mut Criterion) {
    const WINDOW: u64 = 64;
    let now = tokio::time::Instant::now();
    let hold = burrow::internals::ACK_HOLD;
    let mut g = c.benchmark_group("ack_window");
    // Settled in order, flushed once: one batch of 64.
    g.bench_function("64_in_order", |b| {
        let (mut batch, mut singles) = (Vec::new(), Vec::new());
        b.iter(|| {
            let mut w = AckWindow::default();
            for tag in 1..=WINDOW {
                w.received(tag);
            }
            for tag in 1..=WINDOW {
                w.settled(tag, Some(tag), now).unwrap();
            }
            w.take(now, hold, false, &mut batch, &mut singles);
            let n = batch.len();
            batch.clear();
            black_box(n)
        })
    });
    // Settled in pairs out of order, flushed after every settlement.
    g.bench_function("64_shuffled_flush_each", |b| {
        let (mut batch, mut singles) = (Vec::new(), Vec::new());
        b.iter(|| {
            let mut w = AckWindow::default();
            for tag in 1..=WINDOW {
                w.received(tag);
            }
            let mut frames = 0;
            for pair in (1..=WINDOW).step_by(2) {
                for tag in [pair + 1, pair] {
                    w.settled(tag, Some(tag), now).unwrap();
                    w.take(now, hold, false, &mut batch, &mut singles);
                    frames += usize::from(!batch.is_empty());
                    batch.clear();
                }
            }
            black_box(frames)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_incoming, bench_process, bench_ack_window
}
criterion_main!(benches);
