//! The [`Event`] and [`DomainEvent`] traits: what a type needs to be
//! handled, and to be published.
//!
//! An event is a plain serde type whose JSON form is the message body
//! (camelCase fields, including `aggregateId`), routed on the `domain_events`
//! topic exchange under its [`DomainEvent::EVENT_TYPE`]. See
//! `docs/wire-contract.md` for the full contract, including what burrow
//! accepts from publishers that set no AMQP properties at all.

use chrono::{DateTime, Utc};
use serde::{Serialize, de::DeserializeOwned};

/// What a handler needs of an event: its type name and how to decode it.
///
/// A consuming module declares its own view of an event, with only the
/// fields it reads; that view implements `Event`, nothing more.
///
/// ```
/// use burrow::Event;
/// use serde::Deserialize;
///
/// #[derive(Debug, Deserialize)]
/// #[serde(rename_all = "camelCase")]
/// pub struct CardAddedToLibraryEvent {
///     pub aggregate_id: String,
///     pub library_id: String,
/// }
///
/// impl Event for CardAddedToLibraryEvent {
///     const EVENT_TYPE: &'static str = "CardAddedToLibraryEvent";
/// }
/// ```
pub trait Event: DeserializeOwned + Send + 'static {
    /// The event type name: the routing key on the exchange, the AMQP `type`
    /// property, and the binding key of handlers that subscribe to it.
    /// Use the name your other publishers use (`CardAddedToLibraryEvent`).
    const EVENT_TYPE: &'static str;

    /// The JSON Schema of this view's body, for `burrow asyncapi`; `None`
    /// (the default) leaves the payload undescribed in the document.
    ///
    /// A method with a default rather than a `JsonSchema` bound on
    /// [`crate::Registry::on`] and [`crate::Registry::add`]: a bound would
    /// break every existing view that does not derive it, and a second,
    /// schema-carrying registration path would have to be chosen at every
    /// call site and still miss views registered the old way. The price is
    /// one line per view that opts in, and a document that can only say
    /// "no schema" for a view that did not; `burrow asyncapi` names those.
    ///
    /// ```
    /// use burrow::Event;
    /// use serde::Deserialize;
    ///
    /// #[derive(Debug, Deserialize, schemars::JsonSchema)]
    /// #[serde(rename_all = "camelCase")]
    /// pub struct CollectionCreatedEvent {
    ///     pub aggregate_id: String,
    ///     pub name: String,
    /// }
    ///
    /// impl Event for CollectionCreatedEvent {
    ///     const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
    ///
    ///     fn payload_schema() -> Option<serde_json::Value> {
    ///         Some(burrow::asyncapi::json_schema::<Self>())
    ///     }
    /// }
    ///
    /// let schema = CollectionCreatedEvent::payload_schema().unwrap();
    /// assert_eq!(schema["required"], serde_json::json!(["aggregateId", "name"]));
    /// ```
    fn payload_schema() -> Option<serde_json::Value> {
        None
    }
}

/// A domain event an aggregate raises and a publisher sends: an [`Event`]
/// that also serialises and names its aggregate.
///
/// ```
/// use burrow::{DomainEvent, Event};
/// use chrono::{DateTime, Utc};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// #[serde(rename_all = "camelCase")]
/// pub struct CollectionCreatedEvent {
///     pub aggregate_id: String,
///     pub name: String,
///     pub occurred_at: DateTime<Utc>,
/// }
///
/// impl Event for CollectionCreatedEvent {
///     const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
/// }
///
/// impl DomainEvent for CollectionCreatedEvent {
///     fn aggregate_id(&self) -> String {
///         self.aggregate_id.clone()
///     }
///     fn occurred_at(&self) -> DateTime<Utc> {
///         self.occurred_at
///     }
/// }
/// ```
pub trait DomainEvent: Event + Serialize + Sync {
    /// The schema version of this event, sent in the `burrow-event-version` header.
    const VERSION: u32 = 1;

    /// The id of the aggregate that raised the event.
    fn aggregate_id(&self) -> String;

    /// When the event happened; sent as the AMQP `timestamp` property.
    fn occurred_at(&self) -> DateTime<Utc>;
}

/// Optional metadata for one publish. Unset fields get sensible values:
/// a fresh UUID message id, and the message id as correlation id.
///
/// ```
/// let meta = burrow::EventMeta::default()
///     .correlation_id("req-42")
///     .causation_id("cmd-7");
/// assert_eq!(meta.correlation_id.as_deref(), Some("req-42"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventMeta {
    /// The message id (de-duplication key); a UUID v4 when unset.
    pub message_id: Option<String>,
    /// Ties together every event caused by one request.
    pub correlation_id: Option<String>,
    /// The id of the message or command that caused this event.
    pub causation_id: Option<String>,
}

impl EventMeta {
    /// Sets the message id.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }
}
