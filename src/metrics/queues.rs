//! `burrow_queue_messages` and `burrow_queue_consumers`: the depth of the
//! app's own queues (the app queue, each retry step, the dead-letter queue),
//! so a dashboard or an alert needs no exporter besides burrow.
//!
//! The broker answers a passive `queue.declare` with the queue's ready
//! message count and consumer count; it creates nothing and needs no
//! permission on the queue (<https://www.rabbitmq.com/docs/access-control>),
//! the same read KEDA's `amqp` scaler makes. The worker reads them on a
//! channel of its consumer connection, once right after declaring the
//! topology and then every [`REFRESH_INTERVAL`], until the session ends.

use std::{collections::HashSet, sync::Arc, time::Duration};

use lapin::{Channel, Connection, options::QueueDeclareOptions, types::FieldTable};
use prometheus_client::{
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{sync::oneshot, task::JoinHandle, time::MissedTickBehavior};
use tracing::{debug, warn};

use super::labels::QueueLabel;
use crate::wire;

/// How often the worker reads its queues' depths. A passive declare is one
/// small round trip per queue, so this costs the broker next to nothing; 15 s
/// is Prometheus' usual scrape interval and the KEDA ScaledObject's
/// `pollingInterval` in `deploy/kubernetes`, so a scrape sees a value at most
/// one interval old. Not a setting: nothing gains from reading more often
/// than the scrapes that show it.
pub(crate) const REFRESH_INTERVAL: Duration = Duration::from_secs(15);

/// How long the first read may hold a session before it announces that it
/// consumes: long enough for a broker that answers at all, short enough that
/// a slow one delays readiness by no more than this (the values then arrive
/// with the next read).
const FIRST_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One queue's depth as the broker reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueDepth {
    /// The queue.
    pub(crate) name: String,
    /// Ready messages: waiting for a consumer, not counting those delivered
    /// and not yet acknowledged. `None` when the broker did not answer.
    pub(crate) messages: Option<u32>,
    /// Consumers subscribed to the queue. `None` when the broker did not answer.
    pub(crate) consumers: Option<u32>,
}

/// Reads the depth of each of `queues`, in order, with a passive
/// `queue.declare` on `channel`: one [`QueueDepth`] per queue.
///
/// A declare the broker refuses (`404 NOT_FOUND` for a queue that does not
/// exist) is a channel exception in AMQP 0-9-1: the broker closes the
/// channel. That queue and every one after it then read `None`, and the
/// channel is no longer usable: open another to read the rest (the worker's
/// refresh does, skipping the refused queue).
pub(crate) async fn probe(channel: &Channel, queues: &[String]) -> Vec<QueueDepth> {
    let mut depths = Vec::with_capacity(queues.len());
    let mut refused = false;
    for name in queues {
        let answer = if refused {
            None
        } else {
            match declare_passive(channel, name).await {
                Ok(counts) => Some(counts),
                Err(error) => {
                    debug!(queue = %name, %error, "passive queue.declare failed");
                    refused = true;
                    None
                }
            }
        };
        depths.push(QueueDepth {
            name: name.clone(),
            messages: answer.map(|(messages, _)| messages),
            consumers: answer.map(|(_, consumers)| consumers),
        });
    }
    depths
}

async fn declare_passive(channel: &Channel, name: &str) -> crate::Result<(u32, u32)> {
    let queue = channel
        .queue_declare(
            wire::short_string("queue name", name)?,
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| crate::Error::amqp(format!("queue.declare (passive) '{name}'"), e))?;
    Ok((queue.message_count(), queue.consumer_count()))
}

/// The two gauge families, labelled with the queue's name.
#[derive(Debug, Clone, Default)]
pub(super) struct QueueGauges {
    messages: Family<QueueLabel, Gauge>,
    consumers: Family<QueueLabel, Gauge>,
}

impl QueueGauges {
    /// Creates the families in `registry`.
    pub(super) fn register(registry: &mut Registry) -> Self {
        let gauges = Self::default();
        registry.register(
            "burrow_queue_messages",
            "Ready messages in each of the app's queues, as of the last passive queue.declare",
            gauges.messages.clone(),
        );
        registry.register(
            "burrow_queue_consumers",
            "Consumers of each of the app's queues, as of the last passive queue.declare",
            gauges.consumers.clone(),
        );
        gauges
    }

    /// Creates the series of every queue in `queues`, at 0.
    pub(super) fn prime(&self, queues: &[String]) {
        for queue in queues {
            let label = QueueLabel {
                queue: queue.clone(),
            };
            let _ = self.messages.get_or_create(&label);
            let _ = self.consumers.get_or_create(&label);
        }
    }

    /// Records what the broker answered; a queue it did not answer for
    /// keeps its last values.
    fn record(&self, depth: &QueueDepth) {
        let label = QueueLabel {
            queue: depth.name.clone(),
        };
        if let Some(messages) = depth.messages {
            self.messages.get_or_create(&label).set(i64::from(messages));
        }
        if let Some(consumers) = depth.consumers {
            self.consumers
                .get_or_create(&label)
                .set(i64::from(consumers));
        }
    }
}

/// The worker's refresh of its queues' gauges, for one session: a task of
/// its own on a channel of the consumer's connection, so a slow or refused
/// read never holds a delivery. Dropping it stops the task.
#[derive(Debug)]
pub(crate) struct QueueDepths {
    task: JoinHandle<()>,
}

impl QueueDepths {
    /// Reads every queue of `queues` once (waiting at most
    /// [`FIRST_READ_TIMEOUT`], so the first scrape after readiness has the
    /// values), then every [`REFRESH_INTERVAL`] until dropped.
    pub(crate) async fn start(
        connection: Arc<Connection>,
        queues: Vec<String>,
        metrics: &super::Metrics,
    ) -> Self {
        let (first, first_done) = oneshot::channel();
        let task = tokio::spawn(refresh(connection, queues, metrics.queues.clone(), first));
        // A timeout or a task that ended early both mean: no values yet,
        // which the primed series already say.
        let _ = tokio::time::timeout(FIRST_READ_TIMEOUT, first_done).await;
        Self { task }
    }
}

impl Drop for QueueDepths {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn refresh(
    connection: Arc<Connection>,
    queues: Vec<String>,
    gauges: QueueGauges,
    first: oneshot::Sender<()>,
) {
    let mut first = Some(first);
    let mut ticks = tokio::time::interval(REFRESH_INTERVAL);
    // After a read slower than the interval, wait a whole interval again
    // rather than reading twice in a row.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Queues the broker refused, left alone for the rest of the session:
    // every refusal closes a channel, and lapin logs each close as an error.
    // The next session declares the topology again.
    let mut refused: HashSet<String> = HashSet::new();
    let mut channel: Option<Channel> = None;
    loop {
        ticks.tick().await;
        let mut pending: Vec<String> = queues
            .iter()
            .filter(|q| !refused.contains(*q))
            .cloned()
            .collect();
        while !pending.is_empty() {
            let open = match channel.take().filter(|c| c.status().connected()) {
                Some(open) => open,
                None => match connection.create_channel().await {
                    Ok(open) => open,
                    Err(error) => {
                        // The connection is going: the session will end
                        // and stop this task.
                        debug!(%error, "no channel to read the queue depths on");
                        break;
                    }
                },
            };
            let depths = probe(&open, &pending).await;
            let answered = depths.iter().take_while(|d| d.messages.is_some()).count();
            for depth in &depths[..answered] {
                gauges.record(depth);
            }
            if answered == pending.len() {
                channel = Some(open);
                break;
            }
            if !connection.status().connected() {
                break;
            }
            let name = pending.remove(answered);
            warn!(
                queue = %name,
                "the broker refused a passive queue.declare of this queue (deleted while the worker runs?); \
                 its burrow_queue_messages and burrow_queue_consumers keep their last values until the \
                 worker reconnects and declares its topology again (`burrow topology verify` compares)"
            );
            refused.insert(name);
            pending.drain(..answered);
        }
        if let Some(first) = first.take() {
            let _ = first.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_primed_at_zero_and_a_missing_answer_keeps_the_last_value() {
        let mut registry = Registry::default();
        let gauges = QueueGauges::register(&mut registry);
        gauges.prime(&["events_a".into(), "events_a.dead".into()]);
        let render = || {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
            out
        };
        let text = render();
        for needle in [
            r#"burrow_queue_messages{queue="events_a"} 0"#,
            r#"burrow_queue_messages{queue="events_a.dead"} 0"#,
            r#"burrow_queue_consumers{queue="events_a"} 0"#,
            r#"burrow_queue_consumers{queue="events_a.dead"} 0"#,
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        gauges.record(&QueueDepth {
            name: "events_a.dead".into(),
            messages: Some(7),
            consumers: Some(0),
        });
        gauges.record(&QueueDepth {
            name: "events_a.dead".into(),
            messages: None,
            consumers: None,
        });
        let text = render();
        assert!(
            text.contains(r#"burrow_queue_messages{queue="events_a.dead"} 7"#),
            "{text}"
        );
    }
}
