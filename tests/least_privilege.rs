//! The least-privilege user of docs/operations.md works: with permissions
//! limited to its own queues, the exchange and the default exchange, a
//! worker consumes, retries, dead-letters and browses its dead letters, and
//! it cannot declare another app's queues.
//!
//! Needs `rabbitmqctl` on the broker's machine to create the user.

mod common;

use std::process::Command;

use burrow::{Context, HandlerError, Registry, Topology, config::AmqpUrl};
use common::*;

/// A RabbitMQ user that is deleted when dropped.
struct User {
    name: String,
}

impl User {
    fn create(name: &str, password: &str, configure: &str, write: &str, read: &str) -> Self {
        let user = User {
            name: name.to_owned(),
        };
        rabbitmqctl(&["add_user", name, password]);
        rabbitmqctl(&["set_permissions", "-p", "/", name, configure, write, read]);
        user
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .output();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl must be installed next to the test broker to create a user");
    assert!(
        out.status.success(),
        "rabbitmqctl {:?} failed: {}",
        args.first(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `AMQP_URL` with other credentials.
fn url_as(user: &str, password: &str) -> String {
    let url = amqp_url();
    let (scheme, rest) = url.split_once("://").expect("AMQP_URL has a scheme");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}")
}

fn escape(name: &str) -> String {
    name.replace('.', "\\.")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_with_only_its_own_permissions() {
    let mut settings = TestApp::new("lp").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let queue_pattern = format!("events_{}(\\..*)?", escape(&settings.app.name));
    let exchange = escape(&settings.amqp.exchange);
    let password = uuid::Uuid::new_v4().simple().to_string();
    let user = User::create(
        &unique("burrow-lp"),
        &password,
        &format!("^({queue_pattern}|{exchange})$"),
        &format!("^({queue_pattern}|amq\\.default)$"),
        &format!("^({queue_pattern}|{exchange})$"),
    );
    // Events are published by another identity, as in production.
    let guest_settings = settings.clone();
    settings.amqp.url = AmqpUrl::new(url_as(&user.name, &password));

    let mut registry = Registry::new();
    registry
        .on("lp.card", |event: CardAdded, ctx: Context| async move {
            match event.title.as_str() {
                "broken" => Err(HandlerError::permanent("broken on purpose")),
                "flaky" if ctx.attempt == 1 => Err(HandlerError::transient("later")),
                _ => Ok(()),
            }
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&guest_settings).await;

    for title in ["fine", "flaky", "broken"] {
        publisher
            .publish(&CardAdded::new(title))
            .await
            .expect("publish");
    }
    let (mut handled, mut retried, mut dead) = (0, 0, 0);
    while handled + dead < 3 {
        let o = within(
            "outcomes under the limited user",
            next_outcome(&mut outcomes),
        )
        .await;
        assert!(o.acked, "every settlement must be acked: {o:?}");
        if o.retried.is_some() {
            retried += 1;
        } else if o.dead_lettered.is_some() {
            dead += 1;
        } else {
            handled += 1;
        }
    }
    assert_eq!((handled, retried, dead), (2, 1, 1));

    let letters = within("dlq list", burrow::dlq::list(&settings, 10))
        .await
        .expect("dlq list");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason.as_deref(), Some("permanent"));

    // Another app's queues are out of reach.
    let mut other = settings.clone();
    other.app.name = unique("t-other");
    let conn = burrow::internals::open(&other.amqp, "least-privilege probe")
        .await
        .unwrap();
    let refused =
        burrow::internals::declare(&Topology::for_app(&other, &Registry::new()), &conn).await;
    let _ = conn.close(200, "done".into()).await;
    match refused {
        Err(burrow::Error::TopologyRefused { reason, .. }) => {
            assert!(reason.contains("ACCESS_REFUSED"), "{reason}")
        }
        other => panic!("expected ACCESS_REFUSED, got {other:?}"),
    }

    publisher.close().await;
    worker.shutdown().await.expect("clean shutdown");
    drop(user);
}
