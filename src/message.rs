//! What burrow shows of a message, in its own types: the headers a handler
//! sees in its [`crate::Context`] and a dead letter carries, and a message's
//! properties. AMQP's tables stay inside burrow.

use std::fmt;

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
};

/// One header value.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum HeaderValue {
    /// Text (AMQP short and long strings; invalid UTF-8 is replaced).
    Str(String),
    /// Any integer type.
    Int(i64),
    /// An unsigned integer too large for `i64`. AMQP has no such type:
    /// burrow sends one as a timestamp, the only unsigned 64-bit field.
    UInt(u64),
    /// A float or double.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// An AMQP timestamp, Unix seconds.
    Timestamp(u64),
    /// A decimal: `value` × 10^-`scale`.
    Decimal {
        /// Digits after the point.
        scale: u8,
        /// The unscaled value.
        value: u32,
    },
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// An array.
    List(Vec<HeaderValue>),
    /// A nested table.
    Table(Headers),
    /// No value.
    Void,
}

impl HeaderValue {
    /// The text, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is one (a timestamp counts).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            HeaderValue::Int(n) => Some(*n),
            HeaderValue::UInt(n) => i64::try_from(*n).ok(),
            HeaderValue::Timestamp(n) => i64::try_from(*n).ok(),
            _ => None,
        }
    }

    fn from_amqp(value: &AMQPValue) -> Self {
        match value {
            AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
            AMQPValue::ShortShortInt(n) => HeaderValue::Int(i64::from(*n)),
            AMQPValue::ShortShortUInt(n) => HeaderValue::Int(i64::from(*n)),
            AMQPValue::ShortInt(n) => HeaderValue::Int(i64::from(*n)),
            AMQPValue::ShortUInt(n) => HeaderValue::Int(i64::from(*n)),
            AMQPValue::LongInt(n) => HeaderValue::Int(i64::from(*n)),
            AMQPValue::LongUInt(n) => HeaderValue::Int(i64::from(*n)),
            AMQPValue::LongLongInt(n) => HeaderValue::Int(*n),
            AMQPValue::Float(n) => HeaderValue::Float(f64::from(*n)),
            AMQPValue::Double(n) => HeaderValue::Float(*n),
            AMQPValue::DecimalValue(d) => HeaderValue::Decimal {
                scale: d.scale,
                value: d.value,
            },
            AMQPValue::ShortString(s) => HeaderValue::Str(s.to_string()),
            AMQPValue::LongString(s) => {
                HeaderValue::Str(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            AMQPValue::FieldArray(items) => {
                HeaderValue::List(items.as_slice().iter().map(Self::from_amqp).collect())
            }
            AMQPValue::Timestamp(t) => HeaderValue::Timestamp(*t),
            AMQPValue::FieldTable(t) => HeaderValue::Table(Headers(t.clone())),
            AMQPValue::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
            AMQPValue::Void => HeaderValue::Void,
        }
    }

    fn into_amqp(self) -> AMQPValue {
        match self {
            HeaderValue::Str(s) => AMQPValue::LongString(LongString::from(s.into_bytes())),
            HeaderValue::Int(n) => AMQPValue::LongLongInt(n),
            HeaderValue::UInt(n) => match i64::try_from(n) {
                Ok(n) => AMQPValue::LongLongInt(n),
                Err(_) => AMQPValue::Timestamp(n),
            },
            HeaderValue::Float(n) => AMQPValue::Double(n),
            HeaderValue::Bool(b) => AMQPValue::Boolean(b),
            HeaderValue::Timestamp(t) => AMQPValue::Timestamp(t),
            HeaderValue::Decimal { scale, value } => {
                AMQPValue::DecimalValue(lapin::types::DecimalValue { scale, value })
            }
            HeaderValue::Bytes(b) => AMQPValue::ByteArray(b.into()),
            HeaderValue::List(items) => AMQPValue::FieldArray(FieldArray::from(
                items.into_iter().map(Self::into_amqp).collect::<Vec<_>>(),
            )),
            HeaderValue::Table(t) => AMQPValue::FieldTable(t.0),
            HeaderValue::Void => AMQPValue::Void,
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(s: &str) -> Self {
        HeaderValue::Str(s.to_owned())
    }
}

impl From<String> for HeaderValue {
    fn from(s: String) -> Self {
        HeaderValue::Str(s)
    }
}

impl From<i64> for HeaderValue {
    fn from(n: i64) -> Self {
        HeaderValue::Int(n)
    }
}

impl From<bool> for HeaderValue {
    fn from(b: bool) -> Self {
        HeaderValue::Bool(b)
    }
}

/// A message's headers: what the publisher sent, plus burrow's own
/// `burrow-*` headers on retry and replay copies.
///
/// ```
/// use burrow::Headers;
/// let headers = Headers::new().with("x-tenant", "t-1").with("x-priority", 3);
/// assert_eq!(headers.get_str("x-tenant"), Some("t-1".to_owned()));
/// assert_eq!(headers.get_i64("x-priority"), Some(3));
/// assert_eq!(headers.get("missing"), None);
/// ```
#[derive(Clone, Default, PartialEq)]
pub struct Headers(FieldTable);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// These headers and `name` = `value` (replacing any earlier value).
    pub fn with(mut self, name: &str, value: impl Into<HeaderValue>) -> Self {
        self.insert(name, value);
        self
    }

    /// Sets `name` to `value`. A name longer than 255 bytes (AMQP's limit)
    /// is cut there.
    pub fn insert(&mut self, name: &str, value: impl Into<HeaderValue>) {
        self.0.insert(
            crate::wire::short_string_lossy(name),
            value.into().into_amqp(),
        );
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<HeaderValue> {
        self.0.inner().get(name).map(HeaderValue::from_amqp)
    }

    /// The text of `name`, when it is a string.
    pub fn get_str(&self, name: &str) -> Option<String> {
        match self.get(name)? {
            HeaderValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer value of `name`, when it is one.
    pub fn get_i64(&self, name: &str) -> Option<i64> {
        self.get(name)?.as_i64()
    }

    /// Whether `name` is set.
    pub fn contains(&self, name: &str) -> bool {
        self.0.inner().contains_key(name)
    }

    /// Every header, ordered by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, HeaderValue)> + '_ {
        self.0
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str(), HeaderValue::from_amqp(v)))
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.0.inner().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.inner().is_empty()
    }

    pub(crate) fn from_table(table: FieldTable) -> Self {
        Self(table)
    }

    pub(crate) fn table(&self) -> &FieldTable {
        &self.0
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// A message's AMQP properties, as burrow reads them.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct MessageProperties {
    /// `content_type` (`application/json`).
    pub content_type: Option<String>,
    /// `content_encoding`.
    pub content_encoding: Option<String>,
    /// `delivery_mode`: 2 is persistent.
    pub delivery_mode: Option<u8>,
    /// `priority`.
    pub priority: Option<u8>,
    /// `correlation_id`.
    pub correlation_id: Option<String>,
    /// `reply_to`.
    pub reply_to: Option<String>,
    /// `expiration` (milliseconds, as text).
    pub expiration: Option<String>,
    /// `message_id`.
    pub message_id: Option<String>,
    /// `timestamp`, Unix seconds.
    pub timestamp: Option<u64>,
    /// `type`: the event type, for burrow's publishers.
    pub kind: Option<String>,
    /// `user_id`.
    pub user_id: Option<String>,
    /// `app_id`: the publishing app.
    pub app_id: Option<String>,
    /// `cluster_id`.
    pub cluster_id: Option<String>,
}

impl MessageProperties {
    pub(crate) fn from_amqp(p: &BasicProperties) -> Self {
        let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.to_string());
        Self {
            content_type: s(p.content_type()),
            content_encoding: s(p.content_encoding()),
            delivery_mode: *p.delivery_mode(),
            priority: *p.priority(),
            correlation_id: s(p.correlation_id()),
            reply_to: s(p.reply_to()),
            expiration: s(p.expiration()),
            message_id: s(p.message_id()),
            timestamp: *p.timestamp(),
            kind: s(p.kind()),
            user_id: s(p.user_id()),
            app_id: s(p.app_id()),
            cluster_id: s(p.cluster_id()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_amqp() {
        let nested = Headers::new().with("inner", "x");
        let mut h = Headers::new()
            .with("s", "text")
            .with("n", -5)
            .with("b", true);
        h.insert("list", HeaderValue::List(vec!["a".into(), 1.into()]));
        h.insert("table", HeaderValue::Table(nested.clone()));
        h.insert("big", HeaderValue::UInt(u64::MAX));
        let again = Headers::from_table(h.table().clone());
        assert_eq!(again.get_str("s").as_deref(), Some("text"));
        assert_eq!(again.get_i64("n"), Some(-5));
        assert_eq!(again.get("b"), Some(HeaderValue::Bool(true)));
        assert_eq!(
            again.get("list"),
            Some(HeaderValue::List(vec!["a".into(), 1.into()]))
        );
        assert_eq!(again.get("table"), Some(HeaderValue::Table(nested)));
        assert_eq!(again.len(), 6);
        let names: Vec<&str> = again.iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["b", "big", "list", "n", "s", "table"]);
    }
}
