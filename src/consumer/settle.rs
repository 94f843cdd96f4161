//! Carrying one delivery from the pipeline to its ack: the only place that
//! settles a delivery of the app queue.
//!
//! The pipeline decides a [`Settlement`] without I/O; this carries it out.
//! Every copy it asks for (a retry step, the dead-letter queue, or both) is
//! published and confirmed first. Then either the delivery joins the ack
//! window ([`super::ack`], which sends the `basic.ack`), or, when a copy was
//! not confirmed, it is returned with `basic.reject(requeue)` here and comes
//! back later. Nothing is acked before its copies are confirmed.

use std::{future::Future, pin::Pin, sync::Arc};

use lapin::{Acker, BasicProperties, message::Delivery};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{
    ack::{AckFrame, Acks},
    ordered::{self, Turns},
    outcome::Outcome,
    pipeline::{DeadLetterMove, Pipeline, Processed, RetryMove, Settlement},
};
use crate::{
    config::Settings,
    error::Result,
    metrics::{InFlight, Metrics, QueueSeries},
    publisher::Publisher,
    wire::{self, Incoming},
};

/// How carrying out a settlement ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(super) enum Settled {
    /// Every copy was confirmed (or none was needed): the delivery may be acked.
    Confirmed,
    /// A copy was not confirmed: the delivery went back with `basic.reject`.
    Returned,
}

/// Where retry and dead-letter copies go, confirmed: the [`Publisher`], or a
/// recording fake in the unit tests below.
pub(super) trait CopySink: Send + Sync {
    /// Publishes a copy to `queue` through the default exchange and waits
    /// for the confirm; `event` is its metric label.
    fn send_copy<'a>(
        &'a self,
        event: &'a str,
        queue: &'a str,
        body: &'a [u8],
        properties: &'a BasicProperties,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;
}

impl CopySink for Publisher {
    fn send_copy<'a>(
        &'a self,
        event: &'a str,
        queue: &'a str,
        body: &'a [u8],
        properties: &'a BasicProperties,
    ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
        // Boxed: the send future is large and only the cold retry and
        // dead-letter paths need it; inline it would grow every delivery
        // task by its size.
        Box::pin(self.send_counted(event, "", queue, body, properties))
    }
}

/// What every delivery task of one session shares: the pipeline, the ack
/// window, where copies go, and who listens.
pub(super) struct Settler<A: AckFrame = Acker> {
    acks: Acks<A>,
    pipeline: Pipeline,
    copies: Box<dyn CopySink>,
    queue: String,
    app: String,
    dead_queue: String,
    outcomes: broadcast::Sender<Outcome>,
    metrics: Metrics,
    /// The app queue's delivery and handler series, resolved at start.
    series: QueueSeries,
    /// Cancelled when the session drains: handlers see it in their context.
    shutdown: CancellationToken,
    /// The aggregates' turns, in an ordered app ([`super::ordered`]).
    turns: Option<Arc<Turns>>,
}

impl<A: AckFrame> Settler<A> {
    pub(super) fn new(
        settings: &Settings,
        acks: Acks<A>,
        pipeline: Pipeline,
        copies: Box<dyn CopySink>,
        outcomes: broadcast::Sender<Outcome>,
        metrics: Metrics,
    ) -> Self {
        let series = metrics.queue_series(&super::app_labels(settings, pipeline.registry()));
        Self {
            series,
            acks,
            pipeline,
            copies,
            queue: settings.app_queue(),
            app: settings.app.name.clone(),
            dead_queue: settings.dead_letter_queue(),
            outcomes,
            metrics,
            shutdown: CancellationToken::new(),
            turns: settings
                .ordering
                .enabled()
                .then(|| Arc::new(Turns::default())),
        }
    }

    /// Tells running handlers the worker is stopping (their context's signal).
    pub(super) fn stop_handlers(&self) {
        self.shutdown.cancel();
    }
}

impl Settler<Acker> {
    /// Runs one delivery through the pipeline and settles it.
    pub(super) async fn handle(&self, delivery: Delivery, in_flight: InFlight) {
        let Delivery {
            delivery_tag,
            exchange,
            routing_key,
            properties,
            data,
            acker,
            ..
        } = delivery;
        // The metadata is read before the span is entered, so every line
        // logged while the delivery is handled (a handler's own lines too,
        // inside its `handler` span) carries the message id, event, app and
        // attempt. Field names follow OpenTelemetry's messaging conventions
        // where they exist.
        let incoming = Incoming::read(exchange.as_str(), routing_key.as_str(), &properties, &data);
        let span = info_span!(
            "delivery",
            messaging.system = "rabbitmq",
            messaging.operation = "process",
            messaging.destination.name = %self.queue,
            app = %self.app,
            event = %incoming.event_type,
            message_id = %incoming.message_id,
            correlation_id = incoming.correlation_id.as_deref().unwrap_or(""),
            attempt = incoming.attempt,
        );
        #[cfg(feature = "otel")]
        crate::otel::set_parent(&span, properties.headers().as_ref());
        async {
            // An ordered app: the aggregate's turn first, asked for on this
            // future's first poll, which the consumer makes on arrival.
            let _turn = match &self.turns {
                Some(turns) => Some(turns.take(ordered::aggregate_of(&properties)).await),
                None => None,
            };
            let again = self.turns.is_some().then(|| incoming.clone());
            let mut processed = self
                .pipeline
                .process_incoming(incoming, &properties, &data, &self.shutdown)
                .await;
            if let Some(incoming) = again {
                let held = ordered::retry_in_place(
                    &self.pipeline,
                    processed,
                    incoming,
                    &properties,
                    &data,
                    &self.shutdown,
                    |round| self.record_round(round),
                )
                .await;
                let Some(done) = held else {
                    // Stopping while it waits: back to its queue, in place.
                    if !matches!(acker.requeue().await, Ok(true)) {
                        warn!(
                            "basic.reject not sent: the channel is closed; the broker redelivers it"
                        );
                    }
                    self.acks.returned(delivery_tag).await;
                    drop(in_flight);
                    return;
                };
                processed = done;
            }
            self.record_metrics(&processed);
            let settled = self.settle(&processed, &properties, &data, &acker).await;
            // Outcomes are built only for subscribers (tests, the demo).
            let listened = self.outcomes.receiver_count() > 0;
            match settled {
                Settled::Confirmed => {
                    let outcome = listened.then(|| Outcome::of(&processed, true));
                    // Acked with the deliveries around it (super::ack).
                    self.acks
                        .ready(delivery_tag, acker, outcome, in_flight)
                        .await;
                }
                Settled::Returned => {
                    self.acks.returned(delivery_tag).await;
                    drop(in_flight);
                    if listened {
                        let _ = self.outcomes.send(Outcome::of(&processed, false));
                    }
                }
            }
        }
        .instrument(span)
        .await
    }
}

impl<A: AckFrame> Settler<A> {
    fn record_metrics(&self, processed: &Processed) {
        let event = processed.incoming.event_type.as_str();
        self.series.delivery_received(event);
        for (run, outcome) in processed.runs.iter().zip(processed.run_outcomes()) {
            self.series
                .handler_ran(&run.handler, event, outcome, run.duration.as_secs_f64());
            if let Some(waited) = run.waited {
                self.metrics
                    .permit_waited(&run.handler, waited.as_secs_f64());
            }
        }
        if let Some(r) = processed.settlement.retry() {
            self.metrics.retried(&self.queue, r.step.number);
        }
        if let Some(d) = processed.settlement.dead_letter() {
            self.metrics.dead_lettered(&self.queue, d.reason.as_str());
        }
        if matches!(processed.settlement, Settlement::Ignore { .. }) {
            self.metrics.delivery_ignored(&self.queue);
        }
    }

    /// The handler runs of a round an ordered app retries in place, and the
    /// retry itself.
    fn record_round(&self, processed: &Processed) {
        let event = processed.incoming.event_type.as_str();
        for (run, outcome) in processed.runs.iter().zip(processed.run_outcomes()) {
            self.series
                .handler_ran(&run.handler, event, outcome, run.duration.as_secs_f64());
        }
        if let Some(r) = processed.settlement.retry() {
            self.metrics.retried(&self.queue, r.step.number);
        }
    }

    /// Carries out a settlement up to the ack: publishes and confirms every
    /// copy, or returns the delivery to the queue when one is not confirmed.
    async fn settle(
        &self,
        processed: &Processed,
        properties: &BasicProperties,
        body: &[u8],
        acker: &A,
    ) -> Settled {
        let incoming = &processed.incoming;
        let copied = match &processed.settlement {
            Settlement::Ack => {
                debug!("handled");
                Ok(())
            }
            Settlement::Ignore { reason } => {
                warn!(%reason, "ignored");
                Ok(())
            }
            Settlement::Retry(r) => self.copy_to_retry(incoming, properties, body, r).await,
            Settlement::DeadLetter(d) => self.copy_to_dead(incoming, properties, body, d).await,
            Settlement::RetryAndDeadLetter(r, d) => {
                match self.copy_to_retry(incoming, properties, body, r).await {
                    Ok(()) => self.copy_to_dead(incoming, properties, body, d).await,
                    Err(e) => Err(e),
                }
            }
        };
        let Err(e) = copied else {
            return Settled::Confirmed;
        };
        // Not confirmed: the original must stay with the broker. Requeue it
        // (basic.reject, which counts as a failed delivery on every version);
        // on quorum queues x-delivery-limit bounds the loop and parks the
        // message in the dead-letter queue.
        error!(error = %e, "could not move the message; returning it to the queue");
        match acker.requeue().await {
            Ok(true) => {}
            // lapin sent nothing: the delivery's channel is gone (or the
            // delivery was settled already), and a closed channel returns it.
            Ok(false) => warn!(
                "basic.reject not sent: the delivery's channel is closed; the broker redelivers it"
            ),
            Err(e) => {
                warn!(error = %e, "basic.reject failed; the broker will redeliver when the channel closes")
            }
        }
        Settled::Returned
    }

    async fn copy_to_retry(
        &self,
        incoming: &Incoming,
        properties: &BasicProperties,
        body: &[u8],
        r: &RetryMove,
    ) -> Result<()> {
        let props = wire::retry_copy(
            incoming,
            properties,
            &r.handlers,
            &r.errors,
            self.pipeline.header_budget(),
        );
        info!(step = r.step.number, delay = %humantime::format_duration(r.step.delay), handlers = ?r.handlers, errors = ?r.errors, "retrying");
        let event = self.metrics.event_label(&incoming.event_type);
        self.copies
            .send_copy(event, &r.step.queue, body, &props)
            .await
    }

    async fn copy_to_dead(
        &self,
        incoming: &Incoming,
        properties: &BasicProperties,
        body: &[u8],
        d: &DeadLetterMove,
    ) -> Result<()> {
        let props = wire::dead_copy(
            incoming,
            properties,
            d.reason,
            &d.handlers,
            &d.errors,
            self.pipeline.header_budget(),
        );
        warn!(reason = %d.reason, handlers = ?d.handlers, errors = ?d.errors, "dead-lettering");
        let event = self.metrics.event_label(&incoming.event_type);
        self.copies
            .send_copy(event, &self.dead_queue, body, &props)
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        time::Duration,
    };

    use lapin::types::AMQPValue;

    use super::*;
    use crate::{
        consumer::pipeline::PipelineConfig,
        event::Event,
        handler::{HandlerError, Registry},
        retry::RetryLadder,
        wire::{DeadReason, HeaderBudget, headers},
    };

    #[derive(serde::Deserialize)]
    struct Ping {
        mode: String,
    }

    impl Event for Ping {
        const EVENT_TYPE: &'static str = "Ping";
    }

    /// A copy as the sink saw it: queue, label, headers.
    #[derive(Debug, Clone)]
    struct Copy {
        queue: String,
        event: String,
        properties: BasicProperties,
    }

    /// Records copies; fails the `fail_at`-th one (0-based) when set.
    #[derive(Default)]
    struct FakeSink {
        copies: Arc<Mutex<Vec<Copy>>>,
        fail_at: Option<usize>,
    }

    impl CopySink for FakeSink {
        fn send_copy<'a>(
            &'a self,
            event: &'a str,
            queue: &'a str,
            _body: &'a [u8],
            properties: &'a BasicProperties,
        ) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>> {
            let mut copies = self.copies.lock().unwrap();
            let result = if self.fail_at == Some(copies.len()) {
                Err(crate::Error::Nacked {
                    exchange: "(default)".into(),
                    routing_key: queue.into(),
                })
            } else {
                copies.push(Copy {
                    queue: queue.into(),
                    event: event.into(),
                    properties: properties.clone(),
                });
                Ok(())
            };
            Box::pin(std::future::ready(result))
        }
    }

    /// Counts requeues (rejects); acks are the ack window's business.
    #[derive(Debug, Default, Clone)]
    struct FakeAcker {
        requeued: Arc<Mutex<u32>>,
    }

    impl AckFrame for FakeAcker {
        fn ack(&self, _multiple: bool) -> impl Future<Output = lapin::Result<bool>> + Send {
            std::future::ready(Ok(true))
        }

        fn requeue(&self) -> impl Future<Output = lapin::Result<bool>> + Send {
            *self.requeued.lock().unwrap() += 1;
            std::future::ready(Ok(true))
        }
    }

    /// `ok` always succeeds, `flaky` fails transiently, `broken` for good,
    /// each when the event's mode names it.
    fn rig(sink: FakeSink) -> (Settler<FakeAcker>, Arc<Mutex<Vec<Copy>>>) {
        let mut registry = Registry::new();
        registry
            .on("ok", |_: Ping, _| async { Ok(()) })
            .unwrap()
            .on("flaky", |p: Ping, _| async move {
                match p.mode.contains("transient") {
                    true => Err(HandlerError::transient("busy")),
                    false => Ok(()),
                }
            })
            .unwrap()
            .on("broken", |p: Ping, _| async move {
                match p.mode.contains("permanent") {
                    true => Err(HandlerError::permanent("bad data")),
                    false => Ok(()),
                }
            })
            .unwrap();
        let mut settings = Settings::default();
        settings.app.name = "unit".into();
        let pipeline = Pipeline::new(
            Arc::new(registry),
            PipelineConfig {
                ladder: RetryLadder::new(&settings.app_queue(), &[Duration::from_secs(1)]),
                handler_timeout: Duration::from_secs(1),
                max_body_bytes: 1024,
                header_budget: HeaderBudget::default(),
            },
        );
        let (outcomes, _) = broadcast::channel(8);
        let (acks, _timer) = Acks::start(outcomes.clone(), Default::default());
        let copies = sink.copies.clone();
        let settler = Settler::new(
            &settings,
            acks,
            pipeline,
            Box::new(sink),
            outcomes,
            Metrics::new(),
        );
        (settler, copies)
    }

    async fn settle(settler: &Settler<FakeAcker>, mode: &str, acker: &FakeAcker) -> Settled {
        let body = format!(r#"{{"mode":"{mode}"}}"#);
        let properties = BasicProperties::default().with_message_id("m-1".into());
        let processed = settler
            .pipeline
            .process(
                "ex",
                "Ping",
                &properties,
                body.as_bytes(),
                &CancellationToken::new(),
            )
            .await;
        settler
            .settle(&processed, &properties, body.as_bytes(), acker)
            .await
    }

    fn int(p: &BasicProperties, name: &str) -> Option<i64> {
        match p.headers().as_ref()?.inner().get(name)? {
            AMQPValue::LongLongInt(n) => Some(*n),
            _ => None,
        }
    }

    fn text(p: &BasicProperties, name: &str) -> Option<String> {
        crate::wire::header_string(p.headers().as_ref()?, name)
    }

    #[tokio::test]
    async fn success_needs_no_copy() {
        let (settler, copies) = rig(FakeSink::default());
        let acker = FakeAcker::default();
        assert_eq!(settle(&settler, "fine", &acker).await, Settled::Confirmed);
        assert!(copies.lock().unwrap().is_empty());
        assert_eq!(*acker.requeued.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn a_retry_copy_names_the_next_attempt_and_only_the_failed_handler() {
        let (settler, copies) = rig(FakeSink::default());
        let acker = FakeAcker::default();
        assert_eq!(
            settle(&settler, "transient", &acker).await,
            Settled::Confirmed
        );
        let copies = copies.lock().unwrap();
        assert_eq!(copies.len(), 1);
        let c = &copies[0];
        assert_eq!(c.queue, "events_unit.retry.1.1s");
        assert_eq!(c.event, "Ping");
        assert_eq!(int(&c.properties, headers::ATTEMPT), Some(2));
        assert!(
            text(&c.properties, headers::LAST_ERROR)
                .unwrap()
                .starts_with("flaky: transient error: busy")
        );
        assert_eq!(
            crate::wire::header_strings(
                c.properties.headers().as_ref().unwrap(),
                headers::HANDLERS
            ),
            vec!["flaky"]
        );
        assert_eq!(
            *c.properties.delivery_mode(),
            Some(2),
            "copies are persistent"
        );
    }

    #[tokio::test]
    async fn both_copies_go_out_retry_first_and_the_dead_one_names_its_reason() {
        let (settler, copies) = rig(FakeSink::default());
        let acker = FakeAcker::default();
        let settled = settle(&settler, "transient permanent", &acker).await;
        assert_eq!(settled, Settled::Confirmed);
        let copies = copies.lock().unwrap();
        let queues: Vec<&str> = copies.iter().map(|c| c.queue.as_str()).collect();
        assert_eq!(queues, ["events_unit.retry.1.1s", "events_unit.dead"]);
        let dead = &copies[1].properties;
        assert_eq!(
            text(dead, headers::DEAD_REASON).as_deref(),
            Some(DeadReason::Permanent.as_str())
        );
        assert_eq!(
            text(dead, headers::FAILED_HANDLER).as_deref(),
            Some("broken")
        );
        assert_eq!(int(dead, headers::ATTEMPT), Some(1));
        assert!(int(dead, headers::DEAD_AT).is_some());
    }

    #[tokio::test]
    async fn a_copy_not_confirmed_returns_the_delivery_and_sends_nothing_after_it() {
        // The retry copy fails: the dead-letter copy must not be sent, and
        // the original goes back with a reject (never an ack).
        let (settler, copies) = rig(FakeSink {
            fail_at: Some(0),
            ..FakeSink::default()
        });
        let acker = FakeAcker::default();
        let settled = settle(&settler, "transient permanent", &acker).await;
        assert_eq!(settled, Settled::Returned);
        assert!(copies.lock().unwrap().is_empty());
        assert_eq!(*acker.requeued.lock().unwrap(), 1);

        // The dead-letter copy fails after the retry copy was confirmed: the
        // delivery comes back too (the retry copy is then a duplicate the
        // handlers' idempotence absorbs).
        let (settler, copies) = rig(FakeSink {
            fail_at: Some(1),
            ..FakeSink::default()
        });
        let acker = FakeAcker::default();
        assert_eq!(
            settle(&settler, "transient permanent", &acker).await,
            Settled::Returned
        );
        assert_eq!(copies.lock().unwrap().len(), 1);
        assert_eq!(*acker.requeued.lock().unwrap(), 1);
    }
}
