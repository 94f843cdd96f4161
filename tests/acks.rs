//! Coalesced acks against the real broker: every delivery settled exactly
//! once, whatever mix of acks, retries and dead letters it is part of; a
//! delivery stuck in its handler holds nobody else's ack; a shutdown acks
//! what finished during the drain; one stuck past the broker's consumer
//! timeout comes back and runs again.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use burrow::{HandlerError, Registry, RunReport, Topology};
use common::*;
use tokio::sync::mpsc;

/// What the handler does with event number `i`.
fn verdict(i: usize) -> Result<(), HandlerError> {
    if i % 5 == 1 {
        Err(HandlerError::transient("busy"))
    } else if i % 7 == 3 {
        Err(HandlerError::permanent("bad data"))
    } else {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_retries_and_dead_letters_settle_every_delivery_exactly_once() {
    // A long first step: retried copies stay in the step queue to be counted.
    let settings = TestApp::new("acks-mixed").delays_ms(&[3_600_000]).build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let runs = Arc::new(AtomicU64::new(0));
    let mut registry = Registry::new();
    {
        let runs = runs.clone();
        registry
            .on("acks.picky", move |event: CardAdded, _| {
                runs.fetch_add(1, Ordering::Relaxed);
                let i: usize = event.title.parse().expect("a numbered title");
                async move { verdict(i) }
            })
            .unwrap();
    }
    let step_queue = Topology::for_app(&settings, &registry).queues[1]
        .name
        .clone();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;

    let n = 400;
    let events: Vec<CardAdded> = (0..n).map(|i| CardAdded::new(&i.to_string())).collect();
    within(
        "the batch to be confirmed",
        publisher.publish_batch(&events),
    )
    .await
    .expect("every publish confirmed");

    let (mut retried, mut dead) = (0, 0);
    for _ in 0..n {
        let o = next_outcome(&mut outcomes).await;
        assert!(o.acked, "every settled delivery is acked: {o:?}");
        retried += usize::from(o.retried.is_some());
        dead += usize::from(o.dead_lettered.is_some());
    }
    let want_retried = (0..n).filter(|&i| i % 5 == 1).count();
    let want_dead = (0..n).filter(|&i| i % 5 != 1 && i % 7 == 3).count();
    assert_eq!((retried, dead), (want_retried, want_dead));
    publisher.close().await;

    let report = within("worker shutdown", worker.shutdown())
        .await
        .expect("a clean shutdown");
    assert_eq!(
        report,
        RunReport {
            settled: n as u64,
            abandoned: 0
        }
    );
    // An ack sent twice for one tag would have closed the channel (406) and
    // brought deliveries back; one missing would return it to the queue when
    // the worker's channel closed. Neither happened:
    assert_eq!(
        runs.load(Ordering::Relaxed),
        n as u64,
        "no delivery came back"
    );
    let raw = Raw::connect().await;
    assert_eq!(raw.resting_count(&settings.app_queue()).await, 0);
    assert_eq!(
        raw.message_count(&step_queue).await as usize,
        want_retried,
        "one confirmed copy per retried delivery"
    );
    assert_eq!(
        raw.message_count(&settings.dead_letter_queue()).await as usize,
        want_dead,
        "one confirmed copy per dead-lettered delivery"
    );
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_holds_no_other_ack_and_the_drain_acks_it() {
    let settings = TestApp::new("acks-slow")
        .shutdown_timeout(Duration::from_secs(10))
        .build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let (started_tx, mut started) = mpsc::unbounded_channel();
    let mut registry = Registry::new();
    registry
        .on("acks.maybe_slow", move |event: CardAdded, ctx| {
            let started_tx = started_tx.clone();
            async move {
                if event.title == "slow" {
                    started_tx.send(()).unwrap();
                    // Runs until the worker shuts down: its tag stays the
                    // lowest unsettled one the whole time.
                    tokio::time::timeout(Duration::from_secs(15), ctx.shutdown.cancelled())
                        .await
                        .map_err(|_| HandlerError::transient("shutdown was never signalled"))?;
                }
                Ok(())
            }
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;

    publisher.publish(&CardAdded::new("slow")).await.unwrap();
    next_seen(&mut started).await;
    let fast: Vec<CardAdded> = (0..20)
        .map(|i| CardAdded::new(&format!("fast-{i}")))
        .collect();
    publisher.publish_batch(&fast).await.unwrap();
    // Each outcome is broadcast once its ack frame is sent: all twenty are
    // acked while the first delivery is still in its handler.
    for _ in 0..20 {
        let o = next_outcome(&mut outcomes).await;
        assert!(o.acked, "{o:?}");
        assert_ne!(o.succeeded, Vec::<String>::new());
    }
    publisher.close().await;

    let report = within("worker shutdown", worker.shutdown())
        .await
        .expect("a clean shutdown");
    assert_eq!(
        report,
        RunReport {
            settled: 21,
            abandoned: 0
        }
    );
    let last = next_outcome(&mut outcomes).await;
    assert!(last.acked, "the drain acked the slow delivery: {last:?}");
    let raw = Raw::connect().await;
    assert_eq!(
        raw.resting_count(&settings.app_queue()).await,
        0,
        "nothing went back to the queue"
    );
    raw.close().await;
}

/// A delivery stuck past the broker's consumer timeout is taken back: the
/// broker closes the channel (3.x to 4.2) or cancels the consumer (4.3+),
/// the worker subscribes again on its own, the delivery runs again and is
/// acked; nothing is lost. The node of its own has `consumer_timeout = 5s`
/// (the broker-wide setting, what 3.10 to 4.2 apply to quorum queues) and the
/// consumer asks the same with `consumer.ack_timeout` (`x-consumer-timeout`,
/// which 4.3 applies first). The broker evaluates timeouts once a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_stuck_past_the_consumer_timeout_is_taken_back_and_runs_again() {
    let node = common::node::Node::start_with("acks-timeout", "consumer_timeout = 5000").await;
    let mut settings = TestApp::new("acks-stuck")
        .handler_timeout(Duration::from_secs(180))
        .build();
    settings.amqp.url = burrow::config::AmqpUrl::new(node.url());
    settings.consumer.ack_timeout = Some(Duration::from_secs(5));
    settings.amqp.reconnect_max_delay = Duration::from_secs(1);

    let (runs_tx, mut runs) = mpsc::unbounded_channel();
    let calls = Arc::new(AtomicU64::new(0));
    let mut registry = Registry::new();
    registry
        .on("acks.maybe_stuck", move |_: CardAdded, ctx| {
            let runs_tx = runs_tx.clone();
            let call = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                runs_tx.send(call).unwrap();
                if call == 0 {
                    // Stuck: past the consumer timeout, short of the handler timeout.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(170), ctx.shutdown.cancelled())
                            .await;
                }
                Ok::<_, HandlerError>(())
            }
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;
    publisher.publish(&CardAdded::new("stuck")).await.unwrap();
    assert_eq!(next_seen(&mut runs).await, 0);

    let again = eventually_within(
        "the delivery to run again",
        Duration::from_secs(150),
        || {
            let got = runs.try_recv();
            async move { got.map_err(|e| format!("{e}")) }
        },
    )
    .await;
    assert_eq!(again, 1);
    let outcome = eventually_within("the second run's ack", Duration::from_secs(30), || {
        let got = outcomes.try_recv();
        async move {
            match got {
                Ok(o) if o.acked => Ok(o),
                Ok(o) => Err(format!("{o:?}")),
                Err(e) => Err(format!("{e}")),
            }
        }
    })
    .await;
    assert_eq!(outcome.event_type, "CardAddedToLibraryEvent");
    publisher.close().await;
    let _ = within("worker shutdown", worker.shutdown()).await;
    let raw = Raw::connect_to(&node.url()).await;
    assert_eq!(raw.resting_count(&settings.app_queue()).await, 0);
    raw.close().await;
}
