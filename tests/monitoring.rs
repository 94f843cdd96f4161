//! The monitoring files in `deploy/` against a running `burrow run`: every
//! metric the Grafana dashboard and the alert rules query is on the worker's
//! first scrape, and `burrow_queue_messages` reports the app's own queues
//! (read once before the worker is ready, then periodically).
//!
//! `scripts/check-monitoring.sh` checks the files' syntax with promtool;
//! this checks that they speak of series burrow exports.

mod common;

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use burrow::{Registry, Settings, Topology};
use common::{
    bin::{self, Burrow, has_series, http_get, metric, sigterm},
    node::free_port,
    *,
};
use lapin::{BasicProperties, options::QueueDeleteOptions};

const DASHBOARD: &str = include_str!("../deploy/grafana/burrow.json");
const ALERTS: &str = include_str!("../deploy/prometheus/alerts.yml");

/// The worker reads its queues' depths this often (`metrics::queues`).
const REFRESH_INTERVAL: Duration = Duration::from_secs(15);

/// Every query of the dashboard: panel targets at any depth.
fn dashboard_queries() -> Vec<String> {
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(expr)) = map.get("expr") {
                    out.push(expr.clone());
                }
                map.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(DASHBOARD).expect("deploy/grafana/burrow.json is JSON");
    let mut queries = Vec::new();
    walk(&dashboard, &mut queries);
    queries
}

/// Every `expr:` of a rule file, one-line or a `|` / `>` block (the lines
/// indented deeper than the key).
fn rule_expressions(yaml: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if !rest.starts_with(['|', '>']) {
            exprs.push(rest.to_owned());
            continue;
        }
        let indent = line.len() - trimmed.len();
        let mut block = String::new();
        while let Some(next) =
            lines.next_if(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        {
            block.push_str(next.trim());
            block.push('\n');
        }
        exprs.push(block);
    }
    exprs
}

/// The `burrow_*` metric names `text` mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("burrow_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..len].trim_end_matches('_').to_owned());
        }
        rest = &tail[len..];
    }
    names
}

/// The names a query may use for what `exposition` exports: each sample's
/// name (`burrow_deliveries_total`, `burrow_handler_duration_seconds_bucket`,
/// `burrow_in_flight`) and each family's (`# TYPE burrow_deliveries counter`).
/// Taken from the text rather than by stripping suffixes, so a query for a
/// suffix the family does not have (`burrow_in_flight_total`) fails.
fn exported_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(family) => family.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        })
        .filter(|name| name.starts_with("burrow_"))
        .map(str::to_owned)
        .collect()
}

/// The names the dashboard's queries and the alert rules' expressions use.
fn queried_names() -> BTreeSet<String> {
    dashboard_queries()
        .iter()
        .chain(&rule_expressions(ALERTS))
        .flat_map(|q| metric_names(q))
        .collect()
}

#[test]
fn the_dashboard_and_the_rules_are_read_whole() {
    let alerts = ALERTS.matches("- alert:").count();
    let exprs = rule_expressions(ALERTS);
    assert_eq!(exprs.len(), alerts, "one expression per alert: {exprs:#?}");
    assert!(
        exprs.iter().all(|e| e.contains("burrow_")),
        "an expression without a burrow metric: {exprs:#?}"
    );
    let no_progress = exprs
        .iter()
        .find(|e| e.contains("burrow_ack_frames_total"))
        .expect("the no-progress rule");
    assert!(
        no_progress.contains("burrow_queue_messages"),
        "a block expression is read to its end: {no_progress}"
    );
    assert!(
        dashboard_queries().len() >= 10,
        "{:#?}",
        dashboard_queries()
    );
    assert_eq!(
        metric_names(r#"rate(burrow_a_total{x="burrow_b"}[5m]) / my_burrow_c"#),
        ["burrow_a_total", "burrow_b"].map(String::from).into()
    );
}

/// `burrow run` for an app of its own, with `/metrics` on a free port.
struct Worker {
    settings: Settings,
    burrow: Burrow,
    http: SocketAddr,
    log: std::path::PathBuf,
}

impl Worker {
    fn new(prefix: &str) -> Self {
        let mut settings = TestApp::new(prefix).delays_ms(&[300, 600]).build();
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        settings.http.addr = Some(http);
        let burrow =
            Burrow::new(&settings, &amqp_url()).with("BURROW__LOG__FILTER", "info,lapin=error");
        let log = std::env::temp_dir().join(format!("{}.log", unique("burrow-monitoring")));
        Self {
            settings,
            burrow,
            http,
            log,
        }
    }

    /// The app queue, each retry step and the dead-letter queue.
    fn queues(&self) -> Vec<String> {
        Topology::for_app(&self.settings, &Registry::new())
            .queues
            .into_iter()
            .map(|q| q.name)
            .collect()
    }

    /// Starts `burrow run` and waits until it is ready.
    async fn start(&self) -> tokio::process::Child {
        let child = self.burrow.spawn(&["run"], &self.log);
        bin::wait_status("/readyz", 200, || http_get(self.http, "/readyz")).await;
        child
    }

    async fn scrape(&self) -> String {
        let (code, text) = http_get(self.http, "/metrics").await;
        assert_eq!(code, 200, "{text}");
        text
    }

    /// Waits until the worker reports `messages` ready in `queue`: at most
    /// one periodic read away.
    async fn wait_depth(&self, queue: &str, messages: u32) {
        eventually_within(
            &format!("burrow_queue_messages of {queue} to read {messages}"),
            REFRESH_INTERVAL + WAIT,
            || async {
                let text = self.scrape().await;
                match metric(&text, "burrow_queue_messages", &[("queue", queue)]) {
                    got if got == f64::from(messages) => Ok(()),
                    got => Err(got.to_string()),
                }
            },
        )
        .await;
    }

    async fn stop(&self, mut child: tokio::process::Child) {
        sigterm(&child);
        let status = within("burrow run to exit", child.wait())
            .await
            .expect("waiting for burrow run");
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(status.success(), "burrow run exited with {status}:\n{log}");
        let _ = std::fs::remove_file(&self.log);
    }
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_query_is_on_the_first_scrape() {
    let worker = Worker::new("monitoring-names");
    let mut cleanup = Cleanup::new();
    cleanup.app(&worker.settings);
    let child = worker.start().await;
    let text = worker.scrape().await;
    let exported = exported_names(&text);
    let missing: Vec<String> = queried_names()
        .into_iter()
        .filter(|name| !exported.contains(name))
        // The outbox families exist only in builds with the postgres
        // feature (in those, from the start, whether or not the relay runs).
        .filter(|name| cfg!(feature = "postgres") || !name.starts_with("burrow_outbox_"))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard or the alert rules query metrics a worker does not export: {missing:?}\n{text}"
    );
    for queue in worker.queues() {
        for family in ["burrow_queue_messages", "burrow_queue_consumers"] {
            assert!(
                has_series(&text, family, &[("queue", &queue)]),
                "no {family} for {queue} on the first scrape:\n{text}"
            );
        }
    }
    worker.stop(child).await;
}

#[tokio::test]
async fn queue_depths_are_read_before_readiness_and_then_periodically() {
    let worker = Worker::new("monitoring-depths");
    let mut cleanup = Cleanup::new();
    cleanup.app(&worker.settings);
    let dead = worker.settings.dead_letter_queue();
    let app_queue = worker.settings.app_queue();
    // Letters waiting before the worker starts: its first read, made
    // before it answers ready, must show them.
    let (code, out) = worker.burrow.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(0), "{out}");
    let raw = Raw::connect().await;
    for i in 0..3 {
        raw.publish("", &dead, format!("letter {i}").as_bytes(), props())
            .await;
    }
    let child = worker.start().await;
    let text = worker.scrape().await;
    assert_eq!(
        metric(&text, "burrow_queue_messages", &[("queue", &dead)]),
        3.0,
        "{text}"
    );
    // The worker consumes the app queue: the read came after its basic.consume.
    assert_eq!(
        metric(&text, "burrow_queue_consumers", &[("queue", &app_queue)]),
        1.0,
        "{text}"
    );
    // Two more arrive while it runs: the next periodic read shows them.
    for i in 3..5 {
        raw.publish("", &dead, format!("letter {i}").as_bytes(), props())
            .await;
    }
    worker.wait_depth(&dead, 5).await;
    worker.stop(child).await;
    raw.close().await;
}

#[tokio::test]
async fn a_queue_deleted_under_the_worker_is_skipped_and_the_queues_after_it_still_read() {
    let worker = Worker::new("monitoring-deleted");
    let mut cleanup = Cleanup::new();
    cleanup.app(&worker.settings);
    let queues = worker.queues();
    let (step, dead) = (&queues[1], worker.settings.dead_letter_queue());
    assert!(step.contains(".retry.1."), "{queues:?}");
    let child = worker.start().await;
    // The read goes app queue, retry steps, dead letters: a refusal in the
    // middle closes the channel the dead-letter queue would be read on.
    let raw = Raw::connect().await;
    raw.channel
        .queue_delete(step.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("queue.delete");
    for i in 0..2 {
        raw.publish("", &dead, format!("letter {i}").as_bytes(), props())
            .await;
    }
    // Read past the deleted step.
    worker.wait_depth(&dead, 2).await;
    let log = std::fs::read_to_string(&worker.log).expect("the worker's log");
    let warnings = log
        .lines()
        .filter(|l| l.contains("refused a passive queue.declare") && l.contains(step.as_str()))
        .count();
    assert_eq!(warnings, 1, "one warning for the deleted step:\n{log}");
    // Consuming was never disturbed.
    let (code, body) = http_get(worker.http, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let text = worker.scrape().await;
    assert_eq!(metric(&text, "burrow_connected", &[]), 1.0, "{text}");
    worker.stop(child).await;
    raw.close().await;
}

fn props() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}
