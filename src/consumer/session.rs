//! One connection's worth of consuming: open it (connect, declare the
//! topology, set the prefetch, subscribe), hand each delivery to a task that
//! settles it, and drain when the shutdown signal arrives or the connection
//! is lost.

use std::{future::Future, pin::Pin, sync::Arc};

use futures_util::StreamExt;
use lapin::{
    Channel, Connection, Consumer,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};
use tracing::{info, warn};

use super::{
    Worker, WorkerState,
    ack::Acks,
    fanout::{self, Broadcast},
    merge,
    outcome::RunReport,
    pipeline::{Pipeline, PipelineConfig},
    settle::Settler,
};
use crate::{
    connection,
    error::{Error, Result},
    metrics::QueueDepths,
    publisher::Publisher,
    wire,
};

/// How a session ended.
pub(super) enum SessionEnd {
    /// The shutdown signal arrived and the session drained.
    Shutdown,
    /// The connection, channel or consumer was lost (or never opened).
    Lost {
        /// What happened.
        error: Error,
        /// Whether the session got as far as consuming (resets the backoff).
        consumed: bool,
    },
}

/// How long closing the channel and connections may wait for the broker's
/// close-ok. A silent broker (a partitioned network) would otherwise hold the
/// worker until the heartbeat gives up; dropping the connection instead lets
/// the broker requeue whatever was not acked when it notices.
pub(super) const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A subscribed consumer on its own connection.
struct Subscribed {
    /// Shared with the queue-depth refresh, which reads on a channel of its own.
    conn: Arc<Connection>,
    channel: Channel,
    consumer: Consumer,
    tag: String,
    /// An ordered app's shard consumers, on the same channel (so one ack
    /// window covers every delivery tag), with their tags.
    shards: Vec<(Consumer, String)>,
}

/// What the consumers of a session yield, in delivery-tag order.
type Deliveries = futures_util::stream::BoxStream<'static, merge::Item>;

impl Subscribed {
    fn deliveries(&self) -> Deliveries {
        use futures_util::stream;
        if self.shards.is_empty() {
            // One consumer: its own order is the tag order.
            return self
                .consumer
                .clone()
                .map(Some)
                .chain(stream::once(async { None }))
                .boxed();
        }
        let all = std::iter::once(&self.consumer)
            .chain(self.shards.iter().map(|(c, _)| c))
            .cloned()
            .collect();
        merge::InTagOrder::new(all).boxed()
    }
}

impl Worker {
    /// One session: ends on shutdown (after draining) or when the
    /// connection, channel or consumer is lost.
    pub(super) async fn session<F: Future<Output = ()>>(
        &self,
        publisher: &Publisher,
        shutdown: &mut Pin<&mut F>,
        report: &mut RunReport,
    ) -> SessionEnd {
        let sub = match self.subscribe().await {
            Ok(sub) => sub,
            Err(error) => {
                return SessionEnd::Lost {
                    error,
                    consumed: false,
                };
            }
        };
        let queue = self.settings.app_queue();
        // Before readiness, so the first scrape shows the queues' depths;
        // stopped before the connection closes.
        let depths = QueueDepths::start(
            sub.conn.clone(),
            super::queue_names(&self.settings, &self.registry),
            &self.metrics,
        )
        .await;
        let broadcast = match self.start_broadcast(&sub.conn).await {
            Ok(broadcast) => broadcast,
            Err(error) => {
                drop(depths);
                close(&sub.channel, &sub.conn).await;
                return SessionEnd::Lost {
                    error,
                    consumed: false,
                };
            }
        };
        info!(queue = %queue, consumer_tag = %sub.tag, handlers = self.registry.len(), "consuming");
        self.metrics.set_connected(&self.settings.app_queue(), true);
        self.state.send_replace(WorkerState::Consuming);

        let (acks, timer) = Acks::start(self.outcomes.clone(), self.metrics.ack_frames(&queue));
        let settler = Arc::new(Settler::new(
            &self.settings,
            acks.clone(),
            Pipeline::new(
                self.registry.clone(),
                PipelineConfig::from_settings(&self.settings),
            ),
            Box::new(publisher.clone()),
            self.outcomes.clone(),
            self.metrics.clone(),
        ));
        let mut tasks = JoinSet::new();
        let mut deliveries = sub.deliveries();
        let lost_reason = self
            .consume(
                &mut deliveries,
                &acks,
                &settler,
                &mut tasks,
                shutdown,
                report,
            )
            .await;
        // The whole drain, basic.cancel included, fits in the shutdown timeout.
        let deadline = Instant::now() + self.settings.consumer.shutdown_timeout;
        if lost_reason.is_none() {
            self.cancel(&sub, deadline).await;
            settler.stop_handlers();
        }
        self.drain(&mut tasks, report, deadline).await;
        // Every task has ended: ack what is ready while the channel is open.
        acks.finish(timer).await;
        if let Some(broadcast) = broadcast {
            broadcast.stop(deadline).await;
            if lost_reason.is_some() {
                // The exclusive queue goes with the connection.
                *self
                    .broadcast_lost_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
            }
        }
        drop(depths);
        close(&sub.channel, &sub.conn).await;
        match lost_reason {
            None => SessionEnd::Shutdown,
            Some(reason) => SessionEnd::Lost {
                error: Error::ConsumerStopped { queue, reason },
                consumed: true,
            },
        }
    }

    /// Declares this instance's broadcast queue and consumes it, when the
    /// app has broadcast handlers; counts the gap since the last session
    /// lost it.
    async fn start_broadcast(&self, conn: &Connection) -> Result<Option<Broadcast>> {
        let (Some(queue), Some(handlers)) = (&self.broadcast_queue, self.registry.broadcast_part())
        else {
            return Ok(None);
        };
        let started = Broadcast::start(
            conn,
            queue,
            &self.registry.broadcast_binding_keys(),
            fanout::pipeline(handlers, &self.settings),
            &self.settings,
            self.metrics.clone(),
        )
        .await?;
        let lost_at = self
            .broadcast_lost_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(lost_at) = lost_at {
            let gap = lost_at.elapsed();
            self.metrics
                .broadcast_gap(&self.settings.app_queue(), gap.as_secs_f64());
            warn!(
                queue = %queue,
                gap = ?gap,
                "the broadcast queue is back after a lost connection; events published meanwhile were not received here"
            );
        }
        Ok(Some(started))
    }

    /// Connects, declares the topology, sets the prefetch and subscribes.
    async fn subscribe(&self) -> Result<Subscribed> {
        let settings = &self.settings;
        let conn = connection::open(
            &settings.amqp,
            &format!("burrow consumer ({})", settings.app.name),
        )
        .await?;
        let queue = settings.app_queue();
        let tag = consumer_tag(&settings.app.name);
        let opened = async {
            self.topology().declare(&conn).await?;
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| Error::amqp("channel.open (consumer)", e))?;
            channel
                .basic_qos(settings.consumer.prefetch, BasicQosOptions::default())
                .await
                .map_err(|e| Error::amqp("basic.qos", e))?;
            let consumer = channel
                .basic_consume(
                    wire::short_string("queue name", &queue)?,
                    wire::short_string("consumer tag", &tag)?,
                    BasicConsumeOptions::default(),
                    consume_arguments(settings),
                )
                .await
                .map_err(|e| Error::amqp(format!("basic.consume on '{queue}'"), e))?;
            // Every instance subscribes to every shard; the broker makes one
            // consumer per shard the active one (x-single-active-consumer).
            let mut shards = Vec::new();
            for shard in self
                .topology()
                .shards
                .iter()
                .flat_map(|s| s.shard_queues.clone())
            {
                let shard_tag = format!("{tag}.{}", shard.rsplit('.').next().unwrap_or("shard"));
                let consumer = channel
                    .basic_consume(
                        wire::short_string("queue name", &shard)?,
                        wire::short_string("consumer tag", &shard_tag)?,
                        BasicConsumeOptions::default(),
                        consume_arguments(settings),
                    )
                    .await
                    .map_err(|e| Error::amqp(format!("basic.consume on '{shard}'"), e))?;
                shards.push((consumer, shard_tag));
            }
            Ok::<_, Error>((channel, consumer, shards))
        }
        .await;
        match opened {
            Ok((channel, consumer, shards)) => Ok(Subscribed {
                conn: Arc::new(conn),
                channel,
                consumer,
                tag,
                shards,
            }),
            Err(e) => {
                if conn.status().connected() {
                    let _ = conn.close(200, "start-up failed".into()).await;
                }
                Err(e)
            }
        }
    }

    /// Takes deliveries until the shutdown signal (`None`) or until the
    /// consumer ends (`Some(why)`). Each is settled in place when it
    /// completes on its first poll, else by a task of its own.
    async fn consume<F: Future<Output = ()>>(
        &self,
        deliveries: &mut Deliveries,
        acks: &Acks,
        settler: &Arc<Settler>,
        tasks: &mut JoinSet<()>,
        shutdown: &mut Pin<&mut F>,
        report: &mut RunReport,
    ) -> Option<String> {
        let slots = Arc::new(Semaphore::new(self.settings.consumer.concurrency));
        loop {
            // Take a slot first: with every slot busy, deliveries stay in the
            // prefetch buffer (unacked, owned by the broker) instead of piling
            // up as tasks.
            let slot = tokio::select! {
                biased;
                _ = shutdown.as_mut() => return None,
                slot = slots.clone().acquire_owned() => slot.expect("semaphore never closed"),
            };
            let next = tokio::select! {
                biased;
                _ = shutdown.as_mut() => return None,
                next = deliveries.next() => next.flatten(),
            };
            while let Some(done) = tasks.try_join_next() {
                report.settled += u64::from(done.is_ok());
            }
            match next {
                Some(Ok(delivery)) => {
                    // In arrival order, before the task starts: the ack
                    // window must know every delivery a multiple ack could cover.
                    acks.received(delivery.delivery_tag);
                    let settler = settler.clone();
                    let in_flight = self.metrics.delivery_started();
                    let mut work = Box::pin(async move {
                        settler.handle(delivery, in_flight).await;
                        drop(slot);
                    });
                    // Most deliveries settle on their first poll: the
                    // handlers return without waiting and another delivery's
                    // task is sending the ack frame that will cover this one
                    // (super::ack). Those need no task of their own, and no
                    // wake-up of another worker thread to run it. The rest
                    // (a handler awaiting I/O, this delivery sending the
                    // frame, a retry copy awaiting its confirm) go on in a
                    // task; its first poll registers the wakers that count.
                    // A panic here ends this delivery as a panicking task
                    // would: unsettled, and not the consumer loop with it.
                    let mut first = std::task::Context::from_waker(std::task::Waker::noop());
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        work.as_mut().poll(&mut first)
                    })) {
                        Ok(std::task::Poll::Ready(())) => report.settled += 1,
                        Ok(std::task::Poll::Pending) => {
                            tasks.spawn(work);
                        }
                        Err(_) => {}
                    }
                }
                Some(Err(e)) => return Some(format!("consumer error: {e}")),
                // basic.cancel from the broker (queue deleted, consumer
                // timeout) or the channel closed: subscribe again.
                None => {
                    return Some(
                        "the broker cancelled the consumer (queue deleted or channel closed)"
                            .into(),
                    );
                }
            }
        }
    }

    /// Shutdown: readiness turns 503 and the broker stops sending.
    async fn cancel(&self, sub: &Subscribed, deadline: Instant) {
        // Gauges before the state: whoever sees readiness turn 503 also
        // scrapes `burrow_connected 0`.
        self.metrics
            .set_connected(&self.settings.app_queue(), false);
        self.state.send_replace(WorkerState::Draining);
        info!("shutting down: no new deliveries; waiting for in-flight handlers");
        if !sub.channel.status().connected() {
            return;
        }
        // A broker that went silent never answers; waiting for the heartbeat
        // to notice (2 × amqp.heartbeat) would outlast a container's
        // termination grace period.
        let cancels = async {
            for tag in std::iter::once(&sub.tag).chain(sub.shards.iter().map(|(_, t)| t)) {
                let tag = wire::short_string("consumer tag", tag)?;
                sub.channel
                    .basic_cancel(tag, BasicCancelOptions::default())
                    .await
                    .map_err(|e| Error::amqp("basic.cancel", e))?;
            }
            Ok::<_, Error>(())
        };
        match tokio::time::timeout_at(deadline, cancels).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "basic.cancel failed; closing the channel returns unstarted deliveries anyway");
            }
            Err(_) => {
                warn!(
                    "basic.cancel got no answer within the shutdown timeout; closing the channel returns unstarted deliveries anyway"
                );
            }
        }
    }

    /// Lets in-flight deliveries settle within `consumer.shutdown_timeout`;
    /// the tasks still running then are stopped without an ack, and their
    /// deliveries come back to the queue.
    async fn drain(&self, tasks: &mut JoinSet<()>, report: &mut RunReport, deadline: Instant) {
        let timeout = self.settings.consumer.shutdown_timeout;
        let drained = tokio::time::timeout_at(deadline, async {
            while let Some(done) = tasks.join_next().await {
                report.settled += u64::from(done.is_ok());
            }
        })
        .await;
        if drained.is_err() {
            let abandoned = tasks.len();
            tasks.abort_all();
            // A cancelled task drops its in-flight guard with it.
            while tasks.join_next().await.is_some() {}
            report.abandoned += abandoned;
            warn!(
                abandoned,
                timeout = %humantime::format_duration(timeout),
                "handlers still running at the deadline were stopped without ack; their deliveries will be redelivered"
            );
        }
    }
}

pub(super) async fn close(channel: &Channel, conn: &Connection) {
    let closing = async {
        if channel.status().connected() {
            let _ = channel.close(200, "worker stopping".into()).await;
        }
        if conn.status().connected() {
            let _ = conn.close(200, "worker stopping".into()).await;
        }
    };
    if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
        warn!(
            timeout = %humantime::format_duration(CLOSE_TIMEOUT),
            "the broker did not answer the close; dropping the connection"
        );
    }
}

/// The consumer's arguments: `x-consumer-timeout`, the broker's deadline
/// for acknowledging a delivery. RabbitMQ applies it to quorum queues from
/// 4.3; before (3.10 to 4.2, checked on 3.10 and 4.0) the broker-wide
/// `consumer_timeout` (30 minutes by default) applies and the argument is
/// ignored. Past the deadline, RabbitMQ closes the channel (3.x, 4.0-4.2)
/// or cancels the consumer (4.3+) and every unacknowledged delivery goes
/// back to the queue; the session then ends and the worker subscribes
/// again. burrow's own handler timeout ends handlers far sooner, so this
/// fires only for a delivery that is stuck (a handler blocking its thread).
fn consume_arguments(settings: &crate::config::Settings) -> FieldTable {
    let timeout = settings
        .consumer
        .effective_ack_timeout(settings.publisher.confirm_timeout);
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-consumer-timeout".into(),
        lapin::types::AMQPValue::LongLongInt(
            i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX),
        ),
    );
    arguments
}

fn consumer_tag(app: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    let id = uuid::Uuid::new_v4().simple().to_string();
    let tag = format!("burrow.{app}.{host}.{}.{}", std::process::id(), &id[..8]);
    tag.chars().take(200).collect()
}
