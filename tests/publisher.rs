//! The confirmed publisher: unroutable events are errors, not silent drops.

mod common;

use std::time::Duration;

use burrow::{Error, HandlerError, Registry, Topology, config::AmqpUrl};
use common::{proxy::Proxy, *};

/// Declares the app's topology (exchange, queues, a binding for
/// `CardAddedToLibraryEvent`) without running a worker.
async fn declare(settings: &burrow::Settings) {
    let mut registry = Registry::new();
    registry
        .on("library.record_card", |_: CardAdded, _| async {
            Ok::<_, HandlerError>(())
        })
        .unwrap();
    let raw = Raw::connect().await;
    within(
        "topology declare",
        burrow::internals::declare(&Topology::for_app(settings, &registry), &raw.conn),
    )
    .await
    .expect("topology declares");
    raw.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_an_event_nobody_binds_is_unroutable() {
    let settings = TestApp::new("unroutable").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    declare(&settings).await;
    let publisher = publisher(&settings).await;
    let raw = Raw::connect().await;

    let err = publisher
        .publish(&NobodyListens::new())
        .await
        .expect_err("an event no queue is bound for must not be reported as published");
    match &err {
        Error::Unroutable {
            exchange,
            routing_key,
            reply,
        } => {
            assert_eq!(exchange, &settings.amqp.exchange);
            assert_eq!(routing_key, "NobodyListensEvent");
            assert_eq!(reply, "NO_ROUTE");
        }
        other => panic!("expected Error::Unroutable, got {other:?}"),
    }
    assert!(!err.is_retryable());
    let text = err.to_string();
    assert!(
        text.contains("NobodyListensEvent") && text.contains(&settings.amqp.exchange),
        "{text}"
    );

    // A bound event type on the same publisher still goes through, and
    // lands in the app queue.
    let event = CardAdded::new("Accelerando");
    publisher
        .publish(&event)
        .await
        .expect("a bound event is confirmed");
    let delivered = raw.wait_get(&settings.app_queue()).await;
    assert_eq!(
        serde_json::from_slice::<CardAdded>(&delivered.data).unwrap(),
        event
    );
    assert_eq!(delivered.routing_key.as_str(), "CardAddedToLibraryEvent");
    assert_eq!(
        delivered.properties.kind().as_ref().map(|s| s.as_str()),
        Some("CardAddedToLibraryEvent")
    );
    assert_eq!(
        delivered
            .properties
            .content_type()
            .as_ref()
            .map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(*delivered.properties.delivery_mode(), Some(2));
    let message_id = delivered
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .expect("a message id");
    assert_eq!(
        delivered
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some(message_id.as_str()),
        "the correlation id defaults to the message id"
    );
    assert_eq!(
        delivered.properties.app_id().as_ref().map(|s| s.as_str()),
        Some(settings.app.name.as_str())
    );
    // Version 1 is the contract's default and is not sent: the only header
    // of a plain event is its aggregate id (what ordered apps shard on),
    // beside what the broker adds itself (a quorum queue's x-delivery-count).
    let sent: Vec<String> = delivered
        .properties
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .keys()
                .map(|k| k.to_string())
                .filter(|k| !k.starts_with("x-"))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        sent,
        vec!["burrow-aggregate-id".to_owned()],
        "headers sent with a version-1 event"
    );
    assert_eq!(
        header_str(&delivered.properties, "burrow-aggregate-id").as_deref(),
        Some(event.aggregate_id.as_str())
    );

    // A causation id still travels as a header, and the version stays
    // unsent (absent reads as 1).
    publisher
        .publish_with(&event, burrow::EventMeta::default().causation_id("cmd-1"))
        .await
        .expect("a bound event is confirmed");
    let caused = raw.wait_get(&settings.app_queue()).await;
    assert_eq!(
        header_str(&caused.properties, "burrow-causation-id").as_deref(),
        Some("cmd-1")
    );
    assert_eq!(header_i64(&caused.properties, "burrow-event-version"), None);

    raw.close().await;
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reports_the_index_of_each_unroutable_event() {
    let settings = TestApp::new("batch").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    declare(&settings).await;
    let publisher = publisher(&settings).await;
    let raw = Raw::connect().await;

    // `publish_batch` is generic over one event type, so every entry shares
    // one routing key: a batch with an unroutable entry is a batch of them.
    let err = publisher
        .publish_batch(&[NobodyListens::new()])
        .await
        .expect_err("the unroutable entry fails the batch");
    match &err {
        Error::Batch { total, failed } => {
            assert_eq!(*total, 1);
            assert_eq!(failed.len(), 1);
            assert_eq!(failed[0].0, 0, "the failure names index 0");
            assert!(
                matches!(&failed[0].1, Error::Unroutable { routing_key, .. } if routing_key == "NobodyListensEvent"),
                "{:?}",
                failed[0].1
            );
        }
        other => panic!("expected Error::Batch, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("1 of 1") && text.contains("index 0") && text.contains("NobodyListensEvent"),
        "{text}"
    );

    let err = publisher
        .publish_batch(&[
            NobodyListens::new(),
            NobodyListens::new(),
            NobodyListens::new(),
        ])
        .await
        .expect_err("every entry is unroutable");
    match &err {
        Error::Batch { total, failed } => {
            assert_eq!(*total, 3);
            let indices: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
            assert_eq!(indices, vec![0, 1, 2]);
            assert!(
                failed
                    .iter()
                    .all(|(_, e)| matches!(e, Error::Unroutable { .. }))
            );
        }
        other => panic!("expected Error::Batch, got {other:?}"),
    }
    assert!(
        !err.is_retryable(),
        "a batch of unroutable events is not retryable"
    );

    // A routable batch is confirmed in full.
    let events = [
        CardAdded::new("one"),
        CardAdded::new("two"),
        CardAdded::new("three"),
    ];
    publisher
        .publish_batch(&events)
        .await
        .expect("a routable batch is confirmed");
    let mut titles = Vec::new();
    for _ in 0..3 {
        let d = raw.wait_get(&settings.app_queue()).await;
        titles.push(serde_json::from_slice::<CardAdded>(&d.data).unwrap().title);
    }
    titles.sort();
    assert_eq!(titles, vec!["one", "three", "two"]);

    raw.close().await;
    publisher.close().await;
}

/// A publish on a connection that went silent ends with the publisher's
/// confirm timeout; it does not wait for ever in the pool checkout (opening
/// a channel or a connection through the silence) or the frame write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_through_a_silent_network_ends_at_the_confirm_timeout() {
    let proxy = Proxy::start(common::proxy::shared_broker_addr()).await;
    let mut settings = TestApp::new("silent").build();
    settings.amqp.url = AmqpUrl::new(proxy.url());
    // Longer than the confirm timeout: only the publish's own deadline can
    // end the wait first.
    settings.amqp.heartbeat = 30;
    settings.publisher.confirm_timeout = Duration::from_secs(3);
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    declare(&settings).await;
    let publisher = publisher(&settings).await;
    publisher
        .publish(&CardAdded::new("before"))
        .await
        .expect("confirmed before the fault");

    // The pooled channel is gone with its connection, and the new
    // connection's handshake meets a network that carries nothing.
    proxy.cut();
    proxy.blackhole(true);
    let err = within(
        "a publish through a blackhole to give up",
        publisher.publish(&CardAdded::new("into the silence")),
    )
    .await
    .expect_err("nothing can be confirmed through a blackhole");
    assert!(
        matches!(err, Error::ConfirmTimeout { .. }),
        "expected Error::ConfirmTimeout, got {err:?}"
    );
    assert!(err.is_retryable(), "the caller may publish it again: {err}");

    // Once the network carries bytes again the same publisher recovers.
    proxy.blackhole(false);
    let raw = Raw::connect().await;
    eventually("a publish after the blackhole to be confirmed", || async {
        publisher.publish(&CardAdded::new("after")).await
    })
    .await;
    let mut titles = Vec::new();
    while titles.len() < 2 {
        let d = raw.wait_get(&settings.app_queue()).await;
        let title = serde_json::from_slice::<CardAdded>(&d.data).unwrap().title;
        if title != "into the silence" {
            titles.push(title);
        }
    }
    titles.sort();
    assert_eq!(titles, vec!["after", "before"]);
    raw.close().await;
    publisher.close().await;
}

/// Opening a connection to a socket that accepts and then stays silent
/// fails with the connect timeout, naming the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_a_silent_broker_fails_at_the_connect_timeout() {
    let proxy = Proxy::start(common::proxy::shared_broker_addr()).await;
    proxy.blackhole(true);
    let url = AmqpUrl::new(format!("{}?connection_timeout=1000", proxy.url()));
    let err = within(
        "a connect through a blackhole to give up",
        burrow::internals::connect(&url, 30, "burrow silent-broker test"),
    )
    .await
    .expect_err("no handshake can finish through a blackhole");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("handshake") && text.contains("1s"), "{text}");
    assert!(err.is_retryable(), "{err}");
}
