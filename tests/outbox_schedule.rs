//! Scheduled events through the outbox, against the real PostgreSQL and
//! RabbitMQ: the relay publishes a row when it is due and never before,
//! waking on a timer rather than its poll; a scheduled row holds back no
//! later event of its aggregate; cancelling works until it is published and
//! is a plain `false` after; rows wait out a broker restart.
//!
//! "Never before" is a correctness assertion: the handler records when it
//! received each event, and the test compares it with the row's `due_at`.
#![cfg(feature = "postgres")]

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use burrow::{Context, HandlerError, Registry, Settings, config::AmqpUrl, outbox};
use chrono::{DateTime, Utc};
use common::{CardAdded, Cleanup, eventually_within, node::Node, start_worker, unique, within};
use pg::{TestDb, outbox_settings, relay};
use tokio_util::sync::CancellationToken;

/// One arrival: the event's title and when the handler got it.
type Arrival = (String, DateTime<Utc>);

/// When the app received each event, by title.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<Vec<Arrival>>>);

impl Arrivals {
    fn registry(&self) -> Registry {
        let mut registry = Registry::new();
        let arrivals = self.clone();
        registry
            .on(
                "library.note_arrival",
                move |event: CardAdded, _ctx: Context| {
                    let at = Utc::now();
                    arrivals.0.lock().unwrap().push((event.title, at));
                    async { Ok::<(), HandlerError>(()) }
                },
            )
            .expect("register");
        registry
    }

    fn of(&self, title: &str) -> Vec<DateTime<Utc>> {
        let all = self.0.lock().unwrap();
        all.iter()
            .filter(|(t, _)| t == title)
            .map(|(_, at)| *at)
            .collect()
    }

    async fn wait(&self, title: &str, bound: Duration) -> DateTime<Utc> {
        eventually_within(&format!("the app to receive '{title}'"), bound, || async {
            self.of(title).first().copied().ok_or("not yet received")
        })
        .await
    }
}

/// The `due_at` the database holds for `message_id`.
async fn due_at(db: &TestDb, message_id: &str) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT due_at FROM event_outbox WHERE message_id = $1")
        .bind(message_id)
        .fetch_one(&db.pool)
        .await
        .expect("the row's due_at")
}

fn event(title: &str, aggregate: &str) -> CardAdded {
    CardAdded {
        aggregate_id: aggregate.to_owned(),
        title: title.to_owned(),
        occurred_at: Utc::now(),
    }
}

/// Spawns the relay until the token is cancelled.
fn run_relay(
    db: &TestDb,
    settings: &Settings,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<burrow::Result<()>>,
    burrow::Publisher,
) {
    let (relay, publisher) = relay(&db.pool, settings);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(async move { stop.cancelled().await }).await }
    });
    (stop, task, publisher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rows_are_published_when_due_never_before_and_cancel_until_then() {
    let db = TestDb::new().await;
    let mut settings = outbox_settings("outbox-sched", &db);
    // A poll far longer than any delay here: a row published on time was
    // published by the relay's timer (or NOTIFY), not by its poll.
    settings.outbox.poll_interval = Duration::from_secs(60);
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let arrivals = Arrivals::default();
    let (worker, _) = start_worker(settings.clone(), arrivals.registry()).await;
    let (stop, task, publisher) = run_relay(&db, &settings);

    let card = unique("card");
    let mut tx = db.pool.begin().await.expect("begin");
    let first = Utc::now() + chrono::Duration::milliseconds(1500);
    let at = outbox::enqueue_at(&mut tx, &event("at", &card), first)
        .await
        .expect("enqueue_at");
    let after = outbox::enqueue_after(&mut tx, &event("after", &card), Duration::from_millis(2500))
        .await
        .expect("enqueue_after");
    let cancelled =
        outbox::enqueue_after(&mut tx, &event("cancelled", &card), Duration::from_secs(2))
            .await
            .expect("enqueue_after");
    let in_an_hour = outbox::enqueue_at(
        &mut tx,
        &event("in an hour", &card),
        Utc::now() + chrono::Duration::hours(1),
    )
    .await
    .expect("enqueue_at");
    // Enqueued after the scheduled ones, for the same aggregate: it does
    // not wait for them.
    outbox::enqueue(&mut tx, &event("now", &card))
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");

    let records = outbox::audit(&db.pool, &card).await.expect("audit");
    let statuses: Vec<&str> = records.iter().map(|r| r.status()).collect();
    assert_eq!(statuses[..4], ["scheduled"; 4], "{statuses:?}");
    let backlog = outbox::backlog(&db.pool).await.expect("backlog");
    assert_eq!(backlog.scheduled, 4, "{backlog:?}");
    assert!(
        backlog.pending <= 1,
        "scheduled rows count as pending: {backlog:?}"
    );
    let now_at = arrivals.wait("now", Duration::from_secs(10)).await;
    assert!(
        now_at < first,
        "the unscheduled event waited for the scheduled ones"
    );

    assert!(outbox::cancel(&db.pool, &cancelled).await.expect("cancel"));
    assert!(
        !outbox::cancel(&db.pool, &cancelled)
            .await
            .expect("cancel twice")
    );

    for (title, id) in [("at", &at), ("after", &after)] {
        let due = due_at(&db, id).await;
        let received = arrivals.wait(title, Duration::from_secs(15)).await;
        let late = received - due;
        assert!(
            late >= chrono::Duration::zero(),
            "'{title}' arrived {} ms before its due time",
            -late.num_milliseconds()
        );
        // The relay sleeps until the row is due: one batch and one confirm
        // later it is out. A poll of 60 s could not have made it.
        assert!(
            late < chrono::Duration::seconds(3),
            "'{title}' arrived {} ms after its due time",
            late.num_milliseconds()
        );
        eprintln!(
            "'{title}': {} ms after its due time",
            late.num_milliseconds()
        );
    }
    // PostgreSQL keeps microseconds.
    assert_eq!(
        due_at(&db, &at).await.timestamp_micros(),
        first.timestamp_micros()
    );

    // Published: cancelling is too late, and says so without an error.
    assert!(
        !outbox::cancel(&db.pool, &at)
            .await
            .expect("cancel a published event")
    );
    // Not scheduled: not cancellable.
    let now_id: String =
        sqlx::query_scalar("SELECT message_id FROM event_outbox WHERE due_at IS NULL")
            .fetch_one(&db.pool)
            .await
            .expect("the unscheduled row");
    assert!(!outbox::cancel(&db.pool, &now_id).await.expect("cancel"));
    assert!(outbox::cancel(&db.pool, &in_an_hour).await.expect("cancel"));

    stop.cancel();
    within("the relay to stop", task)
        .await
        .expect("relay task")
        .expect("relay");
    publisher.close().await;
    within("the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops cleanly");
    // Due before "after", the cancelled one would have arrived by now.
    assert!(arrivals.of("cancelled").is_empty());
    assert!(arrivals.of("in an hour").is_empty());
    for title in ["at", "after", "now"] {
        assert_eq!(arrivals.of(title).len(), 1, "{title}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_rows_wait_out_a_broker_restart_and_are_published_after_it() {
    let db = TestDb::new().await;
    let mut node = Node::start("outbox-sched").await;
    let mut settings = outbox_settings("outbox-sched-restart", &db);
    settings.amqp.url = AmqpUrl::new(node.url());
    settings.publisher.confirm_timeout = Duration::from_secs(60);
    let arrivals = Arrivals::default();
    let (worker, _) = start_worker(settings.clone(), arrivals.registry()).await;
    let (stop, task, publisher) = run_relay(&db, &settings);

    let card = unique("card");
    let mut tx = db.pool.begin().await.expect("begin");
    let soon = outbox::enqueue_after(&mut tx, &event("soon", &card), Duration::from_secs(2))
        .await
        .expect("enqueue_after");
    let later = outbox::enqueue_after(&mut tx, &event("later", &card), Duration::from_secs(6))
        .await
        .expect("enqueue_after");
    tx.commit().await.expect("commit");

    node.restart().await;

    for (title, id) in [("soon", &soon), ("later", &later)] {
        let due = due_at(&db, id).await;
        let received = arrivals.wait(title, Duration::from_secs(90)).await;
        assert!(
            received >= due,
            "'{title}' arrived {} ms before its due time",
            (due - received).num_milliseconds()
        );
        eprintln!(
            "'{title}': {} ms after its due time",
            (received - due).num_milliseconds()
        );
    }
    stop.cancel();
    within("the relay to stop", task)
        .await
        .expect("relay task")
        .expect("relay");
    publisher.close().await;
    within("the worker to stop", worker.shutdown())
        .await
        .expect("the worker stops cleanly");
}
