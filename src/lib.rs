#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
//! burrow: guaranteed-delivery domain events on RabbitMQ.
//!
//! Services publish domain events (`CardAddedToLibraryEvent`, ...) to a
//! durable topic exchange, `domain_events`, routed on the event type. Every
//! app that subscribes gets its own durable queue, `events_<app>`, and every
//! instance of that app shares it. Handlers are typed; when one fails the
//! message climbs a ladder of delay queues and, when the ladder is used up
//! or the failure is permanent, lands in `events_<app>.dead` with the reason.
//! Nothing is lost on the way: every copy burrow makes is publish-confirmed
//! before the original is acked, and the broker's own hops use quorum queues
//! with at-least-once dead-lettering.
//!
//! # The path of one delivery
//!
//! 1. [`consumer`] receives it from the app queue (manual acks, prefetch).
//! 2. [`pipeline`] reads its metadata ([`wire`]), picks the handlers it is
//!    for ([`handler`], [`topic`]), runs them under a timeout and a panic
//!    guard, and decides one [`Settlement`].
//! 3. [`consumer`] carries the settlement out: copies go through the
//!    [`publisher`] (confirm awaited) to a [`retry`] step or the dead-letter
//!    queue, then the original is acked.
//!
//! # Modules
//!
//! | module | job |
//! |---|---|
//! | [`config`] | settings from `config/*.toml` and `BURROW__*` variables, validated |
//! | [`error`] | [`Error`], each variant retryable or not |
//! | [`event`] | the [`DomainEvent`] trait and publish metadata |
//! | [`wire`] | header names, reading incoming metadata |
//! | [`topic`] | topic-exchange pattern matching |
//! | [`topology`] | exchanges, queues and bindings as data; declaring them |
//! | [`retry`] | the [`RetryLadder`] |
//! | [`publisher`] | pooled confirm-mode channels, [`Publisher`] |
//! | [`handler`] | the [`Handler`] trait, closures, the [`Registry`] |
//! | [`http`] | `/healthz`, `/readyz`, `/metrics` |
//! | [`metrics`] | Prometheus metrics |
//! | `otel` | W3C trace context through message headers (feature `otel`) |
//! | [`pipeline`] | delivery → [`Settlement`], no I/O |
//! | [`consumer`] | the [`Worker`] loop and settlement |
//! | [`ack`] | coalesced acks: one `basic.ack` (multiple) per run of settled deliveries |
//! | [`backoff`] | retry delays that stay under their cap, jitter included |
//! | [`connection`] | opening connections (heartbeats, timeouts, names) |
//! | [`redact`] | keeping passwords out of errors, logs, output and panics |
//! | [`cli`] | the `burrow` command line |
//! | [`shutdown`] | the shutdown signal (SIGTERM, SIGINT) |
//! | [`dlq`] | the dead-letter queue: list, show, replay, purge |
//! | [`verify`] | comparing the declared topology with the broker |
//! | `outbox` | transactional outbox on PostgreSQL: enqueue in your transaction, the relay publishes (feature `postgres`, docs/outbox.md) |
//! | `inbox` | idempotent handlers: side effects once per message, in your transaction (feature `postgres`) |
//!
//! # A worker in a few lines
//!
//! ```no_run
//! use burrow::{Context, DomainEvent, HandlerError, Registry, Settings, Worker};
//! use chrono::{DateTime, Utc};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! #[serde(rename_all = "camelCase")]
//! struct CollectionCreatedEvent {
//!     aggregate_id: String,
//!     name: String,
//!     occurred_at: DateTime<Utc>,
//! }
//!
//! impl DomainEvent for CollectionCreatedEvent {
//!     const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
//!     fn aggregate_id(&self) -> String { self.aggregate_id.clone() }
//!     fn occurred_at(&self) -> DateTime<Utc> { self.occurred_at }
//! }
//!
//! # async fn run() -> burrow::Result<()> {
//! let mut registry = Registry::new();
//! registry.on("search.index_collection", |event: CollectionCreatedEvent, _ctx: Context| async move {
//!     println!("indexing {}", event.name);
//!     Ok::<_, HandlerError>(())
//! })?;
//! let worker = Worker::new(Settings::load()?, registry)?;
//! worker.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! # Ok(()) }
//! ```

pub mod backoff;
pub mod cli;
pub mod config;
pub mod connection;
pub mod consumer;
pub mod dlq;
pub mod error;
pub mod event;
pub mod handler;
pub mod http;
pub mod metrics;
#[cfg(feature = "otel")]
pub mod otel;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
pub use postgres::{inbox, outbox};
pub mod publisher;
pub mod redact;
pub mod retry;
pub mod shutdown;
pub mod topic;
pub mod topology;
pub mod verify;
pub mod wire;

pub use config::Settings;
pub use consumer::{
    DeadLettered, Outcome, Pipeline, PipelineConfig, Retried, RunReport, Settlement, Worker,
    WorkerHandle, WorkerState,
};
pub use error::{Error, Result};
pub use event::{DomainEvent, EventMeta};
pub use handler::{BoxError, Context, Failure, Handler, HandlerError, Registry, ResultExt};
pub use metrics::Metrics;
pub use publisher::Publisher;
pub use retry::RetryLadder;
pub use topology::Topology;
pub use wire::DeadReason;
