//! Comparing a [`Topology`] with what the broker holds, without changing it.
//!
//! For the exchange and each queue, [`verify`] first declares it passively
//! on a fresh channel: `NOT_FOUND` (which closes that channel) means it is
//! [`Drift::Missing`]. For one that exists it then declares it for real, with
//! the same flags and arguments burrow uses, again on a fresh channel.
//! RabbitMQ treats an equivalent declaration of an existing entity as a
//! no-op and answers a different one with `PRECONDITION_FAILED -
//! inequivalent arg ...` without touching the entity: that is a
//! [`Drift::Mismatch`]. RabbitMQ names only the first argument that
//! differs, in its own order, so fix it and verify again to see the next.
//! When that first one is not `x-queue-type`, a third declaration with only
//! `x-queue-type` finds out whether the queue type differs, and if so that
//! is reported instead (as [`Topology::declare`] does): no setting fixes a
//! classic queue where a quorum queue is declared.
//!
//! What it cannot check:
//! - **Bindings.** AMQP 0-9-1 has no way to list bindings, and
//!   `queue.bind` would create a missing one, so bindings are not checked
//!   here. `burrow topology verify` and `burrow doctor` compare them through
//!   the management API when `management.url` is set ([`Drift::Missing`]
//!   and [`Drift::Unexpected`] of kind `binding`);
//!   `burrow topology apply` re-creates missing ones.
//! - **Policies.** A policy may override arguments (delivery limit, TTL,
//!   ...) without them showing as a mismatch.
//! - **Races.** If an entity is deleted between the passive and the real
//!   declaration, the real one creates it. The window is one round trip.

use std::fmt;

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::FieldTable,
};

use crate::{
    error::{Error, Result},
    topology::{QueueSpec, Topology},
    wire::short_string,
};

/// One difference between the declared topology and the broker.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "drift", rename_all = "snake_case")]
pub enum Drift {
    /// The entity does not exist on the broker.
    Missing {
        /// `exchange`, `queue` or `binding`.
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// The entity exists with a different flag or argument.
    Mismatch {
        /// `exchange` or `queue`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The argument that differs (`x-queue-type`, `durable`, `type`, ...).
        argument: String,
        /// The value burrow declares.
        declared: String,
        /// The value the broker holds.
        existing: String,
    },
    /// The broker holds an entity burrow does not declare (a binding left
    /// from a removed handler: the app receives events nothing handles).
    Unexpected {
        /// `binding`.
        kind: &'static str,
        /// What it is (`exchange -> queue (key)` for a binding).
        name: String,
    },
}

impl Drift {
    /// `exchange` or `queue`.
    pub fn kind(&self) -> &'static str {
        match self {
            Drift::Missing { kind, .. }
            | Drift::Mismatch { kind, .. }
            | Drift::Unexpected { kind, .. } => kind,
        }
    }

    /// The entity's name.
    pub fn name(&self) -> &str {
        match self {
            Drift::Missing { name, .. }
            | Drift::Mismatch { name, .. }
            | Drift::Unexpected { name, .. } => name,
        }
    }
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::Missing { kind, name } => write!(
                f,
                "{kind} '{name}' is missing on the broker. \
                 Fix: run `burrow topology apply` (or start the worker), which declares it"
            ),
            Drift::Unexpected { kind, name } => write!(
                f,
                "{kind} '{name}' exists on the broker but burrow does not declare it, so the app \
                 receives events no handler takes (they are acked unhandled). Fix: remove it \
                 (`rabbitmqctl` or the management UI) if no handler will take them again"
            ),
            Drift::Mismatch {
                kind,
                name,
                argument,
                declared,
                existing,
            } => {
                write!(
                    f,
                    "{kind} '{name}' exists with {argument} = {existing}, but burrow declares \
                     {argument} = {declared}. RabbitMQ cannot change an existing {kind}. Fix: \
                     set the configuration to match the broker, or migrate: "
                )?;
                if *kind == "queue" {
                    write!(
                        f,
                        "drain '{name}', delete it (`rabbitmqctl delete_queue {name}`) and run \
                         `burrow topology apply`"
                    )
                } else {
                    write!(
                        f,
                        "delete '{name}' (its bindings go with it, for every app) and run \
                         `burrow topology apply` for each app that binds to it"
                    )
                }
            }
        }
    }
}

/// Compares `topology`'s exchange and queues with the broker and returns
/// every difference found (empty when they match), exchange first, then
/// the queues in topology order. Changes nothing on the broker (see the
/// [module docs](self) for the one race). Bindings are not checked: AMQP
/// 0-9-1 cannot list them.
///
/// Errors other than "missing" and "inequivalent" (access refused, a queue
/// locked by another connection, a lost connection) end the check with
/// [`Error::TopologyRefused`] or [`Error::Amqp`].
pub async fn verify(topology: &Topology, connection: &Connection) -> Result<Vec<Drift>> {
    let mut drifts = Vec::new();
    if let Some(drift) = check_exchange(&topology.exchange, connection).await? {
        drifts.push(drift);
    }
    for queue in &topology.queues {
        if let Some(drift) = check_queue(queue, connection).await? {
            drifts.push(drift);
        }
    }
    Ok(drifts)
}

async fn check_exchange(name: &str, connection: &Connection) -> Result<Option<Drift>> {
    let declare = |passive: bool| {
        let name = name.to_owned();
        async move {
            let channel = open(connection).await?;
            let result = channel
                .exchange_declare(
                    short_string("exchange name", &name)?,
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        passive,
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            close(&channel).await;
            Ok::<_, Error>(result)
        }
    };
    if let Err(e) = declare(true).await? {
        return missing_or_error("exchange", name, e);
    }
    match declare(false).await? {
        Ok(()) => Ok(None),
        Err(e) => mismatch_or_error("exchange", name, e),
    }
}

async fn check_queue(queue: &QueueSpec, connection: &Connection) -> Result<Option<Drift>> {
    let name = short_string("queue name", &queue.name)?;
    let arguments = queue.argument_table()?;
    let declare = |options: QueueDeclareOptions, arguments: FieldTable| {
        let name = name.clone();
        async move {
            let channel = open(connection).await?;
            let result = channel.queue_declare(name, options, arguments).await;
            close(&channel).await;
            Ok::<_, Error>(result.map(|_| ()))
        }
    };
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    if let Err(e) = declare(passive, FieldTable::default()).await? {
        return missing_or_error("queue", &queue.name, e);
    }
    let drift = match declare(QueueDeclareOptions::durable(), arguments).await? {
        Ok(()) => return Ok(None),
        Err(e) => mismatch_or_error("queue", &queue.name, e)?,
    };
    // A retry step an earlier burrow declared without x-delivery-limit is
    // kept by the worker (`QueueSpec::as_declared_before`): not drift.
    if let Some(older) = queue.as_declared_before()
        && declare(QueueDeclareOptions::durable(), older.argument_table()?)
            .await?
            .is_ok()
    {
        return Ok(None);
    }
    // RabbitMQ reports the first argument that differs in its own order, so
    // a classic queue met by a quorum declaration shows up as an
    // `x-dead-letter-exchange` mismatch, which no setting can fix. As
    // `Topology::declare` does, ask again with only `x-queue-type` and
    // report that when it is what differs.
    if let Some(Drift::Mismatch { argument, .. }) = &drift
        && argument != "x-queue-type"
        && let Some(Error::TopologyMismatch {
            kind,
            name,
            argument,
            declared,
            existing,
        }) = crate::topology::probe_queue_type(connection, queue).await
    {
        return Ok(Some(Drift::Mismatch {
            kind,
            name,
            argument,
            declared,
            existing,
        }));
    }
    Ok(drift)
}

async fn open(connection: &Connection) -> Result<Channel> {
    connection
        .create_channel()
        .await
        .map_err(|e| Error::amqp("channel.open (topology verify)", e))
}

async fn close(channel: &Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "topology verified".into()).await;
    }
}

/// The broker's soft error and reply text, if `error` is one.
fn soft_error(error: &lapin::Error) -> Option<(AMQPSoftError, String)> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(soft) => Some((soft.clone(), e.get_message().to_string())),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

fn missing_or_error(kind: &'static str, name: &str, error: lapin::Error) -> Result<Option<Drift>> {
    match soft_error(&error) {
        Some((AMQPSoftError::NOTFOUND, _)) => Ok(Some(Drift::Missing {
            kind,
            name: name.to_owned(),
        })),
        Some((_, reason)) => Err(Error::TopologyRefused {
            kind,
            name: name.to_owned(),
            reason,
        }),
        None => Err(Error::amqp(
            format!("{kind}.declare (passive) '{name}'"),
            error,
        )),
    }
}

fn mismatch_or_error(kind: &'static str, name: &str, error: lapin::Error) -> Result<Option<Drift>> {
    match soft_error(&error) {
        Some((AMQPSoftError::PRECONDITIONFAILED, text)) => {
            match crate::topology::parse_inequivalent_arg(&text) {
                Some((argument, declared, existing)) => Ok(Some(Drift::Mismatch {
                    kind,
                    name: name.to_owned(),
                    argument,
                    declared,
                    existing,
                })),
                None => Err(Error::TopologyRefused {
                    kind,
                    name: name.to_owned(),
                    reason: text,
                }),
            }
        }
        Some((_, reason)) => Err(Error::TopologyRefused {
            kind,
            name: name.to_owned(),
            reason,
        }),
        None => Err(Error::amqp(format!("{kind}.declare '{name}'"), error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drifts_say_how_to_fix_them() {
        let missing = Drift::Missing {
            kind: "queue",
            name: "events_a.retry.1".into(),
        };
        let text = missing.to_string();
        assert!(text.contains("events_a.retry.1") && text.contains("burrow topology apply"));
        assert_eq!(
            (missing.kind(), missing.name()),
            ("queue", "events_a.retry.1")
        );

        let mismatch = Drift::Mismatch {
            kind: "queue",
            name: "events_a".into(),
            argument: "x-queue-type".into(),
            declared: "'quorum' (longstr)".into(),
            existing: "'classic' (longstr)".into(),
        };
        let text = mismatch.to_string();
        assert!(
            text.contains("x-queue-type = 'classic' (longstr)"),
            "{text}"
        );
        assert!(
            text.contains("declares x-queue-type = 'quorum' (longstr)"),
            "{text}"
        );
        assert!(text.contains("rabbitmqctl delete_queue events_a"), "{text}");
    }
}
