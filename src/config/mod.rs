//! Settings: `config/default.toml`, then `config/<APP_ENV>.toml`, then
//! environment variables (`BURROW__AMQP__URL`, `BURROW__CONSUMER__PREFETCH`, ...).
//!
//! Everything is validated once at start; an error names the key, the value
//! and what would be accepted. The broker URL is wrapped in [`AmqpUrl`] whose
//! `Debug` and `Display` hide the password, so printing a [`Settings`] is safe.

//!
//! | file | job |
//! |---|---|
//! | `mod.rs` | [`Settings`]: loading and validating |
//! | `sections.rs` | one struct per `[section]`, with its defaults |
//! | `secret.rs` | [`AmqpUrl`], [`DatabaseUrl`] and password files: secrets that never print |

mod http;
mod ordering;
mod secret;
mod sections;

use std::{fmt, path::Path, time::Duration};

use serde::Deserialize;

pub use self::{http::*, ordering::*, secret::*, sections::*};
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
    /// The broker's management HTTP API, for `burrow doctor` and the
    /// binding check of `burrow topology verify`.
    pub management: ManagementSettings,
    /// Per-handler concurrency and rate limits, by handler name
    /// (`[limits."billing.charge_card"]`), over those set in code.
    pub limits: std::collections::BTreeMap<String, crate::limit::LimitSettings>,
    /// Per-aggregate order: shard queues over a consistent-hash exchange.
    pub ordering: OrderingSettings,
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
                return Err(Error::config(
                    "APP_ENV",
                    format!(
                        "APP_ENV={env} but {} does not exist; create it or unset APP_ENV",
                        path.display()
                    ),
                ));
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
            .map_err(|e| Error::config("config files", redact_config_error(e.to_string())))?;
        // Known before anything can fail on them: a deserialisation error
        // quotes the offending value, which may be one of these URLs.
        for key in ["amqp.url", "postgres.url", "management.url"] {
            if let Ok(url) = raw.get_string(key) {
                crate::redact::register_url_password(&url);
            }
        }
        let settings: Settings = raw
            .try_deserialize()
            .map_err(|e| Error::config("config files", redact_config_error(e.to_string())))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Settings that are valid but probably not what was meant, one line
    /// each with the fix; [`crate::Worker::run`] logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let deadline = self.consumer.ack_deadline(self.publisher.confirm_timeout);
        if let Some(timeout) = self.consumer.ack_timeout
            && timeout < deadline
        {
            warnings.push(format!(
                "consumer.ack_timeout = {} is shorter than what a delivery may need ({}: queued behind \
                 prefetch/concurrency handler runs, its own run, two confirms); the broker would take \
                 deliveries back that are still being worked on. Raise it or leave it unset",
                humantime::format_duration(timeout),
                humantime::format_duration(deadline)
            ));
        }
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
            Err(Error::config(
                key,
                format!("{key} = {value} is invalid: {fix}"),
            ))
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
        if let Some(timeout) = self.consumer.ack_timeout
            && timeout < Duration::from_secs(1)
        {
            return bad(
                "consumer.ack_timeout",
                &humantime::format_duration(timeout),
                "use a duration of a second or more, or leave it unset for the derived deadline",
            );
        }
        self.management.validate()?;
        self.http.validate()?;
        self.ordering.validate(&self.retry.delays)?;
        for (handler, limits) in &self.limits {
            limits.limits(handler)?;
        }
        self.validate_postgres()
    }

    fn validate_postgres(&self) -> Result<()> {
        let bad = |key: &str, value: &dyn fmt::Display, fix: &str| {
            Err(Error::config(
                key,
                format!("{key} = {value} is invalid: {fix}"),
            ))
        };
        if let Some(url) = &self.postgres.url {
            crate::redact::register_url_password(url.expose());
            url.validate()?;
            if self.postgres.password_file.is_some() && url.has_password() {
                return Err(Error::config(
                    "postgres.url",
                    format!(
                        "postgres.url = {url} carries a password and postgres.password_file is set too; keep one: \
                     remove the password from postgres.url or unset postgres.password_file"
                    ),
                ));
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
