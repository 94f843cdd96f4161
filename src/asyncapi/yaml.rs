//! A JSON value written as block-style YAML.
//!
//! The document is plain JSON data, so this needs no YAML library: maps
//! and lists become blocks, and every string that YAML could read as
//! something else (a number, `true`, `null`, a version such as `3.0.0`, a
//! string with `: ` or a leading `*`) is written as a JSON string, which is
//! also a valid YAML double-quoted scalar. Reading the output back as YAML
//! gives the same value: `scripts/asyncapi-check` reads `docs/asyncapi.yaml`
//! with AsyncAPI's own parser and compares it with `burrow asyncapi
//! --output json`.

use serde_json::Value;

/// `value` as a YAML document, keys in the order the value holds them.
///
/// ```
/// let yaml = burrow::asyncapi::to_yaml(&serde_json::json!({
///     "asyncapi": "3.0.0",
///     "info": { "title": "burrow app library", "tags": [] },
/// }));
/// // serde_json's maps are sorted by key.
/// assert_eq!(yaml, "asyncapi: \"3.0.0\"\ninfo:\n  tags: []\n  title: burrow app library\n");
/// ```
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => write_map(&mut out, map, 0),
        Value::Array(items) if !items.is_empty() => write_list(&mut out, items, 0),
        scalar => {
            out.push_str(&inline(scalar));
            out.push('\n');
        }
    }
    out
}

fn write_map(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize) {
    for (key, value) in map {
        out.push_str(&" ".repeat(indent));
        out.push_str(&scalar_string(key));
        out.push(':');
        write_nested(out, value, indent);
    }
}

fn write_list(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        out.push_str(&" ".repeat(indent));
        out.push('-');
        match item {
            // A map in a list starts on the dash's line: `- key: value`.
            Value::Object(map) if !map.is_empty() => {
                let mut nested = String::new();
                write_map(&mut nested, map, indent + 2);
                out.push(' ');
                out.push_str(&nested[indent + 2..]);
            }
            other => write_nested(out, other, indent),
        }
    }
}

/// What follows `key:` or `-`: a scalar on the same line, a block below.
fn write_nested(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            write_map(out, map, indent + 2);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            write_list(out, items, indent + 2);
        }
        scalar => {
            out.push(' ');
            out.push_str(&inline(scalar));
            out.push('\n');
        }
    }
}

fn inline(value: &Value) -> String {
    match value {
        Value::Object(_) => "{}".to_owned(),
        Value::Array(_) => "[]".to_owned(),
        Value::String(s) => scalar_string(s),
        // Numbers, booleans and null read back the same in YAML.
        other => other.to_string(),
    }
}

/// `s` plain when YAML reads it back as that string, else JSON-quoted.
fn scalar_string(s: &str) -> String {
    if is_plain(s) {
        s.to_owned()
    } else {
        Value::String(s.to_owned()).to_string()
    }
}

fn is_plain(s: &str) -> bool {
    // A plain scalar starting with a letter, `$` or `_` is never a number;
    // punctuation is limited to characters that carry no meaning inside one.
    let starts_well = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '$' || c == '_');
    let reserved = matches!(
        s.to_ascii_lowercase().as_str(),
        "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n" | "~"
    );
    starts_well
        && !reserved
        && !s.ends_with(' ')
        && !s.contains(": ")
        && !s.contains(" #")
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, ' ' | '_' | '-' | '.' | '/' | '$' | '(' | ')' | ',' | ';')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_yaml_would_misread_are_quoted() {
        for s in [
            "3.0.0",
            "true",
            "No",
            "",
            "a: b",
            "*",
            "#/components/x",
            "2",
            "end ",
        ] {
            assert!(!is_plain(s), "{s:?} must be quoted");
        }
        for s in [
            "receive_CardAddedToLibraryEvent",
            "$ref",
            "burrow-event-version",
            "Handled by a, b.",
        ] {
            assert!(is_plain(s), "{s:?} can stay plain");
        }
    }

    #[test]
    fn lists_of_maps_and_empty_containers() {
        let yaml = to_yaml(&json!({
            "messages": [{ "$ref": "#/x", "n": 1 }, "s", []],
            "empty": {},
            "multi": "line\none",
        }));
        assert_eq!(
            yaml,
            // Sorted keys; `n` is YAML 1.1's "no", so it is quoted.
            "empty: {}\nmessages:\n  - $ref: \"#/x\"\n    \"n\": 1\n  - s\n  - []\nmulti: \"line\\none\"\n"
        );
    }
}
