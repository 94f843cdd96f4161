//! The publishing seam: [`Publish`] (the [`Publisher`], or a recording fake
//! in tests), its typed extension, and the event form both take.

use std::{future::Future, pin::Pin};

use super::{Publisher, json_kind};
use crate::{
    error::{Error, Result},
    event::{DomainEvent, EventMeta},
};

/// One event on its way out, in a form any [`Publish`] takes: what
/// [`PublishExt::publish`] builds from a typed event.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingEvent {
    /// The event type (the routing key).
    pub event_type: String,
    /// The schema version (`burrow-event-version`).
    pub version: u32,
    /// The aggregate that raised it.
    pub aggregate_id: String,
    /// When it happened.
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    /// The body: a JSON object.
    pub body: serde_json::Value,
    /// Ids to publish it with.
    pub meta: EventMeta,
}

impl OutgoingEvent {
    /// `event` with `meta`, serialised.
    pub fn new<E: DomainEvent>(event: &E, meta: EventMeta) -> Result<Self> {
        let body = serde_json::to_value(event).map_err(|source| Error::Serialize {
            event_type: E::EVENT_TYPE.to_owned(),
            source,
        })?;
        Ok(Self {
            event_type: E::EVENT_TYPE.to_owned(),
            version: E::VERSION,
            aggregate_id: event.aggregate_id(),
            occurred_at: event.occurred_at(),
            body,
            meta,
        })
    }
}

/// Something that publishes events with confirms: the [`Publisher`], or
/// [`crate::testing::RecordingPublisher`] in tests. Code that publishes takes
/// an `Arc<dyn Publish>` and stays testable without a broker.
pub trait Publish: Send + Sync + std::fmt::Debug {
    /// Publishes one event and waits for the broker's confirm.
    fn publish_event(
        &self,
        event: OutgoingEvent,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>;
}

/// Typed publishing for every [`Publish`].
pub trait PublishExt: Publish {
    /// Publishes `event` with fresh ids.
    fn publish<E: DomainEvent>(
        &self,
        event: &E,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        self.publish_with(event, EventMeta::default())
    }

    /// Publishes `event` with the ids in `meta`.
    fn publish_with<E: DomainEvent>(
        &self,
        event: &E,
        meta: EventMeta,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        match OutgoingEvent::new(event, meta) {
            Ok(outgoing) => self.publish_event(outgoing),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }
}

impl<P: Publish + ?Sized> PublishExt for P {}

impl Publish for Publisher {
    fn publish_event(
        &self,
        event: OutgoingEvent,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            let OutgoingEvent {
                event_type,
                version,
                aggregate_id,
                occurred_at,
                body,
                meta,
            } = event;
            if !body.is_object() {
                return Err(Error::InvalidEvent {
                    event_type,
                    reason: format!("got {}", json_kind(&body)),
                });
            }
            let bytes = serde_json::to_vec(&body).map_err(|source| Error::Serialize {
                event_type: event_type.clone(),
                source,
            })?;
            let props = self.event_properties(
                &event_type,
                version,
                occurred_at.timestamp().max(0) as u64,
                &aggregate_id,
                meta,
            )?;
            self.send_counted(
                &event_type,
                &self.inner.exchange,
                &event_type,
                &bytes,
                &props,
            )
            .await
        })
    }
}
