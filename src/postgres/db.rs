//! The app's PostgreSQL database: the pool, waiting for it at start, and
//! burrow's migrations (the `event_outbox` and `event_inbox` tables).

use std::{borrow::Cow, future::Future, time::Duration};

use sqlx::{
    PgPool, SqlSafeStr,
    migrate::{Migration, MigrationType, Migrator},
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::{
    config::PostgresSettings,
    error::{Error, Result},
};

/// The channel the `event_outbox` insert trigger notifies; the payload is
/// the table's schema.
pub const NOTIFY_CHANNEL: &str = "burrow_outbox";

/// The table in which burrow records which of its migrations ran. Separate
/// from sqlx's default `_sqlx_migrations`, so burrow's migrations and the
/// app's own never see each other.
pub const MIGRATIONS_TABLE: &str = "_burrow_migrations";

/// burrow's migrations, embedded from `migrations/`.
const MIGRATIONS: [(i64, &str, &str); 3] = [
    (
        20261124000001,
        "event outbox",
        include_str!("../../migrations/20261124000001_event_outbox.sql"),
    ),
    (
        20261124000002,
        "event inbox",
        include_str!("../../migrations/20261124000002_event_inbox.sql"),
    ),
    (
        20261124000003,
        "event outbox due_at",
        include_str!("../../migrations/20261124000003_event_outbox_due_at.sql"),
    ),
];

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
        Error::config(
            "postgres.url",
            "postgres.url is unset; set it (BURROW__POSTGRES__URL) to use the outbox or the inbox",
        )
    })?;
    let mut options: PgConnectOptions = url.expose().parse().map_err(|e: sqlx::Error| {
        Error::config("postgres.url", format!(
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
pub(crate) const MAX_DATABASE_RETRY_DELAY: Duration = Duration::from_secs(30);

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
        assert_eq!(versions.len(), 3);
        assert_eq!(migrator.table_name, MIGRATIONS_TABLE);
    }
}
