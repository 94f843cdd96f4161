//! The transactional outbox on PostgreSQL (feature `postgres`).
//!
//! Saving an aggregate and then publishing its event are two writes to two
//! systems; a crash between them loses the event. With the outbox the app
//! writes the event into the `event_outbox` table **in the same transaction**
//! as the aggregate ([`enqueue`]), and a [`Relay`] publishes committed rows to
//! RabbitMQ through the confirmed [`Publisher`] and marks them published. A
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
//! See docs/outbox.md for the table, the guarantees and the failure modes.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};
use sqlx::{
    PgConnection, PgPool, Row, SqlSafeStr,
    migrate::{Migration, MigrationType, Migrator},
    postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow},
    types::Json,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{OutboxSettings, PostgresSettings, Settings},
    error::{Error, Result},
    event::{DomainEvent, EventMeta},
    metrics::Metrics,
    publisher::Publisher,
    wire::{headers, long_string, short_string},
};

/// The channel the `event_outbox` insert trigger notifies; the payload is
/// the table's schema.
pub const NOTIFY_CHANNEL: &str = "burrow_outbox";

/// The table in which burrow records which of its migrations ran. Separate
/// from sqlx's default `_sqlx_migrations`, so burrow's migrations and the
/// app's own never see each other.
pub const MIGRATIONS_TABLE: &str = "_burrow_migrations";

/// burrow's migrations, embedded from `migrations/`.
const MIGRATIONS: [(i64, &str, &str); 2] = [
    (
        20261124000001,
        "event outbox",
        include_str!("../migrations/20261124000001_event_outbox.sql"),
    ),
    (
        20261124000002,
        "event inbox",
        include_str!("../migrations/20261124000002_event_inbox.sql"),
    ),
];

/// The first key of burrow's two-key advisory locks ("burr"), so they never
/// meet an app's own single-key advisory locks.
const ADVISORY_NAMESPACE: i32 = 1_651_864_178;

/// Failed rows wait 1 s, 2 s, 4 s, ... before the next attempt, at most this long.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(300);

/// How often the relay refreshes the backlog gauges while it is busy.
const BACKLOG_REFRESH: Duration = Duration::from_secs(1);

/// Rows deleted per statement by the retention cleanup.
const CLEANUP_CHUNK: i64 = 5_000;

/// burrow's migrations (the `event_outbox` and `event_inbox` tables), tracked
/// in [`MIGRATIONS_TABLE`] of the connection's current schema.
pub fn migrator() -> Migrator {
    let migrations = MIGRATIONS
        .iter()
        .map(|(version, description, sql)| {
            Migration::new(
                *version,
                Cow::Borrowed(*description),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

/// Applies burrow's migrations to the pool's database (in its current
/// schema). Safe to call from many processes at once: sqlx serialises
/// migration runs with an advisory lock.
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> burrow::Result<()> {
/// burrow::outbox::migrate(&pool).await?;
/// # Ok(()) }
/// ```
pub async fn migrate(pool: &PgPool) -> Result<()> {
    migrator()
        .run(pool)
        .await
        .map_err(|source| Error::Migrate { source })
}

/// The connect options for `settings`: the URL, plus `search_path` when
/// `postgres.schema` is set.
pub fn connect_options(settings: &PostgresSettings) -> Result<PgConnectOptions> {
    let url = settings.url.as_ref().ok_or_else(|| {
        Error::Config(
            "postgres.url is unset; set it (BURROW__POSTGRES__URL) to use the outbox or the inbox"
                .into(),
        )
    })?;
    let mut options: PgConnectOptions = url.expose().parse().map_err(|e: sqlx::Error| {
        Error::Config(format!(
            "postgres.url = {url} is invalid: {}; expected postgres://user:password@host:5432/database",
            crate::redact::redact(&e.to_string())
        ))
    })?;
    if let Some(password) = settings.password()? {
        options = options.password(&password);
    }
    if let Some(schema) = &settings.schema {
        options = options.options([("search_path", schema.as_str())]);
    }
    Ok(options)
}

/// Opens a pool for `settings` and checks that the database answers.
///
/// ```no_run
/// # async fn run() -> burrow::Result<()> {
/// let settings = burrow::Settings::load()?;
/// let pool = burrow::outbox::connect(&settings.postgres).await?;
/// # Ok(()) }
/// ```
pub async fn connect(settings: &PostgresSettings) -> Result<PgPool> {
    let options = connect_options(settings)?;
    let url = settings
        .url
        .as_ref()
        .map(|u| u.to_string())
        .unwrap_or_default();
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|source| Error::DatabaseConnect { url, source })
}

/// How long one connection attempt of [`connect_with_retry`] may take: a
/// host that drops packets (a firewall, a cut network) would otherwise hold
/// the attempt until the kernel gives up on the TCP handshake.
const CONNECT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest wait between two attempts to reach the database.
const MAX_DATABASE_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Delays between attempts to reach the database: 200 ms doubling to 30 s,
/// with jitter so that a fleet of workers does not knock in lockstep after a
/// database restart; never gives up (like the broker connection, see
/// [`crate::Worker::run`]).
pub(crate) fn database_backoff() -> impl Iterator<Item = Duration> + Send {
    crate::backoff::capped(Duration::from_millis(200), MAX_DATABASE_RETRY_DELAY)
}

/// One attempt: a single probe connection first, so the error is the
/// server's own (connection refused, an unknown database, a wrong password)
/// rather than the pool's "timed out" after its own retries; then the pool,
/// then the migrations when `migrate` is on.
async fn connect_once(settings: &PostgresSettings, migrate: bool) -> Result<PgPool> {
    use sqlx::{ConnectOptions, Connection};
    let options = connect_options(settings)?;
    let url = settings
        .url
        .as_ref()
        .map(|u| u.to_string())
        .unwrap_or_default();
    let probe = tokio::time::timeout(CONNECT_ATTEMPT_TIMEOUT, options.connect())
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within {}",
                    humantime::format_duration(CONNECT_ATTEMPT_TIMEOUT)
                ),
            )))
        })
        .map_err(|source| Error::DatabaseConnect {
            url: url.clone(),
            source,
        })?;
    let _ = probe.close().await;
    let pool = connect(settings).await?;
    if migrate {
        prepare(&pool, settings).await?;
    }
    Ok(pool)
}

/// Connects to `settings`' database and, with `migrate`, applies burrow's
/// migrations ([`prepare`]), trying again for as long as the failure may go
/// away by itself: the server is down or starting, the network drops
/// packets, the connection limit is reached. Each retry is logged (with the
/// URL's password hidden) after a capped, jittered backoff (200 ms doubling
/// to 30 s). Returns `Ok(None)` when `shutdown` completes first.
///
/// Failures a person must fix end it at once with the error: a malformed
/// `postgres.url`, a wrong password, an unknown database, a migration whose
/// checksum differs from the one applied (see [`Error::is_retryable`]).
///
/// ```no_run
/// # async fn run() -> burrow::Result<()> {
/// let settings = burrow::Settings::load()?;
/// let ctrl_c = async { tokio::signal::ctrl_c().await.ok(); };
/// let Some(pool) = burrow::outbox::connect_with_retry(&settings.postgres, true, ctrl_c).await? else {
///     return Ok(()); // stopped while waiting for the database
/// };
/// # Ok(()) }
/// ```
pub async fn connect_with_retry(
    settings: &PostgresSettings,
    migrate: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<Option<PgPool>> {
    tokio::pin!(shutdown);
    let mut delays = database_backoff();
    let mut attempts: u32 = 0;
    loop {
        let attempt = tokio::select! {
            () = &mut shutdown => return Ok(None),
            result = connect_once(settings, migrate) => result,
        };
        match attempt {
            Ok(pool) => {
                if attempts > 0 {
                    tracing::info!(attempts, "reached PostgreSQL");
                }
                return Ok(Some(pool));
            }
            Err(error) if error.is_retryable() => {
                attempts = attempts.saturating_add(1);
                let delay = delays.next().unwrap_or(MAX_DATABASE_RETRY_DELAY);
                tracing::warn!(
                    %error,
                    attempts,
                    retry_in = %humantime::format_duration(delay),
                    "PostgreSQL (postgres.url) is not reachable; retrying"
                );
                tokio::select! {
                    () = &mut shutdown => return Ok(None),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => return Err(error),
        }
    }
}

/// A pool for `settings` that connects on first use (must be called inside
/// a Tokio runtime).
pub fn connect_lazy(settings: &PostgresSettings) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(connect_options(settings)?))
}

/// Creates `postgres.schema` when it is set and missing, then applies the
/// migrations: what `burrow run` and `burrow outbox relay` do at start
/// when `postgres.migrate` is on.
pub async fn prepare(pool: &PgPool, settings: &PostgresSettings) -> Result<()> {
    if let Some(schema) = &settings.schema {
        // The name passed validation: lowercase letters, digits and '_' only.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
        )))
        .execute(pool)
        .await
        .map_err(db(format!("create schema {schema}")))?;
    }
    migrate(pool).await
}

pub(crate) fn db(operation: impl Into<String>) -> impl FnOnce(sqlx::Error) -> Error {
    let operation = operation.into();
    move |source| Error::Database { operation, source }
}

// ---------------------------------------------------------------------------
// Enqueue
// ---------------------------------------------------------------------------

/// Writes `event` into the outbox inside the caller's transaction and returns
/// its message id. The event is published once the transaction commits, and
/// never if it rolls back.
///
/// The message carries burrow's wire contract like a direct
/// [`Publisher::publish`]: a fresh UUID as message id and correlation id,
/// the event type, `occurred_at` as timestamp, the event version header.
///
/// ```no_run
/// # use chrono::{DateTime, Utc};
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # #[serde(rename_all = "camelCase")]
/// # struct CollectionCreatedEvent { aggregate_id: String, name: String, occurred_at: DateTime<Utc> }
/// # impl burrow::DomainEvent for CollectionCreatedEvent {
/// #     const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
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
    let result = sqlx::query(
        "WITH serialised AS (SELECT pg_advisory_xact_lock($1, hashtext($5)))
         INSERT INTO event_outbox
             (message_id, correlation_id, causation_id, aggregate_id, event_type,
              event_version, payload, headers, occurred_at)
         SELECT $2, $3, $4, $5, $6, $7, $8, $9, $10 FROM serialised",
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

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

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
}

const RECORD_COLUMNS: &str = "id, message_id, correlation_id, causation_id, aggregate_id, event_type, \
     event_version, payload, headers, occurred_at, enqueued_at, published_at, attempts, last_error, \
     next_attempt_at";

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
        })
    }

    /// `published`, `pending` or `failing`.
    pub fn status(&self) -> &'static str {
        match (self.published_at, &self.last_error) {
            (Some(_), _) => "published",
            (None, Some(_)) => "failing",
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
    /// Rows not yet published.
    pub pending: i64,
    /// Pending rows whose last publish attempt failed.
    pub failing: i64,
    /// Age of the oldest pending row.
    pub oldest: Option<Duration>,
}

/// Reads the backlog.
pub async fn backlog(pool: &PgPool) -> Result<Backlog> {
    let row = sqlx::query(
        "SELECT count(*) AS pending,
                count(*) FILTER (WHERE last_error IS NOT NULL) AS failing,
                EXTRACT(EPOCH FROM clock_timestamp() - min(enqueued_at))::float8 AS oldest
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

// ---------------------------------------------------------------------------
// The relay
// ---------------------------------------------------------------------------

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Rows locked by the batch.
    pub claimed: usize,
    /// Rows confirmed by the broker and marked published.
    pub published: usize,
    /// Rows whose publish failed (recorded in `attempts` and `last_error`).
    pub failed: usize,
}

/// Publishes committed outbox rows, in order per aggregate; see the module
/// documentation. Cheap to clone; run several (in one process or many) for
/// throughput or availability.
///
/// ```no_run
/// # async fn run() -> burrow::Result<()> {
/// let settings = burrow::Settings::load()?;
/// let pool = burrow::outbox::connect(&settings.postgres).await?;
/// burrow::outbox::migrate(&pool).await?;
/// let publisher = burrow::Publisher::connect(&settings).await?;
/// let relay = burrow::outbox::Relay::new(pool, publisher, &settings);
/// relay.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Relay {
    inner: Arc<RelayInner>,
}

struct RelayInner {
    pool: PgPool,
    publisher: Publisher,
    settings: OutboxSettings,
    app_id: String,
    metrics: Metrics,
    /// Whether the last batch reached the database; see [`Relay::healthy`].
    healthy: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("exchange", &self.inner.publisher.exchange())
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

/// A claimed row, as much of it as publishing needs.
struct Claimed {
    id: i64,
    message_id: String,
    correlation_id: String,
    causation_id: Option<String>,
    event_type: String,
    event_version: i64,
    payload: serde_json::Value,
    headers: serde_json::Value,
    occurred_at: DateTime<Utc>,
    enqueued_at: DateTime<Utc>,
    attempts: i32,
}

enum RowOutcome {
    Published(DateTime<Utc>),
    Failed(String),
}

impl Relay {
    /// A relay publishing `pool`'s outbox through `publisher`, with
    /// `settings.outbox` and the app name of `settings` as AMQP `app_id`.
    /// Metrics go to the publisher's [`Metrics`].
    pub fn new(pool: PgPool, publisher: Publisher, settings: &Settings) -> Self {
        let metrics = publisher.metrics().clone();
        Self {
            inner: Arc::new(RelayInner {
                pool,
                publisher,
                settings: settings.outbox.clone(),
                app_id: settings.app.name.clone(),
                metrics,
                healthy: tokio::sync::watch::Sender::new(false),
            }),
        }
    }

    /// The pool this relay reads.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Whether the relay's last batch reached the database: `false` until
    /// the first batch of [`Relay::run`] completes and while batches fail
    /// (the database is away); `true` otherwise. A publish the broker
    /// refuses does not count: it is recorded on its row and retried. `burrow
    /// outbox relay` answers `/readyz` from this.
    pub fn healthy(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.healthy.subscribe()
    }

    /// Claims, publishes and marks one batch; see the module documentation.
    /// An error means the batch was rolled back: its rows stay pending (any
    /// that were confirmed are published again by a later batch).
    pub async fn run_once(&self) -> Result<BatchReport> {
        let inner = &self.inner;
        let batch_size = i64::from(inner.settings.batch_size);
        let mut tx = inner
            .pool
            .begin()
            .await
            .map_err(db("begin an outbox batch"))?;
        let heads: Vec<String> = sqlx::query_scalar(
            "SELECT o.aggregate_id FROM event_outbox o
             WHERE o.published_at IS NULL
               AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= clock_timestamp())
               AND NOT EXISTS (
                   SELECT 1 FROM event_outbox e
                   WHERE e.aggregate_id = o.aggregate_id
                     AND e.published_at IS NULL
                     AND e.id < o.id)
             ORDER BY o.id
             LIMIT $1
             FOR UPDATE OF o SKIP LOCKED",
        )
        .bind(batch_size)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("claim outbox heads"))?;
        if heads.is_empty() {
            tx.commit().await.map_err(db("end an empty outbox batch"))?;
            return Ok(BatchReport::default());
        }
        // An even share of the batch per aggregate: one busy aggregate gets
        // the whole batch, many get one row each.
        let share = (batch_size / heads.len() as i64).max(1);
        let rows = sqlx::query(
            "SELECT id, message_id, correlation_id, causation_id, aggregate_id, event_type,
                    event_version, payload, headers, occurred_at, enqueued_at, attempts
             FROM event_outbox
             WHERE id IN (
                 SELECT id FROM (
                     SELECT id, row_number() OVER (PARTITION BY aggregate_id ORDER BY id) AS n
                     FROM event_outbox
                     WHERE aggregate_id = ANY($1) AND published_at IS NULL) ranked
                 WHERE n <= $2)
             ORDER BY id
             FOR UPDATE",
        )
        .bind(&heads)
        .bind(share)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("lock the claimed aggregates' outbox rows"))?;
        let mut runs: BTreeMap<String, Vec<Claimed>> = BTreeMap::new();
        for row in &rows {
            let read = || -> std::result::Result<(String, Claimed), sqlx::Error> {
                Ok((
                    row.try_get("aggregate_id")?,
                    Claimed {
                        id: row.try_get("id")?,
                        message_id: row.try_get("message_id")?,
                        correlation_id: row.try_get("correlation_id")?,
                        causation_id: row.try_get("causation_id")?,
                        event_type: row.try_get("event_type")?,
                        event_version: row.try_get("event_version")?,
                        payload: row.try_get("payload")?,
                        headers: row.try_get("headers")?,
                        occurred_at: row.try_get("occurred_at")?,
                        enqueued_at: row.try_get("enqueued_at")?,
                        attempts: row.try_get("attempts")?,
                    },
                ))
            };
            let (aggregate, claimed) = read().map_err(db("read a claimed outbox row"))?;
            runs.entry(aggregate).or_default().push(claimed);
        }
        let claimed = rows.len();

        // Aggregates concurrently (bounded by the publisher's in-flight
        // window); within one, each row is confirmed before the next is sent.
        let outcomes: Vec<(Claimed, RowOutcome)> =
            futures_util::future::join_all(runs.into_values().map(|run| self.publish_run(run)))
                .await
                .into_iter()
                .flatten()
                .collect();

        let mut published_ids = Vec::new();
        let mut published_at = Vec::new();
        let mut report = BatchReport {
            claimed,
            ..BatchReport::default()
        };
        for (row, outcome) in &outcomes {
            match outcome {
                RowOutcome::Published(at) => {
                    published_ids.push(row.id);
                    published_at.push(*at);
                    report.published += 1;
                }
                RowOutcome::Failed(error) => {
                    let attempts = row.attempts.saturating_add(1);
                    let backoff = retry_backoff(attempts);
                    tracing::warn!(
                        message_id = %row.message_id,
                        event = %row.event_type,
                        attempts,
                        retry_in = %humantime::format_duration(backoff),
                        %error,
                        "outbox event not published; it stays pending and holds back later events of its aggregate"
                    );
                    sqlx::query(
                        "UPDATE event_outbox
                         SET attempts = attempts + 1, last_error = $2,
                             next_attempt_at = clock_timestamp() + make_interval(secs => $3)
                         WHERE id = $1",
                    )
                    .bind(row.id)
                    .bind(error)
                    .bind(backoff.as_secs_f64())
                    .execute(&mut *tx)
                    .await
                    .map_err(db("record a failed outbox publish"))?;
                    report.failed += 1;
                }
            }
        }
        if !published_ids.is_empty() {
            sqlx::query(
                "UPDATE event_outbox o
                 SET published_at = p.at, attempts = o.attempts + 1,
                     last_error = NULL, next_attempt_at = NULL
                 FROM UNNEST($1::bigint[], $2::timestamptz[]) AS p(id, at)
                 WHERE o.id = p.id",
            )
            .bind(&published_ids)
            .bind(&published_at)
            .execute(&mut *tx)
            .await
            .map_err(db("mark outbox rows published"))?;
        }
        tx.commit().await.map_err(db(
            "commit an outbox batch (its confirmed events will be published again)",
        ))?;
        for (row, outcome) in &outcomes {
            match outcome {
                RowOutcome::Published(at) => {
                    let delay = (*at - row.enqueued_at).to_std().unwrap_or_default();
                    inner
                        .metrics
                        .outbox_relayed(&row.event_type, true, Some(delay.as_secs_f64()));
                }
                RowOutcome::Failed(_) => inner.metrics.outbox_relayed(&row.event_type, false, None),
            }
        }
        tracing::debug!(
            claimed = report.claimed,
            published = report.published,
            failed = report.failed,
            "outbox batch"
        );
        Ok(report)
    }

    /// Publishes one aggregate's rows in order; stops at the first failure.
    async fn publish_run(&self, run: Vec<Claimed>) -> Vec<(Claimed, RowOutcome)> {
        let mut outcomes = Vec::with_capacity(run.len());
        for row in run {
            let outcome = match self.publish_row(&row).await {
                Ok(()) => RowOutcome::Published(Utc::now()),
                Err(e) => RowOutcome::Failed(e.to_string()),
            };
            let failed = matches!(outcome, RowOutcome::Failed(_));
            outcomes.push((row, outcome));
            if failed {
                break;
            }
        }
        outcomes
    }

    async fn publish_row(&self, row: &Claimed) -> Result<()> {
        let inner = &self.inner;
        let mut table = FieldTable::default();
        if let Some(extra) = row.headers.as_object() {
            for (name, value) in extra {
                if let Some(text) = value.as_str() {
                    table.insert(short_string("header name", name)?, long_string(text));
                }
            }
        }
        table.insert(
            headers::EVENT_VERSION.into(),
            AMQPValue::LongLongInt(row.event_version),
        );
        if let Some(causation) = &row.causation_id {
            table.insert(headers::CAUSATION_ID.into(), long_string(causation));
        }
        let properties = BasicProperties::default()
            .with_message_id(short_string("message id", &row.message_id)?)
            .with_correlation_id(short_string("correlation id", &row.correlation_id)?)
            .with_timestamp(row.occurred_at.timestamp().max(0) as u64)
            .with_type(short_string("event type", &row.event_type)?)
            .with_content_type(ShortString::from("application/json"))
            .with_app_id(short_string("app id", &inner.app_id)?)
            .with_delivery_mode(2)
            .with_headers(table);
        let body = serde_json::to_vec(&row.payload).map_err(|source| Error::Serialize {
            event_type: row.event_type.clone(),
            source,
        })?;
        inner
            .publisher
            .send(
                inner.publisher.exchange(),
                &row.event_type,
                &body,
                properties,
            )
            .await
    }

    /// Runs batches until one claims less than a full batch (the backlog is
    /// drained) or `stop` is cancelled.
    async fn drain(&self, stop: &CancellationToken, last_refresh: &mut Instant) -> Result<()> {
        loop {
            let report = self.run_once().await?;
            if last_refresh.elapsed() >= BACKLOG_REFRESH {
                self.refresh_backlog().await;
                *last_refresh = Instant::now();
            }
            let full = report.claimed >= self.inner.settings.batch_size as usize;
            // A full batch that published nothing is all failures, now backing off.
            if stop.is_cancelled() || !full || report.published == 0 {
                return Ok(());
            }
        }
    }

    /// Updates the `burrow_outbox_pending` and `burrow_outbox_lag_seconds` gauges.
    pub async fn refresh_backlog(&self) {
        match backlog(&self.inner.pool).await {
            Ok(b) => self
                .inner
                .metrics
                .outbox_backlog(b.pending, b.oldest.map_or(0.0, |d| d.as_secs_f64())),
            Err(e) => tracing::debug!(error = %e, "cannot read the outbox backlog"),
        }
    }

    /// Runs the relay until `shutdown` completes: a batch at start, then one
    /// on every notification and every `outbox.poll_interval`, and the
    /// retention cleanup every `outbox.cleanup_interval`. Database and broker
    /// trouble is logged and retried with backoff; the relay never gives up.
    /// On shutdown the batch in progress is finished (or rolled back) first.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let stop = CancellationToken::new();
        let work = self.run_until(stop.clone());
        tokio::pin!(work, shutdown);
        tokio::select! {
            result = &mut work => return result,
            () = &mut shutdown => stop.cancel(),
        }
        work.await
    }

    async fn run_until(&self, stop: CancellationToken) -> Result<()> {
        let settings = &self.inner.settings;
        let wake = Arc::new(Notify::new());
        let listener = if settings.listen {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(listen(
                self.inner.pool.clone(),
                wake.clone(),
                ready_tx,
                stop.clone(),
            ));
            // Listen before the first batch, so nothing committed in between
            // goes unnoticed until the next poll. Polling covers a failure.
            if tokio::time::timeout(Duration::from_secs(10), ready_rx)
                .await
                .is_err()
            {
                tracing::warn!("the outbox relay is not listening yet; polling meanwhile");
            }
            Some(task)
        } else {
            None
        };
        tracing::info!(
            listen = settings.listen,
            poll_interval = %humantime::format_duration(settings.poll_interval),
            batch_size = settings.batch_size,
            "outbox relay started"
        );
        let mut failures: u32 = 0;
        let mut delays = database_backoff();
        let mut last_refresh = Instant::now() - BACKLOG_REFRESH;
        let mut next_cleanup = Instant::now();
        while !stop.is_cancelled() {
            let mut retry_in = None;
            match self.drain(&stop, &mut last_refresh).await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(failures, "outbox batches run again");
                    }
                    failures = 0;
                    delays = database_backoff();
                    self.inner.healthy.send_replace(true);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let delay = delays.next().unwrap_or(MAX_DATABASE_RETRY_DELAY);
                    retry_in = Some(delay);
                    self.inner.healthy.send_replace(false);
                    tracing::warn!(
                        error = %e,
                        failures,
                        retry_in = %humantime::format_duration(delay),
                        "outbox batch failed; trying again"
                    );
                }
            }
            if !settings.retention.is_zero() && Instant::now() >= next_cleanup {
                match cleanup(&self.inner.pool, settings.retention).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "outbox retention cleanup"),
                    Err(e) => tracing::warn!(error = %e, "outbox retention cleanup failed"),
                }
                next_cleanup = Instant::now() + settings.cleanup_interval;
            }
            self.refresh_backlog().await;
            last_refresh = Instant::now();
            // While the database is away: 200 ms doubling to 30 s, jittered.
            let wait = retry_in.unwrap_or(settings.poll_interval);
            tokio::select! {
                () = stop.cancelled() => break,
                () = wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(task) = listener {
            task.abort();
            let _ = task.await;
        }
        tracing::info!("outbox relay stopped");
        Ok(())
    }
}

/// Forwards notifications for this pool's schema to `wake`, reconnecting
/// with backoff. Any reconnect wakes the relay too: notifications sent
/// while the connection was down are lost.
async fn listen(
    pool: PgPool,
    wake: Arc<Notify>,
    ready: tokio::sync::oneshot::Sender<()>,
    stop: CancellationToken,
) {
    let mut ready = Some(ready);
    let mut delays = database_backoff();
    while !stop.is_cancelled() {
        let setup = async {
            let schema: String = sqlx::query_scalar("SELECT current_schema()")
                .fetch_one(&pool)
                .await?;
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>((schema, listener))
        };
        let (schema, mut listener) = match setup.await {
            Ok(ok) => ok,
            Err(e) => {
                let delay = delays.next().unwrap_or(MAX_DATABASE_RETRY_DELAY);
                tracing::warn!(error = %crate::redact::redact(&e.to_string()), retry_in = ?delay, "cannot LISTEN {NOTIFY_CHANNEL}; polling meanwhile");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        delays = database_backoff();
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        wake.notify_one();
        tracing::debug!(%schema, "listening on {NOTIFY_CHANNEL}");
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) if n.payload() == schema => wake.notify_one(),
                Ok(Some(_)) => {}
                // The connection was lost; try_recv reconnects (and LISTENs
                // again) on the next call.
                Ok(None) => wake.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %crate::redact::redact(&e.to_string()), "LISTEN {NOTIFY_CHANNEL} failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// 1 s after the first failure, doubling, at most [`MAX_RETRY_BACKOFF`].
fn retry_backoff(attempts: i32) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1))
        .unwrap_or(0)
        .min(16);
    Duration::from_secs(1u64 << exponent).min(MAX_RETRY_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrations_are_ordered_and_tracked_apart() {
        let migrator = migrator();
        let versions: Vec<i64> = migrator.iter().map(|m| m.version).collect();
        let mut sorted = versions.clone();
        sorted.sort();
        assert_eq!(versions, sorted);
        assert_eq!(versions.len(), 2);
        assert_eq!(migrator.table_name, MIGRATIONS_TABLE);
    }

    #[test]
    fn failed_rows_back_off_up_to_five_minutes() {
        assert_eq!(retry_backoff(1), Duration::from_secs(1));
        assert_eq!(retry_backoff(2), Duration::from_secs(2));
        assert_eq!(retry_backoff(5), Duration::from_secs(16));
        assert_eq!(retry_backoff(40), MAX_RETRY_BACKOFF);
        assert_eq!(retry_backoff(0), Duration::from_secs(1));
    }

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
        };
        let text = render_audit(&[record]);
        assert!(text.starts_with("ID"), "{text}");
        assert!(text.contains("failing"), "{text}");
        assert!(text.contains("unroutable NO_ROUTE"), "{text}");
        assert_eq!(render_audit(&[]), "no outbox events\n");
    }
}
