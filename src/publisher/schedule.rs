//! Delayed publishing through the delay queues ([`crate::DelayChain`]):
//! [`Publisher::publish_at`] and [`Publisher::publish_after`].

use std::{sync::atomic::Ordering, time::Duration};

use chrono::{DateTime, Utc};
use lapin::types::AMQPValue;

use super::Publisher;
use crate::{
    delay::{DelayChain, KEY_PREFIX},
    error::{Error, Result},
    event::{DomainEvent, EventMeta},
    wire::{headers, long_string, string_array},
};

/// The header RabbitMQ routes on besides the routing key
/// (<https://www.rabbitmq.com/docs/sender-selected>).
const CC: &str = "CC";

/// A delayed event the broker has confirmed: what [`Publisher::publish_at`]
/// and [`Publisher::publish_after`] return.
///
/// A message in a delay queue cannot be taken back (RabbitMQ removes messages
/// only from a queue's head), so this has no cancel. To cancel, enqueue the
/// event with `burrow::outbox::enqueue_at` (feature `postgres`) and call
/// `burrow::outbox::cancel`, or let the handler check, at delivery, whether
/// the event still applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    /// The event's message id (the consumers' de-duplication key).
    pub message_id: String,
    /// When the event was asked to arrive.
    pub due_at: DateTime<Utc>,
    /// How long it waits in the delay queues: the delay rounded up to a
    /// whole second; zero when it was due already and was published at once.
    pub waits: Duration,
}

impl Publisher {
    /// Publishes `event` so that it reaches every subscribed app at `when`,
    /// and not before; see [`Publisher::publish_after`].
    ///
    /// ```no_run
    /// # use chrono::{DateTime, Utc};
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # #[serde(rename_all = "camelCase")]
    /// # pub struct ReservationExpiredEvent { aggregate_id: String, occurred_at: DateTime<Utc> }
    /// # impl burrow::Event for ReservationExpiredEvent {
    /// #     const EVENT_TYPE: &'static str = "ReservationExpiredEvent";
    /// # }
    /// # impl burrow::DomainEvent for ReservationExpiredEvent {
    /// #     fn aggregate_id(&self) -> String { self.aggregate_id.clone() }
    /// #     fn occurred_at(&self) -> DateTime<Utc> { self.occurred_at }
    /// # }
    /// # async fn run(publisher: burrow::Publisher) -> burrow::Result<()> {
    /// let at_six = "2026-11-24T18:00:00Z".parse::<DateTime<Utc>>().expect("a time");
    /// let event = ReservationExpiredEvent { aggregate_id: "reservation-7".into(), occurred_at: at_six };
    /// let scheduled = publisher.publish_at(&event, at_six).await?;
    /// println!("{} arrives at {} or up to a second later", scheduled.message_id, scheduled.due_at);
    /// # Ok(()) }
    /// ```
    pub async fn publish_at<E: DomainEvent>(
        &self,
        event: &E,
        when: DateTime<Utc>,
    ) -> Result<Scheduled> {
        self.publish_at_with(event, when, EventMeta::default())
            .await
    }

    /// [`Publisher::publish_at`] with explicit ids.
    pub async fn publish_at_with<E: DomainEvent>(
        &self,
        event: &E,
        when: DateTime<Utc>,
        meta: EventMeta,
    ) -> Result<Scheduled> {
        // Declared before the delay is measured, so that the first delayed
        // publish does not arrive late by the time the declaration took.
        if when > Utc::now() {
            self.declare_delay_queues(false).await?;
        }
        // A time in the past is due now: it is published at once.
        let delay = (when - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        self.schedule(event, when, delay, meta).await
    }

    /// Publishes `event` so that it reaches every subscribed app after
    /// `delay`, and not before.
    ///
    /// It waits in the delay queues in front of the exchange (declared by
    /// this publisher before its first delayed publish) for `delay` rounded
    /// up to a whole second, then the broker routes it like a direct publish.
    /// It returns once the broker confirmed the event into the first delay
    /// queue: the event is stored. Mandatory can check only that queue; an
    /// event that, when due, finds no queue bound for its type waits in the
    /// last delay queue until one is (docs/wire-contract.md, "Delay queues").
    ///
    /// Fails with [`Error::DelayTooLong`] past [`DelayChain::MAX_DELAY`]
    /// (about 388 days); otherwise like [`Publisher::publish`].
    ///
    /// ```no_run
    /// # use chrono::{DateTime, Utc};
    /// # #[derive(serde::Serialize, serde::Deserialize)]
    /// # #[serde(rename_all = "camelCase")]
    /// # pub struct ReminderDueEvent { aggregate_id: String, occurred_at: DateTime<Utc> }
    /// # impl burrow::Event for ReminderDueEvent {
    /// #     const EVENT_TYPE: &'static str = "ReminderDueEvent";
    /// # }
    /// # impl burrow::DomainEvent for ReminderDueEvent {
    /// #     fn aggregate_id(&self) -> String { self.aggregate_id.clone() }
    /// #     fn occurred_at(&self) -> DateTime<Utc> { self.occurred_at }
    /// # }
    /// # async fn run(publisher: burrow::Publisher) -> burrow::Result<()> {
    /// let event = ReminderDueEvent { aggregate_id: "card-1".into(), occurred_at: Utc::now() };
    /// publisher
    ///     .publish_after(&event, std::time::Duration::from_secs(24 * 3600))
    ///     .await?; // stored; handlers see it in 24 hours (and at most a second more)
    /// # Ok(()) }
    /// ```
    pub async fn publish_after<E: DomainEvent>(
        &self,
        event: &E,
        delay: Duration,
    ) -> Result<Scheduled> {
        self.publish_after_with(event, delay, EventMeta::default())
            .await
    }

    /// [`Publisher::publish_after`] with explicit ids.
    pub async fn publish_after_with<E: DomainEvent>(
        &self,
        event: &E,
        delay: Duration,
        meta: EventMeta,
    ) -> Result<Scheduled> {
        let too_long = || Error::DelayTooLong {
            event_type: E::EVENT_TYPE.to_owned(),
            delay,
            max: DelayChain::MAX_DELAY,
        };
        if DelayChain::round_up(delay) > DelayChain::MAX_DELAY {
            return Err(too_long());
        }
        let due_at = chrono::Duration::from_std(delay)
            .ok()
            .and_then(|d| Utc::now().checked_add_signed(d))
            .ok_or_else(too_long)?;
        self.schedule(event, due_at, delay, meta).await
    }

    async fn schedule<E: DomainEvent>(
        &self,
        event: &E,
        due_at: DateTime<Utc>,
        delay: Duration,
        mut meta: EventMeta,
    ) -> Result<Scheduled> {
        let waits = DelayChain::round_up(delay);
        let message_id = meta
            .message_id
            .get_or_insert_with(|| uuid::Uuid::new_v4().to_string())
            .clone();
        let scheduled = Scheduled {
            message_id,
            due_at,
            waits,
        };
        if waits.is_zero() {
            self.publish_with(event, meta).await?;
            return Ok(scheduled);
        }
        if E::EVENT_TYPE.split('.').next() == Some(KEY_PREFIX) {
            return Err(Error::InvalidEvent {
                event_type: E::EVENT_TYPE.to_owned(),
                reason: format!(
                    "its first word is '{KEY_PREFIX}', which the delay queues' routing keys begin with; rename the event type"
                ),
            });
        }
        let chain = &self.inner.delay;
        let key = chain.routing_key(E::EVENT_TYPE, waits)?;
        let (body, properties) = self.encode(event, meta)?;
        let mut table = properties.headers().clone().unwrap_or_default();
        // The delivery's routing key is the chain's; the consumer reads the
        // event type from this header instead (docs/wire-contract.md §7).
        table.insert(headers::EVENT_TYPE.into(), long_string(E::EVENT_TYPE));
        table.insert(CC.into(), string_array(&[E::EVENT_TYPE.to_owned()]));
        table.insert(
            headers::DUE_AT.into(),
            AMQPValue::LongLongInt(due_at.timestamp_millis()),
        );
        let properties = properties.with_headers(table);

        // Declared once per publisher. Should a level have been deleted
        // since (the entry exchange is gone, or routes to no queue),
        // declare again and send once more.
        self.declare_delay_queues(false).await?;
        let send = || self.send_counted(E::EVENT_TYPE, chain.entry(), &key, &body, &properties);
        match send().await {
            Err(e) if chain_missing(&e) => {
                tracing::warn!(error = %e, "delay queues missing; declaring them again");
                self.declare_delay_queues(true).await?;
                send().await?;
            }
            other => other?,
        }
        Ok(scheduled)
    }

    /// Declares the delay queues on the publisher's connection, unless done
    /// before (and `again` is false). Concurrent first publishes may both
    /// declare: declaring is idempotent.
    async fn declare_delay_queues(&self, again: bool) -> Result<()> {
        if again || !self.inner.delay_declared.load(Ordering::Acquire) {
            let connection = self.inner.pool.manager().connection().await?;
            self.inner.delay.declare(&connection).await?;
            self.inner.delay_declared.store(true, Ordering::Release);
        }
        Ok(())
    }
}

/// Whether a publish into the chain failed because part of it is gone: the
/// entry exchange (`NOT_FOUND`) or a level queue (returned as unroutable).
fn chain_missing(error: &Error) -> bool {
    match error {
        Error::Unroutable { .. } => true,
        Error::Amqp { source, .. } => matches!(
            source.kind(),
            lapin::ErrorKind::ProtocolError(e)
                if matches!(e.kind(), lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND))
        ),
        _ => false,
    }
}
