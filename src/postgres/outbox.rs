//! The transactional outbox on PostgreSQL (feature `postgres`).
//!
//! Saving an aggregate and then publishing its event are two writes to two
//! systems; a crash between them loses the event. With the outbox the app
//! writes the event into the `event_outbox` table **in the same transaction**
//! as the aggregate ([`enqueue`]), and a [`Relay`] publishes committed rows to
//! RabbitMQ through the confirmed [`Publisher`](crate::Publisher) and marks them published. A
//! rolled-back transaction leaves no event; a committed one is published even
//! if the app dies right after the commit.
//!
//! # How the relay claims work
//!
//! A batch is one database transaction:
//!
//! 1. claim the **head** (oldest pending row) of up to `outbox.batch_size`
//!    aggregates, `FOR UPDATE SKIP LOCKED`. A row is a head when no earlier
//!    row of its aggregate is pending; a row another relay holds is skipped;
//! 2. lock the rows that follow each claimed head (its aggregate's next
//!    pending rows, up to an even share of the batch). No other relay can
//!    hold them: it could only have claimed them through the head we hold;
//! 3. publish each aggregate's rows one after the other, each confirmed
//!    before the next is sent, aggregates concurrently. A failure (unroutable,
//!    nacked, no confirm) stops that aggregate's run: the failed row stays
//!    pending with `attempts`, `last_error` and a backoff in
//!    `next_attempt_at`, and the rows after it wait for it;
//! 4. mark the confirmed rows published and commit.
//!
//! So several relays in parallel never publish the same row in normal
//! operation, and the events of one aggregate leave in enqueue order. A relay
//! that dies between a confirm and the commit leaves its rows pending and
//! locks released; the next batch publishes them again with the same message
//! id. Delivery is at least once: consumers de-duplicate on the message id,
//! for example with the [`crate::inbox`].
//!
//! [`enqueue`] takes a transaction-scoped advisory lock on the aggregate id
//! before inserting, so transactions that enqueue events for one aggregate
//! commit in the order of their row ids: a row with a lower id can never
//! become visible after a later one of the same aggregate was published.
//!
//! # Waking up
//!
//! An `AFTER INSERT` trigger sends `NOTIFY burrow_outbox` with the table's
//! schema as payload; PostgreSQL delivers it when the enqueuing transaction
//! commits. The relay listens on its own connection and starts a batch at
//! once; it also looks every `outbox.poll_interval`, which covers missed
//! notifications (a lost listening connection) and the retries of failed rows.
//!
//! # Scheduled events
//!
//! [`enqueue_at`] and [`enqueue_after`] write a row with a due time
//! (`due_at`); the relay publishes it once that time has come, on the
//! database's clock, and [`cancel`] deletes it until then. Between batches the
//! relay sleeps until the earliest due row or the next poll, whichever comes
//! first, so a due row waits for no poll. A scheduled row is outside its
//! aggregate's order: it waits for the unscheduled rows enqueued before it,
//! but the rows enqueued after it do not wait for it.
//! See docs/outbox.md for the table, the guarantees and the failure modes.

use lapin::types::{AMQPValue, FieldTable};
use sqlx::{PgConnection, types::Json};

use crate::{
    error::{Error, Result},
    event::{DomainEvent, EventMeta},
    wire::short_string,
};

pub(crate) use super::db::db;
use super::schedule::Due;
pub use super::{
    audit::{Backlog, OutboxRecord, audit, backlog, cleanup, render_audit},
    db::{
        MIGRATIONS_TABLE, NOTIFY_CHANNEL, connect, connect_lazy, connect_options,
        connect_with_retry, migrate, migrator, prepare,
    },
    relay::{BatchReport, Relay},
    schedule::{cancel, enqueue_after, enqueue_after_with, enqueue_at, enqueue_at_with},
};

/// The first key of burrow's two-key advisory locks ("burr"), so they never
/// meet an app's own single-key advisory locks.
const ADVISORY_NAMESPACE: i32 = 1_651_864_178;

/// Writes `event` into the outbox inside the caller's transaction and returns
/// its message id. The event is published once the transaction commits, and
/// never if it rolls back.
///
/// The message carries burrow's wire contract like a direct
/// [`Publisher::publish`](crate::Publisher::publish): a fresh UUID as message id and correlation id,
/// the event type, `occurred_at` as timestamp, the event version header.
///
/// ```no_run
/// # use chrono::{DateTime, Utc};
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # #[serde(rename_all = "camelCase")]
/// # struct CollectionCreatedEvent { aggregate_id: String, name: String, occurred_at: DateTime<Utc> }
/// # impl burrow::Event for CollectionCreatedEvent {
/// #     const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
/// # }
/// #
/// # impl burrow::DomainEvent for CollectionCreatedEvent {
/// #     fn aggregate_id(&self) -> String { self.aggregate_id.clone() }
/// #     fn occurred_at(&self) -> DateTime<Utc> { self.occurred_at }
/// # }
/// # async fn run(pool: sqlx::PgPool) -> burrow::Result<()> {
/// let event = CollectionCreatedEvent {
///     aggregate_id: "collection-1".into(),
///     name: "Papers to read".into(),
///     occurred_at: Utc::now(),
/// };
/// let mut tx = pool.begin().await.expect("begin");
/// sqlx::query("INSERT INTO collections (id, name) VALUES ($1, $2)")
///     .bind(&event.aggregate_id)
///     .bind(&event.name)
///     .execute(&mut *tx)
///     .await
///     .expect("insert");
/// burrow::outbox::enqueue(&mut tx, &event).await?;
/// tx.commit().await.expect("commit"); // the relay publishes it from here on
/// # Ok(()) }
/// ```
pub async fn enqueue<E: DomainEvent>(conn: &mut PgConnection, event: &E) -> Result<String> {
    enqueue_with(conn, event, EventMeta::default()).await
}

/// [`enqueue`] with explicit ids: a message id of your own (for example one
/// derived from a command id, so that enqueuing twice fails with
/// [`Error::DuplicateMessageId`]), a correlation id and a causation id.
pub async fn enqueue_with<E: DomainEvent>(
    conn: &mut PgConnection,
    event: &E,
    meta: EventMeta,
) -> Result<String> {
    insert(conn, event, meta, Due::Now).await
}

/// Writes one row; `due` is when the relay may publish it.
pub(super) async fn insert<E: DomainEvent>(
    conn: &mut PgConnection,
    event: &E,
    meta: EventMeta,
    due: Due,
) -> Result<String> {
    let body = serde_json::to_value(event).map_err(|source| Error::Serialize {
        event_type: E::EVENT_TYPE.to_owned(),
        source,
    })?;
    if !body.is_object() {
        return Err(Error::InvalidEvent {
            event_type: E::EVENT_TYPE.to_owned(),
            reason: "it does not serialise to a JSON object".into(),
        });
    }
    let message_id = meta
        .message_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let correlation_id = meta.correlation_id.unwrap_or_else(|| message_id.clone());
    // Fail now rather than leave a row the relay can never publish.
    short_string("message id", &message_id)?;
    short_string("correlation id", &correlation_id)?;
    short_string("event type", E::EVENT_TYPE)?;
    let (due_at, due_in) = match due {
        Due::Now => (None, None),
        Due::At(at) => (Some(at), None),
        // Counted on the database's clock, the one the relay compares with.
        Due::After(delay) => (None, Some(delay.as_secs_f64())),
    };
    let result = sqlx::query(
        "WITH serialised AS (SELECT pg_advisory_xact_lock($1, hashtext($5)))
         INSERT INTO event_outbox
             (message_id, correlation_id, causation_id, aggregate_id, event_type,
              event_version, payload, headers, occurred_at, due_at)
         SELECT $2, $3, $4, $5, $6, $7, $8, $9, $10,
                COALESCE($11::timestamptz,
                         CASE WHEN $12::float8 IS NULL THEN NULL
                              ELSE clock_timestamp() + make_interval(secs => $12::float8) END)
         FROM serialised",
    )
    .bind(ADVISORY_NAMESPACE)
    .bind(&message_id)
    .bind(&correlation_id)
    .bind(&meta.causation_id)
    .bind(event.aggregate_id())
    .bind(E::EVENT_TYPE)
    .bind(i64::from(E::VERSION))
    .bind(Json(&body))
    .bind(Json(trace_headers()))
    .bind(event.occurred_at())
    .bind(due_at)
    .bind(due_in)
    .execute(&mut *conn)
    .await;
    match result {
        Ok(_) => Ok(message_id),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            Err(Error::DuplicateMessageId {
                message_id,
                event_type: E::EVENT_TYPE.to_owned(),
            })
        }
        Err(source) => Err(Error::Database {
            operation: format!("insert {} into event_outbox", E::EVENT_TYPE),
            source,
        }),
    }
}

/// The trace context of the enqueuing request (feature `otel`), so the
/// handler's span joins the trace that raised the event, however late the
/// relay publishes it.
fn trace_headers() -> serde_json::Map<String, serde_json::Value> {
    #[allow(unused_mut)]
    let mut table = FieldTable::default();
    #[cfg(feature = "otel")]
    crate::otel::inject(&mut table);
    table
        .inner()
        .iter()
        .filter_map(|(k, v)| match v {
            AMQPValue::LongString(s) => Some((
                k.to_string(),
                String::from_utf8_lossy(s.as_bytes()).into_owned().into(),
            )),
            AMQPValue::ShortString(s) => Some((k.to_string(), s.to_string().into())),
            _ => None,
        })
        .collect()
}
