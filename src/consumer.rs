//! The worker: consume the app queue, run the pipeline, settle each delivery.
//!
//! Settlement is the only place that acknowledges, and it does so at most
//! once per delivery, after every copy the settlement asks for has been
//! confirmed by the broker:
//!
//! ```text
//! delivery ─▶ Pipeline::process ─▶ Settlement ─┬─ Ack ───────────────────────────▶ basic.ack
//!                                              ├─ Retry ─▶ publish step queue ─┐
//!                                              ├─ DeadLetter ─▶ publish .dead ─┼─▶ confirmed? ─▶ basic.ack
//!                                              └─ both ─▶ both copies ─────────┘        │ no
//!                                                                                       ▼
//!                                                                      basic.nack(requeue): redelivered later
//! ```
//!
//! lapin's `ack` returns `Ok(false)` when it sent nothing (the channel closed
//! under us): the broker will redeliver, and the outcome says so.

use std::{future::Future, sync::Arc};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::{AMQPValue, FieldTable},
};
use tokio::{
    sync::{Semaphore, broadcast, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    config::Settings,
    connection,
    error::{Error, Result},
    handler::Registry,
    pipeline::{DeadLetterMove, DeadReason, Pipeline, Processed, RetryMove, Settlement},
    publisher::Publisher,
    retry::RetryLadder,
    topology::Topology,
    wire::{self, Incoming, headers, long_string, string_array},
};

/// The worker's lifecycle, observable through [`WorkerHandle::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Connecting and declaring the topology.
    Starting,
    /// Consuming the app queue.
    Consuming,
    /// A shutdown signal arrived; in-flight deliveries are finishing.
    Draining,
    /// Stopped.
    Stopped,
}

/// How one delivery ended, broadcast to [`WorkerHandle::outcomes`] subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The message id (publisher's or derived).
    pub message_id: String,
    /// The event type.
    pub event_type: String,
    /// The attempt this delivery was.
    pub attempt: u32,
    /// Handlers that succeeded on this delivery.
    pub succeeded: Vec<String>,
    /// Retry step number and the handlers that will run again, if retried.
    pub retried: Option<(u32, Vec<String>)>,
    /// Reason and handlers, if dead-lettered.
    pub dead_lettered: Option<(DeadReason, Vec<String>)>,
    /// Whether nothing in the app handles the event type.
    pub ignored: bool,
    /// Whether the ack frame was sent. `false` means the delivery will come
    /// back (a copy failed to confirm, or the channel closed first).
    pub acked: bool,
}

/// What [`Worker::run`] reports when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Deliveries settled during the run.
    pub settled: u64,
    /// Handlers still running when `consumer.shutdown_timeout` expired; their
    /// deliveries were not acked and will be redelivered.
    pub abandoned: usize,
}

/// A worker for one app: owns its connections, declares its topology and
/// consumes its queue until the shutdown future completes.
///
/// ```no_run
/// # async fn run(registry: burrow::Registry) -> burrow::Result<()> {
/// let settings = burrow::Settings::load()?;
/// let worker = burrow::Worker::new(settings, registry)?;
/// let report = worker.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
/// println!("settled {} deliveries", report.settled);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker {
    settings: Settings,
    registry: Arc<Registry>,
    outcomes: broadcast::Sender<Outcome>,
    state: watch::Sender<WorkerState>,
}

impl Worker {
    /// A worker for `settings.app` with the handlers of `registry`.
    pub fn new(settings: Settings, registry: Registry) -> Result<Self> {
        settings.validate()?;
        if registry.is_empty() {
            return Err(Error::Registry(
                "no handler is registered; a worker with no handlers would bind nothing. \
                 Register handler modules before starting the worker"
                    .into(),
            ));
        }
        let (outcomes, _) = broadcast::channel(4096);
        let (state, _) = watch::channel(WorkerState::Starting);
        Ok(Self {
            settings,
            registry: Arc::new(registry),
            outcomes,
            state,
        })
    }

    /// The topology this worker declares.
    pub fn topology(&self) -> Topology {
        Topology::for_app(&self.settings, &self.registry)
    }

    /// Runs the worker in a task and returns a handle to watch and stop it.
    pub fn spawn(self) -> WorkerHandle {
        let stop = CancellationToken::new();
        let outcomes = self.outcomes.clone();
        let state = self.state.subscribe();
        let token = stop.clone();
        let task = tokio::spawn(async move { self.run(token.cancelled_owned()).await });
        WorkerHandle {
            stop,
            outcomes,
            state,
            task,
        }
    }

    /// Runs until `shutdown` completes, then drains: stops consuming, lets
    /// in-flight handlers finish within `consumer.shutdown_timeout`, and
    /// closes the connections. Deliveries prefetched but not started go back
    /// to the queue when the channel closes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<RunReport> {
        let result = self.run_inner(shutdown).await;
        self.state.send_replace(WorkerState::Stopped);
        result
    }

    async fn run_inner(&self, shutdown: impl Future<Output = ()> + Send) -> Result<RunReport> {
        let settings = &self.settings;
        let publisher = Publisher::connect(settings).await?;
        let conn = connection::connect(
            &settings.amqp.url,
            settings.amqp.heartbeat,
            &format!("burrow consumer ({})", settings.app.name),
        )
        .await?;
        let topology = self.topology();
        topology.declare(&conn).await?;

        let queue = settings.app_queue();
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| Error::amqp("channel.open (consumer)", e))?;
        channel
            .basic_qos(settings.consumer.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| Error::amqp("basic.qos", e))?;
        let tag = consumer_tag(&settings.app.name);
        let mut consumer = channel
            .basic_consume(
                wire::short_string("queue name", &queue)?,
                wire::short_string("consumer tag", &tag)?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| Error::amqp(format!("basic.consume on '{queue}'"), e))?;
        info!(queue = %queue, consumer_tag = %tag, handlers = self.registry.len(), "consuming");
        self.state.send_replace(WorkerState::Consuming);

        let shared = Arc::new(Shared {
            pipeline: Pipeline::new(
                self.registry.clone(),
                RetryLadder::new(&queue, &settings.retry.delays),
                settings.consumer.handler_timeout,
                settings.consumer.max_body_bytes,
            ),
            publisher: publisher.clone(),
            dead_queue: settings.dead_letter_queue(),
            outcomes: self.outcomes.clone(),
            shutdown: CancellationToken::new(),
        });
        let slots = Arc::new(Semaphore::new(settings.consumer.concurrency));
        let mut tasks = JoinSet::new();
        let mut settled = 0u64;
        tokio::pin!(shutdown);

        let stream_end: Option<String> = loop {
            // Take a slot first: with every slot busy, deliveries stay in the
            // prefetch buffer (unacked, owned by the broker) instead of piling
            // up as tasks.
            let slot = tokio::select! {
                biased;
                _ = &mut shutdown => break None,
                slot = slots.clone().acquire_owned() => slot.expect("semaphore never closed"),
            };
            let next = tokio::select! {
                biased;
                _ = &mut shutdown => break None,
                next = consumer.next() => next,
            };
            while let Some(done) = tasks.try_join_next() {
                settled += u64::from(done.is_ok());
            }
            match next {
                Some(Ok(delivery)) => {
                    let shared = shared.clone();
                    tasks.spawn(async move {
                        shared.handle(delivery).await;
                        drop(slot);
                    });
                }
                Some(Err(e)) => break Some(format!("consumer error: {e}")),
                None => break Some("the broker cancelled the consumer (queue deleted?)".into()),
            }
        };

        self.state.send_replace(WorkerState::Draining);
        if channel.status().connected()
            && let Err(e) = channel
                .basic_cancel(
                    wire::short_string("consumer tag", &tag)?,
                    BasicCancelOptions::default(),
                )
                .await
        {
            warn!(error = %e, "basic.cancel failed; closing the channel returns unstarted deliveries anyway");
        }
        shared.shutdown.cancel();
        let deadline = settings.consumer.shutdown_timeout;
        let drained = tokio::time::timeout(deadline, async {
            while let Some(done) = tasks.join_next().await {
                settled += u64::from(done.is_ok());
            }
        })
        .await;
        let abandoned = tasks.len();
        if drained.is_err() {
            tasks.abort_all();
            warn!(
                abandoned,
                timeout = %humantime::format_duration(deadline),
                "handlers still running at the shutdown deadline were stopped without ack; their deliveries will be redelivered"
            );
        }
        close(&channel, &conn).await;
        publisher.close().await;
        info!(settled, abandoned, "worker stopped");
        match stream_end {
            Some(reason) => Err(Error::ConsumerStopped { queue, reason }),
            None => Ok(RunReport { settled, abandoned }),
        }
    }
}

async fn close(channel: &Channel, conn: &Connection) {
    if channel.status().connected() {
        let _ = channel.close(200, "worker stopping".into()).await;
    }
    if conn.status().connected() {
        let _ = conn.close(200, "worker stopping".into()).await;
    }
}

fn consumer_tag(app: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tag = format!("burrow.{app}.{host}.{}.{}", std::process::id(), &id[..8]);
    tag.chars().take(200).collect()
}

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: CancellationToken,
    outcomes: broadcast::Sender<Outcome>,
    state: watch::Receiver<WorkerState>,
    task: tokio::task::JoinHandle<Result<RunReport>>,
}

impl WorkerHandle {
    /// Subscribes to delivery outcomes from now on.
    pub fn outcomes(&self) -> broadcast::Receiver<Outcome> {
        self.outcomes.subscribe()
    }

    /// The worker's current state.
    pub fn state(&self) -> WorkerState {
        *self.state.borrow()
    }

    /// Waits until the worker consumes (topology declared), or fails if it
    /// stopped first. Callers bound the wait with their own timeout.
    pub async fn consuming(&mut self) -> Result<()> {
        loop {
            match *self.state.borrow_and_update() {
                WorkerState::Consuming => return Ok(()),
                WorkerState::Draining | WorkerState::Stopped => {
                    return Err(Error::ConsumerStopped {
                        queue: String::new(),
                        reason: "the worker stopped before it started consuming".into(),
                    });
                }
                WorkerState::Starting => {}
            }
            if self.state.changed().await.is_err() || self.task.is_finished() {
                return Err(Error::ConsumerStopped {
                    queue: String::new(),
                    reason: "the worker stopped before it started consuming".into(),
                });
            }
        }
    }

    /// Signals shutdown and waits for the worker to drain and stop.
    pub async fn shutdown(self) -> Result<RunReport> {
        self.stop.cancel();
        self.join().await
    }

    /// Waits for the worker to stop by itself (or fail).
    pub async fn join(self) -> Result<RunReport> {
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(Error::ConsumerStopped {
                queue: String::new(),
                reason: format!("worker task ended abnormally: {e}"),
            }),
        }
    }
}

struct Shared {
    pipeline: Pipeline,
    publisher: Publisher,
    dead_queue: String,
    outcomes: broadcast::Sender<Outcome>,
    shutdown: CancellationToken,
}

impl Shared {
    async fn handle(&self, delivery: Delivery) {
        let Delivery {
            exchange,
            routing_key,
            properties,
            data,
            acker,
            ..
        } = delivery;
        // The span's fields are filled once the metadata is read.
        let span = info_span!(
            "delivery",
            event = tracing::field::Empty,
            message_id = tracing::field::Empty,
            correlation_id = tracing::field::Empty,
            attempt = tracing::field::Empty,
        );
        async {
            let processed = self
                .pipeline
                .process(
                    exchange.as_str(),
                    routing_key.as_str(),
                    &properties,
                    &data,
                    &self.shutdown,
                )
                .await;
            let span = tracing::Span::current();
            span.record("event", processed.incoming.event_type.as_str());
            span.record("message_id", processed.incoming.message_id.as_str());
            span.record(
                "correlation_id",
                processed.incoming.correlation_id.as_deref().unwrap_or(""),
            );
            span.record("attempt", processed.incoming.attempt);
            let acked = self.settle(&processed, &properties, &data, &acker).await;
            let _ = self.outcomes.send(outcome(&processed, acked));
        }
        .instrument(span)
        .await
    }

    /// Carries out a settlement. Returns whether the ack was sent.
    async fn settle(
        &self,
        processed: &Processed,
        properties: &BasicProperties,
        body: &[u8],
        acker: &lapin::Acker,
    ) -> bool {
        let incoming = &processed.incoming;
        let moved = match &processed.settlement {
            Settlement::Ack => {
                debug!("handled");
                Ok(())
            }
            Settlement::Ignore { reason } => {
                warn!(%reason, "ignored");
                Ok(())
            }
            Settlement::Retry(r) => self.forward_retry(incoming, properties, body, r).await,
            Settlement::DeadLetter(d) => self.forward_dead(incoming, properties, body, d).await,
            Settlement::RetryAndDeadLetter(r, d) => {
                match self.forward_retry(incoming, properties, body, r).await {
                    Ok(()) => self.forward_dead(incoming, properties, body, d).await,
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = moved {
            // Not confirmed: the original must stay with the broker. Requeue
            // it; on quorum queues x-delivery-limit bounds the loop and parks
            // the message in the dead-letter queue.
            error!(error = %e, "could not move the message; returning it to the queue");
            if let Err(e) = acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
            {
                warn!(error = %e, "basic.nack failed; the broker will redeliver when the channel closes");
            }
            return false;
        }
        match acker.ack(BasicAckOptions::default()).await {
            Ok(true) => true,
            Ok(false) => {
                warn!(
                    "ack not sent: the channel closed first; the broker will redeliver this message"
                );
                false
            }
            Err(e) => {
                warn!(error = %e, "ack failed; the broker will redeliver this message");
                false
            }
        }
    }

    async fn forward_retry(
        &self,
        incoming: &Incoming,
        properties: &BasicProperties,
        body: &[u8],
        r: &RetryMove,
    ) -> Result<()> {
        let mut extra = FieldTable::default();
        extra.insert(
            headers::ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(incoming.attempt) + 1),
        );
        extra.insert(headers::HANDLERS.into(), string_array(&r.handlers));
        extra.insert(
            headers::LAST_ERROR.into(),
            long_string(&truncate(&r.errors.join("\n"), 4096)),
        );
        let props = copy_properties(incoming, properties, extra);
        info!(step = r.step.number, delay = %humantime::format_duration(r.step.delay), handlers = ?r.handlers, errors = ?r.errors, "retrying");
        self.publisher.send("", &r.step.queue, body, props).await
    }

    async fn forward_dead(
        &self,
        incoming: &Incoming,
        properties: &BasicProperties,
        body: &[u8],
        d: &DeadLetterMove,
    ) -> Result<()> {
        let mut extra = FieldTable::default();
        extra.insert(
            headers::ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(incoming.attempt)),
        );
        extra.insert(headers::HANDLERS.into(), string_array(&d.handlers));
        extra.insert(headers::DEAD_REASON.into(), long_string(d.reason.as_str()));
        if let Some(first) = d.handlers.first() {
            extra.insert(headers::FAILED_HANDLER.into(), long_string(first));
        }
        extra.insert(
            headers::LAST_ERROR.into(),
            long_string(&truncate(&d.errors.join("\n"), 4096)),
        );
        extra.insert(
            headers::DEAD_AT.into(),
            AMQPValue::LongLongInt(wire::now_ms()),
        );
        let props = copy_properties(incoming, properties, extra);
        warn!(reason = %d.reason, handlers = ?d.handlers, errors = ?d.errors, "dead-lettering");
        self.publisher.send("", &self.dead_queue, body, props).await
    }
}

/// The properties of a retry or dead-letter copy: the original ones, a
/// message id (derived if the publisher set none, so it stays stable), and
/// burrow's headers on top of the original headers.
fn copy_properties(
    incoming: &Incoming,
    original: &BasicProperties,
    extra: FieldTable,
) -> BasicProperties {
    let mut table = original.headers().clone().unwrap_or_default();
    table.insert(
        headers::EVENT_TYPE.into(),
        long_string(&incoming.event_type),
    );
    table.insert(
        headers::FIRST_FAILURE_AT.into(),
        AMQPValue::LongLongInt(incoming.first_failure_at.unwrap_or_else(wire::now_ms)),
    );
    for (k, v) in &extra {
        table.insert(k.clone(), v.clone());
    }
    original
        .clone()
        .with_message_id(wire::short_string_lossy(&incoming.message_id))
        .with_delivery_mode(2)
        .with_headers(table)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn outcome(processed: &Processed, acked: bool) -> Outcome {
    let s = &processed.settlement;
    Outcome {
        message_id: processed.incoming.message_id.clone(),
        event_type: processed.incoming.event_type.clone(),
        attempt: processed.incoming.attempt,
        succeeded: processed
            .runs
            .iter()
            .filter(|r| r.result.is_ok())
            .map(|r| r.handler.to_string())
            .collect(),
        retried: s.retry().map(|r| (r.step.number, r.handlers.clone())),
        dead_lettered: s.dead_letter().map(|d| (d.reason, d.handlers.clone())),
        ignored: matches!(s, Settlement::Ignore { .. }),
        acked,
    }
}
