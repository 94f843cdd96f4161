//! W3C trace context across RabbitMQ (cargo feature `otel`).
//!
//! The publisher writes the current span's context into the message headers
//! (`traceparent`, `tracestate`) through OpenTelemetry's global propagator;
//! the consumer reads them back and makes the delivery span a child of the
//! publishing span, as the OpenTelemetry messaging conventions describe.
//! Install a propagator once at start ([`install_propagator`]) and a
//! `tracing_opentelemetry` layer in your subscriber to export the spans.

use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::wire::long_string;

/// Sets the global propagator to W3C trace context.
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
}

struct HeaderInjector<'a>(&'a mut FieldTable);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let Ok(key) = lapin::types::ShortString::try_new(key) {
            self.0.insert(key, long_string(&value));
        }
    }
}

struct HeaderExtractor<'a>(&'a FieldTable);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match self.0.inner().get(key)? {
            AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
            AMQPValue::ShortString(s) => Some(s.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        self.0.inner().keys().map(|k| k.as_str()).collect()
    }
}

/// Writes the current span's trace context into `headers`.
pub(crate) fn inject(headers: &mut FieldTable) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

/// Makes `span` a child of the trace context found in `headers`, if any.
pub(crate) fn set_parent(span: &tracing::Span, headers: Option<&FieldTable>) {
    if let Some(headers) = headers {
        let cx = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(headers))
        });
        let _ = span.set_parent(cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceContextExt, TracerProvider};
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn a_trace_survives_the_headers() {
        install_propagator();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let publish = tracing::info_span!("publish");
            let mut headers = FieldTable::default();
            let sent = publish.in_scope(|| {
                inject(&mut headers);
                tracing::Span::current()
                    .context()
                    .span()
                    .span_context()
                    .trace_id()
            });
            let extractor = HeaderExtractor(&headers);
            let traceparent = extractor.get("traceparent").expect("traceparent header");
            assert!(traceparent.contains(&sent.to_string()), "{traceparent}");

            let delivery = tracing::info_span!("delivery");
            set_parent(&delivery, Some(&headers));
            let received = delivery.context().span().span_context().trace_id();
            assert_eq!(received, sent);
        });
    }
}
