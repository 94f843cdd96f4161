//! The dead-letter queue operations against a real RabbitMQ: list and show
//! browse without removing, replay sends letters back to the failed
//! handlers only, purge removes everything or only old letters.
//!
//! Every test has its own app name and exchange, a [`Cleanup`] guard
//! deletes them even when an assertion fails, and every wait is bounded by
//! [`WAIT`] (see `common`).

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use burrow::{
    Context, DeadLettered, DeadReason, EventMeta, HandlerError, Registry, Settings, Topology,
    dlq::{self, ReplayFilter, ReplayReport},
};
use common::*;
use lapin::{
    BasicProperties,
    options::{BasicGetOptions, BasicNackOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use tokio::sync::mpsc;

/// Settings of a test app with a one-step retry ladder.
fn settings(prefix: &str) -> Settings {
    TestApp::new(prefix).delays_ms(&[300]).build()
}

/// Declares the app's queues (no bindings) as the worker would.
async fn declare(settings: &Settings, raw: &Raw) {
    within(
        "topology declare",
        burrow::internals::declare(&Topology::for_app(settings, &Registry::new()), &raw.conn),
    )
    .await
    .expect("topology declared");
}

fn headers(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_show_browse_what_the_worker_dead_lettered() {
    let settings = settings("dlq-list");
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
    let dead = settings.dead_letter_queue();

    let before = now_ms();
    let events = [CardAdded::new("Solaris"), CardAdded::new("Eden")];
    let ids = [unique("msg"), unique("msg")];
    for (event, id) in events.iter().zip(&ids) {
        within(
            "publish",
            publisher.publish_with(event, EventMeta::default().message_id(id)),
        )
        .await
        .unwrap();
    }
    for _ in 0..2 {
        let o = next_outcome(&mut outcomes).await;
        assert_eq!(
            o.dead_lettered.as_ref().map(|d| d.reason),
            Some(DeadReason::Permanent)
        );
        assert!(o.acked, "acked only after the dead letter was confirmed");
    }
    let after = now_ms();

    let letters = within("dlq list", dlq::list(&settings, 10)).await.unwrap();
    assert_eq!(letters.len(), 2, "{letters:#?}");
    for (event, id) in events.iter().zip(&ids) {
        let l = letters
            .iter()
            .find(|l| &l.message_id == id)
            .expect("each letter is listed");
        assert_eq!(l.event_type, "CardAddedToLibraryEvent");
        assert_eq!(l.reason.as_deref(), Some("permanent"));
        assert_eq!(l.failed_handler.as_deref(), Some("library.attach_card"));
        assert_eq!(l.handlers, vec!["library.attach_card".to_owned()]);
        assert_eq!(l.attempts, Some(1));
        let error = l.last_error.as_deref().unwrap();
        assert!(error.contains("library lib-9 does not exist"), "{error}");
        let dead_at = l.dead_at_ms.expect("burrow-dead-at");
        assert!(
            (before..=after).contains(&dead_at),
            "dead at {dead_at} not in [{before}, {after}]"
        );
        assert!(l.first_failure_at_ms.is_some_and(|t| t <= dead_at));
        assert_eq!(l.replays, 0);
        assert_eq!(l.routing_key, dead);
        assert_eq!(
            l.body,
            serde_json::to_vec(event).unwrap(),
            "the body byte for byte"
        );
    }

    // Browsing removes nothing; the limit is honoured.
    raw.wait_ready(&dead, 2, "the dead queue").await;
    assert_eq!(
        within("dlq list", dlq::list(&settings, 1))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        within("dlq list", dlq::list(&settings, 10))
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(within("dlq count", dlq::count(&settings)).await.unwrap(), 2);

    let shown = within("dlq show", dlq::show(&settings, &ids[1]))
        .await
        .unwrap()
        .expect("shown");
    assert_eq!(shown.message_id, ids[1]);
    assert_eq!(
        serde_json::from_slice::<CardAdded>(&shown.body).unwrap(),
        events[1]
    );
    assert!(
        within("dlq show", dlq::show(&settings, "no-such-id"))
            .await
            .unwrap()
            .is_none()
    );
    raw.wait_ready(&dead, 2, "show removes nothing").await;

    let table = dlq::render_table(&letters);
    assert!(
        table.lines().count() == 3 && ids.iter().all(|id| table.contains(id.as_str())),
        "{table}"
    );
    assert!(
        table.contains("permanent") && table.contains("library.attach_card"),
        "{table}"
    );
    let detail = dlq::render_detail(&shown);
    assert!(
        detail.contains("\"title\": \"Eden\""),
        "the body is pretty-printed: {detail}"
    );
    assert!(
        detail.contains("burrow-failed-handler = \"library.attach_card\""),
        "{detail}"
    );

    raw.close().await;
    publisher.close().await;
    within("worker shutdown", worker.shutdown())
        .await
        .expect("worker stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letters_the_broker_parked_after_the_delivery_limit_are_read_and_replayed() {
    let mut settings = settings("dlq-limit");
    settings.queue.delivery_limit = 1;
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let raw = Raw::connect().await;
    declare(&settings, &raw).await;
    let app = settings.app_queue();
    let dead = settings.dead_letter_queue();

    let before = now_ms();
    let body = br#"{"aggregateId":"c-1","title":"Ubik","occurredAt":"2024-01-01T00:00:00Z"}"#;
    raw.publish(
        "",
        &app,
        body,
        BasicProperties::default()
            .with_message_id("crash-loop-1".into())
            .with_type("CardAddedToLibraryEvent".into())
            .with_delivery_mode(2),
    )
    .await;
    // Crash-loop it: take and return it until the broker parks it.
    eventually("the broker to park the message", || async {
        if raw.message_count(&dead).await > 0 {
            return Ok(());
        }
        if let Some(m) = raw
            .channel
            .basic_get(app.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        {
            raw.channel
                .basic_nack(
                    m.delivery.delivery_tag,
                    BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    },
                )
                .await
                .unwrap();
        }
        Err("not parked yet")
    })
    .await;
    let after = now_ms();

    let letters = within("dlq list", dlq::list(&settings, 10)).await.unwrap();
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(l.message_id, "crash-loop-1");
    assert_eq!(l.reason.as_deref(), Some("delivery_limit"), "from x-death");
    assert_eq!(
        l.event_type, "CardAddedToLibraryEvent",
        "from the type property"
    );
    assert_eq!((l.failed_handler.as_deref(), l.attempts), (None, None));
    assert!(l.handlers.is_empty());
    let dead_at = l.dead_at_ms.expect("time of x-death");
    assert!(
        dead_at > before - 1000 && dead_at <= after,
        "x-death time {dead_at}"
    );
    assert!(dlq::render_table(&letters).contains("delivery_limit"));

    // Replayed to the app queue as a first attempt for every handler.
    let publisher = publisher(&settings).await;
    let report = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &ReplayFilter::default(), &mut |_| {}),
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        ReplayReport {
            replayed: 1,
            skipped: 0,
            left: 0
        }
    );
    raw.wait_ready(&dead, 0, "the dead queue").await;
    let copy = raw.wait_get(&app).await;
    assert_eq!(copy.data, body.to_vec());
    let p = &copy.properties;
    assert_eq!(
        p.message_id().as_ref().map(|s| s.as_str()),
        Some("crash-loop-1")
    );
    assert_eq!(
        header_value(p, "burrow-event-type"),
        Some(&long("CardAddedToLibraryEvent"))
    );
    assert_eq!(
        header_value(p, "burrow-attempt"),
        Some(&AMQPValue::LongLongInt(1))
    );
    assert_eq!(
        header_value(p, "burrow-replays"),
        Some(&AMQPValue::LongLongInt(1))
    );
    assert_eq!(
        header_value(p, "burrow-handlers"),
        None,
        "every handler runs"
    );

    publisher.close().await;
    raw.close().await;
}

/// A letter the broker parked after its delivery limit carries the broker's
/// `x-death` naming the app queue. Replayed, its handler fails once: the
/// copy goes to the retry step and, when the step's TTL expires, back to
/// the app queue. Had the copy kept that `x-death`, RabbitMQ 3.x would see
/// a dead-letter cycle (the app queue again) and drop the message there;
/// it must come back and be handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_broker_parked_letter_survives_a_retry() {
    let mut settings = settings("dlq-cycle");
    settings.queue.delivery_limit = 1;
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let raw = Raw::connect().await;
    declare(&settings, &raw).await;
    let app = settings.app_queue();
    let dead = settings.dead_letter_queue();
    let body = br#"{"aggregateId":"c-9","title":"Ubik","occurredAt":"2024-01-01T00:00:00Z"}"#;
    raw.publish(
        "",
        &app,
        body,
        BasicProperties::default()
            .with_message_id("parked-then-flaky".into())
            .with_type("CardAddedToLibraryEvent".into())
            .with_delivery_mode(2),
    )
    .await;
    eventually("the broker to park the message", || async {
        if raw.message_count(&dead).await > 0 {
            return Ok(());
        }
        if let Some(m) = raw
            .channel
            .basic_get(app.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
        {
            raw.channel
                .basic_nack(
                    m.delivery.delivery_tag,
                    BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    },
                )
                .await
                .unwrap();
        }
        Err("not parked yet")
    })
    .await;

    // A worker whose handler fails the first time it sees the event.
    let runs = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    registry
        .on("library.flaky_once", {
            let runs = runs.clone();
            move |_: CardAdded, _: Context| {
                let runs = runs.clone();
                async move {
                    match runs.fetch_add(1, Ordering::SeqCst) {
                        0 => Err(HandlerError::transient("the index is busy")),
                        _ => Ok(()),
                    }
                }
            }
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;
    let report = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &ReplayFilter::default(), &mut |_| {}),
    )
    .await
    .unwrap();
    assert_eq!(report.replayed, 1);

    let first = next_outcome(&mut outcomes).await;
    assert_eq!(first.message_id, "parked-then-flaky");
    assert!(first.retried.is_some(), "{first:?}");
    // Back from the retry step (0.3 s), handled: not dropped as a cycle.
    let second = next_outcome(&mut outcomes).await;
    assert_eq!(second.message_id, "parked-then-flaky");
    assert_eq!(second.attempt, 2);
    assert_eq!(
        second.succeeded,
        vec!["library.flaky_once".to_owned()],
        "{second:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(raw.message_count(&dead).await, 0, "nothing parked again");

    publisher.close().await;
    within("worker shutdown", worker.shutdown()).await.unwrap();
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_runs_only_the_failed_handler_again_and_empties_the_queue() {
    let settings = settings("dlq-replay");
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let failed_once = Arc::new(AtomicBool::new(false));
    let attach_runs = Arc::new(AtomicUsize::new(0));
    let index_runs = Arc::new(AtomicUsize::new(0));
    let (tx, mut contexts) = mpsc::unbounded_channel::<Context>();
    let mut registry = Registry::new();
    {
        let (failed_once, attach_runs) = (failed_once.clone(), attach_runs.clone());
        registry
            .on("library.attach_card", move |_: CardAdded, ctx: Context| {
                attach_runs.fetch_add(1, Ordering::SeqCst);
                tx.send(ctx).unwrap();
                let first = !failed_once.swap(true, Ordering::SeqCst);
                async move {
                    if first {
                        Err(HandlerError::permanent("library lib-9 does not exist yet"))
                    } else {
                        Ok(())
                    }
                }
            })
            .unwrap();
    }
    {
        let index_runs = index_runs.clone();
        registry
            .on("search.index_card", move |_: CardAdded, _| {
                index_runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, HandlerError>(()) }
            })
            .unwrap();
    }
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;
    let raw = Raw::connect().await;
    let dead = settings.dead_letter_queue();

    let id = unique("msg");
    within(
        "publish",
        publisher.publish_with(
            &CardAdded::new("Roadside Picnic"),
            EventMeta::default().message_id(&id),
        ),
    )
    .await
    .unwrap();
    let first = next_outcome(&mut outcomes).await;
    assert_eq!(first.succeeded, vec!["search.index_card".to_owned()]);
    assert_eq!(
        first.dead_lettered,
        Some(DeadLettered {
            reason: DeadReason::Permanent,
            handlers: vec!["library.attach_card".to_owned()]
        })
    );
    assert!(first.acked);
    assert_eq!(
        within("a handler run", contexts.recv())
            .await
            .unwrap()
            .attempt,
        1
    );
    raw.wait_ready(&dead, 1, "the dead queue").await;

    // Filters that do not match leave the letter where it is.
    let other_event = ReplayFilter {
        event: Some("CollectionCreatedEvent".into()),
        ..Default::default()
    };
    let report = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &other_event, &mut |_| {}),
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        ReplayReport {
            replayed: 0,
            skipped: 1,
            left: 1
        }
    );
    let other_handler = ReplayFilter {
        handler: Some("search.index_card".into()),
        ..Default::default()
    };
    let report = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &other_handler, &mut |_| {}),
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        ReplayReport {
            replayed: 0,
            skipped: 1,
            left: 1
        }
    );
    let none = ReplayFilter {
        limit: Some(0),
        ..Default::default()
    };
    let report = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &none, &mut |_| {}),
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        ReplayReport {
            left: 1,
            ..ReplayReport::default()
        }
    );
    raw.wait_ready(&dead, 1, "the dead queue").await;

    let matching = ReplayFilter {
        event: Some("CardAddedToLibraryEvent".into()),
        ..Default::default()
    };
    let report = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &matching, &mut |_| {}),
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        ReplayReport {
            replayed: 1,
            skipped: 0,
            left: 0
        }
    );
    raw.wait_ready(&dead, 0, "the letter is removed once its copy is confirmed")
        .await;

    let second = next_outcome(&mut outcomes).await;
    assert_eq!(second.message_id, id);
    assert_eq!(second.attempt, 1);
    assert_eq!(
        second.succeeded,
        vec!["library.attach_card".to_owned()],
        "only the failed handler ran"
    );
    assert_eq!(
        (second.retried.clone(), second.dead_lettered.clone()),
        (None, None)
    );
    assert!(second.acked);
    let ctx = within("the replayed run", contexts.recv()).await.unwrap();
    assert_eq!(ctx.message_id, id);
    assert_eq!(ctx.headers.get_i64("burrow-replays"), Some(1));
    assert!(!ctx.headers.contains("burrow-dead-reason"));

    assert_eq!(attach_runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        index_runs.load(Ordering::SeqCst),
        1,
        "the handler that succeeded did not run again"
    );
    assert!(
        within("dlq list", dlq::list(&settings, 10))
            .await
            .unwrap()
            .is_empty()
    );

    raw.close().await;
    publisher.close().await;
    within("worker shutdown", worker.shutdown())
        .await
        .expect("worker stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_cannot_be_delivered_leaves_the_letter_parked() {
    let settings = settings("dlq-unroutable");
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let raw = Raw::connect().await;
    declare(&settings, &raw).await;
    let dead = settings.dead_letter_queue();
    raw.publish(
        "",
        &dead,
        b"{}",
        BasicProperties::default()
            .with_message_id("stuck-1".into())
            .with_headers(headers(vec![
                ("burrow-event-type", long("CardAddedToLibraryEvent")),
                ("burrow-dead-reason", long("permanent")),
            ])),
    )
    .await;
    // Without the app queue the copy is unroutable.
    raw.channel
        .queue_delete(
            settings.app_queue().as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();

    let publisher = publisher(&settings).await;
    let err = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &ReplayFilter::default(), &mut |_| {}),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, burrow::Error::Unroutable { .. }), "{err:?}");
    raw.wait_ready(&dead, 1, "the letter is still parked").await;
    let shown = within("dlq show", dlq::show(&settings, "stuck-1"))
        .await
        .unwrap()
        .expect("still there");
    assert_eq!(shown.reason.as_deref(), Some("permanent"));

    publisher.close().await;
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_old_letters_or_everything() {
    let settings = settings("dlq-purge");
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let raw = Raw::connect().await;
    declare(&settings, &raw).await;
    let dead = settings.dead_letter_queue();

    let hour_ms = 3_600_000;
    let letter = |id: &str, dead_at: Option<i64>| {
        let mut h = vec![
            ("burrow-event-type", long("CardAddedToLibraryEvent")),
            ("burrow-dead-reason", long("permanent")),
        ];
        if let Some(at) = dead_at {
            h.push(("burrow-dead-at", AMQPValue::LongLongInt(at)));
        }
        BasicProperties::default()
            .with_message_id(id.into())
            .with_delivery_mode(2)
            .with_headers(headers(h))
    };
    raw.publish(
        "",
        &dead,
        b"{}",
        letter("old", Some(now_ms() - 2 * hour_ms)),
    )
    .await;
    raw.publish("", &dead, b"{}", letter("recent", Some(now_ms())))
        .await;
    raw.publish("", &dead, b"{}", letter("ageless", None)).await;

    let purged = within(
        "dlq purge",
        dlq::purge(&settings, &older_than(3600), &mut |_| {}),
    )
    .await
    .unwrap()
    .purged;
    assert_eq!(purged, 1);
    let mut left: Vec<String> = within("dlq list", dlq::list(&settings, 10))
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.message_id)
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec!["ageless".to_owned(), "recent".to_owned()],
        "younger and undated letters stay"
    );

    let purged = within(
        "dlq purge",
        dlq::purge(&settings, &older_than(86_400), &mut |_| {}),
    )
    .await
    .unwrap()
    .purged;
    assert_eq!(purged, 0);
    raw.wait_ready(&dead, 2, "the dead queue").await;

    let purged = within(
        "dlq purge",
        dlq::purge(&settings, &dlq::Filter::default(), &mut |_| {}),
    )
    .await
    .unwrap()
    .purged;
    assert_eq!(purged, 2);
    raw.wait_ready(&dead, 0, "the dead queue").await;
    assert!(
        within("dlq list", dlq::list(&settings, 10))
            .await
            .unwrap()
            .is_empty()
    );

    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_a_missing_dead_letter_queue_fail_with_a_hint() {
    let settings = settings("dlq-missing");
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let err = within("dlq list", dlq::list(&settings, 10))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&settings.dead_letter_queue()) && text.contains("topology apply"),
        "{text}"
    );
    assert!(text.contains("NOT_FOUND"), "{text}");
}

fn older_than(secs: u64) -> dlq::Filter {
    dlq::Filter {
        older_than: Some(Duration::from_secs(secs)),
        ..dlq::Filter::default()
    }
}
