//! Amounts read by name: a field of a JSON body by its path, a header as a whole number —
//! what a reservation reads from a request and a usage cost from a response.

use std::fmt;

use serde::Deserialize as _;

use crate::json::MAX_SAFE_INTEGER;

/// The most segments a path may have, and its longest text.
pub const MAX_PATH_SEGMENTS: usize = 16;
/// The longest path, in bytes.
pub const MAX_PATH_LEN: usize = 256;

/// A field of a JSON document: names (and array positions) joined by dots, as written in a
/// policy (`usage.total_tokens`, `choices.0.usage.tokens`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct JsonPath {
    written: Box<str>,
    segments: Box<[Box<str>]>,
}

/// Why a path cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonPathError {
    /// Empty, or an empty segment (`a..b`, `.a`).
    #[error("a path names fields joined by dots, each at least one character")]
    Empty,
    /// Too many segments or too long.
    #[error("a path has at most {MAX_PATH_SEGMENTS} fields and {MAX_PATH_LEN} bytes")]
    TooLong,
}

impl JsonPath {
    /// Parses `usage.total_tokens`.
    pub fn parse(written: &str) -> Result<Self, JsonPathError> {
        if written.len() > MAX_PATH_LEN {
            return Err(JsonPathError::TooLong);
        }
        let segments: Vec<Box<str>> = written.split('.').map(Box::from).collect();
        if segments.iter().any(|s| s.is_empty()) {
            return Err(JsonPathError::Empty);
        }
        if segments.len() > MAX_PATH_SEGMENTS {
            return Err(JsonPathError::TooLong);
        }
        Ok(JsonPath {
            written: written.into(),
            segments: segments.into(),
        })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.written
    }

    /// The value at this path in `doc`: a field of an object by name, an element of an
    /// array by position.
    pub fn find<'v>(&self, doc: &'v serde_json::Value) -> Option<&'v serde_json::Value> {
        self.segments.iter().try_fold(doc, |v, segment| match v {
            serde_json::Value::Object(map) => map.get(&**segment),
            serde_json::Value::Array(items) => items.get(segment.parse::<usize>().ok()?),
            _ => None,
        })
    }

    /// The whole number at this path in `doc` (see [`amount`]).
    pub fn amount(&self, doc: &serde_json::Value) -> Option<u64> {
        self.find(doc).and_then(amount)
    }

    /// The whole number at this path in the JSON document `text`, read in one pass that
    /// keeps nothing but the path's own values (no tree is built: what a streamed
    /// response's every event costs). `None` when the text is not JSON, or has no amount
    /// there. A text without the path's last name in it is not parsed at all.
    pub fn amount_in(&self, text: &[u8]) -> Option<u64> {
        let last = self.segments.last()?;
        if last.parse::<usize>().is_err() && !mentions(text, last) {
            return None;
        }
        let mut de = serde_json::Deserializer::from_slice(text);
        let found = serde::de::DeserializeSeed::deserialize(Seek(&self.segments), &mut de).ok()?;
        de.end().ok()?;
        found
    }
}

/// Whether `text` has `"name"` in it (a field of that name may be there).
fn mentions(text: &[u8], name: &str) -> bool {
    let mut quoted = Vec::with_capacity(name.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(name.as_bytes());
    quoted.push(b'"');
    memchr::memmem::find(text, &quoted).is_some()
}

/// Walks a JSON value down `path`: the amount at its end, if any; everything off the path
/// is skipped without being kept.
struct Seek<'p>(&'p [Box<str>]);

impl<'de> serde::de::DeserializeSeed<'de> for Seek<'_> {
    type Value = Option<u64>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        if self.0.is_empty() {
            // The end of the path: a whole number, or no amount (and the value skipped).
            let value = serde_json::Value::deserialize(d)?;
            return Ok(amount(&value));
        }
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Seek<'_> {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (first, rest) = self.0.split_first().expect("a segment");
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            // A name given twice: the last counts, as in a parsed document.
            if key == **first {
                found = map.next_value_seed(Seek(rest))?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let (first, rest) = self.0.split_first().expect("a segment");
        let at = first.parse::<usize>().ok();
        let mut found = None;
        let mut i = 0;
        loop {
            if Some(i) == at {
                match seq.next_element_seed(Seek(rest))? {
                    Some(value) => found = value,
                    None => break,
                }
            } else if seq.next_element::<serde::de::IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(found)
    }

    // Anything else (a number, a string, null) has no fields: no amount below it.
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

impl fmt::Debug for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "json({:?})", self.written)
    }
}

/// A JSON value as an amount: a whole number from 0 to 2^53 − 1, the largest every store
/// counts exactly (`2.0` counts, as JSON Schema counts it); anything else is no amount.
pub fn amount(value: &serde_json::Value) -> Option<u64> {
    crate::json::integer(value, MAX_SAFE_INTEGER).ok()
}

/// A header value as an amount: a whole number from 0 to 2^53 − 1, spaces around it allowed.
pub fn header_amount(value: &http::HeaderValue) -> Option<u64> {
    let text = value.to_str().ok()?.trim();
    text.parse::<u64>().ok().filter(|n| *n <= MAX_SAFE_INTEGER)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_path_reads_objects_by_name_and_arrays_by_position() {
        let doc = json!({"usage": {"total_tokens": 42, "parts": [3, 4.0, -1, 1.5, "7"]}});
        let read = |p: &str| JsonPath::parse(p).unwrap().amount(&doc);
        assert_eq!(read("usage.total_tokens"), Some(42));
        assert_eq!(read("usage.parts.0"), Some(3));
        assert_eq!(read("usage.parts.1"), Some(4), "integral numbers count");
        assert_eq!(read("usage.parts.2"), None, "negative");
        assert_eq!(read("usage.parts.3"), None, "fractional");
        assert_eq!(read("usage.parts.4"), None, "a string");
        assert_eq!(read("usage.parts.9"), None);
        assert_eq!(read("usage.missing"), None);
        assert_eq!(read("usage.total_tokens.deeper"), None);
    }

    #[test]
    fn a_path_is_read_from_text_in_one_pass_as_from_a_document() {
        let texts = [
            r#"{"id":"x","choices":[{"delta":{"content":"a"}}],"usage":{"total_tokens":42,"parts":[3,4.0,-1,"7"]}}"#,
            r#"{"usage":null,"choices":[]}"#,
            r#"{"usage":{"total_tokens":"12"}}"#,
            r#"{"usage":{"total_tokens":12},"usage":{"total_tokens":13}}"#,
            r#"[1,2]"#,
            r#"not json"#,
            r#"{"usage":{"total_tokens":5}} trailing"#,
            r#"{"a\u0022b":{"c":1},"usage":{"total_tokens":7}}"#,
        ];
        for path in [
            "usage.total_tokens",
            "usage.parts.1",
            "usage.parts.2",
            "choices.0.x",
            "0",
        ] {
            let p = JsonPath::parse(path).unwrap();
            for text in texts {
                let tree = serde_json::from_str::<serde_json::Value>(text).ok();
                let expected = tree.as_ref().and_then(|t| p.amount(t));
                assert_eq!(p.amount_in(text.as_bytes()), expected, "{path} in {text}");
            }
        }
    }

    #[test]
    fn bad_paths_are_refused() {
        assert_eq!(JsonPath::parse(""), Err(JsonPathError::Empty));
        assert_eq!(JsonPath::parse("a..b"), Err(JsonPathError::Empty));
        assert_eq!(JsonPath::parse(".a"), Err(JsonPathError::Empty));
        let deep = vec!["a"; MAX_PATH_SEGMENTS + 1].join(".");
        assert_eq!(JsonPath::parse(&deep), Err(JsonPathError::TooLong));
        assert!(JsonPath::parse(&vec!["a"; MAX_PATH_SEGMENTS].join(".")).is_ok());
    }

    #[test]
    fn header_amounts_are_whole_numbers_within_the_exact_range() {
        let h = |s: &'static str| header_amount(&http::HeaderValue::from_static(s));
        assert_eq!(h(" 120 "), Some(120));
        assert_eq!(h("0"), Some(0));
        assert_eq!(h("-1"), None);
        assert_eq!(h("1e3"), None);
        assert_eq!(h("9007199254740992"), None);
    }
}
