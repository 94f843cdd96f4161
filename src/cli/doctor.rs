//! `burrow doctor`: one line per check, the fix under each warning and
//! failure, a summary; exit 7 when a check fails.

use super::{CliError, CliResult, output::Out};
use crate::{
    Registry, Settings,
    doctor::{self, Status},
};

pub(super) async fn command(settings: &Settings, registry: &Registry, out: &Out) -> CliResult {
    let checks = doctor::run(settings, registry).await?;
    for c in &checks {
        out.line(&format!("{} {:<28} {}", c.status.label(), c.id, c.detail))?;
        if let Some(fix) = &c.fix {
            out.line(&format!("     {:<28} fix: {fix}", ""))?;
        }
    }
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    let (failed, warned, unchecked) = (
        count(Status::Fail),
        count(Status::Warn),
        count(Status::NotChecked),
    );
    out.line(&format!(
        "\n{} checks: {} passed, {warned} warned, {failed} failed, {unchecked} not checked",
        checks.len(),
        count(Status::Pass),
    ))?;
    out.json(&serde_json::json!({
        "app": settings.app.name,
        "ok": failed == 0,
        "checks": checks,
    }))?;
    if failed > 0 {
        return Err(CliError::DoctorFailed(failed));
    }
    Ok(())
}
