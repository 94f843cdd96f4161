//! Declaring the chain: what the [`crate::Publisher`] does before its first
//! delayed publish.

use lapin::{
    Connection,
    options::{ExchangeBindOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};

use super::DelayChain;
use crate::{
    error::{Error, Result},
    topology::{argument_table, classify_declare_error, declare_exchange_on},
    wire::short_string,
};

impl DelayChain {
    /// Declares the event exchange, every level's exchange and queue, and
    /// the bindings between them, on a channel of `connection`. Idempotent;
    /// an entity that exists with other arguments is
    /// [`Error::TopologyMismatch`].
    ///
    /// The event exchange comes first: level 0 binds to it and dead-letters
    /// into it. Queues may name a dead-letter exchange before it exists
    /// (RabbitMQ checks it only when it dead-letters), but exchange-to-exchange
    /// bindings need both ends, so every exchange is declared before any binding.
    pub async fn declare(&self, connection: &Connection) -> Result<()> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::amqp("channel.open (delay queues)", e))?;
        let result = async {
            declare_exchange_on(&channel, &self.exchange).await?;
            for level in &self.levels {
                declare_exchange_on(&channel, &level.name).await?;
            }
            for level in &self.levels {
                channel
                    .queue_declare(
                        short_string("queue name", &level.name)?,
                        QueueDeclareOptions::durable(),
                        argument_table(&self.queue_arguments(level))?,
                    )
                    .await
                    .map_err(|e| classify_declare_error("queue", &level.name, e))?;
            }
            for binding in self.bindings() {
                let what = format!(
                    "{} -> {} ({})",
                    binding.source, binding.destination, binding.key
                );
                let destination = short_string("binding destination", &binding.destination)?;
                let source = short_string("exchange name", &binding.source)?;
                let key = short_string("binding key", &binding.key)?;
                let bound = if binding.to_queue {
                    channel
                        .queue_bind(
                            destination,
                            source,
                            key,
                            QueueBindOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                } else {
                    channel
                        .exchange_bind(
                            destination,
                            source,
                            key,
                            ExchangeBindOptions::default(),
                            FieldTable::default(),
                        )
                        .await
                };
                bound.map_err(|e| classify_declare_error("binding", &what, e))?;
            }
            Ok::<_, Error>(())
        }
        .await;
        if channel.status().connected() {
            let _ = channel.close(200, "delay queues declared".into()).await;
        }
        result
    }

    /// Deletes every level's queue (with the messages waiting in it) and
    /// exchange; the event exchange stays. For tests and demos; burrow never
    /// calls it.
    pub async fn delete(&self, connection: &Connection) -> Result<()> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::amqp("channel.open (delay queues)", e))?;
        for level in &self.levels {
            let name = short_string("queue name", &level.name)?;
            channel
                .queue_delete(name.clone(), lapin::options::QueueDeleteOptions::default())
                .await
                .map_err(|e| Error::amqp(format!("queue.delete '{}'", level.name), e))?;
            channel
                .exchange_delete(name, lapin::options::ExchangeDeleteOptions::default())
                .await
                .map_err(|e| Error::amqp(format!("exchange.delete '{}'", level.name), e))?;
        }
        let _ = channel.close(200, "delay queues deleted".into()).await;
        Ok(())
    }
}
