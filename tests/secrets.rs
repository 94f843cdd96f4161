//! The broker password never shows: every command of the `burrow` binary,
//! the worker's logs and its HTTP endpoints are searched for a known
//! password, both when the password is right (commands succeed and print
//! what they did) and when it is wrong (commands fail and explain why).
//!
//! Needs `rabbitmqctl` next to the broker to create the user.

mod common;

use std::time::Duration;

use common::{
    bin::{Burrow, sigterm},
    node::free_port,
    *,
};

struct User(String);

impl Drop for User {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.0])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed next to the test broker to create a user");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn url_as(user: &str, password: &str) -> String {
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").expect("AMQP_URL has a scheme");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}")
}

fn assert_clean(what: &str, text: &str, password: &str) {
    assert!(
        !text.contains(password),
        "{what} printed the password:\n{text}"
    );
}

/// Percent-encodes a URL's userinfo part.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A password as a well-formed one (letters, digits, a dash).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_output_log_or_endpoint_contains_the_password() {
    let password = format!("canary-{}", uuid::Uuid::new_v4().simple());
    every_path_hides(&password).await;
}

/// A password with every character that breaks naive URL scanning: `/`
/// (base64 secrets), `@`, `:`, `%`, quotes, a space, `#` and `?`. The working
/// URL percent-encodes it; the commands are also run with it unencoded, as
/// a person who forgot would write it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_full_of_url_syntax_never_shows_either() {
    let password = format!(
        "ab/c@d:e%f\"g'h i#j?k-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    every_path_hides(&password).await;
}

/// The password kept out of the URL: `amqp.password_file`, as a
/// Kubernetes secret mount provides it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_can_come_from_a_file() {
    let settings = TestApp::new("secret-file").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let password = format!("file/{}", uuid::Uuid::new_v4().simple());
    let user = User(unique("burrow-secret-file"));
    rabbitmqctl(&["add_user", &user.0, &password]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user.0, ".*", ".*", ".*"]);
    let dir = std::env::temp_dir().join(unique("burrow-secret-mount"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("amqp-password");
    // As a secret mount may hold it: with a trailing line break.
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let without_password = format!("{scheme}://{}@{host}", user.0);
    let burrow = Burrow::new(&settings, &without_password)
        .with("BURROW__AMQP__PASSWORD_FILE", file.to_str().unwrap());
    let (code, text) = burrow.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(0), "the password from the file logs in:\n{text}");
    assert_clean("topology apply", &text, &password);
    let (code, text) = burrow
        .run(&[
            "publish",
            "CardAddedToLibraryEvent",
            r#"{"aggregateId":"c-1"}"#,
        ])
        .await;
    assert_eq!(code, Some(0), "{text}");

    // A password in both places is ambiguous: refused, naming both keys.
    let both = Burrow::new(&settings, &url_as(&user.0, &encode(&password)))
        .with("BURROW__AMQP__PASSWORD_FILE", file.to_str().unwrap());
    let (code, text) = both.run(&["topology"]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("amqp.password_file"), "{text}");
    assert_clean("both", &text, &password);
    // A file that cannot be read: the key and the path, never a content.
    let missing = Burrow::new(&settings, &without_password).with(
        "BURROW__AMQP__PASSWORD_FILE",
        dir.join("nope").to_str().unwrap(),
    );
    let (code, text) = missing.run(&["topology", "apply"]).await;
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("amqp.password_file") && text.contains("nope"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

async fn every_path_hides(password: &str) {
    let password = password.to_owned();
    let encoded = encode(&password);
    let settings = TestApp::new("secret").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let user = User(unique("burrow-secret"));
    rabbitmqctl(&["add_user", &user.0, &password]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user.0, ".*", ".*", ".*"]);
    let assert_clean = |what: &str, text: &str, password: &str| {
        assert_clean(what, text, password);
        assert_clean(what, text, &encode(password));
    };

    let http = format!("127.0.0.1:{}", free_port());
    let env = |url: String| {
        Burrow::new(&settings, &url)
            .with("BURROW__RETRY__DELAYS", "300ms")
            .with("BURROW__HTTP__ADDR", &http)
            .with("RUST_LOG", "debug")
    };
    let good = env(url_as(&user.0, &encoded));
    let bad = env(url_as(&user.0, &encode(&format!("{password}-wrong"))));
    let unencoded = env(url_as(&user.0, &password));
    // The worker: logs at debug, /metrics, /healthz, /readyz.
    let logs = std::env::temp_dir().join(unique("burrow-secrets"));
    std::fs::create_dir_all(&logs).unwrap();
    let worker_log = logs.join("run.log");
    let mut worker = good.spawn(&["run"], &worker_log);
    let addr = http.parse().unwrap();
    within("the worker to be ready", async {
        while burrow::http::probe(addr, "/readyz").await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;

    let json = r#"{"aggregateId":"card-1","userId":"u","libraryId":"l","name":"x","authorId":"a"}"#;
    let mut transcript = String::new();
    for args in [
        vec!["publish", "CardAddedToLibraryEvent", json],
        vec!["publish", "NobodySubscribesEvent", json],
        vec![
            "publish",
            "CollectionCreatedEvent",
            r#"{"aggregateId":"c-1","name":" ","authorId":"a"}"#,
        ],
        vec!["topology"],
        vec!["topology", "apply"],
        vec!["topology", "verify"],
        vec!["dlq", "list"],
        vec!["dlq", "show", "no-such-id"],
        vec!["dlq", "replay", "--limit", "0"],
        vec!["dlq", "purge"],
        vec!["healthcheck"],
        vec!["healthcheck", "--endpoint", "readyz"],
    ] {
        let (_, text) = good.run(&args).await;
        assert_clean(&format!("burrow {args:?}"), &text, &password);
        transcript.push_str(&text);
    }
    assert!(
        transcript.contains("confirmed"),
        "the good password must work:\n{transcript}"
    );

    for path in ["/metrics", "/healthz", "/readyz"] {
        let body = burrow::http::probe(addr, path)
            .await
            .unwrap_or_else(|e| e.to_string());
        assert_clean(path, &body, &password);
    }

    // Every command that connects, with a wrong password and with the
    // password unencoded: it fails at once, and says so without the secret.
    for (how, env) in [("wrong password", &bad), ("unencoded password", &unencoded)] {
        for args in [
            vec!["publish", "CardAddedToLibraryEvent", json],
            vec!["topology", "apply"],
            vec!["topology", "verify"],
            vec!["dlq", "list"],
            vec!["dlq", "replay"],
            vec!["dlq", "purge", "--yes"],
            vec!["drain", "--idle", "1s"],
            vec!["demo"],
            vec!["run"],
        ] {
            if password == encoded && how == "unencoded password" {
                // Nothing to encode: the same URL as the good one.
                continue;
            }
            let env = env
                .clone()
                .with("BURROW__HTTP__ADDR", &format!("127.0.0.1:{}", free_port()));
            let (code, text) = env.run(&args).await;
            assert_ne!(
                code,
                Some(0),
                "burrow {args:?} must fail with a {how}:\n{text}"
            );
            assert!(
                text.contains("***"),
                "the error should show the redacted URL:\n{text}"
            );
            assert_clean(&format!("burrow {args:?} ({how})"), &text, &password);
            if how == "wrong password" && matches!(args[0], "run" | "drain") {
                assert!(
                    text.contains("refused the connection"),
                    "a refused login at start ends the worker with the fix:\n{text}"
                );
            }
        }
    }

    // Stop the worker (SIGTERM) and search everything it logged.
    sigterm(&worker);
    let status = within("the worker to drain", worker.wait()).await.unwrap();
    assert!(
        status.success(),
        "SIGTERM must end the worker cleanly: {status:?}"
    );
    let log = std::fs::read_to_string(&worker_log).unwrap();
    let _ = std::fs::remove_dir_all(&logs);
    assert!(
        log.contains("consuming"),
        "expected the worker's log:\n{log}"
    );
    assert_clean("the worker's log", &log, &password);
}
