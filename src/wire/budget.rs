//! The header budget: how large and how deep a message's headers may be.

use lapin::types::{AMQPValue, FieldTable, ShortString};

use super::{headers, long_string};

/// How large a message's headers may be. burrow dead-letters an incoming
/// message over budget as `headers_too_large`, and never publishes a copy
/// over it: every retry or dead-letter copy must fit in one AMQP
/// content-header frame (RabbitMQ's `frame_max`, 128 KiB by default), or the
/// broker closes the publishing connection and the copy is never confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderBudget {
    /// The largest headers table, in encoded bytes (`consumer.max_header_bytes`).
    pub max_bytes: usize,
    /// The deepest nesting of tables and arrays inside one header value.
    pub max_depth: usize,
}

impl HeaderBudget {
    /// The default nesting limit: RabbitMQ's own `x-death` nests three deep.
    /// It stays below the AMQP parser's own limit (32 levels, from
    /// `patches/amq-protocol-types`), past which nested tables and arrays
    /// arrive empty: a header cut there is still deeper than this, so it is
    /// still dead-lettered.
    pub const MAX_DEPTH: usize = 16;

    /// A budget of `max_bytes` with the default depth.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            max_depth: Self::MAX_DEPTH,
        }
    }

    /// Why `table` is over budget, or `None` when it fits.
    pub fn check(&self, table: &FieldTable) -> Option<String> {
        let mut deepest: Option<(&str, usize)> = None;
        for (key, value) in table {
            let depth = value_size(value).1;
            if depth > deepest.map_or(0, |(_, d)| d) {
                deepest = Some((key.as_str(), depth));
            }
        }
        if let Some((key, depth)) = deepest
            && depth > self.max_depth
        {
            return Some(format!(
                "header {key} nests tables or arrays {depth} levels deep; at most {} are accepted",
                self.max_depth
            ));
        }
        let total = table_size(table);
        if total > self.max_bytes {
            return Some(format!(
                "the headers take {total} bytes encoded ({} headers); consumer.max_header_bytes is {}",
                table.inner().len(),
                self.max_bytes
            ));
        }
        None
    }

    /// The headers of a copy: every header of `own` (burrow's, always
    /// kept), then the headers of `original` that fit the budget less room
    /// for what the broker adds later, smallest first, so that many small
    /// headers survive one huge one. Headers left out are named in
    /// `burrow-dropped-headers`.
    pub fn fit(&self, own: FieldTable, original: &FieldTable) -> FieldTable {
        let mut candidates: Vec<(&ShortString, &AMQPValue, usize, usize)> = original
            .inner()
            .iter()
            .filter(|(key, _)| !own.contains_key(key.as_str()))
            .map(|(key, value)| {
                let (size, depth) = value_size(value);
                (key, value, 1 + key.as_str().len() + size, depth)
            })
            .collect();
        let own_bytes = table_size(&own) - 4;
        let all_bytes = 4 + own_bytes + candidates.iter().map(|c| c.2).sum::<usize>();
        let too_deep = candidates.iter().any(|c| c.3 > self.max_depth);
        let mut table = own;
        let copy_max = self.max_bytes.saturating_sub(BROKER_RESERVE);
        if all_bytes <= copy_max && !too_deep {
            for (key, value, ..) in candidates {
                table.insert(key.clone(), value.clone());
            }
            return table;
        }

        // Room for the summary header itself.
        let mut left = copy_max
            .saturating_sub(4 + own_bytes + 1 + headers::DROPPED_HEADERS.len() + 5 + SUMMARY_MAX);
        candidates.sort_by_key(|c| c.2);
        let mut dropped = Vec::new();
        let mut dropped_bytes = 0;
        for (key, value, size, depth) in candidates {
            if depth <= self.max_depth && size <= left {
                left -= size;
                table.insert(key.clone(), value.clone());
            } else {
                dropped.push(key.as_str());
                dropped_bytes += size;
            }
        }
        if !dropped.is_empty() {
            dropped.sort_unstable();
            let mut summary = format!(
                "{} of {} original headers left out ({dropped_bytes} bytes) to fit consumer.max_header_bytes = {} and {} levels of nesting: ",
                dropped.len(),
                original.inner().len(),
                self.max_bytes,
                self.max_depth,
            );
            let mut names = dropped.iter().peekable();
            while let Some(name) = names.next() {
                if summary.len() + name.len() + 2 > SUMMARY_MAX - 4 {
                    summary.push('…');
                    break;
                }
                summary.push_str(name);
                if names.peek().is_some() {
                    summary.push_str(", ");
                }
            }
            table.insert(headers::DROPPED_HEADERS.into(), long_string(&summary));
        }
        table
    }
}

impl Default for HeaderBudget {
    fn default() -> Self {
        Self::new(64 * 1024)
    }
}

/// The longest `burrow-dropped-headers` value, in bytes.
const SUMMARY_MAX: usize = 1024;

/// Room a copy leaves for the headers the broker adds on its way back:
/// `x-death` entries and `x-first-death-*` when a retry step's TTL expires,
/// `x-delivery-count` on quorum queues. Without it a copy cut to exactly the
/// budget would come back over it.
const BROKER_RESERVE: usize = 2048;

/// RabbitMQ's default `frame_max`: the largest frame, in bytes, a client may
/// send, so the largest content header (properties and headers) a message
/// can carry (<https://www.rabbitmq.com/docs/configure>, `frame_max`).
pub const DEFAULT_FRAME_MAX: u32 = 131_072;

/// The encoded size of `value` (its type byte included) and how deep tables
/// and arrays nest inside it (0 for a scalar). Iterative: a hostile table
/// nested thousands of levels deep must not exhaust the stack here.
pub fn value_size(value: &AMQPValue) -> (usize, usize) {
    let mut size = 0;
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((value, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        size += 1 + match value {
            AMQPValue::Void => 0,
            AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
            AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
            AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
            AMQPValue::DecimalValue(_) => 5,
            AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
            AMQPValue::ShortString(s) => 1 + s.as_str().len(),
            AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
            AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
            AMQPValue::FieldArray(items) => {
                stack.extend(items.as_slice().iter().map(|v| (v, depth + 1)));
                4
            }
            AMQPValue::FieldTable(table) => {
                let mut keys = 0;
                for (key, v) in table {
                    keys += 1 + key.as_str().len();
                    stack.push((v, depth + 1));
                }
                4 + keys
            }
        };
    }
    (size, deepest)
}

/// The encoded size of a headers table, in bytes.
pub fn table_size(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(key, value)| 1 + key.as_str().len() + value_size(value).0)
        .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{long_string, string_array};

    fn nested(depth: usize) -> AMQPValue {
        let mut value = AMQPValue::LongInt(1);
        for _ in 0..depth {
            let mut t = FieldTable::default();
            t.insert("a".into(), value);
            value = AMQPValue::FieldTable(t);
        }
        value
    }

    fn encoded(table: &FieldTable) -> usize {
        encoded_bytes(table).len()
    }

    fn encoded_bytes(table: &FieldTable) -> Vec<u8> {
        lapin::types::generation::gen_field_table::<Vec<u8>>(table)(Vec::new().into())
            .unwrap()
            .into_inner()
            .0
    }

    #[test]
    fn sizes_match_the_encoder() {
        let mut h = FieldTable::default();
        h.insert("s".into(), long_string("hello"));
        h.insert("short".into(), AMQPValue::ShortString("x".into()));
        h.insert("n".into(), AMQPValue::LongLongInt(7));
        h.insert("b".into(), AMQPValue::Boolean(true));
        h.insert("d".into(), AMQPValue::Double(1.5));
        h.insert("v".into(), AMQPValue::Void);
        h.insert("arr".into(), string_array(&["a".into(), "bc".into()]));
        h.insert("deep".into(), nested(5));
        h.insert("bytes".into(), AMQPValue::ByteArray(vec![1, 2, 3].into()));
        assert_eq!(table_size(&h), encoded(&h));
        assert_eq!(value_size(&nested(5)).1, 5);
        assert_eq!(value_size(&AMQPValue::LongInt(1)).1, 0);
    }

    #[test]
    fn the_budget_names_what_is_over_it() {
        let budget = HeaderBudget::new(1024);
        let mut h = FieldTable::default();
        h.insert("small".into(), long_string("x"));
        assert_eq!(budget.check(&h), None);
        h.insert("deep".into(), nested(17));
        let why = budget.check(&h).unwrap();
        assert!(
            why.contains("header deep") && why.contains("17 levels"),
            "{why}"
        );

        let mut h = FieldTable::default();
        h.insert("big".into(), long_string(&"x".repeat(2000)));
        let why = budget.check(&h).unwrap();
        assert!(why.contains("consumer.max_header_bytes is 1024"), "{why}");
    }

    #[test]
    fn a_copy_keeps_burrows_headers_and_the_small_ones_and_names_the_rest() {
        let budget = HeaderBudget::new(8192);
        let mut own = FieldTable::default();
        own.insert(
            headers::DEAD_REASON.into(),
            long_string("headers_too_large"),
        );
        own.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(1));
        let mut original = FieldTable::default();
        original.insert("traceparent".into(), long_string("00-abc-def-01"));
        original.insert("x-huge".into(), long_string(&"x".repeat(10_000)));
        original.insert("x-deep".into(), nested(40));
        original.insert(headers::ATTEMPT.into(), long_string("not burrow's"));
        for i in 0..100 {
            original.insert(
                format!("x-pad-{i:03}").as_str().into(),
                AMQPValue::LongLongInt(i),
            );
        }
        let copy = budget.fit(own.clone(), &original);
        // Room is left for what the broker adds on the way back.
        assert!(
            table_size(&copy) <= 8192 - BROKER_RESERVE,
            "{}",
            table_size(&copy)
        );
        assert_eq!(encoded(&copy), table_size(&copy));
        let inner = copy.inner();
        assert_eq!(
            inner.get(headers::ATTEMPT),
            Some(&AMQPValue::LongLongInt(1))
        );
        assert!(inner.contains_key(headers::DEAD_REASON));
        assert!(inner.contains_key("traceparent"), "small headers are kept");
        assert!(!inner.contains_key("x-huge") && !inner.contains_key("x-deep"));
        let Some(AMQPValue::LongString(summary)) = inner.get(headers::DROPPED_HEADERS) else {
            panic!("no summary: {copy:?}")
        };
        let summary = String::from_utf8_lossy(summary.as_bytes());
        assert!(
            summary.contains("x-deep") && summary.contains("x-huge"),
            "{summary}"
        );
        assert!(summary.len() <= SUMMARY_MAX, "{}", summary.len());

        // Within budget: everything is kept, nothing is reported.
        let mut small = FieldTable::default();
        small.insert("traceparent".into(), long_string("00-abc-def-01"));
        let copy = budget.fit(own, &small);
        assert!(copy.inner().contains_key("traceparent"));
        assert!(!copy.inner().contains_key(headers::DROPPED_HEADERS));
    }

    /// A headers table `{"x": ...}` whose value nests `levels` field arrays
    /// (`b'A'`, 5 bytes a level) or field tables (`b'F'`, key "k": 7 bytes
    /// a level), the innermost empty; built by hand because encoding it
    /// with lapin would recurse once per level.
    fn deep_headers(kind: u8, levels: usize) -> Vec<u8> {
        let per_level = if kind == b'A' { 5 } else { 7 };
        // The outermost level has no key of its own.
        let value_len = per_level * levels - (per_level - 5);
        let mut encoded = Vec::with_capacity(6 + value_len);
        encoded.extend_from_slice(&((2 + value_len) as u32).to_be_bytes());
        encoded.extend_from_slice(&[1, b'x']);
        for level in 0..levels {
            if kind == b'F' && level > 0 {
                encoded.extend_from_slice(&[1, b'k']);
            }
            encoded.push(kind);
            let inner = per_level * (levels - level - 1);
            encoded.extend_from_slice(&(inner as u32).to_be_bytes());
        }
        encoded
    }

    #[test]
    fn the_deepest_headers_a_default_frame_carries_parse_bounded_on_a_small_stack() {
        // The parser comes from patches/amq-protocol-types: tables and
        // arrays nested deeper than its limit come back empty.
        let limit = lapin::types::parsing::MAX_NESTING_DEPTH;
        assert!(
            limit > HeaderBudget::MAX_DEPTH + 1,
            "a header cut at the parse limit must still be over the header budget"
        );
        for (kind, per_level) in [(b'A', 5), (b'F', 7)] {
            let levels = DEFAULT_FRAME_MAX as usize / per_level;
            let encoded = deep_headers(kind, levels);
            // A quarter of the 2 MiB lapin's I/O thread and tokio's workers
            // get by default: parsing, measuring, checking, re-encoding and
            // dropping what a frame can carry fit with room to spare, in a
            // debug build too (RELIABILITY.md has the measurements).
            let (nested, problem, reencoded) = std::thread::Builder::new()
                .stack_size(512 << 10)
                .spawn(move || {
                    let (rest, table) =
                        lapin::types::parsing::parse_field_table(encoded.as_slice())
                            .expect("parses");
                    assert!(rest.is_empty(), "every byte is consumed");
                    let nested = value_size(&table.inner()["x"]).1;
                    let problem = HeaderBudget::default().check(&table);
                    let reencoded = encoded_bytes(&table);
                    drop(table);
                    (nested, problem, reencoded)
                })
                .expect("a thread")
                .join()
                .expect("no stack overflow, no panic");
            // The headers table is level 1 and "x" level 2: levels 2 to
            // `limit` are kept, the next is empty, deeper ones are gone.
            assert_eq!(nested, limit - 1, "kind {}", kind as char);
            let problem = problem.expect("still too deep for burrow");
            assert!(
                problem.contains("header x") && problem.contains("levels deep"),
                "{problem}"
            );
            assert_eq!(reencoded, deep_headers(kind, limit));
        }
    }
}
