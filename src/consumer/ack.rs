//! Coalesced acknowledgements: one `basic.ack` with `multiple` set for a run
//! of contiguous settled deliveries, instead of one frame per delivery.
//!
//! RabbitMQ's `basic.ack` with `multiple = true` acknowledges every
//! outstanding delivery on the channel up to and including its tag
//! (<https://www.rabbitmq.com/docs/confirms#consumer-acks-multiple-parameter>).
//! That is only safe over deliveries that are *all* ready to be acked: one
//! still in its handler, or still waiting for the confirm of its retry or
//! dead-letter copy, must not be covered. So the worker keeps, per channel,
//! an [`AckWindow`]: every delivery in the order it arrived, pending until
//! its settlement is complete.
//!
//! - A delivery whose copies are confirmed (or that needed none) becomes
//!   *ready*. The longest ready prefix of the window goes in one frame on
//!   the prefix's last tag, sent by whoever holds the flusher role (below).
//! - A delivery returned with `basic.nack` is nacked by its own task before
//!   it is marked *done*, so the nack frame precedes any ack that covers its
//!   tag; the broker no longer counts it as outstanding and the ack leaves
//!   it alone.
//! - A ready delivery stuck behind a slow one is acked on its own after
//!   [`HOLD`], so one long handler does not keep the prefetch window full of
//!   finished messages.
//! - When the session ends, every ready delivery is acked before the channel
//!   closes; pending ones (abandoned handlers) are never acked and come back.
//!
//! Frames are sent by one flusher at a time, in the manner of a group
//! commit: the task that completes a settlement while nobody is sending
//! sends the frame itself, then whatever settled while it was on its way.
//! Batches grow with the load and a lone message is acked at once, by its
//! own task. Each delivery is acked exactly once: it leaves the window in
//! exactly one batch or as one single.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use std::future::Future;

use lapin::{Acker, options::BasicAckOptions};
use tokio::{
    sync::{Notify, broadcast},
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, warn};

use prometheus_client::metrics::counter::Counter;

use crate::{consumer::Outcome, metrics::InFlight};

/// How long a ready delivery may wait behind one that is still pending
/// before it is acked on its own.
pub const HOLD: Duration = Duration::from_millis(10);

/// How long writing one ack frame may take before the flusher gives up on
/// it. A healthy connection writes it in microseconds; an unacked delivery
/// is redelivered, so giving up early is safe, hanging is not.
pub(super) const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum Slot<P> {
    /// Received, settlement not finished: no ack may cover this tag yet.
    Pending,
    /// Ready to be acked since the instant.
    Ready(P, Instant),
    /// Nothing left to send: nacked, or already acked on its own.
    Done,
}

/// The deliveries of one channel in arrival order, and which of them may be
/// acked. Pure bookkeeping: the caller sends the frames.
#[derive(Debug)]
pub struct AckWindow<P> {
    slots: VecDeque<(u64, Slot<P>)>,
}

impl<P> Default for AckWindow<P> {
    fn default() -> Self {
        Self {
            slots: VecDeque::new(),
        }
    }
}

impl<P> AckWindow<P> {
    /// Records a delivery as it arrives. Tags must increase.
    pub fn received(&mut self, tag: u64) {
        debug_assert!(
            self.slots.back().is_none_or(|(last, _)| *last < tag),
            "delivery tags arrive in increasing order"
        );
        self.slots.push_back((tag, Slot::Pending));
    }

    /// Marks a pending delivery ready to ack (`Some`) or settled without an
    /// ack (`None`: it was nacked). Gives the payload back if the tag is not
    /// pending in this window.
    pub fn settled(&mut self, tag: u64, ack: Option<P>, now: Instant) -> Result<(), Option<P>> {
        match self.slots.binary_search_by_key(&tag, |(t, _)| *t) {
            Ok(i) if matches!(self.slots[i].1, Slot::Pending) => {
                self.slots[i].1 = match ack {
                    Some(p) => Slot::Ready(p, now),
                    None => Slot::Done,
                };
                Ok(())
            }
            _ => Err(ack),
        }
    }

    /// Takes what can be acked now: into `batch` the ready deliveries of the
    /// settled prefix (one ack with `multiple` on the last covers them all),
    /// into `singles` the ready ones behind a pending delivery that waited
    /// `hold` or longer, or all of them when `closing`.
    pub fn take(
        &mut self,
        now: Instant,
        hold: Duration,
        closing: bool,
        batch: &mut Vec<(u64, P)>,
        singles: &mut Vec<(u64, P)>,
    ) {
        while let Some((_, slot)) = self.slots.front() {
            if matches!(slot, Slot::Pending) {
                break;
            }
            if let Some((tag, Slot::Ready(p, _))) = self.slots.pop_front() {
                batch.push((tag, p));
            }
        }
        for (tag, slot) in self.slots.iter_mut() {
            let due = match slot {
                Slot::Ready(_, since) => closing || now.saturating_duration_since(*since) >= hold,
                Slot::Pending | Slot::Done => false,
            };
            if due && let Slot::Ready(p, _) = std::mem::replace(slot, Slot::Done) {
                singles.push((*tag, p));
            }
        }
    }

    /// When the oldest ready delivery behind a pending one is due on its own.
    pub fn next_due(&self, hold: Duration) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|(_, slot)| match slot {
                Slot::Ready(_, since) => Some(*since + hold),
                Slot::Pending | Slot::Done => None,
            })
            .min()
    }

    /// Deliveries still in the window (pending, ready or done behind a pending one).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// What the acks of a session came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct AckStats {
    /// Deliveries acked (the frame was sent).
    pub acked: u64,
    /// `basic.ack` frames sent for them.
    pub frames: u64,
    /// Deliveries whose ack could not be sent (the channel closed first).
    pub not_sent: u64,
}

impl AckStats {
    fn count(&mut self, acked: bool, n: u64) {
        if acked {
            self.acked += n;
            self.frames += 1;
        } else {
            self.not_sent += n;
        }
    }
}

/// Sends the ack frame of one delivery (covering every earlier outstanding
/// one with `multiple`): lapin's [`Acker`] on a channel, a recording fake in
/// the unit tests below. `Ok(false)` means nothing was sent (the channel
/// closed first).
pub(crate) trait AckFrame: Send + Sync + std::fmt::Debug + 'static {
    /// Sends `basic.ack` for this delivery, `multiple` or not.
    fn ack(&self, multiple: bool) -> impl Future<Output = lapin::Result<bool>> + Send;

    /// Sends `basic.reject(requeue)` for this delivery: it goes back to the
    /// queue, and counts as a failed delivery against the quorum queue's
    /// delivery limit on every RabbitMQ version (from 4.3 a `basic.nack`
    /// requeue no longer counts, and a message whose copy can never be
    /// confirmed would come back without end).
    fn requeue(&self) -> impl Future<Output = lapin::Result<bool>> + Send;
}

impl AckFrame for Acker {
    fn ack(&self, multiple: bool) -> impl Future<Output = lapin::Result<bool>> + Send {
        Acker::ack(self, BasicAckOptions { multiple })
    }

    fn requeue(&self) -> impl Future<Output = lapin::Result<bool>> + Send {
        self.reject(lapin::options::BasicRejectOptions { requeue: true })
    }
}

/// A delivery waiting for its ack, and the outcome to broadcast once the
/// ack is sent (only built when someone listens).
#[derive(Debug)]
struct Waiting<A> {
    acker: A,
    outcome: Option<Outcome>,
    /// Counted in `burrow_in_flight` until its ack is sent (or given up on).
    in_flight: InFlight,
}

type Taken<A> = Vec<(u64, Waiting<A>)>;

#[derive(Debug)]
struct State<A> {
    window: AckWindow<Waiting<A>>,
    closing: bool,
    /// Someone is sending acks. One flusher at a time keeps the frames in
    /// tag order and lets settlements pile up behind the frame on its way.
    flushing: bool,
    stats: AckStats,
    /// Buffers lent to the flusher, kept for their capacity.
    batch: Taken<A>,
    singles: Taken<A>,
}

impl<A> Default for State<A> {
    fn default() -> Self {
        Self {
            window: AckWindow::default(),
            closing: false,
            flushing: false,
            stats: AckStats::default(),
            batch: Vec::new(),
            singles: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Inner<A> {
    // A std mutex: held for a few pointer moves, never across an await.
    state: std::sync::Mutex<State<A>>,
    /// Wakes the timer task: stragglers to time, or the window closing.
    wake: Notify,
    outcomes: broadcast::Sender<Outcome>,
    /// `burrow_ack_frames_total` of this queue.
    frames: Counter,
}

/// One channel's ack window, shared by the consumer loop, the delivery
/// tasks and a timer task.
///
/// Acks are sent by whoever completes a settlement while nobody else is
/// sending (group commit): the delivery task that finds the role free sends
/// the frame, then keeps sending what settled meanwhile until nothing is
/// left. A lone delivery is acked by its own task, with no hop to another
/// task; under load one frame covers everything that settled while the
/// previous frame was on its way. The timer task acks stragglers after
/// [`HOLD`] and flushes the window when the session ends.
#[derive(Debug)]
pub(crate) struct Acks<A: AckFrame = Acker> {
    inner: Arc<Inner<A>>,
}

impl<A: AckFrame> Clone for Acks<A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<A: AckFrame> Acks<A> {
    /// The window of one channel, and its timer task; every `basic.ack`
    /// frame sent counts in `frames`.
    pub(crate) fn start(
        outcomes: broadcast::Sender<Outcome>,
        frames: Counter,
    ) -> (Acks<A>, JoinHandle<AckStats>) {
        let acks = Acks {
            inner: Arc::new(Inner {
                state: std::sync::Mutex::default(),
                wake: Notify::new(),
                outcomes,
                frames,
            }),
        };
        let task = tokio::spawn(timer(acks.clone()));
        (acks, task)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<A>> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a delivery taken off the consumer, before its task starts.
    pub(crate) fn received(&self, tag: u64) {
        self.state().window.received(tag);
    }

    /// The delivery's settlement is complete (its copies confirmed): ack it.
    /// The outcome, if any, is broadcast once the ack frame is sent.
    pub(crate) async fn ready(
        &self,
        tag: u64,
        acker: A,
        outcome: Option<Outcome>,
        in_flight: InFlight,
    ) {
        let waiting = Waiting {
            acker,
            outcome,
            in_flight,
        };
        let settled = {
            let mut state = self.state();
            state
                .window
                .settled(tag, Some(waiting), Instant::now())
                .map(|()| try_lead(&mut state))
        };
        match settled {
            Ok(true) => self.flush(false).await,
            Ok(false) => {}
            // Not in the window (cannot happen: every tag is recorded before
            // its task starts). Ack it on its own rather than lose track.
            Err(waiting) => {
                warn!(
                    tag,
                    "delivery missing from the ack window; acking it on its own"
                );
                if let Some(w) = waiting {
                    let acked = send_ack(&w.acker, false, 1).await;
                    announce(&self.inner.outcomes, w, acked);
                }
            }
        }
    }

    /// The delivery was settled without an ack (nacked, frame already sent).
    pub(crate) async fn returned(&self, tag: u64) {
        let lead = {
            let mut state = self.state();
            state.window.settled(tag, None, Instant::now()).is_ok() && try_lead(&mut state)
        };
        if lead {
            self.flush(false).await;
        }
    }

    /// Sends what the window lets go until nothing is left, then gives the
    /// flusher role back. The caller holds the role.
    async fn flush(&self, closing: bool) {
        // Gives the role back if this future is dropped mid-send (a task
        // aborted at the shutdown deadline): what it had taken out is never
        // acked, so the broker redelivers it — late, never lost.
        let mut role = FlusherRole(Some(self));
        loop {
            let (mut batch, mut singles) = {
                let mut state = self.state();
                let mut batch = std::mem::take(&mut state.batch);
                let mut singles = std::mem::take(&mut state.singles);
                let closing = closing || state.closing;
                state
                    .window
                    .take(Instant::now(), HOLD, closing, &mut batch, &mut singles);
                if batch.is_empty() && singles.is_empty() {
                    state.batch = batch;
                    state.singles = singles;
                    state.flushing = false;
                    let stragglers = state.window.next_due(HOLD).is_some();
                    drop(state);
                    role.0 = None;
                    if stragglers {
                        self.inner.wake.notify_one();
                    }
                    return;
                }
                (batch, singles)
            };
            let mut stats = AckStats::default();
            send(&mut batch, &mut singles, &self.inner, &mut stats).await;
            let mut state = self.state();
            state.stats.acked += stats.acked;
            state.stats.frames += stats.frames;
            state.stats.not_sent += stats.not_sent;
            state.batch = batch;
            state.singles = singles;
        }
    }

    /// Acks every ready delivery and stops the timer task. Call once no
    /// task can settle any more, before the channel closes.
    pub(crate) async fn finish(self, timer: JoinHandle<AckStats>) -> AckStats {
        self.state().closing = true;
        self.inner.wake.notify_one();
        timer.await.unwrap_or_default()
    }
}

/// Takes the flusher role if it is free.
fn try_lead<A>(state: &mut State<A>) -> bool {
    !std::mem::replace(&mut state.flushing, true)
}

struct FlusherRole<'a, A: AckFrame>(Option<&'a Acks<A>>);

impl<A: AckFrame> Drop for FlusherRole<'_, A> {
    fn drop(&mut self) {
        if let Some(acks) = self.0.take() {
            acks.state().flushing = false;
            acks.inner.wake.notify_one();
        }
    }
}

/// Sends one frame for `batch` and one per single, and broadcasts their
/// outcomes; leaves both empty. A frame is counted in
/// `burrow_ack_frames_total` before the outcomes it covers are announced.
async fn send<A: AckFrame>(
    batch: &mut Taken<A>,
    singles: &mut Taken<A>,
    inner: &Inner<A>,
    stats: &mut AckStats,
) {
    if let Some((_, last)) = batch.last() {
        let n = batch.len() as u64;
        let acked = send_ack(&last.acker, n > 1, n).await;
        stats.count(acked, n);
        if acked {
            inner.frames.inc();
        }
        for (_, w) in batch.drain(..) {
            announce(&inner.outcomes, w, acked);
        }
    }
    for (_, w) in singles.drain(..) {
        let acked = send_ack(&w.acker, false, 1).await;
        stats.count(acked, 1);
        if acked {
            inner.frames.inc();
        }
        announce(&inner.outcomes, w, acked);
    }
}

/// Acks stragglers once they have waited [`HOLD`], and everything ready
/// when the window closes.
async fn timer<A: AckFrame>(acks: Acks<A>) -> AckStats {
    loop {
        let (closing, due) = {
            let state = acks.state();
            (state.closing, state.window.next_due(HOLD))
        };
        if closing {
            break;
        }
        // `notify_one` leaves a permit when nobody waits, so a wake-up
        // between the look above and this wait is not missed.
        match due {
            Some(at) => tokio::select! {
                _ = acks.inner.wake.notified() => {}
                _ = tokio::time::sleep_until(at) => {
                    let led = try_lead(&mut acks.state());
                    if led {
                        acks.flush(false).await;
                    } else {
                        // The flusher takes what is due, and wakes us when
                        // it leaves stragglers behind.
                        acks.inner.wake.notified().await;
                    }
                }
            },
            None => acks.inner.wake.notified().await,
        }
    }
    // Every delivery task has ended, so nobody else holds the role (one
    // dropped mid-send gave it back).
    acks.state().flushing = true;
    acks.flush(true).await;
    let stats = acks.state().stats;
    debug!(
        acked = stats.acked,
        frames = stats.frames,
        not_sent = stats.not_sent,
        "ack window closed"
    );
    stats
}

/// The delivery's ack frame was sent (or could not be): it leaves
/// `burrow_in_flight` first, then its outcome is broadcast, so a listener
/// never sees an outcome for a delivery still counted in flight.
fn announce<A>(outcomes: &broadcast::Sender<Outcome>, waiting: Waiting<A>, acked: bool) {
    let Waiting {
        outcome, in_flight, ..
    } = waiting;
    drop(in_flight);
    if let Some(mut o) = outcome {
        o.acked = acked;
        let _ = outcomes.send(o);
    }
}

/// Sends one ack; `false` when it was not sent. lapin answers `Ok(false)`
/// when the channel closed first (the acker is poisoned): the broker then
/// redelivers every message the ack would have covered.
async fn send_ack<A: AckFrame>(acker: &A, multiple: bool, count: u64) -> bool {
    // lapin resolves an ack once its frame is written. When the connection
    // dies with the frame on its way, that can never happen and the future
    // never resolves; unbounded, it would stall this settler, and with it
    // `Acks::finish`, so the session would never end and the worker never
    // reconnect (found by the fault suite: network cut, broker kill -9).
    let sent = tokio::time::timeout(ACK_WRITE_TIMEOUT, acker.ack(multiple));
    let Ok(result) = sent.await else {
        warn!(
            count,
            timeout = ?ACK_WRITE_TIMEOUT,
            "ack not written in time (the connection is probably gone); the broker will redeliver these messages"
        );
        return false;
    };
    match result {
        Ok(true) => true,
        Ok(false) => {
            warn!(
                count,
                "ack not sent: the channel closed first; the broker will redeliver these messages"
            );
            false
        }
        Err(e) => {
            warn!(error = %e, count, "ack failed; the broker will redeliver these messages");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(w: &mut AckWindow<u64>, now: Instant, closing: bool) -> (Vec<u64>, Vec<u64>) {
        let (mut batch, mut singles) = (Vec::new(), Vec::new());
        w.take(now, HOLD, closing, &mut batch, &mut singles);
        (
            batch.into_iter().map(|(t, _)| t).collect(),
            singles.into_iter().map(|(t, _)| t).collect(),
        )
    }

    #[test]
    fn a_contiguous_prefix_goes_in_one_batch() {
        let now = Instant::now();
        let mut w = AckWindow::default();
        for tag in 1..=5 {
            w.received(tag);
        }
        for tag in [2, 1, 3] {
            w.settled(tag, Some(tag), now).unwrap();
        }
        assert_eq!(take(&mut w, now, false), (vec![1, 2, 3], vec![]));
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn nothing_behind_a_pending_delivery_is_covered() {
        let now = Instant::now();
        let mut w = AckWindow::default();
        for tag in 1..=3 {
            w.received(tag);
        }
        w.settled(2, Some(2), now).unwrap();
        w.settled(3, Some(3), now).unwrap();
        assert_eq!(take(&mut w, now, false), (vec![], vec![]));
        assert_eq!(w.next_due(HOLD), Some(now + HOLD));
        // Held long enough: acked one by one, tag 1 still pending.
        assert_eq!(take(&mut w, now + HOLD, false), (vec![], vec![2, 3]));
        assert_eq!(w.next_due(HOLD), None);
        // Tag 1 settles: it alone is acked; 2 and 3 are not sent twice.
        w.settled(1, Some(1), now).unwrap();
        assert_eq!(take(&mut w, now + HOLD, false), (vec![1], vec![]));
        assert!(w.is_empty());
    }

    #[test]
    fn a_nacked_delivery_does_not_block_the_prefix() {
        let now = Instant::now();
        let mut w = AckWindow::default();
        for tag in 1..=3 {
            w.received(tag);
        }
        w.settled(1, Some(1), now).unwrap();
        w.settled(2, None, now).unwrap();
        w.settled(3, Some(3), now).unwrap();
        assert_eq!(take(&mut w, now, false), (vec![1, 3], vec![]));
    }

    #[test]
    fn closing_acks_every_ready_delivery_and_leaves_pending_ones() {
        let now = Instant::now();
        let mut w = AckWindow::default();
        for tag in 1..=4 {
            w.received(tag);
        }
        w.settled(1, Some(1), now).unwrap();
        w.settled(3, Some(3), now).unwrap();
        w.settled(4, Some(4), now).unwrap();
        assert_eq!(take(&mut w, now, true), (vec![1], vec![3, 4]));
        assert_eq!(take(&mut w, now, true), (vec![], vec![]));
    }

    #[test]
    fn a_tag_settles_once() {
        let now = Instant::now();
        let mut w = AckWindow::default();
        w.received(7);
        w.settled(7, Some(7), now).unwrap();
        assert_eq!(w.settled(7, Some(7), now), Err(Some(7)));
        assert_eq!(w.settled(8, None, now), Err(None));
    }

    /// Any order of settlements, interleaving acks and nacks, with flushes in
    /// between: every ready delivery leaves the window exactly once, never
    /// before it is ready, and a batch never spans a pending delivery.
    #[test]
    fn every_delivery_is_acked_exactly_once_in_any_order() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..500 {
            let start = Instant::now();
            let n = 1 + rand(40);
            let mut w = AckWindow::default();
            let mut order: Vec<u64> = (1..=n).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rand(i as u64 + 1) as usize);
            }
            let nacked: Vec<bool> = (0..=n).map(|_| rand(5) == 0).collect();
            let mut state = vec![0u8; n as usize + 1]; // 0 pending, 1 ready, 2 nacked
            let mut acked = vec![0u32; n as usize + 1];
            for tag in 1..=n {
                w.received(tag);
            }
            for (i, &tag) in order.iter().enumerate() {
                let ack = (!nacked[tag as usize]).then_some(tag);
                state[tag as usize] = if ack.is_some() { 1 } else { 2 };
                w.settled(tag, ack, start).unwrap();
                if rand(3) == 0 || i + 1 == order.len() {
                    let now = start + HOLD * rand(2) as u32;
                    let (mut batch, mut singles) = (Vec::new(), Vec::new());
                    w.take(now, HOLD, false, &mut batch, &mut singles);
                    if let Some(&(last, _)) = batch.last() {
                        // Everything the multiple ack covers is settled.
                        assert!((1..=last).all(|t| state[t as usize] != 0));
                    }
                    for (tag, p) in batch.into_iter().chain(singles) {
                        assert_eq!(tag, p);
                        assert_eq!(state[tag as usize], 1, "only ready deliveries are acked");
                        acked[tag as usize] += 1;
                    }
                }
            }
            assert!(w.is_empty());
            for tag in 1..=n as usize {
                let want = u32::from(!nacked[tag]);
                assert_eq!(acked[tag], want, "tag {tag}");
            }
        }
    }

    // ---------------------------------------------------------------------
    // The group-commit Acks over a recording ack sender
    // ---------------------------------------------------------------------

    use std::sync::{Arc as StdArc, Mutex as StdMutex};

    use crate::metrics::Metrics;

    /// Records every frame as `(tag, multiple)`; answers `sent`.
    #[derive(Debug, Clone)]
    struct FakeAcker {
        tag: u64,
        frames: StdArc<StdMutex<Vec<(u64, bool)>>>,
        sent: bool,
    }

    impl AckFrame for FakeAcker {
        fn ack(&self, multiple: bool) -> impl Future<Output = lapin::Result<bool>> + Send {
            self.frames.lock().unwrap().push((self.tag, multiple));
            std::future::ready(Ok(self.sent))
        }

        fn requeue(&self) -> impl Future<Output = lapin::Result<bool>> + Send {
            std::future::ready(Ok(self.sent))
        }
    }

    fn outcome(id: &str) -> Option<Outcome> {
        Some(Outcome {
            message_id: id.into(),
            event_type: "E".into(),
            attempt: 1,
            succeeded: Vec::new(),
            retried: None,
            dead_lettered: None,
            ignored: false,
            acked: false,
        })
    }

    struct Rig {
        acks: Acks<FakeAcker>,
        timer: Option<JoinHandle<AckStats>>,
        frames: StdArc<StdMutex<Vec<(u64, bool)>>>,
        outcomes: broadcast::Receiver<Outcome>,
        metrics: Metrics,
        sent: bool,
    }

    impl Rig {
        fn new(sent: bool) -> Self {
            let (tx, outcomes) = broadcast::channel(64);
            let (acks, timer) = Acks::start(tx, Counter::default());
            Self {
                acks,
                timer: Some(timer),
                frames: StdArc::default(),
                outcomes,
                metrics: Metrics::new(),
                sent,
            }
        }

        fn receive(&self, tags: std::ops::RangeInclusive<u64>) -> Vec<crate::metrics::InFlight> {
            tags.map(|tag| {
                self.acks.received(tag);
                self.metrics.delivery_started()
            })
            .collect()
        }

        async fn ready(&self, tag: u64, in_flight: crate::metrics::InFlight) {
            let acker = FakeAcker {
                tag,
                frames: self.frames.clone(),
                sent: self.sent,
            };
            self.acks
                .ready(tag, acker, outcome(&tag.to_string()), in_flight)
                .await;
        }

        fn frames(&self) -> Vec<(u64, bool)> {
            self.frames.lock().unwrap().clone()
        }

        /// Closes the window: acks what is ready, stops the timer.
        async fn finish(&mut self) -> AckStats {
            let timer = self.timer.take().expect("finished once");
            self.acks.clone().finish(timer).await
        }
    }

    #[tokio::test]
    async fn a_lone_delivery_is_acked_by_its_own_task_at_once() {
        let mut rig = Rig::new(true);
        let mut in_flight = rig.receive(1..=1);
        rig.ready(1, in_flight.pop().unwrap()).await;
        // Sent by the task that settled it, before `ready` returned.
        assert_eq!(rig.frames(), vec![(1, false)]);
        let o = rig.outcomes.try_recv().expect("the outcome after the ack");
        assert!(o.acked);
        assert_eq!(rig.metrics.in_flight(), 0, "out of flight before announced");
        let stats = rig.finish().await;
        assert_eq!((stats.acked, stats.frames, stats.not_sent), (1, 1, 0));
    }

    #[tokio::test]
    async fn a_pending_delivery_is_never_covered_and_a_straggler_goes_alone() {
        let mut rig = Rig::new(true);
        let mut in_flight = rig.receive(1..=3);
        let third = in_flight.pop().unwrap();
        let second = in_flight.pop().unwrap();
        let first = in_flight.pop().unwrap();
        rig.ready(2, second).await;
        assert!(
            rig.frames().is_empty(),
            "1 is pending: no ack may cover 2 yet"
        );
        // After HOLD the timer acks 2 on its own, never with `multiple`.
        tokio::time::timeout(Duration::from_secs(5), async {
            while rig.frames().is_empty() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("the straggler is acked");
        assert_eq!(rig.frames(), vec![(2, false)]);
        rig.ready(1, first).await;
        rig.ready(3, third).await;
        let stats = rig.finish().await;
        let frames = rig.frames();
        // 1 and 3 each once; 2 was done, so nothing covered it twice.
        assert_eq!(stats.acked, 3, "{frames:?}");
        let mut acked: Vec<u64> = frames.iter().map(|(t, _)| *t).collect();
        acked.sort();
        assert!(acked == vec![1, 2, 3] || acked == vec![2, 3], "{frames:?}");
        assert!(
            frames.iter().all(|(t, multiple)| !*multiple || *t != 2),
            "{frames:?}"
        );
        let mut seen = Vec::new();
        while let Ok(o) = rig.outcomes.try_recv() {
            assert!(o.acked);
            seen.push(o.message_id);
        }
        seen.sort();
        assert_eq!(seen, vec!["1", "2", "3"]);
        assert_eq!(rig.metrics.in_flight(), 0);
    }

    #[tokio::test]
    async fn an_ack_the_channel_did_not_send_is_reported_and_leaves_flight() {
        let mut rig = Rig::new(false);
        let mut in_flight = rig.receive(1..=1);
        rig.ready(1, in_flight.pop().unwrap()).await;
        let o = rig.outcomes.try_recv().unwrap();
        assert!(!o.acked, "Ok(false): the broker will redeliver");
        assert_eq!(rig.metrics.in_flight(), 0);
        let stats = rig.finish().await;
        assert_eq!((stats.acked, stats.not_sent), (0, 1));
    }

    #[tokio::test]
    async fn a_returned_delivery_is_never_acked_and_frees_the_prefix() {
        let mut rig = Rig::new(true);
        let mut in_flight = rig.receive(1..=2);
        let second = in_flight.pop().unwrap();
        drop(in_flight);
        // 1 was nacked by its task; 2 may go in the next frame at once.
        rig.acks.returned(1).await;
        rig.ready(2, second).await;
        let stats = rig.finish().await;
        let frames = rig.frames();
        assert_eq!(stats.acked, 1);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0].0, 2);
    }
}
