//! The fixture most worker tests start from: a test app whose worker runs a
//! recording handler (every [`CardAdded`] it gets is sent on as a [`Seen`]),
//! its outcomes, a publisher for it, and the [`Cleanup`] of its queues.
//!
//! ```ignore
//! let mut rec = Recorder::start("routing").await;
//! rec.publisher.publish(&event).await?;
//! assert_eq!(rec.next_seen().await.event, event);
//! assert!(rec.next_outcome().await.acked);
//! assert_eq!(rec.stop().await.settled, 1);
//! ```
//!
//! [`Recorder::build`] tweaks it before it starts: the settings, the
//! handler's name, what the handler answers, extra handlers.

use std::sync::Arc;

use burrow::{HandlerError, Outcome, Publisher, Registry, RunReport, Settings};
use tokio::sync::{broadcast, mpsc};

use super::{
    CardAdded, Cleanup, Seen, TestApp, TestWorker, next_outcome, next_seen, publisher,
    seen_channel, start_worker, within,
};

/// The name the recording handler has unless [`RecorderBuilder::handler`]
/// gives another.
pub const RECORDER: &str = "library.record_card";

/// What the recording handler answers for what it saw.
type Verdict = Arc<dyn Fn(&Seen) -> Result<(), HandlerError> + Send + Sync>;

/// More handlers to register beside the recording one.
type Register = Box<dyn FnOnce(&mut Registry) + Send>;

/// A running worker with a recording handler. Fields drop in order: the
/// worker stops before the cleanup deletes its queues.
pub struct Recorder {
    pub settings: Settings,
    pub worker: TestWorker,
    pub outcomes: broadcast::Receiver<Outcome>,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    pub publisher: Publisher,
    pub cleanup: Cleanup,
}

impl Recorder {
    /// A recorder for a fresh test app (see [`TestApp::new`]), consuming.
    pub async fn start(prefix: &str) -> Self {
        Self::build(prefix).start().await
    }

    /// A recorder for a fresh test app, to be tweaked before it starts.
    pub fn build(prefix: &str) -> RecorderBuilder {
        Self::of(TestApp::new(prefix))
    }

    /// A recorder for `app` (e.g. one sharing another app's exchange).
    pub fn of(app: TestApp) -> RecorderBuilder {
        Self::with_settings(app.build())
    }

    /// A recorder for settings made elsewhere (a broker of the test's own).
    pub fn with_settings(settings: Settings) -> RecorderBuilder {
        RecorderBuilder {
            settings,
            handler: RECORDER.to_owned(),
            verdict: Arc::new(|_| Ok(())),
            register: Vec::new(),
            cleanup: true,
        }
    }

    /// The next invocation of the recording handler.
    pub async fn next_seen(&mut self) -> Seen {
        next_seen(&mut self.seen).await
    }

    /// The next outcome the worker broadcast.
    pub async fn next_outcome(&mut self) -> Outcome {
        next_outcome(&mut self.outcomes).await
    }

    /// Closes the publisher and shuts the worker down, which must stop
    /// cleanly; its report. What was seen and the outcomes stay readable.
    pub async fn stop(&mut self) -> RunReport {
        self.publisher.close().await;
        within("worker shutdown", self.worker.stop())
            .await
            .expect("the worker stops cleanly")
    }
}

/// A [`Recorder`] before it starts.
pub struct RecorderBuilder {
    settings: Settings,
    handler: String,
    verdict: Verdict,
    register: Vec<Register>,
    cleanup: bool,
}

impl RecorderBuilder {
    /// Changes the settings; they are validated when the recorder starts.
    pub fn settings(mut self, configure: impl FnOnce(&mut Settings)) -> Self {
        configure(&mut self.settings);
        self
    }

    /// Registers the recording handler as `name`.
    pub fn handler(mut self, name: &str) -> Self {
        self.handler = name.to_owned();
        self
    }

    /// What the recording handler answers, once it has sent what it saw
    /// (by default `Ok`).
    pub fn verdict(
        mut self,
        verdict: impl Fn(&Seen) -> Result<(), HandlerError> + Send + Sync + 'static,
    ) -> Self {
        self.verdict = Arc::new(verdict);
        self
    }

    /// Registers more handlers beside the recording one.
    pub fn register(mut self, register: impl FnOnce(&mut Registry) + Send + 'static) -> Self {
        self.register.push(Box::new(register));
        self
    }

    /// Deletes nothing afterwards: for an app on a broker node of the test's
    /// own, whose queues go away with it, or one whose queues another guard
    /// deletes (apps sharing an exchange, deleted once).
    pub fn without_cleanup(mut self) -> Self {
        self.cleanup = false;
        self
    }

    /// Starts the worker and waits until it consumes; connects the publisher.
    pub async fn start(self) -> Recorder {
        let RecorderBuilder {
            settings,
            handler,
            verdict,
            register,
            cleanup: clean_up,
        } = self;
        settings.validate().expect("test settings are valid");
        let mut cleanup = Cleanup::new();
        if clean_up {
            cleanup.app(&settings);
        }

        let (tx, seen) = seen_channel();
        let mut registry = Registry::new();
        registry
            .on(&handler, move |event: CardAdded, ctx| {
                let seen = Seen { event, ctx };
                let answer = verdict(&seen);
                let sent = tx.send(seen);
                async move {
                    sent.expect("the test reads what the handler saw");
                    answer
                }
            })
            .expect("the recording handler registers");
        for register in register {
            register(&mut registry);
        }
        let (worker, outcomes) = start_worker(settings.clone(), registry).await;
        let publisher = publisher(&settings).await;
        Recorder {
            settings,
            worker,
            outcomes,
            seen,
            publisher,
            cleanup,
        }
    }
}
