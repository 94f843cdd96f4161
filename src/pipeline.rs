//! From one delivery to one [`Settlement`], with no broker involved.
//!
//! The pipeline reads the metadata, guards against bodies it must not touch
//! (too large, compressed), picks the handlers the delivery is for, runs them
//! concurrently — each under a timeout and a panic guard — and turns their
//! outcomes into exactly one settlement. The consumer then carries the
//! settlement out (publish with confirm, then ack). Keeping this part free of
//! I/O lets it be tested exhaustively without RabbitMQ, and lets handler
//! authors run their handlers through the real decision logic
//! ([`Pipeline::process`]).

use std::{
    fmt,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::FutureExt;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;

use crate::{
    handler::{Context, Failure, Registry},
    retry::{RetryLadder, RetryStep},
    wire::Incoming,
};

/// Why a message was dead-lettered; written to the `burrow-dead-reason` header
/// and used as the `reason` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadReason {
    /// A handler kept failing transiently until the ladder ran out.
    AttemptsExhausted,
    /// A handler returned [`crate::HandlerError::Permanent`].
    Permanent,
    /// The body is not JSON, or not the shape the handler's event expects.
    Undecodable,
    /// A `burrow-*` header has the wrong type or an impossible value.
    BadHeaders,
    /// The body exceeds `consumer.max_body_bytes`.
    TooLarge,
    /// The body has a `content_encoding` burrow does not decode (gzip, ...).
    UnsupportedEncoding,
    /// The message names a handler this app does not have (renamed or removed).
    UnknownHandler,
}

impl DeadReason {
    /// The header and label value (`attempts_exhausted`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            DeadReason::AttemptsExhausted => "attempts_exhausted",
            DeadReason::Permanent => "permanent",
            DeadReason::Undecodable => "undecodable",
            DeadReason::BadHeaders => "bad_headers",
            DeadReason::TooLarge => "too_large",
            DeadReason::UnsupportedEncoding => "unsupported_encoding",
            DeadReason::UnknownHandler => "unknown_handler",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Move a copy to a retry step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryMove {
    /// The step to publish to.
    pub step: RetryStep,
    /// The handlers that failed transiently and will run again.
    pub handlers: Vec<String>,
    /// `handler: error` for each of them.
    pub errors: Vec<String>,
}

/// Move a copy to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterMove {
    /// Why.
    pub reason: DeadReason,
    /// The handlers that failed for good (run again on replay). Empty when
    /// no handler ran (too large, bad headers, ...): replay runs them all.
    pub handlers: Vec<String>,
    /// `handler: error` lines, or the reason's detail.
    pub errors: Vec<String>,
}

/// The one way a delivery ends. Produced by [`Pipeline::process`], carried
/// out by the consumer: any copy is published with a confirm before the ack.
#[must_use = "a delivery must be settled exactly once"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Every handler succeeded: ack.
    Ack,
    /// Nothing in this app handles the event type (a stale binding): ack.
    Ignore {
        /// Why it was ignored.
        reason: String,
    },
    /// Some handlers failed transiently: copy to the retry step, then ack.
    Retry(RetryMove),
    /// Copy to the dead-letter queue, then ack.
    DeadLetter(DeadLetterMove),
    /// Some handlers failed transiently and others for good: both copies,
    /// each naming only its own handlers, then ack.
    RetryAndDeadLetter(RetryMove, DeadLetterMove),
}

impl Settlement {
    /// The retry move, if any.
    pub fn retry(&self) -> Option<&RetryMove> {
        match self {
            Settlement::Retry(r) | Settlement::RetryAndDeadLetter(r, _) => Some(r),
            Settlement::Ack | Settlement::Ignore { .. } | Settlement::DeadLetter(_) => None,
        }
    }

    /// The dead-letter move, if any.
    pub fn dead_letter(&self) -> Option<&DeadLetterMove> {
        match self {
            Settlement::DeadLetter(d) | Settlement::RetryAndDeadLetter(_, d) => Some(d),
            Settlement::Ack | Settlement::Ignore { .. } | Settlement::Retry(_) => None,
        }
    }
}

/// One handler's run.
#[derive(Debug)]
pub struct HandlerRun {
    /// The handler's name.
    pub handler: Arc<str>,
    /// `Ok` or why it failed.
    pub result: Result<(), Failure>,
    /// How long it ran (zero when it never started).
    pub duration: Duration,
}

/// What [`Pipeline::process`] decided.
#[derive(Debug)]
pub struct Processed {
    /// The delivery's metadata.
    pub incoming: Incoming,
    /// Every handler that was selected, in registry order.
    pub runs: Vec<HandlerRun>,
    /// How the delivery must end.
    pub settlement: Settlement,
}

/// The decision logic of the consumer.
#[derive(Debug, Clone)]
pub struct Pipeline {
    registry: Arc<Registry>,
    ladder: RetryLadder,
    handler_timeout: Duration,
    max_body_bytes: usize,
}

impl Pipeline {
    /// A pipeline over `registry` with the given ladder and limits.
    pub fn new(
        registry: Arc<Registry>,
        ladder: RetryLadder,
        handler_timeout: Duration,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            registry,
            ladder,
            handler_timeout,
            max_body_bytes,
        }
    }

    /// The ladder in use.
    pub fn ladder(&self) -> &RetryLadder {
        &self.ladder
    }

    /// Runs the handlers a delivery is for and decides its settlement.
    pub async fn process(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: &BasicProperties,
        body: &[u8],
        shutdown: &CancellationToken,
    ) -> Processed {
        let incoming = Incoming::read(exchange, routing_key, properties, body);
        let dead = |reason: DeadReason, detail: String| {
            Settlement::DeadLetter(DeadLetterMove {
                reason,
                handlers: Vec::new(),
                errors: vec![detail],
            })
        };

        if body.len() > self.max_body_bytes {
            let s = dead(
                DeadReason::TooLarge,
                format!(
                    "body is {} bytes; consumer.max_body_bytes is {}",
                    body.len(),
                    self.max_body_bytes
                ),
            );
            return Processed {
                incoming,
                runs: Vec::new(),
                settlement: s,
            };
        }
        if let Some(encoding) = properties.content_encoding()
            && !matches!(encoding.as_str(), "" | "identity" | "utf-8" | "UTF-8")
        {
            let s = dead(
                DeadReason::UnsupportedEncoding,
                format!(
                    "content_encoding {:?} is not supported; publish uncompressed JSON",
                    encoding.as_str()
                ),
            );
            return Processed {
                incoming,
                runs: Vec::new(),
                settlement: s,
            };
        }
        if let Some(problem) = &incoming.problem {
            let s = dead(DeadReason::BadHeaders, problem.clone());
            return Processed {
                incoming,
                runs: Vec::new(),
                settlement: s,
            };
        }

        // Which handlers: those named on a retry/replay copy, else every
        // handler whose binding key matches the event type.
        let mut runs = Vec::new();
        let mut selected = Vec::new();
        match &incoming.pending_handlers {
            Some(names) => {
                for name in names {
                    match self.registry.get(name) {
                        Some(h) => selected.push(h.clone()),
                        None => runs.push(HandlerRun {
                            handler: Arc::from(name.as_str()),
                            result: Err(Failure::UnknownHandler),
                            duration: Duration::ZERO,
                        }),
                    }
                }
            }
            None => selected.extend(self.registry.subscribed_to(&incoming.event_type).cloned()),
        }
        if selected.is_empty() && runs.is_empty() {
            let settlement = Settlement::Ignore {
                reason: format!(
                    "no handler of this app subscribes to {:?}",
                    incoming.event_type
                ),
            };
            return Processed {
                incoming,
                runs,
                settlement,
            };
        }

        let started = selected.iter().map(|handler| {
            let ctx = Context {
                message_id: incoming.message_id.clone(),
                correlation_id: incoming.correlation_id.clone(),
                causation_id: incoming.causation_id.clone(),
                event_type: incoming.event_type.clone(),
                attempt: incoming.attempt,
                headers: properties.headers().clone().unwrap_or_default(),
                handler: handler.name_arc(),
                shutdown: shutdown.child_token(),
            };
            let name = handler.name_arc();
            let start = handler.start(body, ctx);
            let timeout = self.handler_timeout;
            async move {
                let begun = Instant::now();
                let result = match start {
                    Err(failure) => Err(failure),
                    Ok(fut) => {
                        match tokio::time::timeout(timeout, AssertUnwindSafe(fut).catch_unwind())
                            .await
                        {
                            Err(_) => Err(Failure::TimedOut(timeout)),
                            Ok(Err(panic)) => Err(Failure::Panicked(panic_message(&*panic))),
                            Ok(Ok(Err(e))) => Err(Failure::Handler(e)),
                            Ok(Ok(Ok(()))) => Ok(()),
                        }
                    }
                };
                HandlerRun {
                    handler: name,
                    result,
                    duration: begun.elapsed(),
                }
            }
        });
        let mut ran = futures_util::future::join_all(started).await;
        ran.append(&mut runs);
        let settlement = self.decide(&incoming, &ran);
        Processed {
            incoming,
            runs: ran,
            settlement,
        }
    }

    fn decide(&self, incoming: &Incoming, runs: &[HandlerRun]) -> Settlement {
        let mut retry_handlers = Vec::new();
        let mut retry_errors = Vec::new();
        let mut dead_handlers = Vec::new();
        let mut dead_errors = Vec::new();
        let mut dead_reason = None;

        for run in runs {
            let Err(failure) = &run.result else { continue };
            let line = format!("{}: {failure}", run.handler);
            if failure.is_retryable() {
                retry_handlers.push(run.handler.to_string());
                retry_errors.push(line);
            } else {
                dead_reason.get_or_insert(match failure {
                    Failure::Undecodable(_) => DeadReason::Undecodable,
                    Failure::UnknownHandler => DeadReason::UnknownHandler,
                    Failure::Handler(_) | Failure::Panicked(_) | Failure::TimedOut(_) => {
                        DeadReason::Permanent
                    }
                });
                dead_handlers.push(run.handler.to_string());
                dead_errors.push(line);
            }
        }

        let retry = if retry_handlers.is_empty() {
            None
        } else {
            match self.ladder.after_attempt(incoming.attempt) {
                Some(step) => Some(RetryMove {
                    step: step.clone(),
                    handlers: retry_handlers,
                    errors: retry_errors,
                }),
                None => {
                    // The ladder is used up: these join the dead letter.
                    dead_reason.get_or_insert(DeadReason::AttemptsExhausted);
                    dead_handlers.append(&mut retry_handlers);
                    dead_errors.append(&mut retry_errors);
                    None
                }
            }
        };
        let dead = dead_reason.map(|reason| DeadLetterMove {
            reason,
            handlers: dead_handlers,
            errors: dead_errors,
        });
        match (retry, dead) {
            (None, None) => Settlement::Ack,
            (Some(r), None) => Settlement::Retry(r),
            (None, Some(d)) => Settlement::DeadLetter(d),
            (Some(r), Some(d)) => Settlement::RetryAndDeadLetter(r, d),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
