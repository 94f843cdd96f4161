//! `burrow publish`: one event, confirmed.

use std::io::Read;

use clap::Args;

use super::{CliError, CliResult, output::Out};
use crate::{Error, EventMeta, Publisher, Settings};

#[derive(Debug, Args)]
pub(super) struct PublishArgs {
    /// The event type (routing key), e.g. CardAddedToLibraryEvent.
    event_type: String,
    /// The event as a JSON object, e.g. '{"aggregateId":"card-1"}'; `-` reads it from stdin.
    json: String,
    /// Correlation id (defaults to the message id).
    #[arg(long)]
    correlation_id: Option<String>,
    /// Message id (defaults to a fresh UUID).
    #[arg(long)]
    message_id: Option<String>,
}

/// Why `event_type` cannot be published as one, if it cannot: it is a
/// routing key on a topic exchange, so a wildcard would be taken literally
/// by the exchange but match no binding the way a reader expects.
fn event_type_problem(event_type: &str) -> Option<&'static str> {
    if event_type.is_empty() {
        Some("it is empty")
    } else if event_type.contains(['*', '#']) {
        Some("it contains a topic wildcard (* or #), which only bindings may use")
    } else if event_type.chars().any(char::is_whitespace) {
        Some("it contains whitespace")
    } else if event_type.len() > 255 {
        Some("it is longer than AMQP's 255-byte routing keys")
    } else {
        None
    }
}

pub(super) async fn publish(settings: &Settings, args: PublishArgs, out: &Out) -> CliResult {
    let PublishArgs {
        event_type,
        json,
        correlation_id,
        message_id,
    } = args;
    if let Some(problem) = event_type_problem(&event_type) {
        return Err(CliError::Usage(format!(
            "{event_type:?} is not an event type: {problem}. Pass the event's type name, e.g. CardAddedToLibraryEvent"
        )));
    }
    let json = if json == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| CliError::Usage(format!("cannot read the event from stdin: {e}")))?;
        text
    } else {
        json
    };
    let body: serde_json::Value = serde_json::from_str(&json).map_err(|e| Error::InvalidEvent {
        event_type: event_type.clone(),
        reason: format!("not valid JSON ({e})"),
    })?;
    let message_id = message_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let meta = EventMeta {
        correlation_id,
        message_id: Some(message_id.clone()),
        ..EventMeta::default()
    };
    let publisher = Publisher::connect(settings).await?;
    let result = publisher.publish_json(&event_type, &body, meta).await;
    publisher.close().await;
    result?;
    out.either(
        &format!(
            "published {event_type} to {} (confirmed), message id {message_id}\n",
            settings.amqp.exchange
        ),
        &serde_json::json!({
            "event_type": event_type,
            "exchange": settings.amqp.exchange,
            "message_id": message_id,
            "confirmed": true,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_are_routing_keys_without_wildcards() {
        assert_eq!(event_type_problem("CardAddedToLibraryEvent"), None);
        assert_eq!(event_type_problem("library.card.added"), None);
        for bad in ["", "Card.#", "Card.*", "two words", &"x".repeat(256)] {
            assert!(event_type_problem(bad).is_some(), "{bad:?}");
        }
    }
}
