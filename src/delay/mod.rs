//! Delayed delivery without the delayed-message plugin: a chain of TTL
//! queues that the broker walks on its own.
//!
//! The `rabbitmq_delayed_message_exchange` plugin is archived and does not run
//! on RabbitMQ 4.3, so burrow builds delays from what every broker has:
//! quorum queues with `x-message-ttl` and at-least-once dead-lettering.
//!
//! # Shape
//!
//! The chain has [`DelayChain::LEVELS`] levels; level `j` holds a message for
//! `2^j` seconds. Each level is an exchange and a quorum queue of the same
//! name, `<exchange>.delay.<j>.<2^j s>` (`domain_events.delay.3.8s`). A
//! delayed message is published to the top level's exchange with a routing
//! key that spells its delay in binary, most significant level first:
//!
//! ```text
//! burrow-delay.0.0.…(25 words)….1.0.1.CardAddedToLibraryEvent   (5 s = 4 s + 1 s)
//! ```
//!
//! Level `j`'s exchange routes on the word for level `j`: `1` into level
//! `j`'s queue, `0` on to level `j - 1`'s exchange (an exchange-to-exchange
//! binding). Level `j`'s queue dead-letters, when the TTL expires, to level
//! `j - 1`'s exchange **without** `x-dead-letter-routing-key`, so the
//! message keeps its routing key and the next level reads the next bit.
//! Level 0 hands over to the event exchange (`domain_events`). The message
//! therefore waits in exactly the levels whose bit is set and the waits add
//! up to its delay, rounded up to a whole second.
//!
//! # Reaching every subscribed app
//!
//! The delayed message carries the header `CC = [<event type>]`: RabbitMQ
//! routes a message with a `CC` header on those keys too
//! (<https://www.rabbitmq.com/docs/sender-selected>), and dead-lettering
//! without `x-dead-letter-routing-key` keeps every key the message was
//! published with, CC ones included
//! (<https://www.rabbitmq.com/docs/dlx#routing>). On the way down the `CC`
//! key matches none of the chain's bindings (they all start with the word
//! `burrow-delay`); at `domain_events` it matches every app's binding for the
//! event type, as a direct publish would. The `burrow-event-type` header
//! tells burrow's consumer the event type, since the delivery's routing key
//! is the chain's. The retry ladder is the opposite design: a retry must
//! reach one app only, so it goes by queue name through the default exchange.
//!
//! # Guarantees
//!
//! - **Never early.** A queue's TTL counts from when the message entered it,
//!   and the broker keeps that time across restarts (it expires a message
//!   whose time ran out while the broker was down at start-up, late rather
//!   than early). The waits add up to the delay rounded **up**.
//! - **Late by less than a second plus the hops.** The rounding adds less
//!   than 1 s; each level the message waits in adds one dead-letter hop
//!   (milliseconds), at most [`DelayChain::LEVELS`] of them.
//! - **At least once.** Quorum queues with `x-dead-letter-strategy =
//!   at-least-once` (RabbitMQ 3.10+, with `x-overflow = reject-publish`)
//!   confirm each hop internally; classic dead-lettering could lose a message
//!   (<https://www.rabbitmq.com/docs/quorum-queues#dead-lettering>). A message
//!   that finds no queue at the end stays in level 0's queue and the broker
//!   tries again, instead of dropping it.
//!
//! See docs/wire-contract.md, "Delay queues", for the entities and their
//! arguments.

mod declare;

use std::{collections::BTreeMap, time::Duration};

use crate::{
    error::{Error, Result},
    topology::{ArgValue, DEAD_LETTER_DELIVERY_LIMIT},
};

/// The first word of every routing key in the chain. The chain's bindings
/// all start with it, so a `CC` key (an event type) never matches them.
pub(crate) const KEY_PREFIX: &str = "burrow-delay";

/// One level of the chain: an exchange and a queue of the same name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DelayLevel {
    /// 0 for the shortest level.
    pub level: u32,
    /// How long a message waits in this level's queue: `2^level` seconds.
    pub delay: Duration,
    /// The name of the level's exchange and of its queue,
    /// `<exchange>.delay.<level>.<delay>`.
    pub name: String,
}

/// A binding of the chain: into a level's queue, or on to the next exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DelayBinding {
    /// The level exchange that routes.
    pub(crate) source: String,
    /// A queue (`to_queue`) or an exchange.
    pub(crate) destination: String,
    /// Whether the destination is a queue.
    pub(crate) to_queue: bool,
    /// The topic pattern on the level's word.
    pub(crate) key: String,
}

/// The delay queues of one event exchange; see the module documentation.
///
/// ```
/// use std::time::Duration;
/// use burrow::DelayChain;
///
/// let chain = DelayChain::new("domain_events");
/// assert_eq!(chain.levels()[3].name, "domain_events.delay.3.8s");
/// // 2.2 s waits 3 s: in the 2 s level, then in the 1 s level.
/// assert_eq!(DelayChain::round_up(Duration::from_millis(2200)), Duration::from_secs(3));
/// let key = chain.routing_key("CardAddedToLibraryEvent", Duration::from_secs(3)).unwrap();
/// assert!(key.ends_with(".0.1.1.CardAddedToLibraryEvent"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayChain {
    exchange: String,
    levels: Vec<DelayLevel>,
}

impl DelayChain {
    /// Number of levels: delays up to `2^25 - 1` seconds (about 388 days).
    pub const LEVELS: u32 = 25;

    /// The longest delay the chain holds: `2^LEVELS - 1` seconds.
    pub const MAX_DELAY: Duration = Duration::from_secs((1 << Self::LEVELS) - 1);

    /// The chain in front of the event exchange `exchange`.
    pub fn new(exchange: &str) -> Self {
        let levels = (0..Self::LEVELS)
            .map(|level| {
                let delay = Duration::from_secs(1 << level);
                DelayLevel {
                    level,
                    delay,
                    name: format!("{exchange}.delay.{level}.{}", label(delay)),
                }
            })
            .collect();
        Self {
            exchange: exchange.to_owned(),
            levels,
        }
    }

    /// The event exchange the chain delivers to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The levels, shortest first.
    pub fn levels(&self) -> &[DelayLevel] {
        &self.levels
    }

    /// The exchange delayed messages are published to: the top level's.
    pub fn entry(&self) -> &str {
        &self.levels[self.levels.len() - 1].name
    }

    /// How long a message asked to wait `delay` waits in the chain: `delay`
    /// rounded up to a whole second.
    pub fn round_up(delay: Duration) -> Duration {
        let whole = delay.as_secs();
        if delay.subsec_nanos() > 0 {
            Duration::from_secs(whole.saturating_add(1))
        } else {
            Duration::from_secs(whole)
        }
    }

    /// The routing key that takes an `event_type` message through the chain
    /// for `delay` (rounded up, see [`DelayChain::round_up`]).
    ///
    /// Fails with [`Error::DelayTooLong`] past [`DelayChain::MAX_DELAY`], and
    /// with [`Error::NameTooLong`] when the key would exceed AMQP's 255 bytes
    /// (event types of up to 192 bytes fit).
    pub fn routing_key(&self, event_type: &str, delay: Duration) -> Result<String> {
        let seconds = Self::round_up(delay).as_secs();
        if Duration::from_secs(seconds) > Self::MAX_DELAY {
            return Err(Error::DelayTooLong {
                event_type: event_type.to_owned(),
                delay,
                max: Self::MAX_DELAY,
            });
        }
        let mut key = String::with_capacity(KEY_PREFIX.len() + 2 * self.levels.len() + 1);
        key.push_str(KEY_PREFIX);
        for level in (0..Self::LEVELS).rev() {
            key.push_str(if seconds & (1 << level) != 0 {
                ".1"
            } else {
                ".0"
            });
        }
        key.push('.');
        key.push_str(event_type);
        crate::wire::short_string("routing key", &key)?;
        Ok(key)
    }

    /// Level `level`'s queue arguments: a quorum queue whose TTL is the
    /// level's delay and which dead-letters, keeping the routing key, to the
    /// next level's exchange (level 0: to the event exchange).
    pub(crate) fn queue_arguments(&self, level: &DelayLevel) -> BTreeMap<String, ArgValue> {
        let next = self.next(level.level);
        let mut args = BTreeMap::new();
        args.insert("x-queue-type".into(), ArgValue::Str("quorum".into()));
        args.insert(
            "x-message-ttl".into(),
            ArgValue::Int(level.delay.as_millis() as i64),
        );
        args.insert("x-dead-letter-exchange".into(), ArgValue::Str(next.into()));
        // No x-dead-letter-routing-key: the message keeps its routing keys
        // (the chain's and the CC one), which is what the next level reads.
        args.insert(
            "x-dead-letter-strategy".into(),
            ArgValue::Str("at-least-once".into()),
        );
        // at-least-once dead-lettering requires reject-publish.
        args.insert("x-overflow".into(), ArgValue::Str("reject-publish".into()));
        // Nothing consumes a level, so no delivery counts; set, RabbitMQ 4
        // stops defaulting it (and logging so) per queue.
        args.insert(
            "x-delivery-limit".into(),
            ArgValue::Int(DEAD_LETTER_DELIVERY_LIMIT),
        );
        args
    }

    /// Every binding of the chain: per level, bit 1 into its queue and bit 0
    /// on to the next exchange.
    pub(crate) fn bindings(&self) -> Vec<DelayBinding> {
        self.levels
            .iter()
            .flat_map(|level| {
                let skip = "*.".repeat((Self::LEVELS - 1 - level.level) as usize);
                [
                    DelayBinding {
                        source: level.name.clone(),
                        destination: level.name.clone(),
                        to_queue: true,
                        key: format!("{KEY_PREFIX}.{skip}1.#"),
                    },
                    DelayBinding {
                        source: level.name.clone(),
                        destination: self.next(level.level).to_owned(),
                        to_queue: false,
                        key: format!("{KEY_PREFIX}.{skip}0.#"),
                    },
                ]
            })
            .collect()
    }

    /// Where level `level` hands a message on to.
    fn next(&self, level: u32) -> &str {
        match level.checked_sub(1) {
            Some(below) => &self.levels[below as usize].name,
            None => &self.exchange,
        }
    }
}

/// `194d4h20m16s`: days, hours, minutes and seconds, without the months and
/// years humantime would use for long delays.
fn label(delay: Duration) -> String {
    let secs = delay.as_secs();
    let parts = [
        (secs / 86_400, "d"),
        (secs / 3600 % 24, "h"),
        (secs / 60 % 60, "m"),
        (secs % 60, "s"),
    ];
    let text: String = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if text.is_empty() { "0s".into() } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::matches;

    /// Follows the chain's bindings from the entry as the broker would and
    /// adds up the time spent in queues; returns it and the exchange reached.
    fn walk(chain: &DelayChain, key: &str) -> (Duration, String) {
        let bindings = chain.bindings();
        let mut at = chain.entry().to_owned();
        let mut waited = Duration::ZERO;
        while at != chain.exchange() {
            let routes: Vec<&DelayBinding> = bindings
                .iter()
                .filter(|b| b.source == at && matches(&b.key, key))
                .collect();
            assert_eq!(routes.len(), 1, "{key} at {at}: {routes:?}");
            let route = routes[0];
            if route.to_queue {
                let level = chain.levels().iter().find(|l| l.name == route.destination);
                let level = level.expect("a level queue");
                waited += level.delay;
                let ArgValue::Str(next) = &chain.queue_arguments(level)["x-dead-letter-exchange"]
                else {
                    panic!("a string dead-letter exchange");
                };
                at = next.clone();
            } else {
                at = route.destination.clone();
            }
        }
        (waited, at)
    }

    #[test]
    fn every_delay_waits_its_rounded_up_length_and_ends_at_the_exchange() {
        let chain = DelayChain::new("domain_events");
        for ms in [
            1, 999, 1000, 1001, 2200, 5000, 59_999, 86_400_000, 3_600_123,
        ] {
            let delay = Duration::from_millis(ms);
            let key = chain.routing_key("Card.Added", delay).unwrap();
            let (waited, end) = walk(&chain, &key);
            assert_eq!(waited, DelayChain::round_up(delay), "{ms} ms");
            assert!(waited >= delay);
            assert!(waited - delay < Duration::from_secs(1));
            assert_eq!(end, "domain_events");
        }
        let (waited, _) = walk(
            &chain,
            &chain.routing_key("E", DelayChain::MAX_DELAY).unwrap(),
        );
        assert_eq!(waited, DelayChain::MAX_DELAY);
    }

    #[test]
    fn an_event_type_as_cc_key_matches_no_binding_of_the_chain() {
        let chain = DelayChain::new("domain_events");
        let dotted = "a.b.1.c.0.d.1.e.f.g.h.i.j.k.l.m.n.o.p.q.r.s.t.u.v.w.x.y.z";
        for key in ["CardAddedToLibraryEvent", dotted] {
            assert!(chain.bindings().iter().all(|b| !matches(&b.key, key)));
        }
    }

    #[test]
    fn names_arguments_and_limits() {
        let chain = DelayChain::new("domain_events");
        assert_eq!(chain.entry(), "domain_events.delay.24.194d4h20m16s");
        assert_eq!(chain.levels()[6].name, "domain_events.delay.6.1m4s");
        let args = chain.queue_arguments(&chain.levels()[0]);
        assert_eq!(
            args["x-dead-letter-exchange"],
            ArgValue::Str("domain_events".into())
        );
        assert!(!args.contains_key("x-dead-letter-routing-key"));
        assert_eq!(args["x-message-ttl"], ArgValue::Int(1000));
        let args = chain.queue_arguments(&chain.levels()[5]);
        assert_eq!(
            args["x-dead-letter-exchange"],
            ArgValue::Str("domain_events.delay.4.16s".into())
        );
        let too_long = DelayChain::MAX_DELAY + Duration::from_millis(1);
        assert!(matches!(
            chain.routing_key("E", too_long),
            Err(Error::DelayTooLong { .. })
        ));
        assert!(chain.routing_key(&"e".repeat(192), Duration::ZERO).is_ok());
        assert!(chain.routing_key(&"e".repeat(193), Duration::ZERO).is_err());
    }
}
