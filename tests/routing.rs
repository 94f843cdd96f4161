//! Events published to the exchange reach the subscribed apps' handlers.

mod common;

use burrow::{EventMeta, wire::derive_message_id};
use common::{recorder::Recorder, *};
use lapin::BasicProperties;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_event_reaches_the_typed_handler_with_its_context() {
    let mut rec = Recorder::start("routing").await;

    let event = CardAdded::new("Dune");
    let message_id = unique("msg");
    let meta = EventMeta::default()
        .message_id(&message_id)
        .correlation_id("req-42")
        .causation_id("cmd-7");
    rec.publisher
        .publish_with(&event, meta)
        .await
        .expect("publish is confirmed");

    let got = rec.next_seen().await;
    assert_eq!(got.event, event, "the handler gets the decoded event");
    assert_eq!(got.ctx.message_id, message_id);
    assert_eq!(got.ctx.correlation_id.as_deref(), Some("req-42"));
    assert_eq!(got.ctx.causation_id.as_deref(), Some("cmd-7"));
    assert_eq!(got.ctx.event_type, "CardAddedToLibraryEvent");
    assert_eq!(got.ctx.attempt, 1);
    assert_eq!(&*got.ctx.handler, "library.record_card");

    let outcome = rec.next_outcome().await;
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
    rec.publisher
        .publish(&second)
        .await
        .expect("publish is confirmed");
    let got = rec.next_seen().await;
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

    let report = rec.stop().await;
    assert_eq!(report.settled, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_on_one_exchange_each_receive_the_event_once() {
    let mut a = Recorder::build("fanout-a")
        .handler("search.index_card")
        .start()
        .await;
    // One cleanup for both apps, which share the exchange.
    let b_settings = TestApp::new("fanout-b")
        .exchange(&a.settings.amqp.exchange)
        .build();
    a.cleanup.app(&b_settings);
    let mut b = Recorder::with_settings(b_settings)
        .handler("feeds.add_card")
        .without_cleanup()
        .start()
        .await;

    let event = CardAdded::new("Neuromancer");
    a.publisher
        .publish(&event)
        .await
        .expect("publish is confirmed");

    let got_a = a.next_seen().await;
    let got_b = b.next_seen().await;
    assert_eq!(got_a.event, event);
    assert_eq!(got_b.event, event);
    assert_eq!(
        got_a.ctx.message_id, got_b.ctx.message_id,
        "both apps see the same message"
    );
    let oa = a.next_outcome().await;
    let ob = b.next_outcome().await;
    assert_eq!(oa.succeeded, vec!["search.index_card".to_string()]);
    assert_eq!(ob.succeeded, vec!["feeds.add_card".to_string()]);
    assert!(oa.acked && ob.acked);

    let ra = a.stop().await;
    let rb = b.stop().await;
    assert_eq!(
        (ra.settled, rb.settled),
        (1, 1),
        "each app handled exactly one delivery"
    );
    assert!(
        a.seen.try_recv().is_err() && b.seen.try_recv().is_err(),
        "no second invocation"
    );
}

/// Like amqplib's `channel.publish(exchange, key, Buffer.from(json), { persistent: true })`:
/// no message id, no type, no headers, no content type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_properties_is_handled_with_a_derived_message_id() {
    let mut rec = Recorder::start("bare").await;
    let raw = Raw::connect().await;

    let event = CardAdded::new("Hyperion");
    let body = serde_json::to_vec(&event).unwrap();
    raw.publish(
        &rec.settings.amqp.exchange,
        "CardAddedToLibraryEvent",
        &body,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await;

    let got = rec.next_seen().await;
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

    let outcome = rec.next_outcome().await;
    assert_eq!(outcome.message_id, got.ctx.message_id);
    assert_eq!(outcome.succeeded, vec!["library.record_card".to_string()]);
    assert!(outcome.acked);

    raw.close().await;
    rec.stop().await;
}
