//! Self-tests of the test harness: a node of our own ([`common::node`]) and
//! the TCP proxy ([`common::proxy`]) behave as the lifecycle and
//! fault-injection tests rely on.

mod common;

use std::time::Duration;

use burrow::config::AmqpUrl;
use common::{node::Node, proxy::Proxy, *};
use lapin::{
    BasicProperties, Connection,
    options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions},
    types::FieldTable,
};

async fn connect(url: &str) -> lapin::Result<Connection> {
    burrow::internals::connect(&AmqpUrl::new(url.to_owned()), 30, "burrow harness test")
        .await
        .map_err(|e| match e {
            burrow::Error::Connect { source, .. } => source,
            other => panic!("unexpected error: {other}"),
        })
}

/// Declares a durable queue and publishes one persistent message, confirmed.
async fn put_durable(conn: &Connection, queue: &str, body: &[u8]) {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue.declare");
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("basic.publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
}

async fn get(conn: &Connection, queue: &str) -> Option<Vec<u8>> {
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .map(|m| m.delivery.data)
}

/// Waits until `conn` has noticed it is gone.
async fn wait_broken(conn: &Connection, what: &str) {
    within(what, async {
        while conn.status().connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_our_own_stops_starts_dies_and_restarts_with_its_data() {
    let started = std::time::Instant::now();
    let mut node = Node::start("harness").await;
    eprintln!(
        "node {} started in {:?}",
        node.node_name(),
        started.elapsed()
    );
    assert!(node.node_name().starts_with("burrow-harness-"));
    assert!(node.node_name().ends_with("@localhost"));
    assert_ne!(node.amqp_port(), 5672, "never the shared broker's port");
    assert!(node.dir().is_dir());
    let status = node.ctl(&["status"]);
    assert!(status.status.success(), "rabbitmqctl status: {status:?}");
    let plugins = node.ctl(&["list_queues"]);
    assert!(plugins.status.success());

    let queue = unique("harness-q");
    let conn = within("a connection to the node", connect(&node.url()))
        .await
        .expect("connects");
    put_durable(&conn, &queue, b"one").await;

    // stop_app: the node closes our connection and refuses new ones.
    node.stop_app().await;
    wait_broken(&conn, "stop_app to close the connection").await;
    assert!(
        connect(&node.url()).await.is_err(),
        "no AMQP while the app is stopped"
    );
    node.start_app().await;
    let conn = within("a connection after start_app", connect(&node.url()))
        .await
        .expect("connects after start_app");
    assert_eq!(get(&conn, &queue).await.as_deref(), Some(&b"one"[..]));
    put_durable(&conn, &queue, b"two").await;

    // kill: SIGKILL, the VM is gone, the connection breaks.
    let beam = node.beam_pid().expect("the node wrote its pid");
    node.kill().await;
    assert!(
        !std::path::Path::new(&format!("/proc/{beam}/cmdline")).exists()
            || std::fs::read_to_string(format!("/proc/{beam}/stat"))
                .is_ok_and(|s| s.contains(") Z")),
        "the VM is gone"
    );
    wait_broken(&conn, "the kill to break the connection").await;

    // restart: same port and data; the confirmed persistent message survived.
    let restarted = std::time::Instant::now();
    node.restart().await;
    eprintln!("node restarted in {:?}", restarted.elapsed());
    let conn = within("a connection after restart", connect(&node.url()))
        .await
        .expect("connects after restart");
    assert_eq!(get(&conn, &queue).await.as_deref(), Some(&b"two"[..]));
    let _ = conn.close(200, "done".into()).await;

    // Drop: the node is stopped and its directory removed.
    let dir = node.dir().to_owned();
    let beam = node.beam_pid().expect("pid after restart");
    drop(node);
    assert!(!dir.exists(), "the node directory is removed");
    assert!(
        std::fs::read_to_string(format!("/proc/{beam}/stat")).map_or(true, |s| s.contains(") Z")),
        "the node process is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_forwards_cuts_blackholes_and_refuses() {
    let proxy = Proxy::start(common::proxy::shared_broker_addr()).await;
    assert!(proxy.url().contains(&proxy.port().to_string()));

    // Forwards: a full AMQP round trip.
    let queue = unique("harness-proxy-q");
    let mut cleanup = Cleanup::new();
    cleanup.queue(&queue);
    let conn = within("a connection through the proxy", connect(&proxy.url()))
        .await
        .expect("connects through the proxy");
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.accepted(), 1);
    put_durable(&conn, &queue, b"through").await;
    assert_eq!(get(&conn, &queue).await.as_deref(), Some(&b"through"[..]));

    // Latency: still a working connection.
    proxy.set_latency(Duration::from_millis(50));
    put_durable(&conn, &queue, b"slow").await;
    assert_eq!(get(&conn, &queue).await.as_deref(), Some(&b"slow"[..]));
    proxy.set_latency(Duration::ZERO);

    // Blackhole: nothing gets through while on, the socket stays open, and
    // the held bytes flow when it ends.
    proxy.blackhole(true);
    let ch = conn.create_channel();
    let mut ch = Box::pin(ch);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut ch)
            .await
            .is_err(),
        "a channel.open got an answer through the blackhole"
    );
    assert_eq!(proxy.connections(), 1, "the blackhole keeps the socket");
    assert!(conn.status().connected());
    within("the proxy to hold the channel.open", async {
        while proxy.held_from_clients() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    proxy.blackhole(false);
    assert_eq!(proxy.held_from_clients(), 0);
    within("the held channel.open to complete", ch)
        .await
        .expect("channel opens after the blackhole");

    // Cut: both sides closed, the client notices, new connections work.
    proxy.cut();
    wait_broken(&conn, "the cut to close the connection").await;
    within("the proxy to count no connection", async {
        while proxy.connections() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let conn = within("a connection after the cut", connect(&proxy.url()))
        .await
        .expect("connects after a cut");
    assert_eq!(proxy.connections(), 1);
    assert_eq!(proxy.accepted(), 2);

    // Refuse: new connections fail, the existing one is untouched.
    proxy.refuse(true);
    assert!(
        within("a refused connection attempt", connect(&proxy.url()))
            .await
            .is_err(),
        "connected while refusing"
    );
    put_durable(&conn, &queue, b"still").await;
    proxy.refuse(false);
    let again = within("a connection after refusing", connect(&proxy.url()))
        .await
        .expect("connects once accepting again");
    let _ = again.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_cluster_together() {
    let started = std::time::Instant::now();
    let nodes = common::node::cluster("harness-c", 2).await;
    eprintln!("a cluster of 2 formed in {:?}", started.elapsed());
    let status = nodes[1].ctl(&["cluster_status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    for node in &nodes {
        assert!(status.contains(node.node_name()), "{status}");
    }
    assert_ne!(nodes[0].amqp_port(), nodes[1].amqp_port());
    // A queue declared through one node is visible through the other.
    let queue = unique("harness-cluster-q");
    let a = connect(&nodes[0].url()).await.expect("node 0");
    put_durable(&a, &queue, b"shared").await;
    let b = connect(&nodes[1].url()).await.expect("node 1");
    assert_eq!(get(&b, &queue).await.as_deref(), Some(&b"shared"[..]));
}
