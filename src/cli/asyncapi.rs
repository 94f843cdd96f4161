//! `burrow asyncapi`: the app's AsyncAPI 3.0 document on stdout.

use super::{CliResult, output::Out};
use crate::{Registry, Settings, asyncapi};

/// Prints the document: YAML by default, one JSON document with `--output
/// json`. Event types whose views carry no schema are named on stderr; the
/// document is printed all the same (their payload says "not described").
pub(super) fn command(settings: &Settings, registry: &Registry, out: &Out) -> CliResult {
    let (doc, gaps) = asyncapi::document(settings, registry);
    for (event_type, handlers) in &gaps.undescribed {
        eprintln!(
            "warning: the payload of {event_type} is not described: the event views of {} \
             implement no Event::payload_schema; derive schemars::JsonSchema on them and return \
             Some(burrow::asyncapi::json_schema::<Self>())",
            handlers.join(", ")
        );
    }
    out.either(&asyncapi::to_yaml(&doc), &doc)
}
