//! Browsing the dead-letter queue over AMQP: `basic.get` with manual acks,
//! letters held unacknowledged while an operation runs and returned with one
//! `basic.nack(multiple, requeue)` at the end (see the [module docs](super)
//! on what that does to delivery counts).

use lapin::{
    Channel, Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions, QueuePurgeOptions,
    },
    types::FieldTable,
};

use crate::{
    config::Settings,
    connection,
    error::{Error, Result},
    wire,
};

/// A connection and channel on one app's dead-letter queue, opened for one
/// operation and closed by [`Browse::finish`] or [`Browse::close`].
pub(super) struct Browse {
    conn: Connection,
    channel: Channel,
    queue: String,
}

/// The letters an operation took and keeps unacknowledged until it ends:
/// the highest delivery tag, so one `basic.nack(multiple)` returns them all.
#[derive(Default)]
pub(super) struct Borrowed(Option<u64>);

impl Borrowed {
    pub(super) fn hold(&mut self, tag: u64) {
        self.0 = Some(self.0.map_or(tag, |t| t.max(tag)));
    }
}

impl Browse {
    pub(super) async fn open(settings: &Settings) -> Result<Self> {
        let conn = connection::open(
            &settings.amqp,
            &format!("burrow dlq ({})", settings.app.name),
        )
        .await?;
        let channel = match conn.create_channel().await {
            Ok(channel) => channel,
            Err(e) => {
                let _ = conn.close(200, "burrow dlq done".into()).await;
                return Err(Error::amqp("channel.open (dlq)", e));
            }
        };
        Ok(Self {
            conn,
            channel,
            queue: settings.dead_letter_queue(),
        })
    }

    /// Ready messages in the queue (passive declare).
    pub(super) async fn count(&self) -> Result<u32> {
        self.channel
            .queue_declare(
                wire::short_string("queue name", &self.queue)?,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map(|q| q.message_count())
            .map_err(|e| {
                Error::amqp(
                    format!(
                        "queue.declare (passive) of dead-letter queue '{}' (if it does not exist, \
                         start the app's worker or run `burrow topology apply` first)",
                        self.queue
                    ),
                    e,
                )
            })
    }

    /// Removes one letter taken with [`Browse::get`] for good.
    pub(super) async fn ack(&self, tag: u64, message_id: &str) -> Result<()> {
        self.channel
            .basic_ack(tag, BasicAckOptions::default())
            .await
            .map_err(|e| {
                Error::amqp(
                    format!(
                        "basic.ack of dead letter '{message_id}' in '{}' (it stays in the queue; \
                         after a replay, a later replay would deliver it again)",
                        self.queue
                    ),
                    e,
                )
            })
    }

    /// Removes every ready letter (`queue.purge`); returns how many.
    pub(super) async fn purge(&self) -> Result<usize> {
        self.channel
            .queue_purge(
                wire::short_string("queue name", &self.queue)?,
                QueuePurgeOptions::default(),
            )
            .await
            .map(|n| n as usize)
            .map_err(|e| Error::amqp(format!("queue.purge '{}'", self.queue), e))
    }

    /// The next message, held unacknowledged.
    pub(super) async fn get(&self) -> Result<Option<Delivery>> {
        self.channel
            .basic_get(
                wire::short_string("queue name", &self.queue)?,
                BasicGetOptions { no_ack: false },
            )
            .await
            .map(|m| m.map(|m| m.delivery))
            .map_err(|e| Error::amqp(format!("basic.get from '{}'", self.queue), e))
    }

    /// Returns every held message to the queue, closes, and hands back
    /// `result` (or the requeue's error when `result` was fine).
    pub(super) async fn finish<T>(self, held: Borrowed, result: Result<T>) -> Result<T> {
        let mut requeued = Ok(());
        if let Some(tag) = held.0
            && self.channel.status().connected()
        {
            requeued = self
                .channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(|e| {
                    Error::amqp(
                        format!(
                            "basic.nack (return browsed letters to '{}'; closing the connection returns them anyway)",
                            self.queue
                        ),
                        e,
                    )
                });
        }
        self.close().await;
        let value = result?;
        requeued?;
        Ok(value)
    }

    pub(super) async fn close(self) {
        if self.channel.status().connected() {
            let _ = self.channel.close(200, "burrow dlq done".into()).await;
        }
        if self.conn.status().connected() {
            let _ = self.conn.close(200, "burrow dlq done".into()).await;
        }
    }
}
