//! The `burrow` command line. The binary passes in its handler modules and
//! calls [`main`]; everything else lives here so it can be tested.
//!
//! Exit codes: 0 success; 1 an error (printed on stderr); 2 a usage error;
//! 3 `publish` was unroutable (no queue bound); 4 `publish` was nacked or not
//! confirmed in time.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::{
    Error, EventMeta, Publisher, Registry, Result, Settings, Topology, Worker, config::LogFormat,
    connection,
};

/// What the binary provides: its handler modules and demo samples.
#[derive(Debug, Clone, Copy)]
pub struct App {
    /// Registers every handler module (`handlers::register`).
    pub register: fn(&mut Registry) -> Result<()>,
    /// Sample events for `burrow demo`: `(event type, JSON body)`.
    pub samples: fn() -> Vec<(&'static str, serde_json::Value)>,
}

#[derive(Debug, Parser)]
#[command(
    name = "burrow",
    version,
    about = "Guaranteed-delivery domain events on RabbitMQ",
    long_about = "Guaranteed-delivery domain events on RabbitMQ.\n\n\
        Settings come from config/default.toml, config/$APP_ENV.toml and BURROW__SECTION__KEY \
        environment variables (e.g. BURROW__AMQP__URL)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the worker: declare the topology, consume, settle; stop on SIGTERM/SIGINT.
    Run,
    /// Publish one event with confirms; exits non-zero if unroutable or nacked.
    Publish {
        /// The event type (routing key), e.g. CardAddedToLibraryEvent.
        event_type: String,
        /// The event as a JSON object, e.g. '{"aggregateId":"card-1"}'.
        json: String,
        /// Correlation id (defaults to the message id).
        #[arg(long)]
        correlation_id: Option<String>,
        /// Message id (defaults to a fresh UUID).
        #[arg(long)]
        message_id: Option<String>,
    },
    /// Show or apply the app's exchanges, queues and bindings.
    Topology {
        #[command(subcommand)]
        action: Option<TopologyAction>,
    },
    /// Start a worker, publish sample events (one undecodable, one whose
    /// handler fails once), print what happened, clean up.
    Demo,
    /// Inspect, replay and purge the app's dead letters (events_<app>.dead).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// The transactional outbox on PostgreSQL (postgres.url): run the relay,
    /// audit an aggregate's events, show the backlog, migrate, clean up.
    #[cfg(feature = "postgres")]
    Outbox {
        #[command(subcommand)]
        action: OutboxAction,
    },
    /// Probe the local /healthz endpoint (the container HEALTHCHECK); exit 0 when live.
    Healthcheck {
        /// Which endpoint: healthz (liveness) or readyz (readiness).
        #[arg(long, default_value = "healthz")]
        endpoint: String,
    },
    /// Consume until the app queue and in-flight work have been empty for
    /// --idle, then exit 0 (on-demand workers: Fly Machines, Kubernetes Jobs, KEDA ScaledJob).
    Drain {
        /// How long the queue must stay empty, e.g. 5s, 1m.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        idle: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum TopologyAction {
    /// Print what the worker declares (the default).
    Show,
    /// Declare it on the broker now.
    Apply,
    /// Compare it with the broker without changing anything; exit 5 on drift.
    Verify,
}

#[cfg(feature = "postgres")]
#[derive(Debug, Subcommand)]
enum OutboxAction {
    /// Publish committed outbox events until SIGTERM/SIGINT (serves /metrics on http.addr).
    Relay,
    /// Every outbox event of one aggregate, in order, with its publish status.
    Audit {
        /// The aggregate id, e.g. card-1.
        aggregate_id: String,
    },
    /// Pending and failing events and the age of the oldest pending one.
    Status,
    /// Apply burrow's migrations (event_outbox, event_inbox) to postgres.url.
    Migrate,
    /// Delete published events older than outbox.retention (or --older-than).
    Cleanup {
        /// Override outbox.retention, e.g. 30d, 12h.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
    },
}

#[derive(Debug, Subcommand)]
enum DlqAction {
    /// A table of dead letters: id, event, reason, handler, attempts, last error, age.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One dead letter's headers and body.
    Show {
        /// Its message id.
        id: String,
    },
    /// Send dead letters back to this app's own queue (confirmed, then removed
    /// from the dead-letter queue); only the handlers that failed run again.
    Replay {
        /// Only this event type (topic patterns allowed).
        #[arg(long)]
        event: Option<String>,
        /// Only letters this handler failed on, and rerun only it.
        #[arg(long)]
        handler: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Delete dead letters for good.
    Purge {
        /// Only letters dead-lettered longer ago than this, e.g. 7d, 12h.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
}

/// Parses the command line, runs the command and returns the exit code.
pub fn main(app: App) -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, app)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}

fn exit_code(error: &Error) -> u8 {
    match error {
        Error::Unroutable { .. } => 3,
        Error::Nacked { .. } | Error::ConfirmTimeout { .. } => 4,
        Error::Drift(_) => 5,
        Error::Usage(_) => 2,
        _ => 1,
    }
}

async fn execute(command: Command, app: App) -> Result<()> {
    let settings = Settings::load()?;
    // The worker logs per its settings; one-shot commands print their own
    // results and log only problems (the demo only errors: it narrates).
    let filter = match command {
        // `drain` is the worker too (an on-demand run): it logs like `run`.
        Command::Run | Command::Drain { .. } => settings.log.filter.clone(),
        #[cfg(feature = "postgres")]
        Command::Outbox {
            action: OutboxAction::Relay,
        } => settings.log.filter.clone(),
        Command::Demo => "error".to_owned(),
        // lapin logs a channel closed by the broker as an error, even the
        // expected NOT_FOUND of a passive declare; our own errors say more.
        _ => "warn,lapin=off".to_owned(),
    };
    init_tracing(&settings, &filter);
    match command {
        Command::Run => {
            let mut registry = Registry::new();
            (app.register)(&mut registry)?;
            let worker = Worker::new(settings.clone(), registry)?;
            // With postgres.url: wait for the database (retrying), then the
            // inbox cleanup and, with outbox.enabled, the relay run beside the worker.
            #[cfg(feature = "postgres")]
            let Some(beside) = outbox::start_beside_worker(&settings, worker.metrics()).await?
            else {
                return Ok(()); // stopped while waiting for the database
            };
            let result = run_with_http(worker, shutdown_signal()).await;
            #[cfg(feature = "postgres")]
            beside.stop().await;
            result
        }
        Command::Drain { idle } => {
            let mut registry = Registry::new();
            (app.register)(&mut registry)?;
            let worker = Worker::new(settings.clone(), registry)?;
            let stop = tokio_util::sync::CancellationToken::new();
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
                    _ = shutdown_signal() => {},
                    _ = token.cancelled() => {},
                }
            })
            .await;
            stop.cancel();
            let _ = monitor.await;
            result
        }
        Command::Healthcheck { endpoint } => {
            let addr = settings.http.addr.ok_or_else(|| {
                Error::Config(
                    "http.addr is unset, so there is no endpoint to probe; set http.addr".into(),
                )
            })?;
            let body =
                crate::http::probe(addr, &format!("/{}", endpoint.trim_start_matches('/'))).await?;
            println!("{body}");
            Ok(())
        }
        Command::Publish {
            event_type,
            json,
            correlation_id,
            message_id,
        } => {
            let body: serde_json::Value =
                serde_json::from_str(&json).map_err(|e| Error::InvalidEvent {
                    event_type: event_type.clone(),
                    reason: format!("not valid JSON ({e})"),
                })?;
            let meta = EventMeta {
                correlation_id,
                message_id,
                ..EventMeta::default()
            };
            let publisher = Publisher::connect(&settings).await?;
            let result = publisher.publish_json(&event_type, &body, meta).await;
            publisher.close().await;
            result?;
            println!(
                "published {event_type} to {} (confirmed)",
                settings.amqp.exchange
            );
            Ok(())
        }
        Command::Topology { action } => {
            let mut registry = Registry::new();
            (app.register)(&mut registry)?;
            let topology = Topology::for_app(&settings, &registry);
            match action.unwrap_or(TopologyAction::Show) {
                TopologyAction::Show => print!("{topology}"),
                TopologyAction::Apply => {
                    let conn = connection::open(&settings.amqp, "burrow topology").await?;
                    let result = topology.declare(&conn).await;
                    let _ = conn.close(200, "done".into()).await;
                    result?;
                    print!("{topology}");
                    println!("declared on {}", settings.amqp.url);
                }
                TopologyAction::Verify => {
                    let conn = connection::open(&settings.amqp, "burrow topology verify").await?;
                    let result = crate::verify::verify(&topology, &conn).await;
                    let _ = conn.close(200, "done".into()).await;
                    let drifts = result?;
                    println!(
                        "(bindings are not visible over AMQP; compare them with `rabbitmqctl list_bindings`)"
                    );
                    if !drifts.is_empty() {
                        for drift in &drifts {
                            println!("drift: {drift}");
                        }
                        return Err(Error::Drift(drifts.len()));
                    }
                    println!(
                        "exchange and {} queues match the broker",
                        topology.queues.len()
                    );
                }
            }
            Ok(())
        }
        Command::Dlq { action } => dlq_command(&settings, action).await,
        #[cfg(feature = "postgres")]
        Command::Outbox { action } => outbox::command(&settings, action).await,
        Command::Demo => {
            crate::demo::run(settings, app.register, (app.samples)()).await?;
            Ok(())
        }
    }
}

/// `burrow outbox ...`, and the database work inside `burrow run`.
#[cfg(feature = "postgres")]
mod outbox {
    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use super::{OutboxAction, shutdown_signal};
    use crate::{Error, Metrics, Publisher, Result, Settings, WorkerState, inbox::Inbox, outbox};

    /// Connects to postgres.url once and, with `migrate`, applies the
    /// migrations: the one-shot commands report a failure instead of waiting.
    async fn database(settings: &Settings, migrate: bool) -> Result<sqlx::PgPool> {
        let pool = outbox::connect(&settings.postgres).await?;
        if migrate {
            outbox::prepare(&pool, &settings.postgres).await?;
        }
        Ok(pool)
    }

    /// `/healthz`, `/readyz` and `/metrics` on http.addr, answering from `state`.
    struct Endpoint {
        stop: CancellationToken,
        task: tokio::task::JoinHandle<Result<()>>,
    }

    impl Endpoint {
        async fn start(
            settings: &Settings,
            metrics: Metrics,
            state: watch::Receiver<WorkerState>,
        ) -> Result<Option<Self>> {
            let Some(addr) = settings.http.addr else {
                return Ok(None);
            };
            let router =
                crate::http::router(metrics, state, settings.publisher.confirm_timeout * 2);
            let listener = crate::http::bind(addr).await?;
            let stop = CancellationToken::new();
            let task = tokio::spawn(crate::http::serve(listener, router, {
                let stop = stop.clone();
                async move { stop.cancelled().await }
            }));
            Ok(Some(Self { stop, task }))
        }

        /// Stops serving; the port is free when this returns.
        async fn stop(self) {
            self.stop.cancel();
            if let Ok(Err(e)) = self.task.await {
                tracing::warn!(error = %e, "http endpoint stopped with an error");
            }
        }
    }

    /// What runs beside the worker in `burrow run` when postgres.url is set:
    /// the inbox retention cleanup and, with outbox.enabled, the relay.
    pub(super) struct BesideWorker {
        stop: CancellationToken,
        tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
        publisher: Option<Publisher>,
    }

    impl BesideWorker {
        /// Lets the batch in progress finish, then closes the publisher.
        pub(super) async fn stop(self) {
            self.stop.cancel();
            for task in self.tasks {
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "outbox relay stopped with an error"),
                    Err(e) => tracing::warn!(error = %e, "outbox task failed"),
                }
            }
            if let Some(publisher) = self.publisher {
                publisher.close().await;
            }
        }
    }

    /// With postgres.url set: wait for the database, retrying transient
    /// failures (with `/readyz` answering "starting" meanwhile), and migrate
    /// (postgres.migrate) before the worker consumes, so handlers find the
    /// inbox; then run the inbox retention cleanup and, with outbox.enabled,
    /// the relay, recording into the worker's metrics. `None` when a
    /// shutdown signal arrived while waiting.
    pub(super) async fn start_beside_worker(
        settings: &Settings,
        metrics: &Metrics,
    ) -> Result<Option<BesideWorker>> {
        let stop = CancellationToken::new();
        let mut beside = BesideWorker {
            stop: stop.clone(),
            tasks: Vec::new(),
            publisher: None,
        };
        if settings.postgres.url.is_none() {
            return Ok(Some(beside));
        }
        let (_starting, state) = watch::channel(WorkerState::Starting);
        let endpoint = Endpoint::start(settings, metrics.clone(), state).await?;
        let pool = outbox::connect_with_retry(
            &settings.postgres,
            settings.postgres.migrate,
            shutdown_signal(),
        )
        .await;
        if let Some(endpoint) = endpoint {
            endpoint.stop().await;
        }
        let Some(pool) = pool? else {
            return Ok(None);
        };
        let inbox = Inbox::new(pool.clone());
        let (retention, interval) = (settings.inbox.retention, settings.inbox.cleanup_interval);
        let until = stop.clone().cancelled_owned();
        beside.tasks.push(tokio::spawn(async move {
            inbox.run_cleanup(retention, interval, until).await;
            Ok(())
        }));
        if settings.outbox.enabled {
            let publisher = Publisher::new(settings, metrics.clone())?;
            let relay = outbox::Relay::new(pool, publisher.clone(), settings);
            let until = stop.cancelled_owned();
            beside
                .tasks
                .push(tokio::spawn(async move { relay.run(until).await }));
            beside.publisher = Some(publisher);
        }
        Ok(Some(beside))
    }

    pub(super) async fn command(settings: &Settings, action: OutboxAction) -> Result<()> {
        match action {
            OutboxAction::Relay => {
                // No consumer here: ready once a batch reached the database.
                let (state_tx, state) = watch::channel(WorkerState::Starting);
                let metrics = Metrics::new();
                let endpoint = Endpoint::start(settings, metrics.clone(), state).await?;
                let shutdown = shutdown_signal();
                tokio::pin!(shutdown);
                let result = async {
                    let Some(pool) = outbox::connect_with_retry(
                        &settings.postgres,
                        settings.postgres.migrate,
                        &mut shutdown,
                    )
                    .await?
                    else {
                        return Ok(()); // stopped while waiting for the database
                    };
                    let publisher = Publisher::new(settings, metrics.clone())?;
                    let relay = outbox::Relay::new(pool, publisher.clone(), settings);
                    let mut healthy = relay.healthy();
                    let readiness = tokio::spawn(async move {
                        while healthy.changed().await.is_ok() {
                            let ready = *healthy.borrow_and_update();
                            state_tx.send_replace(if ready {
                                WorkerState::Consuming
                            } else {
                                WorkerState::Reconnecting
                            });
                        }
                    });
                    let result = relay.run(&mut shutdown).await;
                    readiness.abort();
                    publisher.close().await;
                    result
                }
                .await;
                if let Some(endpoint) = endpoint {
                    endpoint.stop().await;
                }
                result
            }
            OutboxAction::Audit { aggregate_id } => {
                let pool = database(settings, false).await?;
                let records = outbox::audit(&pool, &aggregate_id).await?;
                if records.is_empty() {
                    return Err(Error::NotFound(format!(
                        "no outbox events for aggregate {aggregate_id:?}; published events older than outbox.retention ({}) are deleted",
                        humantime::format_duration(settings.outbox.retention)
                    )));
                }
                println!(
                    "{} outbox events of aggregate {aggregate_id}",
                    records.len()
                );
                print!("{}", outbox::render_audit(&records));
                Ok(())
            }
            OutboxAction::Status => {
                let pool = database(settings, false).await?;
                let backlog = outbox::backlog(&pool).await?;
                println!(
                    "pending {}, failing {}, oldest pending {}",
                    backlog.pending,
                    backlog.failing,
                    backlog.oldest.map_or("-".to_owned(), |d| {
                        humantime::format_duration(std::time::Duration::from_millis(
                            d.as_millis() as u64
                        ))
                        .to_string()
                    })
                );
                Ok(())
            }
            OutboxAction::Migrate => {
                database(settings, true).await?;
                println!(
                    "burrow's migrations are applied to {}",
                    settings
                        .postgres
                        .url
                        .as_ref()
                        .map(|u| u.to_string())
                        .unwrap_or_default()
                );
                Ok(())
            }
            OutboxAction::Cleanup { older_than } => {
                let older_than = older_than.unwrap_or(settings.outbox.retention);
                if older_than.is_zero() {
                    return Err(Error::Usage(
                        "outbox.retention is 0s (keep forever); pass --older-than, e.g. --older-than 30d".into(),
                    ));
                }
                let pool = database(settings, false).await?;
                let deleted = outbox::cleanup(&pool, older_than).await?;
                println!(
                    "deleted {deleted} published outbox events older than {}",
                    humantime::format_duration(older_than)
                );
                Ok(())
            }
        }
    }
}

async fn dlq_command(settings: &Settings, action: DlqAction) -> Result<()> {
    use crate::dlq;
    let queue = settings.dead_letter_queue();
    match action {
        DlqAction::List { limit } => {
            let total = dlq::count(settings).await?;
            let letters = dlq::list(settings, limit).await?;
            println!("{} of {total} dead letters in {queue}", letters.len());
            print!("{}", dlq::render_table(&letters));
            Ok(())
        }
        DlqAction::Show { id } => match dlq::show(settings, &id).await? {
            Some(letter) => {
                print!("{}", dlq::render_detail(&letter));
                Ok(())
            }
            None => Err(Error::NotFound(format!(
                "no dead letter with message id {id:?} in {queue}; `burrow dlq list` shows the ids"
            ))),
        },
        DlqAction::Replay {
            event,
            handler,
            limit,
        } => {
            let publisher = Publisher::connect(settings).await?;
            let filter = dlq::ReplayFilter {
                event,
                handler,
                limit,
            };
            let result = dlq::replay(settings, &publisher, &filter).await;
            publisher.close().await;
            let report = result?;
            println!(
                "replayed {} into {} (confirmed), left {} in {queue}",
                report.replayed,
                settings.app_queue(),
                report.skipped
            );
            Ok(())
        }
        DlqAction::Purge { older_than, yes } => {
            if !yes {
                let total = dlq::count(settings).await?;
                return Err(Error::Usage(format!(
                    "purging deletes dead letters for good ({total} in {queue}); add --yes to confirm"
                )));
            }
            let purged = dlq::purge(settings, older_than).await?;
            println!("purged {purged} dead letters from {queue}");
            Ok(())
        }
    }
}

/// Runs the worker with its HTTP endpoint (when `http.addr` is set) until
/// `shutdown`; readiness turns 503 as soon as draining starts, and the
/// endpoint stays up until the worker has stopped.
async fn run_with_http(
    worker: Worker,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let settings = worker.settings().clone();
    let http_stop = tokio_util::sync::CancellationToken::new();
    let server = match settings.http.addr {
        Some(addr) => {
            let stall_after =
                settings.consumer.handler_timeout + settings.publisher.confirm_timeout * 2;
            let router = crate::http::router(worker.metrics().clone(), worker.state(), stall_after);
            // Bind before consuming so a taken port fails fast.
            let listener = crate::http::bind(addr).await?;
            let stop = http_stop.clone();
            Some(tokio::spawn(crate::http::serve(
                listener,
                router,
                async move { stop.cancelled().await },
            )))
        }
        None => None,
    };
    let result = worker.run(shutdown).await;
    http_stop.cancel();
    if let Some(server) = server
        && let Ok(Err(e)) = server.await
    {
        tracing::warn!(error = %e, "http endpoint stopped with an error");
    }
    let report = result?;
    if report.abandoned > 0 {
        return Err(Error::ConsumerStopped {
            queue: settings.app_queue(),
            reason: format!(
                "{} handler(s) were still running at the shutdown deadline; their messages were not acked and will be redelivered",
                report.abandoned
            ),
        });
    }
    Ok(())
}

/// Cancels `stop` once the worker consumes, nothing is in flight and the
/// app queue has held no ready message for `idle`. Messages waiting in retry
/// steps come back later and start the next on-demand run.
async fn idle_monitor(
    settings: Settings,
    metrics: crate::Metrics,
    state: tokio::sync::watch::Receiver<crate::WorkerState>,
    idle: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut conn = None;
    let mut idle_since: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let consuming = *state.borrow() == crate::WorkerState::Consuming;
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

fn init_tracing(settings: &Settings, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Completes on SIGINT or SIGTERM (what Kubernetes, Fly.io and compose send).
pub async fn shutdown_signal() {
    {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {},
                        _ = term.recv() => {},
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown signal received");
    }
}
