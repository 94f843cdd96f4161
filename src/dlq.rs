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

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use lapin::{
    BasicProperties, Channel, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions, QueuePurgeOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
};

use crate::{
    config::Settings,
    connection,
    error::{Error, Result},
    publisher::Publisher,
    topic,
    wire::{self, headers},
};

/// Header RabbitMQ adds to messages it dead-letters itself (array of tables,
/// the most recent death first).
const X_DEATH: &str = "x-death";
/// Header quorum queues set on redelivered messages; meaningless on a copy.
const X_DELIVERY_COUNT: &str = "x-delivery-count";
/// Longest `last error` shown by [`render_table`], in characters.
const TABLE_ERROR_WIDTH: usize = 60;

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
    pub headers: FieldTable,
    /// All properties as received (including the headers).
    pub properties: BasicProperties,
    /// The body, byte for byte.
    pub body: Vec<u8>,
}

impl DeadLetter {
    /// Reads a message taken from the dead-letter queue.
    pub fn read(routing_key: &str, properties: BasicProperties, body: Vec<u8>) -> Self {
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
            headers,
            properties,
            body,
        }
    }

    /// Reads a delivery from the dead-letter queue (its acker is dropped).
    pub fn from_delivery(delivery: Delivery) -> Self {
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

/// Which dead letters [`replay`] sends back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayFilter {
    /// Only letters of this event type (a topic pattern: `*` and `#` work).
    pub event: Option<String>,
    /// Only letters on which this handler failed; the copy then runs only
    /// this handler. Letters that name no handler never match.
    pub handler: Option<String>,
    /// Replay at most this many letters.
    pub limit: Option<usize>,
}

impl ReplayFilter {
    /// Whether `letter` is selected (ignoring the limit).
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        let event_ok = self
            .event
            .as_deref()
            .is_none_or(|pattern| topic::matches(pattern, &letter.event_type));
        let handler_ok = self.handler.as_deref().is_none_or(|h| {
            letter.handlers.iter().any(|x| x == h) || letter.failed_handler.as_deref() == Some(h)
        });
        event_ok && handler_ok
    }
}

/// What [`replay`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Letters published back to the app queue (confirmed) and removed.
    pub replayed: usize,
    /// Letters looked at that did not match the filter; they stay parked.
    /// Letters past the limit are not looked at and not counted.
    pub skipped: usize,
}

/// The number of ready messages in the dead-letter queue (unacknowledged
/// ones held by a concurrent browse are not counted).
pub async fn count(settings: &Settings) -> Result<u32> {
    let session = Session::open(settings).await?;
    let result = session.count().await;
    session.close().await;
    result
}

/// Up to `limit` dead letters, oldest first, left in the queue (browsed: see
/// the [module docs](self) on what browsing does to delivery counts).
pub async fn list(settings: &Settings, limit: usize) -> Result<Vec<DeadLetter>> {
    let session = Session::open(settings).await?;
    let mut held = Held::default();
    let result = async {
        let total = session.count().await?;
        let n = limit.min(total as usize);
        let mut letters = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(delivery) = session.get().await? else {
                break;
            };
            held.hold(delivery.delivery_tag);
            letters.push(DeadLetter::from_delivery(delivery));
        }
        Ok(letters)
    }
    .await;
    session.finish(held, result).await
}

/// The first dead letter whose message id is `message_id`, left in the queue
/// (browsed; every letter before it is browsed too).
pub async fn show(settings: &Settings, message_id: &str) -> Result<Option<DeadLetter>> {
    let session = Session::open(settings).await?;
    let mut held = Held::default();
    let result = async {
        let total = session.count().await?;
        for _ in 0..total {
            let Some(delivery) = session.get().await? else {
                break;
            };
            held.hold(delivery.delivery_tag);
            let letter = DeadLetter::from_delivery(delivery);
            if letter.message_id == message_id {
                return Ok(Some(letter));
            }
        }
        Ok(None)
    }
    .await;
    session.finish(held, result).await
}

/// Sends matching dead letters back to the app's own queue and removes them.
///
/// Each copy goes through `publisher` to the default exchange with the app
/// queue's name as routing key, so only this app sees it. Its headers are
/// the letter's minus `burrow-dead-reason`, `burrow-failed-handler`,
/// `burrow-dead-at`, `burrow-last-error` (and the broker's
/// `x-delivery-count`), with `burrow-attempt` = 1, `burrow-replays` one
/// higher, and `burrow-handlers` = the handlers that failed (only
/// [`ReplayFilter::handler`] if set; no header when none are recorded, so
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
    filter: &ReplayFilter,
) -> Result<ReplayReport> {
    let app_queue = settings.app_queue();
    let session = Session::open(settings).await?;
    let mut held = Held::default();
    let mut report = ReplayReport::default();
    let result = async {
        let total = session.count().await?;
        for _ in 0..total {
            if filter.limit.is_some_and(|limit| report.replayed >= limit) {
                break;
            }
            let Some(delivery) = session.get().await? else {
                break;
            };
            let tag = delivery.delivery_tag;
            let letter = DeadLetter::from_delivery(delivery);
            if !filter.matches(&letter) {
                held.hold(tag);
                report.skipped += 1;
                continue;
            }
            let properties = replay_properties(&letter, filter.handler.as_deref());
            if let Err(e) = publisher
                .send("", &app_queue, &letter.body, properties)
                .await
            {
                held.hold(tag);
                return Err(e);
            }
            session
                .channel
                .basic_ack(tag, BasicAckOptions::default())
                .await
                .map_err(|e| {
                    Error::amqp(
                        format!(
                            "basic.ack of dead letter '{}' after its replay was confirmed \
                             (the letter stays in '{}' and a later replay would deliver it again)",
                            letter.message_id, session.queue
                        ),
                        e,
                    )
                })?;
            report.replayed += 1;
        }
        Ok(())
    }
    .await;
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

/// Removes dead letters and returns how many.
///
/// Without `older_than`, everything ready in the queue goes (`queue.purge`;
/// letters held unacknowledged by a concurrent browse survive). With it,
/// only letters dead-lettered more than `older_than` ago (by
/// `burrow-dead-at`, or `x-death` for letters the broker parked) are
/// removed; the rest, including letters of unknown age, are browsed and
/// returned.
pub async fn purge(settings: &Settings, older_than: Option<Duration>) -> Result<usize> {
    let session = Session::open(settings).await?;
    let Some(older_than) = older_than else {
        let result = session
            .channel
            .queue_purge(
                wire::short_string("queue name", &session.queue)?,
                QueuePurgeOptions::default(),
            )
            .await
            .map(|n| n as usize)
            .map_err(|e| Error::amqp(format!("queue.purge '{}'", session.queue), e));
        session.close().await;
        return result;
    };
    let cutoff =
        wire::now_ms().saturating_sub(i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX));
    let mut held = Held::default();
    let result = async {
        let total = session.count().await?;
        let mut purged = 0;
        for _ in 0..total {
            let Some(delivery) = session.get().await? else {
                break;
            };
            let tag = delivery.delivery_tag;
            let letter = DeadLetter::from_delivery(delivery);
            if letter.dead_at_ms.is_some_and(|at| at < cutoff) {
                session
                    .channel
                    .basic_ack(tag, BasicAckOptions::default())
                    .await
                    .map_err(|e| {
                        Error::amqp(format!("basic.ack (purge) in '{}'", session.queue), e)
                    })?;
                purged += 1;
            } else {
                held.hold(tag);
            }
        }
        Ok(purged)
    }
    .await;
    session.finish(held, result).await
}

/// The properties of a replayed copy (see [`replay`]).
fn replay_properties(letter: &DeadLetter, only_handler: Option<&str>) -> BasicProperties {
    let mut map: BTreeMap<ShortString, AMQPValue> = letter.headers.inner().clone();
    for name in [
        headers::DEAD_REASON,
        headers::FAILED_HANDLER,
        headers::DEAD_AT,
        headers::LAST_ERROR,
        X_DELIVERY_COUNT,
    ] {
        map.remove(name);
    }
    map.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(1));
    map.insert(
        headers::REPLAYS.into(),
        AMQPValue::LongLongInt(i64::from(letter.replays) + 1),
    );
    let handlers: Vec<String> = match only_handler {
        Some(h) => vec![h.to_owned()],
        None => letter.handlers.clone(),
    };
    if handlers.is_empty() {
        map.remove(headers::HANDLERS);
    } else {
        map.insert(headers::HANDLERS.into(), wire::string_array(&handlers));
    }
    if !map.contains_key(headers::EVENT_TYPE) && !letter.event_type.is_empty() {
        map.insert(
            headers::EVENT_TYPE.into(),
            wire::long_string(&letter.event_type),
        );
    }
    letter
        .properties
        .clone()
        .with_message_id(wire::short_string_lossy(&letter.message_id))
        .with_delivery_mode(2)
        .with_headers(FieldTable::from(map))
}

// ---------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------

/// A table of dead letters, one line each: id, event, reason, handler,
/// attempts, last error (first 60 characters, on one line) and age.
/// An empty slice gives `no dead letters`.
pub fn render_table(letters: &[DeadLetter]) -> String {
    if letters.is_empty() {
        return "no dead letters\n".into();
    }
    let now = wire::now_ms();
    let header = [
        "ID",
        "EVENT",
        "REASON",
        "HANDLER",
        "ATTEMPTS",
        "LAST ERROR",
        "AGE",
    ];
    let rows: Vec<[String; 7]> = letters
        .iter()
        .map(|l| {
            let handler = match (&l.failed_handler, l.handlers.len()) {
                (Some(h), n) if n > 1 => format!("{h} (+{})", n - 1),
                (Some(h), _) => h.clone(),
                (None, 0) => "-".into(),
                (None, _) => l.handlers.join(","),
            };
            [
                l.message_id.clone(),
                or_dash(&l.event_type),
                or_dash(l.reason.as_deref().unwrap_or("")),
                handler,
                l.attempts.map_or("-".into(), |n| n.to_string()),
                or_dash(&one_line(
                    l.last_error.as_deref().unwrap_or(""),
                    TABLE_ERROR_WIDTH,
                )),
                l.age(now).map_or("-".into(), format_age),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// Everything about one dead letter: the fields burrow reads, every
/// property and header, and the body (pretty-printed when it is JSON).
pub fn render_detail(letter: &DeadLetter) -> String {
    let now = wire::now_ms();
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(out, "{name:<15} {value}");
    };
    field("message id", letter.message_id.clone());
    field("event", or_dash(&letter.event_type));
    field("reason", or_dash(letter.reason.as_deref().unwrap_or("")));
    field(
        "failed handler",
        or_dash(letter.failed_handler.as_deref().unwrap_or("")),
    );
    field(
        "handlers",
        if letter.handlers.is_empty() {
            "(none recorded: a replay runs every subscribed handler)".into()
        } else {
            letter.handlers.join(", ")
        },
    );
    field(
        "attempts",
        letter.attempts.map_or("-".into(), |n| n.to_string()),
    );
    field("replays", letter.replays.to_string());
    field(
        "first failure",
        letter
            .first_failure_at_ms
            .map_or("-".into(), |ms| format_time(ms, now)),
    );
    field(
        "dead at",
        letter
            .dead_at_ms
            .map_or("-".into(), |ms| format_time(ms, now)),
    );
    field("routing key", letter.routing_key.clone());
    match letter.last_error.as_deref() {
        Some(error) if !error.is_empty() => {
            out.push_str("last error:\n");
            for l in error.lines() {
                let _ = writeln!(out, "  {l}");
            }
        }
        _ => field("last error", "-".into()),
    }

    out.push_str("properties:\n");
    let p = &letter.properties;
    let mut prop = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            let _ = writeln!(out, "  {name} = {v}");
        }
    };
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| format!("{:?}", s.as_str()));
    prop("content_type", s(p.content_type()));
    prop("content_encoding", s(p.content_encoding()));
    prop("delivery_mode", p.delivery_mode().map(|m| m.to_string()));
    prop("priority", p.priority().map(|m| m.to_string()));
    prop("correlation_id", s(p.correlation_id()));
    prop("reply_to", s(p.reply_to()));
    prop("expiration", s(p.expiration()));
    prop("message_id", s(p.message_id()));
    prop(
        "timestamp",
        p.timestamp()
            .map(|t| render_value(&AMQPValue::Timestamp(t))),
    );
    prop("type", s(p.kind()));
    prop("user_id", s(p.user_id()));
    prop("app_id", s(p.app_id()));
    prop("cluster_id", s(p.cluster_id()));

    if letter.headers.inner().is_empty() {
        out.push_str("headers: none\n");
    } else {
        out.push_str("headers:\n");
        for (k, v) in &letter.headers {
            let _ = writeln!(out, "  {} = {}", k.as_str(), render_value(v));
        }
    }

    let len = letter.body.len();
    match serde_json::from_slice::<serde_json::Value>(&letter.body) {
        Ok(json) => {
            let pretty = serde_json::to_string_pretty(&json).unwrap_or_default();
            let _ = writeln!(out, "body ({len} bytes, JSON):\n{pretty}");
        }
        Err(_) => match std::str::from_utf8(&letter.body) {
            Ok(text) => {
                let _ = writeln!(out, "body ({len} bytes, not JSON; as text):\n{text}");
            }
            Err(_) => {
                let shown = &letter.body[..len.min(64)];
                let hex: String = shown.iter().map(|b| format!("{b:02x}")).collect();
                let _ = writeln!(
                    out,
                    "body ({len} bytes, not JSON and not UTF-8; lossy text below; first {} bytes as hex: {hex}):\n{}",
                    shown.len(),
                    printable(&String::from_utf8_lossy(&letter.body))
                );
            }
        },
    }
    out
}

/// `text` with control characters other than line breaks and tabs shown as `.`.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '.'
            } else {
                c
            }
        })
        .collect()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

/// `text` on one line (line breaks become `; `), cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let flat: String = joined
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// An age rounded to what is worth reading: seconds under an hour, minutes
/// under a day, hours beyond.
fn format_age(age: Duration) -> String {
    let secs = age.as_secs();
    let rounded = if secs >= 86_400 {
        secs / 3600 * 3600
    } else if secs >= 3600 {
        secs / 60 * 60
    } else {
        secs
    };
    humantime::format_duration(Duration::from_secs(rounded)).to_string()
}

/// `2024-05-01T10:00:00.000Z (3m 2s ago)`.
fn format_time(ms: i64, now_ms: i64) -> String {
    let at = chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms} ms"));
    let ago = format_age(Duration::from_millis(
        u64::try_from(now_ms - ms).unwrap_or(0),
    ));
    format!("{at} ({ago} ago)")
}

/// A header value as text.
fn render_value(value: &AMQPValue) -> String {
    match value {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::DecimalValue(d) => {
            format!("{}e-{}", d.value, d.scale)
        }
        AMQPValue::ShortString(s) => format!("{:?}", s.as_str()),
        AMQPValue::LongString(s) => format!("{:?}", String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(items) => format!(
            "[{}]",
            items
                .as_slice()
                .iter()
                .map(render_value)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        AMQPValue::Timestamp(secs) => {
            let at = i64::try_from(*secs)
                .ok()
                .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            match at {
                Some(at) => format!("{secs} ({at})"),
                None => secs.to_string(),
            }
        }
        AMQPValue::FieldTable(table) => format!(
            "{{{}}}",
            table
                .into_iter()
                .map(|(k, v)| format!("{}: {}", k.as_str(), render_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        AMQPValue::ByteArray(bytes) => format!("<{} bytes>", bytes.len()),
        AMQPValue::Void => "void".into(),
    }
}

// ---------------------------------------------------------------------------
// Lenient header reading
// ---------------------------------------------------------------------------

fn header_string(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn header_int(headers: &FieldTable, name: &str) -> Option<i64> {
    Some(match headers.inner().get(name)? {
        AMQPValue::ShortShortInt(n) => i64::from(*n),
        AMQPValue::ShortShortUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok()?,
        _ => return None,
    })
}

fn header_strings(headers: &FieldTable, name: &str) -> Vec<String> {
    match headers.inner().get(name) {
        Some(AMQPValue::FieldArray(items)) => items
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                AMQPValue::ShortString(s) => Some(s.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The `x-death` entries, most recent first.
fn x_death_entries(headers: &FieldTable) -> Vec<&FieldTable> {
    match headers.inner().get(X_DEATH) {
        Some(AMQPValue::FieldArray(items)) => items
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::FieldTable(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The routing key a broker-dead-lettered message was first published with
/// to a named exchange (the event type), from its oldest `x-death` entry
/// that names one.
fn first_published_routing_key(headers: &FieldTable) -> Option<String> {
    x_death_entries(headers).into_iter().rev().find_map(|d| {
        let exchange = header_string(d, "exchange")?;
        if exchange.is_empty() {
            return None;
        }
        header_strings(d, "routing-keys").into_iter().next()
    })
}

// ---------------------------------------------------------------------------
// The AMQP side
// ---------------------------------------------------------------------------

/// A connection and channel on the dead-letter queue.
struct Session {
    conn: Connection,
    channel: Channel,
    queue: String,
}

/// The highest delivery tag held unacknowledged, to return them all at once.
#[derive(Default)]
struct Held(Option<u64>);

impl Held {
    fn hold(&mut self, tag: u64) {
        self.0 = Some(self.0.map_or(tag, |t| t.max(tag)));
    }
}

impl Session {
    async fn open(settings: &Settings) -> Result<Self> {
        let conn = connection::open(
            &settings.amqp,
            &format!("burrow dlq ({})", settings.app.name),
        )
        .await?;
        let channel = match conn.create_channel().await {
            Ok(channel) => channel,
            Err(e) => {
                let _ = conn.close(200, "burrow dlq done".into()).await;
                return Err(Error::amqp("channel.open (dlq)", e));
            }
        };
        Ok(Self {
            conn,
            channel,
            queue: settings.dead_letter_queue(),
        })
    }

    /// Ready messages in the queue (passive declare).
    async fn count(&self) -> Result<u32> {
        self.channel
            .queue_declare(
                wire::short_string("queue name", &self.queue)?,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
            .map_err(|e| {
                Error::amqp(
                    format!(
                        "queue.declare (passive) of dead-letter queue '{}' (if it does not exist, \
                         start the app's worker or run `burrow topology apply` first)",
                        self.queue
                    ),
                    e,
                )
            })
    }

    /// The next message, held unacknowledged.
    async fn get(&self) -> Result<Option<Delivery>> {
        self.channel
            .basic_get(
                wire::short_string("queue name", &self.queue)?,
                BasicGetOptions { no_ack: false },
            )
            .await
            .map(|m| m.map(|m| m.delivery))
            .map_err(|e| Error::amqp(format!("basic.get from '{}'", self.queue), e))
    }

    /// Returns every held message to the queue, closes, and hands back
    /// `result` (or the requeue's error when `result` was fine).
    async fn finish<T>(self, held: Held, result: Result<T>) -> Result<T> {
        let mut requeued = Ok(());
        if let Some(tag) = held.0
            && self.channel.status().connected()
        {
            requeued = self
                .channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(|e| {
                    Error::amqp(
                        format!(
                            "basic.nack (return browsed letters to '{}'; closing the connection returns them anyway)",
                            self.queue
                        ),
                        e,
                    )
                });
        }
        self.close().await;
        let value = result?;
        requeued?;
        Ok(value)
    }

    async fn close(self) {
        if self.channel.status().connected() {
            let _ = self.channel.close(200, "burrow dlq done".into()).await;
        }
        if self.conn.status().connected() {
            let _ = self.conn.close(200, "burrow dlq done".into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert(k.into(), v);
        }
        t
    }

    fn burrow_letter() -> DeadLetter {
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
            (X_DELIVERY_COUNT, AMQPValue::LongLongInt(4)),
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
            X_DELIVERY_COUNT,
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
        assert_eq!(inc.problem, None);
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
        assert!(ReplayFilter::default().matches(&l));
        let f = |event: Option<&str>, handler: Option<&str>| ReplayFilter {
            event: event.map(str::to_owned),
            handler: handler.map(str::to_owned),
            limit: None,
        };
        assert!(f(Some("CardAddedToLibraryEvent"), None).matches(&l));
        assert!(f(Some("#"), Some("search.index")).matches(&l));
        assert!(!f(Some("CollectionCreatedEvent"), None).matches(&l));
        assert!(!f(None, Some("billing.charge")).matches(&l));
        let none = DeadLetter::read("q", BasicProperties::default(), Vec::new());
        assert!(!f(None, Some("search.index")).matches(&none));
    }

    #[test]
    fn renders_a_table_and_a_detail() {
        let l = burrow_letter();
        let table = render_table(std::slice::from_ref(&l));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID"), "{table}");
        assert!(lines[0].contains("LAST ERROR") && lines[0].ends_with("AGE"));
        assert!(lines[1].contains("m-1") && lines[1].contains("permanent"));
        assert!(lines[1].contains("library.attach (+1)"), "{table}");
        assert!(
            lines[1].contains("library.attach: gone; search.index: no"),
            "{table}"
        );
        assert_eq!(render_table(&[]), "no dead letters\n");

        let detail = render_detail(&l);
        assert!(detail.contains("\"aggregateId\": \"a-1\""), "{detail}");
        assert!(
            detail.contains("burrow-dead-reason = \"permanent\""),
            "{detail}"
        );
        assert!(detail.contains("2023-11-14T22:13:20.000Z"), "{detail}");
        assert!(detail.contains("  search.index: no"), "{detail}");

        let binary = DeadLetter::read("q", BasicProperties::default(), vec![0xff, 0x00, 0x41]);
        let detail = render_detail(&binary);
        assert!(
            detail.contains("not UTF-8") && detail.contains("ff0041"),
            "{detail}"
        );
    }

    #[test]
    fn long_errors_fit_one_line() {
        let long = format!("a: {}\nb: x", "e".repeat(100));
        let cut = one_line(&long, 60);
        assert_eq!(cut.chars().count(), 60);
        assert!(cut.ends_with('…') && !cut.contains('\n'));
        assert_eq!(
            format_age(Duration::from_secs(3 * 86_400 + 3700)),
            "3days 1h"
        );
        assert_eq!(format_age(Duration::from_secs(3725)), "1h 2m");
        assert_eq!(format_age(Duration::from_secs(62)), "1m 2s");
    }
}
