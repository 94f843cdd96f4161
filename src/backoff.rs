//! Retry delays that stay under their cap, jitter included.
//!
//! backon's jitter adds a random part of up to the current delay *on top of*
//! it, so a backoff capped at 30 s waits up to 60 s (39 s and 47 s were seen
//! between reconnect attempts, long after the broker was back). Built here
//! from backon with half the bounds, each delay lands in `[d/2, d)` of the
//! doubling sequence `d` ("equal jitter"): spread out so a fleet of workers
//! does not knock in lockstep, and never above the cap.

use std::time::Duration;

use backon::BackoffBuilder;

/// Delays whose first is below `first` and which double up to below `cap`,
/// jittered, forever.
pub(crate) fn capped(first: Duration, cap: Duration) -> impl Iterator<Item = Duration> + Send {
    let cap = cap.max(first);
    backon::ExponentialBuilder::default()
        .with_min_delay(first / 2)
        .with_max_delay(cap / 2)
        .with_jitter()
        .without_max_times()
        .build()
        .map(move |d| d.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_delay_exceeds_the_cap_and_the_cap_is_reached() {
        let cap = Duration::from_secs(30);
        let delays: Vec<Duration> = capped(Duration::from_millis(200), cap).take(2000).collect();
        assert!(delays.iter().all(|d| *d <= cap), "{delays:?}");
        let late = &delays[20..];
        assert!(
            late.iter().all(|d| *d >= cap / 2),
            "at the cap: between 15 s and 30 s"
        );
        let max = late.iter().max().unwrap();
        assert!(*max > cap * 9 / 10, "jitter spreads up to the cap: {max:?}");
        assert!(delays[0] >= Duration::from_millis(100) && delays[0] < Duration::from_millis(200));
    }
}
