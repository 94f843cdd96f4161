//! The shard topology of an ordered app (`[ordering] shards = N`).
//!
//! ```text
//! domain_events ──(the app's binding keys)──▶ events_<app>.shards ──▶ events_<app>.shard.1
//!   (topic)                                  (x-consistent-hash,      …
//!                                             hash-header             events_<app>.shard.N
//!                                             burrow-aggregate-id)    (single active consumer each)
//! ```
//!
//! The consistent-hash exchange (the `rabbitmq_consistent_hash_exchange`
//! plugin, shipped with RabbitMQ) sends every event of one aggregate to the
//! same shard, by the `burrow-aggregate-id` header. Each shard queue has
//! `x-single-active-consumer`: however many instances subscribe, one at a
//! time receives, in queue order, and another takes over when it goes.
//! <https://github.com/rabbitmq/rabbitmq-server/tree/main/deps/rabbitmq_consistent_hash_exchange>

use std::{collections::BTreeMap, fmt};

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions},
    types::{AMQPValue, FieldTable, LongString},
};

use super::{ArgValue, QueueRole, QueueSpec, classify_declare_error};
use crate::{
    config::Settings,
    error::{Error, Result},
    handler::Registry,
    wire::short_string,
};

/// The header the shard exchange hashes: the aggregate's id, which burrow's
/// publisher always sends.
const AGGREGATE_HEADER: &str = crate::wire::headers::AGGREGATE_ID;

/// Weight of each shard queue's binding: equal shares.
const WEIGHT: &str = "1";

/// The consistent-hash exchange of an ordered app and its shard queues.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShardExchange {
    /// `<app queue>.shards`.
    pub name: String,
    /// The header hashed (`burrow-aggregate-id`).
    pub hash_header: String,
    /// The binding keys `domain_events` routes to it with.
    pub keys: Vec<String>,
    /// The shard queues, `<app queue>.shard.<n>`, 1-based.
    pub shard_queues: Vec<String>,
}

impl ShardExchange {
    /// The shard exchange of `settings`' app, when ordering is on.
    pub(crate) fn for_app(settings: &Settings, registry: &Registry) -> Option<Self> {
        let shards = settings.ordering.shards;
        if shards == 0 {
            return None;
        }
        let app = settings.app_queue();
        Some(Self {
            name: format!("{app}.shards"),
            hash_header: AGGREGATE_HEADER.to_owned(),
            keys: registry.binding_keys(),
            shard_queues: (1..=shards).map(|n| format!("{app}.shard.{n}")).collect(),
        })
    }

    /// The shard queues, each with the app queue's `arguments` (the same
    /// type, dead-lettering and delivery limit) and a single active consumer.
    pub(super) fn queues(&self, arguments: BTreeMap<String, ArgValue>) -> Vec<QueueSpec> {
        self.shard_queues
            .iter()
            .zip(1u16..)
            .map(|(name, n)| {
                let mut arguments = arguments.clone();
                arguments.insert("x-single-active-consumer".into(), ArgValue::Bool(true));
                QueueSpec {
                    name: name.clone(),
                    role: QueueRole::Shard(n),
                    arguments,
                }
            })
            .collect()
    }

    /// Declares the exchange, binds it to `domain_exchange` with every key
    /// and binds each shard queue to it (the queues are declared already).
    pub(super) async fn declare_on(&self, channel: &Channel, domain_exchange: &str) -> Result<()> {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "hash-header".into(),
            AMQPValue::LongString(LongString::from(self.hash_header.as_bytes().to_vec())),
        );
        channel
            .exchange_declare(
                short_string("exchange name", &self.name)?,
                ExchangeKind::Custom("x-consistent-hash".into()),
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map_err(|e| {
                if e.to_string().contains("unknown exchange type") {
                    Error::config(
                        "ordering.shards",
                        format!(
                            "ordering.shards = {} needs the broker's consistent-hash exchange, which is not \
                             enabled: run `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange` on every \
                             node (it ships with RabbitMQ), or set ordering.shards = 0",
                            self.shard_queues.len()
                        ),
                    )
                } else {
                    classify_declare_error("exchange", &self.name, e)
                }
            })?;
        for key in &self.keys {
            channel
                .exchange_bind(
                    short_string("exchange name", &self.name)?,
                    short_string("exchange name", domain_exchange)?,
                    short_string("binding key", key)?,
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    classify_declare_error(
                        "binding",
                        &format!("{domain_exchange} -> {} ({key})", self.name),
                        e,
                    )
                })?;
        }
        for queue in &self.shard_queues {
            channel
                .queue_bind(
                    short_string("queue name", queue)?,
                    short_string("exchange name", &self.name)?,
                    short_string("binding key", WEIGHT)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    classify_declare_error("binding", &format!("{} -> {queue}", self.name), e)
                })?;
        }
        Ok(())
    }
}

impl fmt::Display for ShardExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "exchange {} (x-consistent-hash on header {}, durable)",
            self.name, self.hash_header
        )?;
        for key in &self.keys {
            writeln!(f, "binding (exchange) -> {} key {key}", self.name)?;
        }
        for queue in &self.shard_queues {
            writeln!(f, "binding {} -> {queue} weight {WEIGHT}", self.name)?;
        }
        Ok(())
    }
}
