//! `burrow doctor`: can this broker, with these settings, keep burrow's
//! promises? Each check passes, warns or fails with the fix; what cannot be
//! checked (no management API configured, an endpoint the broker lacks) is
//! said plainly instead of passed.

mod shards;

use std::time::Duration;

use serde::Serialize;

use crate::{
    config::{QueueType, Settings},
    connection,
    error::Result,
    handler::Registry,
    management::{self, Management},
    topology::{QueueRole, Topology},
    verify::{self, Drift},
};

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    /// As it should be.
    Pass,
    /// Works, but something will bite (a setting to change, an upgrade to plan).
    Warn,
    /// A promise is broken until this is fixed.
    Fail,
    /// Could not be checked from here.
    NotChecked,
}

impl Status {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::NotChecked => "n/a ",
        }
    }
}

/// One check's verdict.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    pub(crate) id: &'static str,
    pub(crate) status: Status,
    pub(crate) detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fix: Option<String>,
}

fn check(
    id: &'static str,
    status: Status,
    detail: impl Into<String>,
    fix: Option<String>,
) -> Check {
    Check {
        id,
        status,
        detail: detail.into(),
        fix,
    }
}

const NO_MANAGEMENT: &str = "not checked: AMQP cannot tell; set management.url to the \
     management API (e.g. http://rabbitmq:15672, the user and password in the URL or in \
     management.password_file) to check it";

/// The broker's default `max_message_size`: 16 MiB from RabbitMQ 4.0, 128 MiB before.
fn default_max_message_size(version: (u32, u32, u32)) -> usize {
    if version >= (4, 0, 0) {
        16 * 1024 * 1024
    } else {
        128 * 1024 * 1024
    }
}

/// Runs every check for the app `settings` and `registry` describe.
pub(crate) async fn run(settings: &Settings, registry: &Registry) -> Result<Vec<Check>> {
    let topology = Topology::for_app(settings, registry);
    let mut checks = Vec::new();

    let conn = match connection::open(&settings.amqp, "burrow doctor").await {
        Ok(conn) => conn,
        Err(e) => {
            checks.push(check(
                "broker.connect",
                Status::Fail,
                e.to_string(),
                Some("nothing else can be checked until burrow connects".into()),
            ));
            return Ok(checks);
        }
    };
    let frame_max = conn.configuration().frame_max();
    checks.push(check(
        "broker.connect",
        Status::Pass,
        format!("connected to {}; frame_max {frame_max}", settings.amqp.url),
        None,
    ));
    let header_room = settings.consumer.max_header_bytes + 4096;
    checks.push(if frame_max < 8192 {
        check(
            "broker.frame_max",
            Status::Fail,
            format!("frame_max is {frame_max}; RabbitMQ 4.1 refuses clients below 8192"),
            Some("remove ?frame_max from amqp.url, or raise it to 131072".into()),
        )
    } else if (frame_max as usize) < header_room {
        check(
            "broker.frame_max",
            Status::Fail,
            format!(
                "frame_max {frame_max} cannot carry consumer.max_header_bytes = {} plus the rest of a copy's properties",
                settings.consumer.max_header_bytes
            ),
            Some(format!(
                "lower consumer.max_header_bytes below {}, or raise the broker's frame_max",
                frame_max as usize - 4096
            )),
        )
    } else {
        check(
            "broker.frame_max",
            Status::Pass,
            format!(
                "frame_max {frame_max} carries copies with up to {} bytes of headers",
                settings.consumer.max_header_bytes
            ),
            None,
        )
    });

    let drifts = verify::verify(&topology, &conn).await;
    if let Some(shards) = &topology.shards {
        checks.push(shards::shard_exchange_check(&conn, shards).await);
    }
    let _ = conn.close(200, "doctor done".into()).await;
    match drifts {
        Ok(drifts) => topology_checks(&topology, &drifts, &mut checks),
        Err(e) => checks.push(check(
            "topology.queues",
            Status::Fail,
            e.to_string(),
            Some("fix the broker permissions or connection, then run doctor again".into()),
        )),
    }

    checks.push(delivery_limit_check(settings));

    let management = Management::new(settings)?;
    let version = match &management {
        Some(m) => management_checks(m, settings, &topology, &mut checks).await,
        None => {
            for id in [
                "broker.version",
                "broker.feature_flags",
                "broker.deprecated_features",
                "topology.bindings",
            ] {
                checks.push(check(id, Status::NotChecked, NO_MANAGEMENT, None));
            }
            None
        }
    };
    checks.push(ack_timeout_check(settings, version));
    checks.push(max_body_check(settings, version));
    Ok(checks)
}

fn topology_checks(topology: &Topology, drifts: &[Drift], checks: &mut Vec<Check>) {
    if drifts.is_empty() {
        checks.push(check(
            "topology.queues",
            Status::Pass,
            format!(
                "the exchange and {} queues exist with the arguments burrow declares (retry steps \
                 dead-letter back to the app queue)",
                topology.queues.len()
            ),
            None,
        ));
    }
    for drift in drifts {
        checks.push(check(
            "topology.queues",
            Status::Fail,
            // The drift names its fix.
            drift.to_string(),
            None,
        ));
    }
    // With at-least-once dead-lettering, a message whose dead-letter target
    // is missing stays in its source queue, silently.
    let missing_targets: Vec<&str> = topology
        .queues
        .iter()
        .filter(|q| matches!(q.role, QueueRole::App | QueueRole::Dead))
        .filter(|q| {
            drifts
                .iter()
                .any(|d| matches!(d, Drift::Missing { name, .. } if name == &q.name))
        })
        .map(|q| q.name.as_str())
        .collect();
    checks.push(if missing_targets.is_empty() {
        check(
            "topology.dead_letter_targets",
            Status::Pass,
            "the dead-letter queue and the app queue (the retry steps' target) exist",
            None,
        )
    } else {
        check(
            "topology.dead_letter_targets",
            Status::Fail,
            format!(
                "missing: {}; a message dead-lettered towards a missing queue stays where it is, \
                 without an error",
                missing_targets.join(", ")
            ),
            Some("run `burrow topology apply` (or start the worker), which declares them".into()),
        )
    });
}

fn delivery_limit_check(settings: &Settings) -> Check {
    match settings.queue.kind {
        QueueType::Classic => check(
            "queue.delivery_limit",
            Status::Warn,
            "classic app queue: no delivery limit, so a message that crashes every worker comes back forever",
            Some("use queue.type = \"quorum\" (the default) for a delivery limit".into()),
        ),
        QueueType::Quorum if settings.queue.delivery_limit < 3 => check(
            "queue.delivery_limit",
            Status::Warn,
            format!(
                "queue.delivery_limit = {}: a broker restart or a worker crash or two parks a healthy message",
                settings.queue.delivery_limit
            ),
            Some("use 5 or more (20 is the default)".into()),
        ),
        QueueType::Quorum => check(
            "queue.delivery_limit",
            Status::Pass,
            format!(
                "a message redelivered {} times (crashes, lost channels) is parked in the dead-letter \
                 queue; retries are copies and do not count",
                settings.queue.delivery_limit
            ),
            None,
        ),
    }
}

fn ack_timeout_check(settings: &Settings, version: Option<(u32, u32, u32)>) -> Check {
    let timeout = settings
        .consumer
        .effective_ack_timeout(settings.publisher.confirm_timeout);
    let deadline = settings
        .consumer
        .ack_deadline(settings.publisher.confirm_timeout);
    let shown = humantime::format_duration(timeout);
    if timeout < deadline {
        return check(
            "consumer.ack_timeout",
            Status::Warn,
            format!(
                "consumer.ack_timeout = {shown} is shorter than a delivery may need ({})",
                humantime::format_duration(deadline)
            ),
            Some("raise consumer.ack_timeout or leave it unset".into()),
        );
    }
    // RabbitMQ's default consumer_timeout; the management API cannot show
    // a changed one.
    const BROKER_DEFAULT: Duration = Duration::from_secs(30 * 60);
    let needed = humantime::format_duration(deadline);
    match version {
        Some(v) if v < (4, 3, 0) && deadline > BROKER_DEFAULT => check(
            "consumer.ack_timeout",
            Status::Warn,
            format!(
                "before RabbitMQ 4.3 the broker's consumer_timeout (30m unless changed) applies to \
                 quorum queues, not x-consumer-timeout, and a delivery may need {needed}"
            ),
            Some(format!(
                "set consumer_timeout above {needed} in rabbitmq.conf, or lower consumer.handler_timeout or prefetch"
            )),
        ),
        Some(v) if v < (4, 3, 0) => check(
            "consumer.ack_timeout",
            Status::Pass,
            format!(
                "before RabbitMQ 4.3 the broker's consumer_timeout (30m unless changed) applies to \
                 quorum queues; a delivery needs at most {needed}, so keep consumer_timeout above \
                 that (x-consumer-timeout = {shown} takes over from 4.3)"
            ),
            None,
        ),
        Some(_) => check(
            "consumer.ack_timeout",
            Status::Pass,
            format!(
                "the consumer asks x-consumer-timeout = {shown}: above any wait of a delivery \
                 ({needed}), so only a stuck one is taken back"
            ),
            None,
        ),
        None => check(
            "consumer.ack_timeout",
            Status::NotChecked,
            format!(
                "a delivery needs at most {needed}; the consumer asks x-consumer-timeout = {shown} \
                 (applied from RabbitMQ 4.3, before that the broker's consumer_timeout applies); the \
                 broker's version is {NO_MANAGEMENT}"
            ),
            None,
        ),
    }
}

fn max_body_check(settings: &Settings, version: Option<(u32, u32, u32)>) -> Check {
    let max_body = settings.consumer.max_body_bytes;
    match version {
        Some(v) if max_body > default_max_message_size(v) => check(
            "consumer.max_body_bytes",
            Status::Warn,
            format!(
                "consumer.max_body_bytes = {max_body} exceeds this broker version's default max_message_size ({}); \
                 larger bodies are refused when published",
                default_max_message_size(v)
            ),
            Some(
                "lower consumer.max_body_bytes, or raise max_message_size in rabbitmq.conf if publishers need it"
                    .into(),
            ),
        ),
        Some(v) => check(
            "consumer.max_body_bytes",
            Status::Pass,
            format!(
                "consumer.max_body_bytes = {max_body} is within the default max_message_size ({}); a \
                 changed max_message_size is not visible through the management API",
                default_max_message_size(v)
            ),
            None,
        ),
        None => check("consumer.max_body_bytes", Status::NotChecked, NO_MANAGEMENT, None),
    }
}

/// The checks that need the management API; returns the broker's version.
async fn management_checks(
    m: &Management,
    settings: &Settings,
    topology: &Topology,
    checks: &mut Vec<Check>,
) -> Option<(u32, u32, u32)> {
    let overview = match m.overview().await {
        Ok(o) => o,
        Err(e) => {
            checks.push(check(
                "broker.version",
                Status::Fail,
                e.to_string(),
                Some(format!("fix management.url ({})", m.shown())),
            ));
            return None;
        }
    };
    let version = management::version(&overview.rabbitmq_version);
    checks.push(if version < (3, 10, 0) {
        check(
            "broker.version",
            Status::Fail,
            format!(
                "RabbitMQ {}: quorum queues with at-least-once dead-lettering need 3.10 or later",
                overview.rabbitmq_version
            ),
            Some("upgrade RabbitMQ (4.x is tested)".into()),
        )
    } else {
        check(
            "broker.version",
            Status::Pass,
            format!(
                "RabbitMQ {}{}",
                overview.rabbitmq_version,
                overview
                    .cluster_name
                    .map(|c| format!(" (cluster {c})"))
                    .unwrap_or_default()
            ),
            None,
        )
    });

    checks.push(match m.feature_flags().await {
        Ok(Some(flags)) => {
            let disabled: Vec<String> = flags
                .iter()
                .filter(|f| f.state != "enabled")
                .filter(|f| {
                    f.stability
                        .as_deref()
                        .is_none_or(|s| s == "stable" || s == "required")
                })
                .map(|f| f.name.clone())
                .collect();
            if disabled.is_empty() {
                check(
                    "broker.feature_flags",
                    Status::Pass,
                    "every stable feature flag is enabled",
                    None,
                )
            } else {
                check(
                    "broker.feature_flags",
                    Status::Warn,
                    format!(
                        "disabled: {} (at-least-once dead-lettering needs the 3.10 flags; the next \
                         upgrade needs them all)",
                        disabled.join(", ")
                    ),
                    Some("rabbitmqctl enable_feature_flag all".into()),
                )
            }
        }
        Ok(None) => check(
            "broker.feature_flags",
            Status::NotChecked,
            "this broker's management API has no /api/feature-flags",
            None,
        ),
        Err(e) => check("broker.feature_flags", Status::Fail, e.to_string(), None),
    });

    checks.push(match m.deprecated_features_used().await {
        Ok(Some(used)) if used.is_empty() => check(
            "broker.deprecated_features",
            Status::Pass,
            "nothing on this broker uses a deprecated feature (burrow declares no transient \
             non-exclusive queue and no global QoS, which RabbitMQ 4.3 refuses)",
            None,
        ),
        Ok(Some(used)) => check(
            "broker.deprecated_features",
            Status::Warn,
            format!(
                "in use on this broker (not by burrow): {}; a later RabbitMQ refuses them",
                used.join(", ")
            ),
            Some("find the clients that use them before upgrading".into()),
        ),
        Ok(None) => check(
            "broker.deprecated_features",
            Status::NotChecked,
            "this broker has no deprecated-features API (before 3.13); burrow itself uses none",
            None,
        ),
        Err(e) => check(
            "broker.deprecated_features",
            Status::Fail,
            e.to_string(),
            None,
        ),
    });

    match binding_drifts(m, topology).await {
        Ok(drifts) if drifts.is_empty() => checks.push(check(
            "topology.bindings",
            Status::Pass,
            format!(
                "{} binding(s) of the app queue, as declared",
                topology.bindings.len()
            ),
            None,
        )),
        Ok(drifts) => {
            for drift in drifts {
                checks.push(check(
                    "topology.bindings",
                    Status::Fail,
                    // The drift names its fix.
                    drift.to_string(),
                    None,
                ));
            }
        }
        Err(e) => checks.push(check(
            "topology.bindings",
            Status::Fail,
            e.to_string(),
            None,
        )),
    }

    // A live worker's consumer: does it carry the ack deadline?
    if let Ok(consumers) = m.consumers().await {
        let queue = settings.app_queue();
        for c in consumers.iter().filter(|c| c.queue.name == queue) {
            if !c.arguments.contains_key("x-consumer-timeout") {
                checks.push(check(
                    "consumer.ack_timeout",
                    Status::Warn,
                    format!(
                        "consumer {} of {queue} has no x-consumer-timeout (an older burrow, or another client)",
                        c.consumer_tag
                    ),
                    Some("upgrade the workers of this app".into()),
                ));
            }
        }
    }
    Some(version)
}

/// Bindings of the app queue that differ from the declared ones: missing
/// ones (the app silently misses those events) and extra ones from the
/// app's exchange (it receives events no handler takes).
pub(crate) async fn binding_drifts(m: &Management, topology: &Topology) -> Result<Vec<Drift>> {
    let app = topology.app_queue();
    let Some(bound) = m.queue_bindings(&app.name).await? else {
        // The queue is missing: the queue check reports it.
        return Ok(Vec::new());
    };
    let mut drifts = Vec::new();
    for binding in &topology.bindings {
        let present = bound
            .iter()
            .any(|b| b.source == binding.exchange && b.routing_key == binding.key);
        if !present {
            drifts.push(Drift::Missing {
                kind: "binding",
                name: format!(
                    "{} -> {} ({})",
                    binding.exchange, binding.queue, binding.key
                ),
            });
        }
    }
    for b in bound.iter().filter(|b| b.source == topology.exchange) {
        if !topology.bindings.iter().any(|d| d.key == b.routing_key) {
            drifts.push(Drift::Unexpected {
                kind: "binding",
                name: format!("{} -> {} ({})", b.source, app.name, b.routing_key),
            });
        }
    }
    Ok(drifts)
}
