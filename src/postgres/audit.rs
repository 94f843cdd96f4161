//! Reading the outbox: one aggregate's events, the backlog, the retention cleanup.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row, postgres::PgRow};

use super::db::db;
use crate::error::Result;

/// Rows deleted per statement by the retention cleanup.
const CLEANUP_CHUNK: i64 = 5_000;

/// One row of `event_outbox`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OutboxRecord {
    /// Enqueue order.
    pub id: i64,
    /// The AMQP message id.
    pub message_id: String,
    /// The AMQP correlation id.
    pub correlation_id: String,
    /// The `burrow-causation-id` header, if given.
    pub causation_id: Option<String>,
    /// The aggregate that raised the event.
    pub aggregate_id: String,
    /// The event type (routing key).
    pub event_type: String,
    /// The `burrow-event-version` header.
    pub event_version: i64,
    /// The body.
    pub payload: serde_json::Value,
    /// Further string headers (trace context).
    pub headers: serde_json::Value,
    /// When the event happened.
    pub occurred_at: DateTime<Utc>,
    /// When the row was written.
    pub enqueued_at: DateTime<Utc>,
    /// When the broker confirmed it; `None` while pending.
    pub published_at: Option<DateTime<Utc>>,
    /// Publish attempts recorded, the successful one included.
    pub attempts: i32,
    /// The last publish failure.
    pub last_error: Option<String>,
    /// A failed row is not tried again before this time.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When a scheduled event may be published (`enqueue_at`); `None` for
    /// an event published as soon as it is committed.
    pub due_at: Option<DateTime<Utc>>,
}

const RECORD_COLUMNS: &str = "id, message_id, correlation_id, causation_id, aggregate_id, event_type, \
     event_version, payload, headers, occurred_at, enqueued_at, published_at, attempts, last_error, \
     next_attempt_at, due_at";

impl OutboxRecord {
    fn from_row(row: &PgRow) -> std::result::Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            message_id: row.try_get("message_id")?,
            correlation_id: row.try_get("correlation_id")?,
            causation_id: row.try_get("causation_id")?,
            aggregate_id: row.try_get("aggregate_id")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            payload: row.try_get("payload")?,
            headers: row.try_get("headers")?,
            occurred_at: row.try_get("occurred_at")?,
            enqueued_at: row.try_get("enqueued_at")?,
            published_at: row.try_get("published_at")?,
            attempts: row.try_get("attempts")?,
            last_error: row.try_get("last_error")?,
            next_attempt_at: row.try_get("next_attempt_at")?,
            due_at: row.try_get("due_at")?,
        })
    }

    /// `published`, `pending`, `failing`, or `scheduled` (pending and not
    /// yet due, by this machine's clock).
    pub fn status(&self) -> &'static str {
        match (self.published_at, &self.last_error) {
            (Some(_), _) => "published",
            (None, Some(_)) => "failing",
            (None, None) if self.due_at.is_some_and(|due| due > Utc::now()) => "scheduled",
            (None, None) => "pending",
        }
    }
}

/// Every outbox event of one aggregate, in enqueue order (published ones
/// until the retention cleanup removes them).
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> burrow::Result<()> {
/// for record in burrow::outbox::audit(&pool, "collection-1").await? {
///     println!("{} {} {}", record.id, record.event_type, record.status());
/// }
/// # Ok(()) }
/// ```
pub async fn audit(pool: &PgPool, aggregate_id: &str) -> Result<Vec<OutboxRecord>> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {RECORD_COLUMNS} FROM event_outbox WHERE aggregate_id = $1 ORDER BY id"
    )))
    .bind(aggregate_id)
    .fetch_all(pool)
    .await
    .map_err(db(format!(
        "select the events of aggregate '{aggregate_id}' from event_outbox"
    )))?;
    rows.iter()
        .map(OutboxRecord::from_row)
        .collect::<std::result::Result<_, _>>()
        .map_err(db("read event_outbox rows"))
}

/// The outbox backlog: what `burrow outbox status` prints and the relay
/// exports as `burrow_outbox_pending` and `burrow_outbox_lag_seconds`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    /// Rows waiting to be published: not yet published, and due (every row
    /// that is not scheduled is due from its commit).
    pub pending: i64,
    /// Pending rows whose last publish attempt failed.
    pub failing: i64,
    /// How long the oldest pending row has waited: since it was written,
    /// or since it fell due for a scheduled one.
    pub oldest: Option<Duration>,
    /// Scheduled rows whose due time has not come (not counted as pending).
    pub scheduled: i64,
}

/// Reads the backlog.
pub async fn backlog(pool: &PgPool) -> Result<Backlog> {
    let row = sqlx::query(
        // now(): one instant for the whole statement, so every row is
        // either pending or scheduled.
        "SELECT count(*) FILTER (WHERE due_at IS NULL OR due_at <= now()) AS pending,
                count(*) FILTER (WHERE last_error IS NOT NULL) AS failing,
                EXTRACT(EPOCH FROM now() - min(GREATEST(enqueued_at, due_at))
                    FILTER (WHERE due_at IS NULL OR due_at <= now()))::float8 AS oldest,
                count(*) FILTER (WHERE due_at > now()) AS scheduled
         FROM event_outbox WHERE published_at IS NULL",
    )
    .fetch_one(pool)
    .await
    .map_err(db("count pending event_outbox rows"))?;
    let read = || -> std::result::Result<Backlog, sqlx::Error> {
        let oldest: Option<f64> = row.try_get("oldest")?;
        Ok(Backlog {
            pending: row.try_get("pending")?,
            failing: row.try_get("failing")?,
            oldest: oldest.map(|s| Duration::from_secs_f64(s.max(0.0))),
            scheduled: row.try_get("scheduled")?,
        })
    };
    read().map_err(db("read the outbox backlog"))
}

/// Deletes published events older than `older_than`, a chunk at a time so
/// no statement holds many locks; returns how many were deleted. Pending
/// events are never deleted.
pub async fn cleanup(pool: &PgPool, older_than: Duration) -> Result<u64> {
    let mut deleted = 0;
    loop {
        let n = sqlx::query(
            "DELETE FROM event_outbox WHERE id IN (
                 SELECT id FROM event_outbox
                 WHERE published_at < clock_timestamp() - make_interval(secs => $1)
                 LIMIT $2)",
        )
        .bind(older_than.as_secs_f64())
        .bind(CLEANUP_CHUNK)
        .execute(pool)
        .await
        .map_err(db("delete published rows from event_outbox"))?
        .rows_affected();
        deleted += n;
        if n < CLEANUP_CHUNK as u64 {
            return Ok(deleted);
        }
    }
}

/// A table of outbox records for `burrow outbox audit`.
pub fn render_audit(records: &[OutboxRecord]) -> String {
    if records.is_empty() {
        return "no outbox events\n".into();
    }
    let header = [
        "ID",
        "EVENT",
        "MESSAGE ID",
        "OCCURRED",
        "STATUS",
        "PUBLISHED",
        "ATTEMPTS",
        "LAST ERROR",
    ];
    let time = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string();
    let rows: Vec<[String; 8]> = records
        .iter()
        .map(|r| {
            let mut error: String = r
                .last_error
                .as_deref()
                .unwrap_or("-")
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(60)
                .collect();
            if r.last_error
                .as_ref()
                .is_some_and(|e| e.chars().count() > 60)
            {
                error.push('…');
            }
            [
                r.id.to_string(),
                r.event_type.clone(),
                r.message_id.clone(),
                time(&r.occurred_at),
                r.status().to_owned(),
                r.published_at.as_ref().map_or("-".into(), time),
                r.attempts.to_string(),
                error,
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&header.map(str::to_owned));
    for row in &rows {
        line(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_table_shows_status_and_errors() {
        let t = Utc::now();
        let record = OutboxRecord {
            id: 7,
            message_id: "m-7".into(),
            correlation_id: "m-7".into(),
            causation_id: None,
            aggregate_id: "card-1".into(),
            event_type: "CardAddedToLibraryEvent".into(),
            event_version: 1,
            payload: serde_json::json!({}),
            headers: serde_json::json!({}),
            occurred_at: t,
            enqueued_at: t,
            published_at: None,
            attempts: 2,
            last_error: Some("unroutable\nNO_ROUTE".into()),
            next_attempt_at: None,
            due_at: None,
        };
        let text = render_audit(&[record]);
        assert!(text.starts_with("ID"), "{text}");
        assert!(text.contains("failing"), "{text}");
        assert!(text.contains("unroutable NO_ROUTE"), "{text}");
        assert_eq!(render_audit(&[]), "no outbox events\n");
    }
}
