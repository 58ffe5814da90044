//! A bound on how deeply conditions nest, checked before the parser sees a file.
//!
//! The parser descends once per `(` and per `not`/`!`; a file with thousands of them would
//! overflow the stack and abort the process, and with hot reload a bad file must never take a
//! server down. So a quick scan finds where nesting passes [`MAX_DEPTH`], and the parser
//! reports that place instead of descending into it.

/// How deeply conditions may nest: open parentheses and pending `not`/`!` together. Real
/// policies use a handful.
pub(crate) const MAX_DEPTH: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Frame {
    Paren,
    Not,
}

/// Every place where nesting passes [`MAX_DEPTH`] (once per statement), as a byte offset and
/// the length of the token there, in order. One pass over the text.
pub(crate) fn too_deep(text: &str) -> Vec<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut reported = false;
    let mut i = 0;
    // Pending `not`s are satisfied by the operand that follows them.
    let operand = |stack: &mut Vec<Frame>| {
        while stack.last() == Some(&Frame::Not) {
            stack.pop();
        }
    };
    while i < bytes.len() {
        let b = bytes[i];
        let (frame, len) = match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'#' => {
                i = skip_line(bytes, i);
                continue;
            }
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                i = skip_line(bytes, i);
                continue;
            }
            b'"' => {
                i = skip_string(bytes, i);
                operand(&mut stack);
                continue;
            }
            b';' | b'{' | b'}' => {
                stack.clear();
                reported = false;
                i += 1;
                continue;
            }
            b'(' => (Some(Frame::Paren), 1),
            b')' => {
                operand(&mut stack);
                stack.pop();
                operand(&mut stack);
                i += 1;
                continue;
            }
            b'!' if bytes.get(i + 1) != Some(&b'=') => (Some(Frame::Not), 1),
            _ if b.is_ascii_alphanumeric() || b == b'_' => {
                let len = bytes[i..]
                    .iter()
                    .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
                    .count();
                if &bytes[i..i + len] == b"not" {
                    (Some(Frame::Not), len)
                } else {
                    (None, len)
                }
            }
            _ => (None, 1),
        };
        match frame {
            Some(frame) => {
                stack.push(frame);
                if stack.len() > MAX_DEPTH && !reported {
                    found.push((i, len));
                    reported = true;
                }
            }
            None => {
                // Words like `and`, `or`, `header` are not operands of a `not`; only what
                // can close a condition is. Treating them as operands could only undercount
                // pending `not`s by the one before them, which the parser cannot nest.
                if !matches!(&bytes[i..i + len], b"and" | b"or" | b"&" | b"|") {
                    operand(&mut stack);
                }
            }
        }
        i += len;
    }
    found
}

fn skip_line(bytes: &[u8], i: usize) -> usize {
    bytes[i..]
        .iter()
        .position(|b| *b == b'\n')
        .map_or(bytes.len(), |n| i + n + 1)
}

fn skip_string(bytes: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' | b'\n' => return i + 1,
            _ => i += 1,
        }
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parentheses_and_nots_together() {
        let deep = |opens: &str, n: usize| {
            format!("limit x {{ match {{ {} route \"/\"; }} }}", opens.repeat(n))
        };
        assert!(too_deep(&deep("(", MAX_DEPTH)).is_empty());
        assert_eq!(too_deep(&deep("(", MAX_DEPTH + 1)).len(), 1);
        assert!(too_deep(&deep("not ", MAX_DEPTH)).is_empty());
        assert_eq!(too_deep(&deep("! ", MAX_DEPTH + 1)).len(), 1);
        assert_eq!(too_deep(&deep("not (", MAX_DEPTH / 2 + 1)).len(), 1);
        let twice = format!("{}\n{}", deep("(", 100), deep("(", 100));
        assert_eq!(too_deep(&twice).len(), 2, "once per statement");
    }

    #[test]
    fn wide_conditions_are_not_deep() {
        let wide = format!(
            "limit x {{ match {{ {} }} }}",
            vec!["not (header(\"a\") != \"(\" and !method GET) // ((((("; 500].join(" or\n")
        );
        assert!(too_deep(&wide).is_empty());
    }

    #[test]
    fn the_place_is_the_first_token_too_deep() {
        let text = format!("limit x {{ when {}", "(".repeat(100));
        let found = too_deep(&text);
        assert_eq!(found, [(text.find('(').unwrap() + MAX_DEPTH, 1)]);
    }
}
