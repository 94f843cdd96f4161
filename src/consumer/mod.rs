//! The worker: consume the app queue, run the pipeline, settle each delivery.
//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | [`Worker`] and [`WorkerHandle`]: the lifecycle, reconnecting forever |
//! | `session.rs` | one connection: subscribe, take deliveries, drain |
//! | `pipeline.rs` | one delivery to one [`Settlement`], no I/O |
//! | `settle.rs` | carrying a settlement out: copies confirmed, then ack or nack |
//! | `ack.rs` | coalesced acks: one `basic.ack` (multiple) per run of settled deliveries |
//! | `fanout.rs` | broadcast handlers: a queue per instance, in-process retries |
//! | `ordered.rs` | ordered apps: one aggregate at a time, retries in place |
//! | `merge.rs` | several consumers of one channel as one stream, in delivery-tag order |
//! | `outcome.rs` | what the worker reports: [`Outcome`], [`RunReport`], [`WorkerState`] |
//!
//! A delivery is settled in one place (`settle.rs`), at most once, after
//! every copy its settlement asks for has been confirmed by the broker:
//!
//! ```text
//! delivery ─▶ Pipeline ─▶ Settlement ─┬─ Ack ───────────────────────────▶ ack window ─▶ basic.ack
//!                                     ├─ Retry ─▶ publish step queue ─┐
//!                                     ├─ DeadLetter ─▶ publish .dead ─┼─▶ confirmed? ─▶ ack window
//!                                     └─ both ─▶ both copies ─────────┘        │ no
//!                                                                              ▼
//!                                                             basic.nack(requeue): redelivered later
//! ```
//!
//! The ack window (`ack.rs`) sends the acks: one `basic.ack` with `multiple`
//! set covers each run of contiguous ready deliveries, and a delivery still
//! in its handler or waiting for a confirm is never covered, so the order
//! above holds for every delivery. lapin's `ack` returns `Ok(false)` when it
//! sent nothing (the channel closed under us): the broker will redeliver,
//! and the outcome says so. The one other place that acks is the operator
//! tool [`crate::dlq`], on the dead-letter queue's own channel.

mod ack;
mod fanout;
mod merge;
mod ordered;
mod outcome;
pub(crate) mod pipeline;
mod session;
mod settle;

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::session::{CLOSE_TIMEOUT, SessionEnd};
pub use self::{
    ack::{AckWindow, HOLD as ACK_HOLD},
    outcome::{DeadLettered, Outcome, Retried, RunReport, WorkerState},
    pipeline::{
        DeadLetterMove, HandlerRun, Pipeline, PipelineConfig, Processed, RetryMove, Settlement,
    },
};
use crate::{
    config::Settings,
    error::{Error, Result},
    handler::Registry,
    metrics::{AppLabels, Metrics},
    publisher::Publisher,
    retry::RetryLadder,
    topology::Topology,
    wire::DeadReason,
};

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
    /// This instance's broadcast queue, when the app has broadcast handlers.
    broadcast_queue: Option<String>,
    /// When the last session lost its connection, and the broadcast queue
    /// with it: the next session counts the gap.
    broadcast_lost_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Worker {
    /// A worker for `settings.app` with the handlers of `registry`.
    pub fn new(settings: Settings, registry: Registry) -> Result<Self> {
        let metrics = Metrics::for_app(&app_labels(&settings, &registry));
        Self::with_metrics(settings, registry, metrics)
    }

    /// Workers for several apps in one process, recording into one set of
    /// [`Metrics`] (each series labelled with its app's queue), so one
    /// `/metrics` endpoint serves them all.
    pub fn group(apps: Vec<(Settings, Registry)>) -> Result<Vec<Worker>> {
        let labels: Vec<AppLabels> = apps.iter().map(|(s, r)| app_labels(s, r)).collect();
        let metrics = Metrics::for_apps(&labels);
        let mut queues = std::collections::HashSet::new();
        apps.into_iter()
            .map(|(settings, registry)| {
                if !queues.insert(settings.app_queue()) {
                    return Err(Error::registry(
                        None,
                        format!(
                            "two apps of this process consume {}; give each app its own name",
                            settings.app_queue()
                        ),
                    ));
                }
                Self::with_metrics(settings, registry, metrics.clone())
            })
            .collect()
    }

    fn with_metrics(settings: Settings, mut registry: Registry, metrics: Metrics) -> Result<Self> {
        settings.validate()?;
        registry.arm_limits(&settings.limits)?;
        metrics.prime_permit_waits(
            registry
                .handlers()
                .iter()
                .filter(|h| h.limits().is_limited())
                .map(|h| h.name()),
        );
        let broadcast_queue = registry
            .has_broadcast()
            .then(|| fanout::queue_name(&settings));
        if broadcast_queue.is_some() {
            metrics.prime_broadcast(
                &settings.app_queue(),
                registry
                    .handlers()
                    .iter()
                    .filter(|h| h.is_broadcast())
                    .map(|h| h.name()),
            );
        }
        if registry.is_empty() {
            return Err(Error::registry(
                None,
                "no handler is registered; a worker with no handlers would bind nothing. \
                 Register handler modules before starting the worker",
            ));
        }
        let (outcomes, _) = broadcast::channel(4096);
        let (state, _) = watch::channel(WorkerState::Starting);
        Ok(Self {
            settings,
            registry: Arc::new(registry),
            outcomes,
            state,
            metrics,
            broadcast_queue,
            broadcast_lost_at: std::sync::Mutex::new(None),
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
        let queue = self.settings.app_queue();
        let task = tokio::spawn(async move { self.run(token.cancelled_owned()).await });
        WorkerHandle {
            queue,
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
        self.metrics
            .set_connected(&self.settings.app_queue(), false);
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
                    self.metrics
                        .set_connected(&self.settings.app_queue(), false);
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
}

/// The labels of every series a worker for `settings` and `registry` can
/// produce, known before the first delivery.
pub(super) fn app_labels(settings: &Settings, registry: &Registry) -> AppLabels {
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
        queues: queue_names(settings, registry),
    }
}

/// The app's queues, in the topology's order: app queue, retry steps, dead letters.
fn queue_names(settings: &Settings, registry: &Registry) -> Vec<String> {
    let topology = Topology::for_app(settings, registry);
    topology.queues.into_iter().map(|q| q.name).collect()
}

/// The wait before the first reconnection attempt (an upper bound: jittered).
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(200);

/// A running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    /// The app queue, to name it in errors.
    queue: String,
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
                        queue: self.queue.clone(),
                        reason: "the worker stopped before it started consuming".into(),
                    });
                }
                WorkerState::Starting | WorkerState::Reconnecting => {}
            }
            if self.state.changed().await.is_err() || self.task.is_finished() {
                return Err(Error::ConsumerStopped {
                    queue: self.queue.clone(),
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
                queue: self.queue.clone(),
                reason: format!("worker task ended abnormally: {e}"),
            }),
        }
    }
}
