//! The retry ladder: one delay queue per step.
//!
//! A message whose handler failed transiently on attempt `n` is copied (with
//! a publisher confirm) into step `n`'s queue, then acked. The step queue has
//! no consumer; its `x-message-ttl` holds the message for the step's delay,
//! then RabbitMQ dead-letters it through the default exchange straight to the
//! app's own queue. Routing by queue name rather than back through the
//! `domain_events` exchange is what keeps a retry in app A from being
//! delivered again to app B, which is bound to the same event type.
//!
//! The delay is part of the queue name (`events_library.retry.2.10s`): a
//! queue's TTL cannot change after it is declared, so a new delay gets a new
//! queue instead of a PRECONDITION_FAILED at start-up.

use std::time::Duration;

/// One step of the ladder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryStep {
    /// 1-based step number: step `n` holds messages that failed attempt `n`.
    pub number: u32,
    /// How long a message waits in this step.
    pub delay: Duration,
    /// The step's queue, `<app queue>.retry.<number>.<delay>`.
    pub queue: String,
}

/// The ladder of an app: where a failed attempt goes next.
///
/// ```
/// use std::time::Duration;
/// use burrow::RetryLadder;
///
/// let ladder = RetryLadder::new("events_library", &[Duration::from_secs(1), Duration::from_secs(10)]);
/// assert_eq!(ladder.after_attempt(1).unwrap().queue, "events_library.retry.1.1s");
/// assert_eq!(ladder.after_attempt(2).unwrap().delay, Duration::from_secs(10));
/// assert!(ladder.after_attempt(3).is_none()); // exhausted: dead-letter
/// assert_eq!(ladder.max_attempts(), 3);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryLadder {
    steps: Vec<RetryStep>,
}

impl RetryLadder {
    /// Builds the ladder of `app_queue` from its delays.
    pub fn new(app_queue: &str, delays: &[Duration]) -> Self {
        let steps = delays
            .iter()
            .enumerate()
            .map(|(i, delay)| {
                let number = i as u32 + 1;
                let label = humantime::format_duration(*delay)
                    .to_string()
                    .replace(' ', "");
                RetryStep {
                    number,
                    delay: *delay,
                    queue: format!("{app_queue}.retry.{number}.{label}"),
                }
            })
            .collect();
        Self { steps }
    }

    /// The step a message goes to after failing `attempt` (1-based), or
    /// `None` when the ladder is exhausted.
    pub fn after_attempt(&self, attempt: u32) -> Option<&RetryStep> {
        let index = usize::try_from(attempt.checked_sub(1)?).ok()?;
        self.steps.get(index)
    }

    /// All steps in order.
    pub fn steps(&self) -> &[RetryStep] {
        &self.steps
    }

    /// Attempts a message gets before it is dead-lettered: steps + 1.
    pub fn max_attempts(&self) -> u32 {
        self.steps.len() as u32 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compound_delays_make_names_without_spaces() {
        let ladder = RetryLadder::new("q", &[Duration::from_millis(1500), Duration::from_secs(90)]);
        assert_eq!(ladder.steps()[0].queue, "q.retry.1.1s500ms");
        assert_eq!(ladder.steps()[1].queue, "q.retry.2.1m30s");
    }

    #[test]
    fn attempt_zero_and_empty_ladders_have_no_step() {
        let ladder = RetryLadder::new("q", &[]);
        assert!(ladder.after_attempt(1).is_none());
        assert!(ladder.after_attempt(0).is_none());
        assert_eq!(ladder.max_attempts(), 1);
    }
}
