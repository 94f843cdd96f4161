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

/// What AMQP cannot show, and so `verify` does not compare.
const NOT_CHECKED: &str =
    "bindings are not visible over AMQP; compare them with `rabbitmqctl list_bindings`";

pub(super) async fn command(
    settings: &Settings,
    registry: &Registry,
    action: Option<TopologyAction>,
    out: &Out,
) -> CliResult {
    let topology = Topology::for_app(settings, registry);
    let json = || serde_json::to_value(&topology).expect("a topology is plain data");
    match action.unwrap_or(TopologyAction::Show) {
        TopologyAction::Show => out.either(&topology.to_string(), &json()),
        TopologyAction::Apply => {
            let conn = connection::open(&settings.amqp, "burrow topology").await?;
            let result = topology.declare(&conn).await;
            let _ = conn.close(200, "done".into()).await;
            result?;
            out.text(&topology.to_string())?;
            out.line(&format!("declared on {}", settings.amqp.url))?;
            out.json(
                &serde_json::json!({ "declared": json(), "broker": settings.amqp.url.to_string() }),
            )
        }
        TopologyAction::Verify => {
            let conn = connection::open(&settings.amqp, "burrow topology verify").await?;
            let result = crate::verify::verify(&topology, &conn).await;
            let _ = conn.close(200, "done".into()).await;
            let drifts = result?;
            out.line(&format!("({NOT_CHECKED})"))?;
            for drift in &drifts {
                out.line(&format!("drift: {drift}"))?;
            }
            out.json(&serde_json::json!({
                "matches": drifts.is_empty(),
                "drifts": drifts,
                "not_checked": [NOT_CHECKED],
            }))?;
            if !drifts.is_empty() {
                return Err(CliError::Drift(drifts.len()));
            }
            out.line(&format!(
                "exchange and {} queues match the broker",
                topology.queues.len()
            ))
        }
    }
}
