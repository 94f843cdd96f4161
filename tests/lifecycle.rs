//! The worker's life with a broker that goes away: the app stopped and
//! started on a node of our own, TCP connections cut, a network blackhole
//! only heartbeats notice, the broker cancelling the consumer; and what the
//! HTTP endpoint says meanwhile (`/readyz`, `/healthz`, `/metrics`).
//!
//! Every event carries a unique aggregate id and the handler tallies each id
//! it sees, so "nothing lost" is checked id by id: every publish that
//! returned `Ok` (confirmed) is handled at least once. Duplicates are
//! allowed (at-least-once) and printed.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use burrow::{HandlerError, Publisher, Registry, Settings, Worker, WorkerState, config::AmqpUrl};
use common::{
    bin::{self, http_get, metric},
    node::Node,
    proxy::Proxy,
    *,
};
use lapin::options::QueueDeleteOptions;
use tokio::sync::{mpsc, oneshot};

/// Bound for the worker to notice a lost broker and be back: the reconnect
/// backoff grows to 30 s between attempts.
const RECOVER: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// How many times each aggregate id was handled.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<HashMap<String, u32>>>);

impl Tally {
    /// A registry whose one handler tallies every event it receives.
    fn registry(&self) -> Registry {
        let tally = self.clone();
        let mut registry = Registry::new();
        registry
            .on("lifecycle.tally", move |event: CardAdded, _ctx| {
                let tally = tally.clone();
                async move {
                    *tally
                        .0
                        .lock()
                        .unwrap()
                        .entry(event.aggregate_id)
                        .or_default() += 1;
                    Ok::<_, HandlerError>(())
                }
            })
            .unwrap();
        registry
    }

    fn handled(&self, id: &str) -> u32 {
        self.0.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    /// Waits until every id in `ids` was handled, for at most [`RECOVER`];
    /// panics naming the missing.
    async fn wait_all(&self, ids: &[String], what: &str) {
        eventually_within(
            &format!("{what}: every confirmed event to be handled"),
            RECOVER,
            || async {
                let missing: Vec<&String> = ids.iter().filter(|id| self.handled(id) == 0).collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "{} of {} never handled: {missing:?}",
                        missing.len(),
                        ids.len()
                    ))
                }
            },
        )
        .await
    }

    /// Handler runs beyond the first, over all ids.
    fn duplicates(&self) -> u32 {
        self.0.lock().unwrap().values().map(|n| n - 1).sum()
    }
}

/// Publishes `n` events concurrently; every one must be confirmed.
async fn publish_n(publisher: &Publisher, n: usize, title: &str) -> Vec<String> {
    let events: Vec<CardAdded> = (0..n).map(|_| CardAdded::new(title)).collect();
    within(
        &format!("{n} confirmed publishes ({title})"),
        publisher.publish_batch(&events),
    )
    .await
    .unwrap_or_else(|e| panic!("publishing {title}: {e}"));
    events.into_iter().map(|e| e.aggregate_id).collect()
}

/// Waits until the worker's state is `want`, for at most `bound`.
async fn wait_state(worker: &TestWorker, want: WorkerState, bound: Duration) {
    eventually_within(&format!("the worker to be {want:?}"), bound, || async {
        match worker.state() {
            state if state == want => Ok(()),
            state => Err(format!("it is {state:?}")),
        }
    })
    .await
}

/// Waits until `queue` on the broker at `url` holds no ready message (acks
/// may trail the handler by a moment).
async fn wait_queue_empty(url: &str, queue: &str) {
    let raw = Raw::connect_to(url).await;
    raw.wait_ready(queue, 0, "every event handled").await;
    raw.close().await;
}

fn settings_for(prefix: &str, url: &str) -> Settings {
    let mut settings = TestApp::new(prefix).build();
    settings.amqp.url = AmqpUrl::new(url.to_owned());
    // Long enough for a publish to outlive a broker outage and be sent again.
    settings.publisher.confirm_timeout = Duration::from_secs(60);
    settings
}

// ---------------------------------------------------------------------------
// A broker that stops and starts
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_and_publisher_ride_out_stop_app_and_start_app_losing_nothing() {
    let node = Node::start("lifecycle").await;
    let settings = settings_for("stop-app", &node.url());
    let tally = Tally::default();
    let (worker, _outcomes) = start_worker(settings.clone(), tally.registry()).await;
    let publisher = publisher(&settings).await;

    let before = publish_n(&publisher, 20, "before").await;
    tally.wait_all(&before, "before the outage").await;

    // A steady stream of confirmed publishes through the whole outage.
    let stop_stream = tokio_util::sync::CancellationToken::new();
    let stream = tokio::spawn({
        let publisher = publisher.clone();
        let stop = stop_stream.clone();
        async move {
            let mut confirmed = Vec::new();
            while !stop.is_cancelled() {
                let event = CardAdded::new("during");
                publisher
                    .publish(&event)
                    .await
                    .unwrap_or_else(|e| panic!("a publish during the outage failed: {e}"));
                confirmed.push(event.aggregate_id);
            }
            confirmed
        }
    });
    eventually("publishes to flow", || async {
        match tally.0.lock().unwrap().len() {
            handled if handled > before.len() + 5 => Ok(()),
            handled => Err(format!("{handled} events handled")),
        }
    })
    .await;

    node.stop_app().await;
    wait_state(&worker, WorkerState::Reconnecting, RECOVER).await;
    // Published while no broker listens: sent again once it is back.
    let stranded = CardAdded::new("stranded");
    let stranded_publish = tokio::spawn({
        let publisher = publisher.clone();
        let event = stranded.clone();
        async move { publisher.publish(&event).await }
    });
    let stranded_at_start = stranded_publish.is_finished();

    let starting = Instant::now();
    node.start_app().await;
    let started = starting.elapsed();
    wait_state(&worker, WorkerState::Consuming, RECOVER).await;
    eprintln!(
        "start_app took {started:?}; consuming again {:?} after it began",
        starting.elapsed()
    );
    assert!(
        !stranded_at_start,
        "a publish completed with the app stopped"
    );
    within("the stranded publish", stranded_publish)
        .await
        .expect("publish task")
        .expect("the publish made while the broker was down is confirmed once it is back");

    stop_stream.cancel();
    let during = within("the publishing stream to stop", stream)
        .await
        .expect("publishing stream");
    let after = publish_n(&publisher, 20, "after").await;

    tally.wait_all(&before, "before").await;
    tally.wait_all(&during, "during").await;
    tally.wait_all(&[stranded.aggregate_id], "stranded").await;
    tally.wait_all(&after, "after").await;
    wait_queue_empty(&node.url(), &settings.app_queue()).await;
    eprintln!(
        "stop_app/start_app: {} before, {} during, 1 stranded, {} after; {} handled twice",
        before.len(),
        during.len(),
        after.len(),
        tally.duplicates()
    );
    assert_eq!(worker.state(), WorkerState::Consuming);
    publisher.close().await;
    within("worker shutdown", worker.shutdown())
        .await
        .expect("a clean shutdown after the outage");
}

// ---------------------------------------------------------------------------
// The network between worker and broker
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_are_reopened_and_publishes_lost_with_them_are_sent_again() {
    let worker_proxy = Proxy::start(common::proxy::shared_broker_addr()).await;
    let publisher_proxy = Proxy::start(common::proxy::shared_broker_addr()).await;
    let settings = settings_for("cut", &worker_proxy.url());
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let tally = Tally::default();
    let (worker, _outcomes) = start_worker(settings.clone(), tally.registry()).await;
    let mut publisher_settings = settings.clone();
    publisher_settings.amqp.url = AmqpUrl::new(publisher_proxy.url());
    let publisher = publisher(&publisher_settings).await;

    let before = publish_n(&publisher, 20, "before").await;
    tally.wait_all(&before, "before the cut").await;
    let worker_connections = worker_proxy.accepted();

    // Publishes the broker never sees: held by the blackhole, then the
    // connection carrying them is cut.
    publisher_proxy.blackhole(true);
    let in_flight: Vec<CardAdded> = (0..30).map(|_| CardAdded::new("in flight")).collect();
    let batch = tokio::spawn({
        let publisher = publisher.clone();
        let events = in_flight.clone();
        async move { publisher.publish_batch(&events).await }
    });
    eventually("the publishes to reach the proxy", || async {
        match publisher_proxy.held_from_clients() {
            0 => Err("nothing held yet"),
            _ => Ok(()),
        }
    })
    .await;
    assert!(!batch.is_finished(), "confirmed through a blackhole");
    worker_proxy.cut();
    publisher_proxy.cut();
    publisher_proxy.blackhole(false);
    let cut_at = Instant::now();

    within("the in-flight batch", batch)
        .await
        .expect("batch task")
        .expect("every publish lost with its connection is sent again and confirmed");
    eventually_within("the worker to reconnect", RECOVER, || async {
        match worker_proxy.accepted() {
            accepted if accepted > worker_connections => Ok(()),
            accepted => Err(format!("{accepted} connections accepted")),
        }
    })
    .await;
    wait_state(&worker, WorkerState::Consuming, RECOVER).await;
    eprintln!(
        "worker consuming again {:?} after the cut",
        cut_at.elapsed()
    );

    let after = publish_n(&publisher, 20, "after").await;
    let in_flight: Vec<String> = in_flight.into_iter().map(|e| e.aggregate_id).collect();
    tally.wait_all(&in_flight, "in flight at the cut").await;
    tally.wait_all(&after, "after the cut").await;
    wait_queue_empty(&amqp_url(), &settings.app_queue()).await;
    eprintln!("cut: {} handled twice", tally.duplicates());
    publisher.close().await;
    within("worker shutdown", worker.shutdown())
        .await
        .expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackhole_longer_than_the_heartbeat_timeout_is_noticed_and_recovered_from() {
    let proxy = Proxy::start(common::proxy::shared_broker_addr()).await;
    let mut settings = settings_for("blackhole", &proxy.url());
    // lapin gives up after two heartbeat intervals without a frame.
    settings.amqp.heartbeat = 1;
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let tally = Tally::default();
    let (worker, _outcomes) = start_worker(settings.clone(), tally.registry()).await;
    // The publisher goes straight to the broker: only the worker is cut off.
    let mut direct = settings.clone();
    direct.amqp.url = AmqpUrl::new(amqp_url());
    let publisher = publisher(&direct).await;

    let before = publish_n(&publisher, 10, "before").await;
    tally.wait_all(&before, "before the blackhole").await;

    // No FIN, no RST: the sockets stay open and silent. Only the missing
    // heartbeats tell the worker its connection is dead.
    proxy.blackhole(true);
    let silent_at = Instant::now();
    wait_state(&worker, WorkerState::Reconnecting, RECOVER).await;
    eprintln!("blackhole noticed after {:?}", silent_at.elapsed());
    let during = publish_n(&publisher, 10, "during").await;
    assert!(
        during.iter().all(|id| tally.handled(id) == 0),
        "handled through a blackhole"
    );

    proxy.blackhole(false);
    let healed_at = Instant::now();
    wait_state(&worker, WorkerState::Consuming, RECOVER).await;
    eprintln!(
        "consuming again {:?} after the blackhole",
        healed_at.elapsed()
    );
    tally
        .wait_all(&during, "published during the blackhole")
        .await;
    let after = publish_n(&publisher, 10, "after").await;
    tally.wait_all(&after, "after the blackhole").await;
    wait_queue_empty(&amqp_url(), &settings.app_queue()).await;
    publisher.close().await;
    within("worker shutdown", worker.shutdown())
        .await
        .expect("clean shutdown");
}

// ---------------------------------------------------------------------------
// The broker cancels the consumer
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_cancelled_by_the_broker_declares_again_and_resubscribes() {
    let settings = TestApp::new("cancelled").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let tally = Tally::default();
    let (worker, _outcomes) = start_worker(settings.clone(), tally.registry()).await;
    let publisher = publisher(&settings).await;
    let raw = Raw::connect().await;

    let before = publish_n(&publisher, 5, "before").await;
    tally.wait_all(&before, "before the delete").await;

    // Deleting the queue under the consumer: RabbitMQ sends basic.cancel.
    raw.channel
        .queue_delete(
            settings.app_queue().as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .expect("queue.delete");

    // Until the worker has declared the queue again, events are unroutable
    // (and the publisher says so); keep trying until one is confirmed.
    let after = CardAdded::new("after the delete");
    let deleted_at = Instant::now();
    eventually("a publish to be routable again", || async {
        match publisher.publish(&after).await {
            Ok(()) => Ok(()),
            Err(e @ burrow::Error::Unroutable { .. }) => Err(e),
            Err(e) => panic!("publish: {e}"),
        }
    })
    .await;
    tally
        .wait_all(
            std::slice::from_ref(&after.aggregate_id),
            "after the delete",
        )
        .await;
    eprintln!(
        "consuming the re-declared queue {:?} after the delete",
        deleted_at.elapsed()
    );
    let more = publish_n(&publisher, 5, "more").await;
    tally.wait_all(&more, "after resubscribing").await;

    // One consumer on the new queue: the worker, subscribed once.
    let (_, consumers) = queue_counts(&raw.conn, &settings.app_queue()).await;
    assert_eq!(consumers, 1, "exactly one consumer after resubscribing");
    assert_eq!(worker.state(), WorkerState::Consuming);

    raw.close().await;
    publisher.close().await;
    within("worker shutdown", worker.shutdown())
        .await
        .expect("clean shutdown");
}

// ---------------------------------------------------------------------------
// /readyz, /healthz and /metrics
// ---------------------------------------------------------------------------

/// The status line's code and the body of `GET path`; something must answer.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let (code, body) = http_get(addr, path).await;
    assert_ne!(code, 0, "GET {path}: {body}");
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened_and_readiness_drops_while_draining() {
    let settings = TestApp::new("endpoint")
        .delays_ms(&[200])
        .shutdown_timeout(Duration::from_secs(15))
        .build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    // "metrics.first" succeeds; "metrics.second" fails once for "flaky",
    // for good for "broken", and holds "hold" until released.
    let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let (held_tx, mut held) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
    let mut registry = Registry::new();
    registry
        .on("metrics.first", |_: CardAdded, _| async {
            Ok::<_, HandlerError>(())
        })
        .unwrap();
    registry
        .on("metrics.second", move |event: CardAdded, _| {
            let attempts = attempts.clone();
            let held_tx = held_tx.clone();
            async move {
                let n = {
                    let mut a = attempts.lock().unwrap();
                    let n = a.entry(event.aggregate_id.clone()).or_default();
                    *n += 1;
                    *n
                };
                match event.title.as_str() {
                    "flaky" if n == 1 => Err(HandlerError::transient("busy")),
                    "broken" => Err(HandlerError::permanent("bad data")),
                    "hold" => {
                        let (release_tx, release) = oneshot::channel();
                        held_tx.send(release_tx).unwrap();
                        tokio::time::timeout(Duration::from_secs(15), release)
                            .await
                            .map_err(|_| HandlerError::transient("never released"))?
                            .map_err(|_| HandlerError::transient("release dropped"))?;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
        })
        .unwrap();

    let worker = Worker::new(settings.clone(), registry).expect("worker");
    let metrics = worker.metrics().clone();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], common::node::free_port()));
    let listener = burrow::http::bind(addr).await.expect("bind the endpoint");
    let stop_http = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(burrow::http::serve(
        listener,
        burrow::http::router(metrics, worker.state(), Duration::from_secs(60)),
        stop_http.clone().cancelled_owned(),
    ));
    let mut handle = worker.spawn();
    let mut outcomes = handle.outcomes();
    within("the worker to consume", handle.consuming())
        .await
        .expect("consuming");
    let worker = TestWorker::new(handle);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    assert_eq!(get(addr, "/healthz").await.0, 200);

    let publisher = publisher(&settings).await;
    for title in ["fine", "fine", "fine", "flaky", "broken"] {
        publisher.publish(&CardAdded::new(title)).await.unwrap();
    }
    // 5 deliveries, plus the flaky one back from its retry step.
    for _ in 0..6 {
        assert!(next_outcome(&mut outcomes).await.acked);
    }

    let (code, text) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    let queue = settings.app_queue();
    let event = "CardAddedToLibraryEvent";
    let count = |name: &str, labels: &[(&str, &str)]| metric(&text, name, labels);
    assert_eq!(
        count(
            "burrow_deliveries_total",
            &[("queue", &queue), ("event", event)]
        ),
        6.0,
        "{text}"
    );
    assert_eq!(
        count(
            "burrow_handler_runs_total",
            &[("handler", "metrics.first"), ("outcome", "ok")]
        ),
        5.0,
        "the first handler ran once per event (not again on the retry)\n{text}"
    );
    assert_eq!(
        count("burrow_handler_runs_total", &[("handler", "metrics.first")]),
        5.0
    );
    for (outcome, n) in [("ok", 4.0), ("retry", 1.0), ("dead", 1.0)] {
        assert_eq!(
            count(
                "burrow_handler_runs_total",
                &[("handler", "metrics.second"), ("outcome", outcome)]
            ),
            n,
            "metrics.second {outcome}\n{text}"
        );
    }
    assert_eq!(
        count("burrow_retries_total", &[("queue", &queue), ("step", "1")]),
        1.0
    );
    assert_eq!(count("burrow_retries_total", &[]), 1.0);
    assert_eq!(
        count(
            "burrow_dead_letters_total",
            &[("queue", &queue), ("reason", "permanent")]
        ),
        1.0
    );
    assert_eq!(count("burrow_dead_letters_total", &[]), 1.0);
    // The worker's own publishes: the retry copy and the dead letter.
    assert_eq!(
        count("burrow_publishes_total", &[("outcome", "confirmed")]),
        2.0,
        "{text}"
    );
    assert_eq!(count("burrow_publishes_total", &[]), 2.0);
    assert_eq!(count("burrow_in_flight", &[]), 0.0);
    assert_eq!(count("burrow_connected", &[]), 1.0);
    // Every settled delivery was acked by some frame, and no frame was sent
    // for nothing: at least one, at most one per delivery.
    let deliveries = count("burrow_deliveries_total", &[("queue", &queue)]);
    let frames = count("burrow_ack_frames_total", &[("queue", &queue)]);
    assert!(
        frames >= 1.0 && frames <= deliveries,
        "{frames} ack frames for {deliveries} deliveries\n{text}"
    );

    // Shutdown with a handler still running: not ready, still alive.
    publisher.publish(&CardAdded::new("hold")).await.unwrap();
    let release = next_seen(&mut held).await;
    let stopping = tokio::spawn(async move { worker.shutdown().await });
    let body = bin::wait_status("/readyz", 503, || get(addr, "/readyz")).await;
    assert!(body.contains("draining"), "{body}");
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 200, "a draining worker is alive: {body}");
    let (_, text) = get(addr, "/metrics").await;
    assert_eq!(metric(&text, "burrow_in_flight", &[]), 1.0);
    assert_eq!(metric(&text, "burrow_connected", &[]), 0.0);

    release.send(()).unwrap();
    let report = within("the drain", stopping)
        .await
        .expect("shutdown task")
        .expect("clean shutdown");
    assert_eq!(report.abandoned, 0);
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 503, "a stopped worker is not alive: {body}");
    assert!(body.contains("stopped"), "{body}");
    let (code, _) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    let (_, text) = get(addr, "/metrics").await;
    assert_eq!(metric(&text, "burrow_in_flight", &[]), 0.0);
    assert_eq!(
        metric(
            &text,
            "burrow_handler_runs_total",
            &[("handler", "metrics.second"), ("outcome", "ok")]
        ),
        5.0,
        "the held run finished ok during the drain"
    );

    publisher.close().await;
    stop_http.cancel();
    within("the endpoint to stop", server)
        .await
        .expect("server task")
        .expect("server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_come_from_the_app_never_from_what_a_publisher_sends() {
    let settings = TestApp::new("labels").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let mut registry = Registry::new();
    registry
        .on("labels.record", |event: CardAdded, _| async move {
            match event.title.as_str() {
                "broken" => Err(HandlerError::permanent("bad data")),
                _ => Ok(()),
            }
        })
        .unwrap();
    let worker = Worker::new(settings.clone(), registry).expect("worker");
    let metrics = worker.metrics().clone();
    let mut handle = worker.spawn();
    let mut outcomes = handle.outcomes();
    within("the worker to consume", handle.consuming())
        .await
        .expect("consuming");
    let worker = TestWorker::new(handle);

    // Five deliveries naming event types of the publisher's invention, and
    // one bare message (no properties at all, as a plain AMQP client sends
    // it) that is dead-lettered through the default exchange.
    let raw = Raw::connect().await;
    let exchange = &settings.amqp.exchange;
    for i in 0..5 {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "burrow-event-type".into(),
            lapin::types::AMQPValue::LongString(format!("Spoofed{i}Event").into()),
        );
        let props = lapin::BasicProperties::default().with_headers(headers);
        let body = serde_json::to_vec(&CardAdded::new("fine")).unwrap();
        raw.publish(exchange, "CardAddedToLibraryEvent", &body, props)
            .await;
    }
    let broken = serde_json::to_vec(&CardAdded::new("broken")).unwrap();
    raw.publish(
        exchange,
        "CardAddedToLibraryEvent",
        &broken,
        lapin::BasicProperties::default(),
    )
    .await;
    let mut ignored = 0;
    for _ in 0..6 {
        let o = next_outcome(&mut outcomes).await;
        assert!(o.acked, "{o:?}");
        ignored += usize::from(o.ignored);
    }
    assert_eq!(ignored, 5);

    let text = metrics.render();
    assert!(
        !text.contains("Spoofed"),
        "a header a publisher sets created series:\n{text}"
    );
    assert!(
        !text.contains("event=\"events_"),
        "a queue name in an event label:\n{text}"
    );
    let queue = settings.app_queue();
    assert_eq!(
        metric(&text, "burrow_ignored_total", &[("queue", &queue)]),
        5.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "burrow_deliveries_total",
            &[("queue", &queue), ("event", "other")]
        ),
        5.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "burrow_publishes_total",
            &[
                ("event", "CardAddedToLibraryEvent"),
                ("outcome", "confirmed")
            ]
        ),
        1.0,
        "the dead letter's copy is counted under its event type\n{text}"
    );
    raw.close().await;
    within("worker shutdown", worker.shutdown())
        .await
        .expect("clean shutdown");
}
