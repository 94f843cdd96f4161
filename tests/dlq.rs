//! The dead-letter queue operations against a real RabbitMQ: list and show
//! browse without removing, replay sends letters back to the failed
//! handlers only, purge removes everything or only old letters.
//!
//! Self-contained (no `mod common`): every test has its own app name and
//! exchange, a [`Cleanup`] guard deletes them even when an assertion fails,
//! and every wait is bounded by [`WAIT`].

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use burrow::{
    Context, DeadLettered, DeadReason, DomainEvent, Event, EventMeta, HandlerError, Outcome,
    Publisher, Registry, Settings, Topology, Worker, WorkerHandle,
    config::AmqpUrl,
    dlq::{self, ReplayFilter, ReplayReport},
};
use chrono::{DateTime, Utc};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{
        BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
        ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

const WAIT: Duration = Duration::from_secs(20);

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CardAdded {
    aggregate_id: String,
    title: String,
    occurred_at: DateTime<Utc>,
}

impl CardAdded {
    fn new(title: &str) -> Self {
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

/// Settings of a test app: unique app name and exchange, short timeouts.
fn settings(prefix: &str) -> Settings {
    let mut s = Settings::default();
    s.app.name = unique(&format!("t-{prefix}"));
    s.amqp.url = AmqpUrl::new(amqp_url());
    s.amqp.exchange = unique("burrow-test-ex");
    s.retry.delays = vec![Duration::from_millis(300)];
    s.http.addr = None;
    s.consumer.handler_timeout = Duration::from_secs(5);
    s.consumer.shutdown_timeout = Duration::from_secs(3);
    s.publisher.confirm_timeout = Duration::from_secs(10);
    s.validate().expect("test settings are valid");
    s
}

/// Deletes the app's queues and exchange when dropped, even on panic.
struct Cleanup {
    queues: Vec<String>,
    exchange: String,
}

impl Cleanup {
    fn new(settings: &Settings) -> Self {
        let topology = Topology::for_app(settings, &Registry::new());
        Self {
            queues: topology.queues.into_iter().map(|q| q.name).collect(),
            exchange: topology.exchange,
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let exchange = std::mem::take(&mut self.exchange);
        // A thread of its own: the test's runtime must not be blocked on.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                let work = async {
                    let conn = connect("cleanup").await;
                    for q in &queues {
                        let ch = conn.create_channel().await.expect("channel");
                        if ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await
                            .is_ok()
                        {
                            let _ = ch.close(200, "cleanup".into()).await;
                        }
                    }
                    let ch = conn.create_channel().await.expect("channel");
                    if ch
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await
                        .is_ok()
                    {
                        let _ = ch.close(200, "cleanup".into()).await;
                    }
                    let _ = conn.close(200, "cleanup".into()).await;
                };
                if tokio::time::timeout(WAIT, work).await.is_err() {
                    eprintln!("cleanup timed out");
                }
            });
        });
        let _ = done.join();
    }
}

/// A running worker, shut down when dropped so a failing test leaves none behind.
struct TestWorker(Option<WorkerHandle>);

impl TestWorker {
    async fn shutdown(mut self) {
        let handle = self.0.take().expect("worker handle");
        within("worker shutdown", handle.shutdown())
            .await
            .expect("worker stops cleanly");
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        let (Some(handle), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let _ = tokio::time::timeout(WAIT, handle.shutdown()).await;
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(WAIT);
    }
}

async fn start_worker(
    settings: &Settings,
    registry: Registry,
) -> (TestWorker, broadcast::Receiver<Outcome>) {
    let mut handle = Worker::new(settings.clone(), registry)
        .expect("worker")
        .spawn();
    let outcomes = handle.outcomes();
    if within("the worker to consume", handle.consuming())
        .await
        .is_err()
    {
        let err = within("the failed worker to stop", handle.join()).await;
        panic!("the worker did not start consuming: {err:?}");
    }
    (TestWorker(Some(handle)), outcomes)
}

async fn next_outcome(rx: &mut broadcast::Receiver<Outcome>) -> Outcome {
    within("a delivery outcome", rx.recv())
        .await
        .expect("outcomes channel open")
}

async fn publisher(settings: &Settings) -> Publisher {
    within("the publisher to connect", Publisher::connect(settings))
        .await
        .expect("publisher")
}

async fn connect(what: &str) -> Connection {
    within(
        "a connection",
        burrow::internals::connect(
            &AmqpUrl::new(amqp_url()),
            30,
            &format!("burrow test dlq ({what})"),
        ),
    )
    .await
    .expect("connection")
}

/// Declares the app's queues (no bindings) as the worker would.
async fn declare(settings: &Settings, conn: &Connection) {
    within(
        "topology declare",
        burrow::internals::declare(&Topology::for_app(settings, &Registry::new()), conn),
    )
    .await
    .expect("topology declared");
}

async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    ch
}

/// Publishes straight to `queue` (default exchange) and waits for the confirm.
async fn publish_to(ch: &Channel, queue: &str, body: &[u8], properties: BasicProperties) {
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("basic.publish");
    let confirmation = within("a publish confirm", confirm).await.expect("confirm");
    assert!(
        matches!(confirmation, Confirmation::Ack(None)),
        "not confirmed: {confirmation:?}"
    );
}

/// Ready messages in `queue` (passive declare on a channel of its own).
async fn ready(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    let q = within(
        "a passive declare",
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue exists");
    let _ = ch.close(200, "done".into()).await;
    q.message_count()
}

/// Waits until `queue` holds `expected` ready messages. Messages a browse
/// took without acking return to a quorum queue asynchronously after the
/// browsing channel closed, so the count is polled (under [`WAIT`]) rather
/// than read once; a message really removed or duplicated still fails.
async fn settles_at(conn: &Connection, queue: &str, expected: u32, what: &str) {
    let mut last = None;
    let polled = tokio::time::timeout(WAIT, async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            let n = ready(conn, queue).await;
            if n == expected {
                return;
            }
            last = Some(n);
        }
    })
    .await;
    assert!(
        polled.is_ok(),
        "{what}: {queue} holds {last:?} ready messages, expected {expected}"
    );
}

fn headers(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

fn header<'a>(p: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    p.headers().as_ref()?.inner().get(name)
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_show_browse_what_the_worker_dead_lettered() {
    let settings = settings("dlq-list");
    let _cleanup = Cleanup::new(&settings);
    let mut registry = Registry::new();
    registry
        .on("library.attach_card", |_: CardAdded, _| async move {
            Err::<(), _>(HandlerError::permanent("library lib-9 does not exist"))
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(&settings, registry).await;
    let publisher = publisher(&settings).await;
    let conn = connect("list").await;
    let dead = settings.dead_letter_queue();

    let before = now_ms();
    let events = [CardAdded::new("Solaris"), CardAdded::new("Eden")];
    let ids = [unique("msg"), unique("msg")];
    for (event, id) in events.iter().zip(&ids) {
        within(
            "publish",
            publisher.publish_with(event, EventMeta::default().message_id(id)),
        )
        .await
        .unwrap();
    }
    for _ in 0..2 {
        let o = next_outcome(&mut outcomes).await;
        assert_eq!(
            o.dead_lettered.as_ref().map(|d| d.reason),
            Some(DeadReason::Permanent)
        );
        assert!(o.acked, "acked only after the dead letter was confirmed");
    }
    let after = now_ms();

    let letters = within("dlq list", dlq::list(&settings, 10)).await.unwrap();
    assert_eq!(letters.len(), 2, "{letters:#?}");
    for (event, id) in events.iter().zip(&ids) {
        let l = letters
            .iter()
            .find(|l| &l.message_id == id)
            .expect("each letter is listed");
        assert_eq!(l.event_type, "CardAddedToLibraryEvent");
        assert_eq!(l.reason.as_deref(), Some("permanent"));
        assert_eq!(l.failed_handler.as_deref(), Some("library.attach_card"));
        assert_eq!(l.handlers, vec!["library.attach_card".to_owned()]);
        assert_eq!(l.attempts, Some(1));
        let error = l.last_error.as_deref().unwrap();
        assert!(error.contains("library lib-9 does not exist"), "{error}");
        let dead_at = l.dead_at_ms.expect("burrow-dead-at");
        assert!(
            (before..=after).contains(&dead_at),
            "dead at {dead_at} not in [{before}, {after}]"
        );
        assert!(l.first_failure_at_ms.is_some_and(|t| t <= dead_at));
        assert_eq!(l.replays, 0);
        assert_eq!(l.routing_key, dead);
        assert_eq!(
            l.body,
            serde_json::to_vec(event).unwrap(),
            "the body byte for byte"
        );
    }

    // Browsing removes nothing; the limit is honoured.
    settles_at(&conn, &dead, 2, "the dead queue").await;
    assert_eq!(
        within("dlq list", dlq::list(&settings, 1))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        within("dlq list", dlq::list(&settings, 10))
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(within("dlq count", dlq::count(&settings)).await.unwrap(), 2);

    let shown = within("dlq show", dlq::show(&settings, &ids[1]))
        .await
        .unwrap()
        .expect("shown");
    assert_eq!(shown.message_id, ids[1]);
    assert_eq!(
        serde_json::from_slice::<CardAdded>(&shown.body).unwrap(),
        events[1]
    );
    assert!(
        within("dlq show", dlq::show(&settings, "no-such-id"))
            .await
            .unwrap()
            .is_none()
    );
    settles_at(&conn, &dead, 2, "show removes nothing").await;

    let table = dlq::render_table(&letters);
    assert!(
        table.lines().count() == 3 && ids.iter().all(|id| table.contains(id.as_str())),
        "{table}"
    );
    assert!(
        table.contains("permanent") && table.contains("library.attach_card"),
        "{table}"
    );
    let detail = dlq::render_detail(&shown);
    assert!(
        detail.contains("\"title\": \"Eden\""),
        "the body is pretty-printed: {detail}"
    );
    assert!(
        detail.contains("burrow-failed-handler = \"library.attach_card\""),
        "{detail}"
    );

    let _ = conn.close(200, "done".into()).await;
    publisher.close().await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letters_the_broker_parked_after_the_delivery_limit_are_read_and_replayed() {
    let mut settings = settings("dlq-limit");
    settings.queue.delivery_limit = 1;
    let _cleanup = Cleanup::new(&settings);
    let conn = connect("limit").await;
    declare(&settings, &conn).await;
    let app = settings.app_queue();
    let dead = settings.dead_letter_queue();
    let ch = confirm_channel(&conn).await;

    let before = now_ms();
    let body = br#"{"aggregateId":"c-1","title":"Ubik","occurredAt":"2024-01-01T00:00:00Z"}"#;
    publish_to(
        &ch,
        &app,
        body,
        BasicProperties::default()
            .with_message_id("crash-loop-1".into())
            .with_type("CardAddedToLibraryEvent".into())
            .with_delivery_mode(2),
    )
    .await;
    // Crash-loop it: take and return it until the broker parks it.
    within("the broker to park the message", async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while ready(&conn, &dead).await == 0 {
            match ch
                .basic_get(app.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .unwrap()
            {
                Some(m) => ch
                    .basic_nack(
                        m.delivery.delivery_tag,
                        BasicNackOptions {
                            requeue: true,
                            multiple: false,
                        },
                    )
                    .await
                    .unwrap(),
                None => {
                    tick.tick().await;
                }
            }
        }
    })
    .await;
    let after = now_ms();

    let letters = within("dlq list", dlq::list(&settings, 10)).await.unwrap();
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(l.message_id, "crash-loop-1");
    assert_eq!(l.reason.as_deref(), Some("delivery_limit"), "from x-death");
    assert_eq!(
        l.event_type, "CardAddedToLibraryEvent",
        "from the type property"
    );
    assert_eq!((l.failed_handler.as_deref(), l.attempts), (None, None));
    assert!(l.handlers.is_empty());
    let dead_at = l.dead_at_ms.expect("time of x-death");
    assert!(
        dead_at > before - 1000 && dead_at <= after,
        "x-death time {dead_at}"
    );
    assert!(dlq::render_table(&letters).contains("delivery_limit"));

    // Replayed to the app queue as a first attempt for every handler.
    let publisher = publisher(&settings).await;
    let report = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &ReplayFilter::default(), &mut |_| {}),
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        ReplayReport {
            replayed: 1,
            skipped: 0,
            left: 0
        }
    );
    settles_at(&conn, &dead, 0, "the dead queue").await;
    let copy = within("the replayed copy", async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if let Some(m) = ch
                .basic_get(app.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                return m.delivery;
            }
        }
    })
    .await;
    assert_eq!(copy.data, body.to_vec());
    let p = &copy.properties;
    assert_eq!(
        p.message_id().as_ref().map(|s| s.as_str()),
        Some("crash-loop-1")
    );
    assert_eq!(
        header(p, "burrow-event-type"),
        Some(&long("CardAddedToLibraryEvent"))
    );
    assert_eq!(
        header(p, "burrow-attempt"),
        Some(&AMQPValue::LongLongInt(1))
    );
    assert_eq!(
        header(p, "burrow-replays"),
        Some(&AMQPValue::LongLongInt(1))
    );
    assert_eq!(header(p, "burrow-handlers"), None, "every handler runs");

    publisher.close().await;
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_runs_only_the_failed_handler_again_and_empties_the_queue() {
    let settings = settings("dlq-replay");
    let _cleanup = Cleanup::new(&settings);

    let failed_once = Arc::new(AtomicBool::new(false));
    let attach_runs = Arc::new(AtomicUsize::new(0));
    let index_runs = Arc::new(AtomicUsize::new(0));
    let (tx, mut contexts) = mpsc::unbounded_channel::<Context>();
    let mut registry = Registry::new();
    {
        let (failed_once, attach_runs) = (failed_once.clone(), attach_runs.clone());
        registry
            .on("library.attach_card", move |_: CardAdded, ctx: Context| {
                attach_runs.fetch_add(1, Ordering::SeqCst);
                tx.send(ctx).unwrap();
                let first = !failed_once.swap(true, Ordering::SeqCst);
                async move {
                    if first {
                        Err(HandlerError::permanent("library lib-9 does not exist yet"))
                    } else {
                        Ok(())
                    }
                }
            })
            .unwrap();
    }
    {
        let index_runs = index_runs.clone();
        registry
            .on("search.index_card", move |_: CardAdded, _| {
                index_runs.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, HandlerError>(()) }
            })
            .unwrap();
    }
    let (worker, mut outcomes) = start_worker(&settings, registry).await;
    let publisher = publisher(&settings).await;
    let conn = connect("replay").await;
    let dead = settings.dead_letter_queue();

    let id = unique("msg");
    within(
        "publish",
        publisher.publish_with(
            &CardAdded::new("Roadside Picnic"),
            EventMeta::default().message_id(&id),
        ),
    )
    .await
    .unwrap();
    let first = next_outcome(&mut outcomes).await;
    assert_eq!(first.succeeded, vec!["search.index_card".to_owned()]);
    assert_eq!(
        first.dead_lettered,
        Some(DeadLettered {
            reason: DeadReason::Permanent,
            handlers: vec!["library.attach_card".to_owned()]
        })
    );
    assert!(first.acked);
    assert_eq!(
        within("a handler run", contexts.recv())
            .await
            .unwrap()
            .attempt,
        1
    );
    settles_at(&conn, &dead, 1, "the dead queue").await;

    // Filters that do not match leave the letter where it is.
    let other_event = ReplayFilter {
        event: Some("CollectionCreatedEvent".into()),
        ..Default::default()
    };
    let report = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &other_event, &mut |_| {}),
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        ReplayReport {
            replayed: 0,
            skipped: 1,
            left: 1
        }
    );
    let other_handler = ReplayFilter {
        handler: Some("search.index_card".into()),
        ..Default::default()
    };
    let report = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &other_handler, &mut |_| {}),
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        ReplayReport {
            replayed: 0,
            skipped: 1,
            left: 1
        }
    );
    let none = ReplayFilter {
        limit: Some(0),
        ..Default::default()
    };
    let report = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &none, &mut |_| {}),
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        ReplayReport {
            left: 1,
            ..ReplayReport::default()
        }
    );
    settles_at(&conn, &dead, 1, "the dead queue").await;

    let matching = ReplayFilter {
        event: Some("CardAddedToLibraryEvent".into()),
        ..Default::default()
    };
    let report = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &matching, &mut |_| {}),
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        ReplayReport {
            replayed: 1,
            skipped: 0,
            left: 0
        }
    );
    settles_at(
        &conn,
        &dead,
        0,
        "the letter is removed once its copy is confirmed",
    )
    .await;

    let second = next_outcome(&mut outcomes).await;
    assert_eq!(second.message_id, id);
    assert_eq!(second.attempt, 1);
    assert_eq!(
        second.succeeded,
        vec!["library.attach_card".to_owned()],
        "only the failed handler ran"
    );
    assert_eq!(
        (second.retried.clone(), second.dead_lettered.clone()),
        (None, None)
    );
    assert!(second.acked);
    let ctx = within("the replayed run", contexts.recv()).await.unwrap();
    assert_eq!(ctx.message_id, id);
    assert_eq!(ctx.headers.get_i64("burrow-replays"), Some(1));
    assert!(!ctx.headers.contains("burrow-dead-reason"));

    assert_eq!(attach_runs.load(Ordering::SeqCst), 2);
    assert_eq!(
        index_runs.load(Ordering::SeqCst),
        1,
        "the handler that succeeded did not run again"
    );
    assert!(
        within("dlq list", dlq::list(&settings, 10))
            .await
            .unwrap()
            .is_empty()
    );

    let _ = conn.close(200, "done".into()).await;
    publisher.close().await;
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_cannot_be_delivered_leaves_the_letter_parked() {
    let settings = settings("dlq-unroutable");
    let _cleanup = Cleanup::new(&settings);
    let conn = connect("unroutable").await;
    declare(&settings, &conn).await;
    let dead = settings.dead_letter_queue();
    let ch = confirm_channel(&conn).await;
    publish_to(
        &ch,
        &dead,
        b"{}",
        BasicProperties::default()
            .with_message_id("stuck-1".into())
            .with_headers(headers(vec![
                ("burrow-event-type", long("CardAddedToLibraryEvent")),
                ("burrow-dead-reason", long("permanent")),
            ])),
    )
    .await;
    // Without the app queue the copy is unroutable.
    ch.queue_delete(
        settings.app_queue().as_str().into(),
        QueueDeleteOptions::default(),
    )
    .await
    .unwrap();

    let publisher = publisher(&settings).await;
    let err = within(
        "dlq replay",
        dlq::replay(&settings, &publisher, &ReplayFilter::default(), &mut |_| {}),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, burrow::Error::Unroutable { .. }), "{err:?}");
    settles_at(&conn, &dead, 1, "the letter is still parked").await;
    let shown = within("dlq show", dlq::show(&settings, "stuck-1"))
        .await
        .unwrap()
        .expect("still there");
    assert_eq!(shown.reason.as_deref(), Some("permanent"));

    publisher.close().await;
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_removes_old_letters_or_everything() {
    let settings = settings("dlq-purge");
    let _cleanup = Cleanup::new(&settings);
    let conn = connect("purge").await;
    declare(&settings, &conn).await;
    let dead = settings.dead_letter_queue();
    let ch = confirm_channel(&conn).await;

    let hour_ms = 3_600_000;
    let letter = |id: &str, dead_at: Option<i64>| {
        let mut h = vec![
            ("burrow-event-type", long("CardAddedToLibraryEvent")),
            ("burrow-dead-reason", long("permanent")),
        ];
        if let Some(at) = dead_at {
            h.push(("burrow-dead-at", AMQPValue::LongLongInt(at)));
        }
        BasicProperties::default()
            .with_message_id(id.into())
            .with_delivery_mode(2)
            .with_headers(headers(h))
    };
    publish_to(
        &ch,
        &dead,
        b"{}",
        letter("old", Some(now_ms() - 2 * hour_ms)),
    )
    .await;
    publish_to(&ch, &dead, b"{}", letter("recent", Some(now_ms()))).await;
    publish_to(&ch, &dead, b"{}", letter("ageless", None)).await;

    let purged = within(
        "dlq purge",
        dlq::purge(&settings, &older_than(3600), &mut |_| {}),
    )
    .await
    .unwrap()
    .purged;
    assert_eq!(purged, 1);
    let mut left: Vec<String> = within("dlq list", dlq::list(&settings, 10))
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.message_id)
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec!["ageless".to_owned(), "recent".to_owned()],
        "younger and undated letters stay"
    );

    let purged = within(
        "dlq purge",
        dlq::purge(&settings, &older_than(86_400), &mut |_| {}),
    )
    .await
    .unwrap()
    .purged;
    assert_eq!(purged, 0);
    settles_at(&conn, &dead, 2, "the dead queue").await;

    let purged = within(
        "dlq purge",
        dlq::purge(&settings, &dlq::Filter::default(), &mut |_| {}),
    )
    .await
    .unwrap()
    .purged;
    assert_eq!(purged, 2);
    settles_at(&conn, &dead, 0, "the dead queue").await;
    assert!(
        within("dlq list", dlq::list(&settings, 10))
            .await
            .unwrap()
            .is_empty()
    );

    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_a_missing_dead_letter_queue_fail_with_a_hint() {
    let settings = settings("dlq-missing");
    let _cleanup = Cleanup::new(&settings);
    let err = within("dlq list", dlq::list(&settings, 10))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&settings.dead_letter_queue()) && text.contains("topology apply"),
        "{text}"
    );
    assert!(text.contains("NOT_FOUND"), "{text}");
}

fn older_than(secs: u64) -> dlq::Filter {
    dlq::Filter {
        older_than: Some(Duration::from_secs(secs)),
        ..dlq::Filter::default()
    }
}
