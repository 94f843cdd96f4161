//! The confirmed publisher.
//!
//! A pool (deadpool) of long-lived channels in confirm mode on one
//! connection of its own, so that publisher flow control never stalls the
//! consumer's connection. Every publish is mandatory and persistent and
//! returns only once the broker has confirmed it:
//!
//! - `Ack(None)` — stored: `Ok(())`;
//! - `Ack(Some(returned))` — the broker accepted the publish but routed it
//!   nowhere (RabbitMQ acks unroutable mandatory messages after returning
//!   them): [`Error::Unroutable`];
//! - `Nack` — not stored: [`Error::Nacked`].
//!
//! A channel is held only while the frame is written; the confirm is awaited
//! without it, so many publishes are in flight per channel. A semaphore of
//! `publisher.max_in_flight` permits bounds the unconfirmed window.

mod publish;
mod schedule;

pub use publish::{OutgoingEvent, Publish, PublishExt};
pub use schedule::Scheduled;

use std::{
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use deadpool::managed::{self, RecycleError, RecycleResult};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::FieldTable,
};
use tokio::sync::{Mutex, Semaphore};

use crate::{
    config::{AmqpSettings, Settings},
    connection,
    error::{Error, Result},
    event::{DomainEvent, EventMeta},
    metrics::{Metrics, PublishOutcome},
    wire::{self, short_string},
};

/// A cheap-to-clone handle to the confirmed publisher.
///
/// ```no_run
/// # use chrono::{DateTime, Utc};
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # #[serde(rename_all = "camelCase")]
/// # pub struct CollectionCreatedEvent { aggregate_id: String, occurred_at: DateTime<Utc> }
/// # impl burrow::Event for CollectionCreatedEvent {
/// #     const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
/// # }
/// #
/// # impl burrow::DomainEvent for CollectionCreatedEvent {
/// #     fn aggregate_id(&self) -> String { self.aggregate_id.clone() }
/// #     fn occurred_at(&self) -> DateTime<Utc> { self.occurred_at }
/// # }
/// # async fn run() -> burrow::Result<()> {
/// let settings = burrow::Settings::load()?;
/// let publisher = burrow::Publisher::connect(&settings).await?;
/// publisher
///     .publish(&CollectionCreatedEvent { aggregate_id: "col-1".into(), occurred_at: Utc::now() })
///     .await?; // returns once RabbitMQ confirmed; Err if unroutable or nacked
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    pool: managed::Pool<ChannelManager>,
    window: Semaphore,
    max_in_flight: usize,
    exchange: String,
    app_id: String,
    confirm_timeout: Duration,
    metrics: Metrics,
    /// The delay queues in front of `exchange`, declared on the first
    /// delayed publish (see `schedule.rs`).
    delay: crate::delay::DelayChain,
    delay_declared: AtomicBool,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("exchange", &self.inner.exchange)
            .field("app_id", &self.inner.app_id)
            .field("pool", &self.inner.pool.status())
            .finish()
    }
}

/// Hands out confirm-mode channels on the publisher's own connection,
/// reconnecting when the connection is gone.
struct ChannelManager {
    amqp: AmqpSettings,
    name: String,
    connection: Mutex<Option<Arc<Connection>>>,
}

impl ChannelManager {
    async fn connection(&self) -> Result<Arc<Connection>> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        let conn = Arc::new(connection::open(&self.amqp, &self.name).await?);
        *slot = Some(conn.clone());
        Ok(conn)
    }
}

impl managed::Manager for ChannelManager {
    type Type = Channel;
    type Error = Error;

    async fn create(&self) -> Result<Channel> {
        let conn = self.connection().await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| Error::amqp("channel.open (publisher)", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| Error::amqp("confirm.select", e))?;
        Ok(channel)
    }

    async fn recycle(&self, channel: &mut Channel, _: &managed::Metrics) -> RecycleResult<Error> {
        if channel.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message("channel closed"))
        }
    }
}

impl Publisher {
    /// Opens the publisher's connection and pool for `settings`; fails now
    /// if the broker cannot be reached.
    pub async fn connect(settings: &Settings) -> Result<Self> {
        let publisher = Self::new(settings, Metrics::new())?;
        publisher.inner.pool.manager().connection().await?;
        Ok(publisher)
    }

    /// A publisher that connects on first use and reconnects after the
    /// connection is lost, recording into `metrics`.
    pub fn new(settings: &Settings, metrics: Metrics) -> Result<Self> {
        let manager = ChannelManager {
            amqp: settings.amqp.clone(),
            name: format!("burrow publisher ({})", settings.app.name),
            connection: Mutex::new(None),
        };
        let pool = managed::Pool::builder(manager)
            .max_size(settings.publisher.channels)
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .map_err(|e| Error::PublisherPool {
                reason: e.to_string(),
            })?;
        Ok(Publisher {
            inner: Arc::new(Inner {
                pool,
                window: Semaphore::new(settings.publisher.max_in_flight),
                max_in_flight: settings.publisher.max_in_flight,
                exchange: settings.amqp.exchange.clone(),
                app_id: settings.app.name.clone(),
                confirm_timeout: settings.publisher.confirm_timeout,
                metrics,
                delay: crate::delay::DelayChain::new(&settings.amqp.exchange),
                delay_declared: AtomicBool::new(false),
            }),
        })
    }

    /// The metrics this publisher records into.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The exchange events are published to.
    pub fn exchange(&self) -> &str {
        &self.inner.exchange
    }

    /// Publishes one event and waits for the broker's confirm.
    pub async fn publish<E: DomainEvent>(&self, event: &E) -> Result<()> {
        self.publish_with(event, EventMeta::default()).await
    }

    /// Publishes one event with explicit ids.
    pub async fn publish_with<E: DomainEvent>(&self, event: &E, meta: EventMeta) -> Result<()> {
        let (body, props) = self.encode(event, meta)?;
        self.send_counted(
            E::EVENT_TYPE,
            &self.inner.exchange,
            E::EVENT_TYPE,
            &body,
            &props,
        )
        .await
    }

    /// Publishes many events concurrently within the in-flight window and
    /// waits for every confirm. On failure, [`Error::Batch`] lists the index
    /// and error of each event that was not confirmed; the others were.
    pub async fn publish_batch<E: DomainEvent>(&self, events: &[E]) -> Result<()> {
        let results = futures_util::future::join_all(events.iter().map(|e| self.publish(e))).await;
        batch_result(results)
    }

    /// Publishes a JSON body under `event_type`, as `burrow publish` does.
    /// The body must be a JSON object.
    pub async fn publish_json(
        &self,
        event_type: &str,
        body: &serde_json::Value,
        meta: EventMeta,
    ) -> Result<()> {
        if !body.is_object() {
            return Err(Error::InvalidEvent {
                event_type: event_type.to_owned(),
                reason: format!("got {}", json_kind(body)),
            });
        }
        let bytes = serde_json::to_vec(body).map_err(|source| Error::Serialize {
            event_type: event_type.to_owned(),
            source,
        })?;
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        // A JSON body names its aggregate in `aggregateId`, as the
        // contract's events do; without one the header is left out.
        let aggregate = body
            .get("aggregateId")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let props = self.event_properties(event_type, 1, now, aggregate, meta)?;
        self.send_counted(event_type, &self.inner.exchange, event_type, &bytes, &props)
            .await
    }

    /// Publishes raw bytes with the given properties to `exchange` (`""` is
    /// the default exchange, routing straight to the queue named `routing_key`)
    /// and waits for the confirm. Used by the consumer to move messages to
    /// retry and dead-letter queues.
    ///
    /// A publish whose connection or channel is lost before the confirm is
    /// sent again on a fresh channel (at-least-once) until
    /// `publisher.confirm_timeout` has passed; a return or nack is final.
    ///
    /// It is counted in `burrow_publishes_total` under the `type` property
    /// (`other` when there is none): never under the routing key, which for
    /// the default exchange is a queue name.
    pub(crate) async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        // The metric label, borrowed: no allocation per publish.
        let event = properties
            .kind()
            .as_ref()
            .map_or(crate::metrics::OTHER_EVENT, |k| k.as_str());
        self.send_counted(event, exchange, routing_key, body, &properties)
            .await
    }

    /// [`Publisher::send`], counted under the metric label `event`.
    pub(crate) async fn send_counted(
        &self,
        event: &str,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
    ) -> Result<()> {
        let _slot = self
            .inner
            .window
            .acquire()
            .await
            .map_err(|_| Error::PublisherClosed)?;
        let deadline = Instant::now() + self.inner.confirm_timeout;
        // Built on the first resend only: most publishes never need it.
        let mut delays = None;
        loop {
            let started = Instant::now();
            let result = self
                .send_once(exchange, routing_key, body, properties.clone(), deadline)
                .await;
            let outcome = match &result {
                Ok(()) => PublishOutcome::Confirmed,
                Err(Error::Unroutable { .. }) => PublishOutcome::Returned,
                Err(Error::Nacked { .. }) => PublishOutcome::Nacked,
                Err(_) => PublishOutcome::Failed,
            };
            match result {
                Err(
                    e @ (Error::Amqp { .. } | Error::PublisherPool { .. } | Error::Connect { .. }),
                ) if e.is_retryable() => {
                    let delay = delays
                        .get_or_insert_with(resend_backoff)
                        .next()
                        .unwrap_or(Duration::from_secs(2));
                    if Instant::now() + delay >= deadline {
                        self.inner
                            .metrics
                            .published(event, PublishOutcome::Failed, None);
                        return Err(e);
                    }
                    tracing::warn!(error = %e, retry_in = ?delay, "publish not confirmed; sending again");
                    tokio::time::sleep(delay).await;
                }
                other => {
                    let seconds = matches!(outcome, PublishOutcome::Confirmed)
                        .then(|| started.elapsed().as_secs_f64());
                    self.inner.metrics.published(event, outcome, seconds);
                    return other;
                }
            }
        }
    }

    async fn send_once(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        deadline: Instant,
    ) -> Result<()> {
        let exchange_name = short_string("exchange name", exchange)?;
        let key = short_string("routing key", routing_key)?;
        let timed_out = || Error::ConfirmTimeout {
            routing_key: routing_key.to_owned(),
            timeout: self.inner.confirm_timeout,
        };
        // The deadline bounds the whole send, not the confirm alone: the
        // checkout may be opening a channel (or a connection) on a socket
        // that has gone silent, and the frame write may wait on it too.
        let writing = async {
            let channel = self.inner.pool.get().await.map_err(|e| match e {
                managed::PoolError::Backend(e) => e,
                managed::PoolError::Closed => Error::PublisherClosed,
                other => Error::PublisherPool {
                    reason: other.to_string(),
                },
            })?;
            channel
                .basic_publish(
                    exchange_name,
                    key,
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties,
                )
                .await
                .map_err(|e| {
                    Error::amqp(
                        format!("basic.publish to '{exchange}' key '{routing_key}'"),
                        e,
                    )
                })
            // The channel goes back to the pool here; the confirm is awaited without it.
        };
        let confirm = tokio::time::timeout_at(deadline.into(), writing)
            .await
            .map_err(|_| timed_out())??;
        let confirmation = tokio::time::timeout_at(deadline.into(), confirm)
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| {
                Error::amqp(
                    format!("publisher confirm for '{exchange}' key '{routing_key}'"),
                    e,
                )
            })?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(Error::Unroutable {
                exchange: display_exchange(exchange),
                routing_key: routing_key.to_owned(),
                reply: returned.reply_text.to_string(),
            }),
            Confirmation::Nack(_) => Err(Error::Nacked {
                exchange: display_exchange(exchange),
                routing_key: routing_key.to_owned(),
            }),
            // Every pooled channel ran confirm.select; this would be a bug.
            Confirmation::NotRequested => Err(Error::ConfirmNotRequested {
                routing_key: routing_key.to_owned(),
            }),
        }
    }

    /// `event`'s body and properties, as every typed publish sends them.
    fn encode<E: DomainEvent>(
        &self,
        event: &E,
        meta: EventMeta,
    ) -> Result<(Vec<u8>, BasicProperties)> {
        let body = serde_json::to_vec(event).map_err(|source| Error::Serialize {
            event_type: E::EVENT_TYPE.to_owned(),
            source,
        })?;
        let properties = self.event_properties(
            E::EVENT_TYPE,
            E::VERSION,
            event.occurred_at().timestamp().max(0) as u64,
            &event.aggregate_id(),
            meta,
        )?;
        Ok((body, properties))
    }

    fn event_properties(
        &self,
        event_type: &str,
        version: u32,
        timestamp: u64,
        aggregate_id: &str,
        meta: EventMeta,
    ) -> Result<BasicProperties> {
        let message_id = meta
            .message_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let correlation_id = meta.correlation_id.as_deref().unwrap_or(&message_id);
        #[cfg_attr(not(feature = "otel"), allow(unused_mut))]
        let mut extra = FieldTable::default();
        #[cfg(feature = "otel")]
        crate::otel::inject(&mut extra);
        wire::event_properties(wire::NewEvent {
            event_type,
            version: i64::from(version),
            aggregate_id,
            occurred_at: timestamp,
            message_id: &message_id,
            correlation_id,
            causation_id: meta.causation_id.as_deref(),
            app_id: &self.inner.app_id,
            extra,
        })
    }

    /// Waits (up to the confirm timeout) for in-flight publishes to be
    /// confirmed, then closes the pool and the connection. Publishing after
    /// `close` fails.
    pub async fn close(&self) {
        let all = u32::try_from(self.inner.max_in_flight).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(
            self.inner.confirm_timeout,
            self.inner.window.acquire_many(all),
        )
        .await;
        self.inner.window.close();
        // Close the idle channels ourselves: a channel merely dropped closes
        // in the background and races the connection close below, which
        // lapin then reports as a connection error.
        let idle = self.inner.pool.retain(|_, _| false);
        for channel in idle.removed {
            if channel.status().connected() {
                let _ = channel.close(200, "publisher closed".into()).await;
            }
        }
        self.inner.pool.close();
        let conn = self.inner.pool.manager().connection.lock().await.take();
        if let Some(conn) = conn {
            let _ = conn.close(200, "publisher closed".into()).await;
        }
    }
}

/// Delays between resends of a publish whose connection was lost: 50 ms
/// doubling to 2 s, with jitter.
fn resend_backoff() -> impl Iterator<Item = Duration> + Send {
    crate::backoff::capped(Duration::from_millis(50), Duration::from_secs(2))
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn display_exchange(exchange: &str) -> String {
    if exchange.is_empty() {
        "(default)".into()
    } else {
        exchange.to_owned()
    }
}

fn batch_result(results: Vec<Result<()>>) -> Result<()> {
    let total = results.len();
    let failed: Vec<(usize, Error)> = results
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| r.err().map(|e| (i, e)))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Batch { total, failed })
    }
}
