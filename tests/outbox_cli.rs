//! `burrow outbox relay|audit|status|migrate|cleanup` and `burrow run` with
//! `postgres.url`, run as operators run them: the real binary configured
//! through `BURROW__*` variables, against the real PostgreSQL (a schema of
//! each test's own, dropped afterwards) and the shared RabbitMQ (an app name
//! and exchange of each test's own, deleted afterwards).
//!
//! The database URL always carries a password (the one in `DATABASE_URL`,
//! or a canary the local trust authentication ignores), and no output, log
//! or endpoint of any command may show it.
#![cfg(feature = "postgres")]

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use burrow::{EventMeta, Publisher, Settings, outbox};
use chrono::NaiveDateTime;
use common::{
    CardAdded, Cleanup, TestApp, amqp_url,
    bin::{self, Burrow, http_get, metric, sigterm},
    eventually,
    node::free_port,
    proxy::Proxy,
    unique, within,
};
use pg::{Tap, TestDb, database_url};
use tokio::process::Child;

/// The event `handlers/feeds.rs` handles, as an app enqueues it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CardAddedToLibrary {
    aggregate_id: String,
    user_id: String,
    library_id: String,
}

impl burrow::Event for CardAddedToLibrary {
    const EVENT_TYPE: &'static str = "CardAddedToLibraryEvent";
}

impl burrow::DomainEvent for CardAddedToLibrary {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now()
    }
}

/// `url` with a password: the one it has, or a fresh canary. Returns the
/// URL and the password no output may contain.
fn url_with_password(url: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("DATABASE_URL has a scheme");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (userinfo, host) = authority
        .rsplit_once('@')
        .unwrap_or(("postgres", authority));
    if let Some((_, password)) = userinfo.split_once(':')
        && !password.is_empty()
    {
        return (url.to_owned(), password.to_owned());
    }
    let password = format!("pg-canary-{}", uuid::Uuid::new_v4().simple());
    (
        format!("{scheme}://{userinfo}:{password}@{host}{path}"),
        password,
    )
}

/// The test database's URL with its host and port replaced by `addr`.
fn url_at(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let userinfo = authority.rsplit_once('@').map(|(u, _)| u);
    match userinfo {
        Some(u) => format!("{scheme}://{u}@{addr}{path}"),
        None => format!("{scheme}://{addr}{path}"),
    }
}

/// One app as the binary sees it.
struct BinApp {
    settings: Settings,
    burrow: Burrow,
    http: SocketAddr,
    password: String,
    logs: PathBuf,
}

impl BinApp {
    /// An app on the shared broker whose database is `db`'s schema.
    fn new(prefix: &str, db: &TestDb) -> Self {
        let (url, password) = url_with_password(&database_url());
        Self::with_url(prefix, &url, &password, Some(&db.schema))
    }

    fn with_url(prefix: &str, url: &str, password: &str, schema: Option<&str>) -> Self {
        let mut settings = TestApp::new(prefix).delays_ms(&[300]).build();
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        settings.http.addr = Some(http);
        let mut burrow = Burrow::new(&settings, &amqp_url())
            .without("APP_ENV")
            .with("BURROW__RETRY__DELAYS", "300ms")
            .with("BURROW__POSTGRES__URL", url)
            .with("BURROW__OUTBOX__POLL_INTERVAL", "200ms")
            // Everything burrow logs, to search it for the password.
            .with("BURROW__LOG__FILTER", "debug,lapin=warn");
        if let Some(schema) = schema {
            burrow = burrow.with("BURROW__POSTGRES__SCHEMA", schema);
        }
        let logs = std::env::temp_dir().join(unique("burrow-outbox-cli"));
        std::fs::create_dir_all(&logs).expect("log directory");
        Self {
            settings,
            burrow,
            http,
            password: password.to_owned(),
            logs,
        }
    }

    fn with(mut self, key: &str, value: &str) -> Self {
        self.burrow.set(key, value);
        self
    }

    /// Runs `burrow <args>` to the end: (exit code, stdout + stderr). The
    /// output never contains the password.
    async fn run(&self, args: &[&str]) -> (Option<i32>, String) {
        let (code, text) = self.burrow.run(args).await;
        self.assert_no_password(&format!("burrow {args:?}"), &text);
        (code, text)
    }

    /// Runs `burrow <args>`, which must succeed; returns its output.
    async fn ok(&self, args: &[&str]) -> String {
        let (code, text) = self.run(args).await;
        assert_eq!(code, Some(0), "burrow {args:?} failed:\n{text}");
        text
    }

    /// Spawns `burrow <args>` logging to a file. Killed when dropped.
    fn spawn(&self, args: &[&str], log: &str) -> (Child, PathBuf) {
        let path = self.logs.join(log);
        (self.burrow.spawn(args, &path), path)
    }

    fn assert_no_password(&self, what: &str, text: &str) {
        assert!(
            !text.contains(&self.password),
            "{what} shows the database password:\n{text}"
        );
    }

    /// `GET path`: the status code and body (0 when nothing answers),
    /// which never contains the password.
    async fn get(&self, path: &str) -> (u16, String) {
        let (code, body) = http_get(self.http, path).await;
        self.assert_no_password(path, &body);
        (code, body)
    }

    /// Waits until `GET path` answers `code`; returns the body.
    async fn wait_status(&self, path: &str, code: u16) -> String {
        bin::wait_status(path, code, || self.get(path)).await
    }
}

impl Drop for BinApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// Waits until the log file contains `needle` at least `times` times while
/// `child` keeps running; panics with the log if it exits first.
async fn wait_log(child: &mut Child, log: &Path, needle: &str, times: usize) -> String {
    eventually(&format!("{times} × {needle:?} in the log"), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let found = text.matches(needle).count();
        if found < times
            && let Some(status) = child.try_wait().expect("the child's status")
        {
            panic!("burrow exited ({status}) before logging {needle:?}:\n{text}");
        }
        std::future::ready(if found >= times {
            Ok(text)
        } else {
            Err(format!("{found} so far"))
        })
    })
    .await
}

/// SIGTERM, then the exit code and everything the process logged.
async fn stop(app: &BinApp, child: &mut Child, log: &Path) -> (Option<i32>, String) {
    sigterm(child);
    let status = within("burrow to exit after SIGTERM", child.wait())
        .await
        .expect("waiting for burrow");
    let text = std::fs::read_to_string(log).expect("the log");
    app.assert_no_password("the log", &text);
    (status.code(), text)
}

/// One data row of `burrow outbox audit`.
#[derive(Debug)]
struct AuditRow {
    id: i64,
    message_id: String,
    status: String,
    published: Option<NaiveDateTime>,
}

fn audit_rows(text: &str) -> Vec<AuditRow> {
    let time = |date: &str, time: &str| {
        NaiveDateTime::parse_from_str(&format!("{date} {time}"), "%Y-%m-%d %H:%M:%S%.3f")
            .unwrap_or_else(|e| panic!("{date} {time} is not a time ({e}):\n{text}"))
    };
    text.lines()
        .skip_while(|line| !line.starts_with("ID "))
        .skip(1)
        .map(|line| {
            // ID EVENT MESSAGE-ID OCCURRED(date time) STATUS PUBLISHED(date time | -) ...
            let cells: Vec<&str> = line.split_whitespace().collect();
            let published = (cells[6] != "-").then(|| time(cells[6], cells[7]));
            AuditRow {
                id: cells[0].parse().unwrap_or_else(|_| panic!("{line}")),
                message_id: cells[2].to_owned(),
                status: cells[5].to_owned(),
                published,
            }
        })
        .collect()
}

/// Enqueues `n` events of one aggregate in one transaction; their message ids.
async fn enqueue_in_one_transaction(db: &TestDb, aggregate_id: &str, n: usize) -> Vec<String> {
    let mut tx = db.pool.begin().await.expect("begin");
    let mut ids = Vec::new();
    for i in 0..n {
        let event = CardAdded {
            aggregate_id: aggregate_id.to_owned(),
            ..CardAdded::new(&format!("step {i}"))
        };
        ids.push(outbox::enqueue(&mut tx, &event).await.expect("enqueue"));
    }
    tx.commit().await.expect("commit");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_tables_once() {
    let db = TestDb::empty().await;
    let app = BinApp::new("outbox-migrate", &db);

    // Before: the commands that read the tables say how to create them.
    let (code, text) = app.run(&["outbox", "status"]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("burrow outbox migrate"), "{text}");

    let text = app.ok(&["outbox", "migrate"]).await;
    assert!(
        text.contains("burrow's migrations are applied to") && text.contains("//***@"),
        "the redacted URL:\n{text}"
    );
    let tables = "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()
                  AND tablename IN ('event_outbox', 'event_inbox', '_burrow_migrations')";
    assert_eq!(db.scalar_i64(tables).await, 3);
    let applied = "SELECT count(*) FROM _burrow_migrations WHERE success";
    assert_eq!(db.scalar_i64(applied).await, 3);

    // Again: nothing to do, nothing changes.
    app.ok(&["outbox", "migrate"]).await;
    assert_eq!(db.scalar_i64(applied).await, 3);
    assert_eq!(db.scalar_i64(tables).await, 3);
    let text = app.ok(&["outbox", "status"]).await;
    assert!(text.contains("pending 0, failing 0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_relay_audit_and_cleanup() {
    let db = TestDb::new().await;
    let app = BinApp::new("outbox-relay", &db);
    let mut cleanup = Cleanup::new();
    cleanup.exchange(&app.settings.amqp.exchange);
    let mut tap = Tap::bind(&app.settings.amqp.exchange, &["#"]).await;

    let aggregate = unique("card");
    let ids = enqueue_in_one_transaction(&db, &aggregate, 3).await;
    let text = app.ok(&["outbox", "status"]).await;
    assert!(text.contains("pending 3, failing 0"), "{text}");
    assert!(!text.contains("oldest pending -"), "{text}");
    let before = audit_rows(&app.ok(&["outbox", "audit", &aggregate]).await);
    assert_eq!(before.len(), 3, "{before:?}");
    assert!(
        before
            .iter()
            .all(|r| r.status == "pending" && r.published.is_none()),
        "{before:?}"
    );

    // The relay publishes them in order, then stops cleanly on SIGTERM.
    let (mut relay, log) = app.spawn(&["outbox", "relay"], "relay.log");
    let got: Vec<String> = tap.take(3).await.iter().map(|m| m.message_id()).collect();
    assert_eq!(got, ids, "published in enqueue order");
    db.wait_drained().await;
    app.wait_status("/readyz", 200).await;
    eventually("the relay's metrics", || async {
        let (_, body) = app.get("/metrics").await;
        let published = metric(
            &body,
            "burrow_outbox_relayed_total",
            &[
                ("event", "CardAddedToLibraryEvent"),
                ("outcome", "published"),
            ],
        );
        if published == 3.0 {
            Ok(())
        } else {
            Err(format!("{published} published"))
        }
    })
    .await;
    let (code, text) = stop(&app, &mut relay, &log).await;
    assert_eq!(code, Some(0), "SIGTERM ends the relay cleanly:\n{text}");
    assert!(text.contains("outbox relay stopped"), "{text}");
    assert!(tap.rest().await.is_empty(), "each event published once");

    // audit: in order, published, with the times the database recorded.
    let text = app.ok(&["outbox", "audit", &aggregate]).await;
    assert!(
        text.starts_with(&format!("3 outbox events of aggregate {aggregate}")),
        "{text}"
    );
    let rows = audit_rows(&text);
    assert_eq!(
        rows.iter()
            .map(|r| r.message_id.clone())
            .collect::<Vec<_>>(),
        ids,
        "{text}"
    );
    assert!(rows.windows(2).all(|w| w[0].id < w[1].id), "{text}");
    let recorded = outbox::audit(&db.pool, &aggregate).await.unwrap();
    for (row, record) in rows.iter().zip(&recorded) {
        assert_eq!(row.status, "published", "{text}");
        let shown = row.published.expect("a publish time");
        let stored = record.published_at.expect("published_at").naive_utc();
        assert!(
            (stored - shown).num_milliseconds().abs() <= 1,
            "audit shows {shown}, the row says {stored}"
        );
    }
    let text = app.ok(&["outbox", "status"]).await;
    assert!(
        text.contains("pending 0, failing 0, oldest pending -, scheduled (not yet due) 0"),
        "{text}"
    );

    // cleanup: only published rows older than the age go; pending ones stay.
    let text = app.ok(&["outbox", "cleanup", "--older-than", "1h"]).await;
    assert!(text.contains("deleted 0 "), "{text}");
    sqlx::query(
        "UPDATE event_outbox SET published_at = published_at - interval '2 days'
         WHERE message_id = ANY($1)",
    )
    .bind(&ids[..2])
    .execute(&db.pool)
    .await
    .unwrap();
    let waiting = unique("card");
    enqueue_in_one_transaction(&db, &waiting, 1).await;
    db.execute("UPDATE event_outbox SET enqueued_at = enqueued_at - interval '3 days'")
        .await;
    let text = app.ok(&["outbox", "cleanup", "--older-than", "1d"]).await;
    assert!(text.contains("deleted 2 published outbox events"), "{text}");
    let rows = audit_rows(&app.ok(&["outbox", "audit", &waiting]).await);
    assert_eq!(rows.len(), 1, "a pending event is never deleted");
    let rows = audit_rows(&app.ok(&["outbox", "audit", &aggregate]).await);
    assert_eq!(
        rows.iter()
            .map(|r| r.message_id.clone())
            .collect::<Vec<_>>(),
        ids[2..]
    );

    // An aggregate without events, and a retention that keeps everything.
    let (code, text) = app.run(&["outbox", "audit", "no-such-card"]).await;
    assert_eq!(code, Some(6), "nothing matched: {text}");
    assert!(text.contains("no outbox events"), "{text}");
    let keep = BinApp::new("outbox-keep", &db).with("BURROW__OUTBOX__RETENTION", "0s");
    let (code, text) = keep.run(&["outbox", "cleanup"]).await;
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--older-than"), "{text}");
    tap.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_database_url_names_the_key_and_hides_the_password() {
    let password = format!("pg-canary-{}", uuid::Uuid::new_v4().simple());
    let (good, _) = url_with_password(&database_url());
    let (scheme, rest) = good.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host.split('/').next().unwrap();
    let cases = [
        // Not a PostgreSQL URL: refused when the settings load.
        format!("mysql://postgres:{password}@{host}/test"),
        // A port that is no number: refused when parsed.
        format!("{scheme}://postgres:{password}@127.0.0.1:54x2/test"),
        // A database that does not exist: the server says so; no retry helps.
        format!(
            "{scheme}://postgres:{password}@{host}/{}",
            unique("no_such_db").replace('-', "_")
        ),
    ];
    for url in &cases {
        let app = BinApp::with_url("outbox-bad-url", url, &password, None);
        for args in [
            vec!["outbox", "status"],
            vec!["outbox", "audit", "card-1"],
            vec!["outbox", "migrate"],
            vec!["outbox", "cleanup"],
            vec!["outbox", "relay"],
        ] {
            let (code, text) = app.run(&args).await;
            assert_eq!(code, Some(1), "burrow {args:?} with {url}:\n{text}");
            assert!(
                text.contains("postgres.url") && text.contains("error:"),
                "burrow {args:?} must name the key:\n{text}"
            );
            assert!(text.contains("//***@"), "the redacted URL:\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_migration_is_fatal_not_retried() {
    let db = TestDb::new().await;
    // What a database migrated by another version of a migration file looks like.
    db.execute("UPDATE _burrow_migrations SET checksum = decode('00', 'hex')")
        .await;
    let app = BinApp::new("outbox-checksum", &db);
    let mut cleanup = Cleanup::new();
    cleanup.app(&app.settings);
    for args in [
        vec!["outbox", "relay"],
        vec!["outbox", "migrate"],
        vec!["run"],
    ] {
        let (code, text) = app.run(&args).await;
        assert_eq!(code, Some(1), "burrow {args:?}:\n{text}");
        assert!(
            text.contains("previously applied but has been modified"),
            "burrow {args:?}:\n{text}"
        );
        assert!(!text.contains("retrying"), "burrow {args:?}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_waits_for_the_database_and_then_publishes() {
    let db = TestDb::empty().await;
    let (url, password) = url_with_password(&database_url());
    let upstream: SocketAddr = {
        let rest = url.split_once('@').map_or(url.as_str(), |(_, h)| h);
        let host = rest.split('/').next().unwrap();
        tokio::net::lookup_host(host)
            .await
            .expect("the database host resolves")
            .next()
            .expect("an address")
    };
    let proxy = Proxy::start(upstream).await;
    proxy.refuse(true);
    let app = BinApp::with_url(
        "outbox-wait",
        &url_at(&url, proxy.addr()),
        &password,
        Some(&db.schema),
    );
    let mut cleanup = Cleanup::new();
    cleanup.exchange(&app.settings.amqp.exchange);
    let mut tap = Tap::bind(&app.settings.amqp.exchange, &["#"]).await;

    let (mut relay, log) = app.spawn(&["outbox", "relay"], "relay.log");
    let text = wait_log(&mut relay, &log, "is not reachable; retrying", 2).await;
    assert!(text.contains("//***@"), "the redacted URL:\n{text}");
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay keeps trying:\n{text}"
    );
    assert_eq!(app.get("/healthz").await.0, 200, "alive while waiting");
    let (code, body) = app.get("/readyz").await;
    assert_eq!(code, 503, "not ready without its database: {body}");

    // The database comes back: the relay migrates (its schema was empty),
    // turns ready and publishes what is enqueued.
    proxy.refuse(false);
    app.wait_status("/readyz", 200).await;
    let aggregate = unique("card");
    let ids = enqueue_in_one_transaction(&db, &aggregate, 2).await;
    let got: Vec<String> = tap.take(2).await.iter().map(|m| m.message_id()).collect();
    assert_eq!(got, ids);
    db.wait_drained().await;

    // Lost while running: batches fail, /readyz says so; back, it is ready
    // again and publishes what was enqueued meanwhile.
    proxy.refuse(true);
    proxy.cut();
    let body = app.wait_status("/readyz", 503).await;
    assert!(body.contains("reconnecting"), "{body}");
    let later = enqueue_in_one_transaction(&db, &aggregate, 1).await;
    proxy.refuse(false);
    assert_eq!(tap.next().await.message_id(), later[0]);
    app.wait_status("/readyz", 200).await;
    db.wait_drained().await;

    let (code, text) = stop(&app, &mut relay, &log).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("reached PostgreSQL"), "{text}");
    assert!(text.contains("outbox batch failed; trying again"), "{text}");
    tap.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burrow_run_waits_for_an_unreachable_database_and_stops_on_sigterm() {
    let (url, password) = url_with_password(&database_url());
    let nobody = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let app = BinApp::with_url("run-no-db", &url_at(&url, nobody), &password, None);
    let mut cleanup = Cleanup::new();
    cleanup.app(&app.settings);

    let (mut run, log) = app.spawn(&["run"], "run.log");
    let text = wait_log(&mut run, &log, "is not reachable; retrying", 2).await;
    assert!(
        text.contains("postgres.url") && text.contains("//***@"),
        "the retry names the key and hides the password:\n{text}"
    );
    assert!(
        run.try_wait().unwrap().is_none(),
        "it keeps trying:\n{text}"
    );
    assert_eq!(app.get("/healthz").await.0, 200, "alive while waiting");
    let (code, body) = app.get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("starting"), "{body}");
    let (code, text) = stop(&app, &mut run, &log).await;
    assert_eq!(
        code,
        Some(0),
        "SIGTERM while waiting is a clean stop:\n{text}"
    );
    assert!(
        !text.contains("consuming"),
        "no consuming without the database:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burrow_run_with_postgres_handles_a_duplicate_once_and_expires_inbox_rows() {
    const HANDLER: &str = "feeds.add_card_to_feed";
    let db = TestDb::new().await;
    // Rows of earlier deliveries: one past inbox.retention (7 days), one not.
    sqlx::query(
        "INSERT INTO event_inbox (handler, message_id, event_type, processed_at) VALUES
             ($1, 'expired', 'CardAddedToLibraryEvent', now() - interval '30 days'),
             ($1, 'recent', 'CardAddedToLibraryEvent', now() - interval '1 hour')",
    )
    .bind(HANDLER)
    .execute(&db.pool)
    .await
    .unwrap();
    let app = BinApp::new("run-pg", &db).with("BURROW__OUTBOX__ENABLED", "true");
    let mut cleanup = Cleanup::new();
    cleanup.app(&app.settings);

    let (mut run, log) = app.spawn(&["run"], "run.log");
    app.wait_status("/readyz", 200).await;

    // The same message twice (a publisher resending after a lost confirm).
    let message_id = unique("dup");
    let body = serde_json::json!({
        "aggregateId": unique("card"),
        "userId": "user-ada",
        "libraryId": "library-1",
    });
    let publisher = within(
        "the publisher to connect",
        Publisher::connect(&app.settings),
    )
    .await
    .expect("publisher");
    for _ in 0..2 {
        publisher
            .publish_json(
                "CardAddedToLibraryEvent",
                &body,
                EventMeta::default().message_id(message_id.clone()),
            )
            .await
            .expect("published");
    }
    publisher.close().await;

    // And one through the outbox: the relay inside `burrow run` publishes
    // it, the worker handles it.
    let mut tx = db.pool.begin().await.unwrap();
    let event = CardAddedToLibrary {
        aggregate_id: unique("card"),
        user_id: "user-grace".into(),
        library_id: "library-1".into(),
    };
    let outbox_id = outbox::enqueue(&mut tx, &event).await.unwrap();
    tx.commit().await.unwrap();

    // Three successful runs: the duplicate is acked, not retried (its second
    // insert into feed_items would fail without the inbox).
    eventually("three handled deliveries", || async {
        let (_, metrics) = app.get("/metrics").await;
        let ok = metric(
            &metrics,
            "burrow_handler_runs_total",
            &[("handler", HANDLER), ("outcome", "ok")],
        );
        if ok >= 3.0 {
            Ok(())
        } else {
            Err(format!("{ok} ok runs"))
        }
    })
    .await;
    let (_, metrics) = app.get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "burrow_handler_runs_total",
            &[("handler", HANDLER)]
        ),
        3.0,
        "no retries:\n{metrics}"
    );
    let items: i64 = sqlx::query_scalar("SELECT count(*) FROM feed_items WHERE message_id = $1")
        .bind(&message_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(items, 1, "one feed item for the message delivered twice");
    let from_outbox: i64 =
        sqlx::query_scalar("SELECT count(*) FROM feed_items WHERE message_id = $1")
            .bind(&outbox_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(from_outbox, 1);
    let inbox = eventually("the expired inbox row to be deleted", || async {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT message_id FROM event_inbox WHERE handler = $1 ORDER BY message_id",
        )
        .bind(HANDLER)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        if ids.iter().any(|id| id == "expired") {
            Err(format!("{ids:?}"))
        } else {
            Ok(ids)
        }
    })
    .await;
    let mut expected = vec![message_id.clone(), outbox_id.clone(), "recent".to_owned()];
    expected.sort();
    assert_eq!(
        inbox, expected,
        "the expired row is deleted at start, the others stay"
    );

    let (code, text) = stop(&app, &mut run, &log).await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("inbox retention cleanup"), "{text}");
}
