//! Operations on an app's dead-letter queue (`<app queue>.dead`), all over
//! AMQP: list and show what is parked there, replay it to the app, purge it.
//!
//! # Browsing redelivers
//!
//! AMQP 0-9-1 cannot peek at a queue. [`list`], [`show`], and the letters
//! that [`replay`] and [`purge`] leave in place are *browsed*: taken with
//! `basic.get` (manual ack), held unacknowledged while the operation runs —
//! so one run never sees a letter twice — and then returned with
//! `basic.nack(requeue)`. If the process dies instead, the broker returns
//! them when the connection closes. Nothing is removed unless the operation
//! says so, but every browse is a redelivery: the letter comes back with
//! `redelivered` set and, on a quorum dead-letter queue, a higher
//! `x-delivery-count`. Whether that can cost a letter depends on the broker:
//!
//! - RabbitMQ 3.x: returns count, but the dead-letter queue has no delivery
//!   limit, so nothing happens.
//! - RabbitMQ 4.0–4.2: every return counts against the quorum queue's
//!   delivery limit, which defaults to 20, and a message past it is
//!   *dropped* when the queue has no dead-letter target — the dead-letter
//!   queue has none. About 20 browses would lose a letter unless the queue
//!   is declared with an explicit, large `x-delivery-limit` (a topology
//!   concern, see [`crate::topology`]; `-1` is not an option: 3.x reads it
//!   as 0).
//! - RabbitMQ 4.3+: `basic.nack(requeue)` no longer counts (which is why
//!   browsing uses it rather than `basic.reject` or closing the channel),
//!   but letters returned because the connection was lost still do.
//!
//! While one operation holds letters, another (a second `list`, a purge)
//! does not see them, and `queue.purge` does not remove them.
//!
//! Each operation opens its own connection (named `burrow dlq (<app>)`) and
//! closes it before returning.
//!
//! # Replay is at-least-once
//!
//! [`replay`] publishes a copy to the app queue through the default exchange
//! (never through the fan-out exchange, so no other app sees it again) and
//! acks the dead letter only once the broker confirmed the copy. If the ack
//! is lost after the confirm, the letter stays parked and a later replay
//! delivers it again; handlers de-duplicate on the message id.

mod browse;
mod render;

use std::time::Duration;

use lapin::{BasicProperties, message::Delivery, types::AMQPValue};

use self::browse::{Borrowed, Browse};
pub use self::render::{render_detail, render_table, to_json};
use crate::{
    config::Settings,
    error::Result,
    message::{Headers, MessageProperties},
    publisher::Publisher,
    topic,
    wire::{
        self, first_published_routing_key, header_int, header_string, header_strings, headers,
        x_death_entries,
    },
};

/// One message parked in the dead-letter queue, read leniently: a missing or
/// mistyped header gives `None` or an empty list, never an error.
///
/// Messages burrow dead-lettered carry its `burrow-*` headers
/// ([`crate::wire::headers`]). Messages the broker dead-lettered itself —
/// the app queue's `x-delivery-limit` after a crash loop — carry none of
/// the `burrow-dead-*` headers but an `x-death` header: their reason is the
/// broker's (`delivery_limit`) and their time of death comes from it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The AMQP `message_id`, or the stable id derived from the event type
    /// and body when the publisher set none (as the worker derives it).
    pub message_id: String,
    /// `burrow-event-type`, else the `type` property, else the routing key the
    /// message was first published with (from `x-death`); empty if unknown.
    pub event_type: String,
    /// `burrow-dead-reason` ([`crate::DeadReason`] as text), else the reason
    /// of the latest `x-death` entry (`delivery_limit`, `expired`, ...).
    pub reason: Option<String>,
    /// `burrow-failed-handler`: the first handler that failed for good.
    pub failed_handler: Option<String>,
    /// `burrow-handlers`: every handler that failed for good. Empty when no
    /// handler ran (too large, bad headers) or the header is missing: a
    /// replay then runs every subscribed handler.
    pub handlers: Vec<String>,
    /// `burrow-attempt`: the delivery attempt that failed last.
    pub attempts: Option<u32>,
    /// `burrow-last-error`: `handler: error` lines.
    pub last_error: Option<String>,
    /// `burrow-dead-at` (Unix ms), else the time of the latest `x-death` entry.
    pub dead_at_ms: Option<i64>,
    /// `burrow-first-failure-at` (Unix ms).
    pub first_failure_at_ms: Option<i64>,
    /// `burrow-replays`: how often this message was replayed before (0 if never).
    pub replays: u32,
    /// The routing key of the delivery out of the dead-letter queue (for
    /// everything burrow or the broker parks there: the queue's name).
    pub routing_key: String,
    /// All headers as received.
    pub headers: Headers,
    /// All properties as received (the headers apart).
    pub properties: MessageProperties,
    /// The properties in AMQP's form, for the replayed copy.
    pub(crate) raw: BasicProperties,
    /// The body, byte for byte.
    pub body: Vec<u8>,
}

impl DeadLetter {
    /// Reads a message taken from the dead-letter queue.
    pub(crate) fn read(routing_key: &str, properties: BasicProperties, body: Vec<u8>) -> Self {
        let headers = properties.headers().clone().unwrap_or_default();
        let latest_death = x_death_entries(&headers).into_iter().next();

        let event_type = header_string(&headers, headers::EVENT_TYPE)
            .filter(|s| !s.is_empty())
            .or_else(|| {
                properties
                    .kind()
                    .as_ref()
                    .map(|k| k.to_string())
                    .filter(|s| !s.is_empty())
            })
            .or_else(|| first_published_routing_key(&headers))
            .unwrap_or_default();

        let message_id = match properties.message_id() {
            Some(id) if !id.as_str().is_empty() => id.to_string(),
            _ => wire::derive_message_id(&event_type, &body),
        };

        let reason = header_string(&headers, headers::DEAD_REASON)
            .filter(|s| !s.is_empty())
            .or_else(|| latest_death.and_then(|d| header_string(d, "reason")))
            .or_else(|| header_string(&headers, "x-first-death-reason"));

        let dead_at_ms = header_int(&headers, headers::DEAD_AT).or_else(|| {
            latest_death.and_then(|d| match d.inner().get("time") {
                // AMQP timestamps are seconds.
                Some(AMQPValue::Timestamp(secs)) => {
                    i64::try_from(*secs).ok().and_then(|s| s.checked_mul(1000))
                }
                _ => None,
            })
        });

        DeadLetter {
            message_id,
            event_type,
            reason,
            failed_handler: header_string(&headers, headers::FAILED_HANDLER)
                .filter(|s| !s.is_empty()),
            handlers: header_strings(&headers, headers::HANDLERS),
            attempts: header_int(&headers, headers::ATTEMPT).and_then(|n| u32::try_from(n).ok()),
            last_error: header_string(&headers, headers::LAST_ERROR),
            dead_at_ms,
            first_failure_at_ms: header_int(&headers, headers::FIRST_FAILURE_AT),
            replays: header_int(&headers, headers::REPLAYS)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            routing_key: routing_key.to_owned(),
            headers: Headers::from_table(headers),
            properties: MessageProperties::from_amqp(&properties),
            raw: properties,
            body,
        }
    }

    /// Reads a delivery from the dead-letter queue (its acker is dropped).
    pub(crate) fn from_delivery(delivery: Delivery) -> Self {
        Self::read(
            delivery.routing_key.as_str(),
            delivery.properties,
            delivery.data,
        )
    }

    /// How long ago the message was dead-lettered, if known.
    pub fn age(&self, now_ms: i64) -> Option<Duration> {
        self.dead_at_ms
            .map(|at| Duration::from_millis(u64::try_from(now_ms - at).unwrap_or(0)))
    }
}

/// Which dead letters an operation selects. Every set criterion must hold;
/// an empty filter selects every letter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only letters of this event type (a topic pattern: `*` and `#` work).
    pub event: Option<String>,
    /// Only letters on which this handler failed; a replayed copy then runs
    /// only this handler. Letters that name no handler never match.
    pub handler: Option<String>,
    /// Only letters parked for this reason (`permanent`, `delivery_limit`, ...).
    pub reason: Option<String>,
    /// Only letters with one of these message ids.
    pub ids: Vec<String>,
    /// Only letters dead-lettered longer ago than this (by `burrow-dead-at`,
    /// or `x-death` for letters the broker parked); letters of unknown age
    /// never match.
    pub older_than: Option<Duration>,
    /// At most this many letters.
    pub limit: Option<usize>,
}

/// What an earlier name of [`Filter`] selected; kept for callers of [`replay`].
pub type ReplayFilter = Filter;

impl Filter {
    /// Whether any criterion is set (the limit aside).
    pub fn is_selective(&self) -> bool {
        self.event.is_some()
            || self.handler.is_some()
            || self.reason.is_some()
            || !self.ids.is_empty()
            || self.older_than.is_some()
    }

    /// Whether `letter` is selected at `now_ms` (ignoring the limit).
    pub fn matches_at(&self, letter: &DeadLetter, now_ms: i64) -> bool {
        let event_ok = self
            .event
            .as_deref()
            .is_none_or(|pattern| topic::matches(pattern, &letter.event_type));
        let handler_ok = self.handler.as_deref().is_none_or(|h| {
            letter.handlers.iter().any(|x| x == h) || letter.failed_handler.as_deref() == Some(h)
        });
        let reason_ok = self
            .reason
            .as_deref()
            .is_none_or(|r| letter.reason.as_deref() == Some(r));
        let id_ok = self.ids.is_empty() || self.ids.contains(&letter.message_id);
        let age_ok = self
            .older_than
            .is_none_or(|min| letter.age(now_ms).is_some_and(|age| age > min));
        event_ok && handler_ok && reason_ok && id_ok && age_ok
    }

    /// Whether `letter` is selected now (ignoring the limit).
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.matches_at(letter, wire::now_ms())
    }

    /// The filter in words, for messages (`event CardAdded*, handler feeds.add`).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(e) = &self.event {
            parts.push(format!("event {e}"));
        }
        if let Some(h) = &self.handler {
            parts.push(format!("handler {h}"));
        }
        if let Some(r) = &self.reason {
            parts.push(format!("reason {r}"));
        }
        if !self.ids.is_empty() {
            parts.push(format!("id {}", self.ids.join(", ")));
        }
        if let Some(d) = self.older_than {
            parts.push(format!("older than {}", humantime::format_duration(d)));
        }
        if parts.is_empty() {
            "every letter".into()
        } else {
            parts.join(", ")
        }
    }
}

/// How far an operation over the dead-letter queue has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Letters in the queue when the operation started (it looks at no more).
    pub total: usize,
    /// Letters looked at so far.
    pub seen: usize,
    /// Letters selected so far (replayed, purged, exported).
    pub selected: usize,
}

/// What [`replay`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Letters published back to the app queue (confirmed) and removed.
    pub replayed: usize,
    /// Letters looked at that did not match the filter; they stay parked.
    pub skipped: usize,
    /// Letters still in the dead-letter queue of those it held when the
    /// replay started: everything but the replayed ones.
    pub left: usize,
}

/// What [`purge`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Letters removed for good.
    pub purged: usize,
    /// Letters still in the dead-letter queue of those it held when the
    /// purge started.
    pub left: usize,
}

/// The number of ready messages in the dead-letter queue (unacknowledged
/// ones held by a concurrent browse are not counted).
pub async fn count(settings: &Settings) -> Result<u32> {
    let session = Browse::open(settings).await?;
    let result = session.count().await;
    session.close().await;
    result
}

/// Up to `limit` dead letters, oldest first, left in the queue (browsed: see
/// the [module docs](self) on what browsing does to delivery counts).
pub async fn list(settings: &Settings, limit: usize) -> Result<Vec<DeadLetter>> {
    select(
        settings,
        &Filter {
            limit: Some(limit),
            ..Filter::default()
        },
    )
    .await
}

/// The letters `filter` selects, oldest first, left in the queue (browsed).
pub async fn select(settings: &Settings, filter: &Filter) -> Result<Vec<DeadLetter>> {
    let mut letters = Vec::new();
    visit(settings, filter, &mut |letter| {
        letters.push(letter.clone());
        std::ops::ControlFlow::Continue(())
    })
    .await?;
    Ok(letters)
}

/// Calls `each` with every letter `filter` selects, oldest first, leaving
/// them in the queue (browsed); one letter at a time is in memory, so this
/// suits a queue of any size (`dlq export`). `each` may stop the walk.
/// Returns how far the walk came.
pub async fn visit(
    settings: &Settings,
    filter: &Filter,
    each: &mut (dyn FnMut(&DeadLetter) -> std::ops::ControlFlow<()> + Send),
) -> Result<Progress> {
    let session = Browse::open(settings).await?;
    let mut held = Borrowed::default();
    let mut progress = Progress::default();
    let result = async {
        progress.total = session.count().await? as usize;
        let now = wire::now_ms();
        while progress.seen < progress.total
            && filter.limit.is_none_or(|limit| progress.selected < limit)
        {
            let Some(delivery) = session.get().await? else {
                break;
            };
            held.hold(delivery.delivery_tag);
            progress.seen += 1;
            let letter = DeadLetter::from_delivery(delivery);
            if filter.matches_at(&letter, now) {
                progress.selected += 1;
                if each(&letter).is_break() {
                    break;
                }
            }
        }
        Ok(progress)
    }
    .await;
    session.finish(held, result).await
}

/// The first dead letter whose message id is `message_id`, left in the queue
/// (browsed; every letter before it is browsed too).
pub async fn show(settings: &Settings, message_id: &str) -> Result<Option<DeadLetter>> {
    let filter = Filter {
        ids: vec![message_id.to_owned()],
        limit: Some(1),
        ..Filter::default()
    };
    Ok(select(settings, &filter).await?.into_iter().next())
}

/// Sends the dead letters `filter` selects back to the app's own queue and
/// removes them; `progress` is told after each letter looked at.
///
/// Each copy goes through `publisher` to the default exchange with the app
/// queue's name as routing key, so only this app sees it. Its headers are
/// the letter's minus `burrow-dead-reason`, `burrow-failed-handler`,
/// `burrow-dead-at`, `burrow-last-error` (and the broker's
/// `x-delivery-count`), with `burrow-attempt` = 1, `burrow-replays` one
/// higher, and `burrow-handlers` = the handlers that failed (only
/// [`Filter::handler`] if set; no header when none are recorded, so
/// every subscribed handler runs). `burrow-event-type` is kept, or set from
/// [`DeadLetter::event_type`] for letters the broker parked.
///
/// A letter is acked only after its copy was confirmed. On the first error
/// the letter (and every one held) is returned to the queue and the error is
/// returned; letters replayed before it stay replayed. Letters that do not
/// match are returned when the run ends. The run looks at no more letters
/// than the queue held when it started, so it ends even while the worker
/// parks the replayed copies again.
pub async fn replay(
    settings: &Settings,
    publisher: &Publisher,
    filter: &Filter,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<ReplayReport> {
    let app_queue = settings.app_queue();
    let session = Browse::open(settings).await?;
    let mut held = Borrowed::default();
    let mut seen = Progress::default();
    let result = async {
        seen.total = session.count().await? as usize;
        let now = wire::now_ms();
        while seen.seen < seen.total && filter.limit.is_none_or(|limit| seen.selected < limit) {
            let Some(delivery) = session.get().await? else {
                break;
            };
            seen.seen += 1;
            let tag = delivery.delivery_tag;
            let letter = DeadLetter::from_delivery(delivery);
            if !filter.matches_at(&letter, now) {
                held.hold(tag);
                progress(seen);
                continue;
            }
            let properties = replay_properties(&letter, filter.handler.as_deref());
            let label = if letter.event_type.is_empty() {
                crate::metrics::OTHER_EVENT
            } else {
                letter.event_type.as_str()
            };
            if let Err(e) = publisher
                .send_counted(label, "", &app_queue, &letter.body, &properties)
                .await
            {
                held.hold(tag);
                return Err(e);
            }
            session.ack(tag, &letter.message_id).await?;
            seen.selected += 1;
            progress(seen);
        }
        Ok(())
    }
    .await;
    let report = ReplayReport {
        replayed: seen.selected,
        skipped: seen.seen - seen.selected,
        left: seen.total - seen.selected,
    };
    if let Err(e) = &result {
        tracing::warn!(
            replayed = report.replayed,
            skipped = report.skipped,
            error = %e,
            "dead-letter replay stopped at an error; the letters replayed so far stay replayed"
        );
    }
    session.finish(held, result).await?;
    Ok(report)
}

/// Removes the dead letters `filter` selects, for good.
///
/// With an empty filter and no limit, everything ready in the queue goes in
/// one `queue.purge` (letters held unacknowledged by a concurrent browse
/// survive). Otherwise letters are browsed: the selected ones are acked
/// (removed), the rest returned. Keep what you remove with [`visit`]
/// (`burrow dlq export`) first.
pub async fn purge(
    settings: &Settings,
    filter: &Filter,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<PurgeReport> {
    let session = Browse::open(settings).await?;
    if !filter.is_selective() && filter.limit.is_none() {
        let result = session.purge().await;
        session.close().await;
        return result.map(|purged| PurgeReport { purged, left: 0 });
    }
    let mut held = Borrowed::default();
    let mut seen = Progress::default();
    let result = async {
        seen.total = session.count().await? as usize;
        let now = wire::now_ms();
        while seen.seen < seen.total && filter.limit.is_none_or(|limit| seen.selected < limit) {
            let Some(delivery) = session.get().await? else {
                break;
            };
            seen.seen += 1;
            let tag = delivery.delivery_tag;
            let letter = DeadLetter::from_delivery(delivery);
            if filter.matches_at(&letter, now) {
                session.ack(tag, &letter.message_id).await?;
                seen.selected += 1;
            } else {
                held.hold(tag);
            }
            progress(seen);
        }
        Ok(PurgeReport {
            purged: seen.selected,
            left: seen.total - seen.selected,
        })
    }
    .await;
    session.finish(held, result).await
}

/// The properties of a replayed copy (see [`replay`]).
fn replay_properties(letter: &DeadLetter, only_handler: Option<&str>) -> BasicProperties {
    let handlers: Vec<String> = match only_handler {
        Some(h) => vec![h.to_owned()],
        None => letter.handlers.clone(),
    };
    wire::replay_copy(
        &letter.raw,
        &letter.message_id,
        &letter.event_type,
        letter.replays,
        &handlers,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wire::X_DEATH;
    use lapin::types::FieldArray;
    use lapin::types::FieldTable;

    fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(k.into(), v);
        }
        t
    }

    pub(crate) fn burrow_letter() -> DeadLetter {
        let headers = table(vec![
            (
                headers::EVENT_TYPE,
                wire::long_string("CardAddedToLibraryEvent"),
            ),
            (headers::DEAD_REASON, wire::long_string("permanent")),
            (headers::FAILED_HANDLER, wire::long_string("library.attach")),
            (
                headers::HANDLERS,
                wire::string_array(&["library.attach".into(), "search.index".into()]),
            ),
            (headers::ATTEMPT, AMQPValue::LongLongInt(3)),
            (
                headers::LAST_ERROR,
                wire::long_string("library.attach: gone\nsearch.index: no"),
            ),
            (headers::DEAD_AT, AMQPValue::LongLongInt(1_700_000_000_000)),
            (
                headers::FIRST_FAILURE_AT,
                AMQPValue::LongLongInt(1_699_999_000_000),
            ),
            (headers::REPLAYS, AMQPValue::LongLongInt(2)),
            (headers::EVENT_VERSION, AMQPValue::LongLongInt(1)),
            ("x-delivery-count", AMQPValue::LongLongInt(4)),
            (
                X_DEATH,
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(table(vec![
                    ("queue", wire::long_string("events_a")),
                    ("reason", wire::long_string("delivery_limit")),
                ]))])),
            ),
            ("x-first-death-queue", wire::long_string("events_a")),
            ("x-first-death-reason", wire::long_string("delivery_limit")),
            ("x-first-death-exchange", wire::long_string("")),
        ]);
        let props = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_correlation_id("c-1".into())
            .with_headers(headers);
        DeadLetter::read("events_a.dead", props, br#"{"aggregateId":"a-1"}"#.to_vec())
    }

    #[test]
    fn reads_burrow_headers() {
        let l = burrow_letter();
        assert_eq!(l.message_id, "m-1");
        assert_eq!(l.event_type, "CardAddedToLibraryEvent");
        assert_eq!(l.reason.as_deref(), Some("permanent"));
        assert_eq!(l.failed_handler.as_deref(), Some("library.attach"));
        assert_eq!(l.handlers, vec!["library.attach", "search.index"]);
        assert_eq!(l.attempts, Some(3));
        assert_eq!(l.dead_at_ms, Some(1_700_000_000_000));
        assert_eq!(l.first_failure_at_ms, Some(1_699_999_000_000));
        assert_eq!(l.replays, 2);
        assert_eq!(l.routing_key, "events_a.dead");
    }

    #[test]
    fn reads_a_message_without_any_header() {
        let l = DeadLetter::read("events_a.dead", BasicProperties::default(), b"x".to_vec());
        assert_eq!(l.event_type, "");
        assert!(l.message_id.starts_with("derived-"));
        assert_eq!(
            (l.reason, l.failed_handler, l.attempts, l.dead_at_ms),
            (None, None, None, None)
        );
        assert!(l.handlers.is_empty());
        assert_eq!(l.replays, 0);
    }

    #[test]
    fn reads_a_letter_the_broker_parked() {
        let death = table(vec![
            ("count", AMQPValue::LongLongInt(1)),
            ("exchange", wire::long_string("domain_events")),
            ("queue", wire::long_string("events_a")),
            ("reason", wire::long_string("delivery_limit")),
            (
                "routing-keys",
                AMQPValue::FieldArray(FieldArray::from(vec![wire::long_string(
                    "CardAddedToLibraryEvent",
                )])),
            ),
            ("time", AMQPValue::Timestamp(1_700_000_000)),
        ]);
        let headers = table(vec![(
            X_DEATH,
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        )]);
        let props = BasicProperties::default().with_headers(headers);
        let l = DeadLetter::read("events_a.dead", props, b"{}".to_vec());
        assert_eq!(l.reason.as_deref(), Some("delivery_limit"));
        assert_eq!(l.event_type, "CardAddedToLibraryEvent");
        assert_eq!(l.dead_at_ms, Some(1_700_000_000_000));
        assert_eq!(
            l.message_id,
            wire::derive_message_id("CardAddedToLibraryEvent", b"{}")
        );
        // The replay copy names the event type so the worker can route it.
        let p = replay_properties(&l, None);
        let h = p.headers().clone().unwrap();
        assert_eq!(
            header_string(&h, headers::EVENT_TYPE).as_deref(),
            Some("CardAddedToLibraryEvent")
        );
        assert!(!h.contains_key(headers::HANDLERS), "every handler runs");
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), l.message_id);
    }

    #[test]
    fn replay_copies_drop_the_death_and_restart_the_attempts() {
        let l = burrow_letter();
        let p = replay_properties(&l, None);
        let h = p.headers().clone().unwrap();
        for gone in [
            headers::DEAD_REASON,
            headers::FAILED_HANDLER,
            headers::DEAD_AT,
            headers::LAST_ERROR,
            "x-delivery-count",
            X_DEATH,
            "x-first-death-queue",
            "x-first-death-reason",
            "x-first-death-exchange",
        ] {
            assert!(!h.contains_key(gone), "{gone} must be removed");
        }
        assert_eq!(header_int(&h, headers::ATTEMPT), Some(1));
        assert_eq!(header_int(&h, headers::REPLAYS), Some(3));
        assert_eq!(
            header_strings(&h, headers::HANDLERS),
            vec!["library.attach", "search.index"]
        );
        assert_eq!(
            header_string(&h, headers::EVENT_TYPE).as_deref(),
            Some("CardAddedToLibraryEvent")
        );
        assert_eq!(header_int(&h, headers::EVENT_VERSION), Some(1));
        assert_eq!(
            header_int(&h, headers::FIRST_FAILURE_AT),
            Some(1_699_999_000_000)
        );
        assert_eq!(p.message_id().as_ref().unwrap().as_str(), "m-1");
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "c-1");
        assert_eq!(*p.delivery_mode(), Some(2));

        let only = replay_properties(&l, Some("search.index"));
        let h = only.headers().clone().unwrap();
        assert_eq!(header_strings(&h, headers::HANDLERS), vec!["search.index"]);

        // The copy is read by the worker as a fresh first attempt for those handlers.
        let inc = wire::Incoming::read("", "events_a", &p, &l.body);
        assert_eq!(inc.bad_header, None);
        assert_eq!(inc.attempt, 1);
        assert_eq!(inc.event_type, "CardAddedToLibraryEvent");
        assert_eq!(
            inc.pending_handlers,
            Some(vec!["library.attach".into(), "search.index".into()])
        );
    }

    #[test]
    fn filters_by_event_and_handler() {
        let l = burrow_letter();
        assert!(Filter::default().matches(&l));
        let f = |event: Option<&str>, handler: Option<&str>| Filter {
            event: event.map(str::to_owned),
            handler: handler.map(str::to_owned),
            ..Filter::default()
        };
        assert!(f(Some("CardAddedToLibraryEvent"), None).matches(&l));
        assert!(f(Some("#"), Some("search.index")).matches(&l));
        assert!(!f(Some("CollectionCreatedEvent"), None).matches(&l));
        assert!(!f(None, Some("billing.charge")).matches(&l));
        let none = DeadLetter::read("q", BasicProperties::default(), Vec::new());
        assert!(!f(None, Some("search.index")).matches(&none));
    }

    #[test]
    fn filters_by_reason_id_and_age() {
        let l = burrow_letter(); // dead at 1_700_000_000_000
        let at = |ms: i64, filter: Filter| filter.matches_at(&l, ms);
        let reason = |r: &str| Filter {
            reason: Some(r.into()),
            ..Filter::default()
        };
        assert!(at(0, reason("permanent")));
        assert!(!at(0, reason("undecodable")));
        let ids = |ids: &[&str]| Filter {
            ids: ids.iter().map(|s| s.to_string()).collect(),
            ..Filter::default()
        };
        assert!(at(0, ids(&["x", "m-1"])));
        assert!(!at(0, ids(&["x"])));
        let older = Filter {
            older_than: Some(Duration::from_secs(60)),
            ..Filter::default()
        };
        assert!(at(1_700_000_061_000, older.clone()));
        assert!(!at(1_700_000_059_000, older.clone()));
        let ageless = DeadLetter::read("q", BasicProperties::default(), Vec::new());
        assert!(
            !older.matches(&ageless),
            "a letter of unknown age is never old enough"
        );
        assert!(!Filter::default().is_selective());
        assert!(older.is_selective());
        assert_eq!(older.describe(), "older than 1m");
    }
}
