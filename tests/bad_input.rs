//! Bad input against a running worker: every malformed message ends in one
//! documented place (the dead-letter queue with its reason, or acked as
//! ignored), the worker keeps consuming, and nothing loops.
//!
//! Each test publishes one bad message, checks where it ended, then publishes
//! a good event and checks that it is the very next delivery the worker
//! settles (a redelivered bad message would come first), that it is handled
//! once, and that the app queue is empty once the worker has stopped.
//!
//! Malformed JSON is covered by `dead_letter.rs`
//! (`malformed_json_is_dead_lettered_as_undecodable_and_the_worker_continues`).

mod common;

use burrow::{
    Context, DeadLettered, DeadReason, DomainEvent, Event, EventMeta, Handler, HandlerError,
    Outcome, Publisher, Registry, Settings,
    wire::{HeaderBudget, table_size},
};
use chrono::{DateTime, Utc};
use common::*;
use lapin::{
    BasicProperties,
    message::Delivery,
    options::QueueBindOptions,
    types::{AMQPValue, FieldTable, LongString},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

/// The handler every fixture registers; it records what it handled.
const RECORDER: &str = "library.record_card";

/// A worker with one recording handler, a publisher and a raw connection.
/// Fields drop in order: the worker stops before the cleanup deletes its queues.
struct Fixture {
    settings: Settings,
    worker: TestWorker,
    outcomes: broadcast::Receiver<Outcome>,
    seen: mpsc::UnboundedReceiver<Seen>,
    publisher: Publisher,
    raw: Raw,
    _cleanup: Cleanup,
}

impl Fixture {
    async fn start(
        prefix: &str,
        configure: impl FnOnce(&mut Settings),
        register: impl FnOnce(&mut Registry),
    ) -> Self {
        let mut settings = TestApp::new(prefix).build();
        configure(&mut settings);
        settings.validate().expect("test settings are valid");
        let mut cleanup = Cleanup::new();
        cleanup.app(&settings);

        let (tx, seen) = seen_channel();
        let mut registry = Registry::new();
        registry
            .on(RECORDER, move |event: CardAdded, ctx| {
                let tx = tx.clone();
                async move {
                    tx.send(Seen { event, ctx }).unwrap();
                    Ok::<_, HandlerError>(())
                }
            })
            .unwrap();
        register(&mut registry);
        let (worker, outcomes) = start_worker(settings.clone(), registry).await;
        let publisher = publisher(&settings).await;
        let raw = Raw::connect().await;
        Self {
            settings,
            worker,
            outcomes,
            seen,
            publisher,
            raw,
            _cleanup: cleanup,
        }
    }

    /// Publishes raw bytes to the app's exchange, persistent, with a fresh
    /// message id; returns the id.
    async fn publish_raw(&self, routing_key: &str, body: &[u8], props: BasicProperties) -> String {
        let id = unique("bad");
        let props = props
            .with_message_id(id.as_str().into())
            .with_delivery_mode(2);
        self.raw
            .publish(&self.settings.amqp.exchange, routing_key, body, props)
            .await;
        id
    }

    /// A `CardAddedToLibraryEvent` with these bytes and properties.
    async fn publish_card(&self, body: &[u8], props: BasicProperties) -> String {
        self.publish_raw(CardAdded::EVENT_TYPE, body, props).await
    }

    /// The next outcome is message `id`, dead-lettered for `reason` on
    /// behalf of `handlers` and acked; the dead-letter queue holds it with
    /// its reason and `detail` in `burrow-last-error`, body unchanged.
    async fn expect_dead(
        &mut self,
        id: &str,
        body: &[u8],
        reason: DeadReason,
        handlers: &[&str],
        detail: &str,
    ) -> Delivery {
        let handlers: Vec<String> = handlers.iter().map(|h| h.to_string()).collect();
        let outcome = next_outcome(&mut self.outcomes).await;
        assert_eq!(outcome.message_id, id);
        assert_eq!(outcome.attempt, 1);
        assert_eq!(
            outcome.dead_lettered,
            Some(DeadLettered {
                reason,
                handlers: handlers.clone()
            })
        );
        assert_eq!(outcome.retried, None, "bad input is never retried");
        assert!(outcome.succeeded.is_empty(), "{outcome:?}");
        assert!(
            outcome.acked,
            "the original is acked once the copy is confirmed"
        );

        let dead = self.raw.wait_get(&self.settings.dead_letter_queue()).await;
        let p = &dead.properties;
        assert_eq!(
            p.message_id().as_ref().map(|m| m.as_str()),
            Some(id),
            "the dead letter is the bad message"
        );
        assert_eq!(
            header_str(p, "burrow-dead-reason").as_deref(),
            Some(reason.as_str())
        );
        assert_eq!(header_strings(p, "burrow-handlers"), Some(handlers));
        let last_error = header_str(p, "burrow-last-error").expect("burrow-last-error");
        assert!(
            last_error.contains(detail),
            "burrow-last-error = {last_error:?}, expected it to contain {detail:?}"
        );
        assert_eq!(header_i64(p, "burrow-attempt"), Some(1));
        assert_eq!(dead.data, body, "the body is kept byte for byte");
        assert!(
            self.seen.try_recv().is_err(),
            "the recording handler never ran"
        );
        dead
    }

    /// The next outcome is message `id`, acked and ignored.
    async fn expect_ignored(&mut self, id: &str) {
        let outcome = next_outcome(&mut self.outcomes).await;
        assert_eq!(outcome.message_id, id);
        assert!(outcome.ignored, "{outcome:?}");
        assert!(outcome.acked, "an ignored message is acked");
        assert_eq!(outcome.dead_lettered, None);
        assert_eq!(outcome.retried, None);
        assert!(outcome.succeeded.is_empty());
    }

    /// A good event published now is the next delivery settled and is
    /// handled once; after the worker stops, exactly two deliveries were
    /// settled, the app queue is empty and no further dead letter exists.
    async fn finish_with_a_good_event(mut self) {
        let good = CardAdded::new("Solaris");
        let good_id = unique("good");
        self.publisher
            .publish_with(&good, EventMeta::default().message_id(&good_id))
            .await
            .expect("the good event is confirmed");
        let handled = next_seen(&mut self.seen).await;
        assert_eq!(handled.event, good, "the worker is still consuming");
        let outcome = next_outcome(&mut self.outcomes).await;
        assert_eq!(
            outcome.message_id, good_id,
            "the next settled delivery is the good event: the bad one did not come back"
        );
        assert_eq!(outcome.succeeded, vec![RECORDER.to_string()]);
        assert!(outcome.acked);

        let Fixture {
            settings,
            worker,
            mut outcomes,
            mut seen,
            publisher,
            raw,
            _cleanup,
        } = self;
        publisher.close().await;
        let report = within("worker shutdown", worker.shutdown())
            .await
            .expect("the worker stops cleanly");
        assert_eq!(
            report.settled, 2,
            "one bad and one good delivery: no redelivery loop"
        );
        assert!(
            matches!(
                outcomes.try_recv(),
                Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed)
            ),
            "no further outcome"
        );
        assert!(seen.try_recv().is_err(), "the good event was handled once");
        // With the worker gone, anything unacked would be ready again.
        assert_eq!(raw.resting_count(&settings.app_queue()).await, 0);
        assert!(
            raw.get(&settings.dead_letter_queue()).await.is_none(),
            "no other dead letter"
        );
        raw.close().await;
    }
}

fn card_json() -> Vec<u8> {
    serde_json::to_vec(&CardAdded::new("Roadside Picnic")).unwrap()
}

fn with_header(name: &str, value: AMQPValue) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(name.into(), value);
    BasicProperties::default().with_headers(headers)
}

fn no_config(_: &mut Settings) {}

fn no_handlers(_: &mut Registry) {}

// ---------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_json_of_the_wrong_shape_is_dead_lettered_as_undecodable() {
    let mut fx = Fixture::start("bad-shape", no_config, no_handlers).await;
    let body = br#"{"aggregateId":42,"title":["not","a","string"]}"#;
    let id = fx.publish_card(body, BasicProperties::default()).await;
    fx.expect_dead(
        &id,
        body,
        DeadReason::Undecodable,
        &[RECORDER],
        "library.record_card: body does not decode: invalid type",
    )
    .await;
    fx.finish_with_a_good_event().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_array_is_dead_lettered_as_undecodable() {
    let mut fx = Fixture::start("bad-array", no_config, no_handlers).await;
    let body = br#"[{"aggregateId":"c-1"}]"#;
    let id = fx.publish_card(body, BasicProperties::default()).await;
    fx.expect_dead(
        &id,
        body,
        DeadReason::Undecodable,
        &[RECORDER],
        "body does not decode",
    )
    .await;
    fx.finish_with_a_good_event().await;
}

/// serde would read this array as `CardAdded` field by field; it must never
/// reach the handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_array_of_the_event_s_fields_is_not_matched_by_position() {
    let mut fx = Fixture::start("bad-positional", no_config, no_handlers).await;
    let body = br#"["card-7","user-q","2024-01-01T00:00:00Z"]"#;
    assert!(
        serde_json::from_slice::<CardAdded>(body).is_ok(),
        "the premise: serde decodes it by position"
    );
    let id = fx.publish_card(body, BasicProperties::default()).await;
    fx.expect_dead(
        &id,
        body,
        DeadReason::Undecodable,
        &[RECORDER],
        "top level is an array, not a JSON object",
    )
    .await;
    fx.finish_with_a_good_event().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_body_is_dead_lettered_as_undecodable() {
    let mut fx = Fixture::start("bad-empty", no_config, no_handlers).await;
    let id = fx.publish_card(b"", BasicProperties::default()).await;
    fx.expect_dead(
        &id,
        b"",
        DeadReason::Undecodable,
        &[RECORDER],
        "body does not decode: EOF while parsing",
    )
    .await;
    fx.finish_with_a_good_event().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_bytes_are_dead_lettered_as_undecodable() {
    let mut fx = Fixture::start("bad-utf8", no_config, no_handlers).await;
    // Invalid UTF-8 inside an otherwise well-formed JSON string.
    let body = b"{\"aggregateId\":\"c-\xff\xfe\",\"title\":\"t\"}";
    let id = fx.publish_card(body, BasicProperties::default()).await;
    fx.expect_dead(
        &id,
        body,
        DeadReason::Undecodable,
        &[RECORDER],
        "body does not decode",
    )
    .await;
    fx.finish_with_a_good_event().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_configured_limit_is_dead_lettered_unread_as_too_large() {
    let mut fx = Fixture::start(
        "bad-size",
        |s| s.consumer.max_body_bytes = 4096,
        no_handlers,
    )
    .await;
    // Valid JSON that would decode: only the size is wrong.
    let mut body = card_json();
    body.resize(4097, b' ');
    let id = fx.publish_card(&body, BasicProperties::default()).await;
    fx.expect_dead(
        &id,
        &body,
        DeadReason::TooLarge,
        &[],
        "body is 4097 bytes; consumer.max_body_bytes is 4096",
    )
    .await;
    fx.finish_with_a_good_event().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_content_encoding_is_dead_lettered_as_unsupported_encoding() {
    let mut fx = Fixture::start("bad-enc", no_config, no_handlers).await;
    // The body is plain JSON, but the publisher says it is not: burrow
    // believes the property and decodes nothing.
    let body = card_json();
    let id = fx
        .publish_card(
            &body,
            BasicProperties::default().with_content_encoding("br".into()),
        )
        .await;
    fx.expect_dead(
        &id,
        &body,
        DeadReason::UnsupportedEncoding,
        &[],
        "content_encoding \"br\" is not supported; publish uncompressed JSON",
    )
    .await;
    fx.finish_with_a_good_event().await;
}

// ---------------------------------------------------------------------------
// burrow headers of the wrong type
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_sent_as_a_string_is_dead_lettered_as_bad_headers() {
    let mut fx = Fixture::start("bad-attempt-str", no_config, no_handlers).await;
    let body = card_json();
    let props = with_header(
        "burrow-attempt",
        AMQPValue::LongString(LongString::from("2")),
    );
    let id = fx.publish_card(&body, props).await;
    fx.expect_dead(
        &id,
        &body,
        DeadReason::BadHeaders,
        &[],
        "header burrow-attempt is a LongString, expected an integer",
    )
    .await;
    fx.finish_with_a_good_event().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_attempt_is_dead_lettered_as_bad_headers() {
    let mut fx = Fixture::start("bad-attempt-neg", no_config, no_handlers).await;
    let body = card_json();
    let id = fx
        .publish_card(&body, with_header("burrow-attempt", AMQPValue::LongInt(-3)))
        .await;
    let dead = fx
        .expect_dead(
            &id,
            &body,
            DeadReason::BadHeaders,
            &[],
            "header burrow-attempt = -3 is out of range (must be >= 1)",
        )
        .await;
    // The copy replaces the impossible value, so a replay starts at attempt 1.
    assert_eq!(header_i64(&dead.properties, "burrow-attempt"), Some(1));
    fx.finish_with_a_good_event().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_list_that_is_not_an_array_is_dead_lettered_as_bad_headers() {
    let mut fx = Fixture::start("bad-handlers", no_config, no_handlers).await;
    let body = card_json();
    let props = with_header(
        "burrow-handlers",
        AMQPValue::LongString(LongString::from(RECORDER)),
    );
    let id = fx.publish_card(&body, props).await;
    fx.expect_dead(
        &id,
        &body,
        DeadReason::BadHeaders,
        &[],
        "header burrow-handlers is a LongString, expected an array of strings",
    )
    .await;
    fx.finish_with_a_good_event().await;
}

// ---------------------------------------------------------------------------
// An event type nobody handles, through a wildcard binding
// ---------------------------------------------------------------------------

/// The fields every `library.card.*` event shares.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyCardEvent {
    aggregate_id: String,
}

impl Event for AnyCardEvent {
    const EVENT_TYPE: &'static str = "library.card.any";
}

impl DomainEvent for AnyCardEvent {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Subscribes to every `library.card.*` event type.
struct AuditCards {
    ran: mpsc::UnboundedSender<String>,
}

impl Handler for AuditCards {
    type Event = AnyCardEvent;

    fn name(&self) -> &str {
        "audit.record_card_event"
    }

    fn binding_key(&self) -> &str {
        "library.card.*"
    }

    async fn handle(&self, _: AnyCardEvent, ctx: Context) -> Result<(), HandlerError> {
        self.ran.send(ctx.event_type).unwrap();
        Ok(())
    }
}

/// A wider wildcard binding outlives the handler that declared it (burrow
/// never unbinds). An event type only that binding matches reaches the app
/// queue, no handler subscribes to it: acked and ignored, as
/// docs/wire-contract.md §7 documents; never dead-lettered, never requeued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_type_nobody_handles_through_a_wildcard_binding_is_acked_and_ignored() {
    let (ran_tx, mut ran) = mpsc::unbounded_channel();
    let mut fx = Fixture::start("bad-wild", no_config, move |registry| {
        registry.add(AuditCards { ran: ran_tx }).unwrap();
    })
    .await;
    // The stale binding of a removed `library.#` handler.
    fx.raw
        .channel
        .queue_bind(
            fx.settings.app_queue().as_str().into(),
            fx.settings.amqp.exchange.as_str().into(),
            "library.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue.bind library.#");

    let id = fx
        .publish_raw(
            "library.shelf.renamed",
            br#"{"aggregateId":"shelf-1"}"#,
            BasicProperties::default(),
        )
        .await;
    fx.expect_ignored(&id).await;
    assert!(ran.try_recv().is_err(), "library.card.* does not match it");
    fx.finish_with_a_good_event().await;
    assert!(ran.try_recv().is_err());
}

// ---------------------------------------------------------------------------
// Oversized header tables
// ---------------------------------------------------------------------------

/// Headers a publisher can still send: their content-header frame fits the
/// connection's `frame_max` with `slack` bytes to spare. A copy with
/// burrow's headers added on top would not fit; the guard must cut it.
fn frame_filling_header_bytes(raw: &Raw, message_id_len: usize, slack: usize) -> usize {
    let frame_max = raw.conn.configuration().frame_max() as usize;
    // Frame header and end (8), class, weight, body size and flags (14),
    // message_id (1 + len) and delivery_mode (1).
    frame_max - 8 - 14 - (1 + message_id_len) - 1 - slack
}

/// What every oversized-headers case checks on the dead letter: burrow's
/// headers are there, the copy fits the budget, the rest is summarised.
fn assert_cut_to_budget(dead: &Delivery, original_headers: usize) -> String {
    let headers = dead.properties.headers().clone().expect("headers");
    let budget = HeaderBudget::default();
    assert!(
        table_size(&headers) <= budget.max_bytes,
        "the copy's headers take {} bytes, over the {} budget",
        table_size(&headers),
        budget.max_bytes
    );
    assert_eq!(
        header_str(&dead.properties, "burrow-event-type").as_deref(),
        Some(CardAdded::EVENT_TYPE)
    );
    assert!(header_i64(&dead.properties, "burrow-dead-at").is_some());
    assert!(header_i64(&dead.properties, "burrow-first-failure-at").is_some());
    let dropped =
        header_str(&dead.properties, "burrow-dropped-headers").expect("burrow-dropped-headers");
    assert!(
        dropped.contains(&format!("of {original_headers} original headers left out")),
        "burrow-dropped-headers = {dropped:?}"
    );
    dropped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_headers_are_dead_lettered_as_headers_too_large() {
    let mut fx = Fixture::start("bad-hdr-many", no_config, no_handlers).await;
    let target = frame_filling_header_bytes(&fx.raw, 36, 64);
    // Each entry: key length byte, 12-byte key, type byte, 8-byte integer.
    let mut headers = FieldTable::default();
    let count = (target - 4) / 22;
    for i in 0..count {
        headers.insert(
            format!("x-pad-{i:06}").as_str().into(),
            AMQPValue::LongLongInt(i as i64),
        );
    }
    assert!(count > 5000, "{count} headers");
    let body = card_json();
    let id = fx
        .publish_card(&body, BasicProperties::default().with_headers(headers))
        .await;
    let dead = fx
        .expect_dead(
            &id,
            &body,
            DeadReason::HeadersTooLarge,
            &[],
            &format!("({count} headers); consumer.max_header_bytes is 65536"),
        )
        .await;
    assert_cut_to_budget(&dead, count);
    fx.finish_with_a_good_event().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_huge_header_value_is_dead_lettered_and_dropped_from_the_copy() {
    let mut fx = Fixture::start("bad-hdr-huge", no_config, no_handlers).await;
    let target = frame_filling_header_bytes(&fx.raw, 36, 64);
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(traceparent.into()),
    );
    let used = table_size(&headers);
    // Key length byte, "x-huge", type byte, 4-byte length.
    let huge = target - used - (1 + 6 + 1 + 4);
    headers.insert(
        "x-huge".into(),
        AMQPValue::LongString(LongString::from(vec![b'x'; huge])),
    );
    assert!(table_size(&headers) <= target);
    let body = card_json();
    let id = fx
        .publish_card(&body, BasicProperties::default().with_headers(headers))
        .await;
    let dead = fx
        .expect_dead(
            &id,
            &body,
            DeadReason::HeadersTooLarge,
            &[],
            "consumer.max_header_bytes is 65536",
        )
        .await;
    let dropped = assert_cut_to_budget(&dead, 2);
    assert!(dropped.ends_with("x-huge"), "{dropped:?}");
    assert_eq!(
        header_str(&dead.properties, "traceparent").as_deref(),
        Some(traceparent),
        "small headers survive"
    );
    fx.finish_with_a_good_event().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_header_tables_are_dead_lettered_as_headers_too_large() {
    let mut fx = Fixture::start("bad-hdr-deep", no_config, no_handlers).await;
    // Small in bytes, 64 tables deep; the parser keeps 31 levels of it (the
    // deepest headers one frame allows: tests/embedded.rs).
    let mut value = AMQPValue::LongInt(1);
    for _ in 0..64 {
        let mut table = FieldTable::default();
        table.insert("a".into(), value);
        value = AMQPValue::FieldTable(table);
    }
    let mut headers = FieldTable::default();
    headers.insert("x-nested".into(), value);
    headers.insert("x-tenant".into(), AMQPValue::LongString("t-1".into()));
    let body = card_json();
    let id = fx
        .publish_card(&body, BasicProperties::default().with_headers(headers))
        .await;
    let dead = fx
        .expect_dead(
            &id,
            &body,
            DeadReason::HeadersTooLarge,
            &[],
            &format!(
                "header x-nested nests tables or arrays {} levels deep; at most 16 are accepted",
                lapin::types::parsing::MAX_NESTING_DEPTH - 1
            ),
        )
        .await;
    let dropped = assert_cut_to_budget(&dead, 2);
    assert!(dropped.ends_with("x-nested"), "{dropped:?}");
    assert_eq!(
        header_str(&dead.properties, "x-tenant").as_deref(),
        Some("t-1")
    );
    fx.finish_with_a_good_event().await;
}
