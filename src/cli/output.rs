//! What commands print on stdout: human text by default, JSON with
//! `--output json`, always redacted ([`crate::redact`]).
//!
//! A reader that goes away (`burrow dlq list | head -1`) is not an error:
//! the first failed write ends the command quietly with exit 0 instead of
//! the standard library's panic on a closed stdout.

use std::io::{self, Write};

use clap::ValueEnum;

use super::{CliError, CliResult};
use crate::redact::redact;

/// The format of a command's results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Format {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON document, or JSON lines for streams (`dlq export`).
    Json,
}

/// The command's stdout (and its error line on stderr).
#[derive(Debug)]
pub(crate) struct Out {
    format: Format,
}

impl Out {
    pub(crate) fn new(format: Format) -> Self {
        Self { format }
    }

    /// Writes `text` and a line break (text mode only).
    pub(crate) fn line(&self, text: &str) -> CliResult {
        if self.format == Format::Text {
            write_stdout(&format!("{text}\n"))
        } else {
            Ok(())
        }
    }

    /// Writes `text` as it is (text mode only).
    pub(crate) fn text(&self, text: &str) -> CliResult {
        if self.format == Format::Text {
            write_stdout(text)
        } else {
            Ok(())
        }
    }

    /// Writes `value` as one line of JSON (JSON mode only).
    pub(crate) fn json(&self, value: &serde_json::Value) -> CliResult {
        if self.format == Format::Json {
            write_stdout(&format!("{value}\n"))
        } else {
            Ok(())
        }
    }

    /// Writes `text` in text mode, `value` in JSON mode.
    pub(crate) fn either(&self, text: &str, value: &serde_json::Value) -> CliResult {
        match self.format {
            Format::Text => write_stdout(text),
            Format::Json => write_stdout(&format!("{value}\n")),
        }
    }

    /// A line on stderr: the final error, or a warning next to the results.
    pub(crate) fn error(&self, message: &str) {
        let line = match self.format {
            Format::Text => format!("error: {message}\n"),
            Format::Json => format!("{}\n", serde_json::json!({ "error": message })),
        };
        let _ = io::stderr().write_all(redact(&line).as_bytes());
    }
}

/// Writes to stdout, redacted, and flushes (a pipe sees each line at once).
pub(crate) fn write_stdout(text: &str) -> CliResult {
    let mut stdout = io::stdout().lock();
    stdout
        .write_all(redact(text).as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe => CliError::ClosedPipe,
            _ => CliError::Output(e),
        })
}
