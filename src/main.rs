//! The `burrow` binary: the library's CLI with this app's handler modules.

use std::process::ExitCode;

// The reference modules are written as a user writes handler modules: `pub`
// items (unreachable from this binary's root) and inspection methods
// (stores, switches) that only their unit tests call.
#[allow(dead_code, unreachable_pub)]
#[path = "../handlers/mod.rs"]
mod handlers;

fn main() -> ExitCode {
    burrow::cli::App::new()
        .modules(handlers::MODULES)
        .samples(handlers::samples)
        .run()
}
