//! `burrow topology show|apply|verify`.

use clap::Subcommand;

use super::{CliError, CliResult, output::Out};
use crate::{Registry, Settings, Topology, connection};

#[derive(Debug, Subcommand)]
pub(super) enum TopologyAction {
    /// Print what the worker declares (the default).
    Show,
    /// Declare it on the broker now.
    Apply,
    /// Compare it with the broker without changing anything; exit 5 on drift.
    Verify,
}

/// What AMQP cannot show, and so `verify` compares only through the
/// management API.
const NOT_CHECKED: &str = "bindings are not visible over AMQP and management.url is unset; set it to \
     the management API (e.g. http://rabbitmq:15672) to compare them, or use `rabbitmqctl \
     list_bindings`";

pub(super) async fn command(
    settings: &Settings,
    registry: &Registry,
    action: Option<TopologyAction>,
    out: &Out,
) -> CliResult {
    let topology = Topology::for_app(settings, registry);
    let chain = crate::DelayChain::new(&settings.amqp.exchange);
    let json = || serde_json::to_value(&topology).expect("a topology is plain data");
    match action.unwrap_or(TopologyAction::Show) {
        TopologyAction::Show => out.either(&format!("{topology}{}", delay_line(&chain)), &json()),
        TopologyAction::Apply => {
            let conn = connection::open(&settings.amqp, "burrow topology").await?;
            // The delay chain too, so that publishers of delayed events can
            // run without the configure permission (docs/wire-contract.md §10).
            let result = match topology.declare(&conn).await {
                Ok(()) => chain.declare(&conn).await,
                Err(e) => Err(e),
            };
            let _ = conn.close(200, "done".into()).await;
            result?;
            out.text(&format!("{topology}{}", delay_line(&chain)))?;
            out.line(&format!("declared on {}", settings.amqp.url))?;
            out.json(
                &serde_json::json!({ "declared": json(), "broker": settings.amqp.url.to_string() }),
            )
        }
        TopologyAction::Verify => {
            let conn = connection::open(&settings.amqp, "burrow topology verify").await?;
            let result = crate::verify::verify(&topology, &conn).await;
            let _ = conn.close(200, "done".into()).await;
            let mut drifts = result?;
            let mut not_checked = Vec::new();
            match crate::management::Management::new(settings)? {
                Some(m) => drifts.extend(crate::doctor::binding_drifts(&m, &topology).await?),
                None => {
                    out.line(&format!("({NOT_CHECKED})"))?;
                    not_checked.push(NOT_CHECKED);
                }
            }
            for drift in &drifts {
                out.line(&format!("drift: {drift}"))?;
            }
            out.json(&serde_json::json!({
                "matches": drifts.is_empty(),
                "drifts": drifts,
                "not_checked": not_checked,
            }))?;
            if !drifts.is_empty() {
                return Err(CliError::Drift(drifts.len()));
            }
            out.line(&format!(
                "exchange and {} queues match the broker{}",
                topology.queues.len(),
                if not_checked.is_empty() {
                    format!(", and so do {} binding(s)", topology.bindings.len())
                } else {
                    String::new()
                }
            ))
        }
    }
}

/// The delay chain in one line: its levels' names, first and last.
fn delay_line(chain: &crate::DelayChain) -> String {
    let levels = chain.levels();
    match (levels.first(), levels.last()) {
        (Some(first), Some(last)) => format!(
            "delay chain {} … {} ({} levels: exchange and quorum queue each, for delayed events)\n",
            first.name,
            last.name,
            levels.len()
        ),
        _ => String::new(),
    }
}
