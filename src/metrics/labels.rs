//! The label sets of burrow's metric families, and what a worker knows of
//! them at start.

use prometheus_client::encoding::EncodeLabelSet;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct QueueEvent {
    pub(super) queue: String,
    pub(super) event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct QueueLabel {
    pub(super) queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct HandlerOutcome {
    pub(super) handler: String,
    pub(super) event: String,
    pub(super) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct HandlerLabel {
    pub(super) handler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct HandlerEvent {
    pub(super) handler: String,
    pub(super) event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct QueueStep {
    pub(super) queue: String,
    pub(super) step: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct QueueReason {
    pub(super) queue: String,
    pub(super) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct EventOutcome {
    pub(super) event: String,
    pub(super) outcome: &'static str,
}

/// How a handler run ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Succeeded.
    Ok,
    /// Failed and went to a retry step.
    Retry,
    /// Failed and went to the dead-letter queue.
    Dead,
}

impl RunOutcome {
    /// Every outcome, for creating the series at start.
    pub const ALL: [RunOutcome; 3] = [RunOutcome::Ok, RunOutcome::Retry, RunOutcome::Dead];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Ok => "ok",
            RunOutcome::Retry => "retry",
            RunOutcome::Dead => "dead",
        }
    }
}

/// How a publish ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PublishOutcome {
    /// Confirmed by the broker.
    Confirmed,
    /// Returned as unroutable.
    Returned,
    /// Nacked by the broker.
    Nacked,
    /// No confirm: connection lost or timed out.
    Failed,
}

impl PublishOutcome {
    /// Every outcome, for creating the series at start.
    pub(crate) const ALL: [PublishOutcome; 4] = [
        PublishOutcome::Confirmed,
        PublishOutcome::Returned,
        PublishOutcome::Nacked,
        PublishOutcome::Failed,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PublishOutcome::Confirmed => "confirmed",
            PublishOutcome::Returned => "returned",
            PublishOutcome::Nacked => "nacked",
            PublishOutcome::Failed => "failed",
        }
    }
}

/// The `event` label of anything outside the app's subscribed event types.
pub(crate) const OTHER_EVENT: &str = "other";

/// What a worker's metrics know at start: the labels of every series to
/// create at 0, and the only event types that may appear as a label.
#[derive(Debug, Clone, Default)]
pub(crate) struct AppLabels {
    /// The app queue.
    pub queue: String,
    /// The event types the app subscribes to.
    pub events: Vec<String>,
    /// Each handler's name and the event type it decodes.
    pub handlers: Vec<(String, String)>,
    /// The retry steps' numbers.
    pub steps: Vec<u32>,
    /// Every dead-letter reason's label value.
    pub reasons: Vec<&'static str>,
    /// The app's queues: the app queue, each retry step, the dead-letter queue.
    pub queues: Vec<String>,
}
