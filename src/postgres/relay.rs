//! The outbox relay: claims committed rows, publishes them with confirms, in
//! order per aggregate, and marks them published (see [`super::outbox`]).

use std::{
    collections::BTreeMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use lapin::types::FieldTable;
use sqlx::{PgPool, Row, postgres::PgListener};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    audit::{backlog, cleanup},
    db::{MAX_DATABASE_RETRY_DELAY, database_backoff, db},
    outbox::NOTIFY_CHANNEL,
};
use crate::{
    config::{OutboxSettings, Settings},
    error::{Error, Result},
    metrics::Metrics,
    publisher::Publisher,
    wire::{long_string, short_string},
};

/// Failed rows wait 1 s, 2 s, 4 s, ... before the next attempt, at most this long.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(300);

/// How often the relay refreshes the backlog gauges while it is busy.
const BACKLOG_REFRESH: Duration = Duration::from_secs(1);

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
    aggregate_id: String,
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
        // Scheduled rows (due_at set) take no part in an aggregate's order:
        // they are claimed on their own once due (schedule.rs).
        let heads: Vec<String> = sqlx::query_scalar(
            "SELECT o.aggregate_id FROM event_outbox o
             WHERE o.published_at IS NULL AND o.due_at IS NULL
               AND (o.next_attempt_at IS NULL OR o.next_attempt_at <= clock_timestamp())
               AND NOT EXISTS (
                   SELECT 1 FROM event_outbox e
                   WHERE e.aggregate_id = o.aggregate_id
                     AND e.published_at IS NULL AND e.due_at IS NULL
                     AND e.id < o.id)
             ORDER BY o.id
             LIMIT $1
             FOR UPDATE OF o SKIP LOCKED",
        )
        .bind(batch_size)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("claim outbox heads"))?;
        let due = super::schedule::claim_due(&mut tx, batch_size).await?;
        if heads.is_empty() && due.is_empty() {
            tx.commit().await.map_err(db("end an empty outbox batch"))?;
            return Ok(BatchReport::default());
        }
        // An even share of the batch per aggregate: one busy aggregate gets
        // the whole batch, many get one row each.
        let share = (batch_size / heads.len().max(1) as i64).max(1);
        // A scheduled row's delay is measured from its due time, not from
        // when it was written (GREATEST ignores the NULL of other rows).
        let rows = sqlx::query(
            "SELECT id, message_id, correlation_id, causation_id, aggregate_id, event_type,
                    event_version, payload, headers, occurred_at,
                    GREATEST(enqueued_at, due_at) AS enqueued_at, attempts
             FROM event_outbox
             WHERE id IN (
                 SELECT id FROM (
                     SELECT id, row_number() OVER (PARTITION BY aggregate_id ORDER BY id) AS n
                     FROM event_outbox
                     WHERE aggregate_id = ANY($1) AND published_at IS NULL AND due_at IS NULL) ranked
                 WHERE n <= $2)
                OR id = ANY($3)
             ORDER BY id
             FOR UPDATE",
        )
        .bind(&heads)
        .bind(share)
        .bind(&due)
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
                        aggregate_id: row.try_get("aggregate_id")?,
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
        let mut extra = FieldTable::default();
        if let Some(more) = row.headers.as_object() {
            for (name, value) in more {
                if let Some(text) = value.as_str() {
                    extra.insert(short_string("header name", name)?, long_string(text));
                }
            }
        }
        let properties = crate::wire::event_properties(crate::wire::NewEvent {
            event_type: &row.event_type,
            version: row.event_version,
            aggregate_id: &row.aggregate_id,
            occurred_at: row.occurred_at.timestamp().max(0) as u64,
            message_id: &row.message_id,
            correlation_id: &row.correlation_id,
            causation_id: row.causation_id.as_deref(),
            app_id: &inner.app_id,
            extra,
        })?;
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
            // Otherwise until the next poll, or until the earliest scheduled
            // row falls due if that comes first.
            let wait = match retry_in {
                Some(delay) => delay,
                None => super::schedule::next_wait(&self.inner.pool, settings.poll_interval).await,
            };
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
    fn failed_rows_back_off_up_to_five_minutes() {
        assert_eq!(retry_backoff(1), Duration::from_secs(1));
        assert_eq!(retry_backoff(2), Duration::from_secs(2));
        assert_eq!(retry_backoff(5), Duration::from_secs(16));
        assert_eq!(retry_backoff(40), MAX_RETRY_BACKOFF);
        assert_eq!(retry_backoff(0), Duration::from_secs(1));
    }
}
