//! Several consumers of one channel as one stream, in delivery-tag order.
//!
//! An ordered app consumes its app queue and every shard queue on one
//! channel, so one ack window (`super::ack`) covers all their deliveries:
//! it needs them in the order of their delivery tags. lapin hands each
//! consumer its deliveries in that order, but a plain merge of the consumer
//! streams interleaves them in whatever order it polls. A channel numbers
//! its deliveries 1, 2, 3, … across all its consumers (AMQP 0-9-1 §1.8.3,
//! `delivery-tag`), so the merge holds a delivery back until every smaller
//! tag has been passed on.

use std::{
    collections::BTreeMap,
    pin::Pin,
    task::{Context, Poll},
};

use futures_util::{Stream, StreamExt};
use lapin::{Consumer, message::Delivery};

/// What a session's consumers yield: a delivery, an error, or `None` when
/// one of them ended (cancelled by the broker, or its channel closed).
pub(super) type Item = Option<lapin::Result<Delivery>>;

/// The consumers of one channel, merged in delivery-tag order.
pub(super) struct InTagOrder {
    consumers: Vec<Consumer>,
    held: BTreeMap<u64, Delivery>,
    /// The tag to pass on next.
    next: u64,
}

impl InTagOrder {
    /// Merges `consumers`, all on one fresh channel (whose first delivery
    /// tag is 1).
    pub(super) fn new(consumers: Vec<Consumer>) -> Self {
        Self {
            consumers,
            held: BTreeMap::new(),
            next: 1,
        }
    }
}

impl Stream for InTagOrder {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let this = &mut *self;
        loop {
            if let Some(delivery) = this.held.remove(&this.next) {
                this.next += 1;
                return Poll::Ready(Some(Some(Ok(delivery))));
            }
            // Take everything the consumers have now; each that has nothing
            // registers the waker, so a delivery to any of them wakes us.
            let mut took = false;
            for consumer in &mut this.consumers {
                loop {
                    match consumer.poll_next_unpin(cx) {
                        Poll::Ready(Some(Ok(delivery))) => {
                            took = true;
                            this.held.insert(delivery.delivery_tag, delivery);
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Some(Err(e)))),
                        Poll::Ready(None) => return Poll::Ready(Some(None)),
                        Poll::Pending => break,
                    }
                }
            }
            if !took {
                // The next tag may already be on its way to a consumer we
                // polled before it arrived: that consumer's waker brings us
                // back.
                return Poll::Pending;
            }
        }
    }
}
