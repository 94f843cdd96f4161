//! burrow inside your own service: the whole `burrow` command line (run,
//! drain, dlq, topology, publish, healthcheck, ...) over your own handler
//! modules, for two apps in one process.
//!
//! ```sh
//! cargo run --example service -- run            # both workers, one /metrics and /readyz
//! cargo run --example service -- --app library-search dlq list
//! ```
//!
//! A service's `Cargo.toml` needs `burrow`, `serde` (and `tokio` for
//! anything async of its own); `main` is the few lines at the bottom.
//! Logging, the HTTP endpoint, SIGTERM draining and the exit codes come with
//! `App::run`.

use burrow::{Context, Event, HandlerError, Registry, cli::ModuleContext};
use serde::Deserialize;

/// What the feed module reads of a card added to a library.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CardAddedToLibraryEvent {
    aggregate_id: String,
    library_id: String,
}

impl Event for CardAddedToLibraryEvent {
    const EVENT_TYPE: &'static str = "CardAddedToLibraryEvent";
}

/// What the search module reads of a new collection.
#[derive(Debug, Deserialize)]
struct CollectionCreatedEvent {
    name: String,
}

impl Event for CollectionCreatedEvent {
    const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
}

/// The feed module of the app named by `app.name` (`BURROW__APP__NAME`).
fn feeds(registry: &mut Registry, _ctx: &ModuleContext) -> burrow::Result<()> {
    registry.on(
        "feeds.add_card",
        |event: CardAddedToLibraryEvent, ctx: Context| async move {
            tracing::info!(card = %event.aggregate_id, library = %event.library_id, attempt = ctx.attempt, "feed updated");
            Ok::<(), HandlerError>(())
        },
    )?;
    Ok(())
}

/// A second app in the same process, with a queue of its own: it gets
/// every collection event once, whatever the first app does.
fn search(registry: &mut Registry, _ctx: &ModuleContext) -> burrow::Result<()> {
    registry.on(
        "search.index_collection",
        |event: CollectionCreatedEvent, _ctx: Context| async move {
            tracing::info!(name = %event.name, "indexed");
            Ok::<(), HandlerError>(())
        },
    )?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    // The second app's name; the tests give it one of their own.
    let search_app = std::env::var("SEARCH_APP").unwrap_or_else(|_| "library-search".into());
    burrow::cli::App::new()
        .module(feeds)
        .app(&search_app, &[search])
        .run()
}
