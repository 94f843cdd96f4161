//! `burrow demo`: a newcomer's first run.
//!
//! Starts a worker for a throw-away app (`<app.name>-demo-<id>`) with the
//! app's handler modules plus one demo handler that fails once, publishes the
//! modules' sample events, one event for the flaky handler, one body that is
//! not JSON and one event delayed by two seconds (through the delay queues),
//! waits until every message has settled for good, prints what happened and
//! deletes the demo's queues, delay queues and exchange.
//!
//! Everything happens on an exchange of the demo's own
//! (`burrow-demo-<id>`), never on the configured one: run against a
//! production broker, the samples (and the broken body) reach no real app.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use lapin::{BasicProperties, types::ShortString};
use serde::{Deserialize, Serialize};

use super::{CliResult, output::Out};
use crate::{
    Context, DelayChain, DomainEvent, Event, EventMeta, HandlerError, Outcome, Publisher, Registry,
    Settings, Topology, Worker, connection,
    error::{Error, Result},
};

/// The event only the demo publishes; its handler fails on the first attempt.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DemoFlakyEvent {
    aggregate_id: String,
}

impl Event for DemoFlakyEvent {
    const EVENT_TYPE: &'static str = "BurrowDemoFlakyEvent";
}

impl DomainEvent for DemoFlakyEvent {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// The event the demo publishes for later ("send the reminder in 2 s").
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DemoReminderEvent {
    aggregate_id: String,
}

impl Event for DemoReminderEvent {
    const EVENT_TYPE: &'static str = "BurrowDemoReminderEvent";
}

impl DomainEvent for DemoReminderEvent {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// How long the demo's delayed event waits.
const REMINDER_DELAY: Duration = Duration::from_secs(2);

/// What the demo saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct DemoSummary {
    /// Messages whose handlers all succeeded in the end.
    pub handled: usize,
    /// Retry moves made.
    pub retried: usize,
    /// Messages dead-lettered.
    pub dead_lettered: usize,
}

/// Runs the demo with the app's handlers (`registry`) and sample events.
pub(super) async fn run(
    mut settings: Settings,
    mut registry: Registry,
    samples: Vec<(&'static str, serde_json::Value)>,
    out: &Out,
) -> CliResult {
    let id = uuid::Uuid::new_v4().simple().to_string();
    settings.app.name = format!("{}-demo-{}", settings.app.name, &id[..6]);
    settings.amqp.exchange = format!("burrow-demo-{}", &id[..6]);
    settings.queue.name = None;
    settings.retry.delays = vec![Duration::from_secs(1)];
    settings.http.addr = None;

    registry.on(
        "demo.flaky_once",
        |event: DemoFlakyEvent, ctx: Context| async move {
            if ctx.attempt == 1 {
                return Err(HandlerError::transient(format!(
                    "pretend the search service timed out indexing {}",
                    event.aggregate_id
                )));
            }
            Ok(())
        },
    )?;
    registry.on(
        "demo.send_reminder",
        |_event: DemoReminderEvent, _ctx: Context| async move { Ok::<(), HandlerError>(()) },
    )?;

    let topology = Topology::for_app(&settings, &registry);
    out.line(&format!(
        "burrow demo: app {:?} on exchange {:?}, both its own and deleted afterwards (no other app sees these events)",
        settings.app.name, settings.amqp.exchange
    ))?;
    out.line(&format!(
        "  queues: {} (retry after 1s: {}, dead letters: {})",
        settings.app_queue(),
        topology.queues[1].name,
        settings.dead_letter_queue()
    ))?;

    let mut worker = Worker::new(settings.clone(), registry)?.spawn();
    let mut outcomes = worker.outcomes();
    match tokio::time::timeout(Duration::from_secs(30), worker.consuming()).await {
        Ok(Ok(())) => {}
        // It stopped: its own error says why (a refused login, a mismatch).
        Ok(Err(_)) => {
            return Err(worker
                .join()
                .await
                .err()
                .unwrap_or_else(|| Error::ConsumerStopped {
                    queue: settings.app_queue(),
                    reason: "the worker stopped before it started consuming".into(),
                })
                .into());
        }
        Err(_) => {
            let _ = worker.shutdown().await;
            return Err(Error::ConsumerStopped {
                queue: settings.app_queue(),
                reason: "the worker did not start consuming within 30 s".into(),
            }
            .into());
        }
    }
    let result = async {
        let publisher = Publisher::connect(&settings).await?;
        let mut labels = HashMap::new();
        for (i, (event_type, body)) in samples.iter().enumerate() {
            let message_id = format!("demo-{}-{i}", &id[..6]);
            publisher
                .publish_json(
                    event_type,
                    body,
                    EventMeta::default().message_id(&message_id),
                )
                .await?;
            labels.insert(
                message_id,
                format!(
                    "{event_type} {}",
                    body["aggregateId"].as_str().unwrap_or("")
                ),
            );
        }
        let flaky_id = format!("demo-{}-flaky", &id[..6]);
        publisher
            .publish_with(
                &DemoFlakyEvent {
                    aggregate_id: "search-index".into(),
                },
                EventMeta::default().message_id(&flaky_id),
            )
            .await?;
        labels.insert(
            flaky_id,
            format!("{} (its handler fails once)", DemoFlakyEvent::EVENT_TYPE),
        );
        if let Some((event_type, _)) = samples.first() {
            let broken_id = format!("demo-{}-broken", &id[..6]);
            let props = BasicProperties::default()
                .with_message_id(ShortString::from(broken_id.as_str()))
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            publisher
                .send(
                    &settings.amqp.exchange,
                    event_type,
                    br#"{"aggregateId": "card-3", "userId": "#,
                    props,
                )
                .await?;
            labels.insert(
                broken_id,
                format!("{event_type} with a truncated JSON body"),
            );
        }
        let reminder_id = format!("demo-{}-reminder", &id[..6]);
        let delayed_at = Instant::now();
        let scheduled = publisher
            .publish_after_with(
                &DemoReminderEvent {
                    aggregate_id: "card-1".into(),
                },
                REMINDER_DELAY,
                EventMeta::default().message_id(&reminder_id),
            )
            .await?;
        labels.insert(
            reminder_id.clone(),
            format!(
                "{} (published for {} UTC, 2 s later)",
                DemoReminderEvent::EVENT_TYPE,
                scheduled.due_at.format("%H:%M:%S%.3f")
            ),
        );
        out.line(&format!(
            "published {} messages, waiting for each to settle...",
            labels.len()
        ))?;

        let mut summary = DemoSummary::default();
        let mut pending = labels.clone();
        while !pending.is_empty() {
            let outcome =
                tokio::time::timeout(Duration::from_secs(30), next_outcome(&mut outcomes))
                    .await
                    .map_err(|_| Error::ConsumerStopped {
                        queue: settings.app_queue(),
                        reason: format!("{} messages did not settle within 30 s", pending.len()),
                    })??;
            let Some(label) = pending.get(&outcome.message_id).cloned() else {
                continue;
            };
            out.line(&outcome_line(&label, &outcome))?;
            if outcome.message_id == reminder_id {
                out.line(&format!(
                    "           it waited {:.1} s in the delay queues; nothing delivers it early",
                    delayed_at.elapsed().as_secs_f64()
                ))?;
            }
            if outcome.retried.is_some() {
                summary.retried += 1;
            }
            if outcome.dead_lettered.is_some() {
                summary.dead_lettered += 1;
            } else if outcome.retried.is_none() {
                summary.handled += 1;
            }
            if outcome.retried.is_none() {
                pending.remove(&outcome.message_id);
            }
        }
        publisher.close().await;
        Ok::<_, super::CliError>(summary)
    }
    .await;

    let stopped = worker.shutdown().await;
    let cleanup = async {
        let conn = connection::open(&settings.amqp, "burrow demo cleanup").await?;
        let deleted = async {
            topology.delete_queues(&conn).await?;
            DelayChain::new(&settings.amqp.exchange)
                .delete(&conn)
                .await?;
            topology.delete_exchange(&conn).await
        }
        .await;
        let _ = conn.close(200, "demo done".into()).await;
        deleted
    }
    .await;
    let summary = result?;
    stopped?;
    cleanup?;
    out.line(&format!(
        "summary: handled {}, retried {}, dead-lettered {}",
        summary.handled, summary.retried, summary.dead_lettered
    ))?;
    out.line(
        "(demo queues, delay queues and exchange deleted; run `burrow run` to start a real worker)",
    )?;
    out.json(&serde_json::json!({
        "app": settings.app.name,
        "exchange": settings.amqp.exchange,
        "handled": summary.handled,
        "retried": summary.retried,
        "dead_lettered": summary.dead_lettered,
    }))
}

async fn next_outcome(rx: &mut tokio::sync::broadcast::Receiver<Outcome>) -> Result<Outcome> {
    loop {
        match rx.recv().await {
            Ok(o) => return Ok(o),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                return Err(Error::ConsumerStopped {
                    queue: String::new(),
                    reason: "the worker stopped".into(),
                });
            }
        }
    }
}

fn outcome_line(label: &str, o: &Outcome) -> String {
    if let Some(crate::Retried { step, handlers }) = &o.retried {
        format!(
            "  retry    {label}: attempt {} failed in {}; retry step {step}",
            o.attempt,
            handlers.join(", ")
        )
    } else if let Some(crate::DeadLettered { reason, handlers }) = &o.dead_lettered {
        let who = if handlers.is_empty() {
            String::new()
        } else {
            format!(" ({})", handlers.join(", "))
        };
        format!("  dead     {label}: {reason}{who}")
    } else {
        format!(
            "  handled  {label} on attempt {} by {}",
            o.attempt,
            o.succeeded.join(", ")
        )
    }
}
