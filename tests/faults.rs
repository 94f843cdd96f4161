//! Fault injection: how many confirmed events are lost (must be 0) and how
//! many are handled twice, under named faults.
//!
//! Every scenario publishes `FAULTS_N` events with unique ids and publisher
//! confirms (only confirmed ids count), runs the worker as a child process
//! (this binary re-executed, see `faults/worker.rs`) whose handler appends
//! each execution to a ledger file, injects its fault, waits (bounded) until
//! every confirmed id reached its end — handled, or in the dead-letter queue
//! when its handler must fail for good — and prints one line:
//!
//! ```text
//! FAULTS RESULT | <scenario> | N=.. | confirmed=.. | lost=.. | duplicates=.. | recovery=..
//! ```
//!
//! Recovery is the time from the end of a fault (the kill, the broker back,
//! the network healed, the alarm cleared) to the first event handled after it.
//!
//! The scenarios are `#[ignore]`d: they kill processes and brokers and take
//! minutes. `make faults` runs them (`FAULTS_N`, `FAULTS_KILLS` size them);
//! RELIABILITY.md records the figures. Scenarios 1, 4 and 6 use the shared
//! broker with unique names; 2, 3, 5 and 7 start RabbitMQ nodes of their own
//! (`common::node`), never touching the shared one.

mod common;

#[path = "faults/ledger.rs"]
mod ledger;
#[path = "faults/scenario.rs"]
mod scenario;
#[path = "faults/worker.rs"]
mod worker;

use std::{collections::HashMap, time::Duration};

use common::{Cleanup, amqp_url};
use scenario::*;
use worker::{Behaviour, CHILD_ENV, WorkerConfig, WorkerProcess};

/// The worker process of the scenarios: runs only when they start this
/// binary with `FAULTS_WORKER` set; otherwise there is nothing to do.
#[test]
#[ignore = "the worker child of the fault scenarios (started by them)"]
fn fault_worker_child() {
    match std::env::var(CHILD_ENV) {
        Ok(config) => worker::child_main(&config),
        Err(_) => eprintln!("{CHILD_ENV} is not set: not started by a fault scenario"),
    }
}

/// How long a worker may take to start consuming.
const WAIT_START: Duration = Duration::from_secs(60);

/// How long a scenario may take to settle after its faults.
fn settle_limit(n: usize) -> Duration {
    Duration::from_secs(120 + (n / 50) as u64)
}

fn behaviours(events: &[(String, worker::FaultEvent)]) -> HashMap<String, Behaviour> {
    events
        .iter()
        .map(|(id, e)| (id.clone(), e.behaviour))
        .collect()
}

// ---------------------------------------------------------------------------
// 1. The worker SIGKILLed at random moments
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault injection: make faults"]
async fn s1_worker_sigkilled_at_random_moments() {
    let profile = Profile::from_env();
    let mut ws = Workspace::new("s1-sigkill");
    let mut ledger = ws.ledger();
    let config = WorkerConfig::new("s1", &amqp_url(), ledger.path());
    let mut cleanup = Cleanup::new();
    cleanup.app(&config.settings());
    declare(&config, &config.url).await;

    let events = events(profile.n, |_| Behaviour::Ok);
    let behaviours = behaviours(&events);
    let publisher = publisher(&config, &config.url, Duration::from_secs(30)).await;
    let confirmed = Confirmed::default();
    let publishing = tokio::spawn(publish_all(
        publisher.clone(),
        events,
        256,
        confirmed.clone(),
    ));

    let mut worker = WorkerProcess::spawn(&config, &ws.log("worker"));
    let mut kills = Vec::new();
    // The faults strike at random points of the flow.
    for (k, point) in (1..).zip(fault_points(profile.n, profile.kills)) {
        wait_handled(&mut ledger, point, settle_limit(profile.n)).await;
        worker.assert_running();
        worker.kill();
        kills.push(now());
        ledger.refresh();
        println!(
            "kill {k}: SIGKILL with {} of {} confirmed events handled",
            ledger.handled().len(),
            confirmed.count()
        );
        // The supervisor (systemd, Kubernetes) starts it again.
        worker = WorkerProcess::spawn(&config, &ws.log("worker"));
        worker.consuming(&mut ledger, WAIT_START).await;
    }
    bounded("the publishing", settle_limit(profile.n), publishing)
        .await
        .expect("publishing task");
    let confirmed_ids = confirmed.ids();
    let tally = settle(
        &mut ledger,
        &confirmed_ids,
        &behaviours,
        None,
        settle_limit(profile.n),
    )
    .await;
    worker.assert_running();
    worker.terminate(Duration::from_secs(30)).await;
    publisher.close().await;

    let recovery = describe_recoveries(&recoveries(&ledger, &kills));
    report(
        &format!("1 worker SIGKILL x{}", profile.kills),
        profile.n,
        &tally,
        &recovery,
    );
    assert_eq!(
        confirmed.failed(),
        0,
        "publishing to a healthy broker fails"
    );
    assert!(tally.lost.is_empty(), "confirmed events lost: {tally:?}");
    ws.passed();
}

// ---------------------------------------------------------------------------
// 4. Handlers that panic and handlers that hang
// ---------------------------------------------------------------------------

/// One in 200 of each failing behaviour; hanging for good one in 400.
fn s4_behaviour(i: usize) -> Behaviour {
    match i % 400 {
        0 | 200 => Behaviour::PanicOnce,
        1 | 201 => Behaviour::PanicAlways,
        2 | 202 => Behaviour::HangOnce,
        3 => Behaviour::HangAlways,
        4 | 204 => Behaviour::FailOnce,
        5 | 205 => Behaviour::Permanent,
        _ => Behaviour::Ok,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault injection: make faults"]
async fn s4_handlers_that_panic_and_hang() {
    let profile = Profile::from_env();
    let mut ws = Workspace::new("s4-panic-hang");
    let mut ledger = ws.ledger();
    let mut config = WorkerConfig::new("s4", &amqp_url(), ledger.path());
    // A hang is a handler still running at the timeout; the ladder is short
    // so that the ones that always fail reach the dead-letter queue soon.
    config.handler_timeout_ms = 500;
    config.delays_ms = vec![200, 400];
    let settings = config.settings();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    declare(&config, &config.url).await;

    let events = events(profile.n, s4_behaviour);
    let behaviours = behaviours(&events);
    let started = now();
    let mut worker = WorkerProcess::spawn(&config, &ws.log("worker"));
    let publisher = publisher(&config, &config.url, Duration::from_secs(30)).await;
    let confirmed = Confirmed::default();
    publish_all(publisher.clone(), events, 256, confirmed.clone()).await;
    let inspector = Inspector::connect(&config.url).await;
    let confirmed_ids = confirmed.ids();
    let tally = settle(
        &mut ledger,
        &confirmed_ids,
        &behaviours,
        Some((&inspector, &settings.dead_letter_queue())),
        settle_limit(profile.n),
    )
    .await;
    worker.assert_running();
    worker.terminate(Duration::from_secs(30)).await;
    inspector.close().await;
    publisher.close().await;

    // The ones that fail once must have succeeded on a later attempt (they
    // went through the retry ladder), not on a redelivery of attempt 1.
    let mut not_retried = Vec::new();
    for id in &confirmed_ids {
        let once = matches!(
            behaviours[id],
            Behaviour::PanicOnce | Behaviour::HangOnce | Behaviour::FailOnce
        );
        if once
            && !ledger
                .executions(id)
                .iter()
                .any(|e| e.outcome == "ok" && e.attempt >= 2)
        {
            not_retried.push(id.clone());
        }
    }
    let recovery = format!(
        "all settled {} after the start",
        secs(ledger.last_success().unwrap_or(started) - started)
    );
    report("4 handler panics + hangs", profile.n, &tally, &recovery);
    assert!(tally.lost.is_empty(), "confirmed events lost: {tally:?}");
    assert!(
        tally.wrong_reason.is_empty(),
        "dead letters with the wrong reason: {:?}",
        tally.wrong_reason
    );
    assert!(
        not_retried.is_empty(),
        "events that fail once did not succeed on a retry: {not_retried:?}"
    );
    ws.passed();
}

// ---------------------------------------------------------------------------
// 6. SIGTERM under load: nothing lost, nothing twice
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fault injection: make faults"]
async fn s6_worker_sigterm_under_load() {
    let profile = Profile::from_env();
    let mut ws = Workspace::new("s6-sigterm");
    let mut ledger = ws.ledger();
    let config = WorkerConfig::new("s6", &amqp_url(), ledger.path());
    let mut cleanup = Cleanup::new();
    cleanup.app(&config.settings());
    declare(&config, &config.url).await;

    let events = events(profile.n, |_| Behaviour::Ok);
    let behaviours = behaviours(&events);
    let publisher = publisher(&config, &config.url, Duration::from_secs(30)).await;
    let confirmed = Confirmed::default();
    let publishing = tokio::spawn(publish_all(
        publisher.clone(),
        events,
        256,
        confirmed.clone(),
    ));

    let mut worker = WorkerProcess::spawn(&config, &ws.log("worker"));
    let mut stops = Vec::new();
    for (k, point) in (1..).zip(fault_points(profile.n, profile.kills)) {
        wait_handled(&mut ledger, point, settle_limit(profile.n)).await;
        worker.assert_running();
        let status = worker.terminate(Duration::from_secs(60)).await;
        stops.push(now());
        assert!(status.success(), "SIGTERM ends the worker with 0: {status}");
        ledger.refresh();
        println!(
            "stop {k}: SIGTERM drained with {} of {} confirmed events handled",
            ledger.handled().len(),
            confirmed.count()
        );
        worker = WorkerProcess::spawn(&config, &ws.log("worker"));
        worker.consuming(&mut ledger, WAIT_START).await;
    }
    bounded("the publishing", settle_limit(profile.n), publishing)
        .await
        .expect("publishing task");
    let confirmed_ids = confirmed.ids();
    let tally = settle(
        &mut ledger,
        &confirmed_ids,
        &behaviours,
        None,
        settle_limit(profile.n),
    )
    .await;
    worker.assert_running();
    worker.terminate(Duration::from_secs(60)).await;
    publisher.close().await;

    let recovery = describe_recoveries(&recoveries(&ledger, &stops));
    report(
        &format!("6 worker SIGTERM x{}", profile.kills),
        profile.n,
        &tally,
        &recovery,
    );
    assert_eq!(
        confirmed.failed(),
        0,
        "publishing to a healthy broker fails"
    );
    assert!(tally.lost.is_empty(), "confirmed events lost: {tally:?}");
    assert_eq!(
        tally.duplicates, 0,
        "a graceful stop must not hand any event twice: {tally:?}"
    );
    ws.passed();
}
