//! Secrets in the settings: the URLs whose `Display` and `Debug` never show
//! their password, and password files (Kubernetes and Docker secret mounts).

use std::{fmt, path::Path};

use serde::Deserialize;

use crate::error::{Error, Result};

pub(super) fn url_has_password(url: &str) -> bool {
    url.split_once("://")
        .and_then(|(_, rest)| rest.rfind('@').map(|at| rest[..at].contains(':')))
        .unwrap_or(false)
}

/// Reads a password file (a Kubernetes or Docker secret mount): its
/// contents without the trailing line break. Errors name the key and the
/// path, never the contents.
pub(super) fn read_password_file(key: &str, path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(
            key,
            format!(
                "{key} = {} cannot be read ({e}); point it at the file that holds the password \
             (a mounted secret), or unset it",
                path.display()
            ),
        )
    })?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(Error::config(
            key,
            format!(
                "{key} = {} is empty; the file must hold the password",
                path.display()
            ),
        ));
    }
    crate::redact::register_secret(password);
    Ok(password.to_owned())
}

/// A URL that may carry a password: `Display` and `Debug` show it with its
/// userinfo replaced by `***` ([`crate::redact::url`]); only `expose`
/// returns the real value, for connecting.
macro_rules! secret_url {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a URL.
            pub fn new(url: impl Into<String>) -> Self {
                Self(url.into())
            }

            /// The URL with its password, for the connection only. Never log this.
            pub fn expose(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&crate::redact::url(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }
    };
}

secret_url!(
    /// The broker URL (`amqp.url`), `amqp://user:password@host:5672/%2f`.
    AmqpUrl
);

impl AmqpUrl {
    pub(super) fn validate(&self) -> Result<()> {
        let scheme_ok = self.0.starts_with("amqp://") || self.0.starts_with("amqps://");
        if !scheme_ok {
            return Err(Error::config(
                "amqp.url",
                format!(
                    "amqp.url = {self} is invalid: it must start with amqp:// or amqps://, \
                 e.g. amqp://user:password@127.0.0.1:5672/%2f"
                ),
            ));
        }
        if let Err(e) = self.0.parse::<lapin::uri::AMQPUri>() {
            return Err(Error::config(
                "amqp.url",
                format!(
                    "amqp.url = {self} is invalid: {}; expected amqp://user:password@host:port/vhost, \
                 with characters such as / @ : ? # % and spaces in the password percent-encoded \
                 (or the password in amqp.password_file)",
                    crate::redact::redact(&e)
                ),
            ));
        }
        Ok(())
    }

    /// Whether the URL carries a password (`user:password@`).
    pub fn has_password(&self) -> bool {
        url_has_password(&self.0)
    }
}

secret_url!(
    /// The PostgreSQL URL (`postgres.url`); besides `user:password@`, a
    /// `password=` query parameter is hidden too.
    DatabaseUrl
);

impl DatabaseUrl {
    /// Whether the URL carries a password (`user:password@` or `password=`).
    pub fn has_password(&self) -> bool {
        url_has_password(&self.0) || self.0.contains("password=")
    }

    pub(super) fn validate(&self) -> Result<()> {
        if !(self.0.starts_with("postgres://") || self.0.starts_with("postgresql://")) {
            return Err(Error::config(
                "postgres.url",
                format!(
                    "postgres.url = {self} is invalid: it must start with postgres:// or postgresql://, \
                 e.g. postgres://user:password@127.0.0.1:5432/app"
                ),
            ));
        }
        Ok(())
    }
}

secret_url!(
    /// The RabbitMQ management API (`management.url`),
    /// `http://user:password@host:15672`.
    ManagementUrl
);

impl ManagementUrl {
    /// Whether the URL carries a password (`user:password@`).
    pub fn has_password(&self) -> bool {
        url_has_password(&self.0)
    }

    pub(super) fn validate(&self) -> Result<()> {
        if !(self.0.starts_with("http://") || self.0.starts_with("https://")) {
            return Err(Error::config(
                "management.url",
                format!(
                    "management.url = {self} is invalid: it must start with http:// or https://, \
                     e.g. http://user:password@127.0.0.1:15672"
                ),
            ));
        }
        Ok(())
    }
}
