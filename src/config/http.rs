//! `[http]`: the health, metrics and console endpoint.

use std::net::SocketAddr;

use serde::Deserialize;

use super::{secret::read_password_file, sections::deserialize_http_addr};
use crate::error::{Error, Result};

/// `[http]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of the health and metrics endpoint (an IP address and port);
    /// `"off"` (or an empty value) disables it.
    #[serde(deserialize_with = "deserialize_http_addr")]
    pub addr: Option<SocketAddr>,
    /// The operator console's token (`/console`). Required when `addr` is
    /// not a loopback address: without one the console refuses every
    /// request there. Put it in `BURROW__HTTP__CONSOLE_TOKEN` (a secret
    /// store) or use [`HttpSettings::console_token_file`], not a file in the
    /// image.
    pub console_token: Option<SecretToken>,
    /// A file holding the console token (a Kubernetes or Docker secret
    /// mount), read at start.
    pub console_token_file: Option<std::path::PathBuf>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            console_token: None,
            console_token_file: None,
        }
    }
}

/// Shortest console token accepted: a token anyone can guess protects nothing.
const MIN_CONSOLE_TOKEN_LEN: usize = 16;

impl HttpSettings {
    /// The console token, from `http.console_token` or read from
    /// `http.console_token_file`; `None` when neither is set.
    pub fn console_token(&self) -> Result<Option<String>> {
        match (&self.console_token, &self.console_token_file) {
            (Some(_), Some(_)) => Err(Error::config(
                "http.console_token",
                "http.console_token and http.console_token_file are both set; keep one \
                 (the file, for a mounted secret)",
            )),
            (Some(token), None) => Ok(Some(token.expose().to_owned())),
            (None, Some(path)) => read_password_file("http.console_token_file", path).map(Some),
            (None, None) => Ok(None),
        }
    }

    pub(super) fn validate(&self) -> Result<()> {
        if let Some(token) = &self.console_token {
            crate::redact::register_secret(token.expose());
        }
        if let Some(token) = self.console_token()?
            && token.chars().count() < MIN_CONSOLE_TOKEN_LEN
        {
            return Err(Error::config(
                "http.console_token",
                format!(
                    "http.console_token is {} characters long; use at least \
                     {MIN_CONSOLE_TOKEN_LEN} random ones, e.g. the output of `openssl rand -hex 32`",
                    token.chars().count()
                ),
            ));
        }
        Ok(())
    }
}

/// A secret string from the settings (a token): `Debug` shows `***`, and
/// there is no `Display`; only [`SecretToken::expose`] gives the value.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretToken(String);

impl SecretToken {
    /// Wraps a token.
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token itself, to compare with what a client sent. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretToken(***)")
    }
}
