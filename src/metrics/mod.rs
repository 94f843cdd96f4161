//! Prometheus metrics (prometheus-client), served at `GET /metrics`.
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `burrow_deliveries_total` | queue, event | deliveries received |
//! | `burrow_ignored_total` | queue | deliveries acked without a handler (no handler of this app subscribes to their type) |
//! | `burrow_handler_runs_total` | handler, event, outcome | handler runs; outcome = ok, retry, dead |
//! | `burrow_handler_duration_seconds` | handler, event | handler run time |
//! | `burrow_handler_permit_wait_seconds` | handler | time a run of a limited handler waited for its permit ([`crate::HandlerLimits`]) |
//! | `burrow_broadcast_dropped_total` | handler | broadcast events a handler still failed after its in-process retries, dropped on this instance |
//! | `burrow_broadcast_gaps_total` | queue | times this instance's broadcast queue was lost with its connection (events published until it was back were missed) |
//! | `burrow_broadcast_gap_seconds_total` | queue | how long those gaps lasted in all |
//! | `burrow_retries_total` | queue, step | copies moved to a retry step |
//! | `burrow_dead_letters_total` | queue, reason | copies moved to the dead-letter queue |
//! | `burrow_ack_frames_total` | queue | `basic.ack` frames sent; one covers every completed delivery before it (`multiple`), so deliveries / frames is how well acks coalesce |
//! | `burrow_publishes_total` | event, outcome | publishes; outcome = confirmed, returned, nacked, failed |
//! | `burrow_publish_confirm_seconds` | | publish → confirm time |
//! | `burrow_in_flight` | | deliveries received and not yet settled |
//! | `burrow_connected` | queue | 1 while the worker of that app queue consumes, else 0 |
//! | `burrow_queue_messages` | queue | ready messages in each of the app's queues (app, retry steps, dead letters), as of the last passive declare |
//! | `burrow_queue_consumers` | queue | consumers of each of the app's queues, likewise |
//! | `burrow_outbox_pending` | | outbox events not yet published (feature `postgres`) |
//! | `burrow_outbox_lag_seconds` | | age of the oldest pending outbox event, 0 when none |
//! | `burrow_outbox_relayed_total` | event, outcome | outbox publishes; outcome = published, failed |
//! | `burrow_outbox_relay_delay_seconds` | | outbox enqueue → broker confirm time |
//!
//! Label values come from the registry (handler names), the settings
//! (queues) and the event types the app subscribes to; any other event type
//! is counted as `other`, so no message a publisher sends can create a
//! series. Every series whose labels are known at start (each subscribed
//! event, handler, outcome, retry step, dead-letter reason and queue) is created
//! at 0 by [`Metrics::for_app`], so dashboards and `rate()`/`absent()`
//! alerts see it from the first scrape. The outbox families exist only in
//! builds with the `postgres` feature.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
};

mod in_flight;
mod labels;
pub(crate) mod queues;
mod series;

pub(crate) use in_flight::InFlight;
use in_flight::now_ms;

pub(crate) use labels::RunOutcome;
pub(crate) use labels::{AppLabels, OTHER_EVENT, PublishOutcome};
use labels::{
    EventOutcome, HandlerEvent, HandlerLabel, HandlerOutcome, QueueEvent, QueueLabel, QueueReason,
    QueueStep,
};
pub(crate) use queues::QueueDepths;
pub(crate) use series::QueueSeries;

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// burrow's metrics. Cheap to clone; all clones update the same values.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// When set, the only event types that appear as labels; others are `other`.
    known_events: Option<Arc<HashSet<String>>>,
    deliveries: Family<QueueEvent, Counter>,
    ignored: Family<QueueLabel, Counter>,
    handler_runs: Family<HandlerOutcome, Counter>,
    handler_duration: Family<HandlerEvent, Histogram>,
    permit_wait: Family<HandlerLabel, Histogram>,
    broadcast_dropped: Family<HandlerLabel, Counter>,
    broadcast_gaps: Family<QueueLabel, Counter>,
    broadcast_gap_seconds: Family<QueueLabel, Counter<f64, AtomicU64>>,
    retries: Family<QueueStep, Counter>,
    dead_letters: Family<QueueReason, Counter>,
    publishes: Family<EventOutcome, Counter>,
    ack_frames: Family<QueueLabel, Counter>,
    confirm_seconds: Histogram,
    in_flight: Gauge,
    connected: Family<QueueLabel, Gauge>,
    queues: queues::QueueGauges,
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
        let ignored = Family::<QueueLabel, Counter>::default();
        let handler_runs = Family::<HandlerOutcome, Counter>::default();
        let handler_duration = Family::<HandlerEvent, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let retries = Family::<QueueStep, Counter>::default();
        let dead_letters = Family::<QueueReason, Counter>::default();
        let publishes = Family::<EventOutcome, Counter>::default();
        let ack_frames = Family::<QueueLabel, Counter>::default();
        let confirm_seconds = duration_histogram();
        let in_flight = Gauge::default();
        let connected = Family::<QueueLabel, Gauge>::default();
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
            "burrow_ignored",
            "Deliveries acked without a handler: no handler of this app subscribes to their type",
            ignored.clone(),
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
        let permit_wait = Family::<HandlerLabel, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "burrow_handler_permit_wait_seconds",
            "Time a run of a limited handler waited for a concurrency or rate permit",
            permit_wait.clone(),
        );
        let broadcast_dropped = Family::<HandlerLabel, Counter>::default();
        registry.register(
            "burrow_broadcast_dropped",
            "Broadcast events dropped on this instance after their in-process retries",
            broadcast_dropped.clone(),
        );
        let broadcast_gaps = Family::<QueueLabel, Counter>::default();
        registry.register(
            "burrow_broadcast_gaps",
            "Times this instance's broadcast queue was lost with its connection",
            broadcast_gaps.clone(),
        );
        let broadcast_gap_seconds = Family::<QueueLabel, Counter<f64, AtomicU64>>::default();
        registry.register(
            "burrow_broadcast_gap_seconds",
            "Seconds this instance had no broadcast queue after losing its connection",
            broadcast_gap_seconds.clone(),
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
            "burrow_ack_frames",
            "basic.ack frames sent (one acks every completed delivery before it)",
            ack_frames.clone(),
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
        let queues = queues::QueueGauges::register(&mut registry);
        // The outbox exists only with the `postgres` feature; a build
        // without it exports no outbox series that could only ever read 0.
        #[cfg(feature = "postgres")]
        {
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
        }
        Self {
            registry: Arc::new(registry),
            known_events: None,
            deliveries,
            ignored,
            handler_runs,
            handler_duration,
            permit_wait,
            broadcast_dropped,
            broadcast_gaps,
            broadcast_gap_seconds,
            retries,
            dead_letters,
            publishes,
            ack_frames,
            confirm_seconds,
            in_flight,
            connected,
            queues,
            last_settled_ms: Arc::new(AtomicI64::new(now_ms())),
            outbox_pending,
            outbox_lag_seconds,
            outbox_relayed,
            outbox_relay_delay,
        }
    }

    /// The metrics of a worker: every series `labels` names exists at 0 from
    /// the start, and event types outside `labels.events` are counted as
    /// [`OTHER_EVENT`].
    pub(crate) fn for_app(labels: &AppLabels) -> Self {
        Self::for_apps(std::slice::from_ref(labels))
    }

    /// One set of metrics for several workers (apps) in one process.
    pub(crate) fn for_apps(apps: &[AppLabels]) -> Self {
        let mut metrics = Self::new();
        metrics.known_events = Some(Arc::new(
            apps.iter().flat_map(|a| a.events.iter().cloned()).collect(),
        ));
        for labels in apps {
            metrics.prime(labels);
        }
        metrics
    }

    /// Creates every series `labels` names, at 0.
    fn prime(&self, labels: &AppLabels) {
        let metrics = self;
        let queue = &labels.queue;
        // The delivery and handler series, as a session resolves them.
        let _ = metrics.queue_series(labels);
        for event in labels
            .events
            .iter()
            .map(String::as_str)
            .chain([OTHER_EVENT])
        {
            for outcome in PublishOutcome::ALL {
                let _ = metrics.publishes.get_or_create(&EventOutcome {
                    event: event.to_owned(),
                    outcome: outcome.as_str(),
                });
            }
        }
        let _ = metrics.ignored.get_or_create(&QueueLabel {
            queue: queue.clone(),
        });
        let _ = metrics.connected.get_or_create(&QueueLabel {
            queue: queue.clone(),
        });
        let _ = metrics.ack_frames.get_or_create(&QueueLabel {
            queue: queue.clone(),
        });
        for &step in &labels.steps {
            let _ = metrics.retries.get_or_create(&QueueStep {
                queue: queue.clone(),
                step,
            });
        }
        metrics.queues.prime(&labels.queues);
        for &reason in &labels.reasons {
            let _ = metrics.dead_letters.get_or_create(&QueueReason {
                queue: queue.clone(),
                reason,
            });
        }
    }

    /// The `event` label for `event_type`: itself when the app subscribes to
    /// it (or when these metrics know no app), else [`OTHER_EVENT`].
    pub fn event_label<'a>(&self, event_type: &'a str) -> &'a str {
        match &self.known_events {
            Some(known) if !known.contains(event_type) => OTHER_EVENT,
            _ => event_type,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The `burrow_ack_frames_total` counter of `queue`.
    pub(crate) fn ack_frames(&self, queue: &str) -> Counter {
        self.ack_frames
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .clone()
    }

    pub(crate) fn delivery_received(&self, queue: &str, event: &str) {
        self.deliveries
            .get_or_create(&QueueEvent {
                queue: queue.to_owned(),
                event: self.event_label(event).to_owned(),
            })
            .inc();
    }

    pub(crate) fn delivery_ignored(&self, queue: &str) {
        self.ignored
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
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
        let event = self.event_label(event);
        self.handler_runs
            .get_or_create(&HandlerOutcome {
                handler: handler.to_owned(),
                event: event.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
        self.handler_duration
            .get_or_create(&HandlerEvent {
                handler: handler.to_owned(),
                event: event.to_owned(),
            })
            .observe(seconds);
    }

    /// A run of limited handler `handler` waited `seconds` for its permit.
    pub(crate) fn permit_waited(&self, handler: &str, seconds: f64) {
        self.permit_wait
            .get_or_create(&HandlerLabel {
                handler: handler.to_owned(),
            })
            .observe(seconds);
    }

    /// Creates the permit-wait series of the limited `handlers` at 0.
    pub(crate) fn prime_permit_waits<'a>(&self, handlers: impl IntoIterator<Item = &'a str>) {
        for handler in handlers {
            let _series = self.permit_wait.get_or_create(&HandlerLabel {
                handler: handler.to_owned(),
            });
        }
    }

    /// A broadcast event `handler` still failed was dropped.
    pub(crate) fn broadcast_dropped(&self, handler: &str) {
        self.broadcast_dropped
            .get_or_create(&HandlerLabel {
                handler: handler.to_owned(),
            })
            .inc();
    }

    /// The broadcast queue of app queue `queue` was missing for `seconds`.
    pub(crate) fn broadcast_gap(&self, queue: &str, seconds: f64) {
        let label = QueueLabel {
            queue: queue.to_owned(),
        };
        self.broadcast_gaps.get_or_create(&label).inc();
        self.broadcast_gap_seconds
            .get_or_create(&label)
            .inc_by(seconds);
    }

    /// Creates the broadcast series of app queue `queue` and its broadcast
    /// `handlers` at 0.
    pub(crate) fn prime_broadcast<'a>(
        &self,
        queue: &str,
        handlers: impl IntoIterator<Item = &'a str>,
    ) {
        let label = QueueLabel {
            queue: queue.to_owned(),
        };
        let _series = self.broadcast_gaps.get_or_create(&label);
        let _series = self.broadcast_gap_seconds.get_or_create(&label);
        for handler in handlers {
            let _series = self.broadcast_dropped.get_or_create(&HandlerLabel {
                handler: handler.to_owned(),
            });
        }
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

    /// Records one publish. `event` is the caller's label: an event type this
    /// process publishes, or, for copies of deliveries, [`Metrics::event_label`]
    /// of the delivery's type.
    pub(crate) fn published(&self, event: &str, outcome: PublishOutcome, seconds: Option<f64>) {
        self.publishes
            .get_or_create(&EventOutcome {
                event: event.to_owned(),
                outcome: outcome.as_str(),
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

    pub(crate) fn set_connected(&self, queue: &str, connected: bool) {
        self.connected
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .set(i64::from(connected));
    }

    /// Deliveries received and not yet settled.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// Whether the worker is consuming.
    pub fn connected(&self) -> bool {
        // Family has no iteration: the rendered text is the one view of
        // every series. Cold path (tests, probes), never per delivery.
        self.render()
            .lines()
            .filter(|l| l.starts_with("burrow_connected{"))
            .any(|l| l.ends_with(" 1"))
    }

    /// Milliseconds since the last settlement (or since start).
    pub fn millis_since_last_settlement(&self) -> i64 {
        now_ms().saturating_sub(self.last_settled_ms.load(Ordering::Relaxed))
    }
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
        m.set_connected("events_a", true);
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
            r#"burrow_connected{queue="events_a"} 1"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        #[cfg(feature = "postgres")]
        for needle in [
            "burrow_outbox_pending 3",
            "burrow_outbox_lag_seconds 1.5",
            r#"burrow_outbox_relayed_total{event="CardAddedToLibraryEvent",outcome="published"} 1"#,
            "burrow_outbox_relay_delay_seconds_count 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        #[cfg(not(feature = "postgres"))]
        assert!(
            !text.contains("burrow_outbox"),
            "a build without the outbox exports no outbox series:\n{text}"
        );
    }

    fn labels() -> AppLabels {
        AppLabels {
            queue: "events_a".into(),
            events: vec!["CardAddedToLibraryEvent".into()],
            handlers: vec![("feeds.add".into(), "CardAddedToLibraryEvent".into())],
            steps: vec![1, 2],
            reasons: vec!["permanent", "undecodable"],
            queues: vec!["events_a".into(), "events_a.dead".into()],
        }
    }

    #[test]
    fn an_app_s_series_exist_at_zero_before_anything_happens() {
        let text = Metrics::for_app(&labels()).render();
        for needle in [
            r#"burrow_deliveries_total{queue="events_a",event="CardAddedToLibraryEvent"} 0"#,
            r#"burrow_deliveries_total{queue="events_a",event="other"} 0"#,
            r#"burrow_ignored_total{queue="events_a"} 0"#,
            r#"burrow_handler_runs_total{handler="feeds.add",event="CardAddedToLibraryEvent",outcome="ok"} 0"#,
            r#"burrow_handler_runs_total{handler="feeds.add",event="CardAddedToLibraryEvent",outcome="retry"} 0"#,
            r#"burrow_handler_runs_total{handler="feeds.add",event="CardAddedToLibraryEvent",outcome="dead"} 0"#,
            r#"burrow_handler_duration_seconds_count{handler="feeds.add",event="CardAddedToLibraryEvent"} 0"#,
            r#"burrow_retries_total{queue="events_a",step="1"} 0"#,
            r#"burrow_retries_total{queue="events_a",step="2"} 0"#,
            r#"burrow_dead_letters_total{queue="events_a",reason="permanent"} 0"#,
            r#"burrow_dead_letters_total{queue="events_a",reason="undecodable"} 0"#,
            r#"burrow_publishes_total{event="CardAddedToLibraryEvent",outcome="confirmed"} 0"#,
            r#"burrow_publishes_total{event="other",outcome="failed"} 0"#,
            r#"burrow_queue_messages{queue="events_a.dead"} 0"#,
            r#"burrow_queue_consumers{queue="events_a"} 0"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }

    #[test]
    fn event_types_the_app_does_not_subscribe_to_create_no_series() {
        let m = Metrics::for_app(&labels());
        let unknown = |i: usize| {
            let event = format!("Random{i}Event");
            m.delivery_received("events_a", &event);
            m.handler_ran("feeds.add", &event, RunOutcome::Ok, 0.001);
        };
        unknown(0);
        let after_one = m.render().lines().count();
        (1..5).for_each(unknown);
        let text = m.render();
        assert_eq!(text.lines().count(), after_one, "{text}");
        assert!(!text.contains("Random"), "{text}");
        assert!(
            text.contains(r#"burrow_deliveries_total{queue="events_a",event="other"} 5"#),
            "{text}"
        );
        assert_eq!(
            m.event_label("CardAddedToLibraryEvent"),
            "CardAddedToLibraryEvent"
        );
        assert_eq!(Metrics::new().event_label("Anything"), "Anything");
    }
}
