//! Broadcast handlers against a real RabbitMQ: every running instance of an
//! app gets every event, from a queue of its own; an instance that restarts
//! resumes with what is published after; failures are retried in the worker,
//! never through the ladder or the dead-letter queue.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use burrow::{EventMeta, HandlerError, Registry, Settings, Worker, config::AmqpUrl};
use common::{proxy::Proxy, *};

/// (instance, message id) of every broadcast run, and the message ids the
/// app-queue handler ran for.
#[derive(Default, Clone)]
struct Seen {
    broadcast: Arc<Mutex<Vec<(usize, String)>>>,
    once: Arc<Mutex<Vec<String>>>,
}

impl Seen {
    fn of(&self, instance: usize) -> Vec<String> {
        self.broadcast
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _)| *i == instance)
            .map(|(_, id)| id.clone())
            .collect()
    }
}

/// A registry for `instance`: a broadcast handler and an ordinary one.
fn registry(instance: usize, seen: &Seen) -> Registry {
    let mut registry = Registry::new();
    let broadcast = seen.broadcast.clone();
    registry
        .on("cache.evict_card", move |_: CardAdded, ctx| {
            let broadcast = broadcast.clone();
            async move {
                broadcast.lock().unwrap().push((instance, ctx.message_id));
                Ok::<_, HandlerError>(())
            }
        })
        .unwrap()
        .broadcast("cache.evict_card")
        .unwrap();
    let once = seen.once.clone();
    registry
        .on("library.record_card", move |_: CardAdded, ctx| {
            let once = once.clone();
            async move {
                once.lock().unwrap().push(ctx.message_id);
                Ok::<_, HandlerError>(())
            }
        })
        .unwrap();
    registry
}

async fn start(settings: &Settings, registry: Registry) -> (TestWorker, burrow::Metrics) {
    let worker = Worker::new(settings.clone(), registry).expect("worker");
    let metrics = worker.metrics().clone();
    let mut worker = TestWorker::new(worker.spawn());
    within("the worker to consume", worker.consuming())
        .await
        .expect("consuming");
    (worker, metrics)
}

async fn publish(publisher: &burrow::Publisher, label: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let id = unique(label);
        within(
            "publish",
            publisher.publish_with(&CardAdded::new(label), EventMeta::default().message_id(&id)),
        )
        .await
        .unwrap();
        ids.push(id);
    }
    ids
}

/// Waits until instance `i` has seen `ids` (its queue is FIFO: when the
/// last has arrived, so has everything published before it).
async fn wait_seen(seen: &Seen, i: usize, ids: &[String]) {
    eventually(
        &format!("instance {i} to see {} events", ids.len()),
        || async {
            let got = seen.of(i);
            match ids.iter().filter(|id| !got.contains(id)).count() {
                0 => Ok(()),
                missing => Err(format!("{missing} missing")),
            }
        },
    )
    .await;
}

fn counts(ids: &[String]) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for id in ids {
        *counts.entry(id.as_str()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_running_instance_sees_every_event_once_and_a_restarted_one_resumes() {
    let settings = TestApp::new("broadcast").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let seen = Seen::default();
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(start(&settings, registry(i, &seen)).await.0);
    }
    let publisher = publisher(&settings).await;

    let first = publish(&publisher, "first", 10).await;
    for i in 0..3 {
        wait_seen(&seen, i, &first).await;
        let got = seen.of(i);
        assert_eq!(got.len(), first.len(), "instance {i}: {got:?}");
        assert!(
            counts(&got).values().all(|n| *n == 1),
            "instance {i} twice: {got:?}"
        );
    }

    // Instance 2 stops; what is published meanwhile is not for it. Its
    // replacement (instance 3) gets what comes after it started.
    workers.remove(2).stop().await.expect("instance 2 stops");
    let while_down = publish(&publisher, "down", 5).await;
    workers.push(start(&settings, registry(3, &seen)).await.0);
    let after = publish(&publisher, "after", 5).await;
    for i in [0, 1] {
        let all: Vec<String> = [first.clone(), while_down.clone(), after.clone()].concat();
        wait_seen(&seen, i, &all).await;
        let got = seen.of(i);
        assert_eq!(got.len(), all.len(), "instance {i}: {got:?}");
    }
    wait_seen(&seen, 3, &after).await;
    let resumed = seen.of(3);
    assert_eq!(
        resumed, after,
        "the new instance sees what came after its start, once, in order"
    );
    assert_eq!(
        seen.of(2).len(),
        first.len(),
        "a stopped instance sees nothing more"
    );

    // The app queue's handler ran once per event, across the instances.
    let all: Vec<String> = [first, while_down, after].concat();
    eventually("the app-queue handler to run for every event", || async {
        let once = seen.once.lock().unwrap().clone();
        match all.iter().filter(|id| !once.contains(id)).count() {
            0 => Ok(()),
            missing => Err(format!("{missing} missing")),
        }
    })
    .await;
    let once = seen.once.lock().unwrap().clone();
    assert_eq!(once.len(), all.len(), "{once:?}");

    // The instances' queues went with their connections.
    for mut w in workers {
        w.stop().await.expect("worker stops");
    }
    publisher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_broadcast_handler_is_retried_in_the_worker_and_never_dead_lettered() {
    let settings = TestApp::new("broadcast-fail").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let attempts = Arc::new(Mutex::new(Vec::<(String, u32)>::new()));
    let mut registry = Registry::new();
    {
        let attempts = attempts.clone();
        registry
            .on("cache.evict_card", move |event: CardAdded, ctx| {
                let attempts = attempts.clone();
                async move {
                    attempts
                        .lock()
                        .unwrap()
                        .push((event.title.clone(), ctx.attempt));
                    match (event.title.as_str(), ctx.attempt) {
                        ("flaky", 1) => Err(HandlerError::transient("the cache is restarting")),
                        ("broken", _) => {
                            Err(HandlerError::permanent("this card cannot be evicted"))
                        }
                        _ => Ok(()),
                    }
                }
            })
            .unwrap()
            .broadcast("cache.evict_card")
            .unwrap();
    }
    let (mut worker, metrics) = start(&settings, registry).await;
    let publisher = publisher(&settings).await;
    let raw = Raw::connect().await;
    for title in ["flaky", "broken", "fine"] {
        within("publish", publisher.publish(&CardAdded::new(title)))
            .await
            .unwrap();
    }
    eventually("the three events to be handled or dropped", || async {
        let text = metrics.render();
        let dropped = common::bin::metric(
            &text,
            "burrow_broadcast_dropped_total",
            &[("handler", "cache.evict_card")],
        );
        let done = attempts
            .lock()
            .unwrap()
            .iter()
            .any(|(t, a)| t == "flaky" && *a == 2)
            && attempts.lock().unwrap().iter().any(|(t, _)| t == "fine");
        if dropped == 1.0 && done {
            Ok(())
        } else {
            Err(format!(
                "dropped {dropped}, attempts {:?}",
                attempts.lock().unwrap()
            ))
        }
    })
    .await;
    let seen = attempts.lock().unwrap().clone();
    assert_eq!(
        seen.iter()
            .filter(|(t, _)| t == "flaky")
            .map(|(_, a)| *a)
            .collect::<Vec<_>>(),
        vec![1, 2],
        "retried once, in the worker: {seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|(t, _)| t == "broken").count(),
        1,
        "a permanent failure is not retried: {seen:?}"
    );
    // Nothing went to the ladder or the dead-letter queue.
    for step in burrow::RetryLadder::new(&settings.app_queue(), &settings.retry.delays).steps() {
        assert_eq!(
            ready_count(&raw.conn, &step.queue).await,
            0,
            "{}",
            step.queue
        );
    }
    assert_eq!(
        ready_count(&raw.conn, &settings.dead_letter_queue()).await,
        0
    );
    raw.close().await;
    publisher.close().await;
    worker.stop().await.expect("worker stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_counted_as_a_broadcast_gap() {
    let proxy = Proxy::start(common::proxy::shared_broker_addr()).await;
    let mut settings = TestApp::new("broadcast-gap").build();
    settings.amqp.url = AmqpUrl::new(proxy.url());
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let seen = Seen::default();
    let (mut worker, metrics) = start(&settings, registry(0, &seen)).await;
    let gaps = |text: &str| {
        common::bin::metric(
            text,
            "burrow_broadcast_gaps_total",
            &[("queue", settings.app_queue().as_str())],
        )
    };
    assert_eq!(gaps(&metrics.render()), 0.0, "exported at 0 from the start");
    proxy.cut();
    eventually("the gap to be counted after the reconnect", || async {
        match gaps(&metrics.render()) {
            1.0 => Ok(()),
            n => Err(format!("{n} gaps")),
        }
    })
    .await;
    // And the instance receives again.
    let mut direct = settings.clone();
    direct.amqp.url = AmqpUrl::new(amqp_url());
    let publisher = publisher(&direct).await;
    let after = publish(&publisher, "after-gap", 3).await;
    wait_seen(&seen, 0, &after).await;
    publisher.close().await;
    worker.stop().await.expect("worker stops");
}
