//! The PostgreSQL add-on (feature `postgres`): the transactional outbox and
//! the idempotent inbox, in the app's own database.
//!
//! | file | job |
//! |---|---|
//! | `db.rs` | the pool, waiting for the database at start, burrow's migrations |
//! | `outbox.rs` | [`outbox::enqueue`] in the caller's transaction; the public face of the outbox |
//! | `relay.rs` | [`outbox::Relay`]: publishes committed rows with confirms, in order per aggregate |
//! | `schedule.rs` | scheduled events: [`outbox::enqueue_at`], [`outbox::cancel`], the relay's claim of due rows and its timer |
//! | `audit.rs` | one aggregate's events, the backlog, retention |
//! | `inbox.rs` | [`inbox::Inbox`]: a handler's side effects once per message |

mod audit;
mod db;
pub mod inbox;
pub mod outbox;
mod relay;
mod schedule;
