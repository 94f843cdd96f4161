//! The broker entities of one app, as plain data, and their declaration.
//!
//! [`Topology::for_app`] computes the exchange, the app queue, the retry
//! ladder, the dead-letter queue and the bindings from the settings and the
//! registry; [`Topology::declare`] declares them idempotently; `burrow
//! topology show` prints the same data.
//!
//! Why the arguments are what they are:
//! - Quorum queues with `x-dead-letter-strategy=at-least-once` (RabbitMQ
//!   ≥ 3.10) make the broker's own dead-lettering hops — TTL expiry out of a
//!   retry step, the delivery limit on the app queue — publish-confirmed
//!   internally. Classic dead-lettering is at-most-once
//!   (<https://www.rabbitmq.com/docs/quorum-queues#dead-lettering>).
//! - at-least-once dead-lettering requires `x-overflow=reject-publish`.
//! - `x-delivery-limit` is set explicitly: RabbitMQ 4.0 defaults it to 20 and
//!   drops a message past it unless the queue dead-letters; 3.x has no
//!   default. The app queue dead-letters to `<queue>.dead`, so a message that
//!   crash-loops a worker is parked, never lost.
//! - Retry steps dead-letter through the default exchange with the app
//!   queue's name as routing key: only this app sees the retry.

use std::{collections::BTreeMap, fmt};

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString},
};

mod ordered;

pub use self::ordered::ShardExchange;
use crate::{
    config::{QueueType, Settings},
    error::{Error, Result},
    handler::Registry,
    retry::RetryLadder,
    wire::short_string,
};

/// Delivery limit of the dead-letter queue: effectively unlimited.
pub(crate) const DEAD_LETTER_DELIVERY_LIMIT: i64 = 1_000_000;

/// A queue argument value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum ArgValue {
    /// A string argument (`x-queue-type`).
    Str(String),
    /// An integer argument (`x-message-ttl`).
    Int(i64),
    /// A boolean argument (`x-single-active-consumer`).
    Bool(bool),
}

impl fmt::Display for ArgValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgValue::Str(s) => write!(f, "{s:?}"),
            ArgValue::Int(n) => write!(f, "{n}"),
            ArgValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// What a queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum QueueRole {
    /// The app queue the worker consumes.
    App,
    /// Retry step `n`.
    Retry(u32),
    /// The dead-letter queue.
    Dead,
    /// Shard `n` of an ordered app ([`crate::config::OrderingSettings`]).
    Shard(u16),
}

/// A durable queue and its arguments.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueSpec {
    /// Queue name.
    pub name: String,
    /// What the queue is for.
    pub role: QueueRole,
    /// `x-*` arguments, sorted by name.
    pub arguments: BTreeMap<String, ArgValue>,
}

impl QueueSpec {
    /// The queue as an earlier burrow declared it, when that is still
    /// acceptable: a retry step without `x-delivery-limit`. RabbitMQ cannot
    /// add the argument to an existing queue, and a retry step needs none
    /// (nothing consumes it), so such a queue is kept rather than refused.
    pub(crate) fn as_declared_before(&self) -> Option<QueueSpec> {
        if !matches!(self.role, QueueRole::Retry(_)) {
            return None;
        }
        let mut older = self.clone();
        older.arguments.remove("x-delivery-limit")?;
        Some(older)
    }

    /// The arguments as the AMQP table a `queue.declare` carries.
    pub fn argument_table(&self) -> Result<FieldTable> {
        argument_table(&self.arguments)
    }
}

/// Queue arguments as the AMQP table a `queue.declare` carries.
pub(crate) fn argument_table(arguments: &BTreeMap<String, ArgValue>) -> Result<FieldTable> {
    let mut table = FieldTable::default();
    for (k, v) in arguments {
        let value = match v {
            ArgValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
            ArgValue::Int(n) => AMQPValue::LongLongInt(*n),
            ArgValue::Bool(b) => AMQPValue::Boolean(*b),
        };
        table.insert(short_string("queue argument", k)?, value);
    }
    Ok(table)
}

/// A binding of the app queue to the exchange.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BindingSpec {
    /// Source exchange.
    pub exchange: String,
    /// Destination queue.
    pub queue: String,
    /// Binding key (an event type or a topic pattern).
    pub key: String,
}

/// Everything one app declares.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Topology {
    /// The durable topic exchange (`domain_events`).
    pub exchange: String,
    /// App queue, retry steps, dead-letter queue, in that order.
    pub queues: Vec<QueueSpec>,
    /// One binding per distinct binding key of the registry (to the app
    /// queue; to the shard exchange instead in an ordered app).
    pub bindings: Vec<BindingSpec>,
    /// The shard exchange of an ordered app.
    pub shards: Option<ordered::ShardExchange>,
}

impl Topology {
    /// Computes the topology of the app described by `settings` and `registry`.
    pub fn for_app(settings: &Settings, registry: &Registry) -> Self {
        let app_queue = settings.app_queue();
        let dead_queue = settings.dead_letter_queue();
        let ladder = RetryLadder::new(&app_queue, &settings.retry.delays);

        let mut queues = Vec::with_capacity(ladder.steps().len() + 2);

        let mut app_args = BTreeMap::new();
        match settings.queue.kind {
            QueueType::Quorum => {
                quorum_dead_letter_args(&mut app_args, &dead_queue);
                app_args.insert(
                    "x-delivery-limit".into(),
                    ArgValue::Int(i64::from(settings.queue.delivery_limit)),
                );
            }
            QueueType::Classic => {
                // Classic queues have no delivery limit and dead-letter at
                // most once; burrow still parks its own failures with confirms.
                app_args.insert("x-queue-type".into(), ArgValue::Str("classic".into()));
            }
        }
        queues.push(QueueSpec {
            name: app_queue.clone(),
            role: QueueRole::App,
            arguments: app_args,
        });

        // An ordered app retries in the worker (the ladder would let later
        // events of the aggregate pass): it has no retry steps.
        let steps = if settings.ordering.enabled() {
            &[][..]
        } else {
            ladder.steps()
        };
        for step in steps {
            let mut args = BTreeMap::new();
            quorum_dead_letter_args(&mut args, &app_queue);
            args.insert(
                "x-message-ttl".into(),
                ArgValue::Int(step.delay.as_millis() as i64),
            );
            // Nothing consumes a retry step, so no delivery counts; set,
            // RabbitMQ 4 stops defaulting it (and logging so) per queue.
            args.insert(
                "x-delivery-limit".into(),
                ArgValue::Int(DEAD_LETTER_DELIVERY_LIMIT),
            );
            queues.push(QueueSpec {
                name: step.queue.clone(),
                role: QueueRole::Retry(step.number),
                arguments: args,
            });
        }

        let mut dead_args = BTreeMap::new();
        dead_args.insert(
            "x-queue-type".into(),
            ArgValue::Str(settings.queue.kind.to_string()),
        );
        if settings.queue.kind == QueueType::Quorum {
            // Browsing dead letters (`burrow dlq list`) returns them to the
            // queue, which counts as a delivery. RabbitMQ 4 gives quorum
            // queues a delivery limit of 20 and drops a message past it when
            // the queue has no dead-letter target, so the DLQ gets a limit no
            // amount of browsing reaches. Valid on 3.x and 4.x alike.
            dead_args.insert(
                "x-delivery-limit".into(),
                ArgValue::Int(DEAD_LETTER_DELIVERY_LIMIT),
            );
        }
        let shard_args = queues[0].arguments.clone();
        queues.push(QueueSpec {
            name: dead_queue,
            role: QueueRole::Dead,
            arguments: dead_args,
        });

        let shards = ordered::ShardExchange::for_app(settings, registry);
        let bindings = match &shards {
            Some(shards) => {
                queues.extend(shards.queues(shard_args));
                Vec::new()
            }
            None => registry
                .binding_keys()
                .into_iter()
                .map(|key| BindingSpec {
                    exchange: settings.amqp.exchange.clone(),
                    queue: app_queue.clone(),
                    key,
                })
                .collect(),
        };

        Topology {
            exchange: settings.amqp.exchange.clone(),
            queues,
            bindings,
            shards,
        }
    }

    /// The app queue's spec.
    pub fn app_queue(&self) -> &QueueSpec {
        &self.queues[0]
    }

    /// Declares the exchange, every queue and every binding. Declaring is
    /// idempotent; an entity that exists with other arguments ends in
    /// [`Error::TopologyMismatch`] naming the entity, argument and both values.
    /// Declares it on the broker `amqp` names, on a connection of its own
    /// (what `burrow topology apply` does). Idempotent: an entity that
    /// exists with the same arguments is left alone; one with other
    /// arguments is [`Error::TopologyMismatch`].
    pub async fn apply(&self, amqp: &crate::config::AmqpSettings) -> Result<()> {
        let conn = crate::connection::open(amqp, "burrow topology").await?;
        let result = self.declare(&conn).await;
        let _ = conn.close(200, "declared".into()).await;
        result
    }

    /// Compares it with the broker `amqp` names without changing anything:
    /// every difference, or none.
    pub async fn verify(&self, amqp: &crate::config::AmqpSettings) -> Result<Vec<crate::Drift>> {
        let conn = crate::connection::open(amqp, "burrow topology verify").await?;
        let result = crate::verify::verify(self, &conn).await;
        let _ = conn.close(200, "verified".into()).await;
        result
    }

    /// Declares it on `connection`.
    pub(crate) async fn declare(&self, connection: &Connection) -> Result<()> {
        let mut result = self.declare_on(connection).await;
        if let Err(Error::TopologyMismatch {
            kind: "queue",
            name,
            argument,
            ..
        }) = &result
            && argument != "x-queue-type"
            && let Some(spec) = self.queues.iter().find(|q| &q.name == name)
            && let Some(type_error) = probe_queue_type(connection, spec).await
        {
            result = Err(type_error);
        }
        result
    }

    /// Declares only the exchange (what a publisher needs).
    pub(crate) async fn declare_exchange(exchange: &str, connection: &Connection) -> Result<()> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::amqp("channel.open (topology)", e))?;
        let result = declare_exchange_on(&channel, exchange).await;
        if channel.status().connected() {
            let _ = channel.close(200, "exchange declared".into()).await;
        }
        result
    }

    /// Deletes this topology's exchange. Only for an exchange of its own (the
    /// demo's); never called by the worker, and never right for the shared
    /// `domain_events`.
    pub async fn delete_exchange(&self, connection: &Connection) -> Result<()> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::amqp("channel.open (topology)", e))?;
        let result = channel
            .exchange_delete(
                short_string("exchange name", &self.exchange)?,
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await
            .map_err(|e| Error::amqp(format!("exchange.delete '{}'", self.exchange), e));
        if channel.status().connected() {
            let _ = channel.close(200, "exchange deleted".into()).await;
        }
        result
    }

    /// Deletes every queue of this topology (not the shared exchange), with
    /// their messages. For demos and tests; never called by the worker.
    pub async fn delete_queues(&self, connection: &Connection) -> Result<()> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::amqp("channel.open (topology)", e))?;
        for queue in &self.queues {
            channel
                .queue_delete(
                    short_string("queue name", &queue.name)?,
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await
                .map_err(|e| Error::amqp(format!("queue.delete '{}'", queue.name), e))?;
        }
        let _ = channel.close(200, "queues deleted".into()).await;
        Ok(())
    }

    async fn declare_on(&self, connection: &Connection) -> Result<()> {
        let open = || async {
            connection
                .create_channel()
                .await
                .map_err(|e| Error::amqp("channel.open (topology)", e))
        };
        let mut channel = open().await?;
        let result = async {
            declare_exchange_on(&channel, &self.exchange).await?;
            for queue in &self.queues {
                let declared = declare_queue_on(&channel, queue).await;
                let Err(error) = declared else { continue };
                // The broker closed the channel with the mismatch.
                channel = open().await?;
                match queue.as_declared_before() {
                    Some(older) if declare_queue_on(&channel, &older).await.is_ok() => {
                        tracing::info!(
                            queue = %queue.name,
                            "retry step declared by an earlier burrow without x-delivery-limit; kept as it is \
                             (nothing consumes a retry step, so no delivery counts against a limit)"
                        );
                    }
                    _ => return Err(error),
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        if result.is_err() {
            if channel.status().connected() {
                let _ = channel.close(200, "topology declared".into()).await;
            }
            return result;
        }
        for binding in &self.bindings {
            channel
                .queue_bind(
                    short_string("queue name", &binding.queue)?,
                    short_string("exchange name", &binding.exchange)?,
                    short_string("binding key", &binding.key)?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    classify_declare_error(
                        "binding",
                        &format!(
                            "{} -> {} ({})",
                            binding.exchange, binding.queue, binding.key
                        ),
                        e,
                    )
                })?;
        }
        if let Some(shards) = &self.shards {
            shards.declare_on(&channel, &self.exchange).await?;
        }
        if channel.status().connected() {
            let _ = channel.close(200, "topology declared".into()).await;
        }
        Ok(())
    }
}

async fn declare_queue_on(channel: &Channel, queue: &QueueSpec) -> Result<()> {
    channel
        .queue_declare(
            short_string("queue name", &queue.name)?,
            QueueDeclareOptions::durable(),
            queue.argument_table()?,
        )
        .await
        .map(|_| ())
        .map_err(|e| classify_declare_error("queue", &queue.name, e))
}

/// RabbitMQ checks queue arguments in a fixed order and reports the first
/// difference, so a classic queue met by a quorum declaration is reported as
/// an `x-dead-letter-exchange` mismatch, which no setting can fix. The real
/// difference is the queue type: declare the queue again with only
/// `x-queue-type` (on a fresh channel; the broker closed the other) and, when
/// that is what differs, report it instead.
pub(crate) async fn probe_queue_type(connection: &Connection, spec: &QueueSpec) -> Option<Error> {
    let ArgValue::Str(declared_type) = spec.arguments.get("x-queue-type")? else {
        return None;
    };
    let channel = connection.create_channel().await.ok()?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(declared_type.as_bytes().to_vec())),
    );
    let name = short_string("queue name", &spec.name).ok()?;
    let probe = channel
        .queue_declare(name, QueueDeclareOptions::durable(), args)
        .await;
    if channel.status().connected() {
        let _ = channel.close(200, "type probe".into()).await;
    }
    let error = classify_declare_error("queue", &spec.name, probe.err()?);
    match &error {
        Error::TopologyMismatch { argument, .. } if argument == "x-queue-type" => Some(error),
        _ => None,
    }
}

fn quorum_dead_letter_args(args: &mut BTreeMap<String, ArgValue>, target_queue: &str) {
    args.insert("x-queue-type".into(), ArgValue::Str("quorum".into()));
    args.insert(
        "x-dead-letter-exchange".into(),
        ArgValue::Str(String::new()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        ArgValue::Str(target_queue.into()),
    );
    args.insert(
        "x-dead-letter-strategy".into(),
        ArgValue::Str("at-least-once".into()),
    );
    args.insert("x-overflow".into(), ArgValue::Str("reject-publish".into()));
}

pub(crate) async fn declare_exchange_on(channel: &Channel, exchange: &str) -> Result<()> {
    channel
        .exchange_declare(
            short_string("exchange name", exchange)?,
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| classify_declare_error("exchange", exchange, e))
}

/// Turns RabbitMQ's PRECONDITION_FAILED text into a [`Error::TopologyMismatch`].
///
/// RabbitMQ words it as (rabbit_misc:assert_args_equivalence):
/// `PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received the value 'quorum' of type 'longstr' but current is none`
/// or, for exchange types and flags, `... received 'topic' but current is 'direct'`.
pub(crate) fn classify_declare_error(kind: &'static str, name: &str, error: lapin::Error) -> Error {
    let text = match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => e.get_message().to_string(),
        _ => return Error::amqp(format!("{kind} declare '{name}'"), error),
    };
    if let Some(m) = parse_inequivalent_arg(&text) {
        return Error::TopologyMismatch {
            kind,
            name: name.to_owned(),
            argument: m.0,
            declared: m.1,
            existing: m.2,
        };
    }
    Error::TopologyRefused {
        kind,
        name: name.to_owned(),
        reason: text,
    }
}

pub(crate) fn parse_inequivalent_arg(text: &str) -> Option<(String, String, String)> {
    let rest = &text[text.find("inequivalent arg '")? + "inequivalent arg '".len()..];
    let argument = &rest[..rest.find('\'')?];
    let received = &rest[rest.find("received ")? + "received ".len()..];
    let split = received.find(" but current is ")?;
    let declared = tidy_value(&received[..split]);
    let existing = tidy_value(&received[split + " but current is ".len()..]);
    Some((argument.to_owned(), declared, existing))
}

/// `the value 'quorum' of type 'longstr'` → `'quorum' (longstr)`; `none` → `none (not set)`.
fn tidy_value(raw: &str) -> String {
    let raw = raw.trim();
    if raw == "none" {
        return "none (not set)".into();
    }
    let raw = raw.strip_prefix("the value ").unwrap_or(raw);
    match raw.split_once(" of type ") {
        Some((value, ty)) => format!("{value} ({})", ty.trim_matches('\'')),
        None => raw.to_owned(),
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "exchange {} (topic, durable)", self.exchange)?;
        for q in &self.queues {
            let role = match q.role {
                QueueRole::App => "app queue".to_string(),
                QueueRole::Retry(n) => format!("retry step {n}"),
                QueueRole::Dead => "dead letters".to_string(),
                QueueRole::Shard(n) => format!("shard {n}, single active consumer"),
            };
            writeln!(f, "queue {} ({role}, durable)", q.name)?;
            for (k, v) in &q.arguments {
                writeln!(f, "    {k} = {v}")?;
            }
        }
        for b in &self.bindings {
            writeln!(f, "binding {} -> {} key {}", b.exchange, b.queue, b.key)?;
        }
        if let Some(shards) = &self.shards {
            write!(f, "{shards}")?;
        }
        Ok(())
    }
}

/// [`Topology::declare`] on a connection of the caller's (burrow's tests).
pub async fn declare(topology: &Topology, connection: &Connection) -> Result<()> {
    topology.declare(connection).await
}

/// [`Topology::declare_exchange`] on a connection of the caller's (burrow's tests and benchmarks).
pub async fn declare_exchange(exchange: &str, connection: &Connection) -> Result<()> {
    Topology::declare_exchange(exchange, connection).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_rabbitmq_mismatch_texts() {
        let t = "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'events_a' in vhost '/': received the value 'quorum' of type 'longstr' but current is none";
        let (arg, declared, existing) = parse_inequivalent_arg(t).unwrap();
        assert_eq!(arg, "x-queue-type");
        assert_eq!(declared, "'quorum' (longstr)");
        assert_eq!(existing, "none (not set)");

        let t = "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'domain_events' in vhost '/': received 'topic' but current is 'direct'";
        let (arg, declared, existing) = parse_inequivalent_arg(t).unwrap();
        assert_eq!(
            (arg.as_str(), declared.as_str(), existing.as_str()),
            ("type", "'topic'", "'direct'")
        );
    }

    #[test]
    fn retry_steps_return_to_the_app_queue_only() {
        let mut settings = Settings::default();
        settings.app.name = "library".into();
        settings.retry.delays = vec![Duration::from_secs(1)];
        let topo = Topology::for_app(&settings, &Registry::new());
        let step = &topo.queues[1];
        assert_eq!(step.role, QueueRole::Retry(1));
        assert_eq!(
            step.arguments["x-dead-letter-exchange"],
            ArgValue::Str(String::new())
        );
        assert_eq!(
            step.arguments["x-dead-letter-routing-key"],
            ArgValue::Str("events_library".into())
        );
        assert_eq!(
            step.arguments["x-dead-letter-strategy"],
            ArgValue::Str("at-least-once".into())
        );
        assert_eq!(step.arguments["x-message-ttl"], ArgValue::Int(1000));
        let app = topo.app_queue();
        assert_eq!(
            app.arguments["x-dead-letter-routing-key"],
            ArgValue::Str("events_library.dead".into())
        );
        assert_eq!(app.arguments["x-delivery-limit"], ArgValue::Int(20));
        assert_eq!(topo.queues.last().unwrap().name, "events_library.dead");
    }
}
