//! One AMI message: an event, a response or an action.
//!
//! Asterisk speaks in blocks of `Key: Value` lines closed by an empty line. Keys may
//! repeat (`ChanVariable(...)`, `Variable`, `Output`) and their order matters, so a
//! message keeps every field in wire order. The frame bytes are kept once, in a
//! shared [`Bytes`] buffer, and fields are spans into it: parsing allocates one
//! exact-size span vector per message and nothing per field.

use bytes::Bytes;
use serde_json::{Map, Value};

/// A `[start, end)` byte range inside the message buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) start: u32,
    pub(crate) end: u32,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct FieldSpan {
    pub(crate) key: Span,
    pub(crate) value: Span,
}

/// One AMI message with its fields in wire order.
///
/// Lookups compare keys ASCII case-insensitively: Asterisk itself is not consistent
/// (`BridgeID` in `Status`, `BridgeId` in `CoreShowChannel`).
#[derive(Clone)]
pub struct Message {
    /// UTF-8 checked bytes of the frame (or a buffer built by [`Message::from_pairs`]).
    buf: Bytes,
    fields: Vec<FieldSpan>,
}

impl Message {
    /// Build a message from spans the codec has already checked: `buf` is valid UTF-8
    /// and every span lies on character boundaries inside it.
    pub(crate) fn from_checked(buf: Bytes, fields: Vec<FieldSpan>) -> Self {
        Message { buf, fields }
    }

    /// Build a message from key/value pairs (actions we send, synthetic test events).
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Self {
        let mut raw = String::new();
        let mut fields = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            let ks = raw.len() as u32;
            raw.push_str(k.as_ref());
            let ke = raw.len() as u32;
            raw.push_str(": ");
            let vs = raw.len() as u32;
            raw.push_str(v.as_ref());
            let ve = raw.len() as u32;
            raw.push_str("\r\n");
            fields.push(FieldSpan {
                key: Span { start: ks, end: ke },
                value: Span { start: vs, end: ve },
            });
        }
        Message {
            buf: Bytes::from(raw),
            fields,
        }
    }

    #[inline]
    fn text(&self, span: Span) -> &str {
        let bytes = &self.buf[span.start as usize..span.end as usize];
        // The codec validated the whole frame as UTF-8 and cut spans only at ASCII
        // delimiters (':', ' ', '\r', '\n'), so this cannot fail; fall back to "" rather
        // than panic if that invariant were ever broken.
        std::str::from_utf8(bytes).unwrap_or("")
    }

    /// The first value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|f| self.key_is(f, key))
            .map(|f| self.text(f.value))
    }

    /// Every value of `key`, in wire order.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields
            .iter()
            .filter(move |f| self.key_is(f, key))
            .map(move |f| self.text(f.value))
    }

    /// Compare a field's key without re-checking UTF-8 (bytes are enough to compare).
    #[inline]
    fn key_is(&self, f: &FieldSpan, key: &str) -> bool {
        let k = &self.buf[f.key.start as usize..f.key.end as usize];
        if k.is_empty() {
            return key.eq_ignore_ascii_case("Output");
        }
        k.eq_ignore_ascii_case(key.as_bytes())
    }

    /// The key of a field. An empty key span marks a colon-less line of old-style
    /// (`Response: Follows`) command output, which reads back as `Output`.
    #[inline]
    fn key_text(&self, f: &FieldSpan) -> &str {
        if f.key.start == f.key.end {
            "Output"
        } else {
            self.text(f.key)
        }
    }

    /// All fields as `(key, value)`, in wire order.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.fields
            .iter()
            .map(move |f| (self.key_text(f), self.text(f.value)))
    }

    /// Number of fields (repeated keys count each time).
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// True for a message without fields.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The event name (`Event:` field), if this is an event.
    pub fn event(&self) -> Option<&str> {
        self.get("Event")
    }

    /// The response status (`Response:` field: Success, Error, Follows, Goodbye), if a response.
    pub fn response(&self) -> Option<&str> {
        self.get("Response")
    }

    /// The `ActionID` this message answers, if any.
    pub fn action_id(&self) -> Option<&str> {
        self.get("ActionID")
    }

    /// True if this is the event named `name` (case-insensitive).
    pub fn is_event(&self, name: &str) -> bool {
        self.event().is_some_and(|e| e.eq_ignore_ascii_case(name))
    }

    /// The message as one JSON object: keys as sent, a repeated key becomes an array
    /// of its values in order.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        for (k, v) in self.fields() {
            match map.get_mut(k) {
                None => {
                    map.insert(k.to_string(), Value::String(v.to_string()));
                }
                Some(Value::Array(items)) => items.push(Value::String(v.to_string())),
                Some(existing) => {
                    let first = existing.take();
                    *existing = Value::Array(vec![first, Value::String(v.to_string())]);
                }
            }
        }
        Value::Object(map)
    }

    /// The wire form: `Key: Value\r\n` lines and the closing empty line.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len() + 2);
        for (k, v) in self.fields() {
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.fields()).finish()
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.fields().eq(other.fields())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_keep_order_and_become_arrays_in_json() {
        let m = Message::from_pairs(&[
            ("Response", "Success"),
            ("Output", "a"),
            ("Output", ""),
            ("Output", "b: c"),
        ]);
        assert_eq!(
            m.get_all("output").collect::<Vec<_>>(),
            vec!["a", "", "b: c"]
        );
        assert_eq!(m.response(), Some("Success"));
        assert_eq!(
            m.to_json(),
            serde_json::json!({"Response": "Success", "Output": ["a", "", "b: c"]})
        );
    }
}
