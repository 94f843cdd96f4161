//! Ordered apps against a real RabbitMQ (with the consistent-hash exchange
//! plugin, which `make test`'s broker scripts enable): every aggregate's
//! events are handled in publish order while aggregates run in parallel on
//! several instances, through transient failures and an instance killed
//! mid-run; a dead-lettered event says it broke its aggregate's order.

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use burrow::{DomainEvent, Event, HandlerError, Registry, Settings, Worker, config::AmqpUrl, dlq};
use chrono::{DateTime, Utc};
use common::{proxy::Proxy, *};
use serde::{Deserialize, Serialize};

const AGGREGATES: usize = 1000;
const STEPS: u32 = 10;

/// One step of an aggregate's life, numbered.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CardMoved {
    aggregate_id: String,
    seq: u32,
    occurred_at: DateTime<Utc>,
}

impl Event for CardMoved {
    const EVENT_TYPE: &'static str = "CardMovedEvent";
}

impl DomainEvent for CardMoved {
    fn aggregate_id(&self) -> String {
        self.aggregate_id.clone()
    }
    fn occurred_at(&self) -> DateTime<Utc> {
        self.occurred_at
    }
}

/// What the handlers saw: each aggregate's steps in the order handled.
#[derive(Default, Clone)]
struct Seen {
    steps: Arc<Mutex<HashMap<String, Vec<u32>>>>,
    handled: Arc<AtomicUsize>,
}

fn settings(prefix: &str) -> Settings {
    let mut settings = TestApp::new(prefix).delays_ms(&[50, 100]).build();
    settings.ordering.shards = 8;
    settings.consumer.concurrency = 64;
    settings.consumer.prefetch = 128;
    settings
}

/// A registry whose handler records each step and fails transiently once
/// on step 3 of every 20th aggregate, and for good on `broken` steps.
fn registry(seen: &Seen, broken: Option<(String, u32)>) -> Registry {
    let seen = seen.clone();
    let mut registry = Registry::new();
    registry
        .on("library.project_card", move |e: CardMoved, ctx| {
            let (seen, broken) = (seen.clone(), broken.clone());
            async move {
                let index: usize = e.aggregate_id.rsplit('-').next().unwrap().parse().unwrap();
                if index.is_multiple_of(20) && e.seq == 3 && ctx.attempt == 1 {
                    return Err(HandlerError::transient("the projection store is busy"));
                }
                if broken == Some((e.aggregate_id.clone(), e.seq)) {
                    return Err(HandlerError::permanent("this step cannot be projected"));
                }
                seen.steps
                    .lock()
                    .unwrap()
                    .entry(e.aggregate_id)
                    .or_default()
                    .push(e.seq);
                seen.handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        })
        .unwrap();
    registry
}

async fn start(settings: &Settings, registry: Registry) -> TestWorker {
    let mut worker = TestWorker::new(Worker::new(settings.clone(), registry).unwrap().spawn());
    within("the worker to consume", worker.consuming())
        .await
        .expect("consuming");
    worker
}

fn aggregate(run: &str, i: usize) -> String {
    format!("card-{run}-{i}")
}

/// Publishes step `seq` of every aggregate (concurrently, one per
/// aggregate), confirmed before the next step goes out.
async fn publish_step(publisher: &burrow::Publisher, run: &str, seq: u32) {
    let events: Vec<CardMoved> = (0..AGGREGATES)
        .map(|i| CardMoved {
            aggregate_id: aggregate(run, i),
            seq,
            occurred_at: Utc::now(),
        })
        .collect();
    within(
        "a step of every aggregate",
        publisher.publish_batch(&events),
    )
    .await
    .expect("confirmed");
}

/// The steps in first-handled order, repeats (redeliveries after the kill)
/// left out.
fn first_seen(steps: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    for s in steps {
        if !out.contains(s) {
            out.push(*s);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_aggregate_in_publish_order_across_instances_through_failures_and_a_kill() {
    let settings = settings("ordered");
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let seen = Seen::default();
    // Instance 0 reaches the broker through a proxy, to be killed: its
    // connection cut and no new one let through.
    let proxy = Proxy::start(common::proxy::shared_broker_addr()).await;
    let mut doomed = settings.clone();
    doomed.amqp.url = AmqpUrl::new(proxy.url());
    let _killed = start(&doomed, registry(&seen, None)).await;
    let _others = [
        start(&settings, registry(&seen, None)).await,
        start(&settings, registry(&seen, None)).await,
    ];
    let publisher = publisher(&settings).await;
    let run = &unique("r")[2..10];

    for seq in 0..STEPS {
        publish_step(&publisher, run, seq).await;
        if seq == 4 {
            // Mid-run: instance 0 dies with deliveries in hand.
            eventually("some events to be handled before the kill", || async {
                match seen.handled.load(Ordering::SeqCst) {
                    n if n >= AGGREGATES * 2 => Ok(()),
                    n => Err(format!("{n} handled")),
                }
            })
            .await;
            proxy.refuse(true);
            proxy.cut();
        }
    }

    let all = AGGREGATES * STEPS as usize;
    eventually_within(
        "every event to be handled",
        Duration::from_secs(180),
        || async {
            let steps = seen.steps.lock().unwrap();
            let complete = steps
                .values()
                .filter(|s| first_seen(s).len() == STEPS as usize)
                .count();
            if complete == AGGREGATES {
                Ok(())
            } else {
                Err(format!(
                    "{complete} of {AGGREGATES} aggregates complete, {} runs",
                    seen.handled.load(Ordering::SeqCst)
                ))
            }
        },
    )
    .await;

    let steps = seen.steps.lock().unwrap().clone();
    let expected: Vec<u32> = (0..STEPS).collect();
    let mut repeated = 0;
    for i in 0..AGGREGATES {
        let handled = &steps[&aggregate(run, i)];
        assert_eq!(
            first_seen(handled),
            expected,
            "aggregate {i} out of order: {handled:?}"
        );
        repeated += handled.len() - STEPS as usize;
    }
    println!(
        "{all} events, {} runs, {repeated} repeated after the kill",
        seen.handled.load(Ordering::SeqCst)
    );
    assert_eq!(
        within("dlq count", dlq::count(&settings)).await.unwrap(),
        0,
        "a transient failure is retried in place, not dead-lettered"
    );
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_event_says_it_left_its_aggregates_order() {
    let settings = settings("ordered-dead");
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let seen = Seen::default();
    let run = &unique("r")[2..10];
    let broken = aggregate(run, 1);
    let mut worker = start(&settings, registry(&seen, Some((broken.clone(), 1)))).await;
    let publisher = publisher(&settings).await;
    for seq in 0..3 {
        let event = CardMoved {
            aggregate_id: broken.clone(),
            seq,
            occurred_at: Utc::now(),
        };
        within("publish", publisher.publish(&event)).await.unwrap();
    }
    eventually("the later steps to run after the broken one", || async {
        match seen.steps.lock().unwrap().get(&broken) {
            Some(s) if s == &vec![0, 2] => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let letters = within("dlq list", dlq::list(&settings, 10)).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:#?}");
    let error = letters[0].last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains("this step cannot be projected") && error.contains("ordered"),
        "{error}"
    );
    publisher.close().await;
    worker.stop().await.expect("worker stops");
}
