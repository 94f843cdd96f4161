//! The worker under test, as a child process the scenarios can SIGKILL.
//!
//! The test binary re-executes itself (`current_exe()`) running only the
//! ignored test `fault_worker_child`, which finds its [`WorkerConfig`] as JSON
//! in `FAULTS_WORKER` and runs a real [`burrow::Worker`] until SIGTERM (the
//! graceful stop of `burrow run`). Its one handler does what the
//! event's [`Behaviour`] says and appends each execution to the ledger.
//!
//! The child's stdin is a pipe from the test: when the test process dies
//! without cleaning up, the pipe closes and the child exits, so no worker
//! outlives its scenario.

use std::{
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use burrow::{
    Context, DomainEvent, Event, HandlerError, Registry, Settings, Worker, WorkerState,
    config::{AmqpUrl, QueueType},
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ledger::{Ledger, LedgerWriter};

/// The variable that carries the child's configuration.
pub const CHILD_ENV: &str = "FAULTS_WORKER";

/// The handler's name (a contract: it is in retry and dead-letter headers).
pub const HANDLER: &str = "faults.record";

/// What the handler does with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Succeeds.
    Ok,
    /// Fails transiently on attempt 1, then succeeds.
    FailOnce,
    /// Fails permanently: dead-lettered with reason `permanent`.
    Permanent,
    /// Panics on attempt 1, then succeeds.
    PanicOnce,
    /// Panics on every attempt: dead-lettered with `attempts_exhausted`.
    PanicAlways,
    /// Hangs past the handler timeout on attempt 1, then succeeds.
    HangOnce,
    /// Hangs on every attempt: dead-lettered with `attempts_exhausted`.
    HangAlways,
}

impl Behaviour {
    /// The `burrow-dead-reason` the message must end with, or `None` when it
    /// must end handled.
    pub fn dead_reason(self) -> Option<&'static str> {
        match self {
            Behaviour::Ok | Behaviour::FailOnce | Behaviour::PanicOnce | Behaviour::HangOnce => {
                None
            }
            Behaviour::Permanent => Some("permanent"),
            Behaviour::PanicAlways | Behaviour::HangAlways => Some("attempts_exhausted"),
        }
    }
}

/// The event every scenario publishes; its id is the message id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultEvent {
    pub aggregate_id: String,
    pub seq: u64,
    pub behaviour: Behaviour,
    pub occurred_at: DateTime<Utc>,
}

impl Event for FaultEvent {
    const EVENT_TYPE: &'static str = "FaultInjectionEvent";
}

impl DomainEvent for FaultEvent {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        self.occurred_at
    }
}

/// Everything the child needs, passed as JSON in [`CHILD_ENV`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    pub url: String,
    pub app: String,
    pub exchange: String,
    pub ledger: PathBuf,
    pub delays_ms: Vec<u64>,
    pub handler_timeout_ms: u64,
    pub shutdown_timeout_ms: u64,
    pub heartbeat: u16,
    pub prefetch: u16,
    pub concurrency: usize,
    /// Simulated work per execution, to keep a backlog in the queue.
    pub work_ms: u64,
}

impl WorkerConfig {
    /// A unique app on its own exchange at `url`, quick ladder, 30 s heartbeat.
    pub fn new(prefix: &str, url: &str, ledger: &Path) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            url: url.to_owned(),
            app: format!("faults-{prefix}-{}", &id[..12]),
            exchange: format!("faults-ex-{prefix}-{}", &id[..12]),
            ledger: ledger.to_owned(),
            delays_ms: vec![300, 600],
            handler_timeout_ms: 5_000,
            shutdown_timeout_ms: 20_000,
            heartbeat: 30,
            prefetch: 64,
            concurrency: 16,
            work_ms: 0,
        }
    }

    /// The worker's settings (the publisher in the test uses them too).
    pub fn settings(&self) -> Settings {
        let mut s = Settings::default();
        s.app.name = self.app.clone();
        s.amqp.url = AmqpUrl::new(&self.url);
        s.amqp.exchange = self.exchange.clone();
        s.amqp.heartbeat = self.heartbeat;
        s.queue.kind = QueueType::Quorum;
        s.retry.delays = self
            .delays_ms
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        s.consumer.handler_timeout = Duration::from_millis(self.handler_timeout_ms);
        s.consumer.shutdown_timeout = Duration::from_millis(self.shutdown_timeout_ms);
        s.consumer.prefetch = self.prefetch;
        s.consumer.concurrency = self.concurrency;
        s.http.addr = None;
        s.validate().expect("fault worker settings are valid");
        s
    }
}

/// The registry of the worker: one handler recording into `ledger`. The
/// test builds it with `None` only to compute the topology.
pub fn registry(ledger: Option<LedgerWriter>, work: Duration) -> Registry {
    let mut registry = Registry::new();
    registry
        .on(HANDLER, move |event: FaultEvent, ctx: Context| {
            let ledger = ledger.clone();
            async move {
                let ledger = ledger.expect("the worker child records into a ledger");
                if !work.is_zero() {
                    tokio::time::sleep(work).await;
                }
                let first = ctx.attempt <= 1;
                let record = |outcome: &str| ledger.record(&ctx.message_id, ctx.attempt, outcome);
                match event.behaviour {
                    Behaviour::Permanent => {
                        record("fail");
                        Err(HandlerError::permanent(
                            "fault injection: permanent failure",
                        ))
                    }
                    Behaviour::FailOnce if first => {
                        record("fail");
                        Err(HandlerError::transient(
                            "fault injection: transient failure",
                        ))
                    }
                    Behaviour::PanicAlways => {
                        record("panic");
                        panic!("fault injection: the handler panics")
                    }
                    Behaviour::PanicOnce if first => {
                        record("panic");
                        panic!("fault injection: the handler panics once")
                    }
                    Behaviour::HangAlways => {
                        record("hang");
                        std::future::pending().await
                    }
                    Behaviour::HangOnce if first => {
                        record("hang");
                        std::future::pending().await
                    }
                    Behaviour::Ok
                    | Behaviour::FailOnce
                    | Behaviour::PanicOnce
                    | Behaviour::HangOnce => {
                        record("ok");
                        Ok(())
                    }
                }
            }
        })
        .expect("register the fault handler");
    registry
}

/// The body of `fault_worker_child`: runs the worker until SIGTERM.
pub fn child_main(config_json: &str) {
    let config: WorkerConfig = serde_json::from_str(config_json).expect("FAULTS_WORKER is JSON");
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info,lapin=warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    // The lifeline: the test holds our stdin; EOF means it is gone.
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        eprintln!("fault worker: the test process is gone; exiting");
        std::process::exit(3);
    });
    let ledger = LedgerWriter::open(&config.ledger).expect("open the ledger");
    let registry = registry(Some(ledger.clone()), Duration::from_millis(config.work_ms));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = runtime.block_on(async {
        // Registered before anything else, so that a SIGTERM is always a
        // graceful stop here (`burrow run` registers it once it consumes).
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        let worker = Worker::new(config.settings(), registry)?;
        let mut state = worker.state();
        tokio::spawn(async move {
            loop {
                if *state.borrow_and_update() == WorkerState::Consuming {
                    ledger.record("-", 0, "consuming");
                }
                if state.changed().await.is_err() {
                    return;
                }
            }
        });
        worker
            .run(async move {
                term.recv().await;
            })
            .await
    });
    match report {
        Ok(report) => eprintln!("fault worker: stopped: {report:?}"),
        Err(e) => {
            eprintln!("fault worker: failed: {e}");
            std::process::exit(2);
        }
    }
}

/// A worker child process. Dropping it SIGKILLs it.
#[derive(Debug)]
pub struct WorkerProcess {
    child: Child,
    lifeline: Option<ChildStdin>,
    log: PathBuf,
}

impl WorkerProcess {
    /// Starts a worker child; its log goes to `log` (appended).
    pub fn spawn(config: &WorkerConfig, log: &Path) -> Self {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the worker log");
        let err = out.try_clone().expect("clone the log handle");
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "fault_worker_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, serde_json::to_string(config).expect("config"))
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn the worker child");
        let lifeline = child.stdin.take();
        Self {
            child,
            lifeline,
            log: log.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most `limit`) until this process consumes; returns when it
    /// started to (unix ms).
    pub async fn consuming(&mut self, ledger: &mut Ledger, limit: Duration) -> i64 {
        let deadline = Instant::now() + limit;
        loop {
            ledger.refresh();
            if let Some(at) = ledger.consuming_since(self.pid()) {
                return at;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "the worker did not consume within {limit:?}; its log:\n{}",
                tail(&self.log, 40)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lifeline = None;
    }

    /// SIGTERM, then waits (at most `within`) for the graceful exit.
    pub async fn terminate(&mut self, within: Duration) -> ExitStatus {
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the worker") {
                self.lifeline = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not exit within {within:?} of SIGTERM; log: {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fails if the child already exited (it never should by itself).
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("wait for the worker") {
            panic!(
                "the worker child exited by itself ({status}); its log:\n{}",
                tail(&self.log, 40)
            );
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
