//! The command line as scripts and operators use it: JSON output, exit
//! codes from one table, a reader that goes away, dead-letter selection,
//! export, dry runs, and log lines fit for a file.

mod common;

use std::process::Stdio;

use burrow::Settings;
use common::{
    bin::{self, Burrow, sigterm},
    node::free_port,
    *,
};
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use tokio::io::{AsyncBufReadExt, BufReader};

fn burrow(settings: &Settings) -> Burrow {
    Burrow::new(settings, &amqp_url())
}

fn header(table: &mut FieldTable, name: &str, value: &str) {
    table.insert(
        name.into(),
        AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
    );
}

/// Parks a letter in the dead-letter queue as the worker would have.
async fn park(raw: &Raw, settings: &Settings, id: &str, event: &str, reason: &str, handler: &str) {
    let mut headers = FieldTable::default();
    header(&mut headers, "burrow-event-type", event);
    header(&mut headers, "burrow-dead-reason", reason);
    header(&mut headers, "burrow-failed-handler", handler);
    header(
        &mut headers,
        "burrow-last-error",
        &format!("{handler}: it failed"),
    );
    headers.insert(
        "burrow-dead-at".into(),
        AMQPValue::LongLongInt(now_ms() - 60_000),
    );
    // About 1 KiB, so an export outgrows a pipe's buffer.
    let body = format!(r#"{{"aggregateId":"{id}","pad":"{}"}}"#, "x".repeat(1000));
    raw.publish(
        "",
        &settings.dead_letter_queue(),
        body.as_bytes(),
        BasicProperties::default()
            .with_message_id(id.into())
            .with_delivery_mode(2)
            .with_headers(headers),
    )
    .await;
}

/// Waits until the dead-letter queue holds `n` ready letters (browsed ones
/// come back asynchronously after the browsing channel closes).
async fn dead_letters_settle_at(raw: &Raw, settings: &Settings, n: u32) {
    let queue = settings.dead_letter_queue();
    eventually(&format!("{queue} to hold {n} letters"), || async {
        let got = raw.message_count(&queue).await;
        if got == n {
            Ok(())
        } else {
            Err(format!("{got} letters"))
        }
    })
    .await;
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_selected_exported_replayed_and_purged_as_scripts_expect() {
    let settings = TestApp::new("cli-dlq").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let cli = burrow(&settings);
    let (code, out) = cli.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(0), "{out}");
    let raw = Raw::connect().await;
    for i in 0..200 {
        park(
            &raw,
            &settings,
            &format!("card-{i}"),
            "CardAddedToLibraryEvent",
            "permanent",
            "feeds.add_card_to_feed",
        )
        .await;
    }
    for i in 0..100 {
        park(
            &raw,
            &settings,
            &format!("col-{i}"),
            "CollectionCreatedEvent",
            "undecodable",
            "collections.index_collection",
        )
        .await;
    }

    // One JSON document.
    let (code, out) = cli
        .run(&["dlq", "list", "--limit", "5", "--output", "json"])
        .await;
    assert_eq!(code, Some(0), "{out}");
    let list = json(&out);
    assert_eq!(list["total"], 300);
    assert_eq!(list["letters"].as_array().unwrap().len(), 5);
    assert_eq!(list["letters"][0]["reason"], "permanent");
    assert_eq!(list["letters"][0]["body_encoding"], "utf8");
    dead_letters_settle_at(&raw, &settings, 300).await;

    // A reader that goes away after one line: a quiet exit 0, no panic.
    let mut child = cli
        .command(&["dlq", "export"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within("the first exported line", lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(json(&first)["message_id"], "card-0");
    drop(lines);
    let out = within("export to end", child.wait_with_output())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    dead_letters_settle_at(&raw, &settings, 300).await;

    // Export to a file: every selected letter, body included; nothing removed.
    let file = std::env::temp_dir()
        .join(unique("burrow-export"))
        .with_extension("jsonl");
    let path = file.to_str().unwrap();
    let (code, out) = cli
        .run(&[
            "dlq",
            "export",
            "--event",
            "CollectionCreatedEvent",
            "--file",
            path,
        ])
        .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("exported 100 of 300"), "{out}");
    let exported = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    assert_eq!(exported.lines().count(), 100);
    for line in exported.lines() {
        let letter = json(line);
        assert_eq!(letter["event_type"], "CollectionCreatedEvent");
        assert!(letter["body"].as_str().unwrap().contains("aggregateId"));
        assert_eq!(letter["headers"]["burrow-dead-reason"], "undecodable");
    }
    dead_letters_settle_at(&raw, &settings, 300).await;

    // Dry run: what would happen, nothing changes.
    let (code, out) = cli
        .run(&[
            "dlq",
            "replay",
            "--dry-run",
            "--reason",
            "undecodable",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(json(&out)["would_replay"], 100);
    dead_letters_settle_at(&raw, &settings, 300).await;

    // A filter that matches nothing is an error of its own.
    let (code, out) = cli
        .run(&["dlq", "replay", "--handler", "nosuch.handler"])
        .await;
    assert_eq!(code, Some(6), "{out}");
    assert!(out.contains("matches handler nosuch.handler"), "{out}");
    let (code, out) = cli.run(&["dlq", "show", "no-such-id"]).await;
    assert_eq!(code, Some(6), "{out}");
    dead_letters_settle_at(&raw, &settings, 300).await;

    // A limited replay says how many are really left.
    let (code, out) = cli
        .run(&[
            "dlq",
            "replay",
            "--event",
            "CollectionCreatedEvent",
            "--limit",
            "10",
        ])
        .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("replayed 10 into") && out.contains("290 left"),
        "{out}"
    );
    // The letters the replay looked at and skipped come back asynchronously;
    // a command started before that would not see them (it counts the queue
    // when it starts).
    dead_letters_settle_at(&raw, &settings, 290).await;
    // A card letter: which ten collection letters went depends on the order
    // browsing left the queue in.
    let (code, out) = cli
        .run(&["dlq", "replay", "--id", "card-150", "--output", "json"])
        .await;
    assert_eq!(code, Some(0), "{out}");
    let report = json(&out);
    assert_eq!(
        (report["replayed"].clone(), report["left"].clone()),
        (1.into(), 289.into())
    );
    assert_eq!(
        raw.message_count(&settings.app_queue()).await,
        11,
        "the copies, confirmed"
    );
    dead_letters_settle_at(&raw, &settings, 289).await;

    // Purge: refused without --yes (naming the count), previewed, by id, by reason.
    let (code, out) = cli.run(&["dlq", "purge", "--reason", "undecodable"]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("deletes 90 dead letters"), "{out}");
    let (code, out) = cli
        .run(&[
            "dlq",
            "purge",
            "--dry-run",
            "--reason",
            "undecodable",
            "--output",
            "json",
        ])
        .await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(json(&out)["would_purge"], 90);
    dead_letters_settle_at(&raw, &settings, 289).await;
    let (code, out) = cli.run(&["dlq", "purge", "--id", "card-7", "--yes"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("purged 1 "), "{out}");
    let (code, out) = cli
        .run(&["dlq", "purge", "--reason", "undecodable", "--yes"])
        .await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("purged 90 "), "{out}");
    dead_letters_settle_at(&raw, &settings, 198).await;
    let (code, out) = cli.run(&["dlq", "show", "card-7"]).await;
    assert_eq!(code, Some(6), "purged for good: {out}");
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_follow_the_one_table() {
    let settings = TestApp::new("cli-codes").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let cli = burrow(&settings);

    let (code, help) = cli.run(&["--help"]).await;
    assert_eq!(code, Some(0), "{help}");
    for status in burrow::cli::ExitStatus::ALL {
        let row = format!("  {}  {}", status.code(), status.meaning());
        assert!(help.contains(&row), "--help lacks {row:?}:\n{help}");
    }

    for (args, want) in [
        (vec!["publish", "", "{}"], 2),
        (vec!["publish", "Card.#", "{}"], 2),
        (vec!["publish", "CardAddedToLibraryEvent", "[1,2]"], 2),
        (
            vec!["publish", "CardAddedToLibraryEvent", "{\"aggregateId\":"],
            2,
        ),
        (vec!["healthcheck", "--endpoint", "metrics"], 2),
        (vec!["topology", "verify"], 5),
    ] {
        let (code, out) = cli.run(&args).await;
        assert_eq!(code, Some(want), "burrow {args:?}:\n{out}");
    }

    // JSON for scripts: the topology, and verify's verdict.
    let (code, out) = cli.run(&["topology", "show", "--output", "json"]).await;
    assert_eq!(code, Some(0), "{out}");
    let topology = json(&out);
    assert_eq!(topology["queues"][0]["name"], settings.app_queue().as_str());
    let (code, out) = cli.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = cli.run(&["topology", "verify", "--output", "json"]).await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(json(&out)["matches"], true);

    let (code, out) = cli
        .run(&[
            "publish",
            "CardAddedToLibraryEvent",
            r#"{"aggregateId":"c-1"}"#,
            "--output",
            "json",
        ])
        .await;
    assert_eq!(code, Some(0), "{out}");
    let published = json(&out);
    assert_eq!(published["confirmed"], true);
    assert!(!published["message_id"].as_str().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_reach_the_broker_logs_one_plain_line_per_attempt() {
    let settings = TestApp::new("cli-logs").build();
    // Nothing listens there: every attempt is refused at once.
    let nowhere = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let cli = Burrow::new(&settings, &nowhere)
        .with("BURROW__LOG__FORMAT", "text")
        .with("BURROW__AMQP__RECONNECT_MAX_DELAY", "1s")
        .without("NO_COLOR");
    let log = std::env::temp_dir().join(unique("burrow-cli-logs"));
    let mut worker = cli.spawn(&["run"], &log);
    let text = eventually("three failed attempts in the log", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.matches("cannot reach the broker; retrying").count() >= 3 {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await;
    sigterm(&worker);
    let status = within("burrow run to stop", worker.wait()).await.unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(status.success(), "{status:?}\n{text}");
    assert!(!text.contains('\u{1b}'), "colour codes in a file:\n{text}");
    assert!(
        !text.contains("lost the broker"),
        "it never had it:\n{text}"
    );
    let attempts: Vec<&str> = text.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(
        attempts
            .iter()
            .all(|l| l.contains("cannot reach the broker; retrying")),
        "one line per attempt, burrow's own:\n{text}"
    );
    for line in attempts {
        let retry_in = line.split("retry_in=").nth(1).unwrap_or("");
        let value = retry_in.split_whitespace().next().unwrap_or("");
        assert!(
            !value.is_empty() && !value.contains("us") && !value.contains("ns"),
            "a delay in milliseconds, not nanoseconds: {line}"
        );
    }
}

/// `examples/service.rs`: a program of its own with two apps, built with
/// `cargo build --example service` (cargo builds it first when the whole
/// suite runs; this builds it when the test runs alone).
fn service_example() -> std::path::PathBuf {
    let bin = std::path::Path::new(common::bin::BIN);
    let path = bin.parent().unwrap().join("examples").join("service");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = std::process::Command::new(cargo);
    build.args(["build", "--quiet", "--example", "service"]);
    if cfg!(feature = "postgres") {
        build.arg("--all-features");
    }
    let status = build.status().expect("cargo builds the example");
    assert!(status.success(), "building examples/service.rs");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_of_its_own_runs_two_apps_behind_one_endpoint() {
    let mut settings = TestApp::new("cli-svc").build();
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    settings.http.addr = Some(http);
    let mut search = settings.clone();
    search.app.name = unique("cli-svc-search");
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings).app(&search);
    let exe = service_example();
    let log = std::env::temp_dir().join(unique("burrow-service"));
    let env = Burrow::new(&settings, &amqp_url())
        .with("SEARCH_APP", &search.app.name)
        .with("BURROW__LOG__FORMAT", "json");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = env
        .command_of(&exe, &["run"])
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("the example starts");
    bin::wait_status("/readyz", 200, || bin::http_get(http, "/readyz")).await;

    // Each app's queue gets its event; one /metrics shows both apps.
    let raw = Raw::connect().await;
    for (event_type, body) in [
        (
            "CardAddedToLibraryEvent",
            &br#"{"aggregateId":"card-1","libraryId":"library-1"}"#[..],
        ),
        ("CollectionCreatedEvent", br#"{"name":"Papers"}"#),
    ] {
        raw.publish(
            &settings.amqp.exchange,
            event_type,
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await;
    }
    let text = eventually("both apps to handle their event", || async {
        let (_, text) = bin::http_get(http, "/metrics").await;
        let feeds = bin::metric(
            &text,
            "burrow_handler_runs_total",
            &[("handler", "feeds.add_card"), ("outcome", "ok")],
        );
        let search_runs = bin::metric(
            &text,
            "burrow_handler_runs_total",
            &[("handler", "search.index_collection"), ("outcome", "ok")],
        );
        if feeds == 1.0 && search_runs == 1.0 {
            Ok(text)
        } else {
            Err(format!("feeds {feeds}, search {search_runs}"))
        }
    })
    .await;
    for queue in [settings.app_queue(), search.app_queue()] {
        assert_eq!(
            bin::metric(&text, "burrow_connected", &[("queue", &queue)]),
            1.0,
            "{queue} consumes\n{text}"
        );
    }
    raw.close().await;

    sigterm(&child);
    let status = within("the service to stop", child.wait()).await.unwrap();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(status.success(), "{status:?}\n{output}");
    assert!(
        output.contains("feed updated") && output.contains("indexed"),
        "{output}"
    );
}
