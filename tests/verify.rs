//! `verify` against a real RabbitMQ: nothing on a fresh topology, `Missing`
//! for deleted entities, `Mismatch` for a queue declared differently — and
//! the broker is left exactly as it was found.
//!
//! Self-contained (no `mod common`): unique app and exchange names per test,
//! a [`Cleanup`] guard, every wait bounded by [`WAIT`].

use std::{future::Future, time::Duration};

use burrow::{
    Drift, HandlerError, QueueRole, Registry, Settings, Topology, config::AmqpUrl,
    internals::verify,
};
use chrono::{DateTime, Utc};
use lapin::{
    Connection,
    options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(20);

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CardAdded {
    aggregate_id: String,
    occurred_at: DateTime<Utc>,
}

impl burrow::Event for CardAdded {
    const EVENT_TYPE: &'static str = "CardAddedToLibraryEvent";
}

impl burrow::DomainEvent for CardAdded {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        self.occurred_at
    }
}

fn settings(prefix: &str) -> Settings {
    let mut s = Settings::default();
    s.app.name = unique(&format!("t-{prefix}"));
    s.amqp.url = AmqpUrl::new(amqp_url());
    s.amqp.exchange = unique("burrow-test-ex");
    s.retry.delays = vec![Duration::from_millis(300), Duration::from_millis(600)];
    s.validate().expect("test settings are valid");
    s
}

fn topology(settings: &Settings) -> Topology {
    let mut registry = Registry::new();
    registry
        .on("library.record_card", |_: CardAdded, _| async {
            Ok::<_, HandlerError>(())
        })
        .unwrap();
    Topology::for_app(settings, &registry)
}

/// Deletes the topology's queues and exchange when dropped, even on panic.
struct Cleanup {
    queues: Vec<String>,
    exchange: String,
}

impl Cleanup {
    fn new(topology: &Topology) -> Self {
        Self {
            queues: topology.queues.iter().map(|q| q.name.clone()).collect(),
            exchange: topology.exchange.clone(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchange = std::mem::take(&mut self.exchange);
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                let work = async {
                    let conn = connect().await;
                    for q in &queues {
                        let ch = conn.create_channel().await.expect("channel");
                        if ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await
                            .is_ok()
                        {
                            let _ = ch.close(200, "cleanup".into()).await;
                        }
                    }
                    let ch = conn.create_channel().await.expect("channel");
                    if ch
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await
                        .is_ok()
                    {
                        let _ = ch.close(200, "cleanup".into()).await;
                    }
                    let _ = conn.close(200, "cleanup".into()).await;
                };
                if tokio::time::timeout(WAIT, work).await.is_err() {
                    eprintln!("cleanup timed out");
                }
            });
        });
        let _ = done.join();
    }
}

async fn connect() -> Connection {
    within(
        "a connection",
        burrow::internals::connect(&AmqpUrl::new(amqp_url()), 30, "burrow test (verify)"),
    )
    .await
    .expect("connection")
}

/// Whether `queue` exists (passive declare on a channel of its own).
async fn exists(conn: &Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.expect("channel");
    let found = within(
        "a passive declare",
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .is_ok();
    if ch.status().connected() {
        let _ = ch.close(200, "done".into()).await;
    }
    found
}

async fn run_verify(topology: &Topology, conn: &Connection) -> Vec<Drift> {
    within("verify", verify(topology, conn))
        .await
        .expect("verify runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freshly_declared_topology_has_no_drift() {
    let settings = settings("verify-fresh");
    let topology = topology(&settings);
    let _cleanup = Cleanup::new(&topology);
    let conn = connect().await;
    within("declare", burrow::internals::declare(&topology, &conn))
        .await
        .unwrap();

    assert_eq!(run_verify(&topology, &conn).await, Vec::<Drift>::new());
    // Twice: verifying changed nothing that would make it differ.
    assert_eq!(run_verify(&topology, &conn).await, Vec::<Drift>::new());
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_retry_queue_is_missing_and_stays_missing() {
    let settings = settings("verify-missing");
    let topology = topology(&settings);
    let _cleanup = Cleanup::new(&topology);
    let conn = connect().await;
    within("declare", burrow::internals::declare(&topology, &conn))
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

    let drifts = run_verify(&topology, &conn).await;
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
    assert!(!exists(&conn, &retry).await, "verify must not re-create it");
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_declared_is_all_missing() {
    let settings = settings("verify-none");
    let topology = topology(&settings);
    let _cleanup = Cleanup::new(&topology);
    let conn = connect().await;

    let drifts = run_verify(&topology, &conn).await;
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
        assert!(!exists(&conn, &q.name).await, "verify created {}", q.name);
    }
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_predeclared_classic_is_a_mismatch_and_is_left_alone() {
    let settings = settings("verify-classic");
    let topology = topology(&settings);
    let _cleanup = Cleanup::new(&topology);
    let conn = connect().await;
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
    let err = within("declare", burrow::internals::declare(&topology, &conn))
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
    within("declare the rest", burrow::internals::declare(&rest, &conn))
        .await
        .unwrap();

    let drifts = run_verify(&topology, &conn).await;
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
    let _ = conn.close(200, "done".into()).await;
}
