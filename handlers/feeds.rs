//! Feeds: when a card is added to a library, put it in the curator's
//! followers' activity feed.
//!
//! Delivery is at least once, so the handler is idempotent: a feed item is
//! keyed by the message id and a redelivery adds nothing. With the
//! `postgres` feature and `postgres.url` set, feed items go to the
//! `feed_items` table through burrow's inbox: the item and the inbox row
//! commit together, so a redelivery finds the row and writes nothing. Without
//! a database (and in the unit tests) they stay in memory.

use std::sync::{Arc, Mutex};

use burrow::{
    cli::ModuleContext,Context, Event, Handler, HandlerError, Registry};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A card was added to a library. Only the fields feeds needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CardAddedToLibraryEvent {
    /// The card.
    pub aggregate_id: String,
    /// Who added it.
    pub user_id: String,
    /// When it occurred (RFC 3339); `occurredAt` is accepted too.
    // Named as TypeScript publishers send it: the schema `burrow asyncapi`
    // prints shows this name, and schemars does not see aliases.
    #[serde(default, rename = "dateTimeOccurred", alias = "occurredAt")]
    pub occurred_at: Option<DateTime<Utc>>,
}

impl Event for CardAddedToLibraryEvent {
    const EVENT_TYPE: &'static str = "CardAddedToLibraryEvent";

    fn payload_schema() -> Option<serde_json::Value> {
        Some(burrow::asyncapi::json_schema::<Self>())
    }
}


/// One entry of an activity feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedItem {
    /// The message that produced it (the idempotency key).
    pub message_id: String,
    /// Whose activity.
    pub user_id: String,
    /// Which card.
    pub card_id: String,
}

/// The feed store. In memory here; a real app writes to its database.
#[derive(Debug, Clone, Default)]
pub struct FeedStore(Arc<Mutex<Vec<FeedItem>>>);

impl FeedStore {
    /// Adds an item unless one with the same message id exists.
    pub fn add(&self, item: FeedItem) -> bool {
        let mut items = self.0.lock().expect("feed store poisoned");
        if items.iter().any(|i| i.message_id == item.message_id) {
            return false;
        }
        items.push(item);
        true
    }

    /// A copy of all items.
    pub fn items(&self) -> Vec<FeedItem> {
        self.0.lock().expect("feed store poisoned").clone()
    }
}

/// Adds the card to the curator's feed.
#[derive(Debug, Clone, Default)]
pub struct AddCardToFeed {
    /// Where feed items go without a database.
    pub store: FeedStore,
    /// With `postgres.url` set: the inbox of the app's database.
    #[cfg(feature = "postgres")]
    pub inbox: Option<burrow::inbox::Inbox>,
}

impl Handler for AddCardToFeed {
    type Event = CardAddedToLibraryEvent;

    fn name(&self) -> &str {
        "feeds.add_card_to_feed"
    }

    async fn handle(
        &self,
        event: CardAddedToLibraryEvent,
        ctx: Context,
    ) -> Result<(), HandlerError> {
        if event.user_id.trim().is_empty() {
            // No retry can make an anonymous curator known.
            return Err(HandlerError::permanent(format!(
                "card {} has an empty userId",
                event.aggregate_id
            )));
        }
        let item = FeedItem {
            message_id: ctx.message_id.clone(),
            user_id: event.user_id,
            card_id: event.aggregate_id,
        };
        #[cfg(feature = "postgres")]
        if let Some(inbox) = &self.inbox {
            let added = postgres::add(inbox, &ctx, &item).await?;
            tracing::info!(added, "feed updated");
            return Ok(());
        }
        let added = self.store.add(item);
        tracing::info!(added, "feed updated");
        Ok(())
    }
}

/// Registers the feeds handlers: feed items in the app's database, through
/// the inbox, when `postgres.url` is set.
pub fn register(registry: &mut Registry, ctx: &ModuleContext) -> burrow::Result<()> {
    registry.add(AddCardToFeed {
        #[cfg(feature = "postgres")]
        inbox: ctx.postgres().cloned().map(burrow::inbox::Inbox::new),
        ..AddCardToFeed::default()
    })?;
    #[cfg(not(feature = "postgres"))]
    let _ = ctx;
    Ok(())
}

/// Feed items in PostgreSQL, once per message through the inbox.
#[cfg(feature = "postgres")]
mod postgres {
    use burrow::{Context, HandlerError, ResultExt, inbox::Inbox};
    use tokio::sync::OnceCell;

    use super::FeedItem;

    /// Adds the item unless this handler already handled this message;
    /// `Ok(false)` for a redelivery.
    pub(super) async fn add(
        inbox: &Inbox,
        ctx: &Context,
        item: &FeedItem,
    ) -> Result<bool, HandlerError> {
        // A real app creates its tables in its own migrations; the reference
        // module makes sure of burrow's and its own once per process.
        static TABLES: OnceCell<()> = OnceCell::const_new();
        TABLES
            .get_or_try_init(|| async {
                burrow::outbox::migrate(inbox.pool())
                    .await
                    .map_err(Inbox::handler_error)?;
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS feed_items (
                         message_id TEXT PRIMARY KEY,
                         user_id    TEXT NOT NULL,
                         card_id    TEXT NOT NULL,
                         added_at   TIMESTAMPTZ NOT NULL DEFAULT now())",
                )
                .execute(inbox.pool())
                .await
                .transient()?;
                Ok::<_, HandlerError>(())
            })
            .await?;
        let Some(mut tx) = inbox.begin(ctx).await.map_err(Inbox::handler_error)? else {
            return Ok(false);
        };
        sqlx::query("INSERT INTO feed_items (message_id, user_id, card_id) VALUES ($1, $2, $3)")
            .bind(&item.message_id)
            .bind(&item.user_id)
            .bind(&item.card_id)
            .execute(&mut *tx)
            .await
            .transient()?;
        tx.commit().await.transient()?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(user: &str) -> CardAddedToLibraryEvent {
        serde_json::from_value(serde_json::json!({
            "aggregateId": "card-1",
            "userId": user,
            "libraryId": "library-1",
            "dateTimeOccurred": "2026-11-23T09:00:00Z"
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn adds_the_card_once_per_message() {
        let handler = AddCardToFeed::default();
        let ctx = Context::for_test(CardAddedToLibraryEvent::EVENT_TYPE, handler.name());
        handler
            .handle(event("user-ada"), ctx.clone())
            .await
            .unwrap();
        handler.handle(event("user-ada"), ctx).await.unwrap();
        let items = handler.store.items();
        assert_eq!(items.len(), 1, "a redelivery must not add a second item");
        assert_eq!(items[0].card_id, "card-1");
        assert_eq!(items[0].user_id, "user-ada");
    }

    #[tokio::test]
    async fn an_anonymous_curator_is_a_permanent_failure() {
        let handler = AddCardToFeed::default();
        let ctx = Context::for_test(CardAddedToLibraryEvent::EVENT_TYPE, handler.name());
        let err = handler.handle(event(" "), ctx).await.unwrap_err();
        assert!(!err.is_retryable());
        assert!(handler.store.items().is_empty());
    }

    #[test]
    fn reads_the_typescript_field_names() {
        assert_eq!(
            event("u").occurred_at.unwrap().to_rfc3339(),
            "2026-11-23T09:00:00+00:00"
        );
    }
}
