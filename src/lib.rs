#![forbid(unsafe_code)]
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
//! 1. The [`Worker`]'s session (`consumer/session.rs`) receives it from the
//!    app queue (manual acks, prefetch) and hands it to a task.
//! 2. The pipeline (`consumer/pipeline.rs`) reads its metadata
//!    (`wire/read.rs`), picks the handlers it is for ([`Registry`], topic
//!    patterns), runs them under a timeout and a panic guard, and decides one
//!    [`Settlement`]. No I/O: [`testing::TestKit`] runs the same code.
//! 3. The settler (`consumer/settle.rs`) carries the settlement out: copies
//!    built by `wire/write.rs` go through the [`Publisher`] (confirm awaited)
//!    to a [`RetryLadder`] step or the dead-letter queue, then the ack window
//!    (`consumer/ack.rs`) acks the original.
//!
//! # Modules
//!
//! | module | job |
//! |---|---|
//! | `event` | [`Event`] (what a handler decodes) and [`DomainEvent`] (what a publisher sends) |
//! | `handler` | the [`Handler`] trait, closures, the [`Registry`], [`Context`] |
//! | `consumer/` | the [`Worker`]: sessions, pipeline, settlement, acks, [`Outcome`] |
//! | `publisher` | [`Publisher`]: pooled confirm-mode channels; the [`Publish`] trait; delayed publishes ([`Publisher::publish_after`]) |
//! | `delay/` | [`DelayChain`]: the delay queues that hold delayed events back, walked by the broker alone |
//! | [`wire`] | the wire contract: header names, reading, writing, the header budget |
//! | [`asyncapi`] | the wire contract as an AsyncAPI 3.0 document, from the settings and the registry |
//! | `topology`, `retry`, `topic`, `verify` | exchanges, queues and bindings as data ([`Topology`], [`RetryLadder`]); comparing them with the broker |
//! | `message` | [`Headers`], [`MessageProperties`]: a message in burrow's own types |
//! | [`config`] | [`Settings`] from `config/*.toml` and `BURROW__*` variables, validated |
//! | `error` | [`Error`], each variant retryable or not |
//! | `metrics`, [`http`] | [`Metrics`] (Prometheus); `/healthz`, `/readyz`, `/metrics` |
//! | [`redact`] | keeping passwords out of errors, logs, output and panics |
//! | [`shutdown`] | the shutdown signal (SIGTERM, SIGINT) |
//! | [`testing`] | handlers through the real pipeline without a broker; a recording publisher |
//! | [`dlq`] | the dead-letter queue: list, show, export, replay, purge |
//! | [`console`] | the operator console in a browser (`/console`, `burrow console`) |
//! | [`cli`] | the `burrow` command line, for this binary or your own |
//! | `outbox`, `inbox` | transactional outbox and idempotent inbox on PostgreSQL (feature `postgres`, docs/outbox.md) |
//! | `connection`, `backoff`, `otel` | opening connections; capped retry delays; W3C trace context (feature `otel`) |
//!
//! # A worker in a few lines
//!
//! ```no_run
//! use burrow::{Context, Event, HandlerError, Registry, Settings, Worker};
//! use serde::Deserialize;
//!
//! #[derive(Debug, Deserialize)]
//! #[serde(rename_all = "camelCase")]
//! struct CollectionCreatedEvent {
//!     aggregate_id: String,
//!     name: String,
//! }
//!
//! impl Event for CollectionCreatedEvent {
//!     const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
//! }
//!
//! # async fn run() -> burrow::Result<()> {
//! let mut registry = Registry::new();
//! registry.on("search.index_collection", |event: CollectionCreatedEvent, _ctx: Context| async move {
//!     println!("indexing {}", event.name);
//!     Ok::<(), HandlerError>(())
//! })?;
//! let worker = Worker::new(Settings::load()?, registry)?;
//! worker.run(burrow::shutdown::signal()).await?;
//! # Ok(()) }
//! ```
//!
//! To get the whole `burrow` command line (run, dlq, topology, drain, ...)
//! with your own handler modules, see [`cli::App`].

pub mod asyncapi;
mod backoff;
pub mod cli;
pub mod config;
mod connection;
pub mod console;
mod consumer;
mod delay;
pub mod dlq;
mod doctor;
mod error;
mod event;
mod handler;
pub mod http;
mod limit;
mod management;
mod message;
mod metrics;
#[cfg(feature = "otel")]
mod otel;
#[cfg(feature = "postgres")]
mod postgres;
mod publisher;
pub mod redact;
mod retry;
pub mod shutdown;
pub mod testing;
mod topic;
mod topology;
mod verify;
pub mod wire;

pub use config::Settings;
pub use consumer::{
    DeadLetterMove, DeadLettered, Outcome, Retried, RetryMove, RunReport, Settlement, Worker,
    WorkerHandle, WorkerState,
};
pub use delay::{DelayChain, DelayLevel};
pub use error::{Error, Result};
pub use event::{DomainEvent, Event, EventMeta};
pub use handler::{BoxError, Context, Failure, Handler, HandlerError, Registry, ResultExt};
pub use limit::{HandlerLimits, LimitSettings, Rate};
pub use message::{HeaderValue, Headers, MessageProperties};
pub use metrics::Metrics;
#[cfg(feature = "otel")]
pub use otel::install_propagator;
#[cfg(feature = "postgres")]
pub use postgres::{inbox, outbox};
pub use publisher::{OutgoingEvent, Publish, PublishExt, Publisher, Scheduled};
pub use retry::{RetryLadder, RetryStep};
pub use topology::{ArgValue, BindingSpec, QueueRole, QueueSpec, ShardExchange, Topology};
pub use verify::Drift;
pub use wire::DeadReason;

/// burrow's own internals, reachable for its fuzz target, benchmarks and
/// integration tests only: no part of the API, no stability promise, and
/// free to use the AMQP client's types.
#[doc(hidden)]
pub mod internals {
    pub use crate::{
        connection::{connect, connect_with_tls, open},
        consumer::{ACK_HOLD, AckWindow, HandlerRun, Pipeline, PipelineConfig, Processed},
        dlq::DeadLetter,
        topology::{declare, declare_exchange},
        verify::verify,
        wire::{DEFAULT_FRAME_MAX, HeaderBudget, Incoming, table_size, value_size},
    };

    /// Reads a dead letter as [`crate::dlq`] does.
    pub fn read_dead_letter(
        routing_key: &str,
        properties: lapin::BasicProperties,
        body: Vec<u8>,
    ) -> crate::dlq::DeadLetter {
        crate::dlq::DeadLetter::read(routing_key, properties, body)
    }

    /// [`crate::Publisher`]'s raw send: bytes with the given properties.
    pub async fn send(
        publisher: &crate::Publisher,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: lapin::BasicProperties,
    ) -> crate::Result<()> {
        publisher
            .send(exchange, routing_key, body, properties)
            .await
    }
}
