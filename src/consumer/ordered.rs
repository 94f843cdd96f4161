//! Ordered apps (`[ordering] shards = N`): one aggregate's events one at a
//! time, in the order they arrive, while other aggregates run in parallel.
//!
//! Order across instances comes from the topology (`topology::ordered`):
//! every event of an aggregate lands in the same shard queue, which one
//! instance at a time consumes. Order inside the instance comes from here:
//! a delivery takes its aggregate's turn before it runs, and the turns are
//! handed out in arrival order (each delivery asks on its first poll, which
//! the consumer makes as the delivery arrives; tokio's mutex is fair).
//!
//! A transient failure cannot go to the retry ladder: the events behind it
//! would pass it. It is retried here instead, after the ladder's delays,
//! holding its aggregate's turn (and its delivery, unacked) meanwhile, so
//! the aggregate's later events wait until it succeeds or, with the ladder
//! used up, is dead-lettered; the dead letter says so in its
//! `burrow-last-error`. Other aggregates go on. At shutdown a held delivery
//! goes back to its queue, in place, for whichever instance takes the shard
//! over.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use lapin::{BasicProperties, types::AMQPValue};
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::pipeline::{DeadLetterMove, Pipeline, Processed, Settlement};
use crate::wire::{self, Incoming};

/// The aggregate of a delivery: its `burrow-aggregate-id` header, or `""`
/// for an event published without one (those then share one turn, which
/// keeps their order too; the shard exchange puts them in one shard).
pub(super) fn aggregate_of(properties: &BasicProperties) -> String {
    let header = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(wire::headers::AGGREGATE_ID).cloned());
    match header {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        _ => String::new(),
    }
}

/// The turns of the aggregates that have a delivery in this worker.
#[derive(Debug, Default)]
pub(super) struct Turns {
    aggregates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// An aggregate's turn, held while its delivery runs and settles.
pub(super) struct Turn {
    turns: Arc<Turns>,
    aggregate: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Turns {
    /// Waits for `aggregate`'s turn, behind the deliveries of the same
    /// aggregate that asked before.
    pub(super) async fn take(self: &Arc<Self>, aggregate: String) -> Turn {
        let lock = self
            .aggregates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(aggregate.clone())
            .or_default()
            .clone();
        let guard = lock.lock_owned().await;
        Turn {
            turns: self.clone(),
            aggregate,
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.aggregates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut aggregates = self
            .turns
            .aggregates
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.guard.take();
        // Nobody else holds or waits for this aggregate (they would hold a
        // clone, taken under this same lock): forget it, so the map holds
        // only the aggregates in flight.
        if aggregates
            .get(&self.aggregate)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            aggregates.remove(&self.aggregate);
        }
    }
}

/// Retries `processed`'s transient failures in place, after the ladder's
/// delays, until its handlers succeed or the ladder is used up (then it is
/// a dead letter, which says it was ordered). `on_round` sees each round
/// that is retried. `None`: the worker is stopping mid-wait; the delivery
/// must go back to its queue.
pub(super) async fn retry_in_place(
    pipeline: &Pipeline,
    mut processed: Processed,
    mut incoming: Incoming,
    properties: &BasicProperties,
    body: &[u8],
    stop: &CancellationToken,
    mut on_round: impl FnMut(&Processed),
) -> Option<Processed> {
    let mut dead: Option<DeadLetterMove> = None;
    loop {
        let retry = match &processed.settlement {
            Settlement::Retry(r) => r.clone(),
            Settlement::RetryAndDeadLetter(r, d) => {
                merge(&mut dead, d);
                r.clone()
            }
            _ => break,
        };
        on_round(&processed);
        info!(
            step = retry.step.number,
            delay = %humantime::format_duration(retry.step.delay),
            handlers = ?retry.handlers,
            "retrying in place: this aggregate's later events wait"
        );
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(retry.step.delay) => {}
        }
        incoming.first_failure_at.get_or_insert_with(wire::now_ms);
        incoming.attempt += 1;
        incoming.pending_handlers = Some(retry.handlers);
        processed = pipeline
            .process_incoming(incoming.clone(), properties, body, stop)
            .await;
    }
    if let Some(earlier) = dead {
        processed.settlement = match processed.settlement {
            Settlement::DeadLetter(mut d) => {
                merge_into(&mut d, &earlier);
                Settlement::DeadLetter(d)
            }
            _ => Settlement::DeadLetter(earlier),
        };
    }
    if let Settlement::DeadLetter(d) = &mut processed.settlement {
        d.errors.push(format!(
            "ordered: dead-lettered out of the order of aggregate {:?}; its later events were handled without it",
            aggregate_of(properties)
        ));
    }
    Some(processed)
}

fn merge(into: &mut Option<DeadLetterMove>, d: &DeadLetterMove) {
    match into {
        Some(existing) => merge_into(existing, d),
        None => *into = Some(d.clone()),
    }
}

fn merge_into(into: &mut DeadLetterMove, d: &DeadLetterMove) {
    for h in &d.handlers {
        if !into.handlers.contains(h) {
            into.handlers.push(h.clone());
        }
    }
    into.errors.extend(d.errors.iter().cloned());
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_aggregate_waits_its_turn_and_another_does_not() {
        let turns = Arc::new(Turns::default());
        let first = turns.take("card-1".into()).await;
        let same = tokio::spawn({
            let turns = turns.clone();
            async move { turns.take("card-1".into()).await }
        });
        let other = tokio::time::timeout(Duration::from_secs(5), turns.take("card-2".into()))
            .await
            .expect("another aggregate does not wait");
        drop(other);
        assert!(
            !same.is_finished(),
            "the same aggregate waits for the first"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), same)
            .await
            .expect("its turn comes")
            .unwrap();
        drop(second);
        assert_eq!(turns.len(), 0, "no aggregate is kept once done");
    }

    #[test]
    fn the_aggregate_is_read_from_its_header() {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            wire::headers::AGGREGATE_ID.into(),
            AMQPValue::LongString("card-7".into()),
        );
        let p = BasicProperties::default().with_headers(headers);
        assert_eq!(aggregate_of(&p), "card-7");
        assert_eq!(aggregate_of(&BasicProperties::default()), "");
    }
}
