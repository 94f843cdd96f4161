//! Building what burrow publishes.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
};

use super::{DeadReason, HeaderBudget, Incoming, headers, now_ms};

pub(crate) fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

pub(crate) fn string_array(items: &[String]) -> AMQPValue {
    AMQPValue::FieldArray(FieldArray::from(
        items.iter().map(|s| long_string(s)).collect::<Vec<_>>(),
    ))
}

/// A short string from arbitrary text, cut at 255 bytes on a char boundary.
pub(crate) fn short_string_lossy(s: &str) -> ShortString {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    ShortString::from(&s[..end])
}

/// A short string, or an error naming what was too long.
pub(crate) fn short_string(what: &'static str, s: &str) -> crate::Result<ShortString> {
    ShortString::try_new(s).map_err(|_| crate::Error::NameTooLong {
        what,
        value: s.chars().take(40).collect(),
        len: s.len(),
    })
}

/// What a new event carries besides its body (docs/wire-contract.md,
/// "Properties"): the publisher's and the outbox relay's events alike.
#[derive(Debug)]
pub(crate) struct NewEvent<'a> {
    pub(crate) event_type: &'a str,
    pub(crate) version: i64,
    /// The aggregate that raised it (`burrow-aggregate-id`); empty: none.
    pub(crate) aggregate_id: &'a str,
    /// When it happened, Unix seconds (the AMQP `timestamp`).
    pub(crate) occurred_at: u64,
    pub(crate) message_id: &'a str,
    pub(crate) correlation_id: &'a str,
    pub(crate) causation_id: Option<&'a str>,
    /// The publishing app (`app_id`).
    pub(crate) app_id: &'a str,
    /// Further headers (trace context).
    pub(crate) extra: FieldTable,
}

/// The properties of a new event: persistent JSON, its ids, type,
/// timestamp and app, and the `burrow-event-version` and
/// `burrow-causation-id` headers where they carry something.
///
/// A version of 1 is the contract's default (an absent header reads as 1),
/// so it is not sent, and an event with nothing else to say has no headers
/// table at all: the broker parses and stores one less table per message.
pub(crate) fn event_properties(event: NewEvent<'_>) -> crate::Result<BasicProperties> {
    let mut table = event.extra;
    if event.version != DEFAULT_EVENT_VERSION {
        table.insert(
            headers::EVENT_VERSION.into(),
            AMQPValue::LongLongInt(event.version),
        );
    }
    if let Some(causation) = event.causation_id {
        table.insert(headers::CAUSATION_ID.into(), long_string(causation));
    }
    // Ordered apps shard on it (docs/wire-contract.md §5).
    if !event.aggregate_id.is_empty() {
        table.insert(
            headers::AGGREGATE_ID.into(),
            long_string(event.aggregate_id),
        );
    }
    let properties = BasicProperties::default()
        .with_message_id(short_string("message id", event.message_id)?)
        .with_correlation_id(short_string("correlation id", event.correlation_id)?)
        .with_timestamp(event.occurred_at)
        .with_type(short_string("event type", event.event_type)?)
        .with_content_type(ShortString::from("application/json"))
        .with_app_id(short_string("app id", event.app_id)?)
        .with_delivery_mode(2);
    Ok(if table.inner().is_empty() {
        properties
    } else {
        properties.with_headers(table)
    })
}

/// The `burrow-event-version` a message without the header has.
pub(crate) const DEFAULT_EVENT_VERSION: i64 = 1;

/// The properties of a retry copy of `incoming`: the original's, the next
/// attempt, the handlers that run again and their errors, fitted into
/// `budget` (docs/wire-contract.md, "Retry copies").
pub(crate) fn retry_copy(
    incoming: &Incoming,
    original: &BasicProperties,
    handlers: &[String],
    errors: &[String],
    budget: &HeaderBudget,
) -> BasicProperties {
    let mut extra = FieldTable::default();
    extra.insert(
        headers::ATTEMPT.into(),
        AMQPValue::LongLongInt(i64::from(incoming.attempt) + 1),
    );
    extra.insert(headers::HANDLERS.into(), string_array(handlers));
    extra.insert(
        headers::LAST_ERROR.into(),
        long_string(&truncate(&errors.join("\n"), LAST_ERROR_MAX)),
    );
    copy_properties(incoming, original, extra, budget)
}

/// The properties of a dead-letter copy of `incoming`: the original's,
/// why, which handlers failed, the last error and when, fitted into
/// `budget` (docs/wire-contract.md, "Dead letters").
pub(crate) fn dead_copy(
    incoming: &Incoming,
    original: &BasicProperties,
    reason: DeadReason,
    handlers: &[String],
    errors: &[String],
    budget: &HeaderBudget,
) -> BasicProperties {
    let mut extra = FieldTable::default();
    extra.insert(
        headers::ATTEMPT.into(),
        AMQPValue::LongLongInt(i64::from(incoming.attempt)),
    );
    extra.insert(headers::HANDLERS.into(), string_array(handlers));
    extra.insert(headers::DEAD_REASON.into(), long_string(reason.as_str()));
    if let Some(first) = handlers.first() {
        extra.insert(headers::FAILED_HANDLER.into(), long_string(first));
    }
    extra.insert(
        headers::LAST_ERROR.into(),
        long_string(&truncate(&errors.join("\n"), LAST_ERROR_MAX)),
    );
    extra.insert(headers::DEAD_AT.into(), AMQPValue::LongLongInt(now_ms()));
    copy_properties(incoming, original, extra, budget)
}

/// Headers a replayed copy leaves behind: burrow's verdict on the failure
/// (the copy starts over), the quorum queue's delivery count, and the
/// broker's own death records. A copy that still carried an `x-death` entry
/// naming the app queue would, once its handler failed again and its retry
/// step expired back to that queue, be seen by RabbitMQ 3.x as a
/// dead-letter cycle and dropped; the history stays in burrow's own headers
/// (`burrow-first-failure-at`, `burrow-replays`). The `CC` of a delayed
/// event goes too (see [`ROUTING_ONLY`]).
const LEFT_BEHIND_ON_REPLAY: [&str; 12] = [
    headers::DEAD_REASON,
    headers::FAILED_HANDLER,
    headers::DEAD_AT,
    headers::LAST_ERROR,
    "x-delivery-count",
    super::X_DEATH,
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-queue",
    "x-last-death-reason",
    ROUTING_ONLY,
];

/// The header that routed a delayed event to every subscribed app on its
/// way out of the delay queues (RabbitMQ routes on a `CC` header's keys
/// besides the routing key, <https://www.rabbitmq.com/docs/sender-selected>).
/// A copy goes by queue name through the default exchange, where those keys
/// would name queues: a retry would also land in a queue that happens to be
/// named like the event type. Copies leave it behind.
const ROUTING_ONLY: &str = "CC";

/// The properties of a replayed copy of a dead letter: the letter's
/// properties and headers without [`LEFT_BEHIND_ON_REPLAY`], attempt 1, one
/// more replay, `burrow-handlers` = `handlers` (none: every subscribed
/// handler runs), and `burrow-event-type` set when the letter lacked it.
pub(crate) fn replay_copy(
    original: &BasicProperties,
    message_id: &str,
    event_type: &str,
    replays: u32,
    handlers: &[String],
) -> BasicProperties {
    let mut map = original
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    for name in LEFT_BEHIND_ON_REPLAY {
        map.remove(name);
    }
    map.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(1));
    map.insert(
        headers::REPLAYS.into(),
        AMQPValue::LongLongInt(i64::from(replays) + 1),
    );
    if handlers.is_empty() {
        map.remove(headers::HANDLERS);
    } else {
        map.insert(headers::HANDLERS.into(), string_array(handlers));
    }
    if !map.contains_key(headers::EVENT_TYPE) && !event_type.is_empty() {
        map.insert(headers::EVENT_TYPE.into(), long_string(event_type));
    }
    original
        .clone()
        .with_message_id(short_string_lossy(message_id))
        .with_delivery_mode(2)
        .with_headers(FieldTable::from(map))
}

/// The longest `burrow-last-error`, in bytes.
const LAST_ERROR_MAX: usize = 4096;

/// The properties of a retry or dead-letter copy: the original ones, a
/// message id (derived if the publisher set none, so it stays stable), and
/// burrow's headers on top of the original headers. The headers are fitted
/// into the header budget, so the copy can always be published: past it, the
/// largest original headers are left out and named in `burrow-dropped-headers`.
fn copy_properties(
    incoming: &Incoming,
    original: &BasicProperties,
    extra: FieldTable,
    budget: &HeaderBudget,
) -> BasicProperties {
    let mut own = FieldTable::default();
    own.insert(
        headers::EVENT_TYPE.into(),
        long_string(&incoming.event_type),
    );
    own.insert(
        headers::FIRST_FAILURE_AT.into(),
        AMQPValue::LongLongInt(incoming.first_failure_at.unwrap_or_else(now_ms)),
    );
    for (k, v) in &extra {
        own.insert(k.clone(), v.clone());
    }
    let empty = FieldTable::default();
    let original_headers = original.headers().as_ref().unwrap_or(&empty);
    let table = if original_headers.inner().contains_key(ROUTING_ONLY) {
        let mut kept = original_headers.inner().clone();
        kept.remove(ROUTING_ONLY);
        budget.fit(own, &FieldTable::from(kept))
    } else {
        budget.fit(own, original_headers)
    };
    original
        .clone()
        .with_message_id(short_string_lossy(&incoming.message_id))
        .with_delivery_mode(2)
        .with_headers(table)
}

/// `s` cut to at most `max` bytes on a char boundary, with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_strings_are_cut_on_a_char_boundary() {
        let s = "é".repeat(200);
        let cut = short_string_lossy(&s);
        assert!(cut.as_str().len() <= 255);
        assert!(short_string("routing key", &s).is_err());
    }
}
