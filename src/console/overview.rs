//! The overview page: the app's queues, and the worker beside the console.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use maud::html;
use tokio::sync::watch;

use super::{Shared, error_page, extract::Read, pages};
use crate::{
    consumer::WorkerState,
    metrics::{Metrics, queues},
    retry::RetryLadder,
    topology::{QueueRole, Topology},
};

/// How often the worker's counters are sampled for the per-minute rates.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples kept: a little over a minute's worth.
const SAMPLES: usize = 14;

/// The worker in the console's process: its state and its counters.
pub(super) struct WorkerView {
    metrics: Metrics,
    state: watch::Receiver<WorkerState>,
    samples: Arc<Mutex<VecDeque<(Instant, Totals)>>>,
}

/// burrow's own counters, summed over their labels.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Totals {
    pub(super) delivered: f64,
    pub(super) handled: f64,
    pub(super) retried: f64,
    pub(super) dead_lettered: f64,
}

impl Totals {
    /// Reads the totals from the metrics' own exposition: the numbers a
    /// dashboard scraping `/metrics` sees, without a second bookkeeping.
    pub(super) fn read(metrics: &Metrics) -> Self {
        Self::parse(&metrics.render())
    }

    fn parse(text: &str) -> Self {
        let mut t = Totals::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            match name {
                "burrow_deliveries_total" => t.delivered += value,
                "burrow_handler_runs_total" if series.contains("outcome=\"ok\"") => {
                    t.handled += value;
                }
                "burrow_retries_total" => t.retried += value,
                "burrow_dead_letters_total" => t.dead_lettered += value,
                _ => {}
            }
        }
        t
    }
}

impl WorkerView {
    pub(super) fn new(metrics: Metrics, state: watch::Receiver<WorkerState>) -> Self {
        let samples = Arc::new(Mutex::new(VecDeque::with_capacity(SAMPLES)));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sample(metrics.clone(), Arc::downgrade(&samples)));
        }
        Self {
            metrics,
            state,
            samples,
        }
    }

    /// Per-minute rates over the samples' span (up to a minute), or `None`
    /// before two samples exist.
    fn per_minute(&self) -> Option<(Totals, Duration)> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let (first_at, first) = samples.front()?;
        let now = Totals::read(&self.metrics);
        let span = first_at.elapsed();
        if span < Duration::from_secs(1) {
            return None;
        }
        let scale = 60.0 / span.as_secs_f64();
        let rate = |a: f64, b: f64| ((a - b).max(0.0) * scale).round();
        Some((
            Totals {
                delivered: rate(now.delivered, first.delivered),
                handled: rate(now.handled, first.handled),
                retried: rate(now.retried, first.retried),
                dead_lettered: rate(now.dead_lettered, first.dead_lettered),
            },
            span,
        ))
    }
}

/// Samples the counters until the console is dropped.
async fn sample(metrics: Metrics, samples: Weak<Mutex<VecDeque<(Instant, Totals)>>>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tick.tick().await;
        let Some(samples) = samples.upgrade() else {
            return;
        };
        let mut samples = samples.lock().unwrap_or_else(|e| e.into_inner());
        while samples.len() >= SAMPLES
            || samples
                .front()
                .is_some_and(|(at, _)| at.elapsed() > Duration::from_secs(60) + SAMPLE_EVERY)
        {
            samples.pop_front();
        }
        samples.push_back((Instant::now(), Totals::read(&metrics)));
    }
}

/// One queue of the app, as the broker reports it.
#[derive(Debug, Clone)]
pub(super) struct QueueRow {
    pub(super) role: String,
    pub(super) name: String,
    /// Ready messages and consumers; `None` when the broker did not answer
    /// (the queue is not declared).
    pub(super) depth: Option<(u32, u32)>,
}

/// The app's queues as its topology declares them (the app queue, each
/// retry step, the dead-letter queue, an ordered app's shards), with a role
/// for people.
pub(super) fn queues(settings: &crate::Settings) -> Vec<(String, String)> {
    let ladder = RetryLadder::new(&settings.app_queue(), &settings.retry.delays);
    Topology::for_app(settings, &crate::Registry::new())
        .queues
        .into_iter()
        .map(|q| {
            let role = match q.role {
                QueueRole::App => "app queue".to_owned(),
                QueueRole::Retry(n) => ladder
                    .steps()
                    .iter()
                    .find(|s| s.number == n)
                    .map_or(format!("retry step {n}"), |s| {
                        format!("retry step {n} ({})", humantime::format_duration(s.delay))
                    }),
                QueueRole::Dead => "dead letters".to_owned(),
                QueueRole::Shard(n) => format!("shard {n} (one active consumer)"),
            };
            (role, q.name)
        })
        .collect()
}

/// Reads each queue's depth (the passive declare of [`queues::probe`]), on a
/// connection of its own, closed before returning.
async fn depths(settings: &crate::Settings) -> crate::Result<Vec<QueueRow>> {
    let name = format!("burrow console ({})", settings.app.name);
    let conn = crate::connection::open(&settings.amqp, &name).await?;
    let wanted = queues(settings);
    let names: Vec<String> = wanted.iter().map(|(_, q)| q.clone()).collect();
    let mut read = Vec::with_capacity(names.len());
    // A refused declare closes its channel and leaves the queues after it
    // unread: read those on a fresh channel.
    while read.len() < names.len() {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| crate::Error::amqp("channel.open (console)", e))?;
        let got = queues::probe(&channel, &names[read.len()..]).await;
        let refused = got.iter().position(|d| d.messages.is_none());
        let take = refused.map_or(got.len(), |i| i + 1);
        read.extend(got.into_iter().take(take));
        let _ = channel.close(200, "console overview".into()).await;
    }
    let _ = conn.close(200, "console overview".into()).await;
    Ok(wanted
        .into_iter()
        .zip(read)
        .map(|((role, name), d)| QueueRow {
            role,
            name,
            depth: d.messages.zip(d.consumers),
        })
        .collect())
}

pub(super) async fn page(State(console): State<Shared>, Read { operator, .. }: Read) -> Response {
    let settings = &console.0.settings;
    let rows = match depths(settings).await {
        Ok(rows) => rows,
        Err(e) => {
            return error_page(
                &console,
                StatusCode::BAD_GATEWAY,
                "Broker unreachable",
                &format!("The console cannot read the queues: {e}"),
            );
        }
    };
    let worker = console.0.worker.as_ref();
    let body = html! {
        section.cards {
            @match worker {
                Some(w) => {
                    @let state = *w.state.borrow();
                    @let (class, text, why) = describe(state);
                    div.card id="worker-state" {
                        div class={ "n " (class) } { (text) }
                        div.l { (why) }
                    }
                    div.card {
                        div.n { (w.metrics.in_flight()) }
                        div.l { "deliveries in flight" }
                    }
                    @match w.per_minute() {
                        Some((rates, span)) => {
                            @for (n, label) in [
                                (rates.delivered, "delivered / min"),
                                (rates.handled, "handler runs ok / min"),
                                (rates.retried, "retried / min"),
                                (rates.dead_lettered, "dead-lettered / min"),
                            ] {
                                div.card title={ "over the last " (span.as_secs()) " s" } {
                                    div.n { (n) }
                                    div.l { (label) }
                                }
                            }
                        }
                        None => {
                            div.card { div.n { "…" } div.l { "rates appear after the first samples (5 s)" } }
                        }
                    }
                }
                None => {
                    div.card id="worker-state" {
                        div.n { "no worker here" }
                        div.l { "this console runs without a worker (burrow console); rates come from a worker's /metrics" }
                    }
                }
            }
        }
        h2 { "Queues" }
        table id="queues" {
            thead { tr { th { "role" } th { "queue" } th.num { "ready" } th.num { "consumers" } } }
            tbody {
                @for row in &rows {
                    tr data-queue=(row.name) {
                        td { (row.role) }
                        td.mono {
                            @if row.role == "dead letters" {
                                a href="/console/letters" { (row.name) }
                            } @else { (row.name) }
                        }
                        @match row.depth {
                            Some((messages, consumers)) => {
                                td.num.messages { (messages) }
                                td.num { (consumers) }
                            }
                            None => {
                                td.error colspan="2" {
                                    "not declared: a worker declares it at start (burrow topology apply does too)"
                                }
                            }
                        }
                    }
                }
            }
        }
        p.meta { "Depths are the broker's count of ready messages, read now with a passive declare." }
    };
    (
        StatusCode::OK,
        pages::layout(console.app(), "Overview", Some(&operator), body),
    )
        .into_response()
}

/// A worker state for people: a CSS class, a word, and why.
fn describe(state: WorkerState) -> (&'static str, &'static str, &'static str) {
    match state {
        WorkerState::Consuming => ("state-ok", "ready", "connected and consuming the app queue"),
        WorkerState::Starting => (
            "state-warn",
            "starting",
            "connecting and declaring the topology",
        ),
        WorkerState::Reconnecting => (
            "state-bad",
            "not ready",
            "the broker connection was lost; reconnecting with backoff",
        ),
        WorkerState::Draining => (
            "state-warn",
            "draining",
            "stopping: finishing the deliveries in flight",
        ),
        WorkerState::Stopped => ("state-bad", "stopped", "the worker has stopped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_the_series_of_each_counter() {
        let text = "# TYPE burrow_deliveries_total counter\n\
            burrow_deliveries_total{queue=\"q\",event=\"A\"} 3\n\
            burrow_deliveries_total{queue=\"q\",event=\"other\"} 2\n\
            burrow_handler_runs_total{handler=\"h\",outcome=\"ok\"} 4\n\
            burrow_handler_runs_total{handler=\"h\",outcome=\"retry\"} 9\n\
            burrow_retries_total{queue=\"q\",step=\"1\"} 1\n\
            burrow_dead_letters_total{queue=\"q\",reason=\"permanent\"} 7\n\
            # EOF\n";
        assert_eq!(
            Totals::parse(text),
            Totals {
                delivered: 5.0,
                handled: 4.0,
                retried: 1.0,
                dead_lettered: 7.0
            }
        );
    }

    #[test]
    fn the_queues_are_the_app_queue_each_step_and_the_dead_letters() {
        let mut settings = crate::Settings::default();
        settings.app.name = "library".into();
        settings.retry.delays = vec![Duration::from_secs(1), Duration::from_secs(60)];
        let names: Vec<String> = queues(&settings).into_iter().map(|(_, q)| q).collect();
        assert_eq!(
            names,
            [
                "events_library",
                "events_library.retry.1.1s",
                "events_library.retry.2.1m",
                "events_library.dead"
            ]
        );
        settings.ordering.shards = 2;
        let ordered: Vec<(String, String)> = queues(&settings);
        assert_eq!(
            ordered,
            [
                ("app queue".to_owned(), "events_library".to_owned()),
                ("dead letters".to_owned(), "events_library.dead".to_owned()),
                (
                    "shard 1 (one active consumer)".to_owned(),
                    "events_library.shard.1".to_owned()
                ),
                (
                    "shard 2 (one active consumer)".to_owned(),
                    "events_library.shard.2".to_owned()
                ),
            ],
            "an ordered app has shards and no retry steps"
        );
    }
}
