//! Testing handlers without a broker: the real pipeline and settlement
//! decision, and a publisher that records.
//!
//! [`TestKit`] runs a [`TestDelivery`] through the same pipeline the worker
//! uses (decoding, the handler timeout and panic guard, the retry ladder,
//! the dead-letter reasons) and tells what the worker would do with it:
//! ack, retry which handlers at which step, or dead-letter with which
//! reason. [`RecordingPublisher`] stands in for [`crate::Publisher`] in code
//! that publishes through [`crate::Publish`].
//!
//! ```
//! use burrow::{Context, Event, HandlerError, Registry, Settlement};
//! use burrow::testing::{TestDelivery, TestKit};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(rename_all = "camelCase")]
//! struct CardAddedToLibraryEvent { library_id: String }
//! impl Event for CardAddedToLibraryEvent {
//!     const EVENT_TYPE: &'static str = "CardAddedToLibraryEvent";
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let mut registry = Registry::new();
//! registry.on("feeds.add", |event: CardAddedToLibraryEvent, _ctx: Context| async move {
//!     if event.library_id.is_empty() {
//!         return Err(HandlerError::permanent("no library"));
//!     }
//!     Ok(())
//! })?;
//! let kit = TestKit::new(registry);
//!
//! let ok = kit.deliver(TestDelivery::json("CardAddedToLibraryEvent", r#"{"libraryId":"l-1"}"#)).await;
//! assert_eq!(ok.settlement, Settlement::Ack);
//!
//! let bad = kit.deliver(TestDelivery::json("CardAddedToLibraryEvent", r#"{"libraryId":""}"#)).await;
//! assert_eq!(bad.dead_reason(), Some(burrow::DeadReason::Permanent));
//! # Ok::<(), burrow::Error>(())
//! # }).unwrap();
//! ```

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
};

use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Settings,
    consumer::{Pipeline, PipelineConfig, Settlement},
    error::{Error, Result},
    event::DomainEvent,
    handler::Registry,
    message::{HeaderValue, Headers},
    publisher::{OutgoingEvent, Publish},
    wire::{DeadReason, headers},
};

/// One message for [`TestKit::deliver`], as it would arrive.
#[derive(Debug, Clone)]
pub struct TestDelivery {
    event_type: String,
    body: Vec<u8>,
    headers: Headers,
    message_id: Option<String>,
}

impl TestDelivery {
    /// A message carrying `body` as its JSON text, published as `event_type`.
    pub fn json(event_type: &str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            event_type: event_type.to_owned(),
            body: body.into(),
            headers: Headers::new(),
            message_id: None,
        }
    }

    /// A message carrying `event`, as burrow's publisher sends it.
    pub fn event<E: DomainEvent>(event: &E) -> Result<Self> {
        let body = serde_json::to_vec(event).map_err(|source| Error::Serialize {
            event_type: E::EVENT_TYPE.to_owned(),
            source,
        })?;
        Ok(Self::json(E::EVENT_TYPE, body))
    }

    /// With the message id `id` (a random one otherwise).
    pub fn message_id(mut self, id: &str) -> Self {
        self.message_id = Some(id.to_owned());
        self
    }

    /// With the header `name` = `value`.
    pub fn header(mut self, name: &str, value: impl Into<HeaderValue>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// As delivery attempt `attempt` (a retry copy of attempt `attempt - 1`).
    pub fn attempt(self, attempt: u32) -> Self {
        self.header(headers::ATTEMPT, i64::from(attempt))
    }

    /// Addressed to these handlers only, as a retry or replay copy is.
    pub fn only_handlers(self, names: &[&str]) -> Self {
        let list = names.iter().map(|n| HeaderValue::from(*n)).collect();
        self.header(headers::HANDLERS, HeaderValue::List(list))
    }
}

/// What [`TestKit::deliver`] found: what the worker would do, and how each
/// handler ran.
#[derive(Debug, Clone, PartialEq)]
pub struct TestOutcome {
    /// The decision: ack, retry, dead-letter (or both), ignore.
    pub settlement: Settlement,
    /// Each selected handler and its error, if it failed.
    pub runs: Vec<TestRun>,
}

/// One handler's run in a [`TestOutcome`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRun {
    /// The handler's name.
    pub handler: String,
    /// Its failure as the dead-letter header would record it; `None` on success.
    pub error: Option<String>,
}

impl TestOutcome {
    /// Whether the delivery would simply be acked (every handler succeeded).
    pub fn is_acked(&self) -> bool {
        self.settlement == Settlement::Ack
    }

    /// The handlers a retry copy would run again, and at which step.
    pub fn retry(&self) -> Option<(u32, &[String])> {
        self.settlement
            .retry()
            .map(|r| (r.step.number, r.handlers.as_slice()))
    }

    /// Why the delivery would be dead-lettered, if it would.
    pub fn dead_reason(&self) -> Option<DeadReason> {
        self.settlement.dead_letter().map(|d| d.reason)
    }
}

/// The worker's pipeline, for tests: no broker, no settlement carried out.
#[derive(Debug, Clone)]
pub struct TestKit {
    pipeline: Pipeline,
}

impl TestKit {
    /// A kit over `registry` with the default settings' limits and ladder.
    pub fn new(registry: Registry) -> Self {
        Self::with_settings(&Settings::default(), registry)
    }

    /// A kit over `registry` with the limits and ladder of `settings`.
    pub fn with_settings(settings: &Settings, registry: Registry) -> Self {
        Self {
            pipeline: Pipeline::new(Arc::new(registry), PipelineConfig::from_settings(settings)),
        }
    }

    /// Runs `delivery` through the pipeline: every handler it is for runs,
    /// for real, and the outcome says how the worker would settle it.
    pub async fn deliver(&self, delivery: TestDelivery) -> TestOutcome {
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(delivery.headers.table().clone());
        if let Some(id) = &delivery.message_id {
            properties = properties.with_message_id(crate::wire::short_string_lossy(id));
        }
        let processed = self
            .pipeline
            .process(
                "",
                &delivery.event_type,
                &properties.with_type(crate::wire::short_string_lossy(&delivery.event_type)),
                &delivery.body,
                &CancellationToken::new(),
            )
            .await;
        TestOutcome {
            runs: processed
                .runs
                .iter()
                .map(|run| TestRun {
                    handler: run.handler.to_string(),
                    error: run.result.as_ref().err().map(|e| e.to_string()),
                })
                .collect(),
            settlement: processed.settlement,
        }
    }
}

/// A [`Publish`] that records every event instead of sending it, for tests
/// of code that publishes. It confirms everything unless told to fail.
///
/// ```
/// use burrow::{Publish, PublishExt};
/// use burrow::testing::RecordingPublisher;
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # struct CollectionCreatedEvent { aggregate_id: String }
/// # impl burrow::Event for CollectionCreatedEvent { const EVENT_TYPE: &'static str = "CollectionCreatedEvent"; }
/// # impl burrow::DomainEvent for CollectionCreatedEvent {
/// #     fn aggregate_id(&self) -> String { self.aggregate_id.clone() }
/// #     fn occurred_at(&self) -> chrono::DateTime<chrono::Utc> { chrono::Utc::now() }
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let publisher = RecordingPublisher::new();
/// let event = CollectionCreatedEvent { aggregate_id: "col-1".into() };
/// publisher.publish(&event).await?;
/// assert_eq!(publisher.published()[0].event_type, "CollectionCreatedEvent");
/// assert_eq!(publisher.published()[0].body["aggregate_id"], "col-1");
/// # Ok::<(), burrow::Error>(())
/// # }).unwrap();
/// ```
#[derive(Debug, Clone, Default)]
pub struct RecordingPublisher {
    inner: Arc<Mutex<Recorded>>,
}

#[derive(Debug, Default)]
struct Recorded {
    published: Vec<OutgoingEvent>,
    unroutable: bool,
}

impl RecordingPublisher {
    /// A publisher that records and confirms.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every later publish fail as unroutable, as with no queue bound
    /// ([`Error::Unroutable`]); `false` confirms again.
    pub fn fail_unroutable(&self, on: bool) {
        self.lock().unroutable = on;
    }

    /// Everything published so far, in order.
    pub fn published(&self) -> Vec<OutgoingEvent> {
        self.lock().published.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Publish for RecordingPublisher {
    fn publish_event(
        &self,
        event: OutgoingEvent,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            let mut recorded = self.lock();
            if recorded.unroutable {
                return Err(Error::Unroutable {
                    exchange: "(recording publisher)".into(),
                    routing_key: event.event_type.clone(),
                    reply: "NO_ROUTE".into(),
                });
            }
            recorded.published.push(event);
            Ok(())
        })
    }
}
