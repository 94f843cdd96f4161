//! How long an outbox event takes from the app's commit to a consumer, with
//! the relay woken by LISTEN/NOTIFY and with polling only, and how many
//! events per second one and two relays publish from a backlog.
//!
//! Needs PostgreSQL (`DATABASE_URL`, default the local `test` database) and
//! RabbitMQ (`AMQP_URL`); works in a schema and on an exchange of its own and
//! removes the schema afterwards.
//!
//! ```sh
//! cargo run --release --features postgres --example outbox_latency
//! OUTBOX_BENCH_N=500 OUTBOX_BENCH_BACKLOG=20000 cargo run --release --features postgres --example outbox_latency
//! ```
//!
//! Latency is measured one event at a time: commit, then wait until the
//! consumer has it. "commit → consumer" is what an app sees end to end;
//! "enqueue → confirm" is the relay's own delay, from the row's
//! `enqueued_at` to the broker's confirm recorded in `published_at`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use burrow::{
    DomainEvent, Event, Metrics, Publisher, Settings,
    config::{AmqpUrl, DatabaseUrl},
    outbox::{self, Relay},
};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CardMoved {
    aggregate_id: String,
    seq: u32,
    occurred_at: DateTime<Utc>,
}

impl Event for CardMoved {
    const EVENT_TYPE: &'static str = "CardMovedEvent";
}

impl DomainEvent for CardMoved {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        self.occurred_at
    }
}

/// Arrival time of each message id, and a wake-up per arrival.
#[derive(Clone, Default)]
struct Arrivals {
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    notify: Arc<Notify>,
}

impl Arrivals {
    async fn wait_for(&self, id: &str) -> Instant {
        loop {
            let notified = self.notify.notified();
            if let Some(at) = self.seen.lock().unwrap().get(id) {
                return *at;
            }
            tokio::time::timeout(Duration::from_secs(30), notified)
                .await
                .expect("an event did not arrive within 30 s");
        }
    }

    async fn wait_count(&self, n: usize) {
        loop {
            let notified = self.notify.notified();
            if self.seen.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::timeout(Duration::from_secs(60), notified)
                .await
                .expect("events stopped arriving");
        }
    }

    fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(|a, b| a.total_cmp(b));
    format!(
        "p50 {:7.2} ms  p95 {:7.2} ms  p99 {:7.2} ms  max {:7.2} ms",
        percentile(&ms, 0.50),
        percentile(&ms, 0.95),
        percentile(&ms, 0.99),
        ms[ms.len() - 1]
    )
}

fn start_relays(
    pool: &PgPool,
    settings: &Settings,
    n: usize,
) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>) {
    let stop = CancellationToken::new();
    let tasks = (0..n)
        .map(|_| {
            let publisher = Publisher::new(settings, Metrics::new()).expect("publisher");
            let relay = Relay::new(pool.clone(), publisher.clone(), settings);
            let stop = stop.clone();
            tokio::spawn(async move {
                relay.run(stop.cancelled_owned()).await.expect("relay");
                publisher.close().await;
            })
        })
        .collect();
    (stop, tasks)
}

async fn stop_relays(stop: CancellationToken, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.cancel();
    for t in tasks {
        t.await.expect("relay task");
    }
}

async fn latency(label: &str, pool: &PgPool, settings: &Settings, arrivals: &Arrivals, n: usize) {
    let (stop, tasks) = start_relays(pool, settings, 1);
    // Let the relay reach its idle wait before the first event.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("TRUNCATE event_outbox")
        .execute(pool)
        .await
        .unwrap();
    arrivals.clear();
    let mut end_to_end = Vec::with_capacity(n);
    for seq in 0..n as u32 {
        let mut tx = pool.begin().await.unwrap();
        let event = CardMoved {
            aggregate_id: format!("card-{}", seq % 10),
            seq,
            occurred_at: Utc::now(),
        };
        let id = outbox::enqueue(&mut tx, &event).await.unwrap();
        tx.commit().await.unwrap();
        let committed = Instant::now();
        let arrived = arrivals.wait_for(&id).await;
        end_to_end.push(arrived.saturating_duration_since(committed).as_secs_f64() * 1000.0);
    }
    stop_relays(stop, tasks).await;
    let relay_ms: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM published_at - enqueued_at)::float8 * 1000 FROM event_outbox",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    println!("{label}");
    println!("  commit → consumer   {}", summary(end_to_end));
    println!("  enqueue → confirm   {}", summary(relay_ms));
}

async fn throughput(
    label: &str,
    pool: &PgPool,
    settings: &Settings,
    arrivals: &Arrivals,
    backlog: usize,
    relays: usize,
) {
    sqlx::query("TRUNCATE event_outbox")
        .execute(pool)
        .await
        .unwrap();
    arrivals.clear();
    for chunk in 0..backlog.div_ceil(500) {
        let mut tx = pool.begin().await.unwrap();
        for i in 0..500.min(backlog - chunk * 500) {
            let seq = (chunk * 500 + i) as u32;
            let event = CardMoved {
                aggregate_id: format!("card-{}", seq % 200),
                seq,
                occurred_at: Utc::now(),
            };
            outbox::enqueue(&mut tx, &event).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let started = Instant::now();
    let (stop, tasks) = start_relays(pool, settings, relays);
    arrivals.wait_count(backlog).await;
    let elapsed = started.elapsed();
    stop_relays(stop, tasks).await;
    println!(
        "{label}: {backlog} events in {:.2} s = {:.0} events/s",
        elapsed.as_secs_f64(),
        backlog as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("OUTBOX_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let backlog: usize = std::env::var("OUTBOX_BENCH_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let amqp_url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let id = uuid::Uuid::new_v4().simple().to_string();

    let mut settings = Settings::default();
    settings.app.name = format!("outbox-bench-{id}");
    settings.amqp.url = AmqpUrl::new(amqp_url.clone());
    settings.amqp.exchange = format!("outbox-bench-{id}");
    settings.http.addr = None;
    settings.postgres.url = Some(DatabaseUrl::new(database_url));
    settings.postgres.schema = Some(format!("outbox_bench_{id}"));
    settings.postgres.max_connections = 8;
    settings.outbox.retention = Duration::ZERO;

    let pool = outbox::connect(&settings.postgres).await.expect("database");
    outbox::prepare(&pool, &settings.postgres)
        .await
        .expect("migrations");

    // The consumer: an exclusive queue bound to everything on the exchange.
    let conn = burrow::internals::connect(&AmqpUrl::new(amqp_url), 30, "outbox bench")
        .await
        .expect("broker");
    burrow::internals::declare_exchange(&settings.amqp.exchange, &conn)
        .await
        .expect("exchange");
    let channel = conn.create_channel().await.unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().clone(),
            settings.amqp.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let arrivals = Arrivals::default();
    {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let now = Instant::now();
                if let Some(id) = d.properties.message_id() {
                    arrivals.seen.lock().unwrap().insert(id.to_string(), now);
                    arrivals.notify.notify_waiters();
                }
            }
        });
    }

    println!(
        "outbox relay latency, {n} events one at a time (PostgreSQL and RabbitMQ on this host)"
    );
    let mut s = settings.clone();
    s.outbox.listen = true;
    s.outbox.poll_interval = Duration::from_secs(1);
    latency(
        "LISTEN/NOTIFY (poll_interval 1s as fallback)",
        &pool,
        &s,
        &arrivals,
        n,
    )
    .await;
    for poll in [100u64, 1000] {
        let mut s = settings.clone();
        s.outbox.listen = false;
        s.outbox.poll_interval = Duration::from_millis(poll);
        latency(
            &format!("polling only, poll_interval {poll}ms"),
            &pool,
            &s,
            &arrivals,
            n,
        )
        .await;
    }

    println!("\nthroughput from a backlog (batch_size 100, 200 aggregates)");
    for relays in [1, 2] {
        throughput(
            &format!("{relays} relay(s)"),
            &pool,
            &settings,
            &arrivals,
            backlog,
            relays,
        )
        .await;
    }

    let _ = conn.close(200, "done".into()).await;
    let schema = settings.postgres.schema.as_deref().unwrap_or_default();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(&pool)
    .await
    .expect("drop the bench schema");
    let cleanup = burrow::internals::connect(&settings.amqp.url, 30, "outbox bench cleanup")
        .await
        .expect("broker");
    let ch = cleanup.create_channel().await.unwrap();
    let _ = ch
        .exchange_delete(settings.amqp.exchange.as_str().into(), Default::default())
        .await;
    let _ = cleanup.close(200, "done".into()).await;
}
