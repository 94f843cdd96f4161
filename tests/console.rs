//! The operator console in a real browser: headless Chromium driven over
//! WebDriver (chromedriver), against a real worker and broker.
//!
//! Dead letters are seeded by a worker whose handlers fail permanently; the
//! browser filters them, opens one, replays two (the worker handles them),
//! tries a purge with the wrong count (refused, nothing removed), then purges
//! the rest, and every step is checked on the broker. A second console,
//! bound as if on a pod's address, must be signed in to with its token.
//! Screenshots of each page go to `target/console-screenshots/`.
//!
//! Chromium and chromedriver come from Debian (`scripts/install-browser.sh`,
//! which `make test` runs); `CHROMEDRIVER` and `CHROMIUM` override the paths.

mod common;

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use burrow::{
    DomainEvent, Event, EventMeta, HandlerError, Registry, Settings, Worker, config::SecretToken,
    console::Console,
};
use chrono::{DateTime, Utc};
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

/// A second event type, so that a filter has something to leave out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CollectionCreated {
    aggregate_id: String,
    name: String,
    occurred_at: DateTime<Utc>,
}

impl Event for CollectionCreated {
    const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
}

impl DomainEvent for CollectionCreated {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        self.occurred_at
    }
}

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: tokio::process::Child,
    url: String,
}

impl Driver {
    async fn start() -> Self {
        let path = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        assert!(
            std::path::Path::new(&path).exists(),
            "{path} is missing: run scripts/install-browser.sh (make test does), or set CHROMEDRIVER"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = tokio::process::Command::new(&path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        eventually("chromedriver to listen", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(drop)
        })
        .await;
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn browser(&self) -> Client {
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"],
            }),
        );
        within(
            "a browser session",
            ClientBuilder::rustls()
                .expect("TLS roots")
                .capabilities(caps)
                .connect(&self.url),
        )
        .await
        .expect("chromedriver starts chromium")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A console for `settings` on a fresh loopback port, stopped on cancel.
async fn serve(console: Console, stop: &CancellationToken) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(burrow::http::serve(
        listener,
        console.router(),
        stop.clone().cancelled_owned(),
    ));
    addr
}

fn screenshots() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

async fn shoot(browser: &Client, name: &str) {
    let png = within("a screenshot", browser.screenshot())
        .await
        .expect("screenshot");
    std::fs::write(screenshots().join(format!("{name}.png")), png).expect("screenshot saved");
}

async fn text(browser: &Client, css: &str) -> String {
    match within(css, async {
        browser.find(Locator::Css(css)).await?.text().await
    })
    .await
    {
        Ok(text) => text,
        Err(e) => {
            let page = browser.source().await.unwrap_or_default();
            panic!("{css}: {e}; the page was:\n{page}")
        }
    }
}

/// Waits until the element at `css` holds `needle` (the page after a click
/// may still be loading: its elements go stale or are not there yet).
async fn wait_text(browser: &Client, css: &str, needle: &str) -> String {
    eventually(&format!("{css} to say {needle:?}"), || async {
        let found = async { browser.find(Locator::Css(css)).await?.text().await }.await;
        match found {
            Ok(text) if text.contains(needle) => Ok(text),
            Ok(text) => Err(format!("it says {text:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

async fn click(browser: &Client, css: &str) {
    within(css, async {
        browser.find(Locator::Css(css)).await?.click().await
    })
    .await
    .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

async fn rows(browser: &Client) -> Vec<String> {
    let mut ids = Vec::new();
    for row in browser
        .find_all(Locator::Css("#letters tbody tr"))
        .await
        .unwrap()
    {
        ids.push(row.attr("data-id").await.unwrap().unwrap_or_default());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_filters_reads_replays_and_purges_dead_letters_in_a_browser() {
    let settings: Settings = TestApp::new("console").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let dead = settings.dead_letter_queue();

    // Handlers that fail for good until `healed`, then record what they saw.
    let healed = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(Mutex::new(HashSet::new()));
    let mut registry = Registry::new();
    {
        let (healed, handled) = (healed.clone(), handled.clone());
        registry
            .on("library.attach_card", move |_: CardAdded, ctx| {
                let (healed, handled) = (healed.clone(), handled.clone());
                async move {
                    if !healed.load(Ordering::SeqCst) {
                        return Err(HandlerError::permanent(
                            "library lib-9 does not exist; create it first",
                        ));
                    }
                    handled.lock().unwrap().insert(ctx.message_id.clone());
                    Ok(())
                }
            })
            .unwrap();
    }
    registry
        .on(
            "catalog.index_collection",
            |_: CollectionCreated, _| async {
                Err::<(), _>(HandlerError::permanent(
                    "the search index rejects empty names",
                ))
            },
        )
        .unwrap();
    let worker = Worker::new(settings.clone(), registry).expect("worker");
    let (metrics, state) = (worker.metrics().clone(), worker.state());
    let mut worker = TestWorker::new(worker.spawn());
    within("the worker to consume", worker.consuming())
        .await
        .expect("consuming");
    let publisher = publisher(&settings).await;
    let raw = Raw::connect().await;

    let cards: Vec<String> = (0..3).map(|_| unique("card-msg")).collect();
    for (i, id) in cards.iter().enumerate() {
        let event = CardAdded::new(&format!("Solaris, vol. {i}"));
        within(
            "publish",
            publisher.publish_with(&event, EventMeta::default().message_id(id)),
        )
        .await
        .unwrap();
    }
    for _ in 0..2 {
        let event = CollectionCreated {
            aggregate_id: unique("collection"),
            name: String::new(),
            occurred_at: Utc::now(),
        };
        within("publish", publisher.publish(&event)).await.unwrap();
    }
    raw.wait_ready(&dead, 5, "the seeded dead letters").await;

    let stop = CancellationToken::new();
    let console = Console::new(&settings, publisher.clone(), "127.0.0.1:0".parse().unwrap())
        .unwrap()
        .with_worker(metrics, state);
    let base = format!("http://{}", serve(console, &stop).await);
    let driver = Driver::start().await;
    let browser = driver.browser().await;

    // Overview: every queue with its depth, the worker ready.
    browser.goto(&format!("{base}/console")).await.unwrap();
    assert_eq!(text(&browser, "#worker-state .n").await, "ready");
    let dead_row = format!("#queues tr[data-queue='{dead}'] .messages");
    assert_eq!(text(&browser, &dead_row).await, "5");
    shoot(&browser, "overview").await;

    // The table, filtered to one event type.
    browser
        .goto(&format!("{base}/console/letters"))
        .await
        .unwrap();
    assert_eq!(rows(&browser).await.len(), 5);
    within("typing the filter", async {
        browser
            .find(Locator::Css("#filters input[name=event]"))
            .await?
            .send_keys("CardAddedToLibraryEvent")
            .await
    })
    .await
    .unwrap();
    click(&browser, "#filters button[type=submit]").await;
    wait_text(&browser, "#counts", "of 3 matching").await;
    let shown = rows(&browser).await;
    assert_eq!(
        shown.iter().collect::<HashSet<_>>(),
        cards.iter().collect::<HashSet<_>>(),
        "the filter keeps the card events only"
    );
    shoot(&browser, "letters").await;

    // One letter: its failure and its body, pretty-printed.
    click(&browser, &format!("#letters tr[data-id='{}'] a", cards[0])).await;
    wait_text(&browser, "#last-error", "library lib-9 does not exist").await;
    let body = text(&browser, "#body").await;
    assert!(body.contains("\"title\": \"Solaris, vol. 0\""), "{body}");
    let headers = text(&browser, "#headers").await;
    assert!(headers.contains("burrow-dead-reason"), "{headers}");
    shoot(&browser, "letter").await;

    // Replay two of them: the worker, healed, handles exactly those.
    healed.store(true, Ordering::SeqCst);
    browser
        .goto(&format!(
            "{base}/console/letters?event=CardAddedToLibraryEvent"
        ))
        .await
        .unwrap();
    for id in &cards[..2] {
        click(&browser, &format!("input[name=ids][value='{id}']")).await;
    }
    click(&browser, "#replay-selected").await;
    wait_text(&browser, "#result", "Replayed 2 letters").await;
    shoot(&browser, "replayed").await;
    eventually("the worker to handle the two replayed letters", || async {
        let seen = handled.lock().unwrap().clone();
        if seen == cards[..2].iter().cloned().collect::<HashSet<_>>() {
            Ok(())
        } else {
            Err(format!("handled {seen:?}"))
        }
    })
    .await;
    raw.wait_ready(&dead, 3, "the letters not replayed").await;

    // Export: JSON lines, one document per letter, the letters left in place.
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let (status, lines) =
        common::bin::http_get(addr, "/console/letters/export?event=CollectionCreatedEvent").await;
    assert_eq!(status, 200, "{lines}");
    let exported: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is a JSON document"))
        .collect();
    assert_eq!(exported.len(), 2, "{lines}");
    assert!(
        exported
            .iter()
            .all(|l| l["event_type"] == "CollectionCreatedEvent" && l["reason"] == "permanent"),
        "{lines}"
    );
    raw.wait_ready(&dead, 3, "the letters after an export")
        .await;

    // Purge the rest: the wrong count is refused and removes nothing.
    browser
        .goto(&format!("{base}/console/letters"))
        .await
        .unwrap();
    click(&browser, "#purge-link").await;
    wait_text(&browser, "#purge", "Purge 3 letters").await;
    let confirm = Locator::Css("#purge input[name=confirm]");
    browser
        .find(confirm)
        .await
        .unwrap()
        .send_keys("2")
        .await
        .unwrap();
    click(&browser, "#purge-confirm").await;
    wait_text(&browser, "main", "type 3").await;
    raw.wait_ready(&dead, 3, "the letters after a refused purge")
        .await;
    browser.back().await.unwrap();
    wait_text(&browser, "#purge", "Purge 3 letters").await;
    let field = browser.find(confirm).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys("3").await.unwrap();
    shoot(&browser, "purge").await;
    click(&browser, "#purge-confirm").await;
    wait_text(&browser, "#result", "Purged 3 letters").await;
    raw.wait_ready(&dead, 0, "the purged dead-letter queue")
        .await;
    assert_eq!(handled.lock().unwrap().len(), 2, "a purge runs no handler");

    // A console bound as on a pod's address: the token is the way in.
    let mut guarded = settings.clone();
    guarded.http.console_token = Some(SecretToken::new("t0ken-for-the-console-test"));
    let console =
        Console::new(&guarded, publisher.clone(), "0.0.0.0:9090".parse().unwrap()).unwrap();
    let guarded_base = format!("http://{}", serve(console, &stop).await);
    browser
        .goto(&format!("{guarded_base}/console"))
        .await
        .unwrap();
    assert!(
        browser
            .current_url()
            .await
            .unwrap()
            .path()
            .ends_with("/console/login")
    );
    let token = Locator::Css("input[name=token]");
    browser
        .find(token)
        .await
        .unwrap()
        .send_keys("wrong-token-wrong-token")
        .await
        .unwrap();
    click(&browser, "button[type=submit]").await;
    wait_text(&browser, "main", "not the console token").await;
    browser
        .find(token)
        .await
        .unwrap()
        .send_keys("t0ken-for-the-console-test")
        .await
        .unwrap();
    click(&browser, "button[type=submit]").await;
    wait_text(&browser, "h1", "Overview").await;
    assert!(
        !browser
            .source()
            .await
            .unwrap()
            .contains("t0ken-for-the-console-test")
    );

    browser.close().await.unwrap();
    stop.cancel();
    raw.close().await;
    publisher.close().await;
    worker.stop().await.expect("worker stops");
}

/// A console configured for a non-loopback address without a token refuses
/// every page and says which setting fixes it; nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_on_a_pod_address_without_a_token_refuses_and_says_why() {
    let settings: Settings = TestApp::new("console-open").build();
    let publisher = burrow::Publisher::new(&settings, burrow::Metrics::new()).unwrap();
    let stop = CancellationToken::new();
    let console = Console::new(&settings, publisher, "0.0.0.0:9090".parse().unwrap()).unwrap();
    let addr = serve(console, &stop).await;
    for path in ["/console", "/console/letters", "/console/letters/export"] {
        let (status, body) = common::bin::http_get(addr, path).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("http.console_token"), "{path}: {body}");
    }
    stop.cancel();
}
