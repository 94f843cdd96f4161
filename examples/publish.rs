//! Publishes one typed event with publisher confirms.
//!
//! Run a worker first (`cargo run -- run`), then:
//!
//! ```sh
//! cargo run --example publish
//! ```
//!
//! The call returns only after RabbitMQ confirmed the event; with no queue
//! bound for the event type it fails with `Error::Unroutable` instead of
//! dropping the event silently.

use burrow::{DomainEvent, Event, EventMeta, Publisher, Settings};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CollectionCreatedEvent {
    aggregate_id: String,
    name: String,
    author_id: String,
    occurred_at: DateTime<Utc>,
}

impl Event for CollectionCreatedEvent {
    const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
}

impl DomainEvent for CollectionCreatedEvent {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        self.occurred_at
    }
}

#[tokio::main]
async fn main() -> burrow::Result<()> {
    let settings = Settings::load()?;
    let publisher = Publisher::connect(&settings).await?;
    let event = CollectionCreatedEvent {
        aggregate_id: "collection-42".into(),
        name: "Reading list".into(),
        author_id: "user-ada".into(),
        occurred_at: Utc::now(),
    };
    let result = publisher
        .publish_with(
            &event,
            EventMeta::default().correlation_id("example-request-1"),
        )
        .await;
    publisher.close().await;
    match result {
        Ok(()) => println!("CollectionCreatedEvent confirmed by the broker"),
        Err(e) => {
            eprintln!("not published: {e}");
            std::process::exit(1);
        }
    }
    Ok(())
}
