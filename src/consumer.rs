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
//! Acks are coalesced ([`crate::ack`]): a delivery ready to be acked joins
//! its channel's ack window, and one `basic.ack` with `multiple` set covers
//! each run of contiguous ready deliveries. A delivery still in its handler
//! or waiting for a confirm is never covered, so the order above holds for
//! every delivery. lapin's `ack` returns `Ok(false)` when it sent nothing
//! (the channel closed under us): the broker will redeliver, and the
//! outcome says so.

use std::{future::Future, sync::Arc, time::Duration};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
};
use tokio::{
    sync::{Semaphore, broadcast, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    ack::Acks,
    config::Settings,
    connection,
    error::{Error, Result},
    handler::Registry,
    metrics::{AppLabels, InFlight, Metrics, RunOutcome},
    pipeline::{DeadLetterMove, DeadReason, Pipeline, Processed, RetryMove, Settlement},
    publisher::Publisher,
    retry::RetryLadder,
    topology::Topology,
    wire::{self, HeaderBudget, Incoming, headers, long_string, string_array},
};

/// The worker's lifecycle, observable through [`WorkerHandle::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Connecting and declaring the topology.
    Starting,
    /// Consuming the app queue.
    Consuming,
    /// The broker was lost; waiting to reconnect.
    Reconnecting,
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
    metrics: Metrics,
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
        let metrics = Metrics::for_app(&app_labels(&settings, &registry));
        Ok(Self {
            settings,
            registry: Arc::new(registry),
            outcomes,
            state,
            metrics,
        })
    }

    /// The worker's metrics (also served at `/metrics` by [`crate::http`]).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A receiver of the worker's state changes (readiness).
    pub fn state(&self) -> watch::Receiver<WorkerState> {
        self.state.subscribe()
    }

    /// Subscribes to delivery outcomes.
    pub fn outcomes(&self) -> broadcast::Receiver<Outcome> {
        self.outcomes.subscribe()
    }

    /// The settings the worker runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
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
    ///
    /// Losing the broker never ends the run: the worker reconnects forever
    /// with capped exponential backoff and jitter, declares its topology
    /// again and resumes. Only errors a person must fix end it: a topology
    /// mismatch, refused declarations, bad configuration.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<RunReport> {
        let result = self.run_sessions(shutdown).await;
        self.metrics.set_connected(false);
        self.state.send_replace(WorkerState::Stopped);
        result
    }

    async fn run_sessions(&self, shutdown: impl Future<Output = ()> + Send) -> Result<RunReport> {
        for warning in self.settings.warnings() {
            warn!("{warning}");
        }
        let publisher = Publisher::new(&self.settings, self.metrics.clone())?;
        let mut report = RunReport::default();
        tokio::pin!(shutdown);
        let cap = self.settings.amqp.reconnect_max_delay;
        let backoff = || crate::backoff::capped(FIRST_RECONNECT_DELAY, cap);
        let mut delays = backoff();
        let mut ever_consumed = false;
        let result = loop {
            match self.session(&publisher, &mut shutdown, &mut report).await {
                SessionEnd::Shutdown => break Ok(()),
                SessionEnd::Lost { error, consumed } => {
                    self.metrics.set_connected(false);
                    ever_consumed |= consumed;
                    // A refused login at start is a mistake to fix (exit,
                    // like a wrong database password); once this worker has
                    // consumed, it is a password being rotated: keep trying.
                    let rotating = ever_consumed && matches!(error, Error::AccessRefused { .. });
                    if !error.is_retryable() && !rotating {
                        break Err(error);
                    }
                    if consumed {
                        delays = backoff();
                    }
                    let delay = delays.next().unwrap_or(cap);
                    self.state.send_replace(WorkerState::Reconnecting);
                    let retry_in =
                        humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
                    if ever_consumed {
                        error!(error = %error, %retry_in, "lost the broker; reconnecting");
                    } else {
                        error!(error = %error, %retry_in, "cannot reach the broker; retrying");
                    }
                    tokio::select! {
                        _ = &mut shutdown => break Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        // Every session has drained, so no publish is in flight: this only
        // closes channels and the connection, bounded like the consumer's.
        if tokio::time::timeout(CLOSE_TIMEOUT, publisher.close())
            .await
            .is_err()
        {
            warn!(
                timeout = %humantime::format_duration(CLOSE_TIMEOUT),
                "the broker did not answer the publisher's close; dropping its connection"
            );
        }
        info!(
            settled = report.settled,
            abandoned = report.abandoned,
            "worker stopped"
        );
        result.map(|()| report)
    }

    /// One connection's worth of consuming. Ends on shutdown (after
    /// draining) or when the connection, channel or consumer is lost.
    async fn session<F: Future<Output = ()>>(
        &self,
        publisher: &Publisher,
        shutdown: &mut std::pin::Pin<&mut F>,
        report: &mut RunReport,
    ) -> SessionEnd {
        let settings = &self.settings;
        let lost = |error: Error| SessionEnd::Lost {
            error,
            consumed: false,
        };
        let conn = match connection::open(
            &settings.amqp,
            &format!("burrow consumer ({})", settings.app.name),
        )
        .await
        {
            Ok(c) => c,
            Err(e) => return lost(e),
        };
        let queue = settings.app_queue();
        let tag = consumer_tag(&settings.app.name);
        let opened = async {
            self.topology().declare(&conn).await?;
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| Error::amqp("channel.open (consumer)", e))?;
            channel
                .basic_qos(settings.consumer.prefetch, BasicQosOptions::default())
                .await
                .map_err(|e| Error::amqp("basic.qos", e))?;
            let consumer = channel
                .basic_consume(
                    wire::short_string("queue name", &queue)?,
                    wire::short_string("consumer tag", &tag)?,
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| Error::amqp(format!("basic.consume on '{queue}'"), e))?;
            Ok::<_, Error>((channel, consumer))
        }
        .await;
        let (channel, mut consumer) = match opened {
            Ok(pair) => pair,
            Err(e) => {
                if conn.status().connected() {
                    let _ = conn.close(200, "start-up failed".into()).await;
                }
                return lost(e);
            }
        };
        info!(queue = %queue, consumer_tag = %tag, handlers = self.registry.len(), "consuming");
        self.metrics.set_connected(true);
        self.state.send_replace(WorkerState::Consuming);

        let (acks, settler) = Acks::start(self.outcomes.clone());
        let shared = Arc::new(Shared {
            acks: acks.clone(),
            pipeline: Pipeline::new(
                self.registry.clone(),
                RetryLadder::new(&queue, &settings.retry.delays),
                settings.consumer.handler_timeout,
                settings.consumer.max_body_bytes,
            )
            .with_header_budget(HeaderBudget::new(settings.consumer.max_header_bytes)),
            publisher: publisher.clone(),
            queue: queue.clone(),
            app: settings.app.name.clone(),
            dead_queue: settings.dead_letter_queue(),
            outcomes: self.outcomes.clone(),
            metrics: self.metrics.clone(),
            shutdown: CancellationToken::new(),
        });
        let slots = Arc::new(Semaphore::new(settings.consumer.concurrency));
        let mut tasks = JoinSet::new();

        let lost_reason: Option<String> = loop {
            // Take a slot first: with every slot busy, deliveries stay in the
            // prefetch buffer (unacked, owned by the broker) instead of piling
            // up as tasks.
            let slot = tokio::select! {
                biased;
                _ = shutdown.as_mut() => break None,
                slot = slots.clone().acquire_owned() => slot.expect("semaphore never closed"),
            };
            let next = tokio::select! {
                biased;
                _ = shutdown.as_mut() => break None,
                next = consumer.next() => next,
            };
            while let Some(done) = tasks.try_join_next() {
                report.settled += u64::from(done.is_ok());
            }
            match next {
                Some(Ok(delivery)) => {
                    // In arrival order, before the task starts: the ack
                    // window must know every delivery a multiple ack could cover.
                    acks.received(delivery.delivery_tag);
                    let shared = shared.clone();
                    let in_flight = shared.metrics.delivery_started();
                    tasks.spawn(async move {
                        shared.handle(delivery, in_flight).await;
                        drop(slot);
                    });
                }
                Some(Err(e)) => break Some(format!("consumer error: {e}")),
                // basic.cancel from the broker (queue deleted, consumer
                // timeout) or the channel closed: subscribe again.
                None => {
                    break Some(
                        "the broker cancelled the consumer (queue deleted or channel closed)"
                            .into(),
                    );
                }
            }
        };
        let shutting_down = lost_reason.is_none();
        // The whole drain, basic.cancel included, fits in the shutdown timeout.
        let timeout = settings.consumer.shutdown_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        if shutting_down {
            // Gauges before the state: whoever sees readiness turn 503 also
            // scrapes `burrow_connected 0`.
            self.metrics.set_connected(false);
            self.state.send_replace(WorkerState::Draining);
            info!("shutting down: no new deliveries; waiting for in-flight handlers");
            if channel.status().connected()
                && let Ok(tag) = wire::short_string("consumer tag", &tag)
            {
                // A broker that went silent never answers; waiting for the
                // heartbeat to notice (2 × amqp.heartbeat) would outlast a
                // container's termination grace period.
                match tokio::time::timeout_at(
                    deadline,
                    channel.basic_cancel(tag, BasicCancelOptions::default()),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        warn!(error = %e, "basic.cancel failed; closing the channel returns unstarted deliveries anyway");
                    }
                    Err(_) => {
                        warn!(
                            "basic.cancel got no answer within the shutdown timeout; closing the channel returns unstarted deliveries anyway"
                        );
                    }
                }
            }
            shared.shutdown.cancel();
        }
        let drained = tokio::time::timeout_at(deadline, async {
            while let Some(done) = tasks.join_next().await {
                report.settled += u64::from(done.is_ok());
            }
        })
        .await;
        if drained.is_err() {
            let abandoned = tasks.len();
            tasks.abort_all();
            // A cancelled task drops its in-flight guard with it.
            while tasks.join_next().await.is_some() {}
            report.abandoned += abandoned;
            warn!(
                abandoned,
                timeout = %humantime::format_duration(timeout),
                "handlers still running at the deadline were stopped without ack; their deliveries will be redelivered"
            );
        }
        // Every task has ended: ack what is ready while the channel is open.
        acks.finish(settler).await;
        close(&channel, &conn).await;
        match lost_reason {
            None => SessionEnd::Shutdown,
            Some(reason) => SessionEnd::Lost {
                error: Error::ConsumerStopped { queue, reason },
                consumed: true,
            },
        }
    }
}

/// The labels of every series a worker for `settings` and `registry` can
/// produce, known before the first delivery.
fn app_labels(settings: &Settings, registry: &Registry) -> AppLabels {
    let mut events: Vec<String> = Vec::new();
    let literal_keys = registry
        .binding_keys()
        .into_iter()
        .filter(|key| !key.contains(['*', '#']));
    for event in registry
        .handlers()
        .iter()
        .map(|h| h.event_type().to_owned())
        .chain(literal_keys)
    {
        if !events.contains(&event) {
            events.push(event);
        }
    }
    let queue = settings.app_queue();
    AppLabels {
        steps: RetryLadder::new(&queue, &settings.retry.delays)
            .steps()
            .iter()
            .map(|s| s.number)
            .collect(),
        queue,
        events,
        handlers: registry
            .handlers()
            .iter()
            .map(|h| (h.name().to_owned(), h.event_type().to_owned()))
            .collect(),
        reasons: DeadReason::ALL.iter().map(|r| r.as_str()).collect(),
    }
}

/// How a session ended.
enum SessionEnd {
    /// The shutdown signal arrived and the session drained.
    Shutdown,
    /// The connection, channel or consumer was lost (or never opened).
    Lost {
        /// What happened.
        error: Error,
        /// Whether the session got as far as consuming (resets the backoff).
        consumed: bool,
    },
}

/// The wait before the first reconnection attempt (an upper bound: jittered).
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(200);

/// How long closing the channel and connections may wait for the broker's
/// close-ok. A silent broker (a partitioned network) would otherwise hold the
/// worker until the heartbeat gives up; dropping the connection instead lets
/// the broker requeue whatever was not acked when it notices.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

async fn close(channel: &Channel, conn: &Connection) {
    let closing = async {
        if channel.status().connected() {
            let _ = channel.close(200, "worker stopping".into()).await;
        }
        if conn.status().connected() {
            let _ = conn.close(200, "worker stopping".into()).await;
        }
    };
    if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
        warn!(
            timeout = %humantime::format_duration(CLOSE_TIMEOUT),
            "the broker did not answer the close; dropping the connection"
        );
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
                WorkerState::Starting | WorkerState::Reconnecting => {}
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
    acks: Acks,
    pipeline: Pipeline,
    publisher: Publisher,
    queue: String,
    app: String,
    dead_queue: String,
    outcomes: broadcast::Sender<Outcome>,
    metrics: Metrics,
    shutdown: CancellationToken,
}

impl Shared {
    async fn handle(&self, delivery: Delivery, in_flight: InFlight) {
        let Delivery {
            delivery_tag,
            exchange,
            routing_key,
            properties,
            data,
            acker,
            ..
        } = delivery;
        // The metadata is read before the span is entered, so every line
        // logged while the delivery is handled (a handler's own lines too,
        // inside its `handler` span) carries the message id, event, app and
        // attempt. Field names follow OpenTelemetry's messaging conventions
        // where they exist.
        let incoming = Incoming::read(exchange.as_str(), routing_key.as_str(), &properties, &data);
        let span = info_span!(
            "delivery",
            messaging.system = "rabbitmq",
            messaging.operation = "process",
            messaging.destination.name = %self.queue,
            app = %self.app,
            event = %incoming.event_type,
            message_id = %incoming.message_id,
            correlation_id = incoming.correlation_id.as_deref().unwrap_or(""),
            attempt = incoming.attempt,
        );
        #[cfg(feature = "otel")]
        crate::otel::set_parent(&span, properties.headers().as_ref());
        async {
            let processed = self
                .pipeline
                .process_incoming(incoming, &properties, &data, &self.shutdown)
                .await;
            self.record_metrics(&processed);
            let moved = self.settle(&processed, &properties, &data, &acker).await;
            // Outcomes are built only for subscribers (tests, the demo).
            let outcome = (self.outcomes.receiver_count() > 0).then(|| outcome(&processed, moved));
            if moved {
                // Acked with the deliveries around it (crate::ack).
                self.acks
                    .ready(delivery_tag, acker, outcome, in_flight)
                    .await;
            } else {
                self.acks.returned(delivery_tag).await;
                drop(in_flight);
                if let Some(o) = outcome {
                    let _ = self.outcomes.send(o);
                }
            }
        }
        .instrument(span)
        .await
    }

    fn record_metrics(&self, processed: &Processed) {
        let event = processed.incoming.event_type.as_str();
        self.metrics.delivery_received(&self.queue, event);
        let retry = processed.settlement.retry();
        let dead = processed.settlement.dead_letter();
        for run in &processed.runs {
            let name: &str = &run.handler;
            let outcome = if run.result.is_ok() {
                RunOutcome::Ok
            } else if retry.is_some_and(|r| r.handlers.iter().any(|h| h == name)) {
                RunOutcome::Retry
            } else {
                RunOutcome::Dead
            };
            self.metrics
                .handler_ran(name, event, outcome, run.duration.as_secs_f64());
        }
        if let Some(r) = retry {
            self.metrics.retried(&self.queue, r.step.number);
        }
        if let Some(d) = dead {
            self.metrics.dead_lettered(&self.queue, d.reason.as_str());
        }
        if matches!(processed.settlement, Settlement::Ignore { .. }) {
            self.metrics.delivery_ignored(&self.queue);
        }
    }

    /// Carries out a settlement up to the ack. Returns `true` when the
    /// delivery may be acked (every copy confirmed), `false` when it was
    /// returned to the queue with `basic.nack`.
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
        true
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
        let props = copy_properties(incoming, properties, extra, self.pipeline.header_budget());
        info!(step = r.step.number, delay = %humantime::format_duration(r.step.delay), handlers = ?r.handlers, errors = ?r.errors, "retrying");
        // Boxed: the send future is large and only this cold path needs it;
        // inline it would grow every delivery task by its size.
        let event = self.metrics.event_label(&incoming.event_type);
        Box::pin(
            self.publisher
                .send_counted(event, "", &r.step.queue, body, &props),
        )
        .await
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
        let props = copy_properties(incoming, properties, extra, self.pipeline.header_budget());
        warn!(reason = %d.reason, handlers = ?d.handlers, errors = ?d.errors, "dead-lettering");
        let event = self.metrics.event_label(&incoming.event_type);
        Box::pin(
            self.publisher
                .send_counted(event, "", &self.dead_queue, body, &props),
        )
        .await
    }
}

/// The properties of a retry or dead-letter copy: the original ones, a
/// message id (derived if the publisher set none, so it stays stable), and
/// burrow's headers on top of the original headers. The headers are fitted
/// into the header budget, so the copy can always be published: past it, the
/// largest original headers are left out and named in `burrow-dropped-headers`.
fn copy_properties(
    incoming: &Incoming,
    original: &BasicProperties,
    extra: FieldTable,
    budget: &HeaderBudget,
) -> BasicProperties {
    let mut own = FieldTable::default();
    own.insert(
        headers::EVENT_TYPE.into(),
        long_string(&incoming.event_type),
    );
    own.insert(
        headers::FIRST_FAILURE_AT.into(),
        AMQPValue::LongLongInt(incoming.first_failure_at.unwrap_or_else(wire::now_ms)),
    );
    for (k, v) in &extra {
        own.insert(k.clone(), v.clone());
    }
    let empty = FieldTable::default();
    let table = budget.fit(own, original.headers().as_ref().unwrap_or(&empty));
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
