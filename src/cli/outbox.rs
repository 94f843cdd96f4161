//! `burrow outbox relay|audit|status|migrate|cleanup`, and the database
//! work inside `burrow run` (feature `postgres`).

use std::time::Duration;

use clap::Subcommand;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{CliError, CliResult, output::Out, run::Endpoint};
use crate::{Metrics, Publisher, Result, Settings, WorkerState, inbox::Inbox, outbox, shutdown};

#[derive(Debug, Subcommand)]
pub(super) enum OutboxAction {
    /// Publish committed outbox events until SIGTERM/SIGINT (serves /metrics on http.addr).
    Relay,
    /// Every outbox event of one aggregate, in order, with its publish status.
    Audit {
        /// The aggregate id, e.g. card-1.
        aggregate_id: String,
    },
    /// Pending and failing events, the age of the oldest pending one, and
    /// the scheduled ones not yet due.
    Status,
    /// Apply burrow's migrations (event_outbox, event_inbox) to postgres.url.
    Migrate,
    /// Delete published events older than outbox.retention (or --older-than).
    Cleanup {
        /// Override outbox.retention, e.g. 30d, 12h.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
    },
}

/// Connects to postgres.url once and, with `migrate`, applies the
/// migrations: the one-shot commands report a failure instead of waiting.
async fn database(settings: &Settings, migrate: bool) -> Result<sqlx::PgPool> {
    let pool = outbox::connect(&settings.postgres).await?;
    if migrate {
        outbox::prepare(&pool, &settings.postgres).await?;
    }
    Ok(pool)
}

/// What runs beside the worker in `burrow run` when postgres.url is set:
/// the inbox retention cleanup and, with outbox.enabled, the relay.
pub(super) struct DatabaseTasks {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Result<()>>>,
    publisher: Option<Publisher>,
}

impl DatabaseTasks {
    /// Lets the batch in progress finish, then closes the publisher.
    pub(super) async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "outbox relay stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "outbox task failed"),
            }
        }
        if let Some(publisher) = self.publisher {
            publisher.close().await;
        }
    }
}

/// With postgres.url set: wait for the database, retrying transient
/// failures (with `/readyz` answering "starting" meanwhile), and migrate
/// (postgres.migrate) before the worker consumes, so handlers find the
/// inbox; then run the inbox retention cleanup and, with outbox.enabled,
/// the relay, recording into the worker's metrics. `None` when a
/// shutdown signal arrived while waiting.
pub(super) async fn start_beside_worker(
    settings: &Settings,
    metrics: &Metrics,
) -> Result<Option<DatabaseTasks>> {
    let stop = CancellationToken::new();
    let mut beside = DatabaseTasks {
        stop: stop.clone(),
        tasks: Vec::new(),
        publisher: None,
    };
    if settings.postgres.url.is_none() {
        return Ok(Some(beside));
    }
    let (_starting, state) = watch::channel(WorkerState::Starting);
    let endpoint = Endpoint::start(
        settings,
        metrics.clone(),
        state,
        settings.publisher.confirm_timeout * 2,
    )
    .await?;
    let pool = outbox::connect_with_retry(
        &settings.postgres,
        settings.postgres.migrate,
        shutdown::signal(),
    )
    .await;
    if let Some(endpoint) = endpoint {
        endpoint.stop().await;
    }
    let Some(pool) = pool? else {
        return Ok(None);
    };
    let inbox = Inbox::new(pool.clone());
    let (retention, interval) = (settings.inbox.retention, settings.inbox.cleanup_interval);
    let until = stop.clone().cancelled_owned();
    beside.tasks.push(tokio::spawn(async move {
        inbox.run_cleanup(retention, interval, until).await;
        Ok(())
    }));
    if settings.outbox.enabled {
        let publisher = Publisher::new(settings, metrics.clone())?;
        let relay = outbox::Relay::new(pool, publisher.clone(), settings);
        let until = stop.cancelled_owned();
        beside
            .tasks
            .push(tokio::spawn(async move { relay.run(until).await }));
        beside.publisher = Some(publisher);
    }
    Ok(Some(beside))
}

pub(super) async fn command(settings: &Settings, action: OutboxAction, out: &Out) -> CliResult {
    match action {
        OutboxAction::Relay => {
            // No consumer here: ready once a batch reached the database.
            let (state_tx, state) = watch::channel(WorkerState::Starting);
            let metrics = Metrics::new();
            let endpoint = Endpoint::start(
                settings,
                metrics.clone(),
                state,
                settings.publisher.confirm_timeout * 2,
            )
            .await?;
            let shutdown = shutdown::signal();
            tokio::pin!(shutdown);
            let result = async {
                let Some(pool) = outbox::connect_with_retry(
                    &settings.postgres,
                    settings.postgres.migrate,
                    &mut shutdown,
                )
                .await?
                else {
                    return Ok(()); // stopped while waiting for the database
                };
                let publisher = Publisher::new(settings, metrics.clone())?;
                let relay = outbox::Relay::new(pool, publisher.clone(), settings);
                let mut healthy = relay.healthy();
                let readiness = tokio::spawn(async move {
                    while healthy.changed().await.is_ok() {
                        let ready = *healthy.borrow_and_update();
                        state_tx.send_replace(if ready {
                            WorkerState::Consuming
                        } else {
                            WorkerState::Reconnecting
                        });
                    }
                });
                let result = relay.run(&mut shutdown).await;
                readiness.abort();
                publisher.close().await;
                result
            }
            .await;
            if let Some(endpoint) = endpoint {
                endpoint.stop().await;
            }
            Ok(result?)
        }
        OutboxAction::Audit { aggregate_id } => {
            let pool = database(settings, false).await?;
            let records = outbox::audit(&pool, &aggregate_id).await?;
            if records.is_empty() {
                return Err(CliError::NothingMatched(format!(
                    "no outbox events for aggregate {aggregate_id:?}; published events older than outbox.retention ({}) are deleted",
                    humantime::format_duration(settings.outbox.retention)
                )));
            }
            out.text(&format!(
                "{} outbox events of aggregate {aggregate_id}\n{}",
                records.len(),
                outbox::render_audit(&records)
            ))?;
            out.json(&serde_json::json!({
                "aggregate_id": aggregate_id,
                "events": records,
            }))
        }
        OutboxAction::Status => {
            let pool = database(settings, false).await?;
            let backlog = outbox::backlog(&pool).await?;
            let oldest = backlog
                .oldest
                .map(|d| Duration::from_millis(d.as_millis() as u64));
            out.either(
                &format!(
                    "pending {}, failing {}, oldest pending {}, scheduled (not yet due) {}\n",
                    backlog.pending,
                    backlog.failing,
                    oldest.map_or("-".to_owned(), |d| humantime::format_duration(d)
                        .to_string()),
                    backlog.scheduled
                ),
                &serde_json::json!({
                    "pending": backlog.pending,
                    "failing": backlog.failing,
                    "oldest_pending_seconds": backlog.oldest.map(|d| d.as_secs_f64()),
                    "scheduled": backlog.scheduled,
                }),
            )
        }
        OutboxAction::Migrate => {
            database(settings, true).await?;
            let url = settings
                .postgres
                .url
                .as_ref()
                .map(|u| u.to_string())
                .unwrap_or_default();
            out.either(
                &format!("burrow's migrations are applied to {url}\n"),
                &serde_json::json!({ "migrated": url }),
            )
        }
        OutboxAction::Cleanup { older_than } => {
            let older_than = older_than.unwrap_or(settings.outbox.retention);
            if older_than.is_zero() {
                return Err(CliError::Usage(
                    "outbox.retention is 0s (keep forever); pass --older-than, e.g. --older-than 30d".into(),
                ));
            }
            let pool = database(settings, false).await?;
            let deleted = outbox::cleanup(&pool, older_than).await?;
            out.either(
                &format!(
                    "deleted {deleted} published outbox events older than {}\n",
                    humantime::format_duration(older_than)
                ),
                &serde_json::json!({ "deleted": deleted, "older_than_seconds": older_than.as_secs() }),
            )
        }
    }
}
