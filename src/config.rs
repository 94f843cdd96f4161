//! Settings: `config/default.toml`, then `config/<APP_ENV>.toml`, then
//! environment variables (`BURROW__AMQP__URL`, `BURROW__CONSUMER__PREFETCH`, ...).
//!
//! Everything is validated once at start; an error names the key, the value
//! and what would be accepted. The broker URL is wrapped in [`AmqpUrl`] whose
//! `Debug` and `Display` hide the password, so printing a [`Settings`] is safe.

use std::{fmt, net::SocketAddr, path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// All of burrow's settings. Build one with [`Settings::load`] (files and
/// environment) or start from [`Settings::default`] in code and tests.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The app this worker belongs to: names its queues.
    pub app: AppSettings,
    /// Broker connection and exchange.
    pub amqp: AmqpSettings,
    /// The app queue and its dead-letter queue.
    pub queue: QueueSettings,
    /// Delivery loop tuning.
    pub consumer: ConsumerSettings,
    /// The retry ladder.
    pub retry: RetrySettings,
    /// The confirmed publisher.
    pub publisher: PublisherSettings,
    /// Health and metrics endpoint.
    pub http: HttpSettings,
    /// Log output.
    pub log: LogSettings,
    /// The app's PostgreSQL database, home of the outbox and the inbox.
    pub postgres: PostgresSettings,
    /// The transactional outbox relay.
    pub outbox: OutboxSettings,
    /// The idempotent inbox's retention.
    pub inbox: InboxSettings,
}

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

    fn validate(&self) -> Result<()> {
        crate::redact::register_url_password(self.url.expose());
        self.url.validate()?;
        if self.password_file.is_some() && self.url.has_password() {
            return Err(Error::Config(format!(
                "amqp.url = {} carries a password and amqp.password_file is set too; keep one: \
                 remove the password from amqp.url (amqp://user@host:5672/%2f) or unset amqp.password_file",
                self.url
            )));
        }
        self.password()?;
        if self.reconnect_max_delay < Duration::from_millis(200) {
            return Err(Error::Config(format!(
                "amqp.reconnect_max_delay = {} is invalid: use 200ms or more, e.g. \"30s\"",
                humantime::format_duration(self.reconnect_max_delay)
            )));
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
    fn validate(&self) -> Result<()> {
        for (key, path) in [
            ("amqp.tls.ca_file", &self.ca_file),
            ("amqp.tls.client_cert_file", &self.client_cert_file),
            ("amqp.tls.client_key_file", &self.client_key_file),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                return Err(Error::Config(format!(
                    "{key} = {} is not a readable file; point it at a PEM file",
                    path.display()
                )));
            }
        }
        if self.client_cert_file.is_some() != self.client_key_file.is_some() {
            return Err(Error::Config(
                "amqp.tls.client_cert_file and amqp.tls.client_key_file go together; set both or neither".into(),
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
        }
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

/// `[http]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of the health and metrics endpoint (an IP address and port);
    /// `"off"` (or an empty value) disables it.
    #[serde(deserialize_with = "deserialize_http_addr")]
    pub addr: Option<SocketAddr>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
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

fn deserialize_http_addr<'de, D: serde::Deserializer<'de>>(
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

impl Settings {
    /// Loads `<dir>/default.toml`, then `<dir>/<APP_ENV>.toml` when `APP_ENV`
    /// is set, then `BURROW__SECTION__KEY` environment variables, and
    /// validates the result. `dir` is `config` unless `BURROW_CONFIG_DIR` says
    /// otherwise. A missing `default.toml` is fine (built-in defaults apply).
    ///
    /// ```no_run
    /// let settings = burrow::Settings::load()?;
    /// println!("consuming {}", settings.app_queue());
    /// # Ok::<(), burrow::Error>(())
    /// ```
    pub fn load() -> Result<Self> {
        let dir = std::env::var("BURROW_CONFIG_DIR").unwrap_or_else(|_| "config".into());
        let app_env = std::env::var("APP_ENV").ok().filter(|s| !s.is_empty());
        Self::load_from(Path::new(&dir), app_env.as_deref())
    }

    /// Like [`Settings::load`] with an explicit directory and environment name.
    pub fn load_from(dir: &Path, app_env: Option<&str>) -> Result<Self> {
        let mut builder = config::Config::builder().add_source(
            config::File::from(dir.join("default.toml"))
                .format(config::FileFormat::Toml)
                .required(false),
        );
        if let Some(env) = app_env {
            let path = dir.join(format!("{env}.toml"));
            if !path.exists() {
                return Err(Error::Config(format!(
                    "APP_ENV={env} but {} does not exist; create it or unset APP_ENV",
                    path.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        builder = builder.add_source(
            config::Environment::with_prefix("BURROW")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("retry.delays")
                .try_parsing(true),
        );
        let raw = builder
            .build()
            .map_err(|e| Error::Config(redact_config_error(e.to_string())))?;
        // Known before anything can fail on them: a deserialisation error
        // quotes the offending value, which may be one of these URLs.
        for key in ["amqp.url", "postgres.url"] {
            if let Ok(url) = raw.get_string(key) {
                crate::redact::register_url_password(&url);
            }
        }
        let settings: Settings = raw
            .try_deserialize()
            .map_err(|e| Error::Config(redact_config_error(e.to_string())))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Settings that are valid but probably not what was meant, one line
    /// each with the fix; [`crate::Worker::run`] logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.consumer.concurrency > usize::from(self.consumer.prefetch) {
            warnings.push(format!(
                "consumer.concurrency = {} exceeds consumer.prefetch = {}: the broker never sends more than \
                 prefetch unacknowledged deliveries, so at most {} handlers run at once; raise consumer.prefetch \
                 to at least consumer.concurrency",
                self.consumer.concurrency, self.consumer.prefetch, self.consumer.prefetch
            ));
        }
        warnings
    }

    /// Checks every value; the error names the key and the accepted range.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, value: &dyn fmt::Display, fix: &str| {
            Err(Error::Config(format!("{key} = {value} is invalid: {fix}")))
        };
        if !valid_name(&self.app.name) {
            return bad(
                "app.name",
                &format!("{:?}", self.app.name),
                "use 1-200 letters, digits, '-', '_' or '.' (it names the queues events_<app.name>)",
            );
        }
        if let Some(name) = &self.queue.name
            && !valid_name(name)
        {
            return bad(
                "queue.name",
                &format!("{name:?}"),
                "use 1-200 letters, digits, '-', '_' or '.'",
            );
        }
        if !valid_name(&self.amqp.exchange) {
            return bad(
                "amqp.exchange",
                &format!("{:?}", self.amqp.exchange),
                "use 1-200 letters, digits, '-', '_' or '.'",
            );
        }
        self.amqp.validate()?;
        if self.consumer.prefetch == 0 {
            return bad(
                "consumer.prefetch",
                &0,
                "use 1 or more (0 would mean unlimited)",
            );
        }
        if self.consumer.concurrency == 0 {
            return bad("consumer.concurrency", &0, "use 1 or more");
        }
        if self.consumer.handler_timeout.is_zero() {
            return bad(
                "consumer.handler_timeout",
                &"0s",
                "use a positive duration such as \"30s\"",
            );
        }
        if self.consumer.max_body_bytes == 0 {
            return bad("consumer.max_body_bytes", &0, "use 1 or more");
        }
        if self.consumer.max_header_bytes < 16 * 1024 {
            return bad(
                "consumer.max_header_bytes",
                &self.consumer.max_header_bytes,
                "use 16384 or more: a copy carries up to about 5 KiB of burrow's own headers plus the handler names (65536 is the default)",
            );
        }
        if self.queue.delivery_limit == 0 {
            return bad(
                "queue.delivery_limit",
                &0,
                "use 1 or more (20 is RabbitMQ 4's default)",
            );
        }
        for (i, delay) in self.retry.delays.iter().enumerate() {
            let ms = delay.as_millis();
            if ms == 0 || ms > u128::from(u32::MAX) {
                return bad(
                    &format!("retry.delays[{i}]"),
                    &humantime::format_duration(*delay),
                    "use between 1ms and 49 days (RabbitMQ's x-message-ttl is a 32-bit millisecond count)",
                );
            }
        }
        if self.publisher.channels == 0 {
            return bad("publisher.channels", &0, "use 1 or more");
        }
        if self.publisher.max_in_flight == 0 {
            return bad("publisher.max_in_flight", &0, "use 1 or more");
        }
        if self.publisher.confirm_timeout.is_zero() {
            return bad(
                "publisher.confirm_timeout",
                &"0s",
                "use a positive duration such as \"30s\"",
            );
        }
        self.validate_postgres()
    }

    fn validate_postgres(&self) -> Result<()> {
        let bad = |key: &str, value: &dyn fmt::Display, fix: &str| {
            Err(Error::Config(format!("{key} = {value} is invalid: {fix}")))
        };
        if let Some(url) = &self.postgres.url {
            crate::redact::register_url_password(url.expose());
            url.validate()?;
            if self.postgres.password_file.is_some() && url.has_password() {
                return Err(Error::Config(format!(
                    "postgres.url = {url} carries a password and postgres.password_file is set too; keep one: \
                     remove the password from postgres.url or unset postgres.password_file"
                )));
            }
        }
        self.postgres.password()?;
        if let Some(schema) = &self.postgres.schema
            && !valid_schema(schema)
        {
            return bad(
                "postgres.schema",
                &format!("{schema:?}"),
                "use 1-63 lowercase letters, digits or '_', starting with a letter or '_'",
            );
        }
        if self.postgres.max_connections == 0 {
            return bad("postgres.max_connections", &0, "use 1 or more");
        }
        if !(1..=10_000).contains(&self.outbox.batch_size) {
            return bad(
                "outbox.batch_size",
                &self.outbox.batch_size,
                "use between 1 and 10000",
            );
        }
        if self.outbox.poll_interval.is_zero() {
            return bad(
                "outbox.poll_interval",
                &"0s",
                "use a positive duration such as \"1s\"",
            );
        }
        if self.outbox.cleanup_interval.is_zero() {
            return bad(
                "outbox.cleanup_interval",
                &"0s",
                "use a positive duration such as \"10m\"",
            );
        }
        if self.inbox.cleanup_interval.is_zero() {
            return bad(
                "inbox.cleanup_interval",
                &"0s",
                "use a positive duration such as \"10m\"",
            );
        }
        // A row deleted while a copy of its message can still arrive lets
        // that copy run the handler again. The retry ladder is the shortest
        // bound there is; the documentation asks for days.
        let ladder: Duration = self.retry.delays.iter().sum();
        if !self.inbox.retention.is_zero() && self.inbox.retention <= ladder {
            return bad(
                "inbox.retention",
                &humantime::format_duration(self.inbox.retention),
                &format!(
                    "keep inbox rows longer than a message can come back: more than the whole retry ladder ({}), \
                     and in practice days (\"7d\" is the default), or \"0s\" to keep them forever",
                    humantime::format_duration(ladder)
                ),
            );
        }
        if self.outbox.enabled {
            if !cfg!(feature = "postgres") {
                return bad(
                    "outbox.enabled",
                    &true,
                    "this burrow was built without the postgres feature; rebuild with `--features postgres` or set outbox.enabled = false",
                );
            }
            if self.postgres.url.is_none() {
                return bad(
                    "outbox.enabled",
                    &true,
                    "the relay needs a database: set postgres.url (BURROW__POSTGRES__URL)",
                );
            }
        }
        Ok(())
    }

    /// The app queue: `queue.name`, or `events_<app.name>`.
    pub fn app_queue(&self) -> String {
        self.queue
            .name
            .clone()
            .unwrap_or_else(|| format!("events_{}", self.app.name))
    }

    /// The app's dead-letter queue: `<app queue>.dead`.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.app_queue())
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The `config` crate quotes offending values in its messages; a bad URL
/// value would carry the password with it.
fn redact_config_error(message: String) -> String {
    crate::redact::redact(&message)
}

/// A PostgreSQL schema name burrow accepts (an unquoted identifier).
fn valid_schema(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn url_has_password(url: &str) -> bool {
    url.split_once("://")
        .and_then(|(_, rest)| rest.rfind('@').map(|at| rest[..at].contains(':')))
        .unwrap_or(false)
}

/// Reads a password file (a Kubernetes or Docker secret mount): its
/// contents without the trailing line break. Errors name the key and the
/// path, never the contents.
fn read_password_file(key: &str, path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Config(format!(
            "{key} = {} cannot be read ({e}); point it at the file that holds the password \
             (a mounted secret), or unset it",
            path.display()
        ))
    })?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(Error::Config(format!(
            "{key} = {} is empty; the file must hold the password",
            path.display()
        )));
    }
    crate::redact::register_secret(password);
    Ok(password.to_owned())
}

/// The broker URL. `Display` and `Debug` show it with the password replaced
/// by `***`; only [`AmqpUrl::expose`] returns the real value, for connecting.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct AmqpUrl(String);

impl AmqpUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for the connection only. Never log this.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn validate(&self) -> Result<()> {
        let scheme_ok = self.0.starts_with("amqp://") || self.0.starts_with("amqps://");
        if !scheme_ok {
            return Err(Error::Config(format!(
                "amqp.url = {self} is invalid: it must start with amqp:// or amqps://, \
                 e.g. amqp://user:password@127.0.0.1:5672/%2f"
            )));
        }
        if let Err(e) = self.0.parse::<lapin::uri::AMQPUri>() {
            return Err(Error::Config(format!(
                "amqp.url = {self} is invalid: {}; expected amqp://user:password@host:port/vhost, \
                 with characters such as / @ : ? # % and spaces in the password percent-encoded \
                 (or the password in amqp.password_file)",
                crate::redact::redact(&e)
            )));
        }
        Ok(())
    }

    /// Whether the URL carries a password (`user:password@`).
    pub fn has_password(&self) -> bool {
        url_has_password(&self.0)
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::redact::url(&self.0))
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({self})")
    }
}

/// The PostgreSQL URL. Like [`AmqpUrl`], `Display` and `Debug` replace the
/// password with `***`, both `user:password@` and a `password=` query
/// parameter; only [`DatabaseUrl::expose`] returns the real value.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for the connection only. Never log this.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the URL carries a password (`user:password@` or `password=`).
    pub fn has_password(&self) -> bool {
        url_has_password(&self.0) || self.0.contains("password=")
    }

    fn validate(&self) -> Result<()> {
        if !(self.0.starts_with("postgres://") || self.0.starts_with("postgresql://")) {
            return Err(Error::Config(format!(
                "postgres.url = {self} is invalid: it must start with postgres:// or postgresql://, \
                 e.g. postgres://user:password@127.0.0.1:5432/app"
            )));
        }
        Ok(())
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::redact::url(&self.0))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_default_toml_matches_built_in_defaults() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let text = std::fs::read_to_string(dir.join("default.toml")).unwrap();
        let parsed: Settings = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(parsed, Settings::default());
    }

    #[test]
    fn every_environment_file_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let env = path.file_stem().unwrap().to_str().unwrap().to_owned();
            if env != "default" {
                Settings::load_from(&dir, Some(&env))
                    .unwrap_or_else(|e| panic!("config/{env}.toml: {e}"));
            }
        }
    }

    #[test]
    fn url_display_and_debug_hide_the_password() {
        let url = AmqpUrl::new("amqp://svc:s3cr3t-pw@broker:5672/%2f");
        assert_eq!(url.to_string(), "amqp://***@broker:5672/%2f");
        assert!(!format!("{url:?}").contains("s3cr3t-pw"));
        let settings = Settings {
            amqp: AmqpSettings {
                url,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(!format!("{settings:?}").contains("s3cr3t-pw"));
    }

    #[test]
    fn bad_values_name_the_key_the_value_and_the_fix() {
        let load = |toml: &str| {
            config::Config::builder()
                .add_source(config::File::from_str(toml, config::FileFormat::Toml))
                .build()
                .unwrap()
                .try_deserialize::<Settings>()
                .map_err(|e| e.to_string())
        };
        let e = load("[http]\naddr = \"localhost:9090\"").unwrap_err();
        assert!(
            e.contains("\"localhost:9090\"")
                && e.contains("127.0.0.1:9090")
                && e.contains("\"off\""),
            "{e}"
        );
        assert_eq!(load("[http]\naddr = \"off\"").unwrap().http.addr, None);
        assert_eq!(load("[http]\naddr = \"\"").unwrap().http.addr, None);
        let e = load("[log]\nformat = \"yaml\"").unwrap_err();
        assert!(
            e.contains("\"yaml\"") && e.contains("\"text\"") && e.contains("\"json\""),
            "{e}"
        );
        let e = load("[queue]\ntype = \"stream\"").unwrap_err();
        assert!(
            e.contains("\"stream\"") && e.contains("\"quorum\"") && e.contains("\"classic\""),
            "{e}"
        );
        assert_eq!(
            load("[queue]\ntype = \"classic\"").unwrap().queue.kind,
            QueueType::Classic
        );
    }

    #[test]
    fn concurrency_above_prefetch_is_a_warning_with_the_fix() {
        let mut s = Settings::default();
        assert!(s.warnings().is_empty());
        s.consumer.prefetch = 4;
        s.consumer.concurrency = 64;
        s.validate().expect("valid, if odd");
        let w = s.warnings();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("consumer.prefetch") && w[0].contains("at most 4"),
            "{w:?}"
        );
    }

    #[test]
    fn validation_names_the_key() {
        let mut s = Settings::default();
        s.consumer.prefetch = 0;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("consumer.prefetch"), "{e}");

        let mut s = Settings::default();
        s.app.name = "my app".into();
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("app.name") && e.contains("\"my app\""), "{e}");

        let mut s = Settings::default();
        s.amqp.url = AmqpUrl::new("http://u:hunter2@host");
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("amqp.url") && !e.contains("hunter2"), "{e}");

        let mut s = Settings::default();
        s.retry.delays = vec![Duration::ZERO];
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("retry.delays[0]"), "{e}");
    }

    #[test]
    fn database_url_hides_the_password() {
        let url = DatabaseUrl::new("postgres://app:pg-s3cret@db:5432/app?sslmode=require");
        assert_eq!(
            url.to_string(),
            "postgres://***@db:5432/app?sslmode=require"
        );
        let url = DatabaseUrl::new("postgres://db/app?user=app&password=pg-s3cret&x=1");
        assert_eq!(
            url.to_string(),
            "postgres://db/app?user=app&password=***&x=1"
        );
        let mut s = Settings::default();
        s.postgres.url = Some(url);
        assert!(!format!("{s:?}").contains("pg-s3cret"));
        s.postgres.url = Some(DatabaseUrl::new("mysql://u:pg-s3cret@h/db"));
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("postgres.url") && !e.contains("pg-s3cret"),
            "{e}"
        );
    }

    #[test]
    fn the_outbox_needs_a_database() {
        let mut s = Settings::default();
        s.outbox.enabled = true;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("outbox.enabled"), "{e}");
        s.postgres.url = Some(DatabaseUrl::new("postgres://postgres@127.0.0.1/test"));
        assert_eq!(s.validate().is_ok(), cfg!(feature = "postgres"));

        let mut s = Settings::default();
        s.postgres.schema = Some("Bad-Schema".into());
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("postgres.schema"), "{e}");
        let mut s = Settings::default();
        s.outbox.batch_size = 0;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("outbox.batch_size")
        );
    }

    #[test]
    fn inbox_rows_outlive_the_retry_ladder() {
        let mut s = Settings::default();
        s.inbox.retention = Duration::from_secs(60);
        let e = s.validate().unwrap_err().to_string();
        assert!(
            e.contains("inbox.retention") && e.contains("11m 11s"),
            "{e}"
        );
        s.inbox.retention = Duration::ZERO;
        assert!(s.validate().is_ok(), "0s keeps rows forever");
        s.inbox.retention = Duration::from_secs(3600);
        assert!(s.validate().is_ok());
        s.inbox.cleanup_interval = Duration::ZERO;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("inbox.cleanup_interval"), "{e}");
    }

    #[test]
    fn names_derive_from_the_app() {
        let mut s = Settings::default();
        s.app.name = "library".into();
        assert_eq!(s.app_queue(), "events_library");
        assert_eq!(s.dead_letter_queue(), "events_library.dead");
        s.queue.name = Some("custom".into());
        assert_eq!(s.dead_letter_queue(), "custom.dead");
    }
}
