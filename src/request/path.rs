//! Request paths in one canonical form, so that every spelling of a path an application
//! server would resolve to the same resource is matched, keyed and forwarded as that one
//! path.
//!
//! The rule (RFC 3986 §6.2.2, plus what application servers do with the rest):
//! 1. percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded
//!    (`/%61uth` is `/auth`); every other escape is kept, with upper-case hex digits;
//! 2. characters a path cannot hold as they are (space, non-ASCII, `"` `<` `>` `` ` `` `{`
//!    `}` `|` `^` `#`) are percent-encoded, as a browser would send them;
//! 3. empty segments are collapsed (`//a` is `/a`), `.` segments dropped and `..` segments
//!    remove the one before (`/a/x/../b` is `/a/b`; never above the root);
//! 4. a trailing `/` is kept (route templates match with or without it).
//!
//! Paths that cannot be normalized safely are refused: an encoded `/` or `\` (`%2F`,
//! `%5C`), which some servers decode into a separator and others do not; a raw `\`; a NUL
//! or other control character, raw or encoded; a `%` not followed by two hex digits; a path
//! that does not start with `/`.

use std::borrow::Cow;

/// Why a path cannot be normalized safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path does not start with `/`.
    #[error("the path does not start with `/`")]
    NotAbsolute,
    /// An encoded separator (`%2F`, `%5C`) or a raw `\`.
    #[error("the path holds an encoded `/` or a `\\`, which servers resolve differently")]
    AmbiguousSeparator,
    /// A control character (NUL included), raw or encoded.
    #[error("the path holds a control character")]
    ControlCharacter,
    /// A `%` not followed by two hex digits.
    #[error("the path holds a `%` that is not a percent-escape")]
    MalformedEscape,
}

/// The canonical form of `path` (no query string), borrowed when it is already canonical.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_canonical(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let encoded = canonical_characters(path.as_bytes())?;
    Ok(Cow::Owned(remove_dot_segments(&encoded)))
}

/// Whether `path` is already canonical: only characters a path holds as they are and
/// escapes in canonical form, no empty, `.` or `..` segment. The common case, checked in one
/// pass.
fn is_canonical(path: &[u8]) -> bool {
    let mut previous = b'/';
    let mut i = 1;
    while i < path.len() {
        let b = path[i];
        if b == b'%' {
            if !canonical_escape(&path[i..]) {
                return false;
            }
            previous = b'%';
            i += 3;
            continue;
        }
        if !plain(b) {
            return false;
        }
        if previous == b'/' && (b == b'/' || (b == b'.' && dot_segment(&path[i..]))) {
            return false;
        }
        previous = b;
        i += 1;
    }
    true
}

/// Whether `rest` starts with an escape that normalizing would keep as it is: upper-case
/// hex, of a character that is neither unreserved nor refused.
fn canonical_escape(rest: &[u8]) -> bool {
    let upper = |b: u8| b.is_ascii_digit() || (b'A'..=b'F').contains(&b);
    match rest {
        [b'%', h, l, ..] if upper(*h) && upper(*l) => {
            let decoded = hex_value(*h).unwrap_or(0) << 4 | hex_value(*l).unwrap_or(0);
            !(unreserved(decoded) || decoded.is_ascii_control() || matches!(decoded, b'/' | b'\\'))
        }
        _ => false,
    }
}

/// Whether `rest`, which starts with `.` at a segment's start, is a `.` or `..` segment.
fn dot_segment(rest: &[u8]) -> bool {
    matches!(
        rest,
        [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..]
    )
}

/// Characters a canonical path holds as they are: unreserved, sub-delims, `:`, `@`, `/`.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b)
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn push_escape(out: &mut String, b: u8) {
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Steps 1 and 2: escapes decoded or upper-cased, raw characters encoded.
fn canonical_characters(path: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len() + 8);
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'%' {
            let (Some(high), Some(low)) = (
                path.get(i + 1).copied().and_then(hex_value),
                path.get(i + 2).copied().and_then(hex_value),
            ) else {
                return Err(PathError::MalformedEscape);
            };
            let decoded = high << 4 | low;
            match decoded {
                b'/' | b'\\' => return Err(PathError::AmbiguousSeparator),
                _ if decoded.is_ascii_control() => return Err(PathError::ControlCharacter),
                _ if unreserved(decoded) => out.push(char::from(decoded)),
                _ => push_escape(&mut out, decoded),
            }
            i += 3;
            continue;
        }
        match b {
            b'\\' => return Err(PathError::AmbiguousSeparator),
            _ if b.is_ascii_control() => return Err(PathError::ControlCharacter),
            _ if plain(b) => out.push(char::from(b)),
            _ => push_escape(&mut out, b),
        }
        i += 1;
    }
    Ok(out)
}

/// Step 3 and 4: empty and dot segments resolved, a trailing `/` kept.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing = false;
    for segment in path.split('/').skip(1) {
        trailing = true;
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => {
                segments.push(segment);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_of_one_path_become_that_path() {
        for variant in [
            "/auth/login",
            "//auth/login",
            "/auth//login",
            "/auth/./login",
            "/auth/x/../login",
            "/auth/%6cogin",
            "/auth/%6Cogin",
            "/%61uth/login",
            "/auth/%2e/login",
            "/auth/x/%2E%2E/login",
            "/../auth/login",
            "/auth/login/x/..",
        ] {
            let canonical = normalize(variant).unwrap();
            assert_eq!(
                canonical.trim_end_matches('/'),
                "/auth/login",
                "{variant} normalized to {canonical}"
            );
        }
        assert_eq!(normalize("/auth/login/.").unwrap(), "/auth/login/");
        assert_eq!(normalize("/auth/login/").unwrap(), "/auth/login/");
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for path in [
            "/",
            "/a/b",
            "/a.b/c..d/.e",
            "/a/b/",
            "/~u/x;y=1",
            "/a/%20",
            "/caf%C3%A9",
        ] {
            assert!(
                matches!(normalize(path), Ok(Cow::Borrowed(_))),
                "{path} should already be canonical"
            );
        }
        // A lower-case escape is not canonical.
        assert_eq!(normalize("/caf%c3%a9").unwrap(), "/caf%C3%A9");
    }

    #[test]
    fn characters_are_encoded_as_a_browser_would() {
        assert_eq!(normalize("/café/1").unwrap(), "/caf%C3%A9/1");
        assert_eq!(normalize("/a b").unwrap(), "/a%20b");
        assert_eq!(normalize("/a%3Fb").unwrap(), "/a%3Fb");
        assert_eq!(normalize("/a%40b").unwrap(), "/a%40b");
    }

    #[test]
    fn dot_segments_never_climb_above_the_root() {
        assert_eq!(normalize("/..").unwrap(), "/");
        assert_eq!(normalize("/../../a").unwrap(), "/a");
        assert_eq!(normalize("/a/b/../../..").unwrap(), "/");
        assert_eq!(normalize("//").unwrap(), "/");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        let cases = [
            ("/auth%2Flogin", PathError::AmbiguousSeparator),
            ("/auth%2flogin", PathError::AmbiguousSeparator),
            ("/auth%5Clogin", PathError::AmbiguousSeparator),
            ("/auth\\login", PathError::AmbiguousSeparator),
            ("/auth%00", PathError::ControlCharacter),
            ("/auth\u{0}", PathError::ControlCharacter),
            ("/a%0d%0aX: y", PathError::ControlCharacter),
            ("/a%", PathError::MalformedEscape),
            ("/a%4", PathError::MalformedEscape),
            ("/a%zz", PathError::MalformedEscape),
            ("auth/login", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
        ];
        for (path, error) in cases {
            assert_eq!(normalize(path), Err(error), "{path:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn normalizing_twice_changes_nothing(path in "/[a-zA-Z0-9%./é ~-]{0,40}") {
            if let Ok(once) = normalize(&path) {
                let twice = normalize(&once).unwrap();
                proptest::prop_assert_eq!(&twice, &once);
                proptest::prop_assert!(matches!(twice, Cow::Borrowed(_)));
            }
        }
    }
}
