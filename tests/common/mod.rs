//! Shared helpers for burrow's integration tests against a real RabbitMQ.
//!
//! Every test gets its own app name(s) and its own exchange, so tests never
//! touch `domain_events` and can run in parallel. A [`Cleanup`] guard deletes
//! every queue of each app's topology and the exchange when it is dropped,
//! which also happens when an assertion panics.
//!
//! Waiting is always on an event bounded by [`WAIT`] (or a bound of the
//! test's own): [`within`] around a future (the next outcome, a handler's
//! message), [`eventually`] / [`eventually_within`] around a probe of a state
//! (a queue's count, the worker's state, an endpoint's answer). No test
//! sleeps to synchronise.

#![allow(dead_code, unreachable_pub)]

pub mod bin;
pub mod deep;
pub mod node;
pub mod proxy;
pub mod recorder;

use std::{future::Future, time::Duration};

use burrow::{
    Context, DomainEvent, Event, Outcome, Publisher, Registry, RunReport, Settings, Topology,
    Worker, WorkerHandle, WorkerState, config::AmqpUrl,
};
use chrono::{DateTime, Utc};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    message::Delivery,
    options::{
        BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

/// Upper bound of every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// The broker URL: `AMQP_URL`, or the local guest broker.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `<prefix>-<uuid>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

// ---------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------

/// The event most tests publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CardAdded {
    pub aggregate_id: String,
    pub title: String,
    pub occurred_at: DateTime<Utc>,
}

impl CardAdded {
    pub fn new(title: &str) -> Self {
        Self {
            aggregate_id: unique("card"),
            title: title.to_owned(),
            occurred_at: Utc::now(),
        }
    }
}

impl Event for CardAdded {
    const EVENT_TYPE: &'static str = "CardAddedToLibraryEvent";
}

impl DomainEvent for CardAdded {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        self.occurred_at
    }
}

/// An event type no test app binds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NobodyListens {
    pub aggregate_id: String,
    pub occurred_at: DateTime<Utc>,
}

impl NobodyListens {
    pub fn new() -> Self {
        Self {
            aggregate_id: unique("orphan"),
            occurred_at: Utc::now(),
        }
    }
}

impl Event for NobodyListens {
    const EVENT_TYPE: &'static str = "NobodyListensEvent";
}

impl DomainEvent for NobodyListens {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        self.occurred_at
    }
}

// ---------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------

/// Builds [`Settings`] for one test app: a unique `app.name`, a unique
/// exchange (unless [`TestApp::exchange`] shares one), a short retry ladder,
/// no HTTP endpoint and short timeouts.
#[derive(Debug, Clone)]
pub struct TestApp {
    settings: Settings,
}

impl TestApp {
    pub fn new(prefix: &str) -> Self {
        let mut settings = Settings::default();
        settings.app.name = unique(&format!("t-{prefix}"));
        settings.amqp.url = AmqpUrl::new(amqp_url());
        settings.amqp.exchange = unique("burrow-test-ex");
        settings.retry.delays = vec![Duration::from_millis(300), Duration::from_millis(600)];
        settings.http.addr = None;
        settings.consumer.handler_timeout = Duration::from_secs(5);
        settings.consumer.shutdown_timeout = Duration::from_secs(3);
        settings.publisher.confirm_timeout = Duration::from_secs(10);
        Self { settings }
    }

    /// Shares an exchange with another test app.
    pub fn exchange(mut self, exchange: &str) -> Self {
        self.settings.amqp.exchange = exchange.to_owned();
        self
    }

    pub fn delays_ms(mut self, delays: &[u64]) -> Self {
        self.settings.retry.delays = delays.iter().map(|ms| Duration::from_millis(*ms)).collect();
        self
    }

    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.settings.consumer.handler_timeout = timeout;
        self
    }

    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.settings.consumer.shutdown_timeout = timeout;
        self
    }

    pub fn build(self) -> Settings {
        self.settings
            .validate()
            .expect("test settings must be valid");
        self.settings
    }
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Awaits `fut` for at most [`WAIT`]; panics naming `what` on timeout.
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Polls `probe` every 20 ms until it returns `Ok`, for at most [`WAIT`];
/// on timeout panics naming `what` and the last `Err` the probe gave (the
/// state it saw instead of the one waited for).
pub async fn eventually<T, E, F, Fut>(what: &str, probe: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    eventually_within(what, WAIT, probe).await
}

/// [`eventually`] with a bound of its own, for the waits that take longer
/// than [`WAIT`] by design (a reconnect after the backoff grew).
pub async fn eventually_within<T, E, F, Fut>(what: &str, bound: Duration, mut probe: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {bound:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The next outcome broadcast by a worker.
pub async fn next_outcome(rx: &mut broadcast::Receiver<Outcome>) -> Outcome {
    within("a delivery outcome", rx.recv())
        .await
        .expect("the outcomes channel closed or lagged")
}

/// The next value a recording handler sent.
pub async fn next_seen<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    within("a handler invocation", rx.recv())
        .await
        .expect("every handler sender was dropped")
}

/// A running worker that is shut down when dropped, so that a failing test
/// never leaves a worker behind to re-declare queues the [`Cleanup`] deletes.
/// Declare the `Cleanup` guard first: locals drop in reverse order.
pub struct TestWorker {
    handle: Option<WorkerHandle>,
}

impl TestWorker {
    pub fn new(handle: WorkerHandle) -> Self {
        Self {
            handle: Some(handle),
        }
    }

    fn handle(&self) -> &WorkerHandle {
        self.handle.as_ref().expect("worker handle")
    }

    pub fn state(&self) -> WorkerState {
        self.handle().state()
    }

    pub fn outcomes(&self) -> broadcast::Receiver<Outcome> {
        self.handle().outcomes()
    }

    /// [`WorkerHandle::consuming`].
    pub async fn consuming(&mut self) -> burrow::Result<()> {
        self.handle
            .as_mut()
            .expect("worker handle")
            .consuming()
            .await
    }

    /// [`WorkerHandle::shutdown`].
    pub async fn shutdown(mut self) -> burrow::Result<RunReport> {
        self.stop().await
    }

    /// [`WorkerHandle::shutdown`] through a borrow, for a worker that is a
    /// field of a fixture; the guard is empty afterwards.
    pub async fn stop(&mut self) -> burrow::Result<RunReport> {
        self.handle.take().expect("worker handle").shutdown().await
    }

    /// [`WorkerHandle::join`].
    pub async fn join(mut self) -> burrow::Result<RunReport> {
        self.handle.take().expect("worker handle").join().await
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // A current-thread runtime runs the shutdown only once this thread
        // returns to it: waiting here would only time out. Ask for it and go
        // on; the runtime ends the worker with the test at the latest.
        if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(WAIT, handle.shutdown()).await;
            });
            return;
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let _ = tokio::time::timeout(WAIT, handle.shutdown()).await;
            let _ = done_tx.send(());
        });
        // The test body runs on the runtime's block_on thread; the worker
        // threads carry the shutdown out meanwhile.
        let _ = done_rx.recv_timeout(WAIT);
    }
}

/// Spawns a worker, subscribes to its outcomes and waits until it consumes.
/// If it stops before consuming, panics with the worker's own error.
pub async fn start_worker(
    settings: Settings,
    registry: Registry,
) -> (TestWorker, broadcast::Receiver<Outcome>) {
    let mut handle = Worker::new(settings, registry).expect("worker").spawn();
    let outcomes = handle.outcomes();
    if within("the worker to consume", handle.consuming())
        .await
        .is_err()
    {
        let err = within("the failed worker to stop", handle.join()).await;
        panic!("the worker did not start consuming: {err:?}");
    }
    (TestWorker::new(handle), outcomes)
}

/// A publisher for `settings` (its exchange and app id).
pub async fn publisher(settings: &Settings) -> Publisher {
    within("the publisher to connect", Publisher::connect(settings))
        .await
        .expect("publisher connects")
}

// ---------------------------------------------------------------------------
// Recording handlers
// ---------------------------------------------------------------------------

/// What a handler saw on one invocation.
#[derive(Debug, Clone)]
pub struct Seen {
    pub event: CardAdded,
    pub ctx: Context,
}

/// A sender/receiver pair for [`Seen`] invocations.
pub fn seen_channel() -> (mpsc::UnboundedSender<Seen>, mpsc::UnboundedReceiver<Seen>) {
    mpsc::unbounded_channel()
}

// ---------------------------------------------------------------------------
// Raw AMQP
// ---------------------------------------------------------------------------

/// A plain lapin connection with one confirm-mode channel, for publishing
/// arbitrary bytes and properties and for inspecting queues with `basic_get`.
pub struct Raw {
    pub conn: Connection,
    pub channel: Channel,
}

impl Raw {
    /// A raw connection to the shared broker.
    pub async fn connect() -> Self {
        Self::connect_to(&amqp_url()).await
    }

    /// A raw connection to the broker at `url` (a node of the test's own).
    pub async fn connect_to(url: &str) -> Self {
        let conn = within(
            "a raw AMQP connection",
            burrow::internals::connect(
                &AmqpUrl::new(url.to_owned()),
                30,
                "burrow integration test (raw)",
            ),
        )
        .await
        .expect("raw connection");
        let channel = conn.create_channel().await.expect("raw channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        Self { conn, channel }
    }

    /// Publishes and waits for the broker's confirm (not mandatory).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .expect("raw basic.publish");
        let confirmation = within("a raw publish confirm", confirm)
            .await
            .expect("raw confirm");
        assert!(
            matches!(confirmation, Confirmation::Ack(None)),
            "raw publish to {exchange:?}/{routing_key:?} was not confirmed: {confirmation:?}"
        );
    }

    /// One message from `queue` (auto-acked), if any.
    pub async fn get(&self, queue: &str) -> Option<Delivery> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
            .map(|m| m.delivery)
    }

    /// Polls `queue` until a message is there, for at most [`WAIT`].
    pub async fn wait_get(&self, queue: &str) -> Delivery {
        eventually(&format!("a message in {queue}"), || async {
            self.get(queue).await.ok_or("the queue is empty")
        })
        .await
    }

    /// The number of ready messages in `queue` (passive declare), read once.
    /// Right for a queue nobody consumes from, whose messages arrived with a
    /// confirm; after a consumer went away use [`Raw::resting_count`].
    pub async fn message_count(&self, queue: &str) -> u32 {
        ready_count(&self.conn, queue).await
    }

    /// The number of ready messages in `queue` once no consumer is attached.
    ///
    /// A consumer's unacked deliveries return to the queue when the broker
    /// processes its channel's end, which can come after the client saw its
    /// connection closed (or its process exit). The queue drops the consumer
    /// and requeues its deliveries in one step (classic: the channel-down
    /// message; quorum: one `down` command), so a count read once the
    /// consumer count is 0 includes everything that went back.
    pub async fn resting_count(&self, queue: &str) -> u32 {
        eventually(&format!("the consumers of {queue} to go away"), || async {
            let (messages, consumers) = queue_counts(&self.conn, queue).await;
            if consumers == 0 {
                Ok(messages)
            } else {
                Err(format!("{consumers} consumer(s) still attached"))
            }
        })
        .await
    }

    /// Waits until `queue` holds `expected` ready messages, for at most
    /// [`WAIT`]; `what` says why the test expects that many.
    ///
    /// Polled rather than read once: messages a browse took without acking
    /// return to a quorum queue only after the browsing channel closed, and
    /// acks can trail the handler's return. A message really removed or
    /// duplicated still fails: the count never settles at `expected`.
    pub async fn wait_ready(&self, queue: &str, expected: u32, what: &str) {
        eventually(
            &format!("{what}: {queue} to hold {expected} ready messages"),
            || async {
                let ready = ready_count(&self.conn, queue).await;
                if ready == expected {
                    Ok(())
                } else {
                    Err(format!("{ready} ready"))
                }
            },
        )
        .await
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// The number of ready messages in `queue`, read with a passive declare on a
/// channel of its own.
pub async fn ready_count(conn: &Connection, queue: &str) -> u32 {
    queue_counts(conn, queue).await.0
}

/// `(ready messages, consumers)` of `queue`, from a passive declare on a
/// channel of its own.
pub async fn queue_counts(conn: &Connection, queue: &str) -> (u32, u32) {
    let channel = conn.create_channel().await.expect("channel");
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("passive declare of {queue}: {e}"));
    let _ = channel.close(200, "counted".into()).await;
    (q.message_count(), q.consumer_count())
}

/// Whether `queue` exists: a passive declare on a channel of its own, which
/// the broker closes when the queue is missing.
pub async fn queue_exists(conn: &Connection, queue: &str) -> bool {
    let channel = conn.create_channel().await.expect("channel");
    let found = within(
        &format!("a passive declare of {queue}"),
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .is_ok();
    if channel.status().connected() {
        let _ = channel.close(200, "checked".into()).await;
    }
    found
}

/// A header's value as the broker delivered it, for checks of its exact type.
pub fn header_value<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(name)
}

/// A string header (long or short string).
pub fn header_str(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        other => panic!("header {name} is not a string: {other:?}"),
    }
}

/// An integer header.
pub fn header_i64(properties: &BasicProperties, name: &str) -> Option<i64> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::Timestamp(n) => Some(*n as i64),
        other => panic!("header {name} is not an integer: {other:?}"),
    }
}

/// A string-array header.
pub fn header_strings(properties: &BasicProperties, name: &str) -> Option<Vec<String>> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::FieldArray(items) => Some(
            items
                .as_slice()
                .iter()
                .map(|v| match v {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    AMQPValue::ShortString(s) => s.to_string(),
                    other => panic!("header {name} holds a non-string: {other:?}"),
                })
                .collect(),
        ),
        other => panic!("header {name} is not an array: {other:?}"),
    }
}

/// Current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

// ---------------------------------------------------------------------------
// Cleanup
// ---------------------------------------------------------------------------

/// Deletes every queue of the registered apps' topologies and their
/// exchanges when dropped, even when the test panicked.
#[derive(Debug, Default)]
pub struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the queues (app queue, retry steps, dead letters) and the
    /// exchange of the app described by `settings`.
    pub fn app(&mut self, settings: &Settings) -> &mut Self {
        let topology = Topology::for_app(settings, &Registry::new());
        for q in topology.queues {
            if !self.queues.contains(&q.name) {
                self.queues.push(q.name);
            }
        }
        // An ordered app's shard exchange too (its queues are listed above).
        if let Some(shards) = &topology.shards {
            self.exchange(&shards.name);
        }
        self.exchange(&topology.exchange)
    }

    pub fn exchange(&mut self, exchange: &str) -> &mut Self {
        if !self.exchanges.iter().any(|e| e == exchange) {
            self.exchanges.push(exchange.to_owned());
        }
        self
    }

    pub fn queue(&mut self, queue: &str) -> &mut Self {
        if !self.queues.iter().any(|q| q == queue) {
            self.queues.push(queue.to_owned());
        }
        self
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        // A thread of its own: Drop may run inside the test's runtime, which
        // must not be blocked on from within.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                let work = async {
                    let conn = burrow::internals::connect(
                        &AmqpUrl::new(amqp_url()),
                        30,
                        "burrow integration test (cleanup)",
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    for q in &queues {
                        // A fresh channel each: a failed delete closes its channel.
                        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
                        if let Err(e) = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await
                        {
                            eprintln!("cleanup: deleting queue {q}: {e}");
                        } else {
                            let _ = ch.close(200, "cleanup".into()).await;
                        }
                    }
                    for ex in &exchanges {
                        // The delay chain in front of it, when anything
                        // declared one (`burrow topology apply`, a delayed
                        // publish); deleting what is not there is harmless.
                        if let Err(e) = burrow::DelayChain::new(ex).delete(&conn).await {
                            eprintln!("cleanup: deleting the delay chain of {ex}: {e}");
                        }
                        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
                        if let Err(e) = ch
                            .exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
                            .await
                        {
                            eprintln!("cleanup: deleting exchange {ex}: {e}");
                        } else {
                            let _ = ch.close(200, "cleanup".into()).await;
                        }
                    }
                    let _ = conn.close(200, "cleanup".into()).await;
                    Ok::<(), String>(())
                };
                match tokio::time::timeout(WAIT, work).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("cleanup failed: {e}"),
                    Err(_) => eprintln!("cleanup timed out"),
                }
            });
        });
        let _ = done.join();
    }
}
