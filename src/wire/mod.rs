//! The wire contract in code (docs/wire-contract.md): the header names,
//! why a message is dead-lettered, reading what arrives and building what
//! burrow publishes.
//!
//! | file | job |
//! |---|---|
//! | `read.rs` | [`Incoming`]: the metadata of one delivery, read leniently; the lenient header readers |
//! | `write.rs` | the properties of every message burrow publishes: new events, retry, dead-letter and replay copies |
//! | `budget.rs` | [`HeaderBudget`]: how large and deep headers may be, and fitting copies into it |

mod budget;
mod read;
mod write;

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

pub use self::{
    budget::{DEFAULT_FRAME_MAX, HeaderBudget, table_size, value_size},
    read::{Incoming, derive_message_id},
};
pub(crate) use self::{read::*, write::*};

/// Header names burrow reads and writes. All are prefixed `burrow-`.
pub mod headers {
    /// The id of the message or command that caused the event (string).
    pub const CAUSATION_ID: &str = "burrow-causation-id";
    /// The event's schema version (integer).
    pub const EVENT_VERSION: &str = "burrow-event-version";
    /// The id of the aggregate that raised the event (string). Apps with
    /// `[ordering]` shard on it; burrow's publisher always sends it.
    pub const AGGREGATE_ID: &str = "burrow-aggregate-id";
    /// The original routing key (event type) on retry and dead-letter copies,
    /// which travel through the default exchange (string).
    pub const EVENT_TYPE: &str = "burrow-event-type";
    /// Which delivery attempt this copy is, starting at 1 (integer).
    pub const ATTEMPT: &str = "burrow-attempt";
    /// The handlers that still have to run on this copy (array of strings).
    /// Absent: every handler subscribed to the event type.
    pub const HANDLERS: &str = "burrow-handlers";
    /// When the first handler failure happened, Unix milliseconds (integer).
    pub const FIRST_FAILURE_AT: &str = "burrow-first-failure-at";
    /// The last error of each failed handler, `handler: error` lines (string).
    pub const LAST_ERROR: &str = "burrow-last-error";
    /// Why a copy was dead-lettered (string, see [`crate::DeadReason`]).
    pub const DEAD_REASON: &str = "burrow-dead-reason";
    /// The first handler that failed for good (string).
    pub const FAILED_HANDLER: &str = "burrow-failed-handler";
    /// When the copy was dead-lettered, Unix milliseconds (integer).
    pub const DEAD_AT: &str = "burrow-dead-at";
    /// How many times a dead letter was replayed (integer).
    pub const REPLAYS: &str = "burrow-replays";
    /// On a delayed event: when it was due, Unix milliseconds (integer). For
    /// reading only; the delay queues, not this header, hold the event back.
    pub const DUE_AT: &str = "burrow-due-at";
    /// On a copy whose original headers did not fit the header budget: how
    /// many headers were left out, their size, and their names (string).
    pub const DROPPED_HEADERS: &str = "burrow-dropped-headers";
}

/// Current time as Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a message was dead-lettered; written to the `burrow-dead-reason` header
/// and used as the `reason` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// A handler kept failing transiently until the ladder ran out.
    AttemptsExhausted,
    /// A handler returned [`crate::HandlerError::Permanent`].
    Permanent,
    /// The body is not JSON, or not the shape the handler's event expects.
    Undecodable,
    /// A `burrow-*` header has the wrong type or an impossible value.
    BadHeaders,
    /// The body exceeds `consumer.max_body_bytes`.
    TooLarge,
    /// The headers table exceeds `consumer.max_header_bytes` encoded, or
    /// nests tables and arrays deeper than [`HeaderBudget::MAX_DEPTH`].
    HeadersTooLarge,
    /// The body has a `content_encoding` burrow does not decode (gzip, ...).
    UnsupportedEncoding,
    /// The message names a handler this app does not have (renamed or removed).
    UnknownHandler,
}

impl DeadReason {
    /// Every reason, for creating each `burrow_dead_letters_total` series at start.
    pub const ALL: [DeadReason; 8] = [
        DeadReason::AttemptsExhausted,
        DeadReason::Permanent,
        DeadReason::Undecodable,
        DeadReason::BadHeaders,
        DeadReason::TooLarge,
        DeadReason::HeadersTooLarge,
        DeadReason::UnsupportedEncoding,
        DeadReason::UnknownHandler,
    ];

    /// The header and label value (`attempts_exhausted`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            DeadReason::AttemptsExhausted => "attempts_exhausted",
            DeadReason::Permanent => "permanent",
            DeadReason::Undecodable => "undecodable",
            DeadReason::BadHeaders => "bad_headers",
            DeadReason::TooLarge => "too_large",
            DeadReason::HeadersTooLarge => "headers_too_large",
            DeadReason::UnsupportedEncoding => "unsupported_encoding",
            DeadReason::UnknownHandler => "unknown_handler",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
