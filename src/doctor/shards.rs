//! The shard check of an ordered app (`[ordering]`).

use super::{Check, Status, check};

/// An ordered app's shard exchange exists: then the broker knows the
/// `x-consistent-hash` type (an exchange of an unknown type cannot be
/// declared). A passive declare, so doctor changes nothing.
pub(super) async fn shard_exchange_check(
    conn: &lapin::Connection,
    shards: &crate::ShardExchange,
) -> Check {
    let probe = async {
        let channel = conn.create_channel().await?;
        let declared = channel
            .exchange_declare(
                shards.name.as_str().into(),
                lapin::ExchangeKind::Custom("x-consistent-hash".into()),
                lapin::options::ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        if channel.status().connected() {
            let _ = channel.close(200, "doctor".into()).await;
        }
        declared
    };
    match probe.await {
        Ok(()) => check(
            "topology.shards",
            Status::Pass,
            format!(
                "the shard exchange {} routes to {} shard queues",
                shards.name,
                shards.shard_queues.len()
            ),
            None,
        ),
        Err(e) => check(
            "topology.shards",
            Status::Fail,
            format!(
                "the shard exchange {} is missing ({})",
                shards.name,
                crate::redact::redact(&e.to_string())
            ),
            Some(
                "run `burrow topology apply` (or start a worker); it needs the consistent-hash \
                 exchange: `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange` on every node"
                    .into(),
            ),
        ),
    }
}
