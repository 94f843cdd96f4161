//! `burrow run` and `burrow drain`: the worker with its HTTP endpoint, and
//! (with the `postgres` feature) the database work beside it.

use std::{future::Future, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::CliResult;
use crate::{
    Error, Metrics, Registry, Result, Settings, Worker, WorkerState, connection, shutdown,
};

/// `/healthz`, `/readyz`, `/metrics` and the console on `http.addr`, answering from a
/// state and a set of metrics; bound before anything else starts, so a taken
/// port fails at once.
pub(super) struct Endpoint {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Endpoint {
    /// Starts serving, or `None` when `http.addr` is unset. `/readyz` turns
    /// 503 ("stalled") when deliveries are in flight and none settled for
    /// `stall_after`.
    pub(super) async fn start(
        settings: &Settings,
        metrics: Metrics,
        state: watch::Receiver<WorkerState>,
        stall_after: Duration,
    ) -> Result<Option<Self>> {
        let Some(addr) = settings.http.addr else {
            return Ok(None);
        };
        // The console replays through a publisher of its own, which
        // connects on its first replay.
        let publisher = crate::Publisher::new(settings, metrics.clone())?;
        let console = crate::console::Console::new(settings, publisher, addr)?
            .with_worker(metrics.clone(), state.clone())
            .router();
        let router = crate::http::router(metrics, state, stall_after).merge(console);
        let listener = crate::http::bind(addr).await?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(crate::http::serve(
            listener,
            router,
            stop.clone().cancelled_owned(),
        ));
        Ok(Some(Self { stop, task }))
    }

    /// Stops serving; the port is free when this returns.
    pub(super) async fn stop(self) {
        self.stop.cancel();
        if let Ok(Err(e)) = self.task.await {
            tracing::warn!(error = %e, "http endpoint stopped with an error");
        }
    }
}

/// `burrow run`: a worker per app, one HTTP endpoint for them all.
pub(super) async fn run(apps: Vec<(Settings, Registry)>) -> CliResult {
    let settings = apps
        .first()
        .map(|(s, _)| s.clone())
        .ok_or_else(|| Error::registry(None, "no app to run"))?;
    let workers = Worker::group(apps)?;
    let metrics = workers[0].metrics().clone();
    // With postgres.url: wait for the database (retrying), then the inbox
    // cleanup and, with outbox.enabled, the relay run beside the workers.
    #[cfg(feature = "postgres")]
    let Some(beside) = super::outbox::start_beside_worker(&settings, &metrics).await? else {
        return Ok(()); // stopped while waiting for the database
    };
    let result = if workers.len() == 1 {
        let worker = workers.into_iter().next().expect("one worker");
        run_with_http(worker, shutdown::signal()).await
    } else {
        run_group(&settings, workers, metrics).await
    };
    #[cfg(feature = "postgres")]
    beside.stop().await;
    Ok(result?)
}

/// Several workers until SIGTERM/SIGINT: one endpoint, ready while every
/// worker consumes, alive until one stops.
async fn run_group(settings: &Settings, workers: Vec<Worker>, metrics: Metrics) -> Result<()> {
    let states: Vec<watch::Receiver<WorkerState>> = workers.iter().map(Worker::state).collect();
    let (combined_tx, combined) = watch::channel(WorkerState::Starting);
    let combine = tokio::spawn(combine_states(states, combined_tx));
    let stall_after = settings.consumer.handler_timeout + settings.publisher.confirm_timeout * 2;
    let endpoint = Endpoint::start(settings, metrics, combined, stall_after).await?;
    let stop = CancellationToken::new();
    let signal = tokio::spawn({
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = shutdown::signal() => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        }
    });
    let mut running = tokio::task::JoinSet::new();
    for worker in workers {
        let until = stop.clone().cancelled_owned();
        running.spawn(async move { worker.run(until).await });
    }
    let mut first_error = None;
    let mut abandoned = 0;
    while let Some(done) = running.join_next().await {
        // One worker ending stops the others: the process is one unit to
        // its supervisor.
        stop.cancel();
        match done {
            Ok(Ok(report)) => abandoned += report.abandoned,
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(Error::ConsumerStopped {
                    queue: settings.app_queue(),
                    reason: format!("worker task ended abnormally: {e}"),
                });
            }
        }
    }
    signal.abort();
    combine.abort();
    if let Some(endpoint) = endpoint {
        endpoint.stop().await;
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if abandoned > 0 {
        return Err(abandoned_error(settings, abandoned));
    }
    Ok(())
}

/// Keeps `combined` at the least ready of `states`: consuming only when
/// every worker consumes.
async fn combine_states(
    mut states: Vec<watch::Receiver<WorkerState>>,
    combined: watch::Sender<WorkerState>,
) {
    fn rank(state: WorkerState) -> u8 {
        match state {
            WorkerState::Consuming => 0,
            WorkerState::Starting => 1,
            WorkerState::Reconnecting => 2,
            WorkerState::Draining => 3,
            WorkerState::Stopped => 4,
        }
    }
    loop {
        let worst = states
            .iter()
            .map(|s| *s.borrow())
            .max_by_key(|s| rank(*s))
            .unwrap_or(WorkerState::Stopped);
        combined.send_replace(worst);
        let changes = states.iter_mut().map(|s| Box::pin(s.changed()));
        if futures_util::future::select_all(changes).await.0.is_err() {
            return;
        }
    }
}

fn abandoned_error(settings: &Settings, abandoned: usize) -> Error {
    Error::ConsumerStopped {
        queue: settings.app_queue(),
        reason: format!(
            "{abandoned} handler(s) were still running at the shutdown deadline; their messages were not acked and will be redelivered"
        ),
    }
}

/// `burrow drain --idle D`.
pub(super) async fn drain(settings: Settings, registry: Registry, idle: Duration) -> CliResult {
    let worker = Worker::new(settings.clone(), registry)?;
    let stop = CancellationToken::new();
    let monitor = tokio::spawn(idle_monitor(
        settings,
        worker.metrics().clone(),
        worker.state(),
        idle,
        stop.clone(),
    ));
    let token = stop.clone();
    let result = run_with_http(worker, async move {
        tokio::select! {
            _ = shutdown::signal() => {},
            _ = token.cancelled() => {},
        }
    })
    .await;
    stop.cancel();
    let _ = monitor.await;
    Ok(result?)
}

/// Runs the worker with its HTTP endpoint (when `http.addr` is set) until
/// `shutdown`; readiness turns 503 as soon as draining starts, and the
/// endpoint stays up until the worker has stopped.
async fn run_with_http(worker: Worker, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let settings = worker.settings().clone();
    let stall_after = settings.consumer.handler_timeout + settings.publisher.confirm_timeout * 2;
    let endpoint = Endpoint::start(
        &settings,
        worker.metrics().clone(),
        worker.state(),
        stall_after,
    )
    .await?;
    let result = worker.run(shutdown).await;
    if let Some(endpoint) = endpoint {
        endpoint.stop().await;
    }
    let report = result?;
    if report.abandoned > 0 {
        return Err(abandoned_error(&settings, report.abandoned));
    }
    Ok(())
}

/// Cancels `stop` once the worker consumes, nothing is in flight and the
/// app queue has held no ready message for `idle`. Messages waiting in retry
/// steps come back later and start the next on-demand run.
async fn idle_monitor(
    settings: Settings,
    metrics: Metrics,
    state: watch::Receiver<WorkerState>,
    idle: Duration,
    stop: CancellationToken,
) {
    let mut conn = None;
    let mut idle_since: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let consuming = *state.borrow() == WorkerState::Consuming;
        let ready = if consuming {
            ready_messages(&settings, &mut conn).await
        } else {
            None
        };
        let empty = consuming && metrics.in_flight() == 0 && ready == Some(0);
        match (empty, idle_since) {
            (false, _) => idle_since = None,
            (true, None) => idle_since = Some(tokio::time::Instant::now()),
            (true, Some(since)) if since.elapsed() >= idle => {
                tracing::info!(idle = %humantime::format_duration(idle), "queue empty and nothing in flight; draining done");
                stop.cancel();
                break;
            }
            (true, Some(_)) => {}
        }
    }
    if let Some(conn) = conn {
        let _ = conn.close(200, "drain done".into()).await;
    }
}

/// Ready messages in the app queue (passive declare), or `None` if unknown.
async fn ready_messages(settings: &Settings, conn: &mut Option<lapin::Connection>) -> Option<u32> {
    if conn.as_ref().is_none_or(|c| !c.status().connected()) {
        *conn = connection::open(&settings.amqp, "burrow drain monitor")
            .await
            .ok();
    }
    let channel = conn.as_ref()?.create_channel().await.ok()?;
    let queue = channel
        .queue_declare(
            settings.app_queue().as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .ok();
    let _ = channel.close(200, "".into()).await;
    queue.map(|q| q.message_count())
}
