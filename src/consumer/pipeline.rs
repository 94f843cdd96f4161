//! From one delivery to one [`Settlement`], with no broker involved.
//!
//! The pipeline reads the metadata, guards against messages it must not touch
//! (body or headers too large, compressed body), picks the handlers the delivery is for, runs them
//! concurrently — each under a timeout and a panic guard — and turns their
//! outcomes into exactly one settlement. The consumer then carries the
//! settlement out (publish with confirm, then ack). Keeping this part free of
//! I/O lets it be tested exhaustively without RabbitMQ, and lets handler
//! authors run their handlers through the real decision logic
//! ([`Pipeline::process`]).

use std::{
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::FutureExt;
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    config::Settings,
    handler::{Context, Failure, Registry},
    message::Headers,
    metrics::RunOutcome,
    retry::{RetryLadder, RetryStep},
    wire::{DeadReason, HeaderBudget, Incoming},
};

/// What the top level of a JSON `body` is when it is a JSON value other
/// than an object (`an array`, `a string`, ...); `None` for an object, and
/// for text that is not JSON at all (each handler's decode reports that).
fn non_object_top_level(body: &[u8]) -> Option<&'static str> {
    let first = body
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    match first {
        b'[' => Some("an array"),
        b'"' => Some("a string"),
        b'-' | b'0'..=b'9' => Some("a number"),
        b't' | b'f' => Some("a boolean"),
        b'n' => Some("null"),
        _ => None,
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
    /// How long it ran (zero when it never started), not counting the wait
    /// for a permit.
    pub duration: Duration,
    /// How long it waited for a permit of its limits
    /// ([`crate::HandlerLimits`]); `None` for a handler without limits.
    pub waited: Option<Duration>,
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

impl Processed {
    /// How each of [`Processed::runs`] counts in `burrow_handler_runs_total`:
    /// succeeded, failed into the retry step, or failed into the dead-letter queue.
    pub fn run_outcomes(&self) -> impl Iterator<Item = RunOutcome> + '_ {
        let retrying = self.settlement.retry();
        self.runs.iter().map(move |run| {
            if run.result.is_ok() {
                RunOutcome::Ok
            } else if retrying.is_some_and(|r| r.handlers.iter().any(|h| **h == *run.handler)) {
                RunOutcome::Retry
            } else {
                RunOutcome::Dead
            }
        })
    }
}

/// The limits a [`Pipeline`] decides with.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Where transient failures go, step by step.
    pub ladder: RetryLadder,
    /// A handler running longer fails transiently (`consumer.handler_timeout`).
    pub handler_timeout: Duration,
    /// Larger bodies are dead-lettered unread (`consumer.max_body_bytes`).
    pub max_body_bytes: usize,
    /// How large and deep incoming headers may be, and what copies are fitted
    /// into (`consumer.max_header_bytes`).
    pub header_budget: HeaderBudget,
}

impl PipelineConfig {
    /// The limits `settings` configure, for its app queue.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            ladder: RetryLadder::new(&settings.app_queue(), &settings.retry.delays),
            handler_timeout: settings.consumer.handler_timeout,
            max_body_bytes: settings.consumer.max_body_bytes,
            header_budget: HeaderBudget::new(settings.consumer.max_header_bytes),
        }
    }
}

/// The decision logic of the consumer.
#[derive(Debug, Clone)]
pub struct Pipeline {
    registry: Arc<Registry>,
    ladder: RetryLadder,
    handler_timeout: Duration,
    max_body_bytes: usize,
    header_budget: HeaderBudget,
}

impl Pipeline {
    /// The handlers this pipeline runs.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A pipeline over `registry` with the given limits.
    pub fn new(registry: Arc<Registry>, config: PipelineConfig) -> Self {
        let PipelineConfig {
            ladder,
            handler_timeout,
            max_body_bytes,
            header_budget,
        } = config;
        Self {
            registry,
            ladder,
            handler_timeout,
            max_body_bytes,
            header_budget,
        }
    }

    /// The header budget in use; the consumer fits its copies into it.
    pub fn header_budget(&self) -> &HeaderBudget {
        &self.header_budget
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
        self.process_incoming(incoming, properties, body, shutdown)
            .await
    }

    /// [`Pipeline::process`] for a delivery whose metadata was read already
    /// (the consumer reads it first, to put it on the delivery's span).
    pub(crate) async fn process_incoming(
        &self,
        incoming: Incoming,
        properties: &BasicProperties,
        body: &[u8],
        shutdown: &CancellationToken,
    ) -> Processed {
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
        if let Some(headers) = properties.headers()
            && let Some(problem) = self.header_budget.check(headers)
        {
            let s = dead(DeadReason::HeadersTooLarge, problem);
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
        if let Some(problem) = &incoming.bad_header {
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
            // An empty list (a replayed letter no handler had failed on) means all.
            Some(names) if !names.is_empty() => {
                for name in names {
                    match self.registry.get(name) {
                        Some(h) => selected.push(h),
                        None => runs.push(HandlerRun {
                            handler: Arc::from(name.as_str()),
                            result: Err(Failure::UnknownHandler),
                            duration: Duration::ZERO,
                            waited: None,
                        }),
                    }
                }
            }
            _ => selected.extend(self.registry.subscribed_to(&incoming.event_type)),
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

        // serde's derived decoders read a JSON array as a struct's fields by
        // position (`["card-7","user-q"]` would decode, with the second
        // element taken as the second field): an event is an object, and
        // anything else is turned away before any handler decodes it.
        if let Some(kind) = non_object_top_level(body) {
            let failure = format!(
                "the body's top level is {kind}, not a JSON object; an event is an object of its fields, \
                 e.g. {{\"aggregateId\":\"card-1\"}}"
            );
            runs.extend(selected.iter().map(|handler| HandlerRun {
                handler: handler.name_arc(),
                result: Err(Failure::Undecodable(failure.clone())),
                duration: Duration::ZERO,
                waited: None,
            }));
            let settlement = self.decide(&incoming, &runs);
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
                headers: Headers::from_table(properties.headers().clone().unwrap_or_default()),
                handler: handler.name_arc(),
                shutdown: shutdown.child_token(),
            };
            let name = handler.name_arc();
            let start = handler.start(body, ctx);
            let limiter = handler.limiter();
            let timeout = self.handler_timeout;
            let span = tracing::info_span!("handler", handler = %name);
            async move {
                // A limited handler waits for its permit here, inside the
                // worker: no nack, no retry, no attempt spent. The timeout
                // and the duration start once it holds the permit.
                let mut waited = None;
                let decoded = start.is_ok();
                let _permit = match limiter.filter(|_| decoded) {
                    Some(limiter) => {
                        let permit = limiter.acquire().await;
                        waited = Some(permit.waited);
                        Some(permit)
                    }
                    None => None,
                };
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
                    waited,
                }
            }
            .instrument(span)
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
            match failure.dead_reason() {
                None => {
                    retry_handlers.push(run.handler.to_string());
                    retry_errors.push(line);
                }
                Some(reason) => {
                    dead_reason.get_or_insert(reason);
                    dead_handlers.push(run.handler.to_string());
                    dead_errors.push(line);
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DomainEvent, Event, HandlerError, wire::headers};
    use chrono::{DateTime, Utc};
    use lapin::types::{AMQPValue, FieldTable};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Ping {
        aggregate_id: String,
        mode: String,
    }

    impl Event for Ping {
        const EVENT_TYPE: &'static str = "Ping";
    }

    impl DomainEvent for Ping {
        fn aggregate_id(&self) -> String {
            self.aggregate_id.clone()
        }
        fn occurred_at(&self) -> DateTime<Utc> {
            Utc::now()
        }
    }

    /// Two handlers on `Ping`: `ok` always succeeds; `picky` fails the way
    /// the event's `mode` says.
    fn pipeline(delays: usize) -> Pipeline {
        let mut registry = Registry::new();
        registry
            .on("ok", |_: Ping, _| async { Ok(()) })
            .unwrap()
            .on("picky", |p: Ping, _| async move {
                match p.mode.as_str() {
                    "transient" => Err(HandlerError::transient("busy")),
                    "permanent" => Err(HandlerError::permanent("bad data")),
                    "panic" => panic!("boom"),
                    "hang" => {
                        std::future::pending::<()>().await;
                        Ok(())
                    }
                    _ => Ok(()),
                }
            })
            .unwrap();
        Pipeline::new(
            Arc::new(registry),
            PipelineConfig {
                ladder: RetryLadder::new("q", &vec![Duration::from_secs(1); delays]),
                handler_timeout: Duration::from_millis(50),
                max_body_bytes: 1024,
                header_budget: HeaderBudget::default(),
            },
        )
    }

    async fn run(p: &Pipeline, body: &[u8], headers: FieldTable) -> Processed {
        let props = BasicProperties::default().with_headers(headers);
        p.process("ex", "Ping", &props, body, &CancellationToken::new())
            .await
    }

    fn body(mode: &str) -> Vec<u8> {
        format!(r#"{{"aggregateId":"a","mode":"{mode}"}}"#).into_bytes()
    }

    #[tokio::test]
    async fn all_ok_acks() {
        let out = run(&pipeline(2), &body("fine"), FieldTable::default()).await;
        assert_eq!(out.settlement, Settlement::Ack);
        assert_eq!(out.runs.len(), 2);
    }

    #[tokio::test]
    async fn a_transient_failure_retries_only_the_failed_handler() {
        let out = run(&pipeline(2), &body("transient"), FieldTable::default()).await;
        let Settlement::Retry(r) = &out.settlement else {
            panic!("{:?}", out.settlement)
        };
        assert_eq!(r.step.number, 1);
        assert_eq!(r.handlers, vec!["picky".to_string()]);
        assert_eq!(r.errors, vec!["picky: transient error: busy".to_string()]);
    }

    #[tokio::test]
    async fn a_retry_copy_runs_only_the_named_handlers_and_climbs_the_ladder() {
        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(2));
        h.insert(
            headers::HANDLERS.into(),
            crate::wire::string_array(&["picky".into()]),
        );
        let out = run(&pipeline(2), &body("transient"), h.clone()).await;
        assert_eq!(out.runs.len(), 1, "ok must not run again");
        assert_eq!(out.settlement.retry().unwrap().step.number, 2);

        h.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(3));
        let out = run(&pipeline(2), &body("transient"), h).await;
        let d = out.settlement.dead_letter().expect("ladder exhausted");
        assert_eq!(d.reason, DeadReason::AttemptsExhausted);
        assert_eq!(d.handlers, vec!["picky".to_string()]);
    }

    #[tokio::test]
    async fn a_permanent_failure_dead_letters_at_once() {
        let out = run(&pipeline(2), &body("permanent"), FieldTable::default()).await;
        let d = out.settlement.dead_letter().unwrap();
        assert_eq!(d.reason, DeadReason::Permanent);
        assert_eq!(d.handlers, vec!["picky".to_string()]);
        assert!(out.settlement.retry().is_none());
    }

    #[tokio::test]
    async fn panics_and_timeouts_are_transient() {
        for mode in ["panic", "hang"] {
            let out = run(&pipeline(1), &body(mode), FieldTable::default()).await;
            let r = out
                .settlement
                .retry()
                .unwrap_or_else(|| panic!("{mode}: {:?}", out.settlement));
            assert_eq!(r.handlers, vec!["picky".to_string()], "{mode}");
        }
    }

    #[tokio::test]
    async fn bodies_that_do_not_decode_are_dead_lettered() {
        for bad in [&b"{not json"[..], b"", b"\xff\xfe", br#"{"aggregateId":1}"#] {
            let out = run(&pipeline(2), bad, FieldTable::default()).await;
            let d = out.settlement.dead_letter().unwrap();
            assert_eq!(d.reason, DeadReason::Undecodable, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_body_that_is_not_an_object_is_never_matched_by_position() {
        // `ok` would accept ["a","fine"] as Ping { aggregate_id: "a", mode: "fine" }.
        for bad in [
            &br#"["a","fine"]"#[..],
            br#"  ["a","fine"]"#,
            br#""a""#,
            b"42",
            b"-1",
            b"null",
            b"true",
        ] {
            let out = run(&pipeline(2), bad, FieldTable::default()).await;
            let d = out
                .settlement
                .dead_letter()
                .unwrap_or_else(|| panic!("{bad:?}: {:?}", out.settlement));
            assert_eq!(d.reason, DeadReason::Undecodable, "{bad:?}");
            assert_eq!(d.handlers, vec!["ok".to_string(), "picky".to_string()]);
            assert!(
                d.errors[0].contains("not a JSON object"),
                "{bad:?}: {:?}",
                d.errors
            );
            assert!(out.settlement.retry().is_none());
        }
        assert_eq!(non_object_top_level(b" {\"a\":1}"), None);
        assert_eq!(
            non_object_top_level(b"{not json"),
            None,
            "each decode reports it"
        );
    }

    #[tokio::test]
    async fn guards_run_before_any_handler() {
        let p = pipeline(2);
        let big = vec![b' '; 2048];
        let out = run(&p, &big, FieldTable::default()).await;
        assert_eq!(
            out.settlement.dead_letter().unwrap().reason,
            DeadReason::TooLarge
        );
        assert!(out.runs.is_empty());

        let props = BasicProperties::default().with_content_encoding("gzip".into());
        let out = p
            .process(
                "ex",
                "Ping",
                &props,
                &body("fine"),
                &CancellationToken::new(),
            )
            .await;
        assert_eq!(
            out.settlement.dead_letter().unwrap().reason,
            DeadReason::UnsupportedEncoding
        );

        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(-1));
        let out = run(&p, &body("fine"), h).await;
        assert_eq!(
            out.settlement.dead_letter().unwrap().reason,
            DeadReason::BadHeaders
        );

        let mut p = p;
        p.header_budget = HeaderBudget::new(256);
        let mut h = FieldTable::default();
        h.insert("x-big".into(), crate::wire::long_string(&"x".repeat(300)));
        let out = run(&p, &body("fine"), h).await;
        let d = out.settlement.dead_letter().unwrap();
        assert_eq!(d.reason, DeadReason::HeadersTooLarge);
        assert!(d.errors[0].contains("max_header_bytes is 256"), "{d:?}");
        assert!(out.runs.is_empty());
    }

    #[tokio::test]
    async fn unknown_event_types_are_ignored_and_unknown_handlers_dead_lettered() {
        let p = pipeline(2);
        let props = BasicProperties::default();
        let out = p
            .process(
                "ex",
                "Pong",
                &props,
                &body("fine"),
                &CancellationToken::new(),
            )
            .await;
        assert!(matches!(out.settlement, Settlement::Ignore { .. }));

        let mut h = FieldTable::default();
        h.insert(
            headers::HANDLERS.into(),
            crate::wire::string_array(&["gone".into(), "ok".into()]),
        );
        let out = run(&p, &body("fine"), h).await;
        let d = out.settlement.dead_letter().unwrap();
        assert_eq!(d.reason, DeadReason::UnknownHandler);
        assert_eq!(d.handlers, vec!["gone".to_string()]);
        assert_eq!(out.runs.iter().filter(|r| r.result.is_ok()).count(), 1);
    }

    #[tokio::test]
    async fn mixed_failures_split_into_a_retry_and_a_dead_letter() {
        let mut registry = Registry::new();
        registry
            .on("flaky", |_: Ping, _| async {
                Err(HandlerError::transient("later"))
            })
            .unwrap()
            .on("broken", |_: Ping, _| async {
                Err(HandlerError::permanent("never"))
            })
            .unwrap();
        let p = Pipeline::new(
            Arc::new(registry),
            PipelineConfig {
                ladder: RetryLadder::new("q", &[Duration::from_secs(1)]),
                handler_timeout: Duration::from_secs(1),
                max_body_bytes: 1024,
                header_budget: HeaderBudget::default(),
            },
        );
        let out = run(&p, &body("x"), FieldTable::default()).await;
        let Settlement::RetryAndDeadLetter(r, d) = &out.settlement else {
            panic!("{:?}", out.settlement)
        };
        assert_eq!(r.handlers, vec!["flaky".to_string()]);
        assert_eq!(d.handlers, vec!["broken".to_string()]);
        assert_eq!(d.reason, DeadReason::Permanent);
    }
}
