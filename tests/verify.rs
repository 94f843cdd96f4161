//! `verify` against a real RabbitMQ: nothing on a fresh topology, `Missing`
//! for deleted entities, `Mismatch` for a queue declared differently — and
//! the broker is left exactly as it was found.
//!
//! Every test has its own app name and exchange, a [`Cleanup`] guard, and
//! every wait is bounded by [`WAIT`] (see `common`).

mod common;

use burrow::{Drift, HandlerError, QueueRole, Registry, Settings, Topology, internals::verify};
use common::*;
use lapin::{
    Connection,
    options::{QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};

fn topology(settings: &Settings) -> Topology {
    let mut registry = Registry::new();
    registry
        .on("library.record_card", |_: CardAdded, _| async {
            Ok::<_, HandlerError>(())
        })
        .unwrap();
    Topology::for_app(settings, &registry)
}

async fn run_verify(topology: &Topology, conn: &Connection) -> Vec<Drift> {
    within("verify", verify(topology, conn))
        .await
        .expect("verify runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freshly_declared_topology_has_no_drift() {
    let settings = TestApp::new("verify-fresh").build();
    let topology = topology(&settings);
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let raw = Raw::connect().await;
    let conn = &raw.conn;
    within("declare", burrow::internals::declare(&topology, conn))
        .await
        .unwrap();

    assert_eq!(run_verify(&topology, conn).await, Vec::<Drift>::new());
    // Twice: verifying changed nothing that would make it differ.
    assert_eq!(run_verify(&topology, conn).await, Vec::<Drift>::new());
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_retry_queue_is_missing_and_stays_missing() {
    let settings = TestApp::new("verify-missing").build();
    let topology = topology(&settings);
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let raw = Raw::connect().await;
    let conn = &raw.conn;
    within("declare", burrow::internals::declare(&topology, conn))
        .await
        .unwrap();
    let retry = topology
        .queues
        .iter()
        .find(|q| q.role == QueueRole::Retry(2))
        .expect("a second retry step")
        .name
        .clone();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(retry.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = ch.close(200, "done".into()).await;

    let drifts = run_verify(&topology, conn).await;
    assert_eq!(
        drifts,
        vec![Drift::Missing {
            kind: "queue",
            name: retry.clone()
        }]
    );
    let text = drifts[0].to_string();
    assert!(
        text.contains(&retry) && text.contains("burrow topology apply"),
        "{text}"
    );
    assert!(
        !queue_exists(conn, &retry).await,
        "verify must not re-create it"
    );
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_declared_is_all_missing() {
    let settings = TestApp::new("verify-none").build();
    let topology = topology(&settings);
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let raw = Raw::connect().await;
    let conn = &raw.conn;

    let drifts = run_verify(&topology, conn).await;
    let mut expected = vec![Drift::Missing {
        kind: "exchange",
        name: topology.exchange.clone(),
    }];
    expected.extend(topology.queues.iter().map(|q| Drift::Missing {
        kind: "queue",
        name: q.name.clone(),
    }));
    assert_eq!(drifts, expected);
    for q in &topology.queues {
        assert!(
            !queue_exists(conn, &q.name).await,
            "verify created {}",
            q.name
        );
    }
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_predeclared_classic_is_a_mismatch_and_is_left_alone() {
    let settings = TestApp::new("verify-classic").build();
    let topology = topology(&settings);
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let raw = Raw::connect().await;
    let conn = &raw.conn;
    let app = settings.app_queue();

    // A pre-burrow service declared the app queue as a classic queue.
    let mut classic = FieldTable::default();
    classic.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        app.as_str().into(),
        QueueDeclareOptions::durable(),
        classic.clone(),
    )
    .await
    .unwrap();
    let _ = ch.close(200, "done".into()).await;
    // Everything else exists as burrow declares it.
    let err = within("declare", burrow::internals::declare(&topology, conn))
        .await
        .unwrap_err();
    assert!(
        matches!(err, burrow::Error::TopologyMismatch { .. }),
        "{err:?}"
    );
    let rest = Topology {
        queues: topology
            .queues
            .iter()
            .filter(|q| q.role != QueueRole::App)
            .cloned()
            .collect(),
        ..topology.clone()
    };
    within("declare the rest", burrow::internals::declare(&rest, conn))
        .await
        .unwrap();

    let drifts = run_verify(&topology, conn).await;
    assert_eq!(drifts.len(), 1, "{drifts:#?}");
    match &drifts[0] {
        Drift::Mismatch {
            kind,
            name,
            argument,
            declared,
            existing,
        } => {
            assert_eq!(
                (*kind, name.as_str(), argument.as_str()),
                ("queue", app.as_str(), "x-queue-type")
            );
            assert!(declared.contains("quorum"), "declared = {declared}");
            assert!(existing.contains("classic"), "existing = {existing}");
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    let text = drifts[0].to_string();
    assert!(
        text.contains("classic") && text.contains("quorum") && text.contains("delete_queue"),
        "{text}"
    );

    // Still the classic queue: declaring it classic again is a no-op.
    let ch = conn.create_channel().await.unwrap();
    within(
        "re-declare classic",
        ch.queue_declare(app.as_str().into(), QueueDeclareOptions::durable(), classic),
    )
    .await
    .expect("the queue is still classic");
    let _ = ch.close(200, "done".into()).await;
    raw.close().await;
}
