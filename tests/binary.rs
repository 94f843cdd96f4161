//! The `burrow` binary with the app's handler modules (`handlers/`), run as
//! operators run it: configured through `BURROW__*` variables with an app
//! name and exchange of its own, stopped with SIGTERM, probed over HTTP.
//!
//! Which message a run handled is read from its JSON log: the consumer's
//! debug line "handled" carries the delivery span's `message_id`.

mod common;

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use burrow::{EventMeta, Publisher, Settings};
use common::{
    bin::{self, Burrow, has_series, http_get, metric, sigterm},
    deep,
    node::free_port,
    proxy::Proxy,
    *,
};
use tokio::process::Child;

/// One app run by the binary.
struct BinApp {
    /// The same app as the binary sees it (queue names, cleanup, publishing).
    settings: Settings,
    burrow: Burrow,
    http: SocketAddr,
    logs: PathBuf,
}

impl BinApp {
    /// An app on the shared broker, or on `url` (e.g. through a proxy).
    fn new(prefix: &str, url: Option<String>) -> Self {
        let mut settings = TestApp::new(prefix).delays_ms(&[300]).build();
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        settings.http.addr = Some(http);
        let burrow = Burrow::new(&settings, &url.unwrap_or_else(amqp_url))
            .with("BURROW__RETRY__DELAYS", "300ms")
            .with("BURROW__LOG__FORMAT", "json")
            .with(
                "BURROW__LOG__FILTER",
                "info,burrow::consumer=debug,lapin=error",
            );
        let logs = std::env::temp_dir().join(unique("burrow-binary"));
        std::fs::create_dir_all(&logs).expect("log directory");
        Self {
            settings,
            burrow,
            http,
            logs,
        }
    }

    fn with(mut self, key: &str, value: &str) -> Self {
        self.burrow.set(key, value);
        self
    }

    /// Runs `burrow <args>` to the end: (exit code, stdout + stderr).
    async fn run(&self, args: &[&str]) -> (Option<i32>, String) {
        self.burrow.run(args).await
    }

    /// Spawns `burrow <args>` logging to a file. Killed when dropped.
    fn spawn(&self, args: &[&str], log: &str) -> (Child, PathBuf) {
        let path = self.logs.join(log);
        (self.burrow.spawn(args, &path), path)
    }

    async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path).await
    }

    /// Waits until `GET path` answers `code`; returns the body.
    async fn wait_status(&self, path: &str, code: u16) -> String {
        bin::wait_status(path, code, || self.get(path)).await
    }

    async fn wait_ready(&self) {
        self.wait_status("/readyz", 200).await;
    }
}

impl Drop for BinApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

async fn exit_code(child: &mut Child, what: &str) -> Option<i32> {
    within(what, child.wait())
        .await
        .expect("waiting for burrow")
        .code()
}

/// The message ids a run's JSON log says were handled (settled by acking),
/// in order.
fn handled_ids(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["fields"]["message"] == "handled")
        .map(|entry| {
            entry["spans"]
                .as_array()
                .and_then(|spans| {
                    spans
                        .iter()
                        .find_map(|s| s.get("message_id").and_then(|id| id.as_str()))
                })
                .unwrap_or_else(|| panic!("a handled line without a message id: {entry}"))
                .to_owned()
        })
        .collect()
}

/// `settled` of the run's "worker stopped" line.
fn settled(log: &str) -> u64 {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|entry| entry["fields"]["message"] == "worker stopped")
        .and_then(|entry| entry["fields"]["settled"].as_u64())
        .unwrap_or_else(|| panic!("no 'worker stopped' line in:\n{log}"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read the log")
}

/// A card the feeds and notifications modules both handle; an empty
/// `user_id` makes feeds fail for good.
fn card(i: usize, user_id: &str) -> serde_json::Value {
    serde_json::json!({
        "aggregateId": format!("card-{i}"),
        "userId": user_id,
        "libraryId": "library-1",
    })
}

async fn publish_cards(publisher: &Publisher, ids: &[String]) {
    let bodies: Vec<serde_json::Value> = (0..ids.len()).map(|i| card(i, "user-ada")).collect();
    let publishes = ids.iter().zip(&bodies).map(|(id, body)| {
        publisher.publish_json(
            "CardAddedToLibraryEvent",
            body,
            EventMeta {
                message_id: Some(id.clone()),
                ..EventMeta::default()
            },
        )
    });
    for result in within(
        "the cards to be confirmed",
        futures_util::future::join_all(publishes),
    )
    .await
    {
        result.expect("a confirmed publish");
    }
}

// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_acks_each_handled_message_once_and_drain_finishes_the_rest() {
    const N: usize = 3000;
    let app = BinApp::new("sigterm", None);
    let mut cleanup = Cleanup::new();
    cleanup.app(&app.settings);
    let (code, out) = app.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(0), "topology apply: {out}");

    let ids: Vec<String> = (0..N).map(|i| format!("m-{i}")).collect();
    let publisher = publisher(&app.settings).await;
    publish_cards(&publisher, &ids).await;
    publisher.close().await;

    let (mut worker, log) = app.spawn(&["run"], "run.log");
    app.wait_ready().await;
    // Under load: stop it while deliveries stream in.
    eventually("deliveries to flow", || async {
        let (_, text) = app.get("/metrics").await;
        match metric(&text, "burrow_deliveries_total", &[]) {
            delivered if delivered >= 200.0 => Ok(()),
            delivered => Err(format!("{delivered} deliveries")),
        }
    })
    .await;
    sigterm(&worker);
    assert_eq!(
        exit_code(&mut worker, "burrow run to stop on SIGTERM").await,
        Some(0),
        "a graceful stop exits 0:\n{}",
        read(&log)
    );
    let first_log = read(&log);
    let first = handled_ids(&first_log);
    let first_set: HashSet<&String> = first.iter().collect();
    assert_eq!(
        first_set.len(),
        first.len(),
        "a message handled twice in one run"
    );
    assert_eq!(
        settled(&first_log),
        first.len() as u64,
        "every settled delivery was a handled one"
    );
    assert!(
        !first.is_empty() && first.len() < N,
        "SIGTERM landed mid-load: handled {} of {N}",
        first.len()
    );

    // Everything handled was acked: exactly the rest is back in the queue.
    let raw = Raw::connect().await;
    let queue = app.settings.app_queue();
    assert_eq!(
        raw.resting_count(&queue).await as usize,
        N - first.len(),
        "ready messages after the stop"
    );

    // `burrow drain` consumes the rest and exits 0 once the queue is empty.
    let (code, drain_log) = app.run(&["drain", "--idle", "1s"]).await;
    assert_eq!(code, Some(0), "drain:\n{drain_log}");
    let second = handled_ids(&drain_log);
    let second_set: HashSet<&String> = second.iter().collect();
    assert_eq!(
        second_set.len(),
        second.len(),
        "a message handled twice in the drain"
    );
    let again: Vec<&&String> = first_set.intersection(&second_set).collect();
    assert!(
        again.is_empty(),
        "{} messages the first run handled (and acked) were delivered again: {again:?}",
        again.len()
    );
    assert_eq!(
        first.len() + second.len(),
        N,
        "every message handled exactly once"
    );
    assert_eq!(raw.resting_count(&queue).await, 0);
    assert_eq!(
        raw.message_count(&app.settings.dead_letter_queue()).await,
        0
    );
    eprintln!(
        "SIGTERM after {} of {N}; drain handled the other {}",
        first.len(),
        second.len()
    );
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_known_series_is_exported_at_zero_before_the_first_delivery() {
    let app = BinApp::new("first-scrape", None);
    let mut cleanup = Cleanup::new();
    cleanup.app(&app.settings);
    let (mut worker, log) = app.spawn(&["run"], "run.log");
    app.wait_ready().await;
    let (_, text) = app.get("/metrics").await;
    let queue = app.settings.app_queue();
    let queue = ("queue", queue.as_str());
    let handlers = [
        ("feeds.add_card_to_feed", "CardAddedToLibraryEvent"),
        (
            "notifications.notify_library_followers",
            "CardAddedToLibraryEvent",
        ),
        ("collections.index_collection", "CollectionCreatedEvent"),
    ];
    let mut missing = Vec::new();
    let mut want = |name: &str, labels: &[(&str, &str)]| {
        if !has_series(&text, name, labels) {
            missing.push(format!("{name}{labels:?}"));
        }
    };
    for event in ["CardAddedToLibraryEvent", "CollectionCreatedEvent", "other"] {
        want("burrow_deliveries_total", &[queue, ("event", event)]);
        for outcome in ["confirmed", "returned", "nacked", "failed"] {
            want(
                "burrow_publishes_total",
                &[("event", event), ("outcome", outcome)],
            );
        }
    }
    want("burrow_ignored_total", &[queue]);
    for (handler, event) in handlers {
        for outcome in ["ok", "retry", "dead"] {
            want(
                "burrow_handler_runs_total",
                &[("handler", handler), ("event", event), ("outcome", outcome)],
            );
        }
        want(
            "burrow_handler_duration_seconds_count",
            &[("handler", handler), ("event", event)],
        );
    }
    // BinApp's ladder has one step.
    want("burrow_retries_total", &[queue, ("step", "1")]);
    for reason in [
        "attempts_exhausted",
        "permanent",
        "undecodable",
        "bad_headers",
        "too_large",
        "headers_too_large",
        "unsupported_encoding",
        "unknown_handler",
    ] {
        want("burrow_dead_letters_total", &[queue, ("reason", reason)]);
    }
    want("burrow_in_flight", &[]);
    // One series per app queue: several apps can share one endpoint.
    want("burrow_connected", &[queue]);
    want("burrow_ack_frames_total", &[queue]);
    assert!(
        missing.is_empty(),
        "series missing from the first scrape: {missing:#?}\n{text}"
    );
    // Nothing has happened yet: every counter reads 0.
    for family in [
        "burrow_deliveries_total",
        "burrow_handler_runs_total",
        "burrow_retries_total",
        "burrow_dead_letters_total",
        "burrow_publishes_total",
        "burrow_ignored_total",
        "burrow_ack_frames_total",
    ] {
        assert_eq!(metric(&text, family, &[]), 0.0, "{family}\n{text}");
    }

    sigterm(&worker);
    let status = within("burrow run to exit", worker.wait())
        .await
        .expect("wait for burrow run");
    assert!(status.success(), "burrow run: {status:?}\n{}", read(&log));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reports_metrics_readiness_and_liveness_through_an_outage_and_a_shutdown() {
    let proxy = Proxy::start(common::proxy::shared_broker_addr()).await;
    let app =
        BinApp::new("endpoint", Some(proxy.url())).with("BURROW__CONSUMER__SHUTDOWN_TIMEOUT", "2s");
    let mut cleanup = Cleanup::new();
    cleanup.app(&app.settings);
    let (code, out) = app.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(0), "topology apply: {out}");
    let (mut worker, log) = app.spawn(&["run"], "run.log");
    app.wait_ready().await;
    assert_eq!(app.get("/healthz").await.0, 200);

    // One card both modules handle, one that feeds rejects for good.
    let publisher = publisher(&app.settings).await;
    let good = card(1, "user-ada");
    let bad = card(2, " ");
    for (id, body) in [("m-good", &good), ("m-bad", &bad)] {
        publisher
            .publish_json(
                "CardAddedToLibraryEvent",
                body,
                EventMeta {
                    message_id: Some(id.into()),
                    ..EventMeta::default()
                },
            )
            .await
            .expect("confirmed");
    }
    publisher.close().await;
    let text = eventually("both deliveries to settle", || async {
        let (_, text) = app.get("/metrics").await;
        if metric(&text, "burrow_dead_letters_total", &[]) >= 1.0
            && metric(&text, "burrow_handler_runs_total", &[]) >= 4.0
            && metric(&text, "burrow_in_flight", &[]) == 0.0
        {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await;
    let event = ("event", "CardAddedToLibraryEvent");
    let queue = app.settings.app_queue();
    assert_eq!(
        metric(
            &text,
            "burrow_deliveries_total",
            &[("queue", &queue), event]
        ),
        2.0,
        "{text}"
    );
    for (handler, outcome, n) in [
        ("feeds.add_card_to_feed", "ok", 1.0),
        ("feeds.add_card_to_feed", "dead", 1.0),
        ("notifications.notify_library_followers", "ok", 2.0),
    ] {
        assert_eq!(
            metric(
                &text,
                "burrow_handler_runs_total",
                &[("handler", handler), ("outcome", outcome)]
            ),
            n,
            "{handler} {outcome}\n{text}"
        );
    }
    assert_eq!(metric(&text, "burrow_handler_runs_total", &[]), 4.0);
    assert_eq!(
        metric(
            &text,
            "burrow_dead_letters_total",
            &[("queue", &queue), ("reason", "permanent")]
        ),
        1.0
    );
    assert_eq!(metric(&text, "burrow_retries_total", &[]), 0.0);
    assert_eq!(
        metric(&text, "burrow_publishes_total", &[("outcome", "confirmed")]),
        1.0,
        "the dead letter's copy"
    );
    assert_eq!(metric(&text, "burrow_connected", &[]), 1.0);
    let raw = Raw::connect().await;
    assert_eq!(
        raw.message_count(&app.settings.dead_letter_queue()).await,
        1
    );
    raw.close().await;

    // The broker goes away: not ready, but alive (a restart would not help).
    proxy.refuse(true);
    proxy.cut();
    let body = app.wait_status("/readyz", 503).await;
    assert!(body.contains("reconnecting"), "{body}");
    let (code, body) = app.get("/healthz").await;
    assert_eq!(code, 200, "reconnecting is alive: {body}");
    let (_, text) = app.get("/metrics").await;
    assert_eq!(metric(&text, "burrow_connected", &[]), 0.0);
    proxy.refuse(false);
    app.wait_ready().await;

    // SIGTERM while the network is silent: draining is reported, and the
    // stop is bounded by the shutdown timeout, not by the heartbeat.
    proxy.blackhole(true);
    sigterm(&worker);
    let body = app.wait_status("/readyz", 503).await;
    assert!(body.contains("draining"), "{body}");
    // basic.cancel gets no answer through the blackhole: the worker stays
    // in the drain until the shutdown timeout, alive all along.
    let (code, body) = app.get("/healthz").await;
    assert_eq!(code, 200, "draining is alive: {body}");
    let code = exit_code(&mut worker, "burrow run to stop with the network silent").await;
    proxy.blackhole(false);
    assert_eq!(code, Some(0), "{}", read(&log));
    assert_eq!(
        http_get(app.http, "/healthz").await.0,
        0,
        "the endpoint is gone"
    );
}

/// `burrow run` serves the console beside its probes, for its own app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_serves_the_console_of_its_app() {
    let app = BinApp::new("console-run", None);
    let mut cleanup = Cleanup::new();
    cleanup.app(&app.settings);
    let (mut worker, _log) = app.spawn(&["run"], "run.log");
    app.wait_ready().await;
    let page = app.wait_status("/console", 200).await;
    assert!(page.contains(&app.settings.app_queue()), "{page}");
    assert!(page.contains(&app.settings.dead_letter_queue()), "{page}");
    assert!(page.contains("ready"), "the worker's state: {page}");
    let letters = app.wait_status("/console/letters", 200).await;
    assert!(letters.contains("0 letters in"), "{letters}");
    let (status, css) = app.get("/console/assets/console.css").await;
    assert_eq!(status, 200);
    assert!(css.contains("font"), "{css}");
    sigterm(&worker);
    assert_eq!(exit_code(&mut worker, "the worker").await, Some(0));
}

/// `burrow console` serves the console alone, with no worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burrow_console_serves_the_console_without_a_worker() {
    let app = BinApp::new("console-alone", None);
    let mut cleanup = Cleanup::new();
    cleanup.app(&app.settings);
    let addr = app.http.to_string();
    let (mut console, log) = app.spawn(&["console", "--addr", &addr], "console.log");
    let page = app.wait_status("/console", 200).await;
    assert!(page.contains("no worker here"), "{page}");
    assert!(page.contains(&app.settings.dead_letter_queue()), "{page}");
    let (status, _) = app.get("/healthz").await;
    assert_eq!(status, 404, "the console command serves the console only");
    sigterm(&console);
    assert_eq!(exit_code(&mut console, "burrow console").await, Some(0));
    let printed = read(&log);
    assert!(
        printed.contains(&format!("http://{addr}/console")),
        "{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_exits_0_when_the_queue_is_already_empty() {
    let app = BinApp::new("drain-empty", None);
    let mut cleanup = Cleanup::new();
    cleanup.app(&app.settings);
    let (code, out) = app.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(0), "topology apply: {out}");
    let (code, out) = app.run(&["drain", "--idle", "1s"]).await;
    assert_eq!(code, Some(0), "drain: {out}");
    assert!(out.contains("draining done"), "{out}");
    assert!(handled_ids(&out).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nested_as_deep_as_one_frame_allows_are_dead_lettered_and_the_worker_lives_on() {
    let mut app = BinApp::new("deep-headers", None);
    // The binary gets the default thread stacks whatever this test process
    // was started with: the bounded parse, not a large stack, must save it.
    app.burrow = app.burrow.clone().without("RUST_MIN_STACK");
    let mut cleanup = Cleanup::new();
    cleanup.app(&app.settings);
    let (code, out) = app.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(0), "topology apply: {out}");
    let (mut worker, log) = app.spawn(&["run"], "run.log");
    app.wait_ready().await;

    let body = serde_json::to_vec(&card(1, "user-ada")).expect("json");
    let (depth, frame_max) = within(
        "the deep message to be confirmed",
        deep::publish(
            &amqp_url(),
            &app.settings.amqp.exchange,
            "CardAddedToLibraryEvent",
            "m-deep",
            &body,
        ),
    )
    .await;
    eprintln!(
        "published header {} nested {depth} arrays deep (frame_max {frame_max})",
        deep::KEY
    );
    let publisher = publisher(&app.settings).await;
    publisher
        .publish_json(
            "CardAddedToLibraryEvent",
            &card(2, "user-ada"),
            EventMeta {
                message_id: Some("m-normal".into()),
                ..EventMeta::default()
            },
        )
        .await
        .expect("confirmed");
    publisher.close().await;

    let queue = app.settings.app_queue();
    eventually("both messages to settle", || {
        if let Some(status) = worker.try_wait().expect("the worker's status") {
            panic!(
                "burrow run died ({status}) on the deep headers:\n{}",
                read(&log)
            );
        }
        async {
            let (_, text) = app.get("/metrics").await;
            if metric(
                &text,
                "burrow_dead_letters_total",
                &[("queue", &queue), ("reason", "headers_too_large")],
            ) >= 1.0
                && metric(&text, "burrow_handler_runs_total", &[("outcome", "ok")]) >= 2.0
                && metric(&text, "burrow_in_flight", &[]) == 0.0
            {
                Ok(())
            } else {
                Err(text)
            }
        }
    })
    .await;
    assert!(
        worker.try_wait().expect("the worker's status").is_none(),
        "burrow run is still running"
    );
    assert_eq!(app.get("/healthz").await.0, 200);

    // The original is acked; the dead-letter copy leaves the deep header out.
    let raw = Raw::connect().await;
    assert_eq!(
        raw.message_count(&queue).await,
        0,
        "nothing left in {queue}"
    );
    let dead_queue = app.settings.dead_letter_queue();
    assert_eq!(raw.message_count(&dead_queue).await, 1, "one dead letter");
    let dead = raw.wait_get(&dead_queue).await;
    let props = &dead.properties;
    assert_eq!(
        props.message_id().as_ref().map(|id| id.as_str()),
        Some("m-deep")
    );
    assert_eq!(
        header_str(props, "burrow-dead-reason").as_deref(),
        Some("headers_too_large")
    );
    let last_error = header_str(props, "burrow-last-error").unwrap_or_default();
    // Cut by the parser at its limit (the headers table is level 1), and
    // still deeper than burrow accepts.
    let cut = lapin::types::parsing::MAX_NESTING_DEPTH - 1;
    assert!(
        last_error.contains(deep::KEY) && last_error.contains(&format!("{cut} levels deep")),
        "{last_error}"
    );
    let dropped = header_str(props, "burrow-dropped-headers").unwrap_or_default();
    assert!(dropped.ends_with(deep::KEY), "{dropped}");
    raw.close().await;

    sigterm(&worker);
    assert_eq!(
        exit_code(&mut worker, "burrow run to stop on SIGTERM").await,
        Some(0),
        "{}",
        read(&log)
    );
    assert_eq!(handled_ids(&read(&log)), ["m-normal"]);
}
