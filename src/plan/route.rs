//! Route templates compiled into one tree over path segments, and the index from routes to
//! limits.
//!
//! A request's path is walked once down the tree: literal segments are a hash lookup, `{id}`
//! and `*` one edge, and only segments that mix literals and wildcards (`{name}.json`) or
//! `**` are tried one by one. The cost of a match grows with the path's length and the
//! number of templates that share its prefix, not with the number of templates in the plan,
//! and nothing is cached, so nothing thrashes as the plan grows.
//!
//! Paths are matched in their canonical form (see [`crate::request::path`]); templates are
//! brought to the same form when they are compiled, and a trailing `/` is ignored on both
//! sides.

use std::collections::HashMap;
use std::sync::Arc;

use smallvec::SmallVec;

/// A route template that is not well formed, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError(pub String);

/// One segment of a template.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    /// Matches itself (canonical form).
    Literal(Box<str>),
    /// `{name}` or `*`: any one non-empty segment.
    Any,
    /// Literals and wildcards mixed, as in `{name}.json`: each wildcard matches one or more
    /// characters.
    Glob(Box<[GlobPart]>),
    /// `**`: any number of segments, including none.
    Rest,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum GlobPart {
    Literal(Box<str>),
    Wild,
}

/// A parsed route template.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Template(Vec<Segment>);

impl Template {
    /// Parses a template:
    ///
    /// - `{name}` and `*` match one path segment;
    /// - `**` (a whole segment) matches any number of segments, including none;
    /// - everything else matches itself, compared in canonical form (`/café` matches a
    ///   request for `/caf%C3%A9`), and a trailing `/` is ignored.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let Some(rest) = template.strip_prefix('/') else {
            return Err(TemplateError("a route template starts with `/`".to_owned()));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() {
            return Ok(Template(Vec::new()));
        }
        rest.split('/')
            .map(parse_segment)
            .collect::<Result<_, _>>()
            .map(Template)
    }
}

fn parse_segment(segment: &str) -> Result<Segment, TemplateError> {
    if segment.is_empty() {
        return Err(TemplateError("empty segment `//`".to_owned()));
    }
    if segment == "**" {
        return Ok(Segment::Rest);
    }
    if segment.contains("**") {
        return Err(TemplateError(
            "`**` must be a whole segment, as in `/static/**`".to_owned(),
        ));
    }
    let mut parts = Vec::new();
    let mut rest = segment;
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
            parts.push(GlobPart::Wild);
            rest = &after[end + 1..];
        } else if let Some(after) = rest.strip_prefix('*') {
            parts.push(GlobPart::Wild);
            rest = after;
        } else if rest.starts_with('}') {
            return Err(TemplateError("`}` without an opening `{`".to_owned()));
        } else {
            let end = rest.find(['{', '}', '*']).unwrap_or(rest.len());
            parts.push(GlobPart::Literal(canonical_literal(&rest[..end])?));
            rest = &rest[end..];
        }
    }
    Ok(match parts.as_slice() {
        [GlobPart::Wild] => Segment::Any,
        [GlobPart::Literal(text)] => Segment::Literal(text.clone()),
        _ => Segment::Glob(parts.into_boxed_slice()),
    })
}

/// A literal part of a template in the form a canonical path holds it.
fn canonical_literal(text: &str) -> Result<Box<str>, TemplateError> {
    let path = format!("/{text}");
    match crate::request::path::normalize(&path) {
        Ok(canonical) if canonical.len() > 1 && !canonical[1..].contains('/') => {
            Ok(canonical[1..].into())
        }
        Ok(_) => Err(TemplateError(format!(
            "`{text}` is a dot segment, which no canonical path holds"
        ))),
        Err(e) => Err(TemplateError(format!("`{text}`: {e}"))),
    }
}

/// A canonical path's segments, a trailing `/` ignored.
fn path_segments(path: &str) -> SmallVec<[&str; 8]> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        SmallVec::new()
    } else {
        path.split('/').collect()
    }
}

/// Whether `text` (canonical, so ASCII) matches a glob whose wildcards each match one or
/// more characters. The classic two-pointer match (a wildcard is "one character, then any
/// number"): at most `text × glob` steps, whatever either holds.
fn glob_matches(parts: &[GlobPart], text: &str) -> bool {
    #[derive(Clone, Copy)]
    enum Token {
        Byte(u8),
        One,
        Star,
    }
    let tokens: SmallVec<[Token; 32]> = parts
        .iter()
        .flat_map(|part| -> SmallVec<[Token; 16]> {
            match part {
                GlobPart::Literal(lit) => lit.bytes().map(Token::Byte).collect(),
                GlobPart::Wild => SmallVec::from_slice(&[Token::One, Token::Star]),
            }
        })
        .collect();
    let text = text.as_bytes();
    let (mut t, mut g) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        match tokens.get(g) {
            Some(Token::Star) => {
                backtrack = Some((g, t));
                g += 1;
            }
            Some(Token::One) => {
                t += 1;
                g += 1;
            }
            Some(Token::Byte(b)) if *b == text[t] => {
                t += 1;
                g += 1;
            }
            _ => match backtrack {
                Some((star, from)) => {
                    g = star + 1;
                    t = from + 1;
                    backtrack = Some((star, from + 1));
                }
                None => return false,
            },
        }
    }
    tokens[g..].iter().all(|token| matches!(token, Token::Star))
}

/// Identifies one route template in the plan's set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PatternId(pub(crate) usize);

/// A node's literal edges: a short list compared in place while there are few (most
/// nodes), a hash map past that (the fan-out under `/tenants/` of a multi-tenant API).
#[derive(Debug, Default)]
struct Literals {
    few: Vec<(Box<str>, usize)>,
    many: Option<HashMap<Box<str>, usize, foldhash::fast::RandomState>>,
}

/// How many literal edges a node keeps in a list before it hashes them.
const FEW_LITERALS: usize = 8;

impl Literals {
    fn is_empty(&self) -> bool {
        self.few.is_empty() && self.many.is_none()
    }

    fn get(&self, segment: &str) -> Option<usize> {
        match &self.many {
            Some(map) => map.get(segment).copied(),
            None => self
                .few
                .iter()
                .find(|(text, _)| **text == *segment)
                .map(|(_, next)| *next),
        }
    }

    fn insert(&mut self, text: Box<str>, next: usize) {
        if let Some(map) = &mut self.many {
            map.insert(text, next);
            return;
        }
        self.few.push((text, next));
        if self.few.len() > FEW_LITERALS {
            self.many = Some(self.few.drain(..).collect());
        }
    }
}

/// One node of the tree: its edges, and the templates that end there.
#[derive(Debug, Default)]
struct Node {
    literal: Literals,
    any: Option<usize>,
    globs: Vec<(Box<[GlobPart]>, usize)>,
    /// The node a `**` segment leads to; it loops on itself for every further segment.
    rest: Option<usize>,
    ends: Vec<PatternId>,
}

impl Node {
    /// Whether no edge leaves the node.
    fn is_leaf(&self) -> bool {
        self.literal.is_empty()
            && self.any.is_none()
            && self.globs.is_empty()
            && self.rest.is_none()
    }
}

/// Every template of a plan as one tree over segments.
#[derive(Debug)]
struct Tree {
    nodes: Vec<Node>,
    /// For a node reached through `**` (it consumes any number of segments), its index
    /// among such nodes.
    loops: Vec<Option<u32>>,
    /// How many nodes loop.
    loop_count: usize,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            nodes: vec![Node::default()],
            loops: vec![None],
            loop_count: 0,
        }
    }
}

impl Tree {
    fn child(&mut self, loops: bool) -> usize {
        self.nodes.push(Node::default());
        self.loops.push(loops.then(|| {
            self.loop_count += 1;
            u32::try_from(self.loop_count - 1).unwrap_or(u32::MAX)
        }));
        self.nodes.len() - 1
    }

    fn insert(&mut self, template: &Template, id: PatternId) {
        let mut at = 0;
        for segment in &template.0 {
            at = match segment {
                Segment::Literal(text) => match self.nodes[at].literal.get(text) {
                    Some(next) => next,
                    None => {
                        let next = self.child(false);
                        self.nodes[at].literal.insert(text.clone(), next);
                        next
                    }
                },
                Segment::Any => match self.nodes[at].any {
                    Some(next) => next,
                    None => {
                        let next = self.child(false);
                        self.nodes[at].any = Some(next);
                        next
                    }
                },
                Segment::Glob(parts) => {
                    match self.nodes[at].globs.iter().find(|(p, _)| p == parts) {
                        Some(&(_, next)) => next,
                        None => {
                            let next = self.child(false);
                            self.nodes[at].globs.push((parts.clone(), next));
                            next
                        }
                    }
                }
                Segment::Rest => match self.nodes[at].rest {
                    Some(next) => next,
                    None => {
                        let next = self.child(true);
                        self.nodes[at].rest = Some(next);
                        next
                    }
                },
            };
        }
        self.nodes[at].ends.push(id);
    }

    /// Adds to `out` every template that matches `segments`, sorted, without repeats.
    fn walk(&self, segments: &[&str], out: &mut SmallVec<[PatternId; 4]>) {
        // Each (looping node, position) is visited once, so `**` segments cost at most
        // nodes × segments steps, whatever the path; other nodes are reached once per
        // position through their one parent. The visits are bits on the stack for the usual
        // one or two `**`.
        let positions = segments.len() + 1;
        let mut seen: SmallVec<[u64; 2]> =
            SmallVec::from_elem(0, (self.loop_count * positions).div_ceil(64));
        let mut stack: SmallVec<[(usize, usize); 16]> = SmallVec::new();
        stack.push((0, 0));
        while let Some((at, i)) = stack.pop() {
            let node = &self.nodes[at];
            if self.loops[at].is_some() && node.is_leaf() {
                // A trailing `**` (`/api/**`): whatever is left matches, at once.
                out.extend_from_slice(&node.ends);
                continue;
            }
            if let Some(l) = self.loops[at] {
                let bit = l as usize * positions + i;
                if seen[bit / 64] & (1 << (bit % 64)) != 0 {
                    continue;
                }
                seen[bit / 64] |= 1 << (bit % 64);
            }
            if let Some(rest) = node.rest {
                stack.push((rest, i));
            }
            let Some(segment) = segments.get(i) else {
                out.extend_from_slice(&node.ends);
                continue;
            };
            if self.loops[at].is_some() {
                stack.push((at, i + 1));
            }
            if let Some(next) = node.literal.get(segment) {
                stack.push((next, i + 1));
            }
            if let Some(next) = node.any {
                stack.push((next, i + 1));
            }
            for (parts, next) in &node.globs {
                if glob_matches(parts, segment) {
                    stack.push((*next, i + 1));
                }
            }
        }
        if out.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }
}

/// Every route template of a plan, matched at once, and which limits each one guards.
#[derive(Debug)]
pub struct RouteIndex {
    tree: Tree,
    templates: Vec<Arc<str>>,
    /// `by_pattern[p]`: limits that can only apply when pattern `p` matches.
    by_pattern: Vec<Vec<usize>>,
    /// Limits that must be checked whatever the path.
    unrouted: Vec<usize>,
}

/// Which templates matched one path.
#[derive(Debug)]
pub struct RouteMatches(SmallVec<[PatternId; 4]>);

impl RouteMatches {
    /// Whether template `id` matched.
    pub fn matched(&self, id: PatternId) -> bool {
        self.0.binary_search(&id).is_ok()
    }
}

impl RouteIndex {
    /// Builds the index: `templates[p]` is pattern `p` as written and parsed, and
    /// `guards[l]` lists the patterns of which one must match for limit `l` to apply
    /// (`None`: it can apply whatever the path).
    pub(crate) fn new(
        templates: Vec<(Arc<str>, Template)>,
        guards: &[Option<Vec<PatternId>>],
    ) -> Self {
        let mut tree = Tree::default();
        for (p, (_, template)) in templates.iter().enumerate() {
            tree.insert(template, PatternId(p));
        }
        let mut by_pattern = vec![Vec::new(); templates.len()];
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
        RouteIndex {
            tree,
            templates: templates.into_iter().map(|(text, _)| text).collect(),
            by_pattern,
            unrouted,
        }
    }

    /// Matches `path` (canonical) against every template at once.
    pub fn matches(&self, path: &str) -> RouteMatches {
        let mut out = SmallVec::new();
        self.tree.walk(&path_segments(path), &mut out);
        RouteMatches(out)
    }

    /// The template of pattern `id`, as written.
    pub fn template(&self, id: PatternId) -> &Arc<str> {
        &self.templates[id.0]
    }

    /// The limits worth checking for a path, by index, in ascending order.
    pub fn candidates(&self, matches: &RouteMatches) -> SmallVec<[usize; 8]> {
        let mut out: SmallVec<[usize; 8]> = SmallVec::from_slice(&self.unrouted);
        for p in &matches.0 {
            out.extend_from_slice(&self.by_pattern[p.0]);
        }
        if out.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `template` matches `path`, through a tree of that one template.
    fn matches(template: &str, path: &str) -> bool {
        template_matches(&Template::parse(template).unwrap(), path)
    }

    fn template_matches(template: &Template, path: &str) -> bool {
        let mut tree = Tree::default();
        tree.insert(template, PatternId(0));
        let mut out = SmallVec::new();
        tree.walk(&path_segments(path), &mut out);
        !out.is_empty()
    }

    #[test]
    fn templates_match_segments() {
        let cases = [
            ("/api/v1/orders/{id}", "/api/v1/orders/42", true),
            ("/api/v1/orders/{id}", "/api/v1/orders/42/", true),
            ("/api/v1/orders/{id}", "/api/v1/orders/42/items", false),
            ("/api/v1/orders/{id}", "/api/v1/orders/", false),
            ("/api/*", "/api/users", true),
            ("/api/*", "/api/users/1", false),
            ("/static/**", "/static", true),
            ("/static/**", "/static/", true),
            ("/static/**", "/static/css/site.css", true),
            ("/static/**", "/staticx", false),
            ("/a/**/edit", "/a/b/c/edit", true),
            ("/a/**/edit", "/a/edit", true),
            ("/a/**/edit", "/a/b/c/edix", false),
            ("/**", "/", true),
            ("/**", "/x/y", true),
            ("/files/{name}.json", "/files/x.json", true),
            ("/files/{name}.json", "/files/.json", false),
            ("/files/{name}.json", "/files/xjson", false),
            ("/files/{a}-{b}", "/files/x-y-z", true),
            ("/files/{a}-{b}", "/files/x-", false),
            ("/files/v*", "/files/v2", true),
            ("/files/v*", "/files/v", false),
            ("/a.b", "/axb", false),
            ("/", "/", true),
            ("/", "/a", false),
            ("/auth/login/", "/auth/login", true),
            ("/café/{id}", "/caf%C3%A9/1", true),
            ("/a/{id}", "/a/%C3%A9", true),
            ("/a%2eb", "/a.b", true),
        ];
        for (template, path, expected) in cases {
            assert_eq!(matches(template, path), expected, "{template} vs {path}");
        }
    }

    #[test]
    fn rejects_malformed_templates() {
        for bad in [
            "api", "/a/{id", "/a/id}", "/a/{}", "/a/x**", "/a//b", "/a/{i d}", "/a/../b", "/a%2Fb",
            "/a/./b",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn every_matching_template_is_reported() {
        let texts = ["/a/**", "/a/{x}", "/a/b", "/{x}/b", "/a/b/c", "/**/b"];
        let templates = texts
            .iter()
            .map(|t| (Arc::from(*t), Template::parse(t).unwrap()))
            .collect();
        let index = RouteIndex::new(templates, &[]);
        let found = |path| {
            let m = index.matches(path);
            (0..texts.len())
                .filter(|p| m.matched(PatternId(*p)))
                .map(|p| texts[p])
                .collect::<Vec<_>>()
        };
        assert_eq!(
            found("/a/b"),
            ["/a/**", "/a/{x}", "/a/b", "/{x}/b", "/**/b"]
        );
        assert_eq!(found("/a/b/c"), ["/a/**", "/a/b/c"]);
        assert_eq!(found("/c/b"), ["/{x}/b", "/**/b"]);
        assert!(found("/").is_empty());
    }

    #[test]
    fn many_double_stars_on_a_long_path_stay_linear() {
        let template = Template::parse("/**/a/**/b/**/c/**/d").unwrap();
        let path = format!("{}/e", "/a/b/c".repeat(2_000));
        assert!(!template_matches(&template, &path));
    }

    proptest::proptest! {
        /// The tree agrees with the regular expression the templates used to compile to.
        #[test]
        fn tree_agrees_with_a_regex(
            template in proptest::collection::vec(
                proptest::prop_oneof!["a", "b", "\\{x\\}", "\\*", "\\*\\*", "a\\{x\\}", "\\{x\\}b"], 0..5),
            path in proptest::collection::vec(proptest::prop_oneof!["a", "b", "ab", "ba", "aab"], 0..6),
        ) {
            let template = format!("/{}", template.join("/"));
            let path = format!("/{}", path.join("/"));
            let mut re = String::from("^");
            let segments: Vec<&str> = template[1..].split('/').filter(|s| !s.is_empty()).collect();
            for segment in &segments {
                if *segment == "**" {
                    re.push_str("(?:/[^/]+)*");
                } else {
                    re.push('/');
                    re.push_str(&segment.replace("{x}", "[^/]+").replace('*', "[^/]+"));
                }
            }
            re.push_str("/?$");
            let expected = regex::Regex::new(&re).unwrap().is_match(&path)
                || (segments.is_empty() && path == "/");
            proptest::prop_assert_eq!(matches(&template, &path), expected, "{} {} {}", template, path, re);
        }
    }
}
