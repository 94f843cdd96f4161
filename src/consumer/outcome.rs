//! What a worker reports: its state, how each delivery ended, how a run ended.

use super::pipeline::{Processed, Settlement};
use crate::wire::DeadReason;

/// The worker's lifecycle, observable through [`crate::WorkerHandle::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Connecting and declaring the topology.
    Starting,
    /// Consuming the app queue.
    Consuming,
    /// The broker was lost; waiting to reconnect.
    Reconnecting,
    /// A shutdown signal arrived; in-flight deliveries are finishing.
    Draining,
    /// Stopped.
    Stopped,
}

/// A delivery's copy went to a retry step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retried {
    /// The retry step (1 is the first).
    pub step: u32,
    /// The handlers that failed transiently and run again from there.
    pub handlers: Vec<String>,
}

/// A delivery's copy went to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLettered {
    /// Why.
    pub reason: DeadReason,
    /// The handlers that failed for good (empty when none ran).
    pub handlers: Vec<String>,
}

/// How one delivery ended, broadcast to [`crate::WorkerHandle::outcomes`] subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The message id (publisher's or derived).
    pub message_id: String,
    /// The event type.
    pub event_type: String,
    /// The attempt this delivery was.
    pub attempt: u32,
    /// Handlers that succeeded on this delivery.
    pub succeeded: Vec<String>,
    /// Set when a copy went to a retry step.
    pub retried: Option<Retried>,
    /// Set when a copy went to the dead-letter queue.
    pub dead_lettered: Option<DeadLettered>,
    /// Whether nothing in the app handles the event type.
    pub ignored: bool,
    /// Whether the ack frame was sent. `false` means the delivery will come
    /// back (a copy failed to confirm, or the channel closed first).
    pub acked: bool,
}

impl Outcome {
    /// The outcome of `processed`, acked or not.
    pub(crate) fn of(processed: &Processed, acked: bool) -> Self {
        let s = &processed.settlement;
        Outcome {
            message_id: processed.incoming.message_id.clone(),
            event_type: processed.incoming.event_type.clone(),
            attempt: processed.incoming.attempt,
            succeeded: processed
                .runs
                .iter()
                .filter(|r| r.result.is_ok())
                .map(|r| r.handler.to_string())
                .collect(),
            retried: s.retry().map(|r| Retried {
                step: r.step.number,
                handlers: r.handlers.clone(),
            }),
            dead_lettered: s.dead_letter().map(|d| DeadLettered {
                reason: d.reason,
                handlers: d.handlers.clone(),
            }),
            ignored: matches!(s, Settlement::Ignore { .. }),
            acked,
        }
    }
}

/// What [`crate::Worker::run`] reports when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    /// Deliveries settled during the run.
    pub settled: u64,
    /// Handlers still running when `consumer.shutdown_timeout` expired; their
    /// deliveries were not acked and will be redelivered.
    pub abandoned: usize,
}
