//! The settings sections, one struct per `[section]`, each with its defaults.

use std::{fmt, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::{AmqpUrl, DatabaseUrl, ManagementUrl, secret::read_password_file};
use crate::error::{Error, Result};

/// `[app]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppSettings {
    /// The app name (`app.name`): every instance of one app shares one queue,
    /// `events_<name>`. Letters, digits, `-`, `_` and `.` only.
    pub name: String,
}

impl Default for AppSettings {
    fn default() -> Self {
        Self { name: "app".into() }
    }
}

/// `[amqp]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// Broker URL, `amqp://user:password@host:5672/%2f` (or `amqps://`).
    /// With [`AmqpSettings::password_file`], leave the password out:
    /// `amqp://user@host:5672/%2f`.
    pub url: AmqpUrl,
    /// A file holding the broker password (a Kubernetes or Docker secret
    /// mount), read at every connection so a rotated secret is picked up;
    /// the URL then carries no password.
    pub password_file: Option<std::path::PathBuf>,
    /// The topic exchange events are published to.
    pub exchange: String,
    /// Heartbeat interval in seconds asked of the broker (0 disables).
    pub heartbeat: u16,
    /// The longest wait between two attempts to reach the broker, jitter
    /// included: the worker waits 200 ms after the first failure, doubling
    /// up to this.
    #[serde(with = "humantime_serde")]
    pub reconnect_max_delay: Duration,
    /// TLS for `amqps://` URLs.
    pub tls: TlsSettings,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: AmqpUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            password_file: None,
            exchange: "domain_events".into(),
            heartbeat: 30,
            reconnect_max_delay: Duration::from_secs(30),
            tls: TlsSettings::default(),
        }
    }
}

impl AmqpSettings {
    /// The password from `amqp.password_file`, when set: read now, so a
    /// rotated secret is used by the next connection.
    pub fn password(&self) -> Result<Option<String>> {
        self.password_file
            .as_deref()
            .map(|path| read_password_file("amqp.password_file", path))
            .transpose()
    }

    pub(super) fn validate(&self) -> Result<()> {
        crate::redact::register_url_password(self.url.expose());
        self.url.validate()?;
        if self.password_file.is_some() && self.url.has_password() {
            return Err(Error::config(
                "amqp.url",
                format!(
                    "amqp.url = {} carries a password and amqp.password_file is set too; keep one: \
                 remove the password from amqp.url (amqp://user@host:5672/%2f) or unset amqp.password_file",
                    self.url
                ),
            ));
        }
        self.password()?;
        if self.reconnect_max_delay < Duration::from_millis(200) {
            return Err(Error::config(
                "amqp.reconnect_max_delay",
                format!(
                    "amqp.reconnect_max_delay = {} is invalid: use 200ms or more, e.g. \"30s\"",
                    humantime::format_duration(self.reconnect_max_delay)
                ),
            ));
        }
        self.tls.validate()
    }
}

/// `[amqp.tls]`: certificates for `amqps://`. The server certificate is
/// always verified: against `ca_file` when set, else the system's roots.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file of the CA that signed the broker's certificate.
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate, for brokers that require one (with `client_key_file`).
    pub client_cert_file: Option<std::path::PathBuf>,
    /// PEM PKCS#8 private key of the client certificate.
    pub client_key_file: Option<std::path::PathBuf>,
}

impl TlsSettings {
    pub(super) fn validate(&self) -> Result<()> {
        for (key, path) in [
            ("amqp.tls.ca_file", &self.ca_file),
            ("amqp.tls.client_cert_file", &self.client_cert_file),
            ("amqp.tls.client_key_file", &self.client_key_file),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                return Err(Error::config(
                    key,
                    format!(
                        "{key} = {} is not a readable file; point it at a PEM file",
                        path.display()
                    ),
                ));
            }
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(Error::config(
                "amqp.tls.client_cert_file",
                "amqp.tls.client_cert_file and amqp.tls.client_key_file go together; set both or neither",
            ));
        }
        Ok(())
    }
}

/// The kind of RabbitMQ queue used for the app queue and its dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated, durable, supports delivery limits and at-least-once
    /// dead-lettering. The default.
    #[default]
    Quorum,
    /// Single-node classic queue (no delivery limit, at-most-once dead-lettering).
    Classic,
}

impl<'de> Deserialize<'de> for QueueType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let value = String::deserialize(d)?;
        match value.as_str() {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(serde::de::Error::custom(format!(
                "queue.type = {other:?} is invalid: use \"quorum\" (the default: replicated, with a delivery limit) \
                 or \"classic\"; streams do not support the acknowledgements and dead-lettering burrow relies on"
            ))),
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        })
    }
}

/// `[queue]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    /// Name of the app queue; `events_<app.name>` when unset.
    pub name: Option<String>,
    /// `quorum` (default) or `classic`.
    #[serde(rename = "type")]
    pub kind: QueueType,
    /// Quorum queues only: after this many redeliveries of one message (worker
    /// crashes, channel losses) the broker parks it in the dead-letter queue.
    pub delivery_limit: u32,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            name: None,
            kind: QueueType::Quorum,
            delivery_limit: 20,
        }
    }
}

/// `[consumer]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerSettings {
    /// Unacknowledged deliveries the broker may push to this worker (basic.qos).
    pub prefetch: u16,
    /// Deliveries handled at the same time.
    pub concurrency: usize,
    /// A handler running longer than this fails transiently.
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    /// Bodies larger than this are dead-lettered unread.
    pub max_body_bytes: usize,
    /// Messages whose headers table is larger than this (encoded) are
    /// dead-lettered unread as `headers_too_large`, and no copy burrow
    /// publishes has larger headers. Keep it well below the broker's
    /// `frame_max` (128 KiB by default): a copy's properties must fit in one frame.
    pub max_header_bytes: usize,
    /// How long in-flight handlers may run after a shutdown signal.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// How long a delivery may stay unacknowledged before the broker takes
    /// it back (the consumer's `x-consumer-timeout`, which RabbitMQ applies
    /// to quorum queues from 4.3; older brokers apply their own
    /// `consumer_timeout`, 30 minutes by default). Unset: long enough for
    /// everything burrow does with a delivery, see
    /// [`ConsumerSettings::ack_deadline`].
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Option<Duration>,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            prefetch: 64,
            concurrency: 16,
            handler_timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            max_header_bytes: 64 * 1024,
            shutdown_timeout: Duration::from_secs(25),
            ack_timeout: None,
        }
    }
}

impl ConsumerSettings {
    /// The longest a delivery can legitimately stay unacknowledged: waiting
    /// in the prefetch buffer behind `prefetch / concurrency` handler runs,
    /// its own run, two confirm waits for its copies, and a minute of slack.
    /// `confirm_timeout` is the publisher's.
    pub fn ack_deadline(&self, confirm_timeout: Duration) -> Duration {
        let queued_runs = u32::from(self.prefetch)
            .div_ceil(self.concurrency.max(1) as u32)
            .max(1);
        self.handler_timeout * queued_runs + confirm_timeout * 2 + Duration::from_secs(60)
    }

    /// `ack_timeout`, or [`ConsumerSettings::ack_deadline`] when unset.
    pub fn effective_ack_timeout(&self, confirm_timeout: Duration) -> Duration {
        self.ack_timeout
            .unwrap_or_else(|| self.ack_deadline(confirm_timeout))
    }
}

/// `[management]`: the broker's management HTTP API (the
/// `rabbitmq_management` plugin). Optional; without it `burrow doctor` says
/// what it could not check.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagementSettings {
    /// `http://user:password@host:15672` (or `https://`); unset: not used.
    pub url: Option<ManagementUrl>,
    /// A file holding the password (a secret mount); the URL then carries none.
    pub password_file: Option<std::path::PathBuf>,
}

impl ManagementSettings {
    /// The password from `management.password_file`, when set.
    pub fn password(&self) -> Result<Option<String>> {
        self.password_file
            .as_deref()
            .map(|path| read_password_file("management.password_file", path))
            .transpose()
    }

    pub(super) fn validate(&self) -> Result<()> {
        if let Some(url) = &self.url {
            crate::redact::register_url_password(url.expose());
            url.validate()?;
            if self.password_file.is_some() && url.has_password() {
                return Err(Error::config(
                    "management.url",
                    format!(
                        "management.url = {url} carries a password and management.password_file is set too; keep one"
                    ),
                ));
            }
        }
        self.password()?;
        Ok(())
    }
}

/// `[retry]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// One retry queue per delay; a message that failed on attempt `n` waits
    /// `delays[n-1]`. When the list is used up the message is dead-lettered.
    #[serde(with = "humantime_serde_vec")]
    pub delays: Vec<Duration>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            delays: vec![
                Duration::from_secs(1),
                Duration::from_secs(10),
                Duration::from_secs(60),
                Duration::from_secs(600),
            ],
        }
    }
}

/// `[publisher]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublisherSettings {
    /// Long-lived confirm-mode channels in the publisher's pool.
    pub channels: usize,
    /// Publishes sent but not yet confirmed, across the pool; further
    /// publishes wait for a slot (backpressure).
    pub max_in_flight: usize,
    /// How long to wait for the broker's confirm.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
}

impl Default for PublisherSettings {
    fn default() -> Self {
        Self {
            channels: 4,
            max_in_flight: 1024,
            confirm_timeout: Duration::from_secs(30),
        }
    }
}

/// `[postgres]`: the app's own database, where the `event_outbox` and
/// `event_inbox` tables live (feature `postgres`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:5432/database`; unset: no database.
    /// Put it in `BURROW__POSTGRES__URL` (a secret store), not in a file.
    pub url: Option<DatabaseUrl>,
    /// A file holding the database password (a Kubernetes or Docker secret
    /// mount), read at every connection; the URL then carries no password.
    pub password_file: Option<std::path::PathBuf>,
    /// The schema holding burrow's tables (sets `search_path`); unset: the
    /// server's default, normally `public`.
    pub schema: Option<String>,
    /// Connections in burrow's pool (the relay holds one per batch, plus one listening).
    pub max_connections: u32,
    /// Apply burrow's migrations at start of `burrow run` and `burrow outbox relay`.
    pub migrate: bool,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            url: None,
            password_file: None,
            schema: None,
            max_connections: 4,
            migrate: true,
        }
    }
}

impl PostgresSettings {
    /// The password from `postgres.password_file`, when set: read now, so a
    /// rotated secret is used by the next connection.
    pub fn password(&self) -> Result<Option<String>> {
        self.password_file
            .as_deref()
            .map(|path| read_password_file("postgres.password_file", path))
            .transpose()
    }
}

/// `[outbox]`: the relay that publishes `event_outbox` rows (see docs/outbox.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxSettings {
    /// Run the relay inside `burrow run` (`burrow outbox relay` runs it alone).
    pub enabled: bool,
    /// At most this many events per claimed batch.
    pub batch_size: u32,
    /// Wake on `NOTIFY burrow_outbox` (off behind a transaction-pooling
    /// proxy such as PgBouncer, where LISTEN does not work).
    pub listen: bool,
    /// Look for pending events at least this often (the fallback when a
    /// notification is missed, and the pace of retrying failed events).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Delete published events older than this; `0s` keeps them forever.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the relay runs the retention cleanup.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            batch_size: 100,
            listen: true,
            poll_interval: Duration::from_secs(1),
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(600),
        }
    }
}

/// `[inbox]`: how long `event_inbox` rows are kept (see docs/outbox.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboxSettings {
    /// Delete inbox rows older than this; `0s` keeps them forever. A message
    /// that comes back after its row was deleted is handled again, so this
    /// must be longer than any copy of a message can take to come back.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often `burrow run` deletes expired inbox rows (with `postgres.url` set).
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
}

impl Default for InboxSettings {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(600),
        }
    }
}

pub(super) fn deserialize_http_addr<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<SocketAddr>, D::Error> {
    let value = String::deserialize(d)?;
    let trimmed = value.trim();
    if trimmed.is_empty()
        || trimmed.eq_ignore_ascii_case("off")
        || trimmed.eq_ignore_ascii_case("none")
    {
        return Ok(None);
    }
    trimmed.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "http.addr = {value:?} is invalid: use an IP address and port such as 127.0.0.1:9090 \
             (host names are not resolved; 0.0.0.0:9090 listens on every interface), or \"off\" to disable the endpoint"
        ))
    })
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let value = String::deserialize(d)?;
        match value.as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(serde::de::Error::custom(format!(
                "log.format = {other:?} is invalid: use \"text\" (lines for people) or \"json\" (one object per line, for log stores)"
            ))),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `burrow=debug,lapin=warn`); `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info,lapin=off".into(),
        }
    }
}

/// `humantime_serde` handles one duration; the ladder is a list of them,
/// given in TOML as `["1s", "10s"]` or in the environment as `1s,10s`.
mod humantime_serde_vec {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let raw = Vec::<String>::deserialize(d)?;
        raw.iter()
            .map(|s| {
                humantime::parse_duration(s.trim()).map_err(|e| {
                    serde::de::Error::custom(format!(
                        "retry.delays: {s:?} is not a duration ({e}); use values such as \"500ms\", \"10s\", \"1m\""
                    ))
                })
            })
            .collect()
    }
}
