//! Health and metrics endpoint (axum), at `http.addr`.
//!
//! - `GET /healthz` — liveness: 200 unless the worker stopped, or deliveries
//!   are in flight and none has settled for longer than a handler timeout
//!   plus two confirm timeouts (the loop is stuck, not merely idle). A
//!   worker waiting to reconnect is alive: restarting it would not help.
//! - `GET /readyz` — readiness: 200 only while consuming (connected,
//!   topology declared); 503 while starting, reconnecting or draining.
//! - `GET /metrics` — Prometheus text ([`crate::metrics`]).
//! - `/console` — the operator console ([`crate::console`]), when `burrow
//!   run` serves it.

use std::{future::Future, net::SocketAddr, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::sync::watch;

use crate::{
    consumer::WorkerState,
    error::{Error, Result},
    metrics::Metrics,
};

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    state: watch::Receiver<WorkerState>,
    stall_after: Duration,
}

/// The endpoint's routes, for embedding in another axum app.
pub fn router(
    metrics: Metrics,
    state: watch::Receiver<WorkerState>,
    stall_after: Duration,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState {
            metrics,
            state,
            stall_after,
        })
}

/// Binds `addr`; fails with a message naming `http.addr` when it is taken.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        Error::config(
            "http.addr",
            format!("http.addr = {addr} cannot be bound: {e}; pick a free port or unset http.addr"),
        )
    })
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let addr = listener.local_addr().map_err(|source| Error::HttpServe {
        addr: "(unbound)".into(),
        source,
    })?;
    tracing::info!(%addr, "serving /healthz, /readyz, /metrics and /console");
    // The peer address reaches the handlers: the console's audit log names it.
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(|source| Error::HttpServe {
        addr: addr.to_string(),
        source,
    })
}

async fn healthz(State(app): State<AppState>) -> impl IntoResponse {
    let state = *app.state.borrow();
    if state == WorkerState::Stopped {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopped\n".to_string());
    }
    let in_flight = app.metrics.in_flight();
    let quiet = Duration::from_millis(app.metrics.millis_since_last_settlement().max(0) as u64);
    if in_flight > 0 && quiet > app.stall_after {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: {in_flight} deliveries in flight and none settled for {}\n",
                humantime::format_duration(Duration::from_secs(quiet.as_secs()))
            ),
        );
    }
    (StatusCode::OK, "ok\n".to_string())
}

async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    match *app.state.borrow() {
        WorkerState::Consuming => (StatusCode::OK, "ready\n"),
        WorkerState::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
        WorkerState::Reconnecting => (StatusCode::SERVICE_UNAVAILABLE, "reconnecting\n"),
        WorkerState::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        WorkerState::Stopped => (StatusCode::SERVICE_UNAVAILABLE, "stopped\n"),
    }
}

async fn metrics_text(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
}

/// `burrow healthcheck`: GET `/healthz` on the local endpoint; `Ok` on 200.
///
/// Written by hand on a plain TCP stream: it is one request to our own
/// loopback port, and the container image has no curl; an HTTP client crate
/// would add far more code than these lines.
pub async fn probe(addr: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(target).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.0\r\nHost: {target}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .map_err(|_| Error::Probe {
            url: format!("http://{target}{path}"),
            problem: "no answer within 5 s".into(),
        })?
        .map_err(|e| Error::Probe {
            url: format!("http://{target}{path}"),
            problem: format!("cannot reach it: {e}"),
        })?;
    let status = response.lines().next().unwrap_or_default().to_owned();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_owned();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(body)
    } else {
        Err(Error::Probe {
            url: format!("http://{target}{path}"),
            problem: format!("answered {status:?}: {body}"),
        })
    }
}
