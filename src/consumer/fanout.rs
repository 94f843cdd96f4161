//! Broadcast handlers: each running instance of the app gets every event
//! they subscribe to, from a queue of its own.
//!
//! The queue, `<app queue>.broadcast.<instance>`, is declared *exclusive*
//! on the consumer's connection (RabbitMQ deletes it when that connection
//! closes, so nothing is left behind by an instance that goes away, and it
//! is not one of the transient non-exclusive queues RabbitMQ 4.3 refuses).
//! It is bound to the exchange with the broadcast handlers' binding keys.
//!
//! What that costs, by design:
//!
//! - An instance that is down or reconnecting has no queue: the events
//!   published meanwhile never reach it. Nothing records how many they
//!   were; burrow counts the gaps and how long they lasted
//!   (`burrow_broadcast_gaps_total`, `burrow_broadcast_gap_seconds_total`).
//! - A transient failure is retried here, in the worker, a few times
//!   ([`IN_PROCESS_DELAYS`]), never through the retry ladder or the
//!   dead-letter queue (their copies would reach one instance, not all);
//!   what still fails is dropped, logged at error and counted in
//!   `burrow_broadcast_dropped_total`.
//!
//! Each delivery is acked once its handlers are done with it, successful or
//! dropped: the queue is this instance's alone, so no copy is needed first.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use lapin::{
    Channel, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::FieldTable,
};
use tokio::{
    sync::Semaphore,
    task::{JoinHandle, JoinSet},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info_span, warn};

use super::{Pipeline, PipelineConfig, Processed, Settlement};
use crate::{
    config::Settings,
    error::{Error, Result},
    metrics::Metrics,
    retry::RetryLadder,
    wire::{self, Incoming},
};

/// The waits before each in-process retry of a broadcast handler: four
/// attempts in all, within about 2.6 s, short enough to hold a delivery in
/// memory for.
pub(crate) const IN_PROCESS_DELAYS: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
];

/// The name of an instance's broadcast queue: the app queue, `broadcast`,
/// the host (the pod's name under Kubernetes, the container's id under
/// docker compose) and a suffix of this process's own, so that two workers
/// on one host (or in one process) never collide.
pub(crate) fn queue_name(settings: &Settings) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    let id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{}.broadcast.{host}-{}", settings.app_queue(), &id[..6]);
    name.chars().take(255).collect()
}

/// The broadcast consumer of one session.
pub(super) struct Broadcast {
    queue: String,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Broadcast {
    /// Declares the instance's queue on `conn`, binds it, and consumes it
    /// in a task of its own until [`Broadcast::stop`].
    pub(super) async fn start(
        conn: &Connection,
        queue: &str,
        binding_keys: &[String],
        pipeline: Pipeline,
        settings: &Settings,
        metrics: Metrics,
    ) -> Result<Self> {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| Error::amqp("channel.open (broadcast)", e))?;
        channel
            .queue_declare(
                wire::short_string("queue name", queue)?,
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    durable: false,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| Error::amqp(format!("queue.declare '{queue}' (broadcast)"), e))?;
        for key in binding_keys {
            channel
                .queue_bind(
                    wire::short_string("queue name", queue)?,
                    wire::short_string("exchange name", &settings.amqp.exchange)?,
                    wire::short_string("binding key", key)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| Error::amqp(format!("queue.bind '{queue}' to '{key}'"), e))?;
        }
        channel
            .basic_qos(settings.consumer.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| Error::amqp("basic.qos (broadcast)", e))?;
        let consumer = channel
            .basic_consume(
                wire::short_string("queue name", queue)?,
                wire::short_string("consumer tag", &format!("{queue}.consumer"))?,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| Error::amqp(format!("basic.consume on '{queue}'"), e))?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(consume(
            channel,
            consumer,
            Arc::new(pipeline),
            metrics,
            settings.consumer.concurrency,
            stop.clone(),
        ));
        Ok(Self {
            queue: queue.to_owned(),
            stop,
            task,
        })
    }

    /// Stops taking deliveries and lets those in flight finish until
    /// `deadline`; the rest are dropped unacked (the queue goes with the
    /// connection).
    pub(super) async fn stop(self, deadline: Instant) {
        self.stop.cancel();
        if tokio::time::timeout_at(deadline, self.task).await.is_err() {
            warn!(queue = %self.queue, "broadcast handlers still running at the shutdown deadline were stopped");
        }
    }
}

/// The pipeline of the broadcast handlers: the worker's own checks and
/// decisions, with an in-process "ladder" whose steps are the retry waits.
pub(super) fn pipeline(registry: crate::Registry, settings: &Settings) -> Pipeline {
    let mut config = PipelineConfig::from_settings(settings);
    config.ladder = RetryLadder::new("in-process", &IN_PROCESS_DELAYS);
    Pipeline::new(Arc::new(registry), config)
}

async fn consume(
    channel: Channel,
    mut consumer: lapin::Consumer,
    pipeline: Arc<Pipeline>,
    metrics: Metrics,
    concurrency: usize,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let handlers_stop = CancellationToken::new();
    loop {
        let slot = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("semaphore never closed"),
        };
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            next = consumer.next() => next,
        };
        while tasks.try_join_next().is_some() {}
        match next {
            Some(Ok(delivery)) => {
                let (pipeline, metrics, shutdown) =
                    (pipeline.clone(), metrics.clone(), handlers_stop.clone());
                tasks.spawn(async move {
                    handle(delivery, &pipeline, &metrics, &shutdown).await;
                    drop(slot);
                });
            }
            // The connection is going: the session notices and reconnects.
            Some(Err(_)) | None => break,
        }
    }
    if channel.status().connected() {
        let tag = consumer.tag();
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
    }
    handlers_stop.cancel();
    while tasks.join_next().await.is_some() {}
}

/// Runs one delivery's broadcast handlers, retrying transient failures in
/// place, then acks it.
async fn handle(
    delivery: Delivery,
    pipeline: &Pipeline,
    metrics: &Metrics,
    stop: &CancellationToken,
) {
    let Delivery {
        exchange,
        routing_key,
        properties,
        data,
        acker,
        ..
    } = delivery;
    let mut incoming = Incoming::read(exchange.as_str(), routing_key.as_str(), &properties, &data);
    let span = info_span!(
        "broadcast",
        event = %incoming.event_type,
        message_id = %incoming.message_id,
    );
    async {
        loop {
            let processed = pipeline
                .process_incoming(incoming.clone(), &properties, &data, stop)
                .await;
            record(metrics, &processed);
            let again = match &processed.settlement {
                Settlement::Ack | Settlement::Ignore { .. } => None,
                Settlement::Retry(retry) => Some(retry),
                Settlement::DeadLetter(dead) => {
                    dropped(metrics, &processed, &dead.handlers, &dead.errors);
                    None
                }
                Settlement::RetryAndDeadLetter(retry, dead) => {
                    dropped(metrics, &processed, &dead.handlers, &dead.errors);
                    Some(retry)
                }
            };
            let Some(retry) = again else { break };
            // Shutting down: what is still failing is dropped, not waited for.
            let waited = tokio::select! {
                _ = stop.cancelled() => false,
                _ = tokio::time::sleep(retry.step.delay) => true,
            };
            if !waited {
                dropped(metrics, &processed, &retry.handlers, &retry.errors);
                break;
            }
            incoming.attempt += 1;
            incoming.pending_handlers = Some(retry.handlers.clone());
        }
        match acker.ack(BasicAckOptions::default()).await {
            Ok(true) => {}
            // The channel closed first: the exclusive queue is gone with it,
            // and this delivery with it.
            Ok(false) => warn!("broadcast delivery not acked: its channel closed first"),
            Err(e) => warn!(error = %e, "broadcast delivery not acked"),
        }
    }
    .instrument(span)
    .await;
}

fn record(metrics: &Metrics, processed: &Processed) {
    let event = processed.incoming.event_type.as_str();
    for (run, outcome) in processed.runs.iter().zip(processed.run_outcomes()) {
        metrics.handler_ran(&run.handler, event, outcome, run.duration.as_secs_f64());
        if let Some(waited) = run.waited {
            metrics.permit_waited(&run.handler, waited.as_secs_f64());
        }
    }
}

fn dropped(metrics: &Metrics, processed: &Processed, handlers: &[String], errors: &[String]) {
    for handler in handlers {
        metrics.broadcast_dropped(handler);
    }
    error!(
        handlers = %handlers.join(","),
        attempt = processed.incoming.attempt,
        errors = %errors.join("; "),
        "broadcast event dropped on this instance: its handlers failed (broadcast handlers are not retried through the ladder)"
    );
}
