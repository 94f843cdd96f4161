//! PostgreSQL helpers for the outbox and inbox tests.
//!
//! Every test gets a schema of its own (`burrow_t_<uuid>`) with burrow's
//! migrations applied, so tests run in parallel on one database; the schema
//! is dropped when the [`TestDb`] is dropped, also after a panic. RabbitMQ
//! side: a [`Tap`] is an exclusive queue bound to a test exchange that
//! records every message it receives, in order.

#![allow(dead_code, unreachable_pub)]

use std::{collections::HashMap, time::Duration};

use burrow::{
    Metrics, Publisher, Settings,
    config::{DatabaseUrl, PostgresSettings},
    outbox::Relay,
};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio::sync::mpsc;

use crate::common::{WAIT, amqp_url, unique, within};

/// The database: `DATABASE_URL`, or the local `test` database.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema of this test's own ([`TestDb::new`] migrated, [`TestDb::empty`] not).
pub struct TestDb {
    pub pool: PgPool,
    pub schema: String,
    pub settings: PostgresSettings,
}

impl TestDb {
    pub async fn new() -> Self {
        let db = Self::empty().await;
        burrow::outbox::prepare(&db.pool, &db.settings)
            .await
            .expect("burrow's migrations apply");
        db
    }

    /// A schema of this test's own without burrow's tables.
    pub async fn empty() -> Self {
        let schema = unique("burrow_t").replace('-', "_");
        let admin = within(
            "a PostgreSQL connection (make postgres starts it)",
            PgPoolOptions::new()
                .max_connections(1)
                .connect(&database_url()),
        )
        .await
        .expect("PostgreSQL answers on DATABASE_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
            .execute(&admin)
            .await
            .expect("create the test schema");
        admin.close().await;
        let settings = PostgresSettings {
            url: Some(DatabaseUrl::new(database_url())),
            schema: Some(schema.clone()),
            max_connections: 10,
            migrate: true,
            ..PostgresSettings::default()
        };
        let pool = burrow::outbox::connect(&settings)
            .await
            .expect("connect to the test schema");
        Self {
            pool,
            schema,
            settings,
        }
    }

    /// Another pool on the same schema whose connections carry
    /// `application_name`, so a test can find (and kill) them.
    pub async fn pool_named(&self, application_name: &str) -> PgPool {
        let options = burrow::outbox::connect_options(&self.settings)
            .expect("options")
            .application_name(application_name);
        PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("connect a named pool")
    }

    /// Terminates every backend of `application_name`: what PostgreSQL
    /// sees when the process holding those connections dies.
    pub async fn kill_backends(&self, application_name: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(application_name)
        .fetch_one(&self.pool)
        .await
        .expect("pg_terminate_backend")
    }

    pub async fn scalar_i64(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn execute(&self, sql: &'static str) {
        sqlx::query(sql)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Waits until no outbox row is pending.
    pub async fn wait_drained(&self) {
        within("the outbox to drain", async {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let backlog = burrow::outbox::backlog(&self.pool).await.expect("backlog");
                if backlog.pending == 0 {
                    return;
                }
            }
        })
        .await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let schema = std::mem::take(&mut self.schema);
        // A thread of its own: Drop may run inside the test's runtime.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                let work = async {
                    let pool = PgPoolOptions::new()
                        .max_connections(1)
                        .connect(&database_url())
                        .await?;
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                    )))
                    .execute(&pool)
                    .await?;
                    pool.close().await;
                    Ok::<(), sqlx::Error>(())
                };
                match tokio::time::timeout(WAIT, work).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("cleanup: dropping schema {schema}: {e}"),
                    Err(_) => eprintln!("cleanup: dropping schema {schema} timed out"),
                }
            });
        });
        let _ = done.join();
    }
}

/// Test settings for an outbox app: unique exchange and app name (see
/// `TestApp`), the test schema, short polling.
pub fn outbox_settings(prefix: &str, db: &TestDb) -> Settings {
    let mut settings = crate::common::TestApp::new(prefix).build();
    settings.postgres = db.settings.clone();
    settings.outbox.poll_interval = Duration::from_millis(200);
    settings.outbox.batch_size = 50;
    settings
}

/// A relay with a publisher of its own.
pub fn relay(db_pool: &PgPool, settings: &Settings) -> (Relay, Publisher) {
    let publisher = Publisher::new(settings, Metrics::new()).expect("publisher");
    (
        Relay::new(db_pool.clone(), publisher.clone(), settings),
        publisher,
    )
}

/// One message a [`Tap`] received.
#[derive(Debug, Clone)]
pub struct Tapped {
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: serde_json::Value,
}

impl Tapped {
    pub fn message_id(&self) -> String {
        self.properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default()
    }
}

/// An exclusive, auto-deleted queue bound to `exchange` for some routing
/// keys, consumed in order.
pub struct Tap {
    pub queue: String,
    conn: Connection,
    rx: mpsc::UnboundedReceiver<Tapped>,
    channel: lapin::Channel,
}

impl Tap {
    /// Declares `exchange` as burrow does and binds a fresh queue for `keys`.
    pub async fn bind(exchange: &str, keys: &[&str]) -> Self {
        let conn = within(
            "a tap connection",
            burrow::internals::connect(
                &burrow::config::AmqpUrl::new(amqp_url()),
                30,
                "burrow outbox test (tap)",
            ),
        )
        .await
        .expect("tap connection");
        burrow::internals::declare_exchange(exchange, &conn)
            .await
            .expect("declare the test exchange");
        let channel = conn.create_channel().await.expect("tap channel");
        let queue = unique("tap");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the tap queue");
        let tap = Self {
            queue,
            rx: mpsc::unbounded_channel().1,
            conn,
            channel,
        };
        for key in keys {
            tap.add_binding(exchange, key).await;
        }
        let mut consumer = tap
            .channel
            .basic_consume(
                tap.queue.as_str().into(),
                "tap".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume the tap queue");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let body =
                    serde_json::from_slice(&delivery.data).unwrap_or(serde_json::Value::Null);
                let _ = tx.send(Tapped {
                    routing_key: delivery.routing_key.to_string(),
                    properties: delivery.properties,
                    body,
                });
            }
        });
        Self { rx, ..tap }
    }

    pub async fn add_binding(&self, exchange: &str, key: &str) {
        self.channel
            .queue_bind(
                self.queue.as_str().into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the tap queue");
    }

    /// The next message, waiting at most [`WAIT`].
    pub async fn next(&mut self) -> Tapped {
        within("a message on the tap", self.rx.recv())
            .await
            .expect("the tap consumer stopped")
    }

    /// The next `n` messages.
    pub async fn take(&mut self, n: usize) -> Vec<Tapped> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next().await);
        }
        out
    }

    /// Sends a marker straight to the tap queue and returns everything that
    /// arrived before it: all that was confirmed before this call.
    pub async fn rest(&mut self) -> Vec<Tapped> {
        let marker = unique("marker");
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default().with_message_id(marker.as_str().into()),
            )
            .await
            .expect("publish the marker");
        drop(confirm);
        let mut out = Vec::new();
        loop {
            let m = self.next().await;
            if m.message_id() == marker {
                return out;
            }
            out.push(m);
        }
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// How often each message id occurs.
pub fn count_ids(messages: &[Tapped]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for m in messages {
        *counts.entry(m.message_id()).or_default() += 1;
    }
    counts
}
