//! Opening connections: heartbeats on, a connect timeout, a name that shows
//! in the management UI, and errors that never carry the password.
//!
//! For `amqps://` the broker's certificate is always verified (lapin's
//! rustls with the platform verifier: the system's roots plus
//! `amqp.tls.ca_file`). A handshake refused on certificate grounds becomes
//! [`Error::Tls`], which says which `amqp.tls` key to change.

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
///
/// lapin applies `connection_timeout` to the TCP connect alone; the AMQP
/// handshake after it (start, tune, open) is bounded here by the same figure,
/// so that a socket that accepts and then stays silent (a blackhole, a broker
/// stuck on boot) fails the connect instead of holding it for ever.
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;

/// Opens a connection named `name` as `[amqp]` describes: URL, heartbeat and TLS.
pub async fn open(amqp: &AmqpSettings, name: &str) -> Result<Connection> {
    let password = amqp.password()?;
    connect_uri(&amqp.url, password, amqp.heartbeat, &amqp.tls, name).await
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
    connect_uri(url, None, heartbeat, tls, name).await
}

/// Opens a connection to `url`, with `password` in place of the URL's.
async fn connect_uri(
    url: &AmqpUrl,
    password: Option<String>,
    heartbeat: u16,
    tls: &TlsSettings,
    name: &str,
) -> Result<Connection> {
    let mut uri: AMQPUri = url.expose().parse().map_err(|e: String| {
        Error::config(
            "amqp.url",
            format!("amqp.url = {url} is invalid: {}", crate::redact::redact(&e)),
        )
    })?;
    if let Some(password) = password {
        uri.authority.userinfo.password = password;
    }
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
    let limit = std::time::Duration::from_millis(
        uri.query
            .connection_timeout
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS),
    );
    // The TCP connect has this limit inside lapin; the whole handshake gets
    // it again here (see DEFAULT_CONNECT_TIMEOUT_MS).
    let connecting = Connection::connect_uri_with_config(uri, properties, tls_config, runtime);
    match tokio::time::timeout(limit, connecting).await {
        Ok(connected) => connected.map_err(|source| connect_error(url, tls, source)),
        Err(_) => Err(Error::Connect {
            url: url.to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the AMQP handshake did not finish within {limit:?}; the broker accepted \
                     the TCP connection but did not answer (is something between here and the \
                     broker dropping traffic, or is the broker still booting?)"
                ),
            )
            .into(),
        }),
    }
}

/// Tells a refused TLS handshake apart from an unreachable broker. rustls
/// reports both its own verdict on the broker's certificate
/// (`invalid peer certificate: …`) and the alert the broker ends the
/// handshake with (`received fatal alert: …`) as I/O errors; only their text
/// tells them apart.
fn connect_error(url: &AmqpUrl, tls: &TlsSettings, source: lapin::Error) -> Error {
    if let lapin::ErrorKind::ProtocolError(e) = source.kind() {
        use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
        if matches!(
            e.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
        ) {
            return Error::AccessRefused {
                url: url.to_string(),
                reply: crate::redact::redact(&e.to_string()),
            };
        }
    }
    if matches!(source.kind(), lapin::ErrorKind::AuthProviderError(_)) {
        return Error::AccessRefused {
            url: url.to_string(),
            reply: crate::redact::redact(&source.to_string()),
        };
    }
    let lapin::ErrorKind::IOError(io) = source.kind() else {
        return Error::Connect {
            url: url.to_string(),
            source,
        };
    };
    let reason = io.to_string();
    let Some(fix) = tls_fix(&reason, tls) else {
        return Error::Connect {
            url: url.to_string(),
            source,
        };
    };
    Error::Tls {
        url: url.to_string(),
        reason,
        fix,
    }
}

/// What to change for a TLS failure described by `reason`, if it is one.
fn tls_fix(reason: &str, tls: &TlsSettings) -> Option<String> {
    let lower = reason.to_ascii_lowercase();
    if let Some(problem) = lower.strip_prefix("invalid peer certificate: ") {
        return Some(
            if problem.contains("notvalidforname") || problem.contains("not valid for name") {
                "the broker's certificate does not name the host in amqp.url; connect with a host name \
             or IP address listed in the certificate's subject alternative names"
                .into()
            } else if problem.contains("expired") || problem.contains("notvalidyet") {
                "the broker's certificate is outside its validity period; renew it on the broker \
             (or correct this machine's clock)"
                    .into()
            } else {
                match &tls.ca_file {
                    Some(path) => format!(
                        "the broker's certificate is not signed by the CA in amqp.tls.ca_file = {}; \
                     set amqp.tls.ca_file to the PEM file of the CA that signed it",
                        path.display()
                    ),
                    None => "the broker's certificate is not signed by a CA this machine trusts; \
                         set amqp.tls.ca_file to the PEM file of the CA that signed it"
                        .into(),
                }
            },
        );
    }
    if let Some(alert) = lower.strip_prefix("received fatal alert: ") {
        let about_our_certificate = [
            "certificaterequired",
            "badcertificate",
            "unknownca",
            "certificateunknown",
            "unsupportedcertificate",
            "certificateexpired",
            "certificaterevoked",
            "decrypterror",
            "accessdenied",
        ]
        .iter()
        .any(|a| alert.starts_with(a));
        return match (&tls.client_cert_file, about_our_certificate) {
            (None, true) => Some(
                "the broker requires a client certificate; set amqp.tls.client_cert_file and \
                 amqp.tls.client_key_file to a certificate signed by a CA the broker trusts \
                 and its private key"
                    .into(),
            ),
            (Some(path), true) => Some(format!(
                "the broker refused the client certificate in amqp.tls.client_cert_file = {}; \
                 it must be signed by a CA in the broker's ssl_options.cacertfile, be valid now \
                 and allow client authentication",
                path.display()
            )),
            (None, false) if alert.starts_with("handshakefailure") => Some(
                "the broker ended the handshake: it may require a client certificate (set \
                 amqp.tls.client_cert_file and amqp.tls.client_key_file) or share no TLS \
                 version or cipher suite with burrow"
                    .into(),
            ),
            // Other alerts may be the broker's own trouble: a plain,
            // retryable connection error.
            _ => None,
        };
    }
    if lower.starts_with("received corrupt message") {
        return Some(
            "the port in amqp.url does not speak TLS; use the broker's TLS port (5671 by \
             default) with amqps://, or amqp:// with the plain port"
                .into(),
        );
    }
    None
}

fn read(key: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::config(
            key,
            format!("{key} = {}: cannot read it: {e}", path.display()),
        )
    })
}

/// Reads a PEM file and checks that it holds a `label` block: rustls skips
/// what it cannot parse, so a wrong file would otherwise surface later as a
/// puzzling handshake failure.
fn read_pem(key: &str, path: &std::path::Path, label: &str, what: &str) -> Result<Vec<u8>> {
    let bytes = read(key, path)?;
    let text = String::from_utf8_lossy(&bytes);
    // `PRIVATE KEY` also matches `RSA PRIVATE KEY` and `EC PRIVATE KEY`,
    // which rustls reads as well.
    if !text.contains(&format!("{label}-----")) {
        return Err(Error::config(
            key,
            format!(
                "{key} = {} holds no PEM {label}; point it at {what}",
                path.display()
            ),
        ));
    }
    Ok(bytes)
}

fn tls_config(tls: &TlsSettings) -> Result<OwnedTLSConfig> {
    let cert_chain = match &tls.ca_file {
        Some(path) => Some(
            String::from_utf8(read_pem(
                "amqp.tls.ca_file",
                path,
                "CERTIFICATE",
                "the CA certificate that signed the broker's certificate",
            )?)
            .map_err(|_| {
                Error::config(
                    "amqp.tls.ca_file",
                    format!(
                        "amqp.tls.ca_file = {} is not a PEM text file",
                        path.display()
                    ),
                )
            })?,
        ),
        None => None,
    };
    let identity = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read_pem(
                "amqp.tls.client_cert_file",
                cert,
                "CERTIFICATE",
                "the client certificate",
            )?,
            key: read_pem(
                "amqp.tls.client_key_file",
                key,
                "PRIVATE KEY",
                "the client certificate's private key",
            )?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_name_the_key_to_change() {
        let none = TlsSettings::default();
        let with_ca = TlsSettings {
            ca_file: Some("/etc/burrow/ca.pem".into()),
            ..TlsSettings::default()
        };
        let fix = tls_fix("invalid peer certificate: UnknownIssuer", &with_ca).unwrap();
        assert!(
            fix.contains("amqp.tls.ca_file = /etc/burrow/ca.pem"),
            "{fix}"
        );
        let fix = tls_fix("invalid peer certificate: UnknownIssuer", &none).unwrap();
        assert!(fix.contains("set amqp.tls.ca_file"), "{fix}");
        let fix = tls_fix(
            "invalid peer certificate: certificate not valid for name \"broker\"",
            &none,
        )
        .unwrap();
        assert!(fix.contains("subject alternative names"), "{fix}");
        let fix = tls_fix("received fatal alert: CertificateRequired", &none).unwrap();
        assert!(fix.contains("amqp.tls.client_cert_file"), "{fix}");
        let fix = tls_fix("received corrupt message of type InvalidContentType", &none).unwrap();
        assert!(fix.contains("TLS port"), "{fix}");
        // Not about certificates: an ordinary, retryable connection error.
        assert_eq!(tls_fix("received fatal alert: InternalError", &none), None);
        assert_eq!(tls_fix("Connection refused (os error 111)", &none), None);
    }
}
