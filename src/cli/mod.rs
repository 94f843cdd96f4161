//! The `burrow` command line. A binary passes in its handler modules and
//! calls [`main`]; every command lives here, one file per command group, so
//! it can be tested and reused by programs that embed burrow.
//!
//! | file | commands |
//! |---|---|
//! | `run.rs` | `run`, `drain` (the worker with its HTTP endpoint) |
//! | `publish.rs` | `publish`, `healthcheck` |
//! | `topology.rs` | `topology show|apply|verify` |
//! | `dlq.rs` | `dlq list|show|export|replay|purge` |
//! | `outbox.rs` | `outbox relay|audit|status|migrate|cleanup` (feature `postgres`) |
//! | `demo.rs` | `demo` |
//! | `doctor.rs` | `doctor` |
//! | `asyncapi.rs` | `asyncapi` |
//! | `output.rs` | text or JSON on stdout, redacted; a closed pipe ends quietly |
//!
//! Exit codes are [`ExitStatus`]: one table, printed by `burrow --help` and
//! in the README.

mod asyncapi;
mod console;
mod demo;
mod dlq;
mod doctor;
#[cfg(feature = "postgres")]
mod outbox;
mod output;
mod publish;
mod run;
mod topology;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

pub use self::output::Format;
use self::output::Out;
use crate::{Error, Registry, Result, Settings, config::LogFormat};

/// A handler module's `register` function: adds its handlers, built with
/// what [`ModuleContext`] provides.
pub type Register = fn(&mut Registry, &ModuleContext) -> Result<()>;

/// Sample events for `burrow demo`: `(event type, JSON body)`.
pub type Samples = fn() -> Vec<(&'static str, serde_json::Value)>;

/// What a handler module is given when it registers: the settings, and the
/// PostgreSQL pool when `postgres.url` is set. Registering does no I/O (the
/// pool connects on first use).
#[derive(Debug)]
pub struct ModuleContext {
    settings: Settings,
    #[cfg(feature = "postgres")]
    postgres: Option<sqlx::PgPool>,
}

impl ModuleContext {
    /// The context for `settings`: with the `postgres` feature and
    /// `postgres.url` set, a pool that connects on first use.
    pub fn new(settings: &Settings) -> Result<Self> {
        Ok(Self {
            settings: settings.clone(),
            #[cfg(feature = "postgres")]
            postgres: match settings.postgres.url {
                Some(_) => Some(crate::outbox::connect_lazy(&settings.postgres)?),
                None => None,
            },
        })
    }

    /// The app's settings, as loaded (for the app the module registers into).
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The app's database (`postgres.url`), if one is configured.
    #[cfg(feature = "postgres")]
    pub fn postgres(&self) -> Option<&sqlx::PgPool> {
        self.postgres.as_ref()
    }
}

/// The modules of one app.
#[derive(Debug, Clone)]
struct AppModules {
    /// `None`: `app.name` from the settings.
    name: Option<String>,
    modules: Vec<Register>,
}

/// A program's command line: the `burrow` commands over the program's own
/// handler modules, for one app or several in one process.
///
/// ```no_run
/// # mod feeds { pub fn register(_: &mut burrow::Registry, _: &burrow::cli::ModuleContext) -> burrow::Result<()> { Ok(()) } }
/// # mod search { pub fn register(_: &mut burrow::Registry, _: &burrow::cli::ModuleContext) -> burrow::Result<()> { Ok(()) } }
/// fn main() -> std::process::ExitCode {
///     burrow::cli::App::new()
///         .module(feeds::register)         // the app named by app.name
///         .app("search", &[search::register]) // a second app in this process
///         .run()
/// }
/// ```
///
/// `burrow run` then runs one worker per app (one HTTP endpoint, their
/// metrics together, ready when every worker consumes); the other commands
/// act for the app `--app` names, the first one by default.
#[derive(Debug, Clone, Default)]
pub struct App {
    apps: Vec<AppModules>,
    samples: Option<Samples>,
}

impl App {
    /// No modules yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a handler module to the app named by `app.name`.
    pub fn module(mut self, register: Register) -> Self {
        match self.apps.iter_mut().find(|a| a.name.is_none()) {
            Some(app) => app.modules.push(register),
            None => self.apps.insert(
                0,
                AppModules {
                    name: None,
                    modules: vec![register],
                },
            ),
        }
        self
    }

    /// Adds handler modules to the app named by `app.name`.
    pub fn modules(self, registers: &[Register]) -> Self {
        registers.iter().fold(self, |app, r| app.module(*r))
    }

    /// Adds an app of its own name (its own queue, `events_<name>`) with
    /// these modules, run in the same process.
    pub fn app(mut self, name: &str, modules: &[Register]) -> Self {
        self.apps.push(AppModules {
            name: Some(name.to_owned()),
            modules: modules.to_vec(),
        });
        self
    }

    /// The sample events `burrow demo` publishes.
    pub fn samples(mut self, samples: Samples) -> Self {
        self.samples = Some(samples);
        self
    }

    /// Parses the command line, runs the command and returns the exit code.
    pub fn run(self) -> ExitCode {
        main(self)
    }

    /// The settings and registry of every app, for `settings`.
    fn resolve(&self, settings: &Settings) -> Result<Vec<(Settings, Registry)>> {
        let several = self.apps.len() > 1;
        self.apps
            .iter()
            .map(|app| {
                let mut settings = settings.clone();
                if let Some(name) = &app.name {
                    settings.app.name = name.clone();
                }
                if several {
                    // Each app has its own queue, named for it.
                    settings.queue.name = None;
                }
                settings.validate()?;
                let context = ModuleContext::new(&settings)?;
                let mut registry = Registry::new();
                for register in &app.modules {
                    register(&mut registry, &context)?;
                }
                Ok((settings, registry))
            })
            .collect()
    }
}

/// How a command ended, as the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// The command did what it was asked.
    Ok,
    /// An error (printed on stderr), e.g. the broker cannot be reached.
    Failure,
    /// The command line or an argument is wrong; nothing was done.
    Usage,
    /// `publish`: no queue is bound for the event type (unroutable).
    Unroutable,
    /// `publish`: the broker nacked the event or did not confirm it in time.
    NotConfirmed,
    /// `topology verify`: the broker differs from the declared topology.
    Drift,
    /// A filter or id selected nothing (`dlq show|replay|purge|export`,
    /// `outbox audit`).
    NothingMatched,
    /// `doctor`: a check failed (a promise is broken until it is fixed).
    DoctorFailed,
}

impl ExitStatus {
    /// Every status, in code order.
    pub const ALL: [ExitStatus; 8] = [
        ExitStatus::Ok,
        ExitStatus::Failure,
        ExitStatus::Usage,
        ExitStatus::Unroutable,
        ExitStatus::NotConfirmed,
        ExitStatus::Drift,
        ExitStatus::NothingMatched,
        ExitStatus::DoctorFailed,
    ];

    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Ok => 0,
            ExitStatus::Failure => 1,
            ExitStatus::Usage => 2,
            ExitStatus::Unroutable => 3,
            ExitStatus::NotConfirmed => 4,
            ExitStatus::Drift => 5,
            ExitStatus::NothingMatched => 6,
            ExitStatus::DoctorFailed => 7,
        }
    }

    /// What the code means, one line.
    pub fn meaning(self) -> &'static str {
        match self {
            ExitStatus::Ok => "success",
            ExitStatus::Failure => {
                "an error, printed on stderr (broker unreachable, bad configuration, ...)"
            }
            ExitStatus::Usage => {
                "a usage error: a wrong argument or a refused request; nothing was done"
            }
            ExitStatus::Unroutable => "publish: unroutable, no queue is bound for the event type",
            ExitStatus::NotConfirmed => "publish: nacked by the broker or not confirmed in time",
            ExitStatus::Drift => "topology verify: the broker differs from the declared topology",
            ExitStatus::NothingMatched => {
                "nothing matched: no dead letter with that id or filter, no outbox event of that aggregate"
            }
            ExitStatus::DoctorFailed => "doctor: a check failed; each failure names its fix",
        }
    }

    /// The exit-code table, as `burrow --help` and the README print it.
    pub fn table() -> String {
        let mut out = String::from("Exit codes:\n");
        for status in Self::ALL {
            out.push_str(&format!("  {}  {}\n", status.code(), status.meaning()));
        }
        out
    }
}

/// Why a command failed: a library error, or a verdict only the command
/// line gives.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// What the library reported.
    #[error(transparent)]
    Burrow(#[from] Error),
    /// A refused invocation (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Nothing matched (exit 6).
    #[error("{0}")]
    NothingMatched(String),
    /// `topology verify` found differences (exit 5), printed before.
    #[error(
        "{0} difference(s) between the declared topology and the broker; run `burrow topology apply` or migrate (docs/operations.md)"
    )]
    Drift(usize),
    /// `doctor` found failures (exit 7), printed before.
    #[error("{0} doctor check(s) failed; each names its fix above")]
    DoctorFailed(usize),
    /// Whoever reads our output went away (`burrow dlq list | head -1`):
    /// not an error, nothing more to say.
    #[error("stdout closed")]
    ClosedPipe,
    /// Writing the output failed otherwise.
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

impl CliError {
    fn status(&self) -> ExitStatus {
        match self {
            CliError::Burrow(e) => match e {
                Error::Unroutable { .. } => ExitStatus::Unroutable,
                Error::Nacked { .. } | Error::ConfirmTimeout { .. } => ExitStatus::NotConfirmed,
                Error::InvalidEvent { .. } => ExitStatus::Usage,
                _ => ExitStatus::Failure,
            },
            CliError::Usage(_) => ExitStatus::Usage,
            CliError::NothingMatched(_) => ExitStatus::NothingMatched,
            CliError::Drift(_) => ExitStatus::Drift,
            CliError::DoctorFailed(_) => ExitStatus::DoctorFailed,
            CliError::ClosedPipe => ExitStatus::Ok,
            CliError::Output(_) => ExitStatus::Failure,
        }
    }
}

type CliResult<T = ()> = std::result::Result<T, CliError>;

#[derive(Debug, Parser)]
#[command(
    name = "burrow",
    version,
    about = "Guaranteed-delivery domain events on RabbitMQ",
    long_about = "Guaranteed-delivery domain events on RabbitMQ.\n\n\
        Settings come from config/default.toml, config/$APP_ENV.toml and BURROW__SECTION__KEY \
        environment variables (e.g. BURROW__AMQP__URL).",
    after_help = ExitStatus::table()
)]
struct Cli {
    /// Output format of the command's results on stdout.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Text)]
    output: Format,
    /// The app to act for (overrides app.name).
    #[arg(long, global = true)]
    app: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the worker: declare the topology, consume, settle; stop on SIGTERM/SIGINT.
    Run,
    /// Publish one event with confirms; exits 3 if unroutable, 4 if not confirmed.
    Publish(publish::PublishArgs),
    /// Print the app's AsyncAPI 3.0 document (YAML; JSON with --output json):
    /// its event types, their payload schemas, headers and properties.
    Asyncapi,
    /// Show, apply or verify the app's exchanges, queues and bindings.
    Topology {
        #[command(subcommand)]
        action: Option<topology::TopologyAction>,
    },
    /// Start a worker on an exchange and queues of its own, publish sample
    /// events (one undecodable, one whose handler fails once), print what
    /// happened, delete them.
    Demo,
    /// Serve the operator console (queues, dead letters, replay, purge) for
    /// the app, without a worker; `burrow run` serves it at /console too.
    Console {
        /// Where to listen; a non-loopback address needs http.console_token.
        #[arg(long, default_value = "127.0.0.1:9091")]
        addr: std::net::SocketAddr,
    },
    /// Inspect, export, replay and purge the app's dead letters (events_<app>.dead).
    Dlq {
        #[command(subcommand)]
        action: dlq::DlqAction,
    },
    /// The transactional outbox on PostgreSQL (postgres.url): run the relay,
    /// audit an aggregate's events, show the backlog, migrate, clean up.
    #[cfg(feature = "postgres")]
    Outbox {
        #[command(subcommand)]
        action: outbox::OutboxAction,
    },
    /// Probe the local HTTP endpoint (the container HEALTHCHECK); exit 0 when it answers 200.
    Healthcheck {
        /// Which endpoint.
        #[arg(long, value_enum, default_value_t = Endpoint::Healthz)]
        endpoint: Endpoint,
    },
    /// Check the broker and settings against what burrow relies on (version,
    /// feature flags, topology and bindings, delivery limit, ack timeout,
    /// frame and message sizes); exit 7 if a check fails.
    Doctor,
    /// Consume until the app queue and in-flight work have been empty for
    /// --idle, then exit 0 (on-demand workers: Fly Machines, Kubernetes Jobs, KEDA ScaledJob).
    Drain {
        /// How long the queue must stay empty, e.g. 5s, 1m.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        idle: std::time::Duration,
    },
}

/// The endpoints `burrow healthcheck` probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Endpoint {
    /// Liveness: the worker is running (also while reconnecting).
    Healthz,
    /// Readiness: the worker consumes.
    Readyz,
}

/// Parses the command line, runs the command and returns the exit code.
pub fn main(app: App) -> ExitCode {
    if app.apps.is_empty() {
        eprintln!(
            "error: no handler module is registered; add modules with burrow::cli::App::module"
        );
        return ExitCode::from(ExitStatus::Usage.code());
    }
    crate::redact::install_panic_hook();
    let cli = Cli::parse();
    let out = Out::new(cli.output);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let status = match runtime.block_on(execute(cli, app, &out)) {
        Ok(()) => ExitStatus::Ok,
        Err(CliError::ClosedPipe) => ExitStatus::Ok,
        Err(e) => {
            out.error(&e.to_string());
            e.status()
        }
    };
    // Handlers still running after a drain timeout must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    ExitCode::from(status.code())
}

async fn execute(cli: Cli, app: App, out: &Out) -> CliResult {
    let loaded = Settings::load()?;
    let mut apps = app.resolve(&loaded)?;
    // The app a one-shot command acts for: --app, else the first one.
    let chosen = match &cli.app {
        Some(name) => apps.iter().position(|(s, _)| s.app.name == *name),
        None => Some(0),
    };
    let (mut settings, registry) = match chosen {
        Some(i) => apps[i].clone(),
        // An app this program has no modules for: its dead letters and
        // queues can still be looked after.
        None => {
            let mut settings = loaded.clone();
            settings.app.name = cli.app.clone().unwrap_or_default();
            settings.validate()?;
            (settings, Registry::new())
        }
    };
    if let Some(name) = &cli.app {
        settings.app.name = name.clone();
    }
    let command = cli.command;
    // The worker logs per its settings; one-shot commands print their own
    // results and log only problems (the demo only errors: it narrates).
    let filter = match command {
        // `drain` is the worker too (an on-demand run): it logs like `run`.
        Command::Run | Command::Drain { .. } => settings.log.filter.clone(),
        #[cfg(feature = "postgres")]
        Command::Outbox {
            action: outbox::OutboxAction::Relay,
        } => settings.log.filter.clone(),
        Command::Demo => "error,lapin=off".to_owned(),
        // The console's audit lines are its record of who did what.
        Command::Console { .. } => "warn,burrow::console=info,lapin=off".to_owned(),
        // lapin logs a channel closed by the broker as an error, even the
        // expected NOT_FOUND of a passive declare; our own errors say more.
        _ => "warn,lapin=off".to_owned(),
    };
    init_tracing(&settings, &filter);
    match command {
        Command::Run => {
            if cli.app.is_some() {
                apps.retain(|(s, _)| s.app.name == settings.app.name);
            }
            run::run(apps).await
        }
        Command::Drain { idle } => run::drain(settings, registry, idle).await,
        Command::Healthcheck { endpoint } => {
            let addr = settings.http.addr.ok_or_else(|| {
                Error::config(
                    "http.addr",
                    "http.addr is unset, so there is no endpoint to probe; set http.addr \
                     (BURROW__HTTP__ADDR=127.0.0.1:9090)",
                )
            })?;
            let path = match endpoint {
                Endpoint::Healthz => "/healthz",
                Endpoint::Readyz => "/readyz",
            };
            let body = crate::http::probe(addr, path).await?;
            out.line(body.trim_end())
        }
        Command::Publish(args) => publish::publish(&settings, args, out).await,
        Command::Topology { action } => topology::command(&settings, &registry, action, out).await,
        Command::Asyncapi => asyncapi::command(&settings, &registry, out),
        Command::Dlq { action } => dlq::command(&settings, action, out).await,
        Command::Console { addr } => console::command(&settings, addr, out).await,
        Command::Doctor => doctor::command(&settings, &registry, out).await,
        #[cfg(feature = "postgres")]
        Command::Outbox { action } => outbox::command(&settings, action, out).await,
        Command::Demo => {
            let samples = app.samples.map(|f| f()).unwrap_or_default();
            demo::run(settings, registry, samples, out).await
        }
    }
}

/// Logs to stderr, redacted, in the configured format; colours only on a
/// terminal (and never with `NO_COLOR` set).
fn init_tracing(settings: &Settings, default_filter: &str) {
    use std::io::IsTerminal;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(crate::redact::Redacting::new(std::io::stderr));
    let _ = match settings.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn every_library_error_has_an_exit_status() {
        let unroutable = CliError::Burrow(Error::Unroutable {
            exchange: "x".into(),
            routing_key: "k".into(),
            reply: "NO_ROUTE".into(),
        });
        assert_eq!(unroutable.status().code(), 3);
        assert_eq!(CliError::Drift(2).status().code(), 5);
        assert_eq!(CliError::NothingMatched(String::new()).status().code(), 6);
        assert_eq!(CliError::DoctorFailed(1).status().code(), 7);
        assert_eq!(CliError::ClosedPipe.status().code(), 0);
        let codes: Vec<u8> = ExitStatus::ALL.iter().map(|s| s.code()).collect();
        assert_eq!(codes, (0..8).collect::<Vec<u8>>());
    }

    /// README's table of exit codes is this table.
    #[test]
    fn the_readme_states_the_same_exit_codes() {
        let readme = include_str!("../../README.md");
        for status in ExitStatus::ALL {
            let row = format!("| {} | {} |", status.code(), status.meaning());
            assert!(
                readme.contains(&row),
                "README.md lacks the exit-code row {row:?}"
            );
        }
    }
}
