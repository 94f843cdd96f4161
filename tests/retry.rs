//! The retry ladder with real TTLs: transient failures, panics and timeouts
//! climb it; retries run only the failed handlers of the failed app.

mod common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use burrow::{HandlerError, Registry, Retried};
use common::{recorder::Recorder, *};

fn names(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_climb_the_ladder_then_succeed() {
    let settings = TestApp::new("ladder").delays_ms(&[300, 600]).build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let mut registry = Registry::new();
    registry
        .on("billing.charge", move |_: CardAdded, ctx| {
            let seen = seen.clone();
            async move {
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(ctx.attempt);
                    seen.len()
                };
                if n <= 2 {
                    Err(HandlerError::transient(format!(
                        "payment gateway 503 (call {n})"
                    )))
                } else {
                    Ok(())
                }
            }
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;

    let published = Instant::now();
    publisher.publish(&CardAdded::new("Ubik")).await.unwrap();

    let first = next_outcome(&mut outcomes).await;
    assert_eq!(first.attempt, 1);
    assert_eq!(
        first.retried,
        Some(Retried {
            step: 1,
            handlers: names(&["billing.charge"])
        })
    );
    assert!(first.succeeded.is_empty());
    assert_eq!(first.dead_lettered, None);
    assert!(first.acked);

    let second = next_outcome(&mut outcomes).await;
    assert_eq!(
        second.message_id, first.message_id,
        "the retry is the same message"
    );
    assert_eq!(second.attempt, 2);
    assert_eq!(
        second.retried,
        Some(Retried {
            step: 2,
            handlers: names(&["billing.charge"])
        })
    );
    assert_eq!(second.dead_lettered, None);

    let third = next_outcome(&mut outcomes).await;
    assert_eq!(third.message_id, first.message_id);
    assert_eq!(
        third.event_type, "CardAddedToLibraryEvent",
        "the event type survives the ladder"
    );
    assert_eq!(third.attempt, 3);
    assert_eq!(third.succeeded, names(&["billing.charge"]));
    assert_eq!(third.retried, None);
    assert_eq!(third.dead_lettered, None);
    assert!(third.acked);

    // The step TTLs really held the message: 300 ms + 600 ms at least.
    assert!(
        published.elapsed() >= Duration::from_millis(900),
        "the ladder took only {:?}",
        published.elapsed()
    );
    assert_eq!(
        *attempts.lock().unwrap(),
        vec![1, 2, 3],
        "the handler saw attempts 1, 2, 3 in its context"
    );

    publisher.close().await;
    let report = within("worker shutdown", worker.shutdown()).await.unwrap();
    assert_eq!(report.settled, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_in_one_app_is_not_delivered_to_another() {
    let a = TestApp::new("retry-a").build();
    let b = TestApp::new("retry-b").exchange(&a.amqp.exchange).build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&a).app(&b);

    let mut reg_a = Registry::new();
    reg_a
        .on("search.index_card", |event: CardAdded, ctx| async move {
            if event.title == "first" && ctx.attempt == 1 {
                Err(HandlerError::transient("index locked"))
            } else {
                Ok(())
            }
        })
        .unwrap();
    let b_calls = Arc::new(AtomicU32::new(0));
    let counter = b_calls.clone();
    let mut reg_b = Registry::new();
    reg_b
        .on("feeds.add_card", move |_: CardAdded, _| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        })
        .unwrap();
    let (worker_a, mut out_a) = start_worker(a.clone(), reg_a).await;
    let (worker_b, mut out_b) = start_worker(b.clone(), reg_b).await;
    let publisher = publisher(&a).await;

    publisher.publish(&CardAdded::new("first")).await.unwrap();

    let a1 = next_outcome(&mut out_a).await;
    assert_eq!(
        (a1.attempt, a1.retried.clone()),
        (
            1,
            Some(Retried {
                step: 1,
                handlers: names(&["search.index_card"])
            })
        )
    );
    let a2 = next_outcome(&mut out_a).await;
    assert_eq!(a2.message_id, a1.message_id);
    assert_eq!(a2.attempt, 2);
    assert_eq!(a2.succeeded, names(&["search.index_card"]));

    // A's retry has been handled. Had it gone through the exchange, it would
    // have entered B's queue no later than A's: a marker published now lands
    // behind it, so once B handled the marker, B has seen everything it got.
    let marker = CardAdded::new("marker");
    publisher.publish(&marker).await.unwrap();

    let b1 = next_outcome(&mut out_b).await;
    assert_eq!(b1.message_id, a1.message_id);
    assert_eq!(b1.attempt, 1);
    assert_eq!(b1.succeeded, names(&["feeds.add_card"]));
    let b2 = next_outcome(&mut out_b).await;
    assert_ne!(b2.message_id, a1.message_id, "B received A's retry: {b2:?}");
    assert_eq!(b2.attempt, 1);
    assert_eq!(
        b_calls.load(Ordering::SeqCst),
        2,
        "B ran once for the event and once for the marker"
    );

    publisher.close().await;
    within("worker a shutdown", worker_a.shutdown())
        .await
        .unwrap();
    let rb = within("worker b shutdown", worker_b.shutdown())
        .await
        .unwrap();
    assert_eq!(rb.settled, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_runs_only_the_handler_that_failed() {
    let settings = TestApp::new("partial").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let ok_calls = Arc::new(AtomicU32::new(0));
    let flaky_calls = Arc::new(AtomicU32::new(0));
    let mut registry = Registry::new();
    let counter = ok_calls.clone();
    registry
        .on("search.index_card", move |_: CardAdded, _| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(())
            }
        })
        .unwrap();
    let counter = flaky_calls.clone();
    registry
        .on("mail.notify_owner", move |_: CardAdded, _| {
            let counter = counter.clone();
            async move {
                if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    Err(HandlerError::transient("smtp timeout"))
                } else {
                    Ok(())
                }
            }
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;

    publisher.publish(&CardAdded::new("Valis")).await.unwrap();

    let first = next_outcome(&mut outcomes).await;
    assert_eq!(first.attempt, 1);
    assert_eq!(first.succeeded, names(&["search.index_card"]));
    assert_eq!(
        first.retried,
        Some(Retried {
            step: 1,
            handlers: names(&["mail.notify_owner"])
        })
    );

    let second = next_outcome(&mut outcomes).await;
    assert_eq!(second.attempt, 2);
    assert_eq!(
        second.succeeded,
        names(&["mail.notify_owner"]),
        "only the failed handler ran"
    );
    assert_eq!(second.retried, None);
    assert_eq!(second.dead_lettered, None);

    assert_eq!(
        ok_calls.load(Ordering::SeqCst),
        1,
        "the handler that succeeded is not run again"
    );
    assert_eq!(flaky_calls.load(Ordering::SeqCst), 2);

    publisher.close().await;
    within("worker shutdown", worker.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_retried_and_the_worker_keeps_running() {
    let settings = TestApp::new("panic").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let mut registry = Registry::new();
    registry
        .on("search.index_card", |event: CardAdded, ctx| async move {
            if event.title == "explosive" && ctx.attempt == 1 {
                panic!("index corrupted for {}", event.aggregate_id);
            }
            Ok::<_, HandlerError>(())
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;
    let raw = Raw::connect().await;

    publisher
        .publish(&CardAdded::new("explosive"))
        .await
        .unwrap();

    let first = next_outcome(&mut outcomes).await;
    assert_eq!(first.attempt, 1);
    assert_eq!(
        first.retried,
        Some(Retried {
            step: 1,
            handlers: names(&["search.index_card"])
        }),
        "a panic is a transient failure"
    );
    assert_eq!(first.dead_lettered, None);
    assert!(first.acked);

    let second = next_outcome(&mut outcomes).await;
    assert_eq!(second.attempt, 2);
    assert_eq!(second.succeeded, names(&["search.index_card"]));

    // The worker is still consuming fresh events.
    publisher.publish(&CardAdded::new("calm")).await.unwrap();
    let third = next_outcome(&mut outcomes).await;
    assert_eq!(third.attempt, 1);
    assert_eq!(third.succeeded, names(&["search.index_card"]));
    assert_eq!(raw.message_count(&settings.dead_letter_queue()).await, 0);

    raw.close().await;
    publisher.close().await;
    within("worker shutdown", worker.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_exceeding_the_timeout_is_retried() {
    let settings = TestApp::new("timeout")
        .handler_timeout(Duration::from_millis(300))
        .build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let mut registry = Registry::new();
    registry
        .on("search.index_card", |_: CardAdded, ctx| async move {
            if ctx.attempt == 1 {
                // Far beyond consumer.handler_timeout; the worker gives up on it.
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Ok::<_, HandlerError>(())
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;

    let started = Instant::now();
    publisher.publish(&CardAdded::new("slow")).await.unwrap();

    let first = next_outcome(&mut outcomes).await;
    assert_eq!(first.attempt, 1);
    assert_eq!(
        first.retried,
        Some(Retried {
            step: 1,
            handlers: names(&["search.index_card"])
        }),
        "a timeout is a transient failure"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the timeout cut the handler short"
    );

    let second = next_outcome(&mut outcomes).await;
    assert_eq!(second.attempt, 2);
    assert_eq!(second.succeeded, names(&["search.index_card"]));

    publisher.close().await;
    within("worker shutdown", worker.shutdown()).await.unwrap();
}

/// A bare message (no properties) that fails once keeps its derived message
/// id on the retry copy, so logs and de-duplication see one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_message_keeps_its_derived_id_through_a_retry() {
    let mut rec = Recorder::build("bare-retry")
        .verdict(|seen| {
            if seen.ctx.attempt == 1 {
                Err(HandlerError::transient("database busy"))
            } else {
                Ok(())
            }
        })
        .start()
        .await;
    let raw = Raw::connect().await;

    let event = CardAdded::new("Kindred");
    let body = serde_json::to_vec(&event).unwrap();
    raw.publish(
        &rec.settings.amqp.exchange,
        "CardAddedToLibraryEvent",
        &body,
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await;

    let first = rec.next_seen().await;
    let second = rec.next_seen().await;
    assert!(
        first.ctx.message_id.starts_with("derived-"),
        "{:?}",
        first.ctx.message_id
    );
    assert_eq!(
        second.ctx.message_id, first.ctx.message_id,
        "the retry keeps the derived id"
    );
    assert_eq!((first.ctx.attempt, second.ctx.attempt), (1, 2));
    assert_eq!(
        second.ctx.event_type, "CardAddedToLibraryEvent",
        "the retry keeps the event type"
    );
    assert_eq!(second.event, event);

    let o1 = rec.next_outcome().await;
    assert_eq!(
        o1.retried,
        Some(Retried {
            step: 1,
            handlers: names(&["library.record_card"])
        })
    );
    let o2 = rec.next_outcome().await;
    assert_eq!(o2.message_id, o1.message_id);
    assert_eq!(o2.succeeded, names(&["library.record_card"]));

    raw.close().await;
    rec.stop().await;
}
