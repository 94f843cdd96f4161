//! `burrow_in_flight`: the guard that counts one delivery from its receipt
//! to its final settlement, and the clock of the last settlement.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::gauge::Gauge;

use super::Metrics;

impl Metrics {
    /// Counts a delivery in flight until the returned guard is dropped.
    ///
    /// The guard travels with the delivery to the place its settlement is
    /// final (the ack frame sent, the nack sent, or the task abandoned), and
    /// is dropped there *before* the delivery's outcome is announced: whoever
    /// sees an outcome, or scrapes after one, never sees that delivery
    /// counted in flight.
    pub(crate) fn delivery_started(&self) -> InFlight {
        self.in_flight.inc();
        InFlight {
            in_flight: self.in_flight.clone(),
            last_settled_ms: self.last_settled_ms.clone(),
        }
    }
}

/// One delivery counted in `burrow_in_flight`; dropping it settles the count
/// exactly once, whichever way the delivery ended (acked, nacked, its task
/// aborted at the shutdown deadline).
#[derive(Debug)]
pub(crate) struct InFlight {
    in_flight: Gauge,
    last_settled_ms: Arc<AtomicI64>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.in_flight.dec();
        self.last_settled_ms.store(now_ms(), Ordering::Relaxed);
    }
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_flight_guard_counts_once_however_the_delivery_ends() {
        let m = Metrics::new();
        let a = m.delivery_started();
        let b = m.delivery_started();
        assert_eq!(m.in_flight(), 2);
        drop(a);
        assert_eq!(m.in_flight(), 1);
        // A task aborted at the shutdown deadline drops its guard too.
        let task = std::thread::spawn(move || drop(b));
        task.join().unwrap();
        assert_eq!(m.in_flight(), 0);
    }
}
