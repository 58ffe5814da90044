//! Route templates compiled into one `RegexSet`, and the index from routes to rules.
//!
//! Every route template of a plan becomes one pattern of a single set; a request's path is
//! matched once against the whole set, and conditions then read the result bit by bit.
//! Paths are matched as bytes: segment classes like `[^/]` then compile to one byte class
//! instead of a UTF-8 automaton, which keeps a thousand templates quick to build.

use std::sync::Arc;

use regex::bytes::RegexSet;
use smallvec::SmallVec;

/// One path segment, as bytes.
const SEGMENT: &str = "(?-u:[^/])+";

/// A route template that is not well formed, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError(pub String);

/// Turns a template into an anchored regular expression.
///
/// - `{name}` and `*` match one path segment;
/// - `**` (a whole segment) matches any number of segments, including none;
/// - everything else matches itself.
pub fn template_regex(template: &str) -> Result<String, TemplateError> {
    if !template.starts_with('/') {
        return Err(TemplateError("a route template starts with `/`".to_owned()));
    }
    let mut out = String::from("^");
    let segments: Vec<&str> = template[1..].split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        if *segment == "**" {
            out.push_str("(?:/(?-u:[^?#])*)?");
            continue;
        }
        if segment.contains("**") {
            return Err(TemplateError(
                "`**` must be a whole segment, as in `/static/**`".to_owned(),
            ));
        }
        out.push('/');
        let mut rest = *segment;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let Some(end) = after.find('}') else {
                    return Err(TemplateError("`{` without a closing `}`".to_owned()));
                };
                let name = &after[..end];
                if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                    return Err(TemplateError(format!(
                        "`{{{name}}}` is not a parameter name: use letters, digits and `_`"
                    )));
                }
                out.push_str(SEGMENT);
                rest = &after[end + 1..];
            } else if let Some(after) = rest.strip_prefix('*') {
                out.push_str(SEGMENT);
                rest = after;
            } else if rest.starts_with('}') {
                return Err(TemplateError("`}` without an opening `{`".to_owned()));
            } else {
                let end = rest.find(['{', '}', '*']).unwrap_or(rest.len());
                out.push_str(&regex::escape(&rest[..end]));
                rest = &rest[end..];
            }
        }
        if segment.is_empty() && i + 1 < segments.len() {
            return Err(TemplateError("empty segment `//`".to_owned()));
        }
    }
    out.push('$');
    Ok(out)
}

/// Identifies one route template in the plan's set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PatternId(pub(crate) usize);

/// Every route template of a plan, matched at once, and which limits each one guards.
#[derive(Debug)]
pub struct RouteIndex {
    set: RegexSet,
    templates: Vec<Arc<str>>,
    /// `by_pattern[p]`: limits that can only apply when pattern `p` matches.
    by_pattern: Vec<Vec<usize>>,
    /// Limits that must be checked whatever the path.
    unrouted: Vec<usize>,
}

/// Which templates matched one path.
#[derive(Debug)]
pub struct RouteMatches(regex::bytes::SetMatches);

impl RouteMatches {
    /// Whether template `id` matched.
    pub fn matched(&self, id: PatternId) -> bool {
        self.0.matched(id.0)
    }
}

impl RouteIndex {
    /// Builds the index: `patterns` are anchored regexes (one per template), and
    /// `guards[l]` lists the patterns of which one must match for limit `l` to apply
    /// (`None`: it can apply whatever the path).
    pub(crate) fn new(
        templates: Vec<Arc<str>>,
        patterns: &[String],
        guards: &[Option<Vec<PatternId>>],
    ) -> Result<Self, regex::Error> {
        let set = RegexSet::new(patterns)?;
        let mut by_pattern = vec![Vec::new(); patterns.len()];
        let mut unrouted = Vec::new();
        for (limit, guard) in guards.iter().enumerate() {
            match guard {
                Some(ids) => {
                    for id in ids {
                        by_pattern[id.0].push(limit);
                    }
                }
                None => unrouted.push(limit),
            }
        }
        Ok(RouteIndex {
            set,
            templates,
            by_pattern,
            unrouted,
        })
    }

    /// An index with no templates.
    pub(crate) fn empty() -> Self {
        RouteIndex {
            set: RegexSet::empty(),
            templates: Vec::new(),
            by_pattern: Vec::new(),
            unrouted: Vec::new(),
        }
    }

    /// Matches `path` against every template at once.
    pub fn matches(&self, path: &str) -> RouteMatches {
        RouteMatches(self.set.matches(path.as_bytes()))
    }

    /// The template of pattern `id`.
    pub fn template(&self, id: PatternId) -> &Arc<str> {
        &self.templates[id.0]
    }

    /// The limits worth checking for a path, by index, in ascending order.
    pub fn candidates(&self, matches: &RouteMatches) -> SmallVec<[usize; 8]> {
        let mut out: SmallVec<[usize; 8]> = SmallVec::from_slice(&self.unrouted);
        for p in matches.0.iter() {
            out.extend_from_slice(&self.by_pattern[p]);
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(template: &str, path: &str) -> bool {
        regex::bytes::Regex::new(&template_regex(template).unwrap())
            .unwrap()
            .is_match(path.as_bytes())
    }

    #[test]
    fn templates_match_segments() {
        let cases = [
            ("/api/v1/orders/{id}", "/api/v1/orders/42", true),
            ("/api/v1/orders/{id}", "/api/v1/orders/42/items", false),
            ("/api/v1/orders/{id}", "/api/v1/orders/", false),
            ("/api/*", "/api/users", true),
            ("/api/*", "/api/users/1", false),
            ("/static/**", "/static", true),
            ("/static/**", "/static/css/site.css", true),
            ("/static/**", "/staticx", false),
            ("/a/**/edit", "/a/b/c/edit", true),
            ("/a/**/edit", "/a/edit", true),
            ("/files/{name}.json", "/files/x.json", true),
            ("/files/{name}.json", "/files/xjson", false),
            ("/a.b", "/axb", false),
            ("/", "/", true),
            ("/café/{id}", "/café/1", true),
            ("/a/{id}", "/a/é", true),
        ];
        for (template, path, expected) in cases {
            assert_eq!(matches(template, path), expected, "{template} vs {path}");
        }
    }

    #[test]
    fn rejects_malformed_templates() {
        for bad in [
            "api", "/a/{id", "/a/id}", "/a/{}", "/a/x**", "/a//b", "/a/{i d}",
        ] {
            assert!(template_regex(bad).is_err(), "{bad} should be rejected");
        }
    }
}
