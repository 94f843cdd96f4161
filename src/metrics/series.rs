//! Series resolved once per session, so the hot path counts a delivery
//! without building labels or looking up a family.

use std::collections::HashMap;

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

use super::{
    AppLabels, Metrics, OTHER_EVENT, RunOutcome,
    labels::{HandlerEvent, HandlerOutcome, QueueEvent},
};

/// The series one app queue's deliveries touch, resolved at start: counting
/// a delivery then costs no label allocation and no family lookup. A label
/// set not known at start (an event type only a pattern binding brings) goes
/// through the family as before.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueueSeries {
    metrics: Metrics,
    queue: String,
    /// `burrow_deliveries_total` by event label.
    deliveries: HashMap<String, Counter>,
    /// By handler, then event label.
    runs: HashMap<String, HashMap<String, HandlerSeries>>,
}

#[derive(Debug, Clone)]
struct HandlerSeries {
    /// `burrow_handler_runs_total`, in [`RunOutcome::ALL`] order.
    runs: [Counter; 3],
    duration: Histogram,
}

impl QueueSeries {
    /// Counts a delivery of `event`.
    pub(crate) fn delivery_received(&self, event: &str) {
        match self.deliveries.get(self.metrics.event_label(event)) {
            Some(counter) => {
                counter.inc();
            }
            None => self.metrics.delivery_received(&self.queue, event),
        }
    }

    /// Counts one run of `handler` on `event`.
    pub(crate) fn handler_ran(
        &self,
        handler: &str,
        event: &str,
        outcome: RunOutcome,
        seconds: f64,
    ) {
        let label = self.metrics.event_label(event);
        match self
            .runs
            .get(handler)
            .and_then(|by_event| by_event.get(label))
        {
            Some(series) => {
                let i = RunOutcome::ALL
                    .iter()
                    .position(|o| *o == outcome)
                    .expect("ALL holds every outcome");
                series.runs[i].inc();
                series.duration.observe(seconds);
            }
            None => self.metrics.handler_ran(handler, event, outcome, seconds),
        }
    }
}

impl Metrics {
    /// The series of the deliveries on `labels.queue`, looked up once.
    pub(crate) fn queue_series(&self, labels: &AppLabels) -> QueueSeries {
        let queue = &labels.queue;
        let mut series = QueueSeries {
            metrics: self.clone(),
            queue: queue.clone(),
            ..QueueSeries::default()
        };
        for event in labels
            .events
            .iter()
            .map(String::as_str)
            .chain([OTHER_EVENT])
        {
            series.deliveries.insert(
                event.to_owned(),
                self.deliveries
                    .get_or_create(&QueueEvent {
                        queue: queue.clone(),
                        event: event.to_owned(),
                    })
                    .clone(),
            );
        }
        for (handler, event) in &labels.handlers {
            let event = self.event_label(event).to_owned();
            let runs = RunOutcome::ALL.map(|outcome| {
                self.handler_runs
                    .get_or_create(&HandlerOutcome {
                        handler: handler.clone(),
                        event: event.clone(),
                        outcome: outcome.as_str(),
                    })
                    .clone()
            });
            let duration = self
                .handler_duration
                .get_or_create(&HandlerEvent {
                    handler: handler.clone(),
                    event: event.clone(),
                })
                .clone();
            series
                .runs
                .entry(handler.clone())
                .or_default()
                .insert(event, HandlerSeries { runs, duration });
        }
        series
    }
}
