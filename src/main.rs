//! The `burrow` binary: the library's CLI with this app's handler modules.

use std::process::ExitCode;

// The reference modules expose inspection methods (stores, switches) that
// only their unit tests call.
#[allow(dead_code)]
#[path = "../handlers/mod.rs"]
mod handlers;

fn main() -> ExitCode {
    burrow::cli::main(burrow::cli::App {
        register: handlers::register,
        samples: handlers::samples,
    })
}
