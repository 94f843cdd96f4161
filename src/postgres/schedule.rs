//! Scheduled events in the outbox: rows with a due time (`due_at`), the
//! relay's claim of those that are due, its timer on the earliest one still
//! to come, and cancelling.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, Transaction};

use super::{db::db, outbox::insert};
use crate::{
    error::Result,
    event::{DomainEvent, EventMeta},
};

/// When the relay may publish a row.
#[derive(Debug, Clone, Copy)]
pub(super) enum Due {
    /// As soon as it is committed (`due_at` NULL).
    Now,
    /// At this time.
    At(DateTime<Utc>),
    /// This long after the insert, on the database's clock.
    After(Duration),
}

/// Writes `event` into the outbox inside the caller's transaction, to be
/// published at `when` (not before, and as soon after as the relay wakes);
/// returns its message id, which [`cancel`] takes.
///
/// The relay compares `when` with the database's clock. A time in the past
/// is due at once. Unlike [`enqueue`](super::outbox::enqueue), a scheduled
/// event is outside its aggregate's order: it waits for the events of its
/// aggregate enqueued before it, but the ones enqueued after it do not wait
/// for it.
///
/// ```no_run
/// # use chrono::{DateTime, Utc};
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # #[serde(rename_all = "camelCase")]
/// # struct ReservationExpiredEvent { aggregate_id: String, occurred_at: DateTime<Utc> }
/// # impl burrow::Event for ReservationExpiredEvent {
/// #     const EVENT_TYPE: &'static str = "ReservationExpiredEvent";
/// # }
/// # impl burrow::DomainEvent for ReservationExpiredEvent {
/// #     fn aggregate_id(&self) -> String { self.aggregate_id.clone() }
/// #     fn occurred_at(&self) -> DateTime<Utc> { self.occurred_at }
/// # }
/// # async fn run(pool: sqlx::PgPool) -> burrow::Result<()> {
/// let at_six = "2026-11-24T18:00:00Z".parse::<DateTime<Utc>>().expect("a time");
/// let mut tx = pool.begin().await.expect("begin");
/// // ... the reservation is written in the same transaction ...
/// let expiry = burrow::outbox::enqueue_at(
///     &mut tx,
///     &ReservationExpiredEvent { aggregate_id: "reservation-7".into(), occurred_at: at_six },
///     at_six,
/// )
/// .await?;
/// tx.commit().await.expect("commit");
/// // Paid before six: the expiry never goes out.
/// let cancelled = burrow::outbox::cancel(&pool, &expiry).await?;
/// # Ok(()) }
/// ```
pub async fn enqueue_at<E: DomainEvent>(
    conn: &mut PgConnection,
    event: &E,
    when: DateTime<Utc>,
) -> Result<String> {
    insert(conn, event, EventMeta::default(), Due::At(when)).await
}

/// [`enqueue_at`] with explicit ids (see
/// [`enqueue_with`](super::outbox::enqueue_with)).
pub async fn enqueue_at_with<E: DomainEvent>(
    conn: &mut PgConnection,
    event: &E,
    when: DateTime<Utc>,
    meta: EventMeta,
) -> Result<String> {
    insert(conn, event, meta, Due::At(when)).await
}

/// [`enqueue_at`] `delay` from now, counted on the database's clock (the
/// insert's `clock_timestamp()`), so a skewed application clock does not
/// move it.
pub async fn enqueue_after<E: DomainEvent>(
    conn: &mut PgConnection,
    event: &E,
    delay: Duration,
) -> Result<String> {
    insert(conn, event, EventMeta::default(), Due::After(delay)).await
}

/// [`enqueue_after`] with explicit ids.
pub async fn enqueue_after_with<E: DomainEvent>(
    conn: &mut PgConnection,
    event: &E,
    delay: Duration,
    meta: EventMeta,
) -> Result<String> {
    insert(conn, event, meta, Due::After(delay)).await
}

/// Cancels the scheduled event `message_id` (from [`enqueue_at`] or
/// [`enqueue_after`]) if it has not been published: `true` if it was
/// deleted, `false` if it was already published, is not a scheduled event
/// or is unknown (retention deleted it, or it never was). Takes a pool or a
/// connection, so it can run in the transaction that makes the event moot.
///
/// A relay publishing the row at this moment holds its lock: `cancel` waits
/// for that batch and returns `false` once it committed. Should the batch
/// roll back after the broker confirmed the publish (the relay died in
/// between), `cancel` returns `true` although a copy went out: the same
/// at-least-once corner as any outbox event.
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool, reminder_id: String) -> burrow::Result<()> {
/// if !burrow::outbox::cancel(&pool, &reminder_id).await? {
///     println!("too late: the reminder went out");
/// }
/// # Ok(()) }
/// ```
pub async fn cancel<'e>(db_: impl sqlx::PgExecutor<'e>, message_id: &str) -> Result<bool> {
    let deleted = sqlx::query(
        "DELETE FROM event_outbox
         WHERE message_id = $1 AND published_at IS NULL AND due_at IS NOT NULL",
    )
    .bind(message_id)
    .execute(db_)
    .await
    .map_err(db(format!(
        "cancel the scheduled event '{message_id}' in event_outbox"
    )))?
    .rows_affected();
    Ok(deleted > 0)
}

/// Claims (locks) up to `limit` scheduled rows that are due, earliest first,
/// skipping rows another relay holds. A due row still waits for the
/// unscheduled rows of its aggregate enqueued before it, so an expiry never
/// overtakes the event that started the clock.
pub(super) async fn claim_due(
    tx: &mut Transaction<'static, Postgres>,
    limit: i64,
) -> Result<Vec<i64>> {
    sqlx::query_scalar(
        "SELECT o.id FROM event_outbox o
         WHERE o.published_at IS NULL AND o.due_at <= clock_timestamp()
           AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= clock_timestamp())
           AND NOT EXISTS (
               SELECT 1 FROM event_outbox e
               WHERE e.aggregate_id = o.aggregate_id
                 AND e.published_at IS NULL AND e.due_at IS NULL
                 AND e.id < o.id)
         ORDER BY o.due_at, o.id
         LIMIT $1
         FOR UPDATE OF o SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
    .map_err(db("claim due scheduled outbox rows"))
}

/// How long the relay sleeps: `poll_interval`, or less if a scheduled row
/// falls due sooner. Measured on the database's clock (the one
/// [`claim_due`] compares with) and rounded up to the next millisecond, so
/// the row is due when the relay wakes. A failed read falls back to the poll.
pub(super) async fn next_wait(pool: &sqlx::PgPool, poll_interval: Duration) -> Duration {
    let until: std::result::Result<Option<f64>, sqlx::Error> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM min(due_at) - clock_timestamp())::float8
         FROM event_outbox WHERE published_at IS NULL AND due_at > clock_timestamp()",
    )
    .fetch_one(pool)
    .await;
    match until {
        Ok(Some(seconds)) => {
            let millis = (seconds.max(0.0) * 1000.0).ceil() as u64 + 1;
            poll_interval.min(Duration::from_millis(millis))
        }
        Ok(None) => poll_interval,
        Err(e) => {
            tracing::debug!(error = %crate::redact::redact(&e.to_string()), "cannot read the next due time");
            poll_interval
        }
    }
}
