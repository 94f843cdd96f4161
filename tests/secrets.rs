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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_output_log_or_endpoint_contains_the_password() {
    let settings = TestApp::new("secret").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let password = format!("canary-{}", uuid::Uuid::new_v4().simple());
    let user = User(unique("burrow-secret"));
    rabbitmqctl(&["add_user", &user.0, &password]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user.0, ".*", ".*", ".*"]);

    let http = format!("127.0.0.1:{}", free_port());
    let env = |url: String| {
        Burrow::new(&settings, &url)
            .with("BURROW__RETRY__DELAYS", "300ms")
            .with("BURROW__HTTP__ADDR", &http)
            .with("RUST_LOG", "debug")
    };
    let good = env(url_as(&user.0, &password));
    let bad = env(url_as(&user.0, &format!("{password}-wrong")));

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

    // Every command that connects, with a wrong password: it fails, and says so without the secret.
    for args in [
        vec!["publish", "CardAddedToLibraryEvent", json],
        vec!["topology", "apply"],
        vec!["topology", "verify"],
        vec!["dlq", "list"],
        vec!["dlq", "replay"],
        vec!["dlq", "purge", "--yes"],
        vec!["drain", "--idle", "1s"],
        vec!["demo"],
    ] {
        if args[0] == "drain" || args[0] == "demo" {
            // These keep retrying the connection; give them a moment, then stop them.
            let env = bad
                .clone()
                .with("BURROW__HTTP__ADDR", &format!("127.0.0.1:{}", free_port()));
            let log = logs.join(format!("{}.log", args[0]));
            let mut child = env.spawn(&args, &log);
            // Both retry the connection forever: wait until the log shows a
            // failed attempt, then stop them and check what they printed.
            within("a failed connection attempt in the log", async {
                while !std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("reconnecting")
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await;
            let _ = child.start_kill();
            let _ = within("the command to stop", child.wait()).await;
            let text = std::fs::read_to_string(&log).unwrap();
            assert_clean(
                &format!("burrow {args:?} (wrong password)"),
                &text,
                &password,
            );
            continue;
        }
        let (code, text) = bad.run(&args).await;
        assert_ne!(
            code,
            Some(0),
            "burrow {args:?} must fail with a wrong password:\n{text}"
        );
        assert!(
            text.contains("***"),
            "the error should show the redacted URL:\n{text}"
        );
        assert_clean(
            &format!("burrow {args:?} (wrong password)"),
            &text,
            &password,
        );
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
