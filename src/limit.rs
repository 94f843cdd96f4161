//! Per-handler concurrency and rate limits: for a handler that calls a
//! rate-limited API or a database with few connections.
//!
//! Over its limit, a delivery *waits inside the worker* for a permit: it is
//! not nacked, does not climb the retry ladder and costs no attempt. The
//! other handlers of the same delivery, and the handlers of other
//! deliveries, run on (each handler has its own permits). The wait is not
//! part of the handler's timeout (`consumer.handler_timeout` starts once the
//! permit is held) and shows in `burrow_handler_permit_wait_seconds`.
//!
//! Memory stays bounded by the prefetch: a waiting delivery holds one of the
//! `consumer.prefetch` slots and one of the `consumer.concurrency` delivery
//! slots. A limited handler that cannot keep up with its event's arrival
//! rate therefore fills them with waiting deliveries, and the app's other
//! events wait behind them at the broker: give such a handler an app of its
//! own (its own queue) when its events arrive faster than its limit for
//! long, or raise `consumer.concurrency` and `consumer.prefetch` above the
//! burst you expect.
//!
//! Limits hold **per worker process**: `concurrency(4)` on three replicas
//! allows twelve runs at a time. (A limit shared across processes would
//! need a coordinator; RabbitMQ offers none for this.)
//!
//! ```
//! use std::time::Duration;
//! use burrow::{HandlerLimits, Rate};
//!
//! let limits = HandlerLimits::new()
//!     .concurrency(4)
//!     .rate(Rate::new(100, Duration::from_secs(1)).unwrap());
//! assert_eq!(limits.to_string(), "concurrency 4, rate 100/1s");
//! ```

use std::{
    fmt,
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

/// A rate: at most `count` handler starts per `per`, spaced evenly (one
/// every `per / count`), so that no window of `per` holds more than
/// `count` starts, however the deliveries arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    count: NonZeroU32,
    per: Duration,
}

impl Rate {
    /// `count` starts per `per`. Fails for a zero count or a period under a
    /// millisecond.
    pub fn new(count: u32, per: Duration) -> Result<Self> {
        let Some(count) = NonZeroU32::new(count) else {
            return Err(Error::config(
                "limits.rate",
                "a rate of 0 would never run the handler; use 1 or more, e.g. \"100/1s\"",
            ));
        };
        if per < Duration::from_millis(1) {
            return Err(Error::config(
                "limits.rate",
                format!(
                    "a rate per {per:?} is too fine; use a period of 1ms or more, e.g. \"100/1s\""
                ),
            ));
        }
        Ok(Self { count, per })
    }

    /// Parses `"<count>/<period>"`: `"100/1s"`, `"5/1m"`, `"1/250ms"` (the
    /// period in humantime's notation; `"100/s"` reads as `"100/1s"`).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: String| {
            Error::config(
                "limits.rate",
                format!(
                    "limits rate = {text:?} is invalid: {why}; write e.g. \"100/1s\" or \"5/1m\""
                ),
            )
        };
        let (count, per) = text
            .split_once('/')
            .ok_or_else(|| bad("it has no '/' between the count and the period".into()))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|e| bad(format!("the count {count:?} is not a whole number ({e})")))?;
        let per = per.trim();
        let per = if per.starts_with(|c: char| c.is_ascii_digit()) {
            per.to_owned()
        } else {
            format!("1{per}")
        };
        let per = humantime::parse_duration(&per)
            .map_err(|e| bad(format!("the period {per:?} is not a duration ({e})")))?;
        Self::new(count, per)
    }

    /// Time between two starts.
    fn spacing(&self) -> Duration {
        self.per / self.count.get()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
    }
}

/// The limits of one handler (see the module docs): none by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandlerLimits {
    concurrency: Option<usize>,
    rate: Option<Rate>,
}

impl HandlerLimits {
    /// No limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `n` runs at a time in this worker process (`0` reads as 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n.max(1));
        self
    }

    /// At most `rate` starts.
    pub fn rate(mut self, rate: Rate) -> Self {
        self.rate = Some(rate);
        self
    }

    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.concurrency.is_some() || self.rate.is_some()
    }

    /// These limits, with each one `other` sets taking its place.
    pub(crate) fn overridden_by(self, other: HandlerLimits) -> Self {
        Self {
            concurrency: other.concurrency.or(self.concurrency),
            rate: other.rate.or(self.rate),
        }
    }
}

impl fmt::Display for HandlerLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.concurrency, self.rate) {
            (None, None) => f.write_str("no limit"),
            (Some(n), None) => write!(f, "concurrency {n}"),
            (None, Some(r)) => write!(f, "rate {r}"),
            (Some(n), Some(r)) => write!(f, "concurrency {n}, rate {r}"),
        }
    }
}

/// `[limits."<handler name>"]` in the settings: the same limits, set (or
/// overridden) without a rebuild.
///
/// ```toml
/// [limits."billing.charge_card"]
/// concurrency = 4
/// rate = "100/1s"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// At most this many runs at a time.
    pub concurrency: Option<usize>,
    /// `"<count>/<period>"`, e.g. `"100/1s"`.
    pub rate: Option<String>,
}

impl LimitSettings {
    /// The limits these settings describe; a malformed rate is an error
    /// naming the handler.
    pub fn limits(&self, handler: &str) -> Result<HandlerLimits> {
        let mut limits = HandlerLimits::new();
        if let Some(n) = self.concurrency {
            if n == 0 {
                return Err(Error::config(
                    "limits",
                    format!(
                        "limits.\"{handler}\".concurrency = 0 would never run the handler; use 1 or more"
                    ),
                ));
            }
            limits = limits.concurrency(n);
        }
        if let Some(rate) = &self.rate {
            let rate = Rate::parse(rate)
                .map_err(|e| Error::config("limits", format!("limits.\"{handler}\": {e}")))?;
            limits = limits.rate(rate);
        }
        Ok(limits)
    }
}

/// The permits of one handler, shared by every delivery of a worker.
pub(crate) struct Limiter {
    limits: HandlerLimits,
    slots: Option<Arc<Semaphore>>,
    starts: Option<DefaultDirectRateLimiter>,
}

/// What a run holds while it runs; the concurrency slot is returned on drop.
#[derive(Debug)]
pub(crate) struct Permit {
    _slot: Option<OwnedSemaphorePermit>,
    /// How long the run waited for it.
    pub(crate) waited: Duration,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Limiter({})", self.limits)
    }
}

impl Limiter {
    pub(crate) fn new(limits: HandlerLimits) -> Self {
        let starts = limits.rate.map(|rate| {
            // A burst of one: starts are spaced evenly, so any window of
            // `per` holds at most `count` of them.
            let quota = Quota::with_period(rate.spacing())
                .expect("a rate's spacing is at least a nanosecond")
                .allow_burst(NonZeroU32::MIN);
            RateLimiter::direct(quota)
        });
        Self {
            limits,
            slots: limits.concurrency.map(|n| Arc::new(Semaphore::new(n))),
            starts,
        }
    }

    /// Waits for a concurrency slot, then for the rate: the slot is held
    /// while waiting for the rate, so a run that holds a slot starts next.
    pub(crate) async fn acquire(&self) -> Permit {
        let begun = Instant::now();
        let slot = match &self.slots {
            // The semaphore is never closed.
            Some(slots) => slots.clone().acquire_owned().await.ok(),
            None => None,
        };
        if let Some(starts) = &self.starts {
            starts.until_ready().await;
        }
        Permit {
            _slot: slot,
            waited: begun.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_or_without_a_number_before_the_unit() {
        assert_eq!(
            Rate::parse("100/1s").unwrap(),
            Rate::new(100, Duration::from_secs(1)).unwrap()
        );
        assert_eq!(
            Rate::parse("100/s").unwrap(),
            Rate::parse("100/1s").unwrap()
        );
        assert_eq!(
            Rate::parse(" 5 / 1m ").unwrap().spacing(),
            Duration::from_secs(12)
        );
        for bad in ["100", "x/1s", "0/1s", "5/soon", "5/0s"] {
            let e = Rate::parse(bad).unwrap_err().to_string();
            assert!(e.contains("e.g. \"100/1s\""), "{bad}: {e}");
        }
    }

    #[test]
    fn settings_override_code_one_limit_at_a_time() {
        let code = HandlerLimits::new().concurrency(2);
        let config = LimitSettings {
            concurrency: None,
            rate: Some("10/1s".into()),
        }
        .limits("h")
        .unwrap();
        assert_eq!(
            code.overridden_by(config).to_string(),
            "concurrency 2, rate 10/1s"
        );
        let zero = LimitSettings {
            concurrency: Some(0),
            rate: None,
        };
        assert!(zero.limits("h").unwrap_err().to_string().contains("\"h\""));
    }

    #[tokio::test]
    async fn concurrency_is_held_until_the_permit_drops() {
        let limiter = Limiter::new(HandlerLimits::new().concurrency(1));
        let first = limiter.acquire().await;
        let second = tokio::time::timeout(Duration::from_millis(50), limiter.acquire()).await;
        assert!(
            second.is_err(),
            "a second run waits while the first holds the slot"
        );
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(5), limiter.acquire()).await;
        assert!(third.is_ok());
    }
}
