//! The shutdown signal the binary hands to [`crate::Worker::run`].
//!
//! A worker takes its shutdown as a future parameter (`run(shutdown)`), so
//! an embedding program can stop it however it likes; this is the one a
//! container runtime sends.

/// Completes on SIGINT or SIGTERM: what Kubernetes, Fly.io and docker compose
/// send to stop a container.
///
/// ```no_run
/// # async fn run(worker: burrow::Worker) -> burrow::Result<()> {
/// worker.run(burrow::shutdown::signal()).await?;
/// # Ok(()) }
/// ```
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
