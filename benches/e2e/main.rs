//! End-to-end benchmark: burrow against a hand-written lapin program, on a
//! real broker, in the same run.
//!
//! ```text
//! cargo run --release --example bench_e2e            # N=100000, 3 rounds, classic + quorum
//! N=20000 ROUNDS=3 cargo run --release --example bench_e2e
//! ```
//!
//! Every measured run is a child process of this one (the same binary with
//! `--child <spec>`), so each side gets its own address space: peak RSS is
//! the child's `VmHWM`, and CPU is `getrusage(RUSAGE_SELF)` taken inside the
//! child right around the measured window. For each queue kind and scenario
//! the sides alternate, burrow first: A B A B A B.
//!
//! Scenarios (all with ~200-byte `CardAddedToLibraryEvent` JSON bodies):
//!
//! - `pipeline`: publish N with confirms (window 1024) while consuming them
//!   in the same process with one no-op typed handler (prefetch 64).
//!   Throughput, client CPU per 10k messages, peak RSS.
//! - `split`: one child publishes N into the queue (no consumer), then a
//!   second child drains it: publish-only and consume-only rates and CPU, and
//!   the consuming process's RSS while it works through a full queue.
//! - `latency`: publish at a fixed offered rate (`LAT_RATE`, default 2000
//!   msg/s) for `LAT_SECS` seconds while consuming; publish→handler latency
//!   from a monotonic timestamp in the body.
//! - `idle`: a consumer alone on an empty queue: RSS after `IDLE_SECS`.
//! - `failure` (burrow only; a hand-written loop has no such path): FAIL_N
//!   messages pre-filled, then drained by a handler that always fails
//!   transiently (retry path: copy to retry step 1 with a confirm, then ack)
//!   or permanently (dead-letter path: copy to `.dead`, then ack).
//! - `soak` (off unless `SOAK_N` > 0): the pipeline with `SOAK_N` events and
//!   an RSS timeline.
//!
//! Two hand-written lapin programs do the same work, each with one
//! confirm-mode channel and a bounded window of outstanding confirms,
//! `basic.qos(prefetch)` and a `while let Some(delivery) = consumer.next()`
//! loop that decodes with serde and calls the same no-op handler:
//!
//! - the ack-batched loop (side `batched`), the one a competent user
//!   writes: `basic.ack(multiple)` once `BATCH_K` deliveries are handled or
//!   as soon as no further delivery is waiting;
//! - the await-each loop (side `baseline`): awaits every `basic.ack`.
//!
//! Their queue is declared with the same `x-arguments` as burrow's app
//! queue, so the broker does the same work for all sides.
//!
//! Environment (all optional): `AMQP_URL`, `N` (100000), `ROUNDS` (3),
//! `KINDS` (`classic,quorum`), `SCENARIOS` (`pipeline,split,latency,idle,failure`),
//! `LAT_RATE` (2000), `LAT_SECS` (10), `FAIL_N` (N/5), `IDLE_SECS` (2),
//! `SOAK_N` (0 = off), `SOAK_KINDS` (first of `KINDS`), `WINDOW` (1024),
//! `PREFETCH` (64), `PUB_CHANNELS` (burrow's `publisher.channels`; default:
//! burrow's default), `BENCH_TRACING` (1: install burrow's default log filter
//! with a discarding writer, as the `burrow` binary does), `BENCH_LOG` (a log
//! filter printed to stderr, e.g. `burrow::consumer::ack=debug`; for inspection, not for
//! measuring), `PERF` (`<scenario>:<side>,...`: run those children under
//! `perf record`, not reported), `BASELINE_ACK` (`await` or `spawn`),
//! `BASELINE_PROPS` (`minimal`, or `burrow`: the loops publish burrow's
//! properties and headers too), `BATCH_K` (50), `SIDES`
//! (`burrow,batched,baseline`), `CONCURRENCY` (burrow's, 16), `PAD_BYTES`
//! (filler added to each body, 0),
//! `BENCH_OUT` (`target/bench_e2e/results.json`), `CHILD_TIMEOUT_SECS` (900).
//!
//! Exchanges and queues are named `bench-<run id>-...`; each child deletes
//! its own, and the parent sweeps all of them again at the end.

use std::{
    io::Read as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use burrow::{
    Context, DomainEvent, Event, HandlerError, Publisher, Registry, Settings, Topology,
    WorkerHandle,
    config::{AmqpUrl, QueueType},
};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
        QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{FieldTable, LongString},
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

type BoxResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const EVENT_TYPE: &str = "CardAddedToLibraryEvent";

// ---------------------------------------------------------------------------
// The event
// ---------------------------------------------------------------------------

/// Shaped like the TypeScript publishers' event, plus a sequence number and
/// a CLOCK_MONOTONIC send time for the latency measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CardAddedToLibraryEvent {
    aggregate_id: String,
    user_id: String,
    library_id: String,
    date_time_occurred: DateTime<Utc>,
    seq: u64,
    sent_at_ns: u64,
    /// `PAD_BYTES` of filler, for the message-size runs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    note: String,
}

/// `PAD_BYTES` (0): filler added to every event's body.
fn padding() -> &'static str {
    static PAD: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PAD.get_or_init(|| "x".repeat(env_or("PAD_BYTES", 0usize)))
}

/// `CONCURRENCY` (16): burrow's `consumer.concurrency`.
fn concurrency() -> usize {
    env_or("CONCURRENCY", 16usize).max(1)
}

impl Event for CardAddedToLibraryEvent {
    const EVENT_TYPE: &'static str = EVENT_TYPE;
}

impl DomainEvent for CardAddedToLibraryEvent {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        self.date_time_occurred
    }
}

fn event(seq: u64) -> CardAddedToLibraryEvent {
    CardAddedToLibraryEvent {
        aggregate_id: format!("card-{seq:012}-7f3a9c2e4b1d"),
        user_id: format!("user-{:06}", seq % 100_000),
        library_id: format!("library-{:04}", seq % 1000),
        date_time_occurred: Utc::now(),
        seq,
        sent_at_ns: monotonic_ns(),
        note: padding().to_owned(),
    }
}

/// CLOCK_MONOTONIC, comparable across processes on one machine.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------
// Specs and results
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Side {
    Burrow,
    /// The loop a competent user writes: acks with `multiple` every
    /// `batch_k` deliveries and whenever no delivery is waiting.
    Batched,
    /// The first loop anyone writes: awaits every `basic.ack`.
    Baseline,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Burrow => "burrow",
            Side::Batched => "ack-batched loop",
            Side::Baseline => "await-each loop",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Classic,
    Quorum,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    Idle,
    Pipeline,
    Publish,
    Consume,
    Latency,
    Retry,
    Dead,
    Soak,
    /// One of several worker processes draining one queue together.
    Share,
}

/// What the handler does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    Transient,
    Permanent,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Spec {
    side: Side,
    kind: Kind,
    scenario: Scenario,
    round: u32,
    /// Names every broker entity of this run.
    prefix: String,
    n: u64,
    /// Offered rate (latency scenario), msg/s.
    rate: u64,
    window: usize,
    prefetch: u16,
    idle_secs: f64,
    url: String,
    broker_pid: Option<i32>,
    timeout_secs: u64,
    tracing: bool,
    /// Baseline only: spawn each ack instead of awaiting it in the loop.
    ack_spawn: bool,
    /// burrow only: `publisher.channels` (default: burrow's default).
    #[serde(default)]
    channels: Option<usize>,
    /// Ack-batched loop: deliveries per `basic.ack(multiple)`.
    #[serde(default)]
    batch_k: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Latency {
    count: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RunResult {
    side: Option<Side>,
    kind: Option<Kind>,
    scenario: Option<Scenario>,
    round: u32,
    n: u64,
    /// Length of the measured window.
    secs: f64,
    /// Messages per second over the window.
    rate: f64,
    /// Client CPU (user + system) over the window.
    cpu_s: f64,
    cpu_per_10k: f64,
    /// The broker's CPU over the window, when its process was found.
    broker_cpu_per_10k: Option<f64>,
    /// CPU seconds used by every other process on the machine during the
    /// window: a noise indicator.
    other_cpu_s: Option<f64>,
    latency: Option<Latency>,
    rss_start_kb: u64,
    /// RSS with connections open and nothing flowing.
    rss_idle_kb: Option<u64>,
    /// Highest sampled RSS during the window.
    rss_load_max_kb: u64,
    rss_end_kb: u64,
    /// `VmHWM` at the end of the child.
    hwm_kb: u64,
    /// Publishes that were not confirmed.
    failed_publishes: u64,
    /// `basic.ack` frames per 10k deliveries (consuming scenarios).
    #[serde(default)]
    ack_frames_per_10k: Option<f64>,
    /// Soak: (seconds, messages handled, RSS kB).
    timeline: Vec<(f64, u64, u64)>,
    error: Option<String>,
    /// Share: when this process handled its first and its last message
    /// (CLOCK_MONOTONIC ns, comparable across the processes).
    #[serde(default)]
    first_ns: Option<u64>,
    #[serde(default)]
    last_ns: Option<u64>,
    /// Workers: how many processes drained the queue together.
    #[serde(default)]
    workers: Option<u32>,
}

// ---------------------------------------------------------------------------
// Process measurements
// ---------------------------------------------------------------------------

fn cpu_self_s() -> f64 {
    // SAFETY: an all-zero rusage is valid, and getrusage only writes to it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn page_kb() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 / 1024 } else { 4 }
}

/// utime + stime of another process, in seconds.
fn cpu_of_pid_s(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat; `after` starts at field 3.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// Busy CPU seconds of the whole machine (all cores).
fn machine_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is in user)
    let total: f64 = v.iter().take(8).sum();
    Some((total - v[3] - v[4]) / clock_ticks())
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page_kb())
        .unwrap_or(0)
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// The broker process: the `beam.smp` that owns the socket listening on the
/// AMQP port of `url`. Other Erlang nodes on the machine (test brokers on
/// other ports) are not it; when the owner cannot be told, and only then,
/// a single `beam.smp` is taken.
fn find_broker_pid(url: &str) -> Option<i32> {
    let port = amqp_port(url);
    let mut listening = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // State 0A is LISTEN; field 9 is the socket inode.
            if local_port == Some(port)
                && f.get(3) == Some(&"0A")
                && let Some(inode) = f.get(9)
            {
                listening.insert(format!("socket:[{inode}]"));
            }
        }
    }
    let beams: Vec<i32> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == "beam.smp")
                .unwrap_or(false)
        })
        .collect();
    let owner = beams.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| {
                fds.filter_map(|e| e.ok()).any(|e| {
                    std::fs::read_link(e.path())
                        .map(|l| listening.contains(l.to_string_lossy().as_ref()))
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false)
    });
    owner.or_else(|| (beams.len() == 1).then(|| beams[0]))
}

/// The port of an `amqp://` or `amqps://` URL (5672 / 5671 by default).
fn amqp_port(url: &str) -> u16 {
    let default = if url.starts_with("amqps://") {
        5671
    } else {
        5672
    };
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    host_port
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(default)
}

/// A point in time for the window measurements.
struct Probe {
    at: Instant,
    cpu: f64,
    broker: Option<f64>,
    machine: Option<f64>,
}

impl Probe {
    fn now(broker_pid: Option<i32>) -> Self {
        Self {
            at: Instant::now(),
            cpu: cpu_self_s(),
            broker: broker_pid.and_then(cpu_of_pid_s),
            machine: machine_busy_s(),
        }
    }

    /// Fills the window fields of `r` for `n` messages between `self` and `end`.
    fn window(&self, end: &Probe, n: u64, r: &mut RunResult) {
        r.n = n;
        r.secs = end.at.duration_since(self.at).as_secs_f64();
        r.rate = n as f64 / r.secs.max(1e-9);
        r.cpu_s = end.cpu - self.cpu;
        r.cpu_per_10k = r.cpu_s / n.max(1) as f64 * 10_000.0;
        let broker = match (self.broker, end.broker) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        r.broker_cpu_per_10k = broker.map(|b| b / n.max(1) as f64 * 10_000.0);
        if let (Some(a), Some(b)) = (self.machine, end.machine) {
            r.other_cpu_s = Some((b - a - r.cpu_s - broker.unwrap_or(0.0)).max(0.0));
        }
    }
}

/// Samples RSS in a thread: the maximum since the last reset, and an
/// optional timeline.
struct Sampler {
    max_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    timeline: Arc<Mutex<Vec<(f64, u64, u64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(every: Duration, timeline_every: Option<Duration>, handled: Arc<AtomicU64>) -> Self {
        let max_kb = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let timeline = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (max_kb, stop, timeline) = (max_kb.clone(), stop.clone(), timeline.clone());
            std::thread::spawn(move || {
                let began = Instant::now();
                let mut next_point = Duration::ZERO;
                while !stop.load(Ordering::Relaxed) {
                    let rss = rss_kb();
                    max_kb.fetch_max(rss, Ordering::Relaxed);
                    if let Some(step) = timeline_every
                        && began.elapsed() >= next_point
                    {
                        timeline.lock().unwrap().push((
                            began.elapsed().as_secs_f64(),
                            handled.load(Ordering::Relaxed),
                            rss,
                        ));
                        next_point += step;
                    }
                    std::thread::sleep(every);
                }
            })
        };
        Self {
            max_kb,
            stop,
            timeline,
            thread: Some(thread),
        }
    }

    fn reset_max(&self) {
        self.max_kb.store(rss_kb(), Ordering::Relaxed);
    }

    fn max(&self) -> u64 {
        self.max_kb.load(Ordering::Relaxed).max(rss_kb())
    }

    fn finish(mut self) -> Vec<(f64, u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.timeline.lock().unwrap())
    }
}

// ---------------------------------------------------------------------------
// The handler's side: counting and latency
// ---------------------------------------------------------------------------

/// What the no-op handler touches: a counter, a completion signal and, when
/// latency is recorded, one slot per sequence number.
struct Sink {
    handled: Arc<AtomicU64>,
    target: u64,
    done: Notify,
    latency_ns: Vec<AtomicU64>,
    /// `basic.ack` frames the hand-written loops sent.
    ack_frames: AtomicU64,
}

impl Sink {
    fn new(target: u64, record_latency: bool) -> Arc<Self> {
        let slots = if record_latency { target as usize } else { 0 };
        Arc::new(Self {
            handled: Arc::new(AtomicU64::new(0)),
            target,
            done: Notify::new(),
            latency_ns: (0..slots).map(|_| AtomicU64::new(u64::MAX)).collect(),
            ack_frames: AtomicU64::new(0),
        })
    }

    /// The handler body, identical for both sides.
    fn record(&self, event: &CardAddedToLibraryEvent) {
        if let Some(slot) = self.latency_ns.get(event.seq as usize) {
            slot.store(
                monotonic_ns().saturating_sub(event.sent_at_ns),
                Ordering::Relaxed,
            );
        }
        if self.handled.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            self.done.notify_one();
        }
    }

    fn count(&self) -> u64 {
        self.handled.load(Ordering::Acquire)
    }

    async fn wait_all(&self) {
        while self.count() < self.target {
            // notify_one stores a permit, so a completion between the check
            // and the wait is not lost; the timeout re-checks regardless.
            let _ = tokio::time::timeout(Duration::from_millis(200), self.done.notified()).await;
        }
    }

    fn latency(&self) -> Option<Latency> {
        let mut v: Vec<u64> = self
            .latency_ns
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&x| x != u64::MAX)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let pct = |p: f64| {
            let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
            v[i] as f64 / 1e6
        };
        Some(Latency {
            count: v.len() as u64,
            p50_ms: pct(0.50),
            p90_ms: pct(0.90),
            p99_ms: pct(0.99),
            p999_ms: pct(0.999),
            max_ms: *v.last().unwrap() as f64 / 1e6,
        })
    }
}

// ---------------------------------------------------------------------------
// Names and topology
// ---------------------------------------------------------------------------

fn queue_type(kind: Kind) -> QueueType {
    match kind {
        Kind::Classic => QueueType::Classic,
        Kind::Quorum => QueueType::Quorum,
    }
}

fn burrow_settings(spec: &Spec) -> Settings {
    let mut s = Settings::default();
    s.app.name = spec.prefix.clone();
    s.amqp.url = AmqpUrl::new(spec.url.clone());
    s.amqp.exchange = format!("{}.ex", spec.prefix);
    s.queue.kind = queue_type(spec.kind);
    // One retry step, long enough that retried copies stay put for the run.
    s.retry.delays = vec![Duration::from_secs(3600)];
    s.http.addr = None;
    s.consumer.prefetch = spec.prefetch;
    s.consumer.concurrency = concurrency();
    s.publisher.max_in_flight = spec.window;
    if let Some(channels) = spec.channels {
        s.publisher.channels = channels;
    }
    s
}

fn burrow_registry(sink: Arc<Sink>, mode: Mode) -> Registry {
    let mut registry = Registry::new();
    registry
        .on(
            "bench.noop",
            move |event: CardAddedToLibraryEvent, _ctx: Context| {
                sink.record(&event);
                std::future::ready(match mode {
                    Mode::Ok => Ok(()),
                    Mode::Transient => Err(HandlerError::transient("bench: transient failure")),
                    Mode::Permanent => Err(HandlerError::permanent("bench: permanent failure")),
                })
            },
        )
        .expect("a valid handler");
    registry
}

fn burrow_topology(spec: &Spec) -> Topology {
    Topology::for_app(
        &burrow_settings(spec),
        &burrow_registry(Sink::new(0, false), Mode::Ok),
    )
}

fn baseline_exchange(spec: &Spec) -> String {
    format!("{}.ex", spec.prefix)
}

fn baseline_queue(spec: &Spec) -> String {
    format!("{}.q", spec.prefix)
}

/// Every exchange and queue a spec may create.
fn entities(spec: &Spec) -> (Vec<String>, Vec<String>) {
    match spec.side {
        Side::Burrow => {
            let t = burrow_topology(spec);
            (
                vec![t.exchange.clone()],
                t.queues.iter().map(|q| q.name.clone()).collect(),
            )
        }
        Side::Batched | Side::Baseline => {
            (vec![baseline_exchange(spec)], vec![baseline_queue(spec)])
        }
    }
}

async fn connect(url: &str, name: &str) -> BoxResult<Connection> {
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(name.as_bytes().to_vec()));
    Ok(Connection::connect(url, props).await?)
}

/// Declares the baseline's exchange, queue (same arguments as burrow's app
/// queue of the same kind) and binding.
async fn baseline_declare(conn: &Connection, spec: &Spec) -> BoxResult<()> {
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        baseline_exchange(spec).into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let args = burrow_topology(spec).app_queue().argument_table()?;
    ch.queue_declare(
        baseline_queue(spec).into(),
        QueueDeclareOptions::durable(),
        args,
    )
    .await?;
    ch.queue_bind(
        baseline_queue(spec).into(),
        baseline_exchange(spec).into(),
        EVENT_TYPE.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

async fn burrow_declare(spec: &Spec) -> BoxResult<()> {
    let settings = burrow_settings(spec);
    let conn = burrow::internals::connect(&settings.amqp.url, 30, "bench setup").await?;
    burrow::internals::declare(&burrow_topology(spec), &conn).await?;
    let _ = conn.close(200, "declared".into()).await;
    Ok(())
}

/// Deletes every queue and the exchange of `spec`; missing ones are fine.
async fn delete_entities(url: &str, spec: &Spec) -> BoxResult<()> {
    let conn = connect(url, "bench cleanup").await?;
    let (exchanges, queues) = entities(spec);
    for q in queues {
        // A fresh channel each time: an error closes the channel.
        let ch = conn.create_channel().await?;
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
        if ch.status().connected() {
            let _ = ch.close(200, "deleted".into()).await;
        }
    }
    for e in exchanges {
        let ch = conn.create_channel().await?;
        let _ = ch
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
        if ch.status().connected() {
            let _ = ch.close(200, "deleted".into()).await;
        }
    }
    let _ = conn.close(200, "cleanup done".into()).await;
    Ok(())
}

async fn queue_depth(ch: &Channel, queue: &str) -> BoxResult<u64> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(u64::from(q.message_count()))
}

// ---------------------------------------------------------------------------
// The two sides
// ---------------------------------------------------------------------------

// One value per process: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Consumer {
    Burrow(WorkerHandle, burrow::Metrics),
    Baseline {
        sink: Arc<Sink>,
        conn: Connection,
        channel: Channel,
        task: tokio::task::JoinHandle<()>,
    },
}

impl Consumer {
    async fn start(spec: &Spec, sink: Arc<Sink>, mode: Mode) -> BoxResult<Self> {
        match spec.side {
            Side::Burrow => {
                let worker =
                    burrow::Worker::new(burrow_settings(spec), burrow_registry(sink, mode))?;
                let metrics = worker.metrics().clone();
                let mut handle = worker.spawn();
                tokio::time::timeout(Duration::from_secs(60), handle.consuming()).await??;
                Ok(Consumer::Burrow(handle, metrics))
            }
            Side::Batched | Side::Baseline => {
                assert_eq!(mode, Mode::Ok, "the baseline has no failure path");
                let conn = connect(&spec.url, "baseline consumer").await?;
                baseline_declare(&conn, spec).await?;
                let channel = conn.create_channel().await?;
                channel
                    .basic_qos(spec.prefetch, BasicQosOptions::default())
                    .await?;
                let consumer = channel
                    .basic_consume(
                        baseline_queue(spec).into(),
                        "baseline".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                let task = if spec.side == Side::Batched {
                    tokio::spawn(batched_consume_loop(
                        consumer,
                        sink.clone(),
                        spec.batch_k.max(1),
                    ))
                } else {
                    tokio::spawn(baseline_consume_loop(
                        consumer,
                        sink.clone(),
                        spec.ack_spawn,
                    ))
                };
                Ok(Consumer::Baseline {
                    sink,
                    conn,
                    channel,
                    task,
                })
            }
        }
    }

    /// Stops consuming; returns the `basic.ack` frames sent.
    async fn stop(self) -> BoxResult<u64> {
        match self {
            Consumer::Burrow(handle, metrics) => {
                handle.shutdown().await?;
                let text = metrics.render();
                Ok(text
                    .lines()
                    .filter(|l| l.starts_with("burrow_ack_frames_total"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>() as u64)
            }
            Consumer::Baseline {
                sink,
                conn,
                channel,
                task,
            } => {
                let _ = channel.close(200, "done".into()).await;
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
                let _ = conn.close(200, "done".into()).await;
                Ok(sink.ack_frames.load(Ordering::Acquire))
            }
        }
    }
}

/// The hand-written consumer: decode, handle, ack, one message at a time.
/// With `ack_spawn` (`BASELINE_ACK=spawn`) the ack is sent from its own task
/// instead of being awaited before the next delivery.
async fn baseline_consume_loop(mut consumer: lapin::Consumer, sink: Arc<Sink>, ack_spawn: bool) {
    while let Some(Ok(delivery)) = consumer.next().await {
        match serde_json::from_slice::<CardAddedToLibraryEvent>(&delivery.data) {
            Ok(event) => {
                sink.record(&event);
                sink.ack_frames.fetch_add(1, Ordering::AcqRel);
                if ack_spawn {
                    tokio::spawn(async move {
                        let _ = delivery.ack(BasicAckOptions::default()).await;
                    });
                } else {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
            }
            Err(_) => {
                let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            }
        }
    }
}

/// The loop a competent user writes: decode, handle, and ack with
/// `multiple = true` once `k` deliveries are handled or as soon as no further
/// delivery is waiting, whichever comes first, so a lone message is acked at
/// once and a backlog costs one frame per `k`.
async fn batched_consume_loop(mut consumer: lapin::Consumer, sink: Arc<Sink>, k: u64) {
    use futures_util::FutureExt as _;
    let mut pending = 0u64;
    let mut last: Option<lapin::Acker> = None;
    let flush = |last: &mut Option<lapin::Acker>, pending: &mut u64| {
        let acker = last.take();
        *pending = 0;
        let sink = sink.clone();
        async move {
            if let Some(acker) = acker {
                sink.ack_frames.fetch_add(1, Ordering::AcqRel);
                let _ = acker.ack(BasicAckOptions { multiple: true }).await;
            }
        }
    };
    loop {
        let next = match consumer.next().now_or_never() {
            Some(next) => next,
            None => {
                flush(&mut last, &mut pending).await;
                consumer.next().await
            }
        };
        let Some(Ok(delivery)) = next else { break };
        match serde_json::from_slice::<CardAddedToLibraryEvent>(&delivery.data) {
            Ok(event) => {
                sink.record(&event);
                pending += 1;
                last = Some(delivery.acker);
                if pending >= k {
                    flush(&mut last, &mut pending).await;
                }
            }
            Err(_) => {
                flush(&mut last, &mut pending).await;
                let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            }
        }
    }
    flush(&mut last, &mut pending).await;
}

// One value per process: its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Pub {
    Burrow(Publisher),
    Baseline { conn: Connection, channel: Channel },
}

impl Pub {
    async fn connect(spec: &Spec) -> BoxResult<Self> {
        match spec.side {
            Side::Burrow => Ok(Pub::Burrow(
                Publisher::connect(&burrow_settings(spec)).await?,
            )),
            Side::Batched | Side::Baseline => {
                let conn = connect(&spec.url, "baseline publisher").await?;
                let channel = conn.create_channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                Ok(Pub::Baseline { conn, channel })
            }
        }
    }

    async fn close(self) {
        match self {
            Pub::Burrow(p) => p.close().await,
            Pub::Baseline { conn, channel } => {
                let _ = channel.close(200, "done".into()).await;
                let _ = conn.close(200, "done".into()).await;
            }
        }
    }

    /// Publishes `n` events as fast as the confirm window allows; returns
    /// the number not confirmed.
    async fn publish_all(&self, spec: &Spec, n: u64) -> BoxResult<u64> {
        match self {
            Pub::Burrow(p) => Ok(futures_util::stream::iter(0..n)
                .map(|seq| async move { p.publish(&event(seq)).await.is_err() })
                .buffer_unordered(spec.window)
                .fold(0u64, |acc, failed| async move { acc + u64::from(failed) })
                .await),
            Pub::Baseline { channel, .. } => {
                let (tx, checker) = confirm_checker(spec.window);
                for seq in 0..n {
                    let confirm = baseline_publish_one(channel, spec, seq).await?;
                    tx.send(confirm).await?;
                }
                drop(tx);
                Ok(checker.await?)
            }
        }
    }

    /// Publishes `n` events at `spec.rate` per second.
    async fn publish_paced(&self, spec: &Spec, n: u64) -> BoxResult<u64> {
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = 0u64;
        match self {
            Pub::Burrow(p) => {
                let mut tasks = tokio::task::JoinSet::new();
                while sent < n {
                    tick.tick().await;
                    let due = ((start.elapsed().as_secs_f64() * spec.rate as f64) as u64).min(n);
                    while sent < due {
                        let p = p.clone();
                        let seq = sent;
                        tasks.spawn(async move { p.publish(&event(seq)).await.is_err() });
                        sent += 1;
                    }
                    while tasks.try_join_next().is_some() {}
                }
                let mut failed = 0;
                while let Some(r) = tasks.join_next().await {
                    failed += u64::from(r.unwrap_or(true));
                }
                Ok(failed)
            }
            Pub::Baseline { channel, .. } => {
                let (tx, checker) = confirm_checker(spec.window);
                while sent < n {
                    tick.tick().await;
                    let due = ((start.elapsed().as_secs_f64() * spec.rate as f64) as u64).min(n);
                    while sent < due {
                        let confirm = baseline_publish_one(channel, spec, sent).await?;
                        tx.send(confirm).await?;
                        sent += 1;
                    }
                }
                drop(tx);
                Ok(checker.await?)
            }
        }
    }
}

/// `BASELINE_PROPS=burrow`: the loops publish the same properties as
/// burrow's publisher (a correlation id and an app id besides the minimal
/// set), so every side hands the broker identical messages.
/// Default `minimal`: only what an obvious hand-written publisher sets.
fn baseline_full_props() -> bool {
    static FULL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FULL.get_or_init(|| match std::env::var("BASELINE_PROPS").as_deref() {
        Err(_) | Ok("") | Ok("minimal") => false,
        Ok("burrow") => true,
        Ok(other) => panic!("BASELINE_PROPS={other} is not valid (minimal, burrow)"),
    })
}

/// One publish the obvious way: serialize, persistent + mandatory, a message id.
async fn baseline_publish_one(ch: &Channel, spec: &Spec, seq: u64) -> BoxResult<PublisherConfirm> {
    let body = serde_json::to_vec(&event(seq))?;
    let message_id = uuid::Uuid::new_v4().to_string();
    let mut props = BasicProperties::default()
        .with_message_id(message_id.as_str().into())
        .with_type(EVENT_TYPE.into())
        .with_content_type("application/json".into())
        .with_timestamp(Utc::now().timestamp() as u64)
        .with_delivery_mode(2);
    if baseline_full_props() {
        // What burrow's publisher sends for a version-1 event with no
        // causation id: no headers table.
        props = props
            .with_correlation_id(message_id.as_str().into())
            .with_app_id("bench".into());
    }
    Ok(ch
        .basic_publish(
            baseline_exchange(spec).into(),
            EVENT_TYPE.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            props,
        )
        .await?)
}

/// A bounded queue of outstanding confirms (the window) and the task that
/// awaits them in order, counting those not acked.
fn confirm_checker(
    window: usize,
) -> (
    tokio::sync::mpsc::Sender<PublisherConfirm>,
    tokio::task::JoinHandle<u64>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<PublisherConfirm>(window.max(1));
    let checker = tokio::spawn(async move {
        let mut failed = 0u64;
        while let Some(confirm) = rx.recv().await {
            if !matches!(confirm.await, Ok(Confirmation::Ack(None))) {
                failed += 1;
            }
        }
        failed
    });
    (tx, checker)
}

// ---------------------------------------------------------------------------
// Child: one measured run
// ---------------------------------------------------------------------------

/// Runs `command` (this binary, or perf around it) as the child of `spec`
/// and reads its result; `None` when it printed none.
fn child_result(mut command: Command, spec: &Spec) -> Option<RunResult> {
    let mut child = command
        .arg("--child")
        .arg(serde_json::to_string(spec).expect("spec serializes"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn a child run");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(spec.timeout_secs + 60);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = reader.join().unwrap_or_default();
    out.lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .next_back()
        .and_then(|json| serde_json::from_str::<RunResult>(json).ok())
}

fn run_child(spec: Spec) -> RunResult {
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        // For looking inside a run (e.g. BENCH_LOG=burrow::consumer::ack=debug); not
        // for measuring.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    } else if spec.tracing {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,lapin=error"))
            .with_writer(std::io::sink)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let timeout = Duration::from_secs(spec.timeout_secs);
    let mut result = rt.block_on(async {
        match tokio::time::timeout(timeout, scenario(&spec)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => RunResult {
                error: Some(e.to_string()),
                ..Default::default()
            },
            Err(_) => RunResult {
                error: Some(format!("timed out after {timeout:?}")),
                ..Default::default()
            },
        }
    });
    // Only the consume-side scenarios own the entities left by `publish`;
    // every scenario but `publish` cleans up after itself.
    // A share's queue belongs to its siblings too: the parent deletes it.
    if !matches!(spec.scenario, Scenario::Publish | Scenario::Share) || result.error.is_some() {
        let _ = rt.block_on(delete_entities(&spec.url, &spec));
    }
    result.side = Some(spec.side);
    result.kind = Some(spec.kind);
    result.scenario = Some(spec.scenario);
    result.round = spec.round;
    result.hwm_kb = status_kb("VmHWM:");
    result
}

async fn scenario(spec: &Spec) -> BoxResult<RunResult> {
    let mut r = RunResult {
        rss_start_kb: rss_kb(),
        ..Default::default()
    };
    match spec.scenario {
        Scenario::Idle => {
            let sink = Sink::new(u64::MAX, false);
            let consumer = Consumer::start(spec, sink, Mode::Ok).await?;
            tokio::time::sleep(Duration::from_secs_f64(spec.idle_secs)).await;
            r.rss_idle_kb = Some(rss_kb());
            consumer.stop().await?;
        }
        Scenario::Pipeline | Scenario::Latency | Scenario::Soak => {
            let soak = spec.scenario == Scenario::Soak;
            let sink = Sink::new(spec.n, !soak);
            let sampler = Sampler::start(
                Duration::from_millis(20),
                soak.then(|| Duration::from_secs(1)),
                sink.handled.clone(),
            );
            let consumer = Consumer::start(spec, sink.clone(), Mode::Ok).await?;
            let publisher = Pub::connect(spec).await?;
            tokio::time::sleep(Duration::from_secs_f64(spec.idle_secs.min(1.0))).await;
            r.rss_idle_kb = Some(rss_kb());
            sampler.reset_max();
            let start = Probe::now(spec.broker_pid);
            let failed = if spec.scenario == Scenario::Latency {
                publisher.publish_paced(spec, spec.n).await?
            } else {
                publisher.publish_all(spec, spec.n).await?
            };
            if failed > 0 {
                return Err(format!("{failed} publishes were not confirmed").into());
            }
            sink.wait_all().await;
            let end = Probe::now(spec.broker_pid);
            start.window(&end, spec.n, &mut r);
            r.rss_load_max_kb = sampler.max();
            r.rss_end_kb = rss_kb();
            r.latency = sink.latency();
            publisher.close().await;
            let frames = consumer.stop().await?;
            r.ack_frames_per_10k = Some(frames as f64 * 10_000.0 / spec.n.max(1) as f64);
            r.timeline = sampler.finish();
        }
        Scenario::Publish => {
            match spec.side {
                Side::Burrow => burrow_declare(spec).await?,
                Side::Batched | Side::Baseline => {
                    let conn = connect(&spec.url, "bench setup").await?;
                    baseline_declare(&conn, spec).await?;
                    let _ = conn.close(200, "declared".into()).await;
                }
            }
            let sampler = Sampler::start(Duration::from_millis(20), None, Arc::default());
            let publisher = Pub::connect(spec).await?;
            r.rss_idle_kb = Some(rss_kb());
            sampler.reset_max();
            let start = Probe::now(spec.broker_pid);
            let failed = publisher.publish_all(spec, spec.n).await?;
            let end = Probe::now(spec.broker_pid);
            if failed > 0 {
                return Err(format!("{failed} publishes were not confirmed").into());
            }
            start.window(&end, spec.n, &mut r);
            r.rss_load_max_kb = sampler.max();
            r.rss_end_kb = rss_kb();
            publisher.close().await;
            sampler.finish();
        }
        Scenario::Consume => {
            let sink = Sink::new(spec.n, false);
            let sampler = Sampler::start(Duration::from_millis(20), None, sink.handled.clone());
            let start = Probe::now(spec.broker_pid);
            let consumer = Consumer::start(spec, sink.clone(), Mode::Ok).await?;
            sink.wait_all().await;
            let end = Probe::now(spec.broker_pid);
            start.window(&end, spec.n, &mut r);
            r.rss_load_max_kb = sampler.max();
            r.rss_end_kb = rss_kb();
            let frames = consumer.stop().await?;
            r.ack_frames_per_10k = Some(frames as f64 * 10_000.0 / spec.n.max(1) as f64);
            sampler.finish();
        }
        Scenario::Share => {
            // Drains its share of a queue other processes drain too: until
            // the queue is empty and nothing arrived for a while.
            let sink = Sink::new(u64::MAX, false);
            let start = Probe::now(spec.broker_pid);
            let consumer = Consumer::start(spec, sink.clone(), Mode::Ok).await?;
            let conn = connect(&spec.url, "bench share probe").await?;
            let ch = conn.create_channel().await?;
            let queue = burrow_settings(spec).app_queue();
            let queue = if spec.side == Side::Burrow {
                queue
            } else {
                baseline_queue(spec)
            };
            let (mut seen, mut changed) = (0u64, Instant::now());
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let now = sink.count();
                if now != seen {
                    if seen == 0 {
                        r.first_ns = Some(monotonic_ns());
                    }
                    seen = now;
                    r.last_ns = Some(monotonic_ns());
                    changed = Instant::now();
                } else if changed.elapsed() > Duration::from_millis(500)
                    && queue_depth(&ch, &queue).await? == 0
                {
                    break;
                }
            }
            let end = Probe::now(spec.broker_pid);
            start.window(&end, seen.max(1), &mut r);
            r.n = seen;
            let _ = conn.close(200, "done".into()).await;
            consumer.stop().await?;
        }
        Scenario::Retry | Scenario::Dead => {
            let (mode, target) = if spec.scenario == Scenario::Retry {
                let t = burrow_topology(spec);
                (Mode::Transient, t.queues[1].name.clone())
            } else {
                (Mode::Permanent, burrow_settings(spec).dead_letter_queue())
            };
            let conn = connect(&spec.url, "bench depth probe").await?;
            let probe_ch = conn.create_channel().await?;
            let sink = Sink::new(u64::MAX, false);
            let sampler = Sampler::start(Duration::from_millis(20), None, sink.handled.clone());
            let start = Probe::now(spec.broker_pid);
            let consumer = Consumer::start(spec, sink.clone(), mode).await?;
            while queue_depth(&probe_ch, &target).await? < spec.n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let end = Probe::now(spec.broker_pid);
            start.window(&end, spec.n, &mut r);
            r.rss_load_max_kb = sampler.max();
            r.rss_end_kb = rss_kb();
            let frames = consumer.stop().await?;
            r.ack_frames_per_10k = Some(frames as f64 * 10_000.0 / spec.n.max(1) as f64);
            sampler.finish();
            let _ = conn.close(200, "done".into()).await;
        }
    }
    Ok(r)
}

// ---------------------------------------------------------------------------
// Parent: the schedule, the report
// ---------------------------------------------------------------------------

struct Config {
    url: String,
    n: u64,
    rounds: u32,
    kinds: Vec<Kind>,
    scenarios: Vec<String>,
    lat_rate: u64,
    lat_secs: u64,
    fail_n: u64,
    idle_secs: f64,
    soak_n: u64,
    soak_kinds: Vec<Kind>,
    window: usize,
    prefetch: u16,
    tracing: bool,
    ack_spawn: bool,
    channels: Option<usize>,
    batch_k: u64,
    /// The sides to run, in this order within each round.
    sides: Vec<Side>,
    out: PathBuf,
    timeout_secs: u64,
    /// `workers` scenario: the process counts to drain one queue with.
    workers: Vec<u32>,
    /// `scenario:side` pairs whose runs go under `perf record` (not reported).
    perf: Vec<String>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not valid")),
        _ => default,
    }
}

fn parse_kinds(list: &str) -> Vec<Kind> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s {
            "classic" => Kind::Classic,
            "quorum" => Kind::Quorum,
            other => panic!("unknown queue kind {other:?} (classic, quorum)"),
        })
        .collect()
}

impl Config {
    fn from_env() -> Self {
        let n = env_or("N", 100_000u64);
        let kinds =
            parse_kinds(&std::env::var("KINDS").unwrap_or_else(|_| "classic,quorum".into()));
        let soak_kinds = std::env::var("SOAK_KINDS")
            .map(|s| parse_kinds(&s))
            .unwrap_or_else(|_| kinds.iter().take(1).copied().collect());
        Self {
            url: std::env::var("AMQP_URL")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            n,
            rounds: env_or("ROUNDS", 3u32).max(1),
            kinds,
            scenarios: std::env::var("SCENARIOS")
                .unwrap_or_else(|_| "pipeline,split,latency,idle,failure".into())
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            lat_rate: env_or("LAT_RATE", 2000u64).max(1),
            lat_secs: env_or("LAT_SECS", 10u64).max(1),
            fail_n: env_or("FAIL_N", (n / 5).max(1)),
            idle_secs: env_or("IDLE_SECS", 2.0f64),
            soak_n: env_or("SOAK_N", 0u64),
            soak_kinds,
            window: env_or("WINDOW", 1024usize).max(1),
            prefetch: env_or("PREFETCH", 64u16).max(1),
            tracing: env_or("BENCH_TRACING", 0u8) != 0,
            ack_spawn: match std::env::var("BASELINE_ACK").as_deref() {
                Ok("spawn") => true,
                Ok("await") | Err(_) => false,
                Ok(other) => panic!("BASELINE_ACK={other} is not valid (await, spawn)"),
            },
            batch_k: env_or("BATCH_K", 50u64).max(1),
            sides: std::env::var("SIDES")
                .unwrap_or_else(|_| "burrow,batched,baseline".into())
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| match s {
                    "burrow" => Side::Burrow,
                    "batched" => Side::Batched,
                    "baseline" => Side::Baseline,
                    other => panic!("unknown side {other:?} (burrow, batched, baseline)"),
                })
                .collect(),
            channels: std::env::var("PUB_CHANNELS")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.trim().parse().expect("PUB_CHANNELS is a number")),
            perf: std::env::var("PERF")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
            out: std::env::var("BENCH_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|_| PathBuf::from("target/bench_e2e/results.json")),
            timeout_secs: env_or("CHILD_TIMEOUT_SECS", 900u64),
            workers: std::env::var("WORKERS")
                .unwrap_or_else(|_| "1,2,4".into())
                .split(',')
                .filter_map(|k| k.trim().parse().ok())
                .filter(|k| *k > 0)
                .collect(),
        }
    }
}

struct Parent {
    cfg: Config,
    run_id: String,
    broker_pid: Option<i32>,
    specs: Vec<Spec>,
    results: Vec<RunResult>,
    seq: u32,
}

impl Parent {
    fn spec(&mut self, side: Side, kind: Kind, scenario: Scenario, round: u32, n: u64) -> Spec {
        self.seq += 1;
        Spec {
            side,
            kind,
            scenario,
            round,
            prefix: format!(
                "bench-{}-{:03}-{:?}-{:?}",
                self.run_id, self.seq, side, kind
            )
            .to_lowercase(),
            n,
            rate: self.cfg.lat_rate,
            window: self.cfg.window,
            prefetch: self.cfg.prefetch,
            idle_secs: self.cfg.idle_secs,
            url: self.cfg.url.clone(),
            broker_pid: self.broker_pid,
            timeout_secs: self.cfg.timeout_secs,
            tracing: self.cfg.tracing,
            ack_spawn: self.cfg.ack_spawn,
            channels: self.cfg.channels,
            batch_k: self.cfg.batch_k,
        }
    }

    /// Runs one child and records its result.
    fn run(&mut self, spec: &Spec) -> Option<RunResult> {
        if !self.specs.iter().any(|s| s.prefix == spec.prefix) {
            self.specs.push(spec.clone());
        }
        eprint!(
            "  {:<8} {:<7} {:<8} round {} n={:<7} ... ",
            format!("{:?}", spec.scenario).to_lowercase(),
            format!("{:?}", spec.kind).to_lowercase(),
            format!("{:?}", spec.side).to_lowercase(),
            spec.round,
            spec.n
        );
        let exe = std::env::current_exe().expect("own path");
        let scenario = format!("{:?}", spec.scenario).to_lowercase();
        let side = format!("{:?}", spec.side).to_lowercase();
        let profiled = self.cfg.perf.contains(&format!("{scenario}:{side}"));
        let command = if profiled {
            let dir = self.cfg.out.parent().unwrap_or(std::path::Path::new("."));
            let _ = std::fs::create_dir_all(dir);
            let data = dir.join(format!(
                "perf-{scenario}-{side}-{:?}-r{}.data",
                spec.kind, spec.round
            ));
            let mut c = Command::new("perf");
            c.args(["record", "-F", "1999", "--call-graph", "dwarf,32768", "-o"])
                .arg(&data)
                .arg("--")
                .arg(&exe);
            eprint!("[perf → {}] ", data.display());
            c
        } else if std::path::Path::new("/proc/self/exe").exists() {
            // The very binary this process runs, even if a concurrent build
            // has replaced the file on disk since.
            Command::new("/proc/self/exe")
        } else {
            Command::new(&exe)
        };
        match child_result(command, spec) {
            Some(r) if r.error.is_none() && profiled => {
                eprintln!("{:>9.0} msg/s under perf (not reported)", r.rate);
                Some(r)
            }
            Some(r) if r.error.is_none() => {
                eprintln!(
                    "{:>9.0} msg/s  cpu {:.3} s/10k  rss peak {:.1} MB  other {:.1} s",
                    r.rate,
                    r.cpu_per_10k,
                    r.hwm_kb as f64 / 1024.0,
                    r.other_cpu_s.unwrap_or(0.0)
                );
                self.results.push(r.clone());
                Some(r)
            }
            Some(r) => {
                eprintln!("FAILED: {}", r.error.unwrap_or_default());
                None
            }
            None => {
                eprintln!("FAILED: the child printed no result");
                None
            }
        }
    }

    /// `k` worker processes drain one queue of `n` messages together: the
    /// fill is published first (not a measurement), then the workers start
    /// at once. Throughput is over the span from the first message any of
    /// them handled to the last; CPU is theirs summed, and the broker's
    /// from around the whole drain.
    fn workers(&mut self, side: Side, kind: Kind, round: u32, k: u32) {
        let mut spec = self.spec(side, kind, Scenario::Publish, round, self.cfg.n);
        let fill = self.run(&spec);
        self.results
            .pop_if(|r| r.scenario == Some(Scenario::Publish));
        if fill.is_none() {
            return;
        }
        spec.scenario = Scenario::Share;
        eprint!(
            "  workers  {:<7} {:<8} round {round} k={k} ... ",
            format!("{kind:?}").to_lowercase(),
            format!("{side:?}").to_lowercase(),
        );
        let broker_before = spec.broker_pid.and_then(cpu_of_pid_s);
        let children: Vec<_> = (0..k)
            .map(|_| {
                let spec = spec.clone();
                std::thread::spawn(move || child_result(Command::new("/proc/self/exe"), &spec))
            })
            .collect();
        let shares: Vec<RunResult> = children
            .into_iter()
            .filter_map(|c| c.join().ok().flatten())
            .collect();
        let broker_after = spec.broker_pid.and_then(cpu_of_pid_s);
        if shares.len() != k as usize || shares.iter().any(|r| r.error.is_some()) {
            eprintln!("FAILED: a worker failed or printed no result");
            return;
        }
        let n: u64 = shares.iter().map(|r| r.n).sum();
        let first = shares.iter().filter_map(|r| r.first_ns).min().unwrap_or(0);
        let last = shares.iter().filter_map(|r| r.last_ns).max().unwrap_or(0);
        let secs = (last.saturating_sub(first)) as f64 / 1e9;
        let cpu_s: f64 = shares.iter().map(|r| r.cpu_s).sum();
        let r = RunResult {
            side: Some(side),
            kind: Some(kind),
            scenario: Some(Scenario::Share),
            round,
            n,
            secs,
            rate: n as f64 / secs.max(1e-9),
            cpu_s,
            cpu_per_10k: cpu_s / n.max(1) as f64 * 10_000.0,
            broker_cpu_per_10k: broker_before
                .zip(broker_after)
                .map(|(a, b)| (b - a) / n.max(1) as f64 * 10_000.0),
            hwm_kb: shares.iter().map(|r| r.hwm_kb).max().unwrap_or(0),
            workers: Some(k),
            ..Default::default()
        };
        eprintln!(
            "{:>9.0} msg/s  cpu {:.3} s/10k  shares {:?}",
            r.rate,
            r.cpu_per_10k,
            shares.iter().map(|s| s.n).collect::<Vec<_>>()
        );
        if n != self.cfg.n {
            eprintln!(
                "    (handled {n} of {}: redeliveries or a short drain)",
                self.cfg.n
            );
        }
        self.results.push(r);
    }

    fn schedule(&mut self) {
        let kinds = self.cfg.kinds.clone();
        let scenarios = self.cfg.scenarios.clone();
        let sides = self.cfg.sides.clone();
        for kind in kinds {
            eprintln!("== {kind:?} queues");
            for name in &scenarios {
                for round in 1..=self.cfg.rounds {
                    match name.as_str() {
                        "pipeline" | "latency" | "idle" => {
                            let (scenario, n) = match name.as_str() {
                                "pipeline" => (Scenario::Pipeline, self.cfg.n),
                                "latency" => {
                                    (Scenario::Latency, self.cfg.lat_rate * self.cfg.lat_secs)
                                }
                                _ => (Scenario::Idle, 0),
                            };
                            for &side in &sides {
                                let spec = self.spec(side, kind, scenario, round, n);
                                self.run(&spec);
                            }
                        }
                        "split" => {
                            for &side in &sides {
                                let mut spec =
                                    self.spec(side, kind, Scenario::Publish, round, self.cfg.n);
                                if self.run(&spec).is_some() {
                                    spec.scenario = Scenario::Consume;
                                    self.run(&spec);
                                }
                            }
                        }
                        "failure" => {
                            for scenario in [Scenario::Retry, Scenario::Dead] {
                                let mut spec = self.spec(
                                    Side::Burrow,
                                    kind,
                                    Scenario::Publish,
                                    round,
                                    self.cfg.fail_n,
                                );
                                // The fill is not a measurement of its own.
                                let fill = self.run(&spec);
                                self.results
                                    .pop_if(|r| r.scenario == Some(Scenario::Publish));
                                if fill.is_some() {
                                    spec.scenario = scenario;
                                    self.run(&spec);
                                }
                            }
                        }
                        "workers" => {
                            for k in self.cfg.workers.clone() {
                                for &side in &sides {
                                    if side != Side::Baseline {
                                        self.workers(side, kind, round, k);
                                    }
                                }
                            }
                        }
                        other => panic!(
                            "unknown scenario {other:?} (pipeline, split, latency, idle, failure, workers)"
                        ),
                    }
                }
            }
        }
        if self.cfg.soak_n > 0 {
            for kind in self.cfg.soak_kinds.clone() {
                eprintln!("== soak, {kind:?} queues");
                for &side in &sides {
                    let spec = self.spec(side, kind, Scenario::Soak, 1, self.cfg.soak_n);
                    self.run(&spec);
                }
            }
        }
    }

    fn cleanup(&self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        rt.block_on(async {
            for spec in &self.specs {
                if let Err(e) = delete_entities(&self.cfg.url, spec).await {
                    eprintln!("cleanup of {} failed: {e}", spec.prefix);
                }
            }
        });
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn range(v: &[f64]) -> Option<(f64, f64)> {
    let min = v.iter().copied().reduce(f64::min)?;
    let max = v.iter().copied().reduce(f64::max)?;
    Some((min, max))
}

/// Formats the median and [min–max] of `f` over `runs`.
fn cell(runs: &[&RunResult], digits: usize, f: impl Fn(&RunResult) -> Option<f64>) -> String {
    let v: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
    match (median(v.clone()), range(&v)) {
        (Some(m), Some((lo, hi))) if v.len() > 1 => {
            format!("{m:.digits$} [{lo:.digits$}–{hi:.digits$}]")
        }
        (Some(m), _) => format!("{m:.digits$}"),
        _ => "–".into(),
    }
}

fn ratio(a: &[&RunResult], b: &[&RunResult], f: impl Fn(&RunResult) -> Option<f64>) -> String {
    let ma = median(a.iter().filter_map(|r| f(r)).collect());
    let mb = median(b.iter().filter_map(|r| f(r)).collect());
    match (ma, mb) {
        (Some(x), Some(y)) if y != 0.0 => format!("{:.3}", x / y),
        _ => "–".into(),
    }
}

type Metric<'a> = (&'a str, usize, Box<dyn Fn(&RunResult) -> Option<f64>>);

fn mb(kb: u64) -> Option<f64> {
    (kb > 0).then(|| kb as f64 / 1024.0)
}

fn report(results: &[RunResult], cfg: &Config) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let pick = |kind: Kind, scenario: Scenario, side: Side| -> Vec<&RunResult> {
        results
            .iter()
            .filter(|r| {
                r.kind == Some(kind) && r.scenario == Some(scenario) && r.side == Some(side)
            })
            .collect()
    };
    let table =
        |out: &mut String, kind: Kind, scenario: Scenario, title: &str, metrics: Vec<Metric>| {
            let sides: Vec<(Side, Vec<&RunResult>)> = [Side::Burrow, Side::Batched, Side::Baseline]
                .into_iter()
                .map(|side| (side, pick(kind, scenario, side)))
                .filter(|(_, runs)| !runs.is_empty())
                .collect();
            if sides.is_empty() {
                return;
            }
            let counts: Vec<String> = sides.iter().map(|(_, r)| r.len().to_string()).collect();
            let _ = writeln!(
                out,
                "\n#### {title} — {kind:?} queue ({} runs)\n",
                counts.join(" + ")
            );
            let burrow = sides
                .iter()
                .find(|(side, _)| *side == Side::Burrow)
                .map(|(_, runs)| runs.clone());
            let others: Vec<&(Side, Vec<&RunResult>)> = sides
                .iter()
                .filter(|(side, _)| *side != Side::Burrow)
                .collect();
            let mut header = String::from("| metric |");
            let mut rule = String::from("|---|");
            for (side, _) in &sides {
                let _ = write!(header, " {}, median [min–max] |", side.label());
                rule.push_str("---|");
            }
            if burrow.is_some() {
                for (side, _) in &others {
                    let _ = write!(header, " burrow / {} |", side.label());
                    rule.push_str("---|");
                }
            }
            let _ = writeln!(out, "{header}\n{rule}");
            for (name, digits, f) in metrics {
                let mut row = format!("| {name} |");
                for (_, runs) in &sides {
                    let _ = write!(row, " {} |", cell(runs, digits, &f));
                }
                if let Some(a) = &burrow {
                    for (_, runs) in &others {
                        let _ = write!(row, " {} |", ratio(a, runs, &f));
                    }
                }
                let _ = writeln!(out, "{row}");
            }
        };
    let common = || -> Vec<Metric> {
        vec![
            ("throughput, msg/s", 0, Box::new(|r| Some(r.rate))),
            (
                "client CPU, s per 10k msgs",
                3,
                Box::new(|r| Some(r.cpu_per_10k)),
            ),
            (
                "broker CPU, s per 10k msgs",
                3,
                Box::new(|r| r.broker_cpu_per_10k),
            ),
            (
                "client + broker CPU, s per 10k msgs",
                3,
                Box::new(|r| r.broker_cpu_per_10k.map(|b| b + r.cpu_per_10k)),
            ),
            (
                "ack frames per 10k deliveries",
                0,
                Box::new(|r| r.ack_frames_per_10k),
            ),
            (
                "other processes' CPU during the run, s",
                1,
                Box::new(|r| r.other_cpu_s),
            ),
        ]
    };
    let lat = |name: &'static str, f: fn(&Latency) -> f64| -> Metric {
        (
            name,
            2,
            Box::new(move |r: &RunResult| r.latency.as_ref().map(f)),
        )
    };
    for &kind in &cfg.kinds {
        let _ = writeln!(out, "\n### {kind:?} queues");
        let mut m = common();
        m.push(lat("publish→handler latency p50, ms", |l| l.p50_ms));
        m.push(lat("publish→handler latency p99, ms", |l| l.p99_ms));
        m.push((
            "RSS idle (consumer + publisher connected), MB",
            1,
            Box::new(|r| r.rss_idle_kb.and_then(mb)),
        ));
        m.push((
            "RSS max under load (sampled), MB",
            1,
            Box::new(|r| mb(r.rss_load_max_kb)),
        ));
        m.push(("peak RSS (VmHWM), MB", 1, Box::new(|r| mb(r.hwm_kb))));
        table(
            &mut out,
            kind,
            Scenario::Pipeline,
            "Pipeline: publish with confirms while consuming (one process)",
            m,
        );

        let mut m = common();
        m.push(("peak RSS (VmHWM), MB", 1, Box::new(|r| mb(r.hwm_kb))));
        table(
            &mut out,
            kind,
            Scenario::Publish,
            "Publish only (queue filling, no consumer)",
            m,
        );

        let mut m = common();
        m.push((
            "RSS max while draining (sampled), MB",
            1,
            Box::new(|r| mb(r.rss_load_max_kb)),
        ));
        m.push(("RSS after draining, MB", 1, Box::new(|r| mb(r.rss_end_kb))));
        m.push(("peak RSS (VmHWM), MB", 1, Box::new(|r| mb(r.hwm_kb))));
        table(
            &mut out,
            kind,
            Scenario::Consume,
            "Consume only (draining a full queue, consumer process alone)",
            m,
        );

        let m: Vec<Metric> = vec![
            ("achieved rate, msg/s", 0, Box::new(|r| Some(r.rate))),
            lat("latency p50, ms", |l| l.p50_ms),
            lat("latency p90, ms", |l| l.p90_ms),
            lat("latency p99, ms", |l| l.p99_ms),
            lat("latency p99.9, ms", |l| l.p999_ms),
            lat("latency max, ms", |l| l.max_ms),
            (
                "client CPU, s per 10k msgs",
                3,
                Box::new(|r| Some(r.cpu_per_10k)),
            ),
            (
                "other processes' CPU during the run, s",
                1,
                Box::new(|r| r.other_cpu_s),
            ),
        ];
        table(
            &mut out,
            kind,
            Scenario::Latency,
            &format!(
                "Latency at a fixed offered rate of {} msg/s for {} s",
                cfg.lat_rate, cfg.lat_secs
            ),
            m,
        );

        let m: Vec<Metric> = vec![
            (
                "RSS idle (consumer alone, empty queue), MB",
                1,
                Box::new(|r| r.rss_idle_kb.and_then(mb)),
            ),
            ("peak RSS (VmHWM), MB", 1, Box::new(|r| mb(r.hwm_kb))),
        ];
        table(&mut out, kind, Scenario::Idle, "Idle consumer", m);

        let success = pick(kind, Scenario::Consume, Side::Burrow);
        let retry = pick(kind, Scenario::Retry, Side::Burrow);
        let dead = pick(kind, Scenario::Dead, Side::Burrow);
        if !retry.is_empty() || !dead.is_empty() {
            let _ = writeln!(
                out,
                "\n#### Failure paths (burrow only) — {kind:?} queue, FAIL_N = {}\n",
                cfg.fail_n
            );
            let _ = writeln!(
                out,
                "| path | failing msgs/s, median [min–max] | client CPU, s per 10k | broker CPU, s per 10k | vs. burrow's success drain (rate, CPU) |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|");
            for (name, runs) in [
                ("success (ack), from the consume-only runs", &success),
                ("retry: copy to step 1 with confirm, then ack", &retry),
                ("dead letter: copy to .dead with confirm, then ack", &dead),
            ] {
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {} | {} × rate, {} × CPU |",
                    cell(runs, 0, |r| Some(r.rate)),
                    cell(runs, 3, |r| Some(r.cpu_per_10k)),
                    cell(runs, 3, |r| r.broker_cpu_per_10k),
                    ratio(runs, &success, |r| Some(r.rate)),
                    ratio(runs, &success, |r| Some(r.cpu_per_10k)),
                );
            }
        }
    }
    let soaks: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.scenario == Some(Scenario::Soak))
        .collect();
    if !soaks.is_empty() {
        let _ = writeln!(out, "\n### Soak (pipeline, SOAK_N = {})\n", cfg.soak_n);
        let _ = writeln!(
            out,
            "| side | queue | msg/s | CPU s/10k | RSS at 10% / 50% / 90% of the run, MB | RSS end, MB | VmHWM, MB |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|");
        for r in soaks {
            let at = |frac: f64| {
                let target = (r.n as f64 * frac) as u64;
                r.timeline
                    .iter()
                    .find(|(_, handled, _)| *handled >= target)
                    .map(|(_, _, rss)| format!("{:.1}", *rss as f64 / 1024.0))
                    .unwrap_or_else(|| "–".into())
            };
            let _ = writeln!(
                out,
                "| {:?} | {:?} | {:.0} | {:.3} | {} / {} / {} | {:.1} | {:.1} |",
                r.side.unwrap_or(Side::Burrow),
                r.kind.unwrap_or(Kind::Classic),
                r.rate,
                r.cpu_per_10k,
                at(0.1),
                at(0.5),
                at(0.9),
                r.rss_end_kb as f64 / 1024.0,
                r.hwm_kb as f64 / 1024.0
            );
        }
    }
    let shares: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.scenario == Some(Scenario::Share))
        .collect();
    if !shares.is_empty() {
        let _ = writeln!(
            out,
            "\n### Worker processes draining one queue together\n\n\
             | queue | side | processes | throughput, msg/s, median [min–max] | client CPU, s per 10k (all processes) | broker CPU, s per 10k |\n\
             |---|---|---|---|---|---|"
        );
        for &kind in &cfg.kinds {
            for side in [Side::Burrow, Side::Batched] {
                for &k in &cfg.workers {
                    let runs: Vec<&RunResult> = shares
                        .iter()
                        .copied()
                        .filter(|r| {
                            r.kind == Some(kind) && r.side == Some(side) && r.workers == Some(k)
                        })
                        .collect();
                    if runs.is_empty() {
                        continue;
                    }
                    let _ = writeln!(
                        out,
                        "| {kind:?} | {} | {k} | {} | {} | {} |",
                        side.label(),
                        cell(&runs, 0, |r| Some(r.rate)),
                        cell(&runs, 3, |r| Some(r.cpu_per_10k)),
                        cell(&runs, 3, |r| r.broker_cpu_per_10k),
                    );
                }
            }
        }
    }
    out
}

fn sh(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn machine_header(cfg: &Config) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let broker = sh("timeout", &["20", "rabbitmqctl", "version"])
        .unwrap_or_else(|| "unknown (rabbitmqctl not usable)".into());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rev = sh("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "?".into());
    let dirty = sh("git", &["status", "--porcelain", "--untracked-files=no"]).is_some();
    format!(
        "- machine: {nproc} CPUs (`nproc`), {cpu}; load average at start {}\n\
         - broker: RabbitMQ {broker} on the same machine\n\
         - burrow: commit {rev}{}\n\
         - settings: N={} events, {} rounds (sides alternate in the order {}), window {} unconfirmed, prefetch {}, burrow concurrency {}, body padding {} bytes, \
         ack-batched loop k={}, latency at {} msg/s for {} s, FAIL_N={}, BENCH_TRACING={}, BASELINE_ACK={}, BASELINE_PROPS={}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        if dirty {
            " (+ uncommitted changes)"
        } else {
            ""
        },
        cfg.n,
        cfg.rounds,
        cfg.sides
            .iter()
            .map(|s| s.label())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.window,
        cfg.prefetch,
        concurrency(),
        padding().len(),
        cfg.batch_k,
        cfg.lat_rate,
        cfg.lat_secs,
        cfg.fail_n,
        u8::from(cfg.tracing),
        if cfg.ack_spawn { "spawn" } else { "await" },
        if baseline_full_props() {
            "burrow"
        } else {
            "minimal"
        },
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let spec: Spec = serde_json::from_str(args.get(2).expect("a spec")).expect("a valid spec");
        let result = run_child(spec);
        println!(
            "RESULT {}",
            serde_json::to_string(&result).expect("result serializes")
        );
        return;
    }
    // `cargo test --all-targets` runs bench targets too, without `--bench`:
    // the measurement is minutes of broker load, not a test.
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("benches/e2e measures, it does not test: run it with `make bench`");
        return;
    }

    let cfg = Config::from_env();
    let body_len = serde_json::to_vec(&event(12_345))
        .map(|b| b.len())
        .unwrap_or(0);
    let header = machine_header(&cfg);
    eprintln!("bench_e2e: {body_len}-byte bodies\n{header}");
    let mut parent = Parent {
        run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
        broker_pid: find_broker_pid(&cfg.url),
        cfg,
        specs: Vec::new(),
        results: Vec::new(),
        seq: 0,
    };
    match parent.broker_pid {
        Some(pid) => eprintln!("broker process: pid {pid} (listens on the AMQP port)"),
        None => eprintln!("(no local broker process found: broker CPU is not reported)"),
    }
    let started = Instant::now();
    parent.schedule();
    parent.cleanup();

    let report = report(&parent.results, &parent.cfg);
    println!(
        "## bench_e2e results\n\n{header}\n- body: {body_len} bytes of JSON\n- wall time: {:.0} s\n{report}",
        started.elapsed().as_secs_f64()
    );
    if let Some(dir) = parent.cfg.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match serde_json::to_vec_pretty(&parent.results) {
        Ok(json) => match std::fs::write(&parent.cfg.out, json) {
            Ok(()) => eprintln!("raw results: {}", parent.cfg.out.display()),
            Err(e) => eprintln!("could not write {}: {e}", parent.cfg.out.display()),
        },
        Err(e) => eprintln!("could not serialize results: {e}"),
    }
}
