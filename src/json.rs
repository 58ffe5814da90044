//! Integers in JSON input read as JSON Schema (and so OpenAPI 3.1) reads them: `2`, `2.0` and
//! `2e0` are the same integer; `2.5`, `null` and numbers out of range are not integers.
//!
//! serde's own integer types refuse `2.0`, and `Option` takes `null` as absent; the API's
//! schemas say otherwise, so its integer fields are read with these (`#[serde(deserialize_with
//! = …)]`).

use std::fmt;

use serde::Deserializer;
use serde::de::{Error, Visitor};

/// The largest integer every JSON client holds exactly (2^53 − 1): the bound of the API's
/// integers that can be large (costs, lease ids).
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// An integer from 0 to `max`, written with or without a fractional part of zero.
pub fn integer<'de, D: Deserializer<'de>>(d: D, max: u64) -> Result<u64, D::Error> {
    d.deserialize_any(Integer { max })
}

/// A field that may be absent (`#[serde(default)]`) but, when present, is an integer from 0
/// to 2^53 − 1 — never `null`.
pub fn some_safe_integer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    integer(d, MAX_SAFE_INTEGER).map(Some)
}

/// An integer that fits in `u16` (an HTTP status, before its own range check).
pub fn u16_integer<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let n = integer(d, u64::from(u16::MAX))?;
    Ok(u16::try_from(n).unwrap_or(u16::MAX))
}

struct Integer {
    max: u64,
}

impl Integer {
    fn checked<E: Error>(&self, n: u64) -> Result<u64, E> {
        if n <= self.max {
            Ok(n)
        } else {
            Err(E::custom(format_args!("{n} is larger than {}", self.max)))
        }
    }
}

impl Visitor<'_> for Integer {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an integer from 0 to {}", self.max)
    }

    fn visit_u64<E: Error>(self, n: u64) -> Result<u64, E> {
        self.checked(n)
    }

    fn visit_i64<E: Error>(self, n: i64) -> Result<u64, E> {
        match u64::try_from(n) {
            Ok(n) => self.checked(n),
            Err(_) => Err(E::custom(format_args!("{n} is negative"))),
        }
    }

    fn visit_f64<E: Error>(self, x: f64) -> Result<u64, E> {
        if x.fract() != 0.0 || !x.is_finite() {
            return Err(E::custom(format_args!("{x} is not an integer")));
        }
        if x < 0.0 {
            return Err(E::custom(format_args!("{x} is negative")));
        }
        // Exact: an integral double below 2^64 converts without rounding; `max` is at most
        // u64::MAX, and 2^64 itself (what u64::MAX rounds to) is refused.
        if x >= 18_446_744_073_709_551_616.0 {
            return Err(E::custom(format_args!("{x} is larger than {}", self.max)));
        }
        self.checked(x as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str, max: u64) -> Result<u64, String> {
        let mut de = serde_json::Deserializer::from_str(json);
        integer(&mut de, max).map_err(|e| e.to_string())
    }

    #[test]
    fn integers_are_read_as_json_schema_reads_them() {
        assert_eq!(read("2", 10), Ok(2));
        assert_eq!(read("2.0", 10), Ok(2));
        assert_eq!(read("2e0", 10), Ok(2));
        assert_eq!(read("-0.0", 10), Ok(0));
        assert_eq!(read("10", 10), Ok(10));
        assert!(read("11", 10).unwrap_err().contains("larger than 10"));
        assert!(read("2.5", 10).unwrap_err().contains("not an integer"));
        assert!(read("-1", 10).unwrap_err().contains("negative"));
        assert!(read("-1.0", 10).unwrap_err().contains("negative"));
        assert!(
            read("null", 10)
                .unwrap_err()
                .contains("expected an integer")
        );
        assert!(read("\"2\"", 10).is_err());
        assert_eq!(
            read("9007199254740991", MAX_SAFE_INTEGER),
            Ok(MAX_SAFE_INTEGER)
        );
        assert!(read("9007199254740992", MAX_SAFE_INTEGER).is_err());
        assert!(read("18446744073709551616.0", u64::MAX).is_err());
        assert_eq!(read("18446744073709551615", u64::MAX), Ok(u64::MAX));
    }
}
