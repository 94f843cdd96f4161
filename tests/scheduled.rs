//! Delayed events through the delay queues (no PostgreSQL), against the real
//! broker: an event published for later reaches every app bound to its type
//! after its due time and never before, and one waiting in the delay queues
//! survives a broker restart.
//!
//! "Never before" is a correctness assertion: each handler records the time
//! it received the event, and the test compares it with the due time it
//! asked for, taken before the publish. "After" is a bounded wait. Each test
//! has its own exchange, so its own delay queues, deleted afterwards.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use burrow::{Context, DelayChain, HandlerError, Registry, Settings, config::AmqpUrl};
use chrono::{DateTime, Utc};
use common::{
    CardAdded, Cleanup, TestApp, WAIT, eventually_within, node::Node, publisher, start_worker,
    within,
};

/// One arrival: the app, the event's aggregate id, when the handler got it.
type Arrival = (String, String, DateTime<Utc>);

/// Which app received which event (by aggregate id) at what time.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<Arrival>>>);

impl Arrivals {
    /// A registry whose handler records every `CardAdded` as `app` received it.
    fn registry(&self, app: &str) -> Registry {
        let mut registry = Registry::new();
        let arrivals = self.clone();
        let app = app.to_owned();
        registry
            .on(
                "library.note_arrival",
                move |event: CardAdded, _ctx: Context| {
                    // The time first: what is compared with the due time.
                    let at = Utc::now();
                    arrivals
                        .0
                        .lock()
                        .unwrap()
                        .push((app.clone(), event.aggregate_id, at));
                    async { Ok::<(), HandlerError>(()) }
                },
            )
            .expect("register");
        registry
    }

    /// Every time `app` received `aggregate`.
    fn of(&self, app: &str, aggregate: &str) -> Vec<DateTime<Utc>> {
        let all = self.0.lock().unwrap();
        let hits = all.iter().filter(|(a, id, _)| a == app && id == aggregate);
        hits.map(|(_, _, at)| *at).collect()
    }

    /// Waits (at most `bound`) until `app` received `aggregate`; the time.
    async fn wait(&self, app: &str, aggregate: &str, bound: Duration) -> DateTime<Utc> {
        eventually_within(&format!("{app} to receive {aggregate}"), bound, || async {
            self.of(app, aggregate)
                .first()
                .copied()
                .ok_or("not yet received")
        })
        .await
    }
}

/// Registers the delay queues of `settings`' exchange for deletion.
fn clean_delay_queues(cleanup: &mut Cleanup, settings: &Settings) {
    for level in DelayChain::new(&settings.amqp.exchange).levels() {
        cleanup.queue(&level.name).exchange(&level.name);
    }
}

/// Asserts that `received` is not before `due` and not later than the
/// documented bound (a second of rounding) plus `slack` for a busy machine.
fn assert_on_time(what: &str, due: DateTime<Utc>, received: DateTime<Utc>, slack: Duration) {
    let late = received - due;
    assert!(
        late >= chrono::Duration::zero(),
        "{what} arrived {} ms before its due time",
        -late.num_milliseconds()
    );
    let bound = chrono::Duration::from_std(Duration::from_secs(1) + slack).unwrap();
    assert!(
        late <= bound,
        "{what} arrived {} ms after its due time",
        late.num_milliseconds()
    );
    eprintln!("{what}: {} ms after its due time", late.num_milliseconds());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_events_reach_every_bound_app_after_their_due_time_and_never_before() {
    let a = TestApp::new("sched-a").build();
    let b = TestApp::new("sched-b").exchange(&a.amqp.exchange).build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&a).app(&b);
    clean_delay_queues(&mut cleanup, &a);

    let arrivals = Arrivals::default();
    let (worker_a, _) = start_worker(a.clone(), arrivals.registry("a")).await;
    let (worker_b, _) = start_worker(b.clone(), arrivals.registry("b")).await;
    let publisher = publisher(&a).await;

    // 1.5 s waits 2 s (one level); 2.2 s waits 3 s (two levels, 2 s then
    // 1 s); a due time in the past is published at once. The due times the
    // assertions use are taken before each publish, and the publisher's own
    // (taken inside the call) must not be earlier.
    let soon = CardAdded::new("after 1.5 s");
    let soon_due = Utc::now() + chrono::Duration::milliseconds(1500);
    let scheduled = publisher
        .publish_after(&soon, Duration::from_millis(1500))
        .await
        .expect("soon");
    assert_eq!(scheduled.waits, Duration::from_secs(2));
    assert!(scheduled.due_at >= soon_due);
    let soon_due = scheduled.due_at;

    let later = CardAdded::new("after 2.2 s");
    let later_due = Utc::now() + chrono::Duration::milliseconds(2200);
    let scheduled = publisher
        .publish_after(&later, Duration::from_millis(2200))
        .await
        .expect("later");
    assert_eq!(scheduled.waits, Duration::from_secs(3));
    assert!(scheduled.due_at >= later_due);
    let later_due = scheduled.due_at;

    let at = CardAdded::new("at now + 2.5 s");
    let at_due = Utc::now() + chrono::Duration::milliseconds(2500);
    let scheduled = publisher.publish_at(&at, at_due).await.expect("at");
    assert_eq!(scheduled.due_at, at_due);
    assert!(scheduled.waits > Duration::ZERO && scheduled.waits <= Duration::from_secs(3));

    let past = CardAdded::new("a minute ago");
    let past_due = Utc::now() - chrono::Duration::minutes(1);
    let scheduled = publisher.publish_at(&past, past_due).await.expect("past");
    assert_eq!(scheduled.waits, Duration::ZERO);

    for app in ["a", "b"] {
        for (event, due) in [
            (&soon, soon_due),
            (&later, later_due),
            (&at, at_due),
            (&past, past_due),
        ] {
            let received = arrivals.wait(app, &event.aggregate_id, WAIT).await;
            let what = format!("{} at app {app}", event.title);
            if due < Utc::now() - chrono::Duration::seconds(30) {
                assert!(received >= due, "{what}");
            } else {
                assert_on_time(&what, due, received, Duration::from_secs(2));
            }
        }
    }

    // Once per app: the CC key and the chain's key meet the app's binding
    // at the exchange, and RabbitMQ routes a message to a queue only once.
    publisher.close().await;
    within("worker a to stop", worker_a.shutdown())
        .await
        .expect("worker a stops");
    within("worker b to stop", worker_b.shutdown())
        .await
        .expect("worker b stops");
    for app in ["a", "b"] {
        for event in [&soon, &later, &at, &past] {
            assert_eq!(arrivals.of(app, &event.aggregate_id).len(), 1, "{app}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_past_the_longest_level_sum_is_refused_and_nothing_is_published() {
    let settings = TestApp::new("sched-long").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    clean_delay_queues(&mut cleanup, &settings);
    let publisher = publisher(&settings).await;
    let event = CardAdded::new("in two years");
    let err = publisher
        .publish_after(&event, Duration::from_secs(2 * 365 * 86_400))
        .await
        .expect_err("too long");
    assert!(matches!(err, burrow::Error::DelayTooLong { .. }), "{err}");
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains("CardAddedToLibraryEvent") && text.contains("outbox::enqueue_at"),
        "{text}"
    );
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_events_waiting_in_the_delay_queues_survive_a_broker_restart() {
    let mut node = Node::start("scheduled").await;
    let mut settings = TestApp::new("sched-restart").build();
    settings.amqp.url = AmqpUrl::new(node.url());
    // Long enough for a publish to outlive the restart and be sent again.
    settings.publisher.confirm_timeout = Duration::from_secs(60);

    let arrivals = Arrivals::default();
    let (worker, _) = start_worker(settings.clone(), arrivals.registry("app")).await;
    let publisher = publisher(&settings).await;

    // Both wait across the restart: one in the 4 s level then the 1 s one,
    // the other in the 8 s level only.
    let short = CardAdded::new("in 4.5 s");
    let short_due = Utc::now() + chrono::Duration::milliseconds(4500);
    let long = CardAdded::new("in 8 s");
    let long_due = Utc::now() + chrono::Duration::seconds(8);
    publisher
        .publish_at(&short, short_due)
        .await
        .expect("short");
    publisher.publish_at(&long, long_due).await.expect("long");

    node.restart().await;
    eprintln!(
        "the broker is back {} ms before the first due time",
        (short_due - Utc::now()).num_milliseconds()
    );

    // A restart may take longer than the delays; the events then arrive once
    // the broker is back, late but never early.
    for (event, due) in [(&short, short_due), (&long, long_due)] {
        let received = arrivals
            .wait("app", &event.aggregate_id, Duration::from_secs(90))
            .await;
        assert!(
            received >= due,
            "{} arrived {} ms before its due time",
            event.title,
            (due - received).num_milliseconds()
        );
        eprintln!(
            "{}: {} ms after its due time",
            event.title,
            (received - due).num_milliseconds()
        );
    }
    publisher.close().await;
    within("the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops cleanly");
    // At least once: a copy may come twice around a restart, never zero times.
    for event in [&short, &long] {
        assert!(!arrivals.of("app", &event.aggregate_id).is_empty());
    }
}
