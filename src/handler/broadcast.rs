//! Broadcast handlers on the registry: handlers that run on every instance
//! of the app (cache invalidation, in-memory projections, websocket
//! fan-out), fed by a queue per instance (see `consumer::fanout`).

use std::collections::BTreeSet;

use super::Registry;
use crate::error::Result;

impl Registry {
    /// Marks handler `name` as a broadcast handler: every running instance
    /// of the app gets each event it subscribes to, from a queue of the
    /// instance's own, instead of one instance from the app queue.
    ///
    /// The guarantee is weaker by nature: an instance that is down (or
    /// reconnecting) misses what is published meanwhile, and a failure is
    /// retried in the worker a few times, never through the retry ladder or
    /// the dead-letter queue (docs/handlers.md).
    ///
    /// ```
    /// use burrow::{HandlerError, Registry};
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # pub struct CardAddedToLibraryEvent { aggregate_id: String }
    /// # impl burrow::Event for CardAddedToLibraryEvent {
    /// #     const EVENT_TYPE: &'static str = "CardAddedToLibraryEvent";
    /// # }
    /// let mut registry = Registry::new();
    /// registry
    ///     .on("cache.evict_library", |_: CardAddedToLibraryEvent, _| async { Ok::<_, HandlerError>(()) })?
    ///     .broadcast("cache.evict_library")?;
    /// assert!(registry.binding_keys().is_empty(), "the app queue binds nothing for it");
    /// assert_eq!(registry.broadcast_binding_keys(), vec!["CardAddedToLibraryEvent".to_string()]);
    /// # Ok::<(), burrow::Error>(())
    /// ```
    pub fn broadcast(&mut self, name: &str) -> Result<&mut Self> {
        self.named(name, "broadcast")?.broadcast = true;
        Ok(self)
    }

    /// Whether any handler is a broadcast handler.
    pub fn has_broadcast(&self) -> bool {
        self.handlers.iter().any(|h| h.broadcast)
    }

    /// The distinct binding keys of the broadcast handlers, sorted: the
    /// bindings of each instance's broadcast queue.
    pub fn broadcast_binding_keys(&self) -> Vec<String> {
        self.handlers
            .iter()
            .filter(|h| h.broadcast)
            .map(|h| h.binding_key.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// The broadcast handlers as a registry of their own, in which they are
    /// ordinary handlers: what the broadcast queue's pipeline runs.
    pub(crate) fn broadcast_part(&self) -> Option<Registry> {
        let handlers: Vec<_> = self
            .handlers
            .iter()
            .filter(|h| h.broadcast)
            .cloned()
            .map(|mut h| {
                h.broadcast = false;
                h
            })
            .collect();
        (!handlers.is_empty()).then_some(Registry { handlers })
    }
}
