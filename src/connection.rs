//! Opening connections: heartbeats on, a connect timeout, a name that shows
//! in the management UI, and errors that never carry the password.

use lapin::{Connection, ConnectionProperties, types::LongString, uri::AMQPUri};

use crate::{
    config::AmqpUrl,
    error::{Error, Result},
};

/// Milliseconds to wait for the TCP and AMQP handshake when the URL does not
/// say (`?connection_timeout=`); without one a blackholed broker hangs start-up.
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;

/// Opens a connection named `name` with the given heartbeat (seconds), unless
/// the URL already sets `?heartbeat=`.
pub async fn connect(url: &AmqpUrl, heartbeat: u16, name: &str) -> Result<Connection> {
    let mut uri: AMQPUri = url.expose().parse().map_err(|e: String| {
        Error::Config(format!(
            "amqp.url = {url} is invalid: {}",
            crate::config::redact_urls(&e)
        ))
    })?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(heartbeat);
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(DEFAULT_CONNECT_TIMEOUT_MS);
    }
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(name.as_bytes().to_vec()));
    Connection::connect_uri(uri, properties)
        .await
        .map_err(|source| Error::Connect {
            url: url.to_string(),
            source,
        })
}
