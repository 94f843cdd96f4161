//! burrow's error type.
//!
//! Every variant carries a verdict: [`Error::is_retryable`] is a `match` with
//! no wildcard arm, so adding a variant forces a decision about whether a
//! caller (or the reconnect loop) should try again.

use std::time::Duration;

/// Errors returned by burrow's publisher, topology and worker.
///
/// Messages name the thing that failed, the value involved and what to do
/// about it. None of them ever contains the broker password: URLs are
/// rendered through [`crate::config::AmqpUrl`]'s redacting `Display`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration could not be loaded or failed validation.
    #[error("configuration error: {message}")]
    Config {
        /// The setting at fault (`amqp.url`, `consumer.prefetch`), or the
        /// source that failed (`config files`, `APP_ENV`).
        key: String,
        /// What is wrong with which value, and the fix.
        message: String,
    },

    /// The broker could not be reached or the connection failed.
    #[error(
        "cannot connect to RabbitMQ at {url}: {source}; check that the broker runs and that amqp.url is right"
    )]
    Connect {
        /// The redacted broker URL.
        url: String,
        /// The underlying AMQP error.
        #[source]
        source: lapin::Error,
    },

    /// The TLS handshake with the broker was refused on certificate grounds
    /// (the broker's certificate is not trusted, or the broker wants a
    /// client certificate it does not get or trust).
    #[error("TLS handshake with RabbitMQ at {url} failed: {reason}. Fix: {fix}")]
    Tls {
        /// The redacted broker URL.
        url: String,
        /// What the TLS library reported.
        reason: String,
        /// What to change (names the `amqp.tls` key).
        fix: String,
    },

    /// The broker refused the login (`ACCESS_REFUSED`) or the virtual host
    /// (`NOT_ALLOWED`): a wrong user or password, or a user without access
    /// to the vhost. Trying again does not help until someone fixes it.
    #[error(
        "RabbitMQ at {url} refused the connection: {reply}. Fix: check the user and password in amqp.url \
         (or amqp.password_file) and that the user may use the vhost (`rabbitmqctl list_permissions -p <vhost>`)"
    )]
    AccessRefused {
        /// The redacted broker URL.
        url: String,
        /// The broker's reply (`ACCESS_REFUSED - Login was refused ...`).
        reply: String,
    },

    /// An AMQP operation failed on an open connection.
    #[error("AMQP {operation} failed: {source}")]
    Amqp {
        /// What burrow was doing (`queue.declare events_library`, `basic.publish`, ...).
        operation: String,
        /// The underlying AMQP error.
        #[source]
        source: lapin::Error,
    },

    /// An entity already exists on the broker with arguments that differ from
    /// what burrow declares (RabbitMQ answers `PRECONDITION_FAILED - inequivalent arg`).
    #[error(
        "{kind} '{name}' already exists on the broker with {argument} = {existing}, but burrow declares {argument} = {declared}. \
         RabbitMQ cannot change the arguments of an existing {kind}. Fix: either set the configuration to match the broker, \
         or migrate: create the new {kind} under another name (or drain and delete '{name}' with \
         `rabbitmqctl delete_queue {name}` once it is empty) and start burrow again; see docs/operations.md, \"Migrating a queue\""
    )]
    TopologyMismatch {
        /// `queue` or `exchange`.
        kind: &'static str,
        /// The entity's name.
        name: String,
        /// The argument that differs (`x-queue-type`, `x-message-ttl`, `type`, ...).
        argument: String,
        /// The value burrow asked for.
        declared: String,
        /// The value the broker holds.
        existing: String,
    },

    /// The broker refused a declaration for another reason (access refused, ...).
    #[error("cannot declare {kind} '{name}': {reason}")]
    TopologyRefused {
        /// `queue`, `exchange` or `binding`.
        kind: &'static str,
        /// The entity's name.
        name: String,
        /// The broker's reply text.
        reason: String,
    },

    /// A publish was returned by the broker because no queue is bound for its routing key.
    #[error(
        "event '{routing_key}' was returned by exchange '{exchange}' as unroutable ({reply}): no queue is bound for it. \
         Start a worker that subscribes to it (or run `burrow topology apply`) before publishing"
    )]
    Unroutable {
        /// Exchange the event was published to.
        exchange: String,
        /// Routing key (the event type).
        routing_key: String,
        /// The broker's reply text (`NO_ROUTE`).
        reply: String,
    },

    /// The broker negatively acknowledged a publish (it could not store it).
    #[error(
        "the broker refused (nacked) event '{routing_key}' on exchange '{exchange}'; it was not stored. Publish it again"
    )]
    Nacked {
        /// Exchange the event was published to.
        exchange: String,
        /// Routing key (the event type).
        routing_key: String,
    },

    /// No confirm arrived within the configured `publisher.confirm_timeout`.
    #[error(
        "no publisher confirm for event '{routing_key}' within {}; the event may or may not be stored. Publish it again (consumers de-duplicate on message id)",
        humantime::format_duration(*timeout)
    )]
    ConfirmTimeout {
        /// Routing key (the event type).
        routing_key: String,
        /// The timeout that elapsed.
        timeout: Duration,
    },

    /// An event could not be serialised to JSON.
    #[error("cannot serialise event '{event_type}' to JSON: {source}")]
    Serialize {
        /// The event type.
        event_type: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },

    /// An event given as JSON (by `burrow publish` or [`crate::Publisher::publish_json`]) is not a JSON object.
    #[error(
        "event '{event_type}' is not a JSON object: {reason}. Pass the event's fields as an object, e.g. '{{\"aggregateId\":\"card-1\"}}'"
    )]
    InvalidEvent {
        /// The event type.
        event_type: String,
        /// What is wrong.
        reason: String,
    },

    /// A name does not fit AMQP's 255-byte short strings.
    #[error("{what} '{value}…' is {len} bytes long; AMQP allows at most 255")]
    NameTooLong {
        /// What the name is (`routing key`, `queue name`, ...).
        what: &'static str,
        /// The first characters of the value.
        value: String,
        /// Its length in bytes.
        len: usize,
    },

    /// Some events of a batch failed; the others were confirmed.
    #[error("{}", batch_message(*.total, .failed))]
    Batch {
        /// Number of events in the batch.
        total: usize,
        /// Index in the batch and error of every failed event (never empty).
        failed: Vec<(usize, Error)>,
    },

    /// A handler registration was rejected, or there is nothing to run.
    #[error("handler registration: {message}")]
    Registry {
        /// The handler concerned, when one is.
        handler: Option<String>,
        /// What is wrong and the fix.
        message: String,
    },

    /// The publisher was closed ([`crate::Publisher::close`]) and takes no
    /// more publishes.
    #[error(
        "the publisher is closed; publish through a publisher that is open (connect a new one)"
    )]
    PublisherClosed,

    /// The publisher could not get a channel to publish on (its connection
    /// is being re-established, or the pool timed out).
    #[error("publisher channel pool: {reason}")]
    PublisherPool {
        /// What the pool reported.
        reason: String,
    },

    /// A confirm was expected on a channel that is not in confirm mode: a
    /// defect in burrow, never the broker's doing.
    #[error(
        "no publisher confirm was requested for '{routing_key}' (the channel is not in confirm mode); \
         this is a bug in burrow, please report it"
    )]
    ConfirmNotRequested {
        /// The routing key of the publish.
        routing_key: String,
    },

    /// The health and metrics endpoint failed while serving.
    #[error("HTTP endpoint on {addr} failed: {source}")]
    HttpServe {
        /// Where it served.
        addr: String,
        /// What the server reported.
        #[source]
        source: std::io::Error,
    },

    /// A probe of the HTTP endpoint (`burrow healthcheck`) did not get a 200.
    #[error("{url}: {problem}")]
    Probe {
        /// What was probed.
        url: String,
        /// No answer, or the answer that was not 200 and its body.
        problem: String,
    },

    /// PostgreSQL could not be reached or refused the connection (feature `postgres`).
    #[cfg(feature = "postgres")]
    #[error(
        "cannot connect to PostgreSQL at {url}: {}; check that the database runs and that postgres.url (BURROW__POSTGRES__URL) is right",
        crate::redact::redact(&.source.to_string())
    )]
    DatabaseConnect {
        /// The redacted database URL.
        url: String,
        /// The underlying sqlx error.
        #[source]
        source: sqlx::Error,
    },

    /// A statement failed on an open PostgreSQL connection (feature `postgres`).
    #[cfg(feature = "postgres")]
    #[error("PostgreSQL {operation} failed: {}{}", crate::redact::redact(&.source.to_string()), database_hint(.source))]
    Database {
        /// What burrow was doing (`claim outbox batch`, `insert event_inbox row`, ...).
        operation: String,
        /// The underlying sqlx error.
        #[source]
        source: sqlx::Error,
    },

    /// burrow's migrations could not be applied (feature `postgres`).
    #[cfg(feature = "postgres")]
    #[error(
        "applying burrow's migrations (migrations/, tracked in _burrow_migrations) failed: {}. \
         The database user needs CREATE on the schema; or apply migrations/*.sql yourself and set postgres.migrate = false",
        crate::redact::redact(&.source.to_string())
    )]
    Migrate {
        /// The underlying sqlx error.
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    /// An event was enqueued with a message id the outbox already holds.
    #[error(
        "the outbox already holds an event with message id '{message_id}' (enqueuing {event_type}); message ids must be unique: \
         leave EventMeta::message_id unset for a fresh UUID"
    )]
    DuplicateMessageId {
        /// The message id given.
        message_id: String,
        /// The event type being enqueued.
        event_type: String,
    },

    /// A delayed publish asked for a longer delay than the delay queues hold
    /// ([`crate::DelayChain::MAX_DELAY`]).
    #[error(
        "cannot delay event '{event_type}' by {}: the delay queues hold at most {} (2^25 - 1 s). \
         Fix: schedule a nearer step and publish again from it, or enqueue it in the outbox with \
         outbox::enqueue_at (feature postgres), which has no such limit",
        humantime::format_duration(*delay),
        humantime::format_duration(*max)
    )]
    DelayTooLong {
        /// The event type.
        event_type: String,
        /// The delay asked for.
        delay: Duration,
        /// The longest delay the chain holds.
        max: Duration,
    },

    /// The worker's consumer was cancelled or its connection ended.
    #[error("consumer on queue '{queue}' stopped: {reason}")]
    ConsumerStopped {
        /// Queue being consumed.
        queue: String,
        /// Why it stopped.
        reason: String,
    },
}

impl Error {
    /// Whether trying the same operation again may succeed.
    ///
    /// Connection trouble, nacks and confirm timeouts are retryable;
    /// configuration mistakes, topology mismatches and unroutable events are
    /// not (they need a person to change something first).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } => true,
            // A wrong password does not fix itself (but see Worker::run: a
            // worker that consumed before keeps trying, for a rotation).
            Error::AccessRefused { .. } => false,
            // Certificates do not change by themselves: a person must act.
            Error::Tls { .. } => false,
            Error::Amqp { source, .. } => amqp_retryable(source),
            Error::Nacked { .. } => true,
            Error::ConfirmTimeout { .. } => true,
            Error::PublisherPool { .. } => true,
            Error::PublisherClosed => false,
            Error::ConfirmNotRequested { .. } => false,
            Error::ConsumerStopped { .. } => true,
            Error::Batch { failed, .. } => failed.iter().all(|(_, e)| e.is_retryable()),
            Error::Config { .. } => false,
            Error::TopologyMismatch { .. } => false,
            Error::TopologyRefused { .. } => false,
            Error::Unroutable { .. } => false,
            Error::Serialize { .. } => false,
            Error::InvalidEvent { .. } => false,
            Error::NameTooLong { .. } => false,
            Error::Registry { .. } => false,
            // Serving failed (the socket): a restart may bind again.
            Error::HttpServe { .. } => true,
            Error::Probe { .. } => false,
            #[cfg(feature = "postgres")]
            Error::DatabaseConnect { source, .. } => database_retryable(source),
            #[cfg(feature = "postgres")]
            Error::Database { source, .. } => database_retryable(source),
            #[cfg(feature = "postgres")]
            Error::Migrate { source } => match source {
                sqlx::migrate::MigrateError::Execute(e) => database_retryable(e),
                _ => false,
            },
            Error::DuplicateMessageId { .. } => false,
            // The same delay is as long the next time.
            Error::DelayTooLong { .. } => false,
        }
    }

    /// A configuration error about `key`.
    pub(crate) fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    /// A rejected registration, about `handler` when there is one.
    pub(crate) fn registry(handler: Option<&str>, message: impl Into<String>) -> Self {
        Error::Registry {
            handler: handler.map(str::to_owned),
            message: message.into(),
        }
    }

    pub(crate) fn amqp(operation: impl Into<String>, source: lapin::Error) -> Self {
        Error::Amqp {
            operation: operation.into(),
            source,
        }
    }
}

/// Connection-level and IO trouble can go away; a soft protocol error such as
/// ACCESS_REFUSED or NOT_FOUND will not fix itself.
fn amqp_retryable(error: &lapin::Error) -> bool {
    use lapin::ErrorKind as K;
    match error.kind() {
        K::IOError(_)
        | K::MissingHeartbeatError
        | K::InvalidChannelState(..)
        | K::InvalidConnectionState(_)
        | K::InvalidChannel(_)
        | K::ChannelsLimitReached => true,
        // Hard errors close the connection (CONNECTION_FORCED on a broker
        // restart); a new connection may succeed. Soft errors (NOT_FOUND,
        // ACCESS_REFUSED, PRECONDITION_FAILED) repeat until someone acts.
        K::ProtocolError(e) => matches!(e.kind(), lapin::protocol::AMQPErrorKind::Hard(_)),
        K::RuntimeShutdownError(_)
        | K::InvalidProtocolVersion(_)
        | K::ParsingError(_)
        | K::SerialisationError(_)
        | K::AuthProviderError(_)
        | K::FutureCompleted
        | K::NoDefaultRuntime => false,
        // lapin's ErrorKind is non-exhaustive: defer to its own verdict.
        _ => error.can_be_recovered(),
    }
}

/// A dropped connection, a deadlock or a serialization failure can go away;
/// a wrong password, a missing table or a constraint violation will not.
#[cfg(feature = "postgres")]
fn database_retryable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // SQLSTATE classes (https://www.postgresql.org/docs/current/errcodes-appendix.html):
            // 08 connection exception, 40 transaction rollback (serialization
            // failure, deadlock), 53 insufficient resources; 55P03 lock not
            // available; 57P01-57P03 the server is shutting down or starting.
            code.starts_with("08")
                || code.starts_with("40")
                || code.starts_with("53")
                || matches!(&*code, "55P03" | "57P01" | "57P02" | "57P03")
        }
        _ => false,
    }
}

/// A fix for the errors an operator can act on.
#[cfg(feature = "postgres")]
fn database_hint(error: &sqlx::Error) -> &'static str {
    let code = match error {
        sqlx::Error::Database(db) => db.code().unwrap_or_default().into_owned(),
        _ => return "",
    };
    match code.as_str() {
        // undefined_table
        "42P01" => {
            "; burrow's tables are missing: run `burrow outbox migrate` (or set postgres.migrate = true), and check postgres.schema"
        }
        // insufficient_privilege
        "42501" => {
            "; grant the database user SELECT, INSERT, UPDATE and DELETE on event_outbox and event_inbox"
        }
        _ => "",
    }
}

fn batch_message(total: usize, failed: &[(usize, Error)]) -> String {
    match failed.first() {
        Some((index, first)) => format!(
            "{} of {total} events in the batch were not confirmed; first failure (index {index}): {first}",
            failed.len()
        ),
        None => format!("the batch of {total} events reported a failure without naming one"),
    }
}

/// A shorthand for `Result<T, burrow::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_publisher_is_not_worth_retrying_but_a_busy_pool_is() {
        assert!(!Error::PublisherClosed.is_retryable());
        assert!(
            Error::PublisherPool {
                reason: "timed out".into()
            }
            .is_retryable()
        );
        assert!(
            !Error::ConfirmNotRequested {
                routing_key: "k".into()
            }
            .is_retryable()
        );
        assert!(
            !Error::AccessRefused {
                url: "amqp://***@h".into(),
                reply: "ACCESS_REFUSED".into()
            }
            .is_retryable()
        );
    }

    #[test]
    fn messages_name_the_thing_and_the_fix() {
        let e = Error::config(
            "consumer.prefetch",
            "consumer.prefetch = 0 is invalid: use 1 or more",
        );
        assert!(e.to_string().contains("consumer.prefetch = 0"));
        let e = Error::ConfirmTimeout {
            routing_key: "CardAddedToLibraryEvent".into(),
            timeout: Duration::from_secs(30),
        };
        assert!(e.to_string().contains("within 30s"), "{e}");
        let e = Error::Batch {
            total: 3,
            failed: Vec::new(),
        };
        assert!(
            e.to_string().contains("3 events"),
            "an empty list does not panic: {e}"
        );
    }
}
