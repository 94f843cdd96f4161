//! A small client of RabbitMQ's management HTTP API (the
//! `rabbitmq_management` plugin): what AMQP cannot tell, for `burrow doctor`
//! and the binding check of `burrow topology verify`. Read-only.
//!
//! <https://www.rabbitmq.com/docs/management#http-api>

use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::Deserialize;

use crate::{
    config::{ManagementSettings, Settings},
    error::{Error, Result},
};

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the management API of the broker `settings` name.
#[derive(Debug)]
pub(crate) struct Management {
    client: reqwest::Client,
    /// `scheme://host:port`, without userinfo or a trailing slash.
    base: String,
    /// For messages: the URL with its userinfo hidden.
    shown: String,
    user: String,
    password: String,
    /// The app's vhost (from `amqp.url`), percent-encoded for paths.
    vhost: String,
}

/// `GET /api/overview`, what burrow reads of it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Overview {
    pub(crate) rabbitmq_version: String,
    #[serde(default)]
    pub(crate) cluster_name: Option<String>,
}

/// One feature flag (`GET /api/feature-flags`).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct FeatureFlag {
    pub(crate) name: String,
    pub(crate) state: String,
    #[serde(default)]
    pub(crate) stability: Option<String>,
}

/// One binding of a queue (`GET /api/queues/{vhost}/{queue}/bindings`).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct QueueBinding {
    pub(crate) source: String,
    pub(crate) routing_key: String,
}

/// One consumer (`GET /api/consumers/{vhost}`), what burrow reads of it.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ConsumerInfo {
    pub(crate) consumer_tag: String,
    #[serde(default)]
    pub(crate) arguments: serde_json::Map<String, serde_json::Value>,
    pub(crate) queue: QueueName,
}

/// A queue reference in the API's answers.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct QueueName {
    pub(crate) name: String,
}

impl Management {
    /// The client for `settings.management`, or `None` when it is not
    /// configured.
    pub(crate) fn new(settings: &Settings) -> Result<Option<Self>> {
        let ManagementSettings { url, .. } = &settings.management;
        let Some(url) = url else {
            return Ok(None);
        };
        let mut parsed = reqwest::Url::parse(url.expose()).map_err(|e| {
            Error::config(
                "management.url",
                format!(
                    "management.url = {url} is not a URL ({e}); write it as \
                     http://user:password@host:15672"
                ),
            )
        })?;
        let decode = |text: &str| percent_decode_str(text).decode_utf8_lossy().into_owned();
        let (user, url_password) = if parsed.username().is_empty() {
            ("guest".to_owned(), "guest".to_owned())
        } else {
            (
                decode(parsed.username()),
                decode(parsed.password().unwrap_or_default()),
            )
        };
        // Credentials go in the Authorization header, not in request URLs.
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        let password = settings.management.password()?.unwrap_or(url_password);
        let vhost = settings
            .amqp
            .url
            .expose()
            .parse::<lapin::uri::AMQPUri>()
            .map(|u| u.vhost)
            .unwrap_or_else(|_| "/".into());
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| Error::Probe {
                url: url.to_string(),
                problem: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(Some(Self {
            client,
            base: parsed.as_str().trim_end_matches('/').to_owned(),
            shown: url.to_string(),
            user,
            password,
            vhost: encode_segment(&vhost),
        }))
    }

    /// The URL, userinfo hidden.
    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }

    /// `GET path`: `Ok(None)` for 404 (an endpoint this version lacks, or a
    /// missing entity).
    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<Option<T>> {
        let url = format!("{}{path}", self.base);
        let failed = |problem: String| Error::Probe {
            url: format!("{}{path}", self.shown.trim_end_matches('/')),
            problem,
        };
        let response = self
            .client
            .get(&url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| failed(format!("cannot reach the management API: {e}")))?;
        match response.status() {
            reqwest::StatusCode::NOT_FOUND => Ok(None),
            reqwest::StatusCode::UNAUTHORIZED => Err(failed(
                "the management API refused the credentials (401); check the user and password in \
                 management.url (or management.password_file), and that the user has the \
                 `monitoring` tag"
                    .into(),
            )),
            status if status.is_success() => response
                .json()
                .await
                .map(Some)
                .map_err(|e| failed(format!("unexpected answer: {e}"))),
            status => Err(failed(format!("answered {status}"))),
        }
    }

    pub(crate) async fn overview(&self) -> Result<Overview> {
        self.get("/api/overview")
            .await?
            .ok_or_else(|| Error::Probe {
                url: self.shown.clone(),
                problem: "no /api/overview: is this the management API's address?".into(),
            })
    }

    /// `None` on brokers without the endpoint (before 3.8).
    pub(crate) async fn feature_flags(&self) -> Result<Option<Vec<FeatureFlag>>> {
        self.get("/api/feature-flags").await
    }

    /// Deprecated features in use; `None` on brokers without the endpoint
    /// (before 3.13).
    pub(crate) async fn deprecated_features_used(&self) -> Result<Option<Vec<String>>> {
        #[derive(Deserialize)]
        struct Used {
            name: String,
        }
        let used: Option<Vec<Used>> = self.get("/api/deprecated-features/used").await?;
        Ok(used.map(|u| u.into_iter().map(|u| u.name).collect()))
    }

    /// The bindings of `queue` in the app's vhost; `None` when the queue
    /// does not exist.
    pub(crate) async fn queue_bindings(&self, queue: &str) -> Result<Option<Vec<QueueBinding>>> {
        self.get(&format!(
            "/api/queues/{}/{}/bindings",
            self.vhost,
            encode_segment(queue)
        ))
        .await
    }

    /// The consumers of the app's vhost.
    pub(crate) async fn consumers(&self) -> Result<Vec<ConsumerInfo>> {
        Ok(self
            .get(&format!("/api/consumers/{}", self.vhost))
            .await?
            .unwrap_or_default())
    }
}

/// RFC 3986's unreserved characters stay; everything else is encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `text` as one path segment (`/` as a vhost is `%2F`).
fn encode_segment(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT).to_string()
}

/// A `major.minor.patch` version, for comparisons; a part that does not
/// parse counts as 0.
pub(crate) fn version(text: &str) -> (u32, u32, u32) {
    let mut parts = text
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_number() {
        assert!(version("3.10.8") < version("3.12.0"));
        assert!(version("4.0.5") > version("3.13.7"));
        assert_eq!(version("4.1.0-rc.1"), (4, 1, 0));
    }

    #[test]
    fn vhosts_and_names_are_one_path_segment() {
        assert_eq!(encode_segment("/"), "%2F");
        assert_eq!(
            encode_segment("events_app.retry.1.1s"),
            "events_app.retry.1.1s"
        );
        assert_eq!(encode_segment("vh ost"), "vh%20ost");
    }
}
