//! The transactional outbox against the real PostgreSQL and RabbitMQ: an
//! event committed with its aggregate is delivered even when nothing
//! published it at commit time; relays in parallel publish each event once
//! and each aggregate in order; a relay killed between confirm and commit
//! publishes again and the inbox absorbs the duplicate.
//!
//! Each test has its own schema, exchange and queues; waits are bounded.
#![cfg(feature = "postgres")]

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::{collections::HashMap, time::Duration};

use burrow::{
    Context, DomainEvent, Event, EventMeta, HandlerError, Registry, ResultExt,
    inbox::{Inbox, InboxHandler},
    outbox,
};
use chrono::{DateTime, Utc};
use common::{Cleanup, next_outcome, start_worker, unique, within};
use pg::{Tap, TestDb, count_ids, outbox_settings, relay};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

/// A card event carrying its position in the aggregate's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CardMoved {
    aggregate_id: String,
    seq: u32,
    occurred_at: DateTime<Utc>,
}

impl CardMoved {
    fn new(aggregate_id: &str, seq: u32) -> Self {
        Self {
            aggregate_id: aggregate_id.to_owned(),
            seq,
            occurred_at: Utc::now(),
        }
    }
}

impl Event for CardMoved {
    const EVENT_TYPE: &'static str = "CardMovedEvent";
}

impl DomainEvent for CardMoved {
    const VERSION: u32 = 3;
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        self.occurred_at
    }
}

/// An event type a test binds only later (unroutable until then).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CardArchived {
    aggregate_id: String,
    seq: u32,
}

impl Event for CardArchived {
    const EVENT_TYPE: &'static str = "CardArchivedEvent";
}

impl DomainEvent for CardArchived {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// Enqueues each event in a transaction of its own, as separate requests would.
async fn enqueue_each(db: &TestDb, events: &[CardMoved]) -> Vec<String> {
    let mut ids = Vec::with_capacity(events.len());
    for event in events {
        let mut tx = db.pool.begin().await.expect("begin");
        ids.push(outbox::enqueue(&mut tx, event).await.expect("enqueue"));
        tx.commit().await.expect("commit");
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_with_its_aggregate_is_published_by_a_relay_started_later() {
    let db = TestDb::new().await;
    let settings = outbox_settings("outbox-crash", &db);
    let mut cleanup = Cleanup::new();
    cleanup.exchange(&settings.amqp.exchange);
    let mut tap = Tap::bind(&settings.amqp.exchange, &["#"]).await;

    // The app's transaction: its own write and the event, then the process
    // "dies" right after the commit: nothing publishes at this point.
    db.execute("CREATE TABLE cards (id TEXT PRIMARY KEY, lane TEXT NOT NULL)")
        .await;
    let event = CardMoved::new("card-1", 1);
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO cards (id, lane) VALUES ($1, 'doing')")
        .bind(&event.aggregate_id)
        .execute(&mut *tx)
        .await
        .unwrap();
    let message_id = outbox::enqueue_with(
        &mut tx,
        &event,
        EventMeta::default()
            .correlation_id("req-42")
            .causation_id("cmd-7"),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    // A rolled-back transaction leaves no event.
    let mut tx = db.pool.begin().await.unwrap();
    outbox::enqueue(&mut tx, &CardMoved::new("card-2", 1))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let backlog = outbox::backlog(&db.pool).await.unwrap();
    assert_eq!(backlog.pending, 1);
    assert!(backlog.oldest.is_some());

    // A relay started later publishes it.
    let (relay, publisher) = relay(&db.pool, &settings);
    relay.refresh_backlog().await;
    assert_eq!(publisher.metrics().outbox_pending(), 1);
    let report = within("a batch", relay.run_once()).await.unwrap();
    assert_eq!((report.claimed, report.published, report.failed), (1, 1, 0));

    let got = tap.next().await;
    assert_eq!(got.routing_key, "CardMovedEvent");
    assert_eq!(got.message_id(), message_id);
    let p = &got.properties;
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "req-42");
    assert_eq!(p.kind().as_ref().unwrap().as_str(), "CardMovedEvent");
    assert_eq!(
        p.app_id().as_ref().unwrap().as_str(),
        settings.app.name.as_str()
    );
    assert_eq!(
        p.content_type().as_ref().unwrap().as_str(),
        "application/json"
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(
        *p.timestamp(),
        Some(event.occurred_at.timestamp() as u64),
        "timestamp is occurred_at in seconds"
    );
    assert_eq!(
        common::header_i64(p, burrow::wire::headers::EVENT_VERSION),
        Some(3)
    );
    assert_eq!(
        common::header_str(p, burrow::wire::headers::CAUSATION_ID).as_deref(),
        Some("cmd-7")
    );
    let body: CardMoved = serde_json::from_value(got.body).unwrap();
    assert_eq!(body.aggregate_id, "card-1");
    assert_eq!(body.seq, 1);

    // Marked published, nothing more to do.
    let records = outbox::audit(&db.pool, "card-1").await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].status(), "published");
    assert_eq!(records[0].attempts, 1);
    assert!(records[0].published_at.unwrap() >= records[0].enqueued_at);
    assert!(outbox::audit(&db.pool, "card-2").await.unwrap().is_empty());
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);
    relay.refresh_backlog().await;
    assert_eq!(publisher.metrics().outbox_pending(), 0);
    assert!(
        publisher.metrics().render().contains(
            r#"burrow_outbox_relayed_total{event="CardMovedEvent",outcome="published"} 1"#
        )
    );
    assert!(tap.rest().await.is_empty(), "published exactly once");
    publisher.close().await;
    tap.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueuing_the_same_message_id_twice_is_refused() {
    let db = TestDb::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    let meta = EventMeta::default().message_id("cmd-1-moved");
    outbox::enqueue_with(&mut tx, &CardMoved::new("card-1", 1), meta.clone())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = db.pool.begin().await.unwrap();
    let err = outbox::enqueue_with(&mut tx, &CardMoved::new("card-1", 2), meta)
        .await
        .unwrap_err();
    assert!(
        matches!(err, burrow::Error::DuplicateMessageId { .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("cmd-1-moved"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_in_parallel_publish_each_event_once() {
    let db = TestDb::new().await;
    let mut settings = outbox_settings("outbox-parallel", &db);
    settings.outbox.batch_size = 20;
    let mut cleanup = Cleanup::new();
    cleanup.exchange(&settings.amqp.exchange);
    let mut tap = Tap::bind(&settings.amqp.exchange, &["#"]).await;

    // 500 events over 50 aggregates, committed before any relay runs.
    let mut tx = db.pool.begin().await.unwrap();
    let mut enqueued = Vec::new();
    for seq in 0..10 {
        for a in 0..50 {
            let event = CardMoved::new(&format!("card-{a}"), seq);
            enqueued.push(outbox::enqueue(&mut tx, &event).await.unwrap());
        }
    }
    tx.commit().await.unwrap();

    let mut tasks = Vec::new();
    let mut publishers = Vec::new();
    for _ in 0..2 {
        let (relay, publisher) = relay(&db.pool, &settings);
        publishers.push(publisher);
        tasks.push(tokio::spawn(async move {
            let mut published = 0;
            loop {
                let report = relay.run_once().await.expect("batch");
                published += report.published;
                assert_eq!(report.failed, 0);
                if report.claimed == 0 {
                    let backlog = outbox::backlog(relay.pool()).await.unwrap();
                    if backlog.pending == 0 {
                        return published;
                    }
                    // The other relay holds the rest; let it finish.
                    tokio::task::yield_now().await;
                }
            }
        }));
    }
    let mut per_relay = Vec::new();
    for task in tasks {
        per_relay.push(within("a relay to drain the outbox", task).await.unwrap());
    }
    assert_eq!(
        per_relay.iter().sum::<usize>(),
        500,
        "rows published per relay: {per_relay:?}"
    );

    let delivered = tap.rest().await;
    let counts = count_ids(&delivered);
    assert_eq!(delivered.len(), 500, "deliveries");
    assert_eq!(counts.len(), 500, "distinct message ids");
    for id in &enqueued {
        assert_eq!(counts.get(id), Some(&1), "message {id}");
    }
    for p in publishers {
        p.close().await;
    }
    tap.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_aggregate_leaves_in_order_with_three_relays() {
    let db = TestDb::new().await;
    let mut settings = outbox_settings("outbox-order", &db);
    settings.outbox.batch_size = 7;
    let mut cleanup = Cleanup::new();
    cleanup.exchange(&settings.amqp.exchange);
    let mut tap = Tap::bind(&settings.amqp.exchange, &["#"]).await;

    // Interleaved, one transaction each: 6 aggregates x 30 events.
    let events: Vec<CardMoved> = (0..30)
        .flat_map(|seq| (0..6).map(move |a| CardMoved::new(&format!("card-{a}"), seq)))
        .collect();
    enqueue_each(&db, &events).await;

    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    let mut publishers = Vec::new();
    for _ in 0..3 {
        let (relay, publisher) = relay(&db.pool, &settings);
        publishers.push(publisher);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            relay.run(stop.cancelled_owned()).await
        }));
    }
    let delivered = tap.take(events.len()).await;
    stop.cancel();
    for task in tasks {
        within("a relay to stop", task).await.unwrap().unwrap();
    }

    let mut seen: HashMap<String, Vec<u32>> = HashMap::new();
    for m in &delivered {
        let e: CardMoved = serde_json::from_value(m.body.clone()).unwrap();
        seen.entry(e.aggregate_id).or_default().push(e.seq);
    }
    assert_eq!(seen.len(), 6);
    for (aggregate, seqs) in &seen {
        assert_eq!(
            seqs,
            &(0..30).collect::<Vec<_>>(),
            "order of {aggregate} on the queue"
        );
    }
    assert!(tap.rest().await.is_empty(), "no duplicates");
    for p in publishers {
        p.close().await;
    }
    tap.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_event_stays_pending_and_holds_back_its_aggregate() {
    let db = TestDb::new().await;
    let settings = outbox_settings("outbox-unroutable", &db);
    let mut cleanup = Cleanup::new();
    cleanup.exchange(&settings.amqp.exchange);
    // Bound for CardMovedEvent only: CardArchivedEvent is unroutable.
    let mut tap = Tap::bind(&settings.amqp.exchange, &["CardMovedEvent"]).await;

    let mut tx = db.pool.begin().await.unwrap();
    outbox::enqueue(&mut tx, &CardMoved::new("card-a", 1))
        .await
        .unwrap();
    let archived = CardArchived {
        aggregate_id: "card-a".into(),
        seq: 2,
    };
    outbox::enqueue(&mut tx, &archived).await.unwrap();
    outbox::enqueue(&mut tx, &CardMoved::new("card-a", 3))
        .await
        .unwrap();
    outbox::enqueue(&mut tx, &CardMoved::new("card-b", 1))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let (relay, publisher) = relay(&db.pool, &settings);
    let report = relay.run_once().await.unwrap();
    assert_eq!(report.published, 2, "card-a #1 and card-b #1: {report:?}");
    assert_eq!(report.failed, 1, "{report:?}");

    let records = outbox::audit(&db.pool, "card-a").await.unwrap();
    let status: Vec<(&str, i32)> = records.iter().map(|r| (r.status(), r.attempts)).collect();
    assert_eq!(
        status,
        vec![("published", 1), ("failing", 1), ("pending", 0)]
    );
    let error = records[1].last_error.as_deref().unwrap();
    assert!(
        error.contains("unroutable") && error.contains("CardArchivedEvent"),
        "{error}"
    );
    assert!(records[1].next_attempt_at.is_some(), "backs off");
    let backlog = outbox::backlog(&db.pool).await.unwrap();
    assert_eq!((backlog.pending, backlog.failing), (2, 1));
    // Backing off: a batch now claims nothing of card-a.
    assert_eq!(relay.run_once().await.unwrap().claimed, 0);

    // Someone binds the event; its retry is due; the aggregate goes on in order.
    tap.add_binding(&settings.amqp.exchange, "CardArchivedEvent")
        .await;
    db.execute("UPDATE event_outbox SET next_attempt_at = NULL")
        .await;
    let report = relay.run_once().await.unwrap();
    assert_eq!((report.published, report.failed), (2, 0), "{report:?}");
    let order: Vec<(String, u64)> = tap
        .take(4)
        .await
        .into_iter()
        .map(|m| {
            (
                format!(
                    "{}:{}",
                    m.body["aggregateId"].as_str().unwrap(),
                    m.routing_key
                ),
                m.body["seq"].as_u64().unwrap(),
            )
        })
        .filter(|(k, _)| k.starts_with("card-a"))
        .collect();
    assert_eq!(
        order,
        vec![
            ("card-a:CardMovedEvent".to_owned(), 1),
            ("card-a:CardArchivedEvent".to_owned(), 2),
            ("card-a:CardMovedEvent".to_owned(), 3)
        ]
    );
    let records = outbox::audit(&db.pool, "card-a").await.unwrap();
    assert!(records.iter().all(|r| r.status() == "published"));
    assert_eq!(records[1].attempts, 2);
    publisher.close().await;
    tap.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_wakes_the_relay_without_polling() {
    let db = TestDb::new().await;
    let mut settings = outbox_settings("outbox-notify", &db);
    // Polling alone would take an hour: only NOTIFY can deliver in time.
    settings.outbox.poll_interval = Duration::from_secs(3600);
    let mut cleanup = Cleanup::new();
    cleanup.exchange(&settings.amqp.exchange);
    let mut tap = Tap::bind(&settings.amqp.exchange, &["#"]).await;

    let (relay, publisher) = relay(&db.pool, &settings);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop.cancelled_owned()).await }
    });

    // The first may be caught by the relay's start-up batch...
    let first = enqueue_each(&db, &[CardMoved::new("card-1", 1)]).await;
    assert_eq!(tap.next().await.message_id(), first[0]);
    // ...the relay is now idle and waiting: only a notification wakes it.
    for seq in 2..5 {
        let id = enqueue_each(&db, &[CardMoved::new("card-1", seq)]).await;
        assert_eq!(tap.next().await.message_id(), id[0]);
    }
    stop.cancel();
    within("the relay to stop", task).await.unwrap().unwrap();
    assert!(tap.rest().await.is_empty());
    publisher.close().await;
    tap.close().await;
}

/// The side effect of the inbox test handler: one row per handled card move.
struct RecordMove;

impl InboxHandler for RecordMove {
    type Event = CardMoved;

    fn name(&self) -> &str {
        "board.record_move"
    }

    async fn handle(
        &self,
        event: CardMoved,
        ctx: Context,
        tx: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO moves (message_id, card_id, seq) VALUES ($1, $2, $3)")
            .bind(&ctx.message_id)
            .bind(&event.aggregate_id)
            .bind(event.seq as i32)
            .execute(&mut *tx)
            .await
            .transient()?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_before_marking_publishes_again_and_the_inbox_absorbs_the_copy() {
    let db = TestDb::new().await;
    let settings = outbox_settings("outbox-kill", &db);
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let mut tap = Tap::bind(&settings.amqp.exchange, &["#"]).await;
    // No unique key on message_id: the table shows every time the side effect ran.
    db.execute(
        "CREATE TABLE moves (message_id TEXT NOT NULL, card_id TEXT NOT NULL, seq INT NOT NULL)",
    )
    .await;

    let mut registry = Registry::new();
    registry
        .add(Inbox::new(db.pool.clone()).wrap(RecordMove))
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;

    // Marking rows published blocks on an advisory lock this test holds:
    // the relay is stuck after the broker's confirm, before its commit.
    let key: i64 = rand_key();
    let mut holder = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut *holder)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION hold_marking() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_advisory_lock_shared({key}); RETURN NEW; END; $$"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    db.execute(
        "CREATE TRIGGER hold_marking BEFORE UPDATE ON event_outbox FOR EACH ROW
         WHEN (NEW.published_at IS NOT NULL) EXECUTE FUNCTION hold_marking()",
    )
    .await;

    let ids = enqueue_each(&db, &[CardMoved::new("card-1", 1)]).await;
    let app_name = unique("doomed-relay");
    let doomed_pool = db.pool_named(&app_name).await;
    let (doomed, doomed_publisher) = relay(&doomed_pool, &settings);
    let batch = tokio::spawn(async move { doomed.run_once().await });

    // Published and handled once...
    assert_eq!(tap.next().await.message_id(), ids[0]);
    let first = next_outcome(&mut outcomes).await;
    assert_eq!(first.message_id, ids[0]);
    assert!(first.acked && first.succeeded == vec!["board.record_move"]);
    // ...but never marked: the relay dies (task and database session).
    assert!(!batch.is_finished());
    batch.abort();
    assert!(db.kill_backends(&app_name).await >= 1);
    let _ = batch.await;
    doomed_publisher.close().await;
    db.execute("DROP TRIGGER hold_marking ON event_outbox")
        .await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *holder)
        .await
        .unwrap();
    let records = outbox::audit(&db.pool, "card-1").await.unwrap();
    assert_eq!(records[0].status(), "pending", "the batch was rolled back");

    // The next relay publishes the event again (at least once)...
    let (relay, publisher) = relay(&db.pool, &settings);
    let report = within("a batch", relay.run_once()).await.unwrap();
    assert_eq!(report.published, 1);
    assert_eq!(tap.next().await.message_id(), ids[0]);
    // ...the worker receives the copy and the inbox skips the side effect.
    let second = next_outcome(&mut outcomes).await;
    assert_eq!(second.message_id, ids[0]);
    assert!(second.acked && second.succeeded == vec!["board.record_move"]);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM moves").await, 1);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM event_inbox").await, 1);
    assert_eq!(
        outbox::audit(&db.pool, "card-1").await.unwrap()[0].status(),
        "published"
    );
    let report = within("the worker to stop", worker.shutdown())
        .await
        .unwrap();
    assert_eq!(report.settled, 2);
    publisher.close().await;
    tap.close().await;
}

fn rand_key() -> i64 {
    i64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lists_an_aggregates_events_and_cleanup_keeps_pending_ones() {
    let db = TestDb::new().await;
    let settings = outbox_settings("outbox-audit", &db);
    let mut cleanup = Cleanup::new();
    cleanup.exchange(&settings.amqp.exchange);
    let tap = Tap::bind(&settings.amqp.exchange, &["#"]).await;

    let mut ids = enqueue_each(
        &db,
        &[
            CardMoved::new("card-1", 1),
            CardMoved::new("card-2", 1),
            CardMoved::new("card-1", 2),
        ],
    )
    .await;
    let (relay, publisher) = relay(&db.pool, &settings);
    assert_eq!(relay.run_once().await.unwrap().published, 3);
    ids.extend(enqueue_each(&db, &[CardMoved::new("card-1", 3)]).await);

    let records = outbox::audit(&db.pool, "card-1").await.unwrap();
    let seen: Vec<(String, &str)> = records
        .iter()
        .map(|r| (r.message_id.clone(), r.status()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (ids[0].clone(), "published"),
            (ids[2].clone(), "published"),
            (ids[3].clone(), "pending")
        ]
    );
    assert!(records.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(records[1].payload["seq"], 2);
    let table = outbox::render_audit(&records);
    assert!(
        table.contains(&ids[3]) && table.contains("pending"),
        "{table}"
    );

    // Age every row by ten days: only the published ones go.
    db.execute(
        "UPDATE event_outbox SET enqueued_at = enqueued_at - interval '10 days',
                published_at = published_at - interval '10 days'",
    )
    .await;
    let deleted = outbox::cleanup(&db.pool, Duration::from_secs(7 * 86400))
        .await
        .unwrap();
    assert_eq!(deleted, 3);
    let left = outbox::audit(&db.pool, "card-1").await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message_id, ids[3]);
    let backlog = outbox::backlog(&db.pool).await.unwrap();
    assert!(backlog.oldest.unwrap() > Duration::from_secs(9 * 86400));
    publisher.close().await;
    tap.close().await;
}
