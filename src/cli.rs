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
}

#[derive(Debug, Subcommand)]
enum TopologyAction {
    /// Print what the worker declares (the default).
    Show,
    /// Declare it on the broker now.
    Apply,
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
        _ => 1,
    }
}

async fn execute(command: Command, app: App) -> Result<()> {
    let settings = Settings::load()?;
    // The worker logs per its settings; one-shot commands print their own
    // results and log only problems (the demo only errors: it narrates).
    let filter = match command {
        Command::Run => settings.log.filter.clone(),
        Command::Demo => "error".to_owned(),
        _ => "warn".to_owned(),
    };
    init_tracing(&settings, &filter);
    match command {
        Command::Run => {
            let mut registry = Registry::new();
            (app.register)(&mut registry)?;
            let worker = Worker::new(settings, registry)?;
            let report = worker.run(shutdown_signal()).await?;
            if report.abandoned > 0 {
                return Err(Error::ConsumerStopped {
                    queue: String::new(),
                    reason: format!(
                        "{} handler(s) were still running at the shutdown deadline; their messages were not acked and will be redelivered",
                        report.abandoned
                    ),
                });
            }
            Ok(())
        }
        Command::Publish {
            event_type,
            json,
            correlation_id,
            message_id,
        } => {
            let body: serde_json::Value =
                serde_json::from_str(&json).map_err(|source| Error::Serialize {
                    event_type: event_type.clone(),
                    source,
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
                    let conn = connection::connect(
                        &settings.amqp.url,
                        settings.amqp.heartbeat,
                        "burrow topology",
                    )
                    .await?;
                    let result = topology.declare(&conn).await;
                    let _ = conn.close(200, "done".into()).await;
                    result?;
                    print!("{topology}");
                    println!("declared on {}", settings.amqp.url);
                }
            }
            Ok(())
        }
        Command::Demo => {
            crate::demo::run(settings, app.register, (app.samples)()).await?;
            Ok(())
        }
    }
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
