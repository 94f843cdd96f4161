//! Notifications: when a card is added to a library, tell the library's
//! followers. The notification service can be down; that failure is
//! transient and the retry ladder takes care of it.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use burrow::{
    cli::ModuleContext,Context, Event, Handler, HandlerError, Registry};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A card was added to a library. Only the fields notifications need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CardAddedToLibraryEvent {
    /// The card.
    pub aggregate_id: String,
    /// The library it was added to.
    pub library_id: String,
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


/// Sends notifications. In memory here, with a switch to simulate an outage.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    sent: Arc<Mutex<Vec<String>>>,
    down: Arc<AtomicBool>,
}

impl Notifier {
    /// Simulates the notification service being down (or back).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Sends one notification, or fails while the service is down.
    pub fn send(&self, text: String) -> Result<(), String> {
        if self.down.load(Ordering::SeqCst) {
            return Err("notification service unavailable (503)".into());
        }
        self.sent.lock().expect("notifier poisoned").push(text);
        Ok(())
    }

    /// Everything sent so far.
    pub fn sent(&self) -> Vec<String> {
        self.sent.lock().expect("notifier poisoned").clone()
    }
}

/// Notifies the followers of the library.
#[derive(Debug, Clone, Default)]
pub struct NotifyLibraryFollowers {
    /// The notification service client.
    pub notifier: Notifier,
}

impl Handler for NotifyLibraryFollowers {
    type Event = CardAddedToLibraryEvent;

    fn name(&self) -> &str {
        "notifications.notify_library_followers"
    }

    async fn handle(&self, event: CardAddedToLibraryEvent, _ctx: Context) -> Result<(), HandlerError> {
        self.notifier
            .send(format!("card {} was added to {}", event.aggregate_id, event.library_id))
            .map_err(HandlerError::transient)
    }
}

/// Registers the notifications handlers.
pub fn register(registry: &mut Registry, _ctx: &ModuleContext) -> burrow::Result<()> {
    registry.add(NotifyLibraryFollowers::default())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> CardAddedToLibraryEvent {
        CardAddedToLibraryEvent {
            aggregate_id: "card-9".into(),
            library_id: "library-3".into(),
            occurred_at: None,
        }
    }

    #[tokio::test]
    async fn sends_one_notification() {
        let handler = NotifyLibraryFollowers::default();
        let ctx = Context::for_test(CardAddedToLibraryEvent::EVENT_TYPE, handler.name());
        handler.handle(event(), ctx).await.unwrap();
        assert_eq!(handler.notifier.sent(), vec!["card card-9 was added to library-3".to_string()]);
    }

    #[tokio::test]
    async fn an_outage_is_transient() {
        let handler = NotifyLibraryFollowers::default();
        handler.notifier.set_down(true);
        let ctx = Context::for_test(CardAddedToLibraryEvent::EVENT_TYPE, handler.name());
        let err = handler.handle(event(), ctx).await.unwrap_err();
        assert!(err.is_retryable(), "an outage must be retried, not dead-lettered");
        assert!(handler.notifier.sent().is_empty());
    }
}
