//! What every scenario shares: sizes from the environment, the events and
//! their publishing with confirms, waiting for the accounting to settle, the
//! dead-letter queue's contents, and the one result line.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use burrow::{EventMeta, Publisher, Settings, Topology, config::AmqpUrl, wire::headers};
use futures_util::StreamExt;
use lapin::{Connection, options::BasicGetOptions, types::AMQPValue};

use tokio::task::JoinHandle;

use super::{
    common::{Cleanup, amqp_url},
    ledger::{Ledger, now_ms},
    worker::{Behaviour, FaultEvent, WorkerConfig, WorkerProcess, registry},
};

/// Sizes of a run: `FAULTS_N` events (default 20000), `FAULTS_KILLS`
/// faults where a scenario repeats one (default 5).
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub n: usize,
    pub kills: usize,
}

impl Profile {
    pub fn from_env() -> Self {
        let read = |key: &str, default: usize| match std::env::var(key) {
            Ok(v) => v
                .parse()
                .unwrap_or_else(|_| panic!("{key}={v:?} is not a positive integer")),
            Err(_) => default,
        };
        let profile = Self {
            n: read("FAULTS_N", 20_000),
            kills: read("FAULTS_KILLS", 5),
        };
        assert!(profile.n >= 100, "FAULTS_N must be at least 100");
        assert!(profile.kills >= 1, "FAULTS_KILLS must be at least 1");
        profile
    }
}

/// A scenario's files (ledger, worker logs) under `target/faults/<app>`.
/// Kept when the scenario fails (or `FAULTS_KEEP` is set), removed when it
/// passes.
#[derive(Debug)]
pub struct Workspace {
    pub dir: PathBuf,
    passed: bool,
}

impl Workspace {
    pub fn new(name: &str) -> Self {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        let dir = target.join("faults").join(format!(
            "{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir).expect("create the scenario directory");
        Self { dir, passed: false }
    }

    pub fn ledger(&self) -> Ledger {
        Ledger::create(&self.dir.join("ledger.txt"))
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    pub fn passed(&mut self) {
        self.passed = true;
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if self.passed && std::env::var_os("FAULTS_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("scenario files kept in {}", self.dir.display());
        }
    }
}

/// `n` events; `pick(i)` decides each one's behaviour.
pub fn events(n: usize, pick: impl Fn(usize) -> Behaviour) -> Vec<(String, FaultEvent)> {
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    (0..n)
        .map(|i| {
            let id = format!("f{run}-{i:06}");
            let event = FaultEvent {
                aggregate_id: id.clone(),
                seq: i as u64,
                behaviour: pick(i),
                occurred_at: chrono::Utc::now(),
            };
            (id, event)
        })
        .collect()
}

/// Declares the app's topology at `url` (so that publishes route before any
/// worker runs).
pub async fn declare(config: &WorkerConfig, url: &str) {
    let mut settings = config.settings();
    settings.amqp.url = AmqpUrl::new(url);
    let conn = connect(url).await;
    let topology = Topology::for_app(&settings, &registry(None, Duration::ZERO));
    bounded("declaring the topology", Duration::from_secs(60), async {
        burrow::internals::declare(&topology, &conn).await
    })
    .await
    .expect("declare the topology");
    let _ = conn.close(200, "declared".into()).await;
}

pub async fn connect(url: &str) -> Connection {
    bounded(
        "a connection",
        Duration::from_secs(30),
        burrow::internals::connect(&AmqpUrl::new(url), 30, "burrow fault test"),
    )
    .await
    .expect("connect to the broker")
}

/// Awaits `fut` for at most `limit`, panicking with `what` on timeout.
pub async fn bounded<F: std::future::Future>(what: &str, limit: Duration, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// The ids the broker confirmed, shared with the task publishing them.
#[derive(Debug, Clone, Default)]
pub struct Confirmed {
    ids: Arc<Mutex<HashSet<String>>>,
    count: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

impl Confirmed {
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    pub fn ids(&self) -> HashSet<String> {
        self.ids.lock().unwrap().clone()
    }
}

/// Publishes every event with `concurrency` publishes at a time, each with
/// its id as message id; records the confirmed ones. A publish that fails
/// (not confirmed in time, nacked, connection gone) is not counted: the
/// publisher was told, so it is not a loss if it never arrives.
pub async fn publish_all(
    publisher: Publisher,
    events: Vec<(String, FaultEvent)>,
    concurrency: usize,
    confirmed: Confirmed,
) {
    futures_util::stream::iter(events)
        .map(|(id, event)| {
            let publisher = publisher.clone();
            let confirmed = confirmed.clone();
            async move {
                let meta = EventMeta {
                    message_id: Some(id.clone()),
                    ..EventMeta::default()
                };
                match publisher.publish_with(&event, meta).await {
                    Ok(()) => {
                        confirmed.ids.lock().unwrap().insert(id);
                        confirmed.count.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        if confirmed.failed.fetch_add(1, Ordering::SeqCst) < 5 {
                            eprintln!("publish of {id} not confirmed: {e}");
                        }
                    }
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect::<()>()
        .await;
}

/// A publisher for the worker's app at `url` with a confirm timeout.
pub async fn publisher(config: &WorkerConfig, url: &str, confirm_timeout: Duration) -> Publisher {
    let mut settings: Settings = config.settings();
    settings.amqp.url = AmqpUrl::new(url);
    settings.publisher.confirm_timeout = confirm_timeout;
    bounded(
        "the publisher to connect",
        Duration::from_secs(30),
        Publisher::connect(&settings),
    )
    .await
    .expect("publisher connects")
}

/// Reads queues at one broker URL.
pub struct Inspector {
    conn: Connection,
}

impl Inspector {
    pub async fn connect(url: &str) -> Self {
        Self {
            conn: connect(url).await,
        }
    }

    /// Ready messages in `queue` (passive declare).
    pub async fn count(&self, queue: &str) -> u32 {
        crate::common::ready_count(&self.conn, queue).await
    }

    /// Takes every message out of `queue`: `message id → dead reasons`.
    pub async fn drain(&self, queue: &str) -> HashMap<String, Vec<String>> {
        let channel = self.conn.create_channel().await.expect("channel");
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        while let Some(m) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            let props = &m.delivery.properties;
            let id = props
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            let reason = props
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(headers::DEAD_REASON).cloned())
                .map(|v| match v {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    AMQPValue::ShortString(s) => s.to_string(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_else(|| "(none)".into());
            out.entry(id).or_default().push(reason);
        }
        let _ = channel.close(200, "drained".into()).await;
        out
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// What the accounting found.
#[derive(Debug)]
pub struct Tally {
    pub confirmed: usize,
    /// Confirmed ids never handled (or, for those that must end dead, not in
    /// the dead-letter queue).
    pub lost: Vec<String>,
    /// Ids handled (or dead-lettered) more than once.
    pub duplicates: usize,
    /// Dead letters whose reason is not the documented one.
    pub wrong_reason: Vec<String>,
}

/// Polls the ledger (and the dead-letter queue, when some events must end
/// there) until every confirmed id reached its end, for at most `limit`;
/// then drains the dead-letter queue and counts.
pub async fn settle(
    ledger: &mut Ledger,
    confirmed: &HashSet<String>,
    behaviours: &HashMap<String, Behaviour>,
    dead: Option<(&Inspector, &str)>,
    limit: Duration,
) -> Tally {
    let must_be_handled: Vec<&String> = confirmed
        .iter()
        .filter(|id| behaviours[*id].dead_reason().is_none())
        .collect();
    let must_be_dead = confirmed.len() - must_be_handled.len();
    let deadline = Instant::now() + limit;
    loop {
        ledger.refresh();
        let missing = must_be_handled
            .iter()
            .filter(|id| !ledger.handled().contains(**id))
            .count();
        let dead_count = match dead {
            Some((inspector, queue)) if must_be_dead > 0 => inspector.count(queue).await as usize,
            _ => 0,
        };
        if missing == 0 && dead_count >= must_be_dead {
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "gave up after {limit:?}: {missing} events not handled, {dead_count} of {must_be_dead} dead letters"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letters = match dead {
        Some((inspector, queue)) => inspector.drain(queue).await,
        None => HashMap::new(),
    };
    let mut lost = Vec::new();
    let mut duplicates = 0;
    let mut wrong_reason = Vec::new();
    for id in confirmed {
        match behaviours[id].dead_reason() {
            None => match ledger.successes(id) {
                0 => lost.push(id.clone()),
                1 => {}
                _ => duplicates += 1,
            },
            Some(reason) => match letters.get(id) {
                None => lost.push(id.clone()),
                Some(reasons) => {
                    if reasons.len() > 1 {
                        duplicates += 1;
                    }
                    if reasons.iter().any(|r| r != reason) {
                        wrong_reason.push(format!("{id}: {reasons:?}, expected {reason}"));
                    }
                }
            },
        }
    }
    lost.sort();
    Tally {
        confirmed: confirmed.len(),
        lost,
        duplicates,
        wrong_reason,
    }
}

/// Prints the scenario's result line (collected into RELIABILITY.md).
pub fn report(scenario: &str, profile_n: usize, tally: &Tally, recovery: &str) {
    println!(
        "FAULTS RESULT | {scenario} | N={profile_n} | confirmed={} | lost={} | duplicates={} | recovery={recovery}",
        tally.confirmed,
        tally.lost.len(),
        tally.duplicates
    );
    if !tally.lost.is_empty() {
        let shown: Vec<&String> = tally.lost.iter().take(20).collect();
        println!("lost ids (first 20): {shown:?}");
    }
}

/// `1.23s`.
pub fn secs(ms: i64) -> String {
    format!("{:.2}s", ms.max(0) as f64 / 1000.0)
}

/// The recovery after each fault (`faults_ms`, in order): the longest time
/// without any event handled from the fault to the next one (see
/// [`Ledger::stall_between`]).
pub fn recoveries(ledger: &Ledger, faults_ms: &[i64]) -> Vec<i64> {
    faults_ms
        .iter()
        .enumerate()
        .map(|(i, at)| {
            ledger
                .stall_between(*at, faults_ms.get(i + 1).copied())
                .unwrap_or(-1)
        })
        .collect()
}

/// `max 0.84s (0.31s 0.84s ...)`.
/// A fault after which nothing was handled any more (the flow had ended)
/// shows as `-`.
pub fn describe_recoveries(all: &[i64]) -> String {
    let show = |ms: i64| if ms < 0 { "-".to_owned() } else { secs(ms) };
    let max = all.iter().copied().max().unwrap_or(-1);
    if all.len() == 1 {
        return show(max);
    }
    let each: Vec<String> = all.iter().map(|ms| show(*ms)).collect();
    format!("max {} of {} ({})", show(max), all.len(), each.join(" "))
}

/// Current time for the fault log.
pub fn now() -> i64 {
    now_ms()
}

/// `k` sorted random points in `(5%, 95%)` of `n`: where in the flow the
/// faults strike.
pub fn fault_points(n: usize, k: usize) -> Vec<usize> {
    let mut points: Vec<usize> = (0..k)
        .map(|_| {
            let r = (uuid::Uuid::new_v4().as_u128() as u64 % 9_000) as usize;
            n * (500 + r) / 10_000
        })
        .collect();
    points.sort_unstable();
    points
}

/// Waits (at most `limit`) until `at_least` distinct events are handled.
pub async fn wait_handled(ledger: &mut Ledger, at_least: usize, limit: Duration) {
    bounded(&format!("{at_least} events handled"), limit, async {
        loop {
            ledger.refresh();
            if ledger.handled().len() >= at_least {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Polls `check` every 50 ms until it returns true, for at most `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    bounded(what, limit, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// This process's resident set size in KiB (Linux).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// How long a scenario may take to settle after its faults.
pub fn settle_limit(n: usize) -> Duration {
    Duration::from_secs(120 + (n / 50) as u64)
}

/// Each event's behaviour, by id.
pub fn behaviours(events: &[(String, FaultEvent)]) -> HashMap<String, Behaviour> {
    events
        .iter()
        .map(|(id, e)| (id.clone(), e.behaviour))
        .collect()
}

/// What a scenario runs on: its sizes, files, worker config and events, the
/// publisher once connected and the ids it got confirmed. The fields drop
/// in order: the publisher, then the cleanup, the workspace last.
pub struct Flow {
    pub publisher: Option<Publisher>,
    _cleanup: Cleanup,
    pub profile: Profile,
    pub config: WorkerConfig,
    /// The events not yet handed to a publishing.
    pub events: Vec<(String, FaultEvent)>,
    pub behaviours: HashMap<String, Behaviour>,
    pub confirmed: Confirmed,
    pub ledger: Ledger,
    pub ws: Workspace,
}

impl Flow {
    /// The workspace `name` (its part before the first `-` prefixes the
    /// app's names), a worker config at `url` changed by `tune`, the app's
    /// topology declared at `url`, and `FAULTS_N` events whose behaviours
    /// `pick` decides. An app on the shared broker is deleted at the end.
    pub async fn new(
        name: &str,
        url: &str,
        tune: impl FnOnce(&mut WorkerConfig),
        pick: impl Fn(usize) -> Behaviour,
    ) -> Self {
        let profile = Profile::from_env();
        let ws = Workspace::new(name);
        let ledger = ws.ledger();
        let prefix = name.split('-').next().unwrap_or(name);
        let mut config = WorkerConfig::new(prefix, url, ledger.path());
        tune(&mut config);
        let mut cleanup = Cleanup::new();
        if config.url == amqp_url() {
            cleanup.app(&config.settings());
        }
        declare(&config, url).await;
        let events = events(profile.n, pick);
        let behaviours = behaviours(&events);
        Self {
            publisher: None,
            _cleanup: cleanup,
            profile,
            config,
            events,
            behaviours,
            confirmed: Confirmed::default(),
            ledger,
            ws,
        }
    }

    /// How long the flow may take to settle after its faults.
    pub fn limit(&self) -> Duration {
        settle_limit(self.profile.n)
    }

    /// Starts a worker process (logging to `worker.log`).
    pub fn worker(&self) -> WorkerProcess {
        WorkerProcess::spawn(&self.config, &self.ws.log("worker"))
    }

    /// Connects the flow's publisher at the worker's URL with a confirm
    /// timeout.
    pub async fn connect(&mut self, confirm_timeout: Duration) -> Publisher {
        let publisher = publisher(&self.config, &self.config.url, confirm_timeout).await;
        self.publisher = Some(publisher.clone());
        publisher
    }

    /// Publishes `events` through the connected publisher, `concurrency` at
    /// a time, recording the confirmed ids.
    pub fn publish(
        &self,
        events: Vec<(String, FaultEvent)>,
        concurrency: usize,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let publisher = self.publisher.clone().expect("the publisher is connected");
        publish_all(publisher, events, concurrency, self.confirmed.clone())
    }

    /// Connects the publisher and publishes every event left, 256 at a
    /// time, in a task of its own.
    pub async fn publishing(&mut self, confirm_timeout: Duration) -> JoinHandle<()> {
        self.connect(confirm_timeout).await;
        let events = std::mem::take(&mut self.events);
        tokio::spawn(self.publish(events, 256))
    }

    /// Waits (bounded) until `point` events are handled.
    pub async fn wait_handled(&mut self, point: usize) {
        let limit = self.limit();
        wait_handled(&mut self.ledger, point, limit).await;
    }

    /// Waits for the `publishing` task to end, if any, then [`settle`]s the
    /// confirmed ids.
    pub async fn settle(
        &mut self,
        publishing: Option<JoinHandle<()>>,
        dead: Option<(&Inspector, &str)>,
    ) -> Tally {
        if let Some(publishing) = publishing {
            bounded("the publishing", self.limit(), publishing)
                .await
                .expect("publishing task");
        }
        let confirmed_ids = self.confirmed.ids();
        let limit = self.limit();
        settle(
            &mut self.ledger,
            &confirmed_ids,
            &self.behaviours,
            dead,
            limit,
        )
        .await
    }

    /// Checks the worker still runs and stops it (SIGTERM, waiting at most
    /// `within`), then closes the inspector, if any, and the publisher.
    pub async fn stop(
        &mut self,
        worker: &mut WorkerProcess,
        within: Duration,
        inspector: Option<Inspector>,
    ) {
        worker.assert_running();
        worker.terminate(within).await;
        if let Some(inspector) = inspector {
            inspector.close().await;
        }
        if let Some(publisher) = self.publisher.take() {
            publisher.close().await;
        }
    }

    /// Prints the result line of `scenario`.
    pub fn report(&self, scenario: &str, tally: &Tally, recovery: &str) {
        report(scenario, self.profile.n, tally, recovery);
    }
}
