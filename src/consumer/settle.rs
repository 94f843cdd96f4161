//! Carrying one delivery from the pipeline to its ack: the only place that
//! settles a delivery of the app queue.
//!
//! The pipeline decides a [`Settlement`] without I/O; this carries it out.
//! Every copy it asks for (a retry step, the dead-letter queue, or both) is
//! published and confirmed first. Then either the delivery joins the ack
//! window ([`super::ack`], which sends the `basic.ack`), or, when a copy was
//! not confirmed, it is returned with `basic.nack(requeue)` here and comes
//! back later. Nothing is acked before its copies are confirmed.

use lapin::{BasicProperties, message::Delivery, options::BasicNackOptions};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{
    ack::Acks,
    outcome::Outcome,
    pipeline::{DeadLetterMove, Pipeline, Processed, RetryMove, Settlement},
};
use crate::{
    config::Settings,
    error::Result,
    metrics::{InFlight, Metrics},
    publisher::Publisher,
    wire::{self, Incoming},
};

/// How carrying out a settlement ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub(super) enum Settled {
    /// Every copy was confirmed (or none was needed): the delivery may be acked.
    Confirmed,
    /// A copy was not confirmed: the delivery went back with `basic.nack`.
    Returned,
}

/// What every delivery task of one session shares: the pipeline, the ack
/// window, the publisher for copies, where copies go, and who listens.
pub(super) struct Settler {
    acks: Acks,
    pipeline: Pipeline,
    publisher: Publisher,
    queue: String,
    app: String,
    dead_queue: String,
    outcomes: broadcast::Sender<Outcome>,
    metrics: Metrics,
    /// Cancelled when the session drains: handlers see it in their context.
    shutdown: CancellationToken,
}

impl Settler {
    pub(super) fn new(
        settings: &Settings,
        acks: Acks,
        pipeline: Pipeline,
        publisher: Publisher,
        outcomes: broadcast::Sender<Outcome>,
        metrics: Metrics,
    ) -> Self {
        Self {
            acks,
            pipeline,
            publisher,
            queue: settings.app_queue(),
            app: settings.app.name.clone(),
            dead_queue: settings.dead_letter_queue(),
            outcomes,
            metrics,
            shutdown: CancellationToken::new(),
        }
    }

    /// Tells running handlers the worker is stopping (their context's signal).
    pub(super) fn stop_handlers(&self) {
        self.shutdown.cancel();
    }

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
            let processed = self
                .pipeline
                .process_incoming(incoming, &properties, &data, &self.shutdown)
                .await;
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

    fn record_metrics(&self, processed: &Processed) {
        let event = processed.incoming.event_type.as_str();
        self.metrics.delivery_received(&self.queue, event);
        for (run, outcome) in processed.runs.iter().zip(processed.run_outcomes()) {
            self.metrics
                .handler_ran(&run.handler, event, outcome, run.duration.as_secs_f64());
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

    /// Carries out a settlement up to the ack: publishes and confirms every
    /// copy, or returns the delivery to the queue when one is not confirmed.
    async fn settle(
        &self,
        processed: &Processed,
        properties: &BasicProperties,
        body: &[u8],
        acker: &lapin::Acker,
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
        // Not confirmed: the original must stay with the broker. Requeue it;
        // on quorum queues x-delivery-limit bounds the loop and parks the
        // message in the dead-letter queue.
        error!(error = %e, "could not move the message; returning it to the queue");
        if let Err(e) = acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
        {
            warn!(error = %e, "basic.nack failed; the broker will redeliver when the channel closes");
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
        // Boxed: the send future is large and only this cold path needs it;
        // inline it would grow every delivery task by its size.
        Box::pin(
            self.publisher
                .send_counted(event, "", &r.step.queue, body, &props),
        )
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
        Box::pin(
            self.publisher
                .send_counted(event, "", &self.dead_queue, body, &props),
        )
        .await
    }
}
