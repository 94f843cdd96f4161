//! Graceful shutdown: drain in-flight handlers, report, return the rest.

mod common;

use std::time::Duration;

use burrow::{HandlerError, Registry, RunReport, WorkerState};
use common::*;
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_a_run_report() {
    let settings = TestApp::new("shutdown").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let mut registry = Registry::new();
    registry
        .on("library.record_card", |_: CardAdded, _| async {
            Ok::<_, HandlerError>(())
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    assert_eq!(worker.state(), WorkerState::Consuming);
    let publisher = publisher(&settings).await;

    publisher
        .publish(&CardAdded::new("Foundation"))
        .await
        .unwrap();
    publisher
        .publish(&CardAdded::new("Foundation and Empire"))
        .await
        .unwrap();
    assert!(next_outcome(&mut outcomes).await.acked);
    assert!(next_outcome(&mut outcomes).await.acked);
    publisher.close().await;

    let report = within("worker shutdown", worker.shutdown())
        .await
        .expect("a clean shutdown is Ok");
    assert_eq!(
        report,
        RunReport {
            settled: 2,
            abandoned: 0
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_handler_finish_and_acks_it() {
    let settings = TestApp::new("drain")
        .shutdown_timeout(Duration::from_secs(10))
        .build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let (started_tx, mut started) = mpsc::unbounded_channel();
    let mut registry = Registry::new();
    registry
        .on("library.record_card", move |_: CardAdded, ctx| {
            let started_tx = started_tx.clone();
            async move {
                started_tx.send(()).unwrap();
                // Finish only once the worker is shutting down: the drain must wait for us.
                tokio::time::timeout(Duration::from_secs(15), ctx.shutdown.cancelled())
                    .await
                    .map_err(|_| HandlerError::transient("shutdown was never signalled"))?;
                Ok(())
            }
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;
    let raw = Raw::connect().await;

    publisher
        .publish(&CardAdded::new("Hyperion"))
        .await
        .unwrap();
    next_seen(&mut started).await;

    let report = within("worker shutdown", worker.shutdown())
        .await
        .expect("clean shutdown");
    assert_eq!(
        report,
        RunReport {
            settled: 1,
            abandoned: 0
        }
    );
    let outcome = next_outcome(&mut outcomes).await;
    assert_eq!(outcome.succeeded, vec!["library.record_card".to_string()]);
    assert!(
        outcome.acked,
        "the in-flight delivery was acked during the drain"
    );
    assert_eq!(
        raw.resting_count(&settings.app_queue()).await,
        0,
        "nothing comes back"
    );

    raw.close().await;
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_outliving_the_shutdown_timeout_is_abandoned_and_its_message_returns() {
    let settings = TestApp::new("abandon")
        .shutdown_timeout(Duration::from_millis(300))
        .handler_timeout(Duration::from_secs(30))
        .build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let (started_tx, mut started) = mpsc::unbounded_channel();
    let mut registry = Registry::new();
    registry
        .on("library.record_card", move |_: CardAdded, _| {
            let started_tx = started_tx.clone();
            async move {
                started_tx.send(()).unwrap();
                std::future::pending::<()>().await;
                Ok::<_, HandlerError>(())
            }
        })
        .unwrap();
    let (worker, _outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;
    let raw = Raw::connect().await;

    let event = CardAdded::new("Stuck");
    publisher.publish(&event).await.unwrap();
    next_seen(&mut started).await;

    let report = within("worker shutdown", worker.shutdown())
        .await
        .expect("shutdown is Ok");
    assert_eq!(
        report,
        RunReport {
            settled: 0,
            abandoned: 1
        }
    );

    // Not acked: the broker gives the message back to the app queue.
    let back = raw.wait_get(&settings.app_queue()).await;
    assert_eq!(
        serde_json::from_slice::<CardAdded>(&back.data).unwrap(),
        event
    );
    assert!(back.redelivered, "the message is a redelivery");

    raw.close().await;
    publisher.close().await;
}
