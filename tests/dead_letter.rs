//! Dead-lettering: what lands in `events_<app>.dead`, with which headers.

mod common;

use burrow::{DeadLettered, DeadReason, EventMeta, HandlerError, Registry, Retried};
use common::{recorder::Recorder, *};
use lapin::BasicProperties;

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_dead_letters_with_headers_and_the_original_body() {
    let settings = TestApp::new("dead-perm").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let mut registry = Registry::new();
    registry
        .on("library.attach_card", |_: CardAdded, _| async move {
            Err::<(), _>(HandlerError::permanent("library lib-9 does not exist"))
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;
    let raw = Raw::connect().await;

    let event = CardAdded::new("Roadside Picnic");
    let message_id = unique("msg");
    let before = now_ms();
    publisher
        .publish_with(
            &event,
            EventMeta::default()
                .message_id(&message_id)
                .correlation_id("req-9")
                .causation_id("cmd-9"),
        )
        .await
        .unwrap();

    let outcome = next_outcome(&mut outcomes).await;
    assert_eq!(outcome.attempt, 1);
    assert_eq!(outcome.retried, None, "a permanent error is not retried");
    assert_eq!(
        outcome.dead_lettered,
        Some(DeadLettered {
            reason: DeadReason::Permanent,
            handlers: names(&["library.attach_card"])
        })
    );
    assert!(outcome.acked);

    let dead = raw.wait_get(&settings.dead_letter_queue()).await;
    let after = now_ms();
    let p = &dead.properties;
    assert_eq!(
        header_str(p, "burrow-dead-reason").as_deref(),
        Some("permanent")
    );
    assert_eq!(
        header_str(p, "burrow-failed-handler").as_deref(),
        Some("library.attach_card")
    );
    let last_error = header_str(p, "burrow-last-error").expect("burrow-last-error");
    assert!(
        last_error.contains("library.attach_card")
            && last_error.contains("library lib-9 does not exist"),
        "burrow-last-error = {last_error:?}"
    );
    assert_eq!(header_i64(p, "burrow-attempt"), Some(1));
    assert_eq!(
        header_str(p, "burrow-event-type").as_deref(),
        Some("CardAddedToLibraryEvent")
    );
    let first_failure = header_i64(p, "burrow-first-failure-at").expect("burrow-first-failure-at");
    assert!(
        (before..=after).contains(&first_failure),
        "burrow-first-failure-at {first_failure} not within [{before}, {after}]"
    );
    let dead_at = header_i64(p, "burrow-dead-at").expect("burrow-dead-at");
    assert!(
        (first_failure..=after).contains(&dead_at),
        "burrow-dead-at {dead_at}"
    );
    assert_eq!(
        header_strings(p, "burrow-handlers"),
        Some(names(&["library.attach_card"]))
    );
    // The original message travels unchanged.
    assert_eq!(
        dead.data,
        serde_json::to_vec(&event).unwrap(),
        "the original body"
    );
    assert_eq!(
        serde_json::from_slice::<CardAdded>(&dead.data).unwrap(),
        event
    );
    assert_eq!(
        p.message_id().as_ref().map(|s| s.as_str()),
        Some(message_id.as_str())
    );
    assert_eq!(
        p.correlation_id().as_ref().map(|s| s.as_str()),
        Some("req-9")
    );
    assert_eq!(*p.delivery_mode(), Some(2), "the dead letter is persistent");
    assert_eq!(
        header_str(p, "burrow-causation-id").as_deref(),
        Some("cmd-9"),
        "the publisher's headers are kept"
    );
    assert!(
        raw.get(&settings.dead_letter_queue()).await.is_none(),
        "exactly one dead letter"
    );

    raw.close().await;
    publisher.close().await;
    within("worker shutdown", worker.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausting_the_ladder_dead_letters_with_reason_attempts_exhausted() {
    let settings = TestApp::new("dead-exh").delays_ms(&[300, 600]).build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let mut registry = Registry::new();
    registry
        .on("search.index_card", |_: CardAdded, ctx| async move {
            Err::<(), _>(HandlerError::transient(format!(
                "search cluster red (attempt {})",
                ctx.attempt
            )))
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;
    let raw = Raw::connect().await;

    let event = CardAdded::new("Stalker");
    let before = now_ms();
    publisher.publish(&event).await.unwrap();

    let o1 = next_outcome(&mut outcomes).await;
    assert_eq!(
        (o1.attempt, o1.retried.clone(), o1.dead_lettered.clone()),
        (
            1,
            Some(Retried {
                step: 1,
                handlers: names(&["search.index_card"])
            }),
            None
        )
    );
    let o2 = next_outcome(&mut outcomes).await;
    assert_eq!(
        (o2.attempt, o2.retried.clone(), o2.dead_lettered.clone()),
        (
            2,
            Some(Retried {
                step: 2,
                handlers: names(&["search.index_card"])
            }),
            None
        )
    );
    let o3 = next_outcome(&mut outcomes).await;
    assert_eq!(o3.attempt, 3);
    assert_eq!(o3.retried, None, "the ladder has two steps");
    assert_eq!(
        o3.dead_lettered,
        Some(DeadLettered {
            reason: DeadReason::AttemptsExhausted,
            handlers: names(&["search.index_card"])
        })
    );
    assert!(o3.acked);

    let dead = raw.wait_get(&settings.dead_letter_queue()).await;
    let p = &dead.properties;
    assert_eq!(
        header_str(p, "burrow-dead-reason").as_deref(),
        Some("attempts_exhausted")
    );
    assert_eq!(
        header_str(p, "burrow-failed-handler").as_deref(),
        Some("search.index_card")
    );
    assert_eq!(header_i64(p, "burrow-attempt"), Some(3));
    assert_eq!(
        header_str(p, "burrow-event-type").as_deref(),
        Some("CardAddedToLibraryEvent")
    );
    let last_error = header_str(p, "burrow-last-error").unwrap();
    assert!(
        last_error.contains("search cluster red (attempt 3)"),
        "burrow-last-error = {last_error:?}"
    );
    // The first failure's time is carried through both retry copies.
    let first_failure = header_i64(p, "burrow-first-failure-at").unwrap();
    let dead_at = header_i64(p, "burrow-dead-at").unwrap();
    assert!(
        first_failure >= before,
        "first failure {first_failure} before the publish {before}"
    );
    assert!(
        dead_at - first_failure >= 900,
        "burrow-first-failure-at was not kept from attempt 1: only {} ms before the dead letter",
        dead_at - first_failure
    );
    assert_eq!(dead.data, serde_json::to_vec(&event).unwrap());

    raw.close().await;
    publisher.close().await;
    within("worker shutdown", worker.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_dead_lettered_as_undecodable_and_the_worker_continues() {
    let mut rec = Recorder::start("dead-json").await;
    let raw = Raw::connect().await;

    let garbage = br#"{"aggregateId": "c-1", "title": "#;
    raw.publish(
        &rec.settings.amqp.exchange,
        "CardAddedToLibraryEvent",
        garbage,
        BasicProperties::default()
            .with_message_id("broken-1".into())
            .with_delivery_mode(2),
    )
    .await;

    let outcome = rec.next_outcome().await;
    assert_eq!(outcome.message_id, "broken-1");
    assert_eq!(
        outcome.retried, None,
        "an undecodable body is never retried"
    );
    assert_eq!(
        outcome.dead_lettered,
        Some(DeadLettered {
            reason: DeadReason::Undecodable,
            handlers: names(&["library.record_card"])
        })
    );
    assert!(outcome.succeeded.is_empty());
    assert!(outcome.acked);

    let dead = raw.wait_get(&rec.settings.dead_letter_queue()).await;
    assert_eq!(
        header_str(&dead.properties, "burrow-dead-reason").as_deref(),
        Some("undecodable")
    );
    assert_eq!(
        header_str(&dead.properties, "burrow-event-type").as_deref(),
        Some("CardAddedToLibraryEvent")
    );
    assert_eq!(
        dead.data,
        garbage.to_vec(),
        "the body is kept byte for byte"
    );
    assert!(rec.seen.try_recv().is_err(), "the handler never ran");

    // The worker is still consuming.
    let good = CardAdded::new("Blindsight");
    rec.publisher.publish(&good).await.unwrap();
    let got = rec.next_seen().await;
    assert_eq!(got.event, good);
    let outcome = rec.next_outcome().await;
    assert_eq!(outcome.succeeded, names(&["library.record_card"]));

    raw.close().await;
    let report = rec.stop().await;
    assert_eq!(report.settled, 2);
}

/// One handler fails for good, another transiently: a dead letter naming the
/// first and a retry naming the second; the retry runs only the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_and_transient_failures_split_into_a_dead_letter_and_a_retry() {
    let settings = TestApp::new("dead-split").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let mut registry = Registry::new();
    registry
        .on("library.attach_card", |_: CardAdded, _| async move {
            Err::<(), _>(HandlerError::permanent("library is archived"))
        })
        .unwrap();
    registry
        .on("search.index_card", |_: CardAdded, ctx| async move {
            if ctx.attempt == 1 {
                Err(HandlerError::transient("index locked"))
            } else {
                Ok(())
            }
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;
    let raw = Raw::connect().await;

    publisher
        .publish(&CardAdded::new("Permutation City"))
        .await
        .unwrap();

    let first = next_outcome(&mut outcomes).await;
    assert_eq!(first.attempt, 1);
    assert!(first.succeeded.is_empty());
    assert_eq!(
        first.retried,
        Some(Retried {
            step: 1,
            handlers: names(&["search.index_card"])
        })
    );
    assert_eq!(
        first.dead_lettered,
        Some(DeadLettered {
            reason: DeadReason::Permanent,
            handlers: names(&["library.attach_card"])
        })
    );
    assert!(first.acked);

    let dead = raw.wait_get(&settings.dead_letter_queue()).await;
    assert_eq!(
        header_str(&dead.properties, "burrow-dead-reason").as_deref(),
        Some("permanent")
    );
    assert_eq!(
        header_strings(&dead.properties, "burrow-handlers"),
        Some(names(&["library.attach_card"]))
    );
    assert_eq!(
        header_str(&dead.properties, "burrow-failed-handler").as_deref(),
        Some("library.attach_card")
    );

    let second = next_outcome(&mut outcomes).await;
    assert_eq!(second.message_id, first.message_id);
    assert_eq!(second.attempt, 2);
    assert_eq!(
        second.succeeded,
        names(&["search.index_card"]),
        "only the transient handler runs again"
    );
    assert_eq!(second.dead_lettered, None);
    assert!(
        raw.get(&settings.dead_letter_queue()).await.is_none(),
        "one dead letter only"
    );

    raw.close().await;
    publisher.close().await;
    within("worker shutdown", worker.shutdown()).await.unwrap();
}

/// A retry step that is gone (deleted behind the worker's back): every copy
/// comes back unroutable, so the original is never acked, goes back with
/// `basic.reject`, and once it has come back `queue.delivery_limit` times
/// the broker parks it in the dead-letter queue. Nothing is lost, and the
/// loop ends on 3.x and 4.x alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_retry_copy_cannot_be_routed_is_parked_at_the_delivery_limit() {
    let settings = TestApp::new("dead-refused").build();
    let step = burrow::Topology::for_app(&settings, &Registry::new())
        .queues
        .into_iter()
        .find(|q| matches!(q.role, burrow::QueueRole::Retry { .. }))
        .expect("a retry step")
        .name;
    let mut rec = Recorder::with_settings(settings)
        .settings(|s| s.queue.delivery_limit = 2)
        .verdict(|_| Err(HandlerError::transient("search index unavailable")))
        .start()
        .await;
    let raw = Raw::connect().await;
    raw.channel
        .queue_delete(step.as_str().into(), Default::default())
        .await
        .expect("delete the first retry step");

    let message_id = unique("msg");
    rec.publisher
        .publish_with(
            &CardAdded::new("Solaris"),
            EventMeta::default().message_id(&message_id),
        )
        .await
        .unwrap();

    let dead = raw.wait_get(&rec.settings.dead_letter_queue()).await;
    assert_eq!(
        dead.properties.message_id().as_ref().map(|m| m.as_str()),
        Some(message_id.as_str())
    );
    let reason = match header_value(&dead.properties, "x-death") {
        Some(lapin::types::AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
            Some(lapin::types::AMQPValue::FieldTable(death)) => match death.inner().get("reason") {
                Some(lapin::types::AMQPValue::LongString(r)) => {
                    String::from_utf8_lossy(r.as_bytes()).into_owned()
                }
                other => panic!("x-death reason: {other:?}"),
            },
            other => panic!("x-death entry: {other:?}"),
        },
        other => panic!("x-death: {other:?}"),
    };
    assert_eq!(reason, "delivery_limit", "parked by the broker");
    assert_eq!(
        header_str(&dead.properties, "burrow-dead-reason"),
        None,
        "the original itself, not a copy"
    );

    // Every delivery came back unacked: the first and the two returns.
    let mut returns = 0;
    for _ in 0..3 {
        let outcome = rec.next_outcome().await;
        assert_eq!(outcome.message_id, message_id);
        assert!(!outcome.acked, "a refused copy never acks its original");
        returns += 1;
    }
    assert_eq!(returns, 3);
    assert_eq!(raw.message_count(&rec.settings.app_queue()).await, 0);
    assert!(
        !queue_exists(&raw.conn, &step).await,
        "nothing declared it again"
    );
    raw.close().await;
}
