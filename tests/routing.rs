//! Events published to the exchange reach the subscribed apps' handlers.

mod common;

use burrow::{EventMeta, HandlerError, Registry, wire::derive_message_id};
use common::*;
use lapin::BasicProperties;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_event_reaches_the_typed_handler_with_its_context() {
    let settings = TestApp::new("routing").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let (tx, mut seen) = seen_channel();
    let mut registry = Registry::new();
    registry
        .on("library.record_card", move |event: CardAdded, ctx| {
            let tx = tx.clone();
            async move {
                tx.send(Seen { event, ctx }).unwrap();
                Ok::<_, HandlerError>(())
            }
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;

    let event = CardAdded::new("Dune");
    let message_id = unique("msg");
    let meta = EventMeta::default()
        .message_id(&message_id)
        .correlation_id("req-42")
        .causation_id("cmd-7");
    publisher
        .publish_with(&event, meta)
        .await
        .expect("publish is confirmed");

    let got = next_seen(&mut seen).await;
    assert_eq!(got.event, event, "the handler gets the decoded event");
    assert_eq!(got.ctx.message_id, message_id);
    assert_eq!(got.ctx.correlation_id.as_deref(), Some("req-42"));
    assert_eq!(got.ctx.causation_id.as_deref(), Some("cmd-7"));
    assert_eq!(got.ctx.event_type, "CardAddedToLibraryEvent");
    assert_eq!(got.ctx.attempt, 1);
    assert_eq!(&*got.ctx.handler, "library.record_card");

    let outcome = next_outcome(&mut outcomes).await;
    assert_eq!(outcome.message_id, message_id);
    assert_eq!(outcome.event_type, "CardAddedToLibraryEvent");
    assert_eq!(outcome.attempt, 1);
    assert_eq!(outcome.succeeded, vec!["library.record_card".to_string()]);
    assert_eq!(outcome.retried, None);
    assert_eq!(outcome.dead_lettered, None);
    assert!(!outcome.ignored);
    assert!(outcome.acked);

    // Without explicit ids: a fresh message id, used as correlation id too.
    let second = CardAdded::new("Solaris");
    publisher
        .publish(&second)
        .await
        .expect("publish is confirmed");
    let got = next_seen(&mut seen).await;
    assert_eq!(got.event, second);
    assert!(
        uuid::Uuid::parse_str(&got.ctx.message_id).is_ok(),
        "message id {:?} is a UUID",
        got.ctx.message_id
    );
    assert_eq!(
        got.ctx.correlation_id.as_deref(),
        Some(got.ctx.message_id.as_str())
    );
    assert_eq!(got.ctx.attempt, 1);

    publisher.close().await;
    let report = within("worker shutdown", worker.shutdown())
        .await
        .expect("clean shutdown");
    assert_eq!(report.settled, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_on_one_exchange_each_receive_the_event_once() {
    let a = TestApp::new("fanout-a").build();
    let b = TestApp::new("fanout-b").exchange(&a.amqp.exchange).build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&a).app(&b);

    let registry_for = |name: &'static str| {
        let (tx, rx) = seen_channel();
        let mut registry = Registry::new();
        registry
            .on(name, move |event: CardAdded, ctx| {
                let tx = tx.clone();
                async move {
                    tx.send(Seen { event, ctx }).unwrap();
                    Ok::<_, HandlerError>(())
                }
            })
            .unwrap();
        (registry, rx)
    };
    let (reg_a, mut seen_a) = registry_for("search.index_card");
    let (reg_b, mut seen_b) = registry_for("feeds.add_card");
    let (worker_a, mut out_a) = start_worker(a.clone(), reg_a).await;
    let (worker_b, mut out_b) = start_worker(b.clone(), reg_b).await;
    let publisher = publisher(&a).await;

    let event = CardAdded::new("Neuromancer");
    publisher
        .publish(&event)
        .await
        .expect("publish is confirmed");

    let got_a = next_seen(&mut seen_a).await;
    let got_b = next_seen(&mut seen_b).await;
    assert_eq!(got_a.event, event);
    assert_eq!(got_b.event, event);
    assert_eq!(
        got_a.ctx.message_id, got_b.ctx.message_id,
        "both apps see the same message"
    );
    let oa = next_outcome(&mut out_a).await;
    let ob = next_outcome(&mut out_b).await;
    assert_eq!(oa.succeeded, vec!["search.index_card".to_string()]);
    assert_eq!(ob.succeeded, vec!["feeds.add_card".to_string()]);
    assert!(oa.acked && ob.acked);

    publisher.close().await;
    let ra = within("worker a shutdown", worker_a.shutdown())
        .await
        .unwrap();
    let rb = within("worker b shutdown", worker_b.shutdown())
        .await
        .unwrap();
    assert_eq!(
        (ra.settled, rb.settled),
        (1, 1),
        "each app handled exactly one delivery"
    );
    assert!(
        seen_a.try_recv().is_err() && seen_b.try_recv().is_err(),
        "no second invocation"
    );
}

/// Like amqplib's `channel.publish(exchange, key, Buffer.from(json), { persistent: true })`:
/// no message id, no type, no headers, no content type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_properties_is_handled_with_a_derived_message_id() {
    let settings = TestApp::new("bare").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);

    let (tx, mut seen) = seen_channel();
    let mut registry = Registry::new();
    registry
        .on("library.record_card", move |event: CardAdded, ctx| {
            let tx = tx.clone();
            async move {
                tx.send(Seen { event, ctx }).unwrap();
                Ok::<_, HandlerError>(())
            }
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let raw = Raw::connect().await;

    let event = CardAdded::new("Hyperion");
    let body = serde_json::to_vec(&event).unwrap();
    raw.publish(
        &settings.amqp.exchange,
        "CardAddedToLibraryEvent",
        &body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await;

    let got = next_seen(&mut seen).await;
    assert_eq!(got.event, event);
    assert!(
        got.ctx.message_id.starts_with("derived-"),
        "message id {:?}",
        got.ctx.message_id
    );
    assert_eq!(
        got.ctx.message_id,
        derive_message_id("CardAddedToLibraryEvent", &body),
        "the derived id is stable"
    );
    assert_eq!(got.ctx.correlation_id, None);
    assert_eq!(got.ctx.event_type, "CardAddedToLibraryEvent");
    assert_eq!(got.ctx.attempt, 1);

    let outcome = next_outcome(&mut outcomes).await;
    assert_eq!(outcome.message_id, got.ctx.message_id);
    assert_eq!(outcome.succeeded, vec!["library.record_card".to_string()]);
    assert!(outcome.acked);

    raw.close().await;
    within("worker shutdown", worker.shutdown()).await.unwrap();
}
