//! Collections: index every new collection for search. A closure handler,
//! the shortest way to write one.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use burrow::{
    cli::ModuleContext,Context, Event, HandlerError, Registry};
use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A collection was created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CollectionCreatedEvent {
    /// The collection.
    pub aggregate_id: String,
    /// Its name.
    pub name: String,
    /// Who created it.
    pub author_id: String,
    /// When it occurred (RFC 3339); `occurredAt` is accepted too.
    // Named as TypeScript publishers send it: the schema `burrow asyncapi`
    // prints shows this name, and schemars does not see aliases.
    #[serde(default, rename = "dateTimeOccurred", alias = "occurredAt")]
    pub occurred_at: Option<DateTime<Utc>>,
}

impl Event for CollectionCreatedEvent {
    const EVENT_TYPE: &'static str = "CollectionCreatedEvent";

    fn payload_schema() -> Option<serde_json::Value> {
        Some(burrow::asyncapi::json_schema::<Self>())
    }
}


/// Collection id → searchable name. In memory here.
pub type SearchIndex = Arc<Mutex<BTreeMap<String, String>>>;

/// Indexes the collection; upserting keeps redeliveries harmless.
pub async fn index_collection(index: &SearchIndex, event: CollectionCreatedEvent) -> Result<(), HandlerError> {
    let name = event.name.trim();
    if name.is_empty() {
        return Err(HandlerError::permanent(format!(
            "collection {} has an empty name",
            event.aggregate_id
        )));
    }
    index
        .lock()
        .expect("search index poisoned")
        .insert(event.aggregate_id, name.to_lowercase());
    Ok(())
}

/// Registers the collections handlers with a fresh index.
pub fn register(registry: &mut Registry, _ctx: &ModuleContext) -> burrow::Result<()> {
    let index = SearchIndex::default();
    registry.on("collections.index_collection", move |event: CollectionCreatedEvent, _ctx: Context| {
        let index = index.clone();
        async move { index_collection(&index, event).await }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str) -> CollectionCreatedEvent {
        CollectionCreatedEvent {
            aggregate_id: "collection-1".into(),
            name: name.into(),
            author_id: "user-ada".into(),
            occurred_at: None,
        }
    }

    #[tokio::test]
    async fn indexes_the_lowercased_name_idempotently() {
        let index = SearchIndex::default();
        index_collection(&index, event("Papers To Read")).await.unwrap();
        index_collection(&index, event("Papers To Read")).await.unwrap();
        let index = index.lock().unwrap();
        assert_eq!(index.len(), 1);
        assert_eq!(index["collection-1"], "papers to read");
    }

    #[tokio::test]
    async fn an_empty_name_is_permanent() {
        let err = index_collection(&SearchIndex::default(), event("  ")).await.unwrap_err();
        assert!(!err.is_retryable());
    }
}
