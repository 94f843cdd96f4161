//! `burrow doctor` and the binding check of `burrow topology verify`, run as
//! operators run them: on the shared broker without the management API
//! (what cannot be checked says so), and on a node of their own with it
//! (broker version, bindings, the live consumer's ack timeout).

mod common;

use std::net::SocketAddr;

use burrow::Settings;
use common::{
    bin::{Burrow, http_get, wait_status},
    node::{Node, free_port},
    *,
};
use lapin::{options::QueueBindOptions, types::FieldTable};
use serde_json::Value;

/// `burrow doctor -o json`: the exit code and the document.
async fn doctor(burrow: &Burrow) -> (Option<i32>, Value) {
    let out = within(
        "burrow doctor",
        burrow.command(&["doctor", "-o", "json"]).output(),
    )
    .await
    .expect("burrow runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), doc)
}

/// The checks with `id`, as (status, detail).
fn checks<'a>(doc: &'a Value, id: &str) -> Vec<(&'a str, &'a str)> {
    doc["checks"]
        .as_array()
        .expect("a list of checks")
        .iter()
        .filter(|c| c["id"] == id)
        .map(|c| {
            (
                c["status"].as_str().expect("a status"),
                c["detail"].as_str().expect("a detail"),
            )
        })
        .collect()
}

fn status<'a>(doc: &'a Value, id: &str) -> &'a str {
    match checks(doc, id).as_slice() {
        [(status, _)] => status,
        other => panic!("expected one {id} check, got {other:?} in {doc}"),
    }
}

/// An ordered app: doctor checks its shard exchange, which exists only
/// once declared (and only where the consistent-hash plugin is enabled).
#[tokio::test]
async fn doctor_checks_an_ordered_apps_shard_exchange() {
    let mut settings = TestApp::new("doctor-ordered").build();
    settings.ordering.shards = 2;
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let burrow = Burrow::new(&settings, &amqp_url())
        .without("BURROW__MANAGEMENT__URL")
        .with("BURROW__ORDERING__SHARDS", "2");

    let (code, doc) = doctor(&burrow).await;
    assert_eq!(code, Some(7), "{doc}");
    assert_eq!(status(&doc, "topology.shards"), "fail", "{doc}");
    let (_, detail) = checks(&doc, "topology.shards")[0];
    assert!(
        detail.contains(&format!("{}.shards", settings.app_queue())),
        "{detail}"
    );

    let (code, text) = burrow.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(0), "{text}");
    let (code, doc) = doctor(&burrow).await;
    assert_eq!(code, Some(0), "{doc}");
    assert_eq!(status(&doc, "topology.shards"), "pass", "{doc}");
    assert_eq!(status(&doc, "topology.queues"), "pass", "{doc}");
}

#[tokio::test]
async fn without_the_management_api_doctor_checks_over_amqp_and_says_what_it_could_not() {
    let settings = TestApp::new("doctor").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let burrow = Burrow::new(&settings, &amqp_url()).without("BURROW__MANAGEMENT__URL");

    // Nothing declared yet: the queues are missing, and so are the
    // dead-letter targets, which would leave messages where they are.
    let (code, doc) = doctor(&burrow).await;
    assert_eq!(code, Some(7), "{doc}");
    assert_eq!(doc["ok"], false);
    assert_eq!(status(&doc, "broker.connect"), "pass");
    let (_, detail) = checks(&doc, "topology.dead_letter_targets")[0];
    assert!(detail.contains(&settings.dead_letter_queue()), "{detail}");

    let (code, text) = burrow.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(0), "{text}");
    let (code, doc) = doctor(&burrow).await;
    assert_eq!(code, Some(0), "{doc}");
    assert_eq!(doc["ok"], true);
    assert_eq!(status(&doc, "topology.queues"), "pass");
    assert_eq!(status(&doc, "topology.dead_letter_targets"), "pass");
    assert_eq!(status(&doc, "queue.delivery_limit"), "pass");
    for id in [
        "broker.version",
        "topology.bindings",
        "consumer.max_body_bytes",
    ] {
        assert_eq!(status(&doc, id), "not_checked", "{id}: {doc}");
        let (_, detail) = checks(&doc, id)[0];
        assert!(detail.contains("management.url"), "{id}: {detail}");
    }

    // The text output: one line per check, a summary, the fix under a failure.
    let raw = Raw::connect().await;
    raw.channel
        .queue_delete(
            settings.dead_letter_queue().as_str().into(),
            Default::default(),
        )
        .await
        .expect("delete the dead-letter queue");
    let (code, text) = burrow.run(&["doctor"]).await;
    assert_eq!(code, Some(7), "{text}");
    assert!(text.contains("FAIL topology.dead_letter_targets"), "{text}");
    assert!(text.contains("fix: run `burrow topology apply`"), "{text}");
    assert!(text.contains("2 failed"), "{text}");
    raw.close().await;
}

/// `GET path` on the node's management API, as JSON.
async fn management_get(node: &Node, path: &str) -> Vec<Value> {
    let url = format!(
        "{}{path}",
        node.management_url().replace("guest:guest@", "")
    );
    reqwest::Client::new()
        .get(url)
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("the management API answers")
        .json()
        .await
        .expect("a JSON list")
}

/// The bindings of `queue` from the exchange `source`, by the management API.
async fn bound_keys(node: &Node, queue: &str, source: &str) -> Vec<String> {
    management_get(node, &format!("/api/queues/%2F/{queue}/bindings"))
        .await
        .iter()
        .filter(|b| b["source"] == source)
        .map(|b| b["routing_key"].as_str().expect("a key").to_owned())
        .collect()
}

/// The arguments of the consumers of `queue`.
async fn consumer_arguments(node: &Node, queue: &str) -> Vec<Value> {
    management_get(node, "/api/consumers/%2F")
        .await
        .into_iter()
        .filter(|c| c["queue"]["name"] == queue)
        .map(|c| c["arguments"].clone())
        .collect()
}

fn app_on(node: &Node) -> (Settings, Burrow, SocketAddr) {
    let mut settings = TestApp::new("doctor-mgmt").build();
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    settings.http.addr = Some(http);
    let burrow = Burrow::new(&settings, &node.url())
        .with("BURROW__MANAGEMENT__URL", &node.management_url())
        .with("BURROW__LOG__FORMAT", "json")
        .with("BURROW__CONSUMER__ACK_TIMEOUT", "7m");
    (settings, burrow, http)
}

#[tokio::test]
async fn with_the_management_api_doctor_and_verify_find_a_lost_or_stray_binding() {
    // A node of its own: its management API, and nothing else on it.
    let node = Node::start_with_management("doctor").await;
    let (settings, burrow, http) = app_on(&node);
    let queue = settings.app_queue();

    let (code, text) = burrow.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(0), "{text}");
    let declared = bound_keys(&node, &queue, &settings.amqp.exchange).await;
    assert!(!declared.is_empty(), "the app queue is bound");

    let (code, doc) = doctor(&burrow).await;
    assert_eq!(code, Some(0), "{doc}");
    let (version, detail) = checks(&doc, "broker.version")[0];
    assert_eq!(version, "pass");
    assert!(detail.starts_with("RabbitMQ "), "{detail}");
    assert_eq!(status(&doc, "topology.bindings"), "pass");
    assert_ne!(status(&doc, "broker.feature_flags"), "fail", "{doc}");
    assert_eq!(status(&doc, "consumer.max_body_bytes"), "pass", "{doc}");
    let (code, text) = burrow.run(&["topology", "verify"]).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("so do {} binding(s)", declared.len())),
        "{text}"
    );

    // A running worker's consumer asks for the ack deadline.
    let log = node.dir().join("worker.log");
    let mut worker = burrow.spawn(&["run"], &log);
    wait_status("/readyz", 200, || http_get(http, "/readyz")).await;
    // The management API lists consumers from its statistics, which lag
    // by up to collect_statistics_interval (5 s).
    let arguments = eventually("the management API to list the consumer", || async {
        match consumer_arguments(&node, &queue).await {
            found if found.len() == 1 => Ok(found),
            found => Err(format!("consumers: {found:?}")),
        }
    })
    .await;
    let timeout = arguments[0]["x-consumer-timeout"]
        .as_i64()
        .unwrap_or_else(|| panic!("no x-consumer-timeout in {:?}", arguments[0]));
    assert_eq!(timeout, 7 * 60 * 1000, "consumer.ack_timeout = 7m");
    let (code, doc) = doctor(&burrow).await;
    assert_eq!(code, Some(0), "{doc}");
    assert!(
        checks(&doc, "consumer.ack_timeout")
            .iter()
            .all(|(s, d)| !d.contains("has no x-consumer-timeout") && *s != "fail"),
        "{doc}"
    );
    worker.kill().await.expect("stop the worker");

    // Someone unbinds an event type, and binds one no handler takes.
    let raw = Raw::connect_to(&node.url()).await;
    let lost = declared[0].clone();
    raw.channel
        .queue_unbind(
            queue.as_str().into(),
            settings.amqp.exchange.as_str().into(),
            lost.as_str().into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind");
    raw.channel
        .queue_bind(
            queue.as_str().into(),
            settings.amqp.exchange.as_str().into(),
            "NothingHandlesThisEvent".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");

    let (code, doc) = doctor(&burrow).await;
    assert_eq!(code, Some(7), "{doc}");
    let found = checks(&doc, "topology.bindings");
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found.iter().all(|(s, _)| *s == "fail"), "{found:?}");
    assert!(
        found
            .iter()
            .any(|(_, d)| d.contains(&format!("({lost})")) && d.contains("is missing")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|(_, d)| d.contains("NothingHandlesThisEvent") && d.contains("does not declare")),
        "{found:?}"
    );
    let (code, text) = burrow.run(&["topology", "verify"]).await;
    assert_eq!(code, Some(5), "{text}");
    assert!(text.contains(&format!("({lost})")), "{text}");
    assert!(
        !text.contains("guest:guest"),
        "the password is not shown: {text}"
    );

    // apply binds the lost one again; the stray one is the operator's to remove.
    let (code, text) = burrow.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(
        bound_keys(&node, &queue, &settings.amqp.exchange)
            .await
            .contains(&lost)
    );
    raw.channel
        .queue_unbind(
            queue.as_str().into(),
            settings.amqp.exchange.as_str().into(),
            "NothingHandlesThisEvent".into(),
            FieldTable::default(),
        )
        .await
        .expect("unbind the stray one");
    let (code, text) = burrow.run(&["topology", "verify"]).await;
    assert_eq!(code, Some(0), "{text}");
    raw.close().await;
}

#[tokio::test]
async fn wrong_management_credentials_fail_the_check_by_name_without_the_password() {
    let node = Node::start_with_management("doctor-auth").await;
    let (_, burrow, _) = app_on(&node);
    let url = node
        .management_url()
        .replace("guest:guest", "guest:n0t-the-Passw0rd");
    let burrow = burrow.with("BURROW__MANAGEMENT__URL", &url);
    let (code, doc) = doctor(&burrow).await;
    assert_eq!(code, Some(7), "{doc}");
    let (s, detail) = checks(&doc, "broker.version")[0];
    assert_eq!(s, "fail");
    assert!(detail.contains("401"), "{detail}");
    assert!(!doc.to_string().contains("n0t-the-Passw0rd"), "{doc}");
}
