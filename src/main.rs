//! The `burrow` binary: the library's CLI with this app's handler modules.

use std::process::ExitCode;

// The reference modules expose inspection methods (stores, switches) that
// only their unit tests call.
#[allow(dead_code)]
#[path = "../handlers/mod.rs"]
mod handlers;

fn main() -> ExitCode {
    reserve_thread_stacks();
    burrow::cli::main(burrow::cli::App {
        register: handlers::register,
        samples: handlers::samples,
    })
}

/// Gives every thread the process spawns (lapin's I/O thread, the tokio
/// workers) the stack [`burrow::wire::MIN_IO_STACK_BYTES`]: enough to parse
/// and drop the most deeply nested headers one frame can carry, so such a
/// message is dead-lettered as `headers_too_large` instead of aborting the
/// worker with a stack overflow. With RabbitMQ's default `frame_max` of
/// 128 KiB a header can nest 26,206 field arrays deep; lapin parses them
/// recursively and needs 44 MiB of stack for that in a release build
/// (295 MiB in a debug build), against the 2 MiB threads get by default.
///
/// The reservation (74 MiB a thread, 433 MiB in debug) is address space:
/// stack pages are committed only when a thread touches them. An idle
/// release `burrow run` keeps its resident memory (17.0 to 17.6 MB without,
/// 17.0 to 18.1 MB with, five runs each; its threads' stacks hold 8 to
/// 76 KiB each either way); only its virtual size grows, from 288 to
/// 575 MiB.
///
/// lapin takes no stack size of its own, so only `RUST_MIN_STACK` reaches
/// its thread, and the standard library reads it when the first thread is
/// spawned: this runs before the runtime is built. A larger `RUST_MIN_STACK`
/// from the environment is kept (a broker with a larger `frame_max` needs
/// [`burrow::wire::io_stack_bytes`] of it). Capping `frame_max` (the URL's
/// `?frame_max=`) would not lower the bound: the headers were limited by
/// the publisher's frame, and lapin parses a frame before it compares its
/// size with `frame_max` (and then closes the connection, which puts the
/// message back in the queue).
fn reserve_thread_stacks() {
    let needed = burrow::wire::MIN_IO_STACK_BYTES;
    let set = std::env::var("RUST_MIN_STACK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if set.is_none_or(|bytes| bytes < needed) {
        // SAFETY: the process has no other thread yet to read the
        // environment concurrently.
        unsafe { std::env::set_var("RUST_MIN_STACK", needed.to_string()) };
    }
}
