//! `burrow console`: the operator console on its own, for a machine that
//! runs no worker (a laptop with a port-forward, a bastion host).

use std::net::SocketAddr;

use super::{CliResult, output::Out};
use crate::{Publisher, Settings, console::Console, shutdown};

/// Serves the console of `settings`' app at `addr` until SIGTERM/SIGINT.
pub(super) async fn command(settings: &Settings, addr: SocketAddr, out: &Out) -> CliResult {
    // Connecting now fails fast on a wrong URL or password, before a person
    // opens the page.
    let publisher = Publisher::connect(settings).await?;
    let router = Console::new(settings, publisher.clone(), addr)?.router();
    let listener = crate::http::bind(addr).await?;
    let bound = listener.local_addr().unwrap_or(addr);
    out.line(&format!(
        "console for app {} at http://{bound}/console (Ctrl-C stops it)",
        settings.app.name
    ))?;
    let served = crate::http::serve(listener, router, shutdown::signal()).await;
    publisher.close().await;
    Ok(served?)
}
