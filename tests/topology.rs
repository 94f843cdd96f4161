//! Declaring the topology against what already exists on the broker.

mod common;

use burrow::{Error, HandlerError, Registry, Topology, Worker};
use common::*;
use lapin::{
    options::QueueDeclareOptions,
    types::{AMQPValue, FieldTable},
};

fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .on("library.record_card", |_: CardAdded, _| async {
            Ok::<_, HandlerError>(())
        })
        .unwrap();
    registry
}

/// Declares `queue` as a plain durable classic queue, as a pre-burrow
/// service would have.
async fn predeclare_classic(raw: &Raw, queue: &str) {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    raw.channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
        .await
        .expect("classic queue declared");
}

fn assert_queue_type_mismatch(err: &Error, queue: &str) {
    let text = err.to_string();
    let Error::TopologyMismatch {
        kind,
        name,
        argument,
        declared,
        existing,
    } = err
    else {
        panic!("expected Error::TopologyMismatch, got {err:?}");
    };
    assert_eq!(*kind, "queue");
    assert_eq!(name, queue);
    assert!(
        !err.is_retryable(),
        "a mismatch needs a person, not a retry"
    );
    assert!(text.contains(queue), "the message names the queue: {text}");
    assert!(
        text.contains("migrate"),
        "the message says how to migrate: {text}"
    );
    // The root cause is the queue type: a classic queue cannot become a
    // quorum queue, whatever other argument RabbitMQ happens to compare first.
    assert_eq!(
        argument, "x-queue-type",
        "the mismatch must name the argument at fault; message: {text}"
    );
    assert!(declared.contains("quorum"), "declared = {declared:?}");
    assert!(existing.contains("classic"), "existing = {existing:?}");
    assert!(
        text.contains("x-queue-type"),
        "the message names the argument: {text}"
    );
    assert!(
        text.contains("quorum") && text.contains("classic"),
        "the message has both values: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_over_a_classic_app_queue_is_a_topology_mismatch() {
    let settings = TestApp::new("mismatch").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let raw = Raw::connect().await;
    predeclare_classic(&raw, &settings.app_queue()).await;

    let topology = Topology::for_app(&settings, &registry());
    let declare_err = within(
        "topology declare",
        burrow::internals::declare(&topology, &raw.conn),
    )
    .await
    .expect_err("a classic queue cannot become a quorum queue");

    // The worker refuses to start with the same error.
    let mut handle = TestWorker::new(Worker::new(settings.clone(), registry()).unwrap().spawn());
    assert!(
        within("the worker to give up", handle.consuming())
            .await
            .is_err(),
        "the worker must not consume"
    );
    let worker_err = within("the worker to stop", handle.join())
        .await
        .expect_err("the worker fails");

    // The pre-existing queue is untouched (still there, still classic).
    let ch = raw.conn.create_channel().await.unwrap();
    ch.queue_declare(
        settings.app_queue().as_str().into(),
        QueueDeclareOptions::durable(),
        {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("classic".into()),
            );
            args
        },
    )
    .await
    .expect("the queue is still the classic one");
    raw.close().await;

    assert_queue_type_mismatch(&declare_err, &settings.app_queue());
    assert_queue_type_mismatch(&worker_err, &settings.app_queue());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declaring_twice_is_idempotent() {
    let settings = TestApp::new("idempotent").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let raw = Raw::connect().await;

    let topology = Topology::for_app(&settings, &registry());
    within(
        "first declare",
        burrow::internals::declare(&topology, &raw.conn),
    )
    .await
    .expect("first declare");
    within(
        "second declare",
        burrow::internals::declare(&topology, &raw.conn),
    )
    .await
    .expect("second declare");

    // Every queue exists and is empty; the binding routes the event type.
    for q in &topology.queues {
        assert_eq!(raw.message_count(&q.name).await, 0, "queue {}", q.name);
    }
    let publisher = publisher(&settings).await;
    publisher
        .publish(&CardAdded::new("Anathem"))
        .await
        .expect("routed to the app queue");
    raw.wait_get(&settings.app_queue()).await;
    publisher.close().await;
    raw.close().await;
}

/// A retry step declared by an earlier burrow (no `x-delivery-limit`) is
/// kept: RabbitMQ cannot add the argument to it, and a retry step needs none.
/// A worker upgraded in place must still start, and verify reports no drift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_steps_an_earlier_burrow_declared_are_kept() {
    let settings = TestApp::new("legacy-retry").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let topology = Topology::for_app(&settings, &registry());
    let raw = Raw::connect().await;
    let retry = topology
        .queues
        .iter()
        .find(|q| matches!(q.role, burrow::QueueRole::Retry(_)))
        .expect("a retry step");
    // The step as an earlier burrow declared it: without x-delivery-limit.
    let mut older = retry.clone();
    older.arguments.remove("x-delivery-limit");
    let args = older.argument_table().expect("valid arguments");
    raw.channel
        .queue_declare(
            retry.name.as_str().into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .expect("the retry step as an earlier burrow declared it");

    within(
        "declare over it",
        burrow::internals::declare(&topology, &raw.conn),
    )
    .await
    .expect("an upgraded worker starts over the older retry step");
    let drifts = within("verify", topology.verify(&settings.amqp))
        .await
        .expect("verify runs");
    assert!(drifts.is_empty(), "{drifts:?}");
    raw.close().await;
}
