//! A complete worker in one file: one closure handler that fails the first
//! time it sees an event, to show the retry ladder at work.
//!
//! ```sh
//! BURROW__APP__NAME=example cargo run --example worker
//! # in another terminal:
//! cargo run -- publish CollectionCreatedEvent '{"aggregateId":"c-1","name":"Papers"}'
//! ```
//!
//! Stop it with Ctrl-C: in-flight handlers finish, then it exits.

use burrow::{Context, DomainEvent, Event, HandlerError, Registry, Settings, Worker};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CollectionCreatedEvent {
    aggregate_id: String,
    name: String,
}

impl Event for CollectionCreatedEvent {
    const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
}

impl DomainEvent for CollectionCreatedEvent {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

#[tokio::main]
async fn main() -> burrow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter("info,lapin=error")
        .init();
    let mut registry = Registry::new();
    registry.on(
        "example.print_collection",
        |event: CollectionCreatedEvent, ctx: Context| async move {
            if ctx.attempt == 1 {
                return Err(HandlerError::transient(
                    "first attempts fail in this example",
                ));
            }
            println!(
                "collection {} ({}) handled on attempt {}",
                event.name, event.aggregate_id, ctx.attempt
            );
            Ok(())
        },
    )?;
    let worker = Worker::new(Settings::load()?, registry)?;
    let report = worker.run(burrow::shutdown::signal()).await?;
    println!("stopped after settling {} deliveries", report.settled);
    Ok(())
}
