//! The idempotent inbox against the real PostgreSQL (and, end to end, the
//! real RabbitMQ): a redelivered message's side effects happen once, a
//! failed run leaves nothing behind, a concurrent duplicate waits for the
//! first run and follows its fate.
#![cfg(feature = "postgres")]

mod common;
#[path = "common/pg.rs"]
mod pg;

use burrow::{
    Context, Event, EventMeta, HandlerError, Registry, ResultExt,
    inbox::{Inbox, InboxHandler},
};
use common::{
    CardAdded, Cleanup, TestApp, eventually, next_outcome, publisher, start_worker, unique, within,
};
use pg::TestDb;
use sqlx::PgConnection;

async fn with_side_effects() -> TestDb {
    let db = TestDb::new().await;
    // No unique key: every run of a side effect shows up as a row.
    db.execute("CREATE TABLE side_effects (handler TEXT NOT NULL, message_id TEXT NOT NULL)")
        .await;
    db
}

async fn side_effect(tx: &mut PgConnection, ctx: &Context) {
    sqlx::query("INSERT INTO side_effects (handler, message_id) VALUES ($1, $2)")
        .bind(&*ctx.handler)
        .bind(&ctx.message_id)
        .execute(&mut *tx)
        .await
        .expect("side effect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_runs_its_side_effect_once() {
    let db = with_side_effects().await;
    let inbox = Inbox::new(db.pool.clone());
    let ctx = Context::for_test(CardAdded::EVENT_TYPE, "feeds.add");

    let mut tx = inbox.begin(&ctx).await.unwrap().expect("first delivery");
    side_effect(&mut tx, &ctx).await;
    tx.commit().await.unwrap();
    assert!(
        inbox
            .is_processed("feeds.add", &ctx.message_id)
            .await
            .unwrap()
    );

    // The redelivery: same handler, same message id.
    assert!(inbox.begin(&ctx).await.unwrap().is_none());
    assert_eq!(db.scalar_i64("SELECT count(*) FROM side_effects").await, 1);

    // Another handler of the same message has its own entry.
    let other = Context {
        handler: "notifications.notify".into(),
        ..ctx.clone()
    };
    let mut tx = inbox.begin(&other).await.unwrap().expect("other handler");
    side_effect(&mut tx, &other).await;
    tx.commit().await.unwrap();
    assert_eq!(db.scalar_i64("SELECT count(*) FROM side_effects").await, 2);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM event_inbox").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_leaves_no_inbox_row_so_the_retry_does_the_work() {
    let db = with_side_effects().await;
    let inbox = Inbox::new(db.pool.clone());
    let ctx = Context::for_test(CardAdded::EVENT_TYPE, "feeds.add");

    let mut tx = inbox.begin(&ctx).await.unwrap().expect("first attempt");
    side_effect(&mut tx, &ctx).await;
    drop(tx); // the handler failed after writing: everything rolls back
    assert!(
        !inbox
            .is_processed("feeds.add", &ctx.message_id)
            .await
            .unwrap()
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM side_effects").await, 0);

    let mut tx = inbox.begin(&ctx).await.unwrap().expect("the retry runs");
    side_effect(&mut tx, &ctx).await;
    tx.commit().await.unwrap();
    assert_eq!(db.scalar_i64("SELECT count(*) FROM side_effects").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_duplicate_waits_for_the_first_run_and_follows_its_fate() {
    let db = with_side_effects().await;
    let inbox = Inbox::new(db.pool.clone());
    let ctx = Context::for_test(CardAdded::EVENT_TYPE, "feeds.add");
    let first = inbox.begin(&ctx).await.unwrap().expect("first run");

    // A redelivery arrives while the first run still holds its transaction.
    let name = unique("second-run");
    let second_inbox = Inbox::new(db.pool_named(&name).await);
    let second = tokio::spawn({
        let ctx = ctx.clone();
        async move {
            let tx = second_inbox.begin(&ctx).await.unwrap();
            match tx {
                Some(mut tx) => {
                    side_effect(&mut tx, &ctx).await;
                    tx.commit().await.unwrap();
                    true
                }
                None => false,
            }
        }
    });
    // It waits on the inbox row's key...
    eventually("the second run to wait on the first", || async {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
             WHERE application_name = $1 AND wait_event_type = 'Lock')",
        )
        .bind(&name)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if waiting {
            Ok(())
        } else {
            Err("no lock wait yet")
        }
    })
    .await;
    assert!(!second.is_finished());
    // ...and the first run fails: the second does the work instead.
    drop(first);
    assert!(within("the second run", second).await.unwrap());
    assert_eq!(db.scalar_i64("SELECT count(*) FROM side_effects").await, 1);

    // Had the first committed, the second would have skipped.
    let ctx = Context::for_test(CardAdded::EVENT_TYPE, "feeds.add");
    let mut first = inbox.begin(&ctx).await.unwrap().unwrap();
    side_effect(&mut first, &ctx).await;
    let late = tokio::spawn({
        let inbox = inbox.clone();
        let ctx = ctx.clone();
        async move { inbox.begin(&ctx).await.unwrap().is_some() }
    });
    first.commit().await.unwrap();
    assert!(!within("the duplicate", late).await.unwrap());
    assert_eq!(db.scalar_i64("SELECT count(*) FROM side_effects").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_inbox_rows_are_cleaned_up() {
    let db = TestDb::new().await;
    let inbox = Inbox::new(db.pool.clone());
    for _ in 0..3 {
        let ctx = Context::for_test(CardAdded::EVENT_TYPE, "feeds.add");
        inbox
            .begin(&ctx)
            .await
            .unwrap()
            .unwrap()
            .commit()
            .await
            .unwrap();
    }
    db.execute(
        "UPDATE event_inbox SET processed_at = processed_at - interval '40 days'
         WHERE message_id IN (SELECT message_id FROM event_inbox LIMIT 2)",
    )
    .await;
    let deleted = inbox
        .cleanup(std::time::Duration::from_secs(30 * 86400))
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM event_inbox").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_in_chunks_and_keeps_recent_rows() {
    let db = TestDb::new().await;
    let inbox = Inbox::new(db.pool.clone());
    // More than two chunks of 5,000 expired rows, and some recent ones.
    db.execute(
        "INSERT INTO event_inbox (handler, message_id, event_type, processed_at)
         SELECT 'feeds.add', 'old-' || n, 'CardAddedToLibraryEvent', now() - interval '8 days'
         FROM generate_series(1, 12345) AS n",
    )
    .await;
    db.execute(
        "INSERT INTO event_inbox (handler, message_id, event_type, processed_at)
         SELECT 'feeds.add', 'new-' || n, 'CardAddedToLibraryEvent', now() - interval '6 days'
         FROM generate_series(1, 7) AS n",
    )
    .await;
    let deleted = within(
        "the cleanup",
        inbox.cleanup(std::time::Duration::from_secs(7 * 86400)),
    )
    .await
    .unwrap();
    assert_eq!(deleted, 12345);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM event_inbox WHERE message_id LIKE 'new-%'")
            .await,
        7
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM event_inbox").await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_cleanup_deletes_expired_rows_until_shutdown() {
    let db = TestDb::new().await;
    let inbox = Inbox::new(db.pool.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let inbox = inbox.clone();
        let stop = stop.clone();
        async move {
            inbox
                .run_cleanup(
                    std::time::Duration::from_secs(3600),
                    std::time::Duration::from_millis(50),
                    stop.cancelled_owned(),
                )
                .await
        }
    });
    // Rows that expire while it runs are deleted by a later round; a
    // recent row stays.
    for round in 0..2 {
        sqlx::query(
            "INSERT INTO event_inbox (handler, message_id, event_type, processed_at)
             VALUES ('feeds.add', $1, 'CardAddedToLibraryEvent', now() - interval '2 hours'),
                    ('feeds.add', $2, 'CardAddedToLibraryEvent', now())",
        )
        .bind(format!("expired-{round}"))
        .bind(format!("recent-{round}"))
        .execute(&db.pool)
        .await
        .unwrap();
        eventually("the expired row to be deleted", || async {
            match db
                .scalar_i64("SELECT count(*) FROM event_inbox WHERE message_id LIKE 'expired-%'")
                .await
            {
                0 => Ok(()),
                expired => Err(format!("{expired} expired rows")),
            }
        })
        .await;
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM event_inbox").await, 2);
    stop.cancel();
    within("run_cleanup to return on shutdown", task)
        .await
        .unwrap();

    // A retention of zero keeps everything: it returns at once.
    within(
        "run_cleanup with retention 0s",
        inbox.run_cleanup(
            std::time::Duration::ZERO,
            std::time::Duration::from_millis(50),
            std::future::pending(),
        ),
    )
    .await;
}

/// Records each handled card in the test's table, through the inbox.
struct RecordCard;

impl InboxHandler for RecordCard {
    type Event = CardAdded;

    fn name(&self) -> &str {
        "cards.record"
    }

    async fn handle(
        &self,
        event: CardAdded,
        ctx: Context,
        tx: &mut PgConnection,
    ) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO side_effects (handler, message_id) VALUES ($1, $2)")
            .bind(&event.aggregate_id)
            .bind(&ctx.message_id)
            .execute(&mut *tx)
            .await
            .transient()?;
        if event.title == "fail once" && ctx.attempt == 1 {
            // Written above, then failed: rolled back with the inbox row.
            return Err(HandlerError::transient("the card service is down"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_worker_a_republished_message_is_handled_once() {
    let db = with_side_effects().await;
    let settings = TestApp::new("inbox").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let mut registry = Registry::new();
    registry
        .add(Inbox::new(db.pool.clone()).wrap(RecordCard))
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;

    // The same message twice, as a publisher resending after a lost
    // confirm (or a relay after a crash) would send it.
    let event = CardAdded::new("a card");
    let meta = EventMeta::default().message_id(unique("msg"));
    publisher.publish_with(&event, meta.clone()).await.unwrap();
    publisher.publish_with(&event, meta.clone()).await.unwrap();
    for _ in 0..2 {
        let outcome = next_outcome(&mut outcomes).await;
        assert!(
            outcome.acked && outcome.succeeded == vec!["cards.record"],
            "{outcome:?}"
        );
    }
    assert_eq!(db.scalar_i64("SELECT count(*) FROM side_effects").await, 1);

    // A failed attempt leaves nothing; the retry writes once.
    let flaky = CardAdded::new("fail once");
    publisher.publish(&flaky).await.unwrap();
    let failed = next_outcome(&mut outcomes).await;
    assert!(failed.retried.is_some(), "{failed:?}");
    let retried = next_outcome(&mut outcomes).await;
    assert_eq!(retried.attempt, 2);
    assert!(retried.succeeded == vec!["cards.record"], "{retried:?}");
    assert_eq!(db.scalar_i64("SELECT count(*) FROM side_effects").await, 2);

    within("the worker to stop", worker.shutdown())
        .await
        .unwrap();
    publisher.close().await;
}
