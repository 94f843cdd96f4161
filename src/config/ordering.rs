//! `[ordering]`: events of one aggregate handled in the order published, in
//! parallel across aggregates (see `consumer::ordered`).

use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Most shards an app may have: each is a queue with one active consumer.
const MAX_SHARDS: u16 = 256;

/// The longest the retry delays may add up to in an ordered app: a failing
/// event is retried in the worker, unacked, and RabbitMQ's default
/// `consumer_timeout` (30 minutes) closes the channel of a delivery held
/// longer.
const MAX_HOLD: Duration = Duration::from_secs(25 * 60);

/// `[ordering]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrderingSettings {
    /// Shard queues to spread the aggregates over; `0` (the default) turns
    /// ordering off. Each shard is consumed by one instance at a time, so
    /// more shards than instances lets every instance work.
    pub shards: u16,
}

impl OrderingSettings {
    /// Whether the app handles each aggregate's events in order.
    pub fn enabled(&self) -> bool {
        self.shards > 0
    }

    pub(super) fn validate(&self, retry_delays: &[Duration]) -> Result<()> {
        if self.shards > MAX_SHARDS {
            return Err(Error::config(
                "ordering.shards",
                format!(
                    "ordering.shards = {} is too many; use 1 to {MAX_SHARDS} (a few per instance is plenty)",
                    self.shards
                ),
            ));
        }
        let hold: Duration = retry_delays.iter().sum();
        if self.enabled() && hold > MAX_HOLD {
            return Err(Error::config(
                "retry.delays",
                format!(
                    "retry.delays add up to {} with ordering on; an ordered app retries in the worker, holding the \
                     delivery unacked, and RabbitMQ closes a channel that holds one past its consumer_timeout \
                     (30 min by default). Keep the delays under {} in all, e.g. [\"1s\", \"10s\", \"1m\", \"5m\"]",
                    humantime::format_duration(hold),
                    humantime::format_duration(MAX_HOLD)
                ),
            ));
        }
        Ok(())
    }
}
