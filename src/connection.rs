//! Opening connections: heartbeats on, a connect timeout, a name that shows
//! in the management UI, and errors that never carry the password.

use lapin::{
    Connection, ConnectionProperties,
    tcp::{OwnedIdentity, OwnedTLSConfig},
    types::LongString,
    uri::AMQPUri,
};

use crate::{
    config::{AmqpSettings, AmqpUrl, TlsSettings},
    error::{Error, Result},
};

/// Milliseconds to wait for the TCP and AMQP handshake when the URL does not
/// say (`?connection_timeout=`); without one a blackholed broker hangs start-up.
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;

/// Opens a connection named `name` as `[amqp]` describes: URL, heartbeat and TLS.
pub async fn open(amqp: &AmqpSettings, name: &str) -> Result<Connection> {
    connect_with_tls(&amqp.url, amqp.heartbeat, &amqp.tls, name).await
}

/// Opens a connection named `name` with the given heartbeat (seconds), unless
/// the URL already sets `?heartbeat=`; TLS uses the system's roots.
pub async fn connect(url: &AmqpUrl, heartbeat: u16, name: &str) -> Result<Connection> {
    connect_with_tls(url, heartbeat, &TlsSettings::default(), name).await
}

/// Like [`connect`], with certificates from `tls`.
pub async fn connect_with_tls(
    url: &AmqpUrl,
    heartbeat: u16,
    tls: &TlsSettings,
    name: &str,
) -> Result<Connection> {
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
    let tls_config = tls_config(tls)?;
    let runtime = lapin::runtime::default_runtime().map_err(|source| Error::Connect {
        url: url.to_string(),
        source,
    })?;
    Connection::connect_uri_with_config(uri, properties, tls_config, runtime)
        .await
        .map_err(|source| Error::Connect {
            url: url.to_string(),
            source,
        })
}

fn read(key: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("{key} = {}: cannot read it: {e}", path.display())))
}

fn tls_config(tls: &TlsSettings) -> Result<OwnedTLSConfig> {
    let cert_chain = match &tls.ca_file {
        Some(path) => Some(
            String::from_utf8(read("amqp.tls.ca_file", path)?).map_err(|_| {
                Error::Config(format!(
                    "amqp.tls.ca_file = {} is not a PEM text file",
                    path.display()
                ))
            })?,
        ),
        None => None,
    };
    let identity = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("amqp.tls.client_cert_file", cert)?,
            key: read("amqp.tls.client_key_file", key)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}
