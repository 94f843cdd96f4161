//! Typed handlers and the [`Registry`] that holds them.
//!
//! A handler names itself, subscribes to one binding key (by default its
//! event's type) and turns a typed event plus a [`Context`] into
//! `Ok(())` or a [`HandlerError`] that says whether to retry. Handlers never
//! acknowledge anything: the consumer settles each delivery once, from the
//! outcomes of all handlers that ran (see [`crate::pipeline`]).

mod broadcast;
mod limits;

use std::{collections::HashSet, fmt, future::Future, pin::Pin, sync::Arc};

use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    event::Event,
    limit::{HandlerLimits, Limiter},
    message::Headers,
    topic,
};

/// A boxed error from handler code.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a handler returns on failure. The variant is the verdict.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth trying again later (a timeout, a 503, a lock conflict): the
    /// message moves to the next step of the retry ladder.
    #[error("{0}")]
    Transient(BoxError),
    /// Will never succeed (invalid data, a missing aggregate that will not
    /// appear): the message goes to the dead-letter queue at once.
    #[error("{0}")]
    Permanent(BoxError),
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        HandlerError::Transient(error.into())
    }

    /// A failure that retrying cannot fix.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        HandlerError::Permanent(error.into())
    }

    /// Whether the message should be retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            HandlerError::Transient(_) => true,
            HandlerError::Permanent(_) => false,
        }
    }
}

/// `?`-friendly classification of any error inside a handler.
///
/// ```
/// use burrow::{HandlerError, ResultExt};
///
/// fn parse(n: &str) -> Result<u32, HandlerError> {
///     n.parse::<u32>().permanent()
/// }
/// assert!(!parse("x").unwrap_err().is_retryable());
/// ```
pub trait ResultExt<T> {
    /// Maps the error to [`HandlerError::Transient`].
    fn transient(self) -> Result<T, HandlerError>;
    /// Maps the error to [`HandlerError::Permanent`].
    fn permanent(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::transient)
    }
    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
}

/// What a handler knows about the delivery it is handling.
#[derive(Debug, Clone)]
pub struct Context {
    /// The message id (the publisher's, or a stable derived one).
    pub message_id: String,
    /// The correlation id, if the publisher set one.
    pub correlation_id: Option<String>,
    /// The causation id, if the publisher set one.
    pub causation_id: Option<String>,
    /// The event type (routing key).
    pub event_type: String,
    /// This delivery's attempt number, from 1.
    pub attempt: u32,
    /// The message headers as received.
    pub headers: Headers,
    /// The running handler's name.
    pub handler: Arc<str>,
    /// Cancelled when the worker starts shutting down; long handlers may
    /// watch it and return a transient error to be retried elsewhere.
    pub shutdown: CancellationToken,
}

impl Context {
    /// A context for calling a handler directly in a unit test: attempt 1,
    /// a random message id, no headers.
    ///
    /// ```
    /// let ctx = burrow::Context::for_test("CollectionCreatedEvent", "search.index");
    /// assert_eq!(ctx.attempt, 1);
    /// ```
    pub fn for_test(event_type: &str, handler: &str) -> Self {
        Context {
            message_id: uuid::Uuid::new_v4().to_string(),
            correlation_id: None,
            causation_id: None,
            event_type: event_type.to_owned(),
            attempt: 1,
            headers: Headers::default(),
            handler: Arc::from(handler),
            shutdown: CancellationToken::new(),
        }
    }
}

/// A typed event handler.
///
/// Most handlers are closures registered with [`Registry::on`]; implement
/// this trait for handlers that carry dependencies (a database pool, a
/// client) or subscribe with a topic wildcard.
///
/// ```
/// use burrow::{Context, DomainEvent, Event, Handler, HandlerError};
/// # use chrono::{DateTime, Utc};
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # pub struct CollectionCreatedEvent { aggregate_id: String }
/// # impl Event for CollectionCreatedEvent {
/// #     const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
/// # }
/// #
/// # impl DomainEvent for CollectionCreatedEvent {
/// #     fn aggregate_id(&self) -> String { self.aggregate_id.clone() }
/// #     fn occurred_at(&self) -> DateTime<Utc> { Utc::now() }
/// # }
///
/// struct IndexCollection;
///
/// impl Handler for IndexCollection {
///     type Event = CollectionCreatedEvent;
///
///     fn name(&self) -> &str {
///         "search.index_collection"
///     }
///
///     async fn handle(&self, event: Self::Event, ctx: Context) -> Result<(), HandlerError> {
///         println!("indexing {} (attempt {})", event.aggregate_id, ctx.attempt);
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send + Sync + 'static {
    /// The event this handler decodes.
    type Event: Event;

    /// A stable name, unique in the app. It is a contract: it appears in
    /// retry and dead-letter headers (so a retry runs only the handlers that
    /// failed) and in metrics. Renaming a handler orphans its pending retries.
    fn name(&self) -> &str;

    /// The binding key on the exchange; defaults to the event type. Topic
    /// wildcards (`*` one word, `#` any number) are allowed.
    fn binding_key(&self) -> &str {
        Self::Event::EVENT_TYPE
    }

    /// Handles one event.
    fn handle(
        &self,
        event: Self::Event,
        ctx: Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

/// Why one handler did not succeed; the consumer turns this into a settlement.
#[derive(Debug)]
pub enum Failure {
    /// The handler returned an error.
    Handler(HandlerError),
    /// The body did not decode into the handler's event type.
    Undecodable(String),
    /// The handler panicked; the worker caught it.
    Panicked(String),
    /// The handler ran longer than `consumer.handler_timeout`.
    TimedOut(std::time::Duration),
    /// A retry or replay names a handler this app no longer has.
    UnknownHandler,
}

impl Failure {
    /// Whether the ladder should try this handler again: `None` from
    /// [`Failure::dead_reason`].
    pub fn is_retryable(&self) -> bool {
        self.dead_reason().is_none()
    }

    /// The verdict on this failure, one `match` for both questions: `None`
    /// when the ladder tries the handler again, else why the message is
    /// dead-lettered at once.
    pub fn dead_reason(&self) -> Option<crate::wire::DeadReason> {
        use crate::wire::DeadReason;
        match self {
            Failure::Handler(HandlerError::Transient(_)) => None,
            Failure::Handler(HandlerError::Permanent(_)) => Some(DeadReason::Permanent),
            Failure::Undecodable(_) => Some(DeadReason::Undecodable),
            // A panic or a timeout may be the moment, not the message.
            Failure::Panicked(_) => None,
            Failure::TimedOut(_) => None,
            Failure::UnknownHandler => Some(DeadReason::UnknownHandler),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Handler(HandlerError::Transient(e)) => write!(f, "transient error: {e}"),
            Failure::Handler(HandlerError::Permanent(e)) => write!(f, "permanent error: {e}"),
            Failure::Undecodable(e) => write!(f, "body does not decode: {e}"),
            Failure::Panicked(msg) => write!(f, "handler panicked: {msg}"),
            Failure::TimedOut(d) => write!(
                f,
                "handler timed out after {}",
                humantime::format_duration(*d)
            ),
            Failure::UnknownHandler => f.write_str(
                "no handler of this name is registered in this app (renamed or removed?); \
                 replay it with --handler set to the new name",
            ),
        }
    }
}

type ErasedCall = dyn Fn(&[u8], Context) -> Result<HandlerFuture, Failure> + Send + Sync;

/// A registered handler with its type erased.
#[derive(Clone)]
pub struct RegisteredHandler {
    name: Arc<str>,
    binding_key: String,
    event_type: &'static str,
    // A function, not the schema: only `burrow asyncapi` asks for it, so a
    // worker never builds one.
    payload_schema: fn() -> Option<serde_json::Value>,
    call: Arc<ErasedCall>,
    limits: HandlerLimits,
    /// The permits every delivery of one worker shares; made by the worker
    /// from `limits` (see [`Registry::arm_limits`]).
    limiter: Option<Arc<Limiter>>,
    /// Runs on every instance of the app, from a queue of its own
    /// ([`Registry::broadcast`]), not from the app queue.
    broadcast: bool,
}

impl RegisteredHandler {
    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The binding key it subscribes with.
    pub fn binding_key(&self) -> &str {
        &self.binding_key
    }

    /// The `EVENT_TYPE` of the event it decodes.
    pub fn event_type(&self) -> &'static str {
        self.event_type
    }

    /// The JSON Schema of the event view it decodes ([`Event::payload_schema`]).
    pub fn payload_schema(&self) -> Option<serde_json::Value> {
        (self.payload_schema)()
    }

    pub(crate) fn name_arc(&self) -> Arc<str> {
        self.name.clone()
    }

    /// Whether it runs on every instance ([`Registry::broadcast`]).
    pub fn is_broadcast(&self) -> bool {
        self.broadcast
    }

    /// Its concurrency and rate limits ([`Registry::limit`], `[limits]`).
    pub fn limits(&self) -> HandlerLimits {
        self.limits
    }

    /// The permits a run must hold first, when the handler is limited.
    pub(crate) fn limiter(&self) -> Option<Arc<Limiter>> {
        self.limiter.clone()
    }

    /// Decodes `body` and starts the handler. Decoding happens here, before
    /// any future exists, so a bad body costs no task.
    pub(crate) fn start(&self, body: &[u8], ctx: Context) -> Result<HandlerFuture, Failure> {
        (self.call)(body, ctx)
    }
}

impl fmt::Debug for RegisteredHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisteredHandler")
            .field("name", &self.name)
            .field("binding_key", &self.binding_key)
            .field("event_type", &self.event_type)
            .field("limits", &self.limits)
            .field("broadcast", &self.broadcast)
            .finish()
    }
}

/// All handlers of one app. Handler modules add theirs through a
/// `register(&mut Registry)` function; duplicate names are rejected.
///
/// ```
/// use burrow::{Context, HandlerError, Registry};
/// # use chrono::{DateTime, Utc};
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # pub struct CollectionCreatedEvent { aggregate_id: String }
/// # impl burrow::Event for CollectionCreatedEvent {
/// #     const EVENT_TYPE: &'static str = "CollectionCreatedEvent";
/// # }
/// #
/// # impl burrow::DomainEvent for CollectionCreatedEvent {
/// #     fn aggregate_id(&self) -> String { self.aggregate_id.clone() }
/// #     fn occurred_at(&self) -> DateTime<Utc> { Utc::now() }
/// # }
///
/// let mut registry = Registry::new();
/// registry.on("audit.collection_created", |event: CollectionCreatedEvent, _ctx: Context| async move {
///     println!("collection {} created", event.aggregate_id);
///     Ok::<_, HandlerError>(())
/// })?;
/// assert!(registry.on("audit.collection_created", |_: CollectionCreatedEvent, _: Context| async { Ok(()) }).is_err());
/// assert_eq!(registry.binding_keys(), vec!["CollectionCreatedEvent".to_string()]);
/// # Ok::<(), burrow::Error>(())
/// ```
#[derive(Debug, Default, Clone)]
pub struct Registry {
    handlers: Vec<RegisteredHandler>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a [`Handler`]. Fails when the name is taken or invalid, or the
    /// binding key is not a valid topic pattern.
    pub fn add<H: Handler>(&mut self, handler: H) -> Result<&mut Self> {
        let name: Arc<str> = Arc::from(handler.name());
        let binding_key = handler.binding_key().to_owned();
        let handler = Arc::new(handler);
        let call = move |body: &[u8], ctx: Context| -> Result<HandlerFuture, Failure> {
            let event: H::Event =
                serde_json::from_slice(body).map_err(|e| Failure::Undecodable(e.to_string()))?;
            let handler = handler.clone();
            Ok(Box::pin(async move { handler.handle(event, ctx).await }))
        };
        self.insert(RegisteredHandler {
            name,
            binding_key,
            event_type: H::Event::EVENT_TYPE,
            payload_schema: H::Event::payload_schema,
            call: Arc::new(call),
            limits: HandlerLimits::default(),
            limiter: None,
            broadcast: false,
        })
    }

    /// Adds a closure handler for event `E`, subscribed to `E::EVENT_TYPE`.
    pub fn on<E, F, Fut>(&mut self, name: &str, f: F) -> Result<&mut Self>
    where
        E: Event,
        F: Fn(E, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.add(FnHandler {
            name: name.to_owned(),
            f,
            _event: std::marker::PhantomData,
        })
    }

    fn insert(&mut self, handler: RegisteredHandler) -> Result<&mut Self> {
        let name = handler.name();
        if name.is_empty()
            || name.len() > 120
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        {
            return Err(Error::registry(
                Some(name),
                format!(
                    "handler name {name:?} is invalid: use 1-120 letters, digits, '.', '_', '-' or ':' \
                 (it is written into message headers and metric labels)"
                ),
            ));
        }
        if self.handlers.iter().any(|h| h.name() == name) {
            return Err(Error::registry(
                Some(name),
                format!(
                    "two handlers are named {name:?}; handler names must be unique in an app \
                 because retries and dead letters address handlers by name. Rename one of them"
                ),
            ));
        }
        topic::validate_binding_key(handler.binding_key()).map_err(|why| {
            Error::registry(
                Some(name),
                format!(
                    "handler {name:?} subscribes with binding key {:?}: {why}",
                    handler.binding_key()
                ),
            )
        })?;
        self.handlers.push(handler);
        Ok(self)
    }

    /// Every registered handler, in registration order.
    pub fn handlers(&self) -> &[RegisteredHandler] {
        &self.handlers
    }

    /// Looks a handler up by name.
    pub fn get(&self, name: &str) -> Option<&RegisteredHandler> {
        self.handlers.iter().find(|h| h.name() == name)
    }

    /// Handlers of the app queue whose binding key matches `event_type`
    /// (broadcast handlers run from their own queue instead).
    pub fn subscribed_to<'a>(
        &'a self,
        event_type: &'a str,
    ) -> impl Iterator<Item = &'a RegisteredHandler> + 'a {
        self.handlers
            .iter()
            .filter(move |h| !h.broadcast && topic::matches(h.binding_key(), event_type))
    }

    /// The distinct binding keys of the app queue's handlers, sorted: one
    /// queue binding each.
    pub fn binding_keys(&self) -> Vec<String> {
        let set: HashSet<&str> = self
            .handlers
            .iter()
            .filter(|h| !h.broadcast)
            .map(|h| h.binding_key())
            .collect();
        let mut keys: Vec<String> = set.into_iter().map(str::to_owned).collect();
        keys.sort();
        keys
    }

    /// Number of handlers.
    pub fn len(&self) -> usize {
        self.handlers.len()
    }

    /// Whether no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }
}

struct FnHandler<E, F> {
    name: String,
    f: F,
    _event: std::marker::PhantomData<fn(E)>,
}

impl<E, F, Fut> Handler for FnHandler<E, F>
where
    E: Event,
    F: Fn(E, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    type Event = E;

    fn name(&self) -> &str {
        &self.name
    }

    fn handle(
        &self,
        event: E,
        ctx: Context,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.f)(event, ctx)
    }
}
