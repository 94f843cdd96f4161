//! burrow embedded in a program of its own, as `examples/worker.rs` does: a
//! `Worker` in this process, with the standard library's and tokio's
//! default thread stacks (no `RUST_MIN_STACK`, no larger runtime threads).
//!
//! A test binary is such a program: the headers that once overflowed
//! lapin's I/O thread here, aborting the whole process, must be
//! dead-lettered like any other bad input while the worker keeps consuming.

mod common;

use burrow::{DeadLettered, DeadReason, Event, EventMeta, HandlerError, Registry};
use common::{deep, *};

/// The handler the test registers; it records what it handled.
const RECORDER: &str = "library.record_card";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nested_as_deep_as_one_frame_allows_are_dead_lettered_by_an_embedded_worker() {
    // The point of this test is the default stack sizes: with a larger
    // RUST_MIN_STACK lapin's I/O thread could survive an unbounded parse.
    assert!(
        std::env::var_os("RUST_MIN_STACK").is_none(),
        "run this test without RUST_MIN_STACK: it checks the default thread stacks"
    );
    let settings = TestApp::new("embedded-deep").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let (tx, mut seen) = seen_channel();
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
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;

    let deep_id = unique("deep");
    let body = serde_json::to_vec(&CardAdded::new("Abyss")).expect("json");
    let (depth, frame_max) = within(
        "the deep message to be confirmed",
        deep::publish(
            &amqp_url(),
            &settings.amqp.exchange,
            CardAdded::EVENT_TYPE,
            &deep_id,
            &body,
        ),
    )
    .await;
    eprintln!(
        "published header {} nested {depth} arrays deep (frame_max {frame_max})",
        deep::KEY
    );
    assert!(depth > 20_000, "{depth} levels: a frame's worth");

    let outcome = next_outcome(&mut outcomes).await;
    assert_eq!(outcome.message_id, deep_id);
    assert_eq!(
        outcome.dead_lettered,
        Some(DeadLettered {
            reason: DeadReason::HeadersTooLarge,
            handlers: Vec::new()
        })
    );
    assert!(
        outcome.acked,
        "the original is acked once the copy is confirmed"
    );
    assert!(outcome.succeeded.is_empty(), "{outcome:?}");

    // Still consuming: a good event is the next delivery, handled once.
    let good = CardAdded::new("Solaris");
    let good_id = unique("good");
    let publisher = publisher(&settings).await;
    publisher
        .publish_with(&good, EventMeta::default().message_id(&good_id))
        .await
        .expect("the good event is confirmed");
    publisher.close().await;
    let handled = next_seen(&mut seen).await;
    assert_eq!(handled.event, good);
    let outcome = next_outcome(&mut outcomes).await;
    assert_eq!(
        outcome.message_id, good_id,
        "the next settled delivery is the good event: the deep one did not come back"
    );
    assert_eq!(outcome.succeeded, vec![RECORDER.to_string()]);
    assert!(outcome.acked);
    assert!(
        seen.try_recv().is_err(),
        "the deep message was never handled"
    );

    let report = within("worker shutdown", worker.shutdown())
        .await
        .expect("the worker stops cleanly");
    assert_eq!(report.settled, 2, "one deep and one good delivery");

    let raw = Raw::connect().await;
    assert_eq!(raw.message_count(&settings.app_queue()).await, 0);
    let dead_queue = settings.dead_letter_queue();
    assert_eq!(raw.message_count(&dead_queue).await, 1, "one dead letter");
    let dead = raw.wait_get(&dead_queue).await;
    let props = &dead.properties;
    assert_eq!(
        props.message_id().as_ref().map(|id| id.as_str()),
        Some(deep_id.as_str())
    );
    assert_eq!(
        header_str(props, "burrow-dead-reason").as_deref(),
        Some(DeadReason::HeadersTooLarge.as_str())
    );
    // The parser kept MAX_NESTING_DEPTH levels (the headers table is the
    // first), which is still deeper than burrow accepts.
    let cut = lapin::types::parsing::MAX_NESTING_DEPTH - 1;
    let last_error = header_str(props, "burrow-last-error").unwrap_or_default();
    assert!(
        last_error.contains(&format!(
            "header {} nests tables or arrays {cut} levels deep",
            deep::KEY
        )),
        "{last_error}"
    );
    let dropped = header_str(props, "burrow-dropped-headers").unwrap_or_default();
    assert!(dropped.ends_with(deep::KEY), "{dropped}");
    assert_eq!(dead.data, body, "the body is kept byte for byte");
    raw.close().await;
}
