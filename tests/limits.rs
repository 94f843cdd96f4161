//! Per-handler concurrency and rate limits against a real RabbitMQ: a
//! limited handler waits inside the worker (no nack, no retry), never runs
//! more than its limits allow, and does not hold back the other handlers of
//! the same deliveries.

mod common;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use burrow::{EventMeta, HandlerError, HandlerLimits, Rate, Registry, Worker};
use common::*;

/// What one handler saw: when each run started, how many ran at once.
#[derive(Default)]
struct Runs {
    starts: Mutex<Vec<Instant>>,
    running: AtomicUsize,
    most_at_once: AtomicUsize,
}

impl Runs {
    fn begin(&self) {
        self.starts.lock().unwrap().push(Instant::now());
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
    }

    fn end(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
    }

    fn count(&self) -> usize {
        self.starts.lock().unwrap().len()
    }
}

const EVENTS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_handlers_wait_inside_the_worker_and_never_exceed_their_limits() {
    let mut settings = TestApp::new("limits").build();
    settings.consumer.concurrency = 64;
    settings.consumer.prefetch = 64;
    // The rate comes from the settings, over what the code says.
    settings.limits.insert(
        "pricing.fetch_price".into(),
        burrow::LimitSettings {
            concurrency: None,
            rate: Some("20/1s".into()),
        },
    );
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let slow_api = Arc::new(Runs::default());
    let priced = Arc::new(Runs::default());
    let feed = Arc::new(Runs::default());
    let mut registry = Registry::new();
    {
        let runs = slow_api.clone();
        registry
            .on("search.index_card", move |_: CardAdded, _| {
                let runs = runs.clone();
                async move {
                    runs.begin();
                    // The work of a call to a service that takes its time.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    runs.end();
                    Ok::<_, HandlerError>(())
                }
            })
            .unwrap();
    }
    {
        let runs = priced.clone();
        registry
            .on("pricing.fetch_price", move |_: CardAdded, _| {
                let runs = runs.clone();
                async move {
                    runs.begin();
                    runs.end();
                    Ok::<_, HandlerError>(())
                }
            })
            .unwrap();
    }
    // The feed handler notes how far pricing had got when it finished.
    let priced_when_fed = Arc::new(Mutex::new(None));
    {
        let (runs, priced, done) = (feed.clone(), priced.clone(), priced_when_fed.clone());
        registry
            .on("feeds.add_card", move |_: CardAdded, _| {
                let (runs, priced, done) = (runs.clone(), priced.clone(), done.clone());
                async move {
                    runs.begin();
                    runs.end();
                    if runs.count() == EVENTS {
                        *done.lock().unwrap() = Some(priced.count());
                    }
                    Ok::<_, HandlerError>(())
                }
            })
            .unwrap();
    }
    registry
        .limit("search.index_card", HandlerLimits::new().concurrency(2))
        .unwrap()
        .limit(
            "pricing.fetch_price",
            // Overridden by the settings' 20/1s.
            HandlerLimits::new().rate(Rate::new(1000, Duration::from_secs(1)).unwrap()),
        )
        .unwrap();

    let worker = Worker::new(settings.clone(), registry).expect("worker");
    let metrics = worker.metrics().clone();
    let mut worker = TestWorker::new(worker.spawn());
    let mut outcomes = worker.outcomes();
    within("the worker to consume", worker.consuming())
        .await
        .expect("consuming");
    let publisher = publisher(&settings).await;
    let ids: Vec<String> = (0..EVENTS).map(|_| unique("limited")).collect();
    for id in &ids {
        within(
            "publish",
            publisher.publish_with(&CardAdded::new("Dune"), EventMeta::default().message_id(id)),
        )
        .await
        .unwrap();
    }

    // Every delivery is settled once, on its first attempt, acked: the
    // waits cost no nack, no retry, no attempt.
    let mut settled = Vec::new();
    for _ in 0..EVENTS {
        let o = next_outcome(&mut outcomes).await;
        assert_eq!(o.attempt, 1, "{o:?}");
        assert!(o.retried.is_none() && o.dead_lettered.is_none(), "{o:?}");
        assert!(o.acked, "{o:?}");
        assert_eq!(o.succeeded.len(), 3, "{o:?}");
        settled.push(o.message_id);
    }
    settled.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(settled, expected);

    // Concurrency: never more than 2 at a time, and the 2 were used.
    assert_eq!(slow_api.count(), EVENTS);
    assert_eq!(slow_api.most_at_once.load(Ordering::SeqCst), 2);

    // Rate: no window of one second holds more than 20 starts (one more
    // allowed for the instant each start is recorded at).
    let starts = priced.starts.lock().unwrap().clone();
    assert_eq!(starts.len(), EVENTS);
    for (i, first) in starts.iter().enumerate() {
        let in_window = starts[i..]
            .iter()
            .take_while(|t| t.duration_since(*first) < Duration::from_secs(1))
            .count();
        assert!(
            in_window <= 21,
            "{in_window} starts within 1 s of start {i}"
        );
    }

    // The unlimited handler was not held back: it had handled every
    // event while the rate-limited one was still on its first ones.
    let priced_then = priced_when_fed
        .lock()
        .unwrap()
        .expect("the feed handler saw every event");
    assert!(
        priced_then < EVENTS,
        "the unlimited handler finished only after the limited one ({priced_then} priced)"
    );

    // The waits are measured, per limited handler only.
    let text = metrics.render();
    let waits = |handler: &str| {
        common::bin::metric(
            &text,
            "burrow_handler_permit_wait_seconds_count",
            &[("handler", handler)],
        )
    };
    assert_eq!(waits("pricing.fetch_price"), EVENTS as f64);
    assert_eq!(waits("search.index_card"), EVENTS as f64);
    assert!(
        !text.contains("burrow_handler_permit_wait_seconds_count{handler=\"feeds.add_card\"}"),
        "an unlimited handler has no permit series"
    );

    publisher.close().await;
    worker.stop().await.expect("worker stops");
}

#[tokio::test]
async fn a_limit_for_a_handler_that_does_not_exist_is_refused_at_start() {
    let mut settings = TestApp::new("limits-typo").build();
    settings.limits.insert(
        "pricing.fetch_prise".into(),
        burrow::LimitSettings {
            concurrency: Some(2),
            rate: None,
        },
    );
    let mut registry = Registry::new();
    registry
        .on("pricing.fetch_price", |_: CardAdded, _| async {
            Ok::<_, HandlerError>(())
        })
        .unwrap();
    let err =
        Worker::new(settings, registry).expect_err("a typo must not leave a handler unlimited");
    let text = err.to_string();
    assert!(
        text.contains("pricing.fetch_prise") && text.contains("pricing.fetch_price"),
        "{text}"
    );
}
