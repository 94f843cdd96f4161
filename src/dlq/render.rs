//! Dead letters for people: a table, a detail page, and a JSON document.

use std::{fmt::Write as _, time::Duration};

use lapin::types::{AMQPValue, ShortString};

use super::DeadLetter;
use crate::wire;

/// Longest `last error` shown by [`render_table`], in characters.
const TABLE_ERROR_WIDTH: usize = 60;

/// A table of dead letters, one line each: id, event, reason, handler,
/// attempts, last error (first 60 characters, on one line) and age.
/// An empty slice gives `no dead letters`.
pub fn render_table(letters: &[DeadLetter]) -> String {
    if letters.is_empty() {
        return "no dead letters\n".into();
    }
    let now = wire::now_ms();
    let header = [
        "ID",
        "EVENT",
        "REASON",
        "HANDLER",
        "ATTEMPTS",
        "LAST ERROR",
        "AGE",
    ];
    let rows: Vec<[String; 7]> = letters
        .iter()
        .map(|l| {
            let handler = match (&l.failed_handler, l.handlers.len()) {
                (Some(h), n) if n > 1 => format!("{h} (+{})", n - 1),
                (Some(h), _) => h.clone(),
                (None, 0) => "-".into(),
                (None, _) => l.handlers.join(","),
            };
            [
                l.message_id.clone(),
                or_dash(&l.event_type),
                or_dash(l.reason.as_deref().unwrap_or("")),
                handler,
                l.attempts.map_or("-".into(), |n| n.to_string()),
                or_dash(&one_line(
                    l.last_error.as_deref().unwrap_or(""),
                    TABLE_ERROR_WIDTH,
                )),
                l.age(now).map_or("-".into(), format_age),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// Everything about one dead letter: the fields burrow reads, every
/// property and header, and the body (pretty-printed when it is JSON).
pub fn render_detail(letter: &DeadLetter) -> String {
    let now = wire::now_ms();
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(out, "{name:<15} {value}");
    };
    field("message id", letter.message_id.clone());
    field("event", or_dash(&letter.event_type));
    field("reason", or_dash(letter.reason.as_deref().unwrap_or("")));
    field(
        "failed handler",
        or_dash(letter.failed_handler.as_deref().unwrap_or("")),
    );
    field(
        "handlers",
        if letter.handlers.is_empty() {
            "(none recorded: a replay runs every subscribed handler)".into()
        } else {
            letter.handlers.join(", ")
        },
    );
    field(
        "attempts",
        letter.attempts.map_or("-".into(), |n| n.to_string()),
    );
    field("replays", letter.replays.to_string());
    field(
        "first failure",
        letter
            .first_failure_at_ms
            .map_or("-".into(), |ms| format_time(ms, now)),
    );
    field(
        "dead at",
        letter
            .dead_at_ms
            .map_or("-".into(), |ms| format_time(ms, now)),
    );
    field("routing key", letter.routing_key.clone());
    match letter.last_error.as_deref() {
        Some(error) if !error.is_empty() => {
            out.push_str("last error:\n");
            for l in error.lines() {
                let _ = writeln!(out, "  {l}");
            }
        }
        _ => field("last error", "-".into()),
    }

    out.push_str("properties:\n");
    let p = &letter.raw;
    let mut prop = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            let _ = writeln!(out, "  {name} = {v}");
        }
    };
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| format!("{:?}", s.as_str()));
    prop("content_type", s(p.content_type()));
    prop("content_encoding", s(p.content_encoding()));
    prop("delivery_mode", p.delivery_mode().map(|m| m.to_string()));
    prop("priority", p.priority().map(|m| m.to_string()));
    prop("correlation_id", s(p.correlation_id()));
    prop("reply_to", s(p.reply_to()));
    prop("expiration", s(p.expiration()));
    prop("message_id", s(p.message_id()));
    prop(
        "timestamp",
        p.timestamp()
            .map(|t| render_value(&AMQPValue::Timestamp(t))),
    );
    prop("type", s(p.kind()));
    prop("user_id", s(p.user_id()));
    prop("app_id", s(p.app_id()));
    prop("cluster_id", s(p.cluster_id()));

    if letter.headers.table().inner().is_empty() {
        out.push_str("headers: none\n");
    } else {
        out.push_str("headers:\n");
        for (k, v) in letter.headers.table() {
            let _ = writeln!(out, "  {} = {}", k.as_str(), render_value(v));
        }
    }

    let len = letter.body.len();
    match serde_json::from_slice::<serde_json::Value>(&letter.body) {
        Ok(json) => {
            let pretty = serde_json::to_string_pretty(&json).unwrap_or_default();
            let _ = writeln!(out, "body ({len} bytes, JSON):\n{pretty}");
        }
        Err(_) => match std::str::from_utf8(&letter.body) {
            Ok(text) => {
                let _ = writeln!(out, "body ({len} bytes, not JSON; as text):\n{text}");
            }
            Err(_) => {
                let shown = &letter.body[..len.min(64)];
                let hex: String = shown.iter().map(|b| format!("{b:02x}")).collect();
                let _ = writeln!(
                    out,
                    "body ({len} bytes, not JSON and not UTF-8; lossy text below; first {} bytes as hex: {hex}):\n{}",
                    shown.len(),
                    printable(&String::from_utf8_lossy(&letter.body))
                );
            }
        },
    }
    out
}

/// The letter as one JSON document, what `--output json` and `dlq export`
/// print: burrow's reading of it (id, event, reason, handlers, attempts,
/// times), every property and header, and the body byte for byte, as
/// UTF-8 text (`"body_encoding": "utf8"`) or, when it is not UTF-8, base64
/// (`"body_encoding": "base64"`).
pub fn to_json(letter: &DeadLetter) -> serde_json::Value {
    use base64::Engine as _;
    use serde_json::{Value, json};
    let p = &letter.raw;
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| Value::from(s.as_str()));
    let mut properties = serde_json::Map::new();
    for (name, value) in [
        ("content_type", s(p.content_type())),
        ("content_encoding", s(p.content_encoding())),
        ("delivery_mode", p.delivery_mode().map(Value::from)),
        ("priority", p.priority().map(Value::from)),
        ("correlation_id", s(p.correlation_id())),
        ("reply_to", s(p.reply_to())),
        ("expiration", s(p.expiration())),
        ("message_id", s(p.message_id())),
        ("timestamp", p.timestamp().map(Value::from)),
        ("type", s(p.kind())),
        ("user_id", s(p.user_id())),
        ("app_id", s(p.app_id())),
        ("cluster_id", s(p.cluster_id())),
    ] {
        if let Some(v) = value {
            properties.insert(name.into(), v);
        }
    }
    let (body, encoding) = match std::str::from_utf8(&letter.body) {
        Ok(text) => (text.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&letter.body),
            "base64",
        ),
    };
    json!({
        "message_id": letter.message_id,
        "event_type": letter.event_type,
        "reason": letter.reason,
        "failed_handler": letter.failed_handler,
        "handlers": letter.handlers,
        "attempts": letter.attempts,
        "last_error": letter.last_error,
        "first_failure_at": letter.first_failure_at_ms.and_then(iso_time),
        "dead_at": letter.dead_at_ms.and_then(iso_time),
        "replays": letter.replays,
        "routing_key": letter.routing_key,
        "properties": properties,
        "headers": table_to_json(letter.headers.table()),
        "body": body,
        "body_encoding": encoding,
    })
}

fn iso_time(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn table_to_json(table: &lapin::types::FieldTable) -> serde_json::Value {
    serde_json::Value::Object(
        table
            .into_iter()
            .map(|(k, v)| (k.to_string(), value_to_json(v)))
            .collect(),
    )
}

/// A header value as JSON: numbers, strings, booleans, arrays and objects
/// as themselves; a decimal as its text, a byte array as base64, void as null.
fn value_to_json(value: &AMQPValue) -> serde_json::Value {
    use base64::Engine as _;
    use serde_json::Value;
    match value {
        AMQPValue::Boolean(b) => Value::from(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(n) => Value::from(*n),
        AMQPValue::Double(n) => Value::from(*n),
        AMQPValue::DecimalValue(d) => Value::from(format!("{}e-{}", d.value, d.scale)),
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => Value::from(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::FieldArray(items) => {
            Value::Array(items.as_slice().iter().map(value_to_json).collect())
        }
        AMQPValue::Timestamp(secs) => Value::from(*secs),
        AMQPValue::FieldTable(table) => table_to_json(table),
        AMQPValue::ByteArray(bytes) => {
            Value::from(base64::engine::general_purpose::STANDARD.encode(bytes.as_slice()))
        }
        AMQPValue::Void => Value::Null,
    }
}

/// `text` with control characters other than line breaks and tabs shown as `.`.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '.'
            } else {
                c
            }
        })
        .collect()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

/// `text` on one line (line breaks become `; `), cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let flat: String = joined
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// An age rounded to what is worth reading: seconds under an hour, minutes
/// under a day, hours beyond.
fn format_age(age: Duration) -> String {
    let secs = age.as_secs();
    let rounded = if secs >= 86_400 {
        secs / 3600 * 3600
    } else if secs >= 3600 {
        secs / 60 * 60
    } else {
        secs
    };
    humantime::format_duration(Duration::from_secs(rounded)).to_string()
}

/// `2024-05-01T10:00:00.000Z (3m 2s ago)`.
fn format_time(ms: i64, now_ms: i64) -> String {
    let at = chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms} ms"));
    let ago = format_age(Duration::from_millis(
        u64::try_from(now_ms - ms).unwrap_or(0),
    ));
    format!("{at} ({ago} ago)")
}

/// A header value as text.
fn render_value(value: &AMQPValue) -> String {
    match value {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::DecimalValue(d) => {
            format!("{}e-{}", d.value, d.scale)
        }
        AMQPValue::ShortString(s) => format!("{:?}", s.as_str()),
        AMQPValue::LongString(s) => format!("{:?}", String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(items) => format!(
            "[{}]",
            items
                .as_slice()
                .iter()
                .map(render_value)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        AMQPValue::Timestamp(secs) => {
            let at = i64::try_from(*secs)
                .ok()
                .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            match at {
                Some(at) => format!("{secs} ({at})"),
                None => secs.to_string(),
            }
        }
        AMQPValue::FieldTable(table) => format!(
            "{{{}}}",
            table
                .into_iter()
                .map(|(k, v)| format!("{}: {}", k.as_str(), render_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        AMQPValue::ByteArray(bytes) => format!("<{} bytes>", bytes.len()),
        AMQPValue::Void => "void".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlq::tests::burrow_letter;
    use lapin::BasicProperties;

    #[test]
    fn renders_a_table_and_a_detail() {
        let l = burrow_letter();
        let table = render_table(std::slice::from_ref(&l));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("ID"), "{table}");
        assert!(lines[0].contains("LAST ERROR") && lines[0].ends_with("AGE"));
        assert!(lines[1].contains("m-1") && lines[1].contains("permanent"));
        assert!(lines[1].contains("library.attach (+1)"), "{table}");
        assert!(
            lines[1].contains("library.attach: gone; search.index: no"),
            "{table}"
        );
        assert_eq!(render_table(&[]), "no dead letters\n");

        let detail = render_detail(&l);
        assert!(detail.contains("\"aggregateId\": \"a-1\""), "{detail}");
        assert!(
            detail.contains("burrow-dead-reason = \"permanent\""),
            "{detail}"
        );
        assert!(detail.contains("2023-11-14T22:13:20.000Z"), "{detail}");
        assert!(detail.contains("  search.index: no"), "{detail}");

        let binary = DeadLetter::read("q", BasicProperties::default(), vec![0xff, 0x00, 0x41]);
        let detail = render_detail(&binary);
        assert!(
            detail.contains("not UTF-8") && detail.contains("ff0041"),
            "{detail}"
        );
    }

    #[test]
    fn a_letter_as_json_keeps_every_header_and_the_body() {
        let l = burrow_letter();
        let j = to_json(&l);
        assert_eq!(j["message_id"], "m-1");
        assert_eq!(j["reason"], "permanent");
        assert_eq!(j["handlers"][1], "search.index");
        assert_eq!(j["headers"]["burrow-attempt"], 3);
        assert_eq!(j["properties"]["correlation_id"], "c-1");
        assert_eq!(j["body_encoding"], "utf8");
        assert_eq!(j["body"], r#"{"aggregateId":"a-1"}"#);
        assert_eq!(j["dead_at"], "2023-11-14T22:13:20.000Z");

        let binary = DeadLetter::read("q", BasicProperties::default(), vec![0xff, 0x00, 0x41]);
        let j = to_json(&binary);
        assert_eq!(j["body_encoding"], "base64");
        assert_eq!(j["body"], "/wBB");
    }

    #[test]
    fn long_errors_fit_one_line() {
        let long = format!("a: {}\nb: x", "e".repeat(100));
        let cut = one_line(&long, 60);
        assert_eq!(cut.chars().count(), 60);
        assert!(cut.ends_with('…') && !cut.contains('\n'));
        assert_eq!(
            format_age(Duration::from_secs(3 * 86_400 + 3700)),
            "3days 1h"
        );
        assert_eq!(format_age(Duration::from_secs(3725)), "1h 2m");
        assert_eq!(format_age(Duration::from_secs(62)), "1m 2s");
    }
}
