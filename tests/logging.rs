//! Log lines tie to a message: whatever a handler logs while it handles a
//! delivery carries the delivery's `message_id`, `event`, `app`, `attempt`
//! and the handler's name, so "what did my handler log for message X?" has
//! an answer in any log store.
//!
//! This test binary installs a global JSON subscriber into a buffer, so it
//! holds this one test only.

mod common;

use std::sync::{Arc, Mutex};

use burrow::{EventMeta, HandlerError, Registry};
use common::*;

/// A writer factory into a shared buffer.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_s_own_log_lines_carry_the_delivery_s_ids() {
    let buffer = Buffer::default();
    let writer = buffer.clone();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter("info,burrow=debug")
        .with_writer(move || writer.clone())
        .init();

    let settings = TestApp::new("logs").build();
    let mut cleanup = Cleanup::new();
    cleanup.app(&settings);
    let mut registry = Registry::new();
    registry
        .on("logs.record", |event: CardAdded, _| async move {
            tracing::info!(title = %event.title, "recording the card");
            Ok::<_, HandlerError>(())
        })
        .unwrap();
    let (worker, mut outcomes) = start_worker(settings.clone(), registry).await;
    let publisher = publisher(&settings).await;
    let id = unique("logged");
    publisher
        .publish_with(
            &CardAdded::new("Dune"),
            EventMeta::default().message_id(&id),
        )
        .await
        .unwrap();
    let outcome = next_outcome(&mut outcomes).await;
    assert_eq!(outcome.message_id, id);
    publisher.close().await;
    within("worker shutdown", worker.shutdown()).await.unwrap();

    let lines = buffer.lines();
    let line = lines
        .iter()
        .find(|l| l["fields"]["message"] == "recording the card")
        .unwrap_or_else(|| panic!("the handler's line is missing: {lines:#?}"));
    // Every field of every enclosing span, as a log store indexes them.
    let mut fields = serde_json::Map::new();
    for span in line["spans"].as_array().expect("the line's spans") {
        for (k, v) in span.as_object().unwrap() {
            fields.insert(k.clone(), v.clone());
        }
    }
    assert_eq!(fields["message_id"], id.as_str(), "{line}");
    assert_eq!(fields["event"], "CardAddedToLibraryEvent", "{line}");
    assert_eq!(fields["app"], settings.app.name.as_str(), "{line}");
    assert_eq!(fields["attempt"], 1, "{line}");
    assert_eq!(fields["handler"], "logs.record", "{line}");
}
