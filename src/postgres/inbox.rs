//! The idempotent inbox on PostgreSQL (feature `postgres`).
//!
//! Delivery is at least once: a worker that dies before its ack, a relay
//! that dies before marking its batch, a publisher that resends after a lost
//! confirm all hand a handler the same message again. The inbox makes the
//! handler's database side effects happen once: it inserts the row
//! `(handler, message_id)` into `event_inbox` **in the same transaction** as
//! the handler's own writes. The first delivery commits both; a redelivery
//! finds the row and skips the work; a failed run rolls both back, so the
//! retry does the work.
//!
//! Two deliveries of one message running at the same time (a redelivery
//! while a slow first run still holds its transaction) do not both run: the
//! second insert waits on the primary key until the first transaction ends,
//! then skips (committed) or proceeds (rolled back).
//!
//! Side effects outside the database (an e-mail, an HTTP call) are not
//! covered: make them idempotent on `ctx.message_id` themselves.
//!
//! Two ways to use it:
//!
//! - [`Inbox::begin`] inside any handler: `Some(transaction)` with the inbox
//!   row already inserted, or `None` when the message was handled before;
//! - [`Inbox::wrap`], middleware around an [`InboxHandler`], whose `handle`
//!   receives the transaction and never sees a duplicate.

use std::{future::Future, time::Duration};

use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::{
    error::{Error, Result},
    event::Event,
    handler::{Context, Handler, HandlerError},
    postgres::outbox::db,
};

/// Rows deleted per statement by [`Inbox::cleanup`].
const CLEANUP_CHUNK: i64 = 5_000;

/// The inbox of one database. Cheap to clone.
///
/// ```no_run
/// use burrow::{Context, HandlerError, ResultExt, inbox::Inbox};
///
/// async fn add_to_feed(inbox: &Inbox, user: &str, card: &str, ctx: &Context) -> Result<(), HandlerError> {
///     let Some(mut tx) = inbox.begin(ctx).await.map_err(Inbox::handler_error)? else {
///         return Ok(()); // handled before: a redelivery
///     };
///     sqlx::query("INSERT INTO feed_items (user_id, card_id) VALUES ($1, $2)")
///         .bind(user)
///         .bind(card)
///         .execute(&mut *tx)
///         .await
///         .transient()?;
///     tx.commit().await.transient()?; // the feed item and the inbox row, or neither
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Inbox {
    pool: PgPool,
}

impl Inbox {
    /// An inbox in `pool`'s database (its `event_inbox` table, see
    /// [`crate::outbox::migrate`]).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Starts the transaction for handling the delivery `ctx` describes:
    /// `Some(transaction)` holding the new inbox row for `(ctx.handler,
    /// ctx.message_id)`, or `None` when that handler already handled that
    /// message. Commit the transaction after the handler's own writes;
    /// dropping it (on an error) rolls the inbox row back with them.
    pub async fn begin(&self, ctx: &Context) -> Result<Option<Transaction<'static, Postgres>>> {
        self.begin_for(&ctx.handler, &ctx.message_id, &ctx.event_type)
            .await
    }

    /// [`Inbox::begin`] with explicit names.
    pub async fn begin_for(
        &self,
        handler: &str,
        message_id: &str,
        event_type: &str,
    ) -> Result<Option<Transaction<'static, Postgres>>> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("begin an inbox transaction"))?;
        let inserted = sqlx::query(
            "INSERT INTO event_inbox (handler, message_id, event_type) VALUES ($1, $2, $3)
             ON CONFLICT (handler, message_id) DO NOTHING",
        )
        .bind(handler)
        .bind(message_id)
        .bind(event_type)
        .execute(&mut *tx)
        .await
        .map_err(db(format!(
            "insert ({handler}, {message_id}) into event_inbox"
        )))?
        .rows_affected();
        if inserted == 0 {
            tracing::debug!(handler, message_id, "already handled; skipping");
            // Nothing was written; ending the transaction cannot lose anything.
            let _ = tx.rollback().await;
            return Ok(None);
        }
        Ok(Some(tx))
    }

    /// Whether `handler` handled `message_id` (committed).
    pub async fn is_processed(&self, handler: &str, message_id: &str) -> Result<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM event_inbox WHERE handler = $1 AND message_id = $2)",
        )
        .bind(handler)
        .bind(message_id)
        .fetch_one(&self.pool)
        .await
        .map_err(db("look up event_inbox"))
    }

    /// Deletes inbox rows older than `older_than`, a chunk at a time so no
    /// statement holds many locks; returns how many. A message redelivered
    /// after its row was deleted is handled again, so keep rows well beyond
    /// the longest redelivery (the retry ladder, dead letters you may replay).
    pub async fn cleanup(&self, older_than: Duration) -> Result<u64> {
        let mut deleted = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM event_inbox WHERE ctid IN (
                     SELECT ctid FROM event_inbox
                     WHERE processed_at < clock_timestamp() - make_interval(secs => $1)
                     LIMIT $2)",
            )
            .bind(older_than.as_secs_f64())
            .bind(CLEANUP_CHUNK)
            .execute(&self.pool)
            .await
            .map_err(db("delete old event_inbox rows"))?
            .rows_affected();
            deleted += n;
            if n < CLEANUP_CHUNK as u64 {
                return Ok(deleted);
            }
        }
    }

    /// Runs [`Inbox::cleanup`] for `retention` now and then every
    /// `interval` until `shutdown` completes: what `burrow run` does with
    /// `inbox.retention` and `inbox.cleanup_interval` when `postgres.url` is
    /// set. A failed cleanup (the database is away) is logged and tried again
    /// at the next interval. `retention` zero keeps every row: it returns at once.
    ///
    /// ```no_run
    /// # async fn run(pool: sqlx::PgPool) {
    /// let settings = burrow::Settings::default();
    /// let inbox = burrow::inbox::Inbox::new(pool);
    /// tokio::spawn(async move {
    ///     let ctrl_c = async { tokio::signal::ctrl_c().await.ok(); };
    ///     inbox.run_cleanup(settings.inbox.retention, settings.inbox.cleanup_interval, ctrl_c).await
    /// });
    /// # }
    /// ```
    pub async fn run_cleanup(
        &self,
        retention: Duration,
        interval: Duration,
        shutdown: impl Future<Output = ()>,
    ) {
        if retention.is_zero() {
            return;
        }
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            let cleanup = self.cleanup(retention);
            tokio::select! {
                () = &mut shutdown => return,
                result = cleanup => match result {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        deleted = n,
                        retention = %humantime::format_duration(retention),
                        "inbox retention cleanup"
                    ),
                    Err(error) => tracing::warn!(%error, "inbox retention cleanup failed; trying again later"),
                }
            }
        }
    }

    /// Wraps `handler` so that it runs inside an inbox transaction and never
    /// for a message it already handled; register the result with
    /// [`crate::Registry::add`].
    pub fn wrap<H: InboxHandler>(&self, handler: H) -> Inboxed<H> {
        Inboxed {
            inbox: self.clone(),
            inner: handler,
        }
    }

    /// The [`HandlerError`] for an inbox [`Error`]: transient when retrying
    /// may help (the database is away), else permanent.
    pub fn handler_error(error: Error) -> HandlerError {
        if error.is_retryable() {
            HandlerError::transient(error)
        } else {
            HandlerError::permanent(error)
        }
    }
}

/// A handler whose writes go through the inbox transaction; wrap it with
/// [`Inbox::wrap`].
///
/// ```no_run
/// use burrow::{Context, DomainEvent, Event, HandlerError, Registry, ResultExt, inbox::{Inbox, InboxHandler}};
/// use sqlx::PgConnection;
/// # use chrono::{DateTime, Utc};
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # #[serde(rename_all = "camelCase")]
/// # pub struct CollectionCreatedEvent { aggregate_id: String, name: String }
/// # impl Event for CollectionCreatedEvent {
/// #     const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
/// # }
/// #
/// # impl DomainEvent for CollectionCreatedEvent {
/// #     fn aggregate_id(&self) -> String { self.aggregate_id.clone() }
/// #     fn occurred_at(&self) -> DateTime<Utc> { Utc::now() }
/// # }
///
/// struct CountCollections;
///
/// impl InboxHandler for CountCollections {
///     type Event = CollectionCreatedEvent;
///
///     fn name(&self) -> &str {
///         "stats.count_collections"
///     }
///
///     async fn handle(&self, _event: Self::Event, _ctx: Context, tx: &mut PgConnection) -> Result<(), HandlerError> {
///         sqlx::query("UPDATE stats SET collections = collections + 1")
///             .execute(&mut *tx)
///             .await
///             .transient()?;
///         Ok(()) // committed with the inbox row by the wrapper
///     }
/// }
///
/// # async fn run(pool: sqlx::PgPool) -> burrow::Result<()> {
/// let mut registry = Registry::new();
/// registry.add(Inbox::new(pool).wrap(CountCollections))?;
/// # Ok(()) }
/// ```
pub trait InboxHandler: Send + Sync + 'static {
    /// The event this handler decodes.
    type Event: Event;

    /// The handler's name (see [`Handler::name`]); also the inbox key.
    fn name(&self) -> &str;

    /// The binding key; defaults to the event type.
    fn binding_key(&self) -> &str {
        Self::Event::EVENT_TYPE
    }

    /// Handles one event, writing through `tx`. `Ok` commits the writes and
    /// the inbox row; an error rolls both back.
    fn handle(
        &self,
        event: Self::Event,
        ctx: Context,
        tx: &mut PgConnection,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// An [`InboxHandler`] behind the inbox: a [`Handler`] that begins the inbox
/// transaction, skips messages handled before, and commits on success.
#[derive(Debug, Clone)]
pub struct Inboxed<H> {
    inbox: Inbox,
    inner: H,
}

impl<H> Inboxed<H> {
    /// The wrapped handler.
    pub fn inner(&self) -> &H {
        &self.inner
    }
}

impl<H: InboxHandler> Handler for Inboxed<H> {
    type Event = H::Event;

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn binding_key(&self) -> &str {
        self.inner.binding_key()
    }

    async fn handle(&self, event: Self::Event, ctx: Context) -> Result<(), HandlerError> {
        let Some(mut tx) = self.inbox.begin(&ctx).await.map_err(Inbox::handler_error)? else {
            return Ok(());
        };
        self.inner.handle(event, ctx, &mut tx).await?;
        tx.commit()
            .await
            .map_err(db("commit an inbox transaction"))
            .map_err(Inbox::handler_error)
    }
}
