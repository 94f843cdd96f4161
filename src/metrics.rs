//! Prometheus metrics (prometheus-client), served at `GET /metrics`.
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `burrow_deliveries_total` | queue, event | deliveries received |
//! | `burrow_handler_runs_total` | handler, event, outcome | handler runs; outcome = ok, retry, dead |
//! | `burrow_handler_duration_seconds` | handler, event | handler run time |
//! | `burrow_retries_total` | queue, step | copies moved to a retry step |
//! | `burrow_dead_letters_total` | queue, reason | copies moved to the dead-letter queue |
//! | `burrow_publishes_total` | event, outcome | publishes; outcome = confirmed, returned, nacked, failed |
//! | `burrow_publish_confirm_seconds` | | publish → confirm time |
//! | `burrow_in_flight` | | deliveries received and not yet settled |
//! | `burrow_connected` | | 1 while the worker consumes, else 0 |
//! | `burrow_outbox_pending` | | outbox events not yet published (feature `postgres`) |
//! | `burrow_outbox_lag_seconds` | | age of the oldest pending outbox event, 0 when none |
//! | `burrow_outbox_relayed_total` | event, outcome | outbox publishes; outcome = published, failed |
//! | `burrow_outbox_relay_delay_seconds` | | outbox enqueue → broker confirm time |
//!
//! Label values come from the registry (handler names), the settings
//! (queues) and bound event types; no label ever carries message content.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueEvent {
    queue: String,
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerOutcome {
    handler: String,
    event: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerEvent {
    handler: String,
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueStep {
    queue: String,
    step: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueReason {
    queue: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventOutcome {
    event: String,
    outcome: &'static str,
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

/// How a publish ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Confirmed by the broker.
    Confirmed,
    /// Returned as unroutable.
    Returned,
    /// Nacked by the broker.
    Nacked,
    /// No confirm: connection lost or timed out.
    Failed,
}

/// burrow's metrics. Cheap to clone; all clones update the same values.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    deliveries: Family<QueueEvent, Counter>,
    handler_runs: Family<HandlerOutcome, Counter>,
    handler_duration: Family<HandlerEvent, Histogram>,
    retries: Family<QueueStep, Counter>,
    dead_letters: Family<QueueReason, Counter>,
    publishes: Family<EventOutcome, Counter>,
    confirm_seconds: Histogram,
    in_flight: Gauge,
    connected: Gauge,
    last_settled_ms: Arc<AtomicI64>,
    outbox_pending: Gauge,
    outbox_lag_seconds: Gauge<f64, AtomicU64>,
    outbox_relayed: Family<EventOutcome, Counter>,
    outbox_relay_delay: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("in_flight", &self.in_flight.get())
            .field("connected", &self.connected.get())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn duration_histogram() -> Histogram {
    // 1 ms .. ~16 s
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    /// A fresh set of metrics in its own registry.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let deliveries = Family::<QueueEvent, Counter>::default();
        let handler_runs = Family::<HandlerOutcome, Counter>::default();
        let handler_duration = Family::<HandlerEvent, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let retries = Family::<QueueStep, Counter>::default();
        let dead_letters = Family::<QueueReason, Counter>::default();
        let publishes = Family::<EventOutcome, Counter>::default();
        let confirm_seconds = duration_histogram();
        let in_flight = Gauge::default();
        let connected = Gauge::default();
        let outbox_pending = Gauge::default();
        let outbox_lag_seconds = Gauge::<f64, AtomicU64>::default();
        let outbox_relayed = Family::<EventOutcome, Counter>::default();
        let outbox_relay_delay = duration_histogram();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "burrow_deliveries",
            "Deliveries received",
            deliveries.clone(),
        );
        registry.register(
            "burrow_handler_runs",
            "Handler runs by outcome (ok, retry, dead)",
            handler_runs.clone(),
        );
        registry.register(
            "burrow_handler_duration_seconds",
            "Handler run time",
            handler_duration.clone(),
        );
        registry.register(
            "burrow_retries",
            "Copies moved to a retry step",
            retries.clone(),
        );
        registry.register(
            "burrow_dead_letters",
            "Copies moved to the dead-letter queue",
            dead_letters.clone(),
        );
        registry.register(
            "burrow_publishes",
            "Publishes by outcome (confirmed, returned, nacked, failed)",
            publishes.clone(),
        );
        registry.register(
            "burrow_publish_confirm_seconds",
            "Time from publish to broker confirm",
            confirm_seconds.clone(),
        );
        registry.register(
            "burrow_in_flight",
            "Deliveries received and not yet settled",
            in_flight.clone(),
        );
        registry.register(
            "burrow_connected",
            "1 while the worker is consuming",
            connected.clone(),
        );
        registry.register(
            "burrow_outbox_pending",
            "Outbox events not yet published",
            outbox_pending.clone(),
        );
        registry.register(
            "burrow_outbox_lag_seconds",
            "Age of the oldest pending outbox event (0 when none)",
            outbox_lag_seconds.clone(),
        );
        registry.register(
            "burrow_outbox_relayed",
            "Outbox publishes by outcome (published, failed)",
            outbox_relayed.clone(),
        );
        registry.register(
            "burrow_outbox_relay_delay_seconds",
            "Time from outbox enqueue to broker confirm",
            outbox_relay_delay.clone(),
        );
        Self {
            registry: Arc::new(registry),
            deliveries,
            handler_runs,
            handler_duration,
            retries,
            dead_letters,
            publishes,
            confirm_seconds,
            in_flight,
            connected,
            last_settled_ms: Arc::new(AtomicI64::new(now_ms())),
            outbox_pending,
            outbox_lag_seconds,
            outbox_relayed,
            outbox_relay_delay,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    pub(crate) fn delivery_received(&self, queue: &str, event: &str) {
        self.deliveries
            .get_or_create(&QueueEvent {
                queue: queue.to_owned(),
                event: event.to_owned(),
            })
            .inc();
    }

    pub(crate) fn handler_ran(
        &self,
        handler: &str,
        event: &str,
        outcome: RunOutcome,
        seconds: f64,
    ) {
        let outcome = match outcome {
            RunOutcome::Ok => "ok",
            RunOutcome::Retry => "retry",
            RunOutcome::Dead => "dead",
        };
        self.handler_runs
            .get_or_create(&HandlerOutcome {
                handler: handler.to_owned(),
                event: event.to_owned(),
                outcome,
            })
            .inc();
        self.handler_duration
            .get_or_create(&HandlerEvent {
                handler: handler.to_owned(),
                event: event.to_owned(),
            })
            .observe(seconds);
    }

    pub(crate) fn retried(&self, queue: &str, step: u32) {
        self.retries
            .get_or_create(&QueueStep {
                queue: queue.to_owned(),
                step,
            })
            .inc();
    }

    pub(crate) fn dead_lettered(&self, queue: &str, reason: &'static str) {
        self.dead_letters
            .get_or_create(&QueueReason {
                queue: queue.to_owned(),
                reason,
            })
            .inc();
    }

    pub(crate) fn published(&self, event: &str, outcome: PublishOutcome, seconds: Option<f64>) {
        let outcome = match outcome {
            PublishOutcome::Confirmed => "confirmed",
            PublishOutcome::Returned => "returned",
            PublishOutcome::Nacked => "nacked",
            PublishOutcome::Failed => "failed",
        };
        self.publishes
            .get_or_create(&EventOutcome {
                event: event.to_owned(),
                outcome,
            })
            .inc();
        if let Some(s) = seconds {
            self.confirm_seconds.observe(s);
        }
    }

    /// Records the outbox backlog: pending events and the age of the oldest.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn outbox_backlog(&self, pending: i64, lag_seconds: f64) {
        self.outbox_pending.set(pending);
        self.outbox_lag_seconds.set(lag_seconds);
    }

    /// Records one outbox publish; `delay_seconds` (enqueue → confirm) when published.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn outbox_relayed(&self, event: &str, published: bool, delay_seconds: Option<f64>) {
        self.outbox_relayed
            .get_or_create(&EventOutcome {
                event: event.to_owned(),
                outcome: if published { "published" } else { "failed" },
            })
            .inc();
        if let Some(s) = delay_seconds {
            self.outbox_relay_delay.observe(s);
        }
    }

    /// Outbox events not yet published, as of the relay's last look.
    pub fn outbox_pending(&self) -> i64 {
        self.outbox_pending.get()
    }

    pub(crate) fn delivery_started(&self) {
        self.in_flight.inc();
    }

    pub(crate) fn delivery_settled(&self) {
        self.in_flight.dec();
        self.last_settled_ms.store(now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.set(i64::from(connected));
    }

    /// Deliveries received and not yet settled.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// Whether the worker is consuming.
    pub fn connected(&self) -> bool {
        self.connected.get() == 1
    }

    /// Milliseconds since the last settlement (or since start).
    pub fn millis_since_last_settlement(&self) -> i64 {
        now_ms().saturating_sub(self.last_settled_ms.load(Ordering::Relaxed))
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let m = Metrics::new();
        m.delivery_received("events_a", "CardAddedToLibraryEvent");
        m.handler_ran(
            "feeds.add",
            "CardAddedToLibraryEvent",
            RunOutcome::Retry,
            0.01,
        );
        m.retried("events_a", 1);
        m.dead_lettered("events_a", "permanent");
        m.published("CardAddedToLibraryEvent", PublishOutcome::Returned, None);
        m.set_connected(true);
        m.outbox_backlog(3, 1.5);
        m.outbox_relayed("CardAddedToLibraryEvent", true, Some(0.004));
        let text = m.render();
        for needle in [
            r#"burrow_deliveries_total{queue="events_a",event="CardAddedToLibraryEvent"} 1"#,
            r#"burrow_handler_runs_total{handler="feeds.add",event="CardAddedToLibraryEvent",outcome="retry"} 1"#,
            r#"burrow_retries_total{queue="events_a",step="1"} 1"#,
            r#"burrow_dead_letters_total{queue="events_a",reason="permanent"} 1"#,
            r#"burrow_publishes_total{event="CardAddedToLibraryEvent",outcome="returned"} 1"#,
            "burrow_handler_duration_seconds_bucket",
            "burrow_publish_confirm_seconds_count 0",
            "burrow_in_flight 0",
            "burrow_connected 1",
            "burrow_outbox_pending 3",
            "burrow_outbox_lag_seconds 1.5",
            r#"burrow_outbox_relayed_total{event="CardAddedToLibraryEvent",outcome="published"} 1"#,
            "burrow_outbox_relay_delay_seconds_count 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
