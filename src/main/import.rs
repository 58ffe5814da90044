//! `tollgate import envoy-ratelimit FILE…`: envoyproxy/ratelimit's YAML configuration as
//! `.rl` limits that decide what it decides.
//!
//! envoyproxy/ratelimit picks **one** rate limit per descriptor: it walks the descriptor's
//! entries down the configuration tree, at each level taking the child whose `key` and
//! `value` equal the entry's, else the first wildcard child (`value: foo*`) that matches,
//! else the key-only child; the limit is the one of the node reached at the descriptor's last
//! entry (none when the walk stops earlier or the descriptor is deeper). Each node with a
//! `rate_limit` becomes one limit whose conditions are exactly that walk: the descriptor's
//! shape (its keys in order, the values tested), and, for wildcard and key-only nodes, the
//! values their preferred siblings take. Counters are per value of every entry not fixed by
//! the configuration, as envoyproxy/ratelimit keys them, in fixed windows aligned as its
//! are (multiples of the unit since the epoch).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::Path;

use serde::Deserialize;

/// The largest configuration file read, in bytes.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// One domain's configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    domain: String,
    #[serde(default)]
    descriptors: Vec<Node>,
}

/// One node of the descriptor tree.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Node {
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    rate_limit: Option<Rate>,
    #[serde(default)]
    descriptors: Vec<Node>,
    #[serde(default)]
    shadow_mode: bool,
    #[serde(default)]
    quota_mode: bool,
    #[serde(default)]
    detailed_metric: bool,
    #[serde(default)]
    value_to_metric: bool,
    #[serde(default)]
    share_threshold: bool,
    #[serde(default)]
    metadata: Option<serde_norway::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rate {
    #[serde(default)]
    requests_per_unit: u32,
    #[serde(default)]
    unit: String,
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    name: String,
    #[serde(default)]
    replaces: Vec<Replaces>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Replaces {
    name: String,
}

/// What the import found: the `.rl` text, warnings and errors (each `file:line: …`).
#[derive(Debug, Default)]
pub(crate) struct Imported {
    pub(crate) text: String,
    pub(crate) warnings: Vec<String>,
    pub(crate) errors: Vec<String>,
}

/// Converts the files at `paths`.
pub(crate) fn envoy_ratelimit(paths: &[std::path::PathBuf]) -> Imported {
    let mut out = Imported::default();
    let mut names = HashSet::new();
    out.text.push_str("# Converted by `tollgate import envoy-ratelimit` from envoyproxy/ratelimit's configuration.\n");
    for path in paths {
        let source = match read(path) {
            Ok(source) => source,
            Err(e) => {
                out.errors.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        let file = File {
            name: path.display().to_string(),
            source: &source,
        };
        for document in serde_norway::Deserializer::from_str(&source) {
            match Config::deserialize(document) {
                Ok(config) => file.domain(&config, &mut names, &mut out),
                Err(e) => out.errors.push(file.serde_error(&e)),
            }
        }
    }
    out
}

fn read(path: &Path) -> Result<String, String> {
    let size = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if size > MAX_FILE_BYTES {
        return Err(format!("{size} bytes: at most {MAX_FILE_BYTES} are read"));
    }
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

/// A file being converted.
struct File<'s> {
    name: String,
    source: &'s str,
}

/// A node on the walk from the root, with its siblings.
struct Step<'c> {
    node: &'c Node,
    siblings: &'c [Node],
}

impl File<'_> {
    fn serde_error(&self, e: &serde_norway::Error) -> String {
        match e.location() {
            Some(at) => format!("{}:{}:{}: {e}", self.name, at.line(), at.column()),
            None => format!("{}: {e}", self.name),
        }
    }

    /// `file:line` of the first line holding `needle` (the YAML nodes keep no positions once
    /// read; the text does).
    fn at(&self, needle: &str) -> String {
        match self.source.lines().position(|l| l.contains(needle)) {
            Some(line) => format!("{}:{}", self.name, line + 1),
            None => self.name.clone(),
        }
    }

    /// `file:line` of a node: the line of its `key`, with its `value` within the next lines
    /// when it has one.
    fn node_at(&self, node: &Node) -> String {
        let lines: Vec<&str> = self.source.lines().collect();
        let key = format!("key: {}", node.key);
        let value = format!("value: {}", node.value);
        let found = (0..lines.len()).find(|&i| {
            let near = |needle: &str| {
                lines[i.saturating_sub(3)..(i + 4).min(lines.len())]
                    .iter()
                    .any(|l| l.contains(needle))
            };
            lines[i].contains(&key) && (node.value.is_empty() || near(&value))
        });
        match found {
            Some(line) => format!("{}:{}", self.name, line + 1),
            None => self.at(&key),
        }
    }

    fn domain(&self, config: &Config, names: &mut HashSet<String>, out: &mut Imported) {
        if config.domain.is_empty() {
            out.errors
                .push(format!("{}: the domain is empty", self.at("domain")));
            return;
        }
        let _ = writeln!(out.text, "\n# domain {}", config.domain);
        let mut path = Vec::new();
        self.nodes(config, &config.descriptors, &mut path, names, out);
    }

    fn nodes<'c>(
        &self,
        config: &Config,
        level: &'c [Node],
        path: &mut Vec<Step<'c>>,
        names: &mut HashSet<String>,
        out: &mut Imported,
    ) {
        let mut seen = HashSet::new();
        for node in level {
            let at = self.node_at(node);
            if node.key.is_empty() {
                out.errors
                    .push(format!("{at}: a descriptor has an empty key"));
                continue;
            }
            if !seen.insert((node.key.as_str(), node.value.as_str())) {
                out.errors.push(format!(
                    "{at}: `{}` `{}` is written twice at one level",
                    node.key, node.value
                ));
                continue;
            }
            if node.key.contains('*') {
                out.errors.push(format!(
                    "{at}: a wildcard in a key (`{}`) cannot be expressed: wildcards are for values",
                    node.key
                ));
                continue;
            }
            path.push(Step {
                node,
                siblings: level,
            });
            if let Some(rate) = &node.rate_limit {
                self.limit(config, path, rate, names, out);
            }
            self.nodes(config, &node.descriptors, path, names, out);
            path.pop();
        }
    }

    fn limit(
        &self,
        config: &Config,
        path: &[Step<'_>],
        rate: &Rate,
        names: &mut HashSet<String>,
        out: &mut Imported,
    ) {
        let node = path.last().expect("a limit is on a node").node;
        let at = self.node_at(node);
        if node.quota_mode {
            out.errors.push(format!(
                "{at}: `quota_mode` cannot be expressed: its answer depends on the other quota descriptors of the request"
            ));
            return;
        }
        if node.share_threshold && !node.value.contains('*') {
            out.errors.push(format!(
                "{at}: `share_threshold` is for wildcard values (`{}` has none)",
                node.value
            ));
            return;
        }
        if node.detailed_metric || node.value_to_metric {
            out.warnings.push(format!(
                "{at}: `detailed_metric`/`value_to_metric` have no equivalent: Tollgate's metrics are per limit; per-key figures are in ClickHouse (`tollgate analytics top --by key`)"
            ));
        }
        if node.metadata.is_some() {
            out.warnings.push(format!(
                "{at}: `metadata` is not sent: Tollgate's answer carries no dynamic metadata"
            ));
        }
        let Some(rate_text) = self.rate_text(rate, &at, out) else {
            return;
        };
        for r in &rate.replaces {
            if r.name.is_empty() || r.name == rate.name {
                out.errors.push(format!(
                    "{at}: `replaces` names `{}`: give other limits' names",
                    r.name
                ));
                return;
            }
        }
        let name = limit_name(config, path, rate, names);
        let mut conditions = vec![format!("domain {}", quote(&config.domain))];
        let mut shape = Vec::new();
        let mut key = Vec::new();
        for (depth, step) in path.iter().enumerate() {
            let (k, v) = (&step.node.key, &step.node.value);
            if path[..depth].iter().any(|s| &s.node.key == k) && !v.is_empty() {
                out.errors.push(format!(
                    "{at}: `{k}` appears twice along this path: the values of its second entry cannot be told apart"
                ));
                return;
            }
            if !v.is_empty() && !v.contains('*') {
                shape.push(format!("{} == {}", quote(k), quote(v)));
                continue;
            }
            if v.contains('*') {
                shape.push(format!("{} ~= {}", quote(k), quote(&wildcard_regex(v))));
            } else {
                shape.push(quote(k));
            }
            // Preferred siblings: the exact values; for a key-only node, the wildcards too,
            // and for a wildcard, those written before it.
            let wildcard = v.contains('*');
            let mut earlier = true;
            for sibling in step.siblings.iter().filter(|s| &s.key == k) {
                if std::ptr::eq(sibling, step.node) {
                    earlier = false;
                } else if sibling.value.contains('*') {
                    if !wildcard || earlier {
                        conditions.push(format!(
                            "not descriptor({}) ~= {}",
                            quote(k),
                            quote(&wildcard_regex(&sibling.value))
                        ));
                    }
                } else if !sibling.value.is_empty() {
                    conditions.push(format!(
                        "descriptor({}) != {}",
                        quote(k),
                        quote(&sibling.value)
                    ));
                }
            }
            if !(step.node.share_threshold && v.contains('*')) {
                key.push(format!("descriptor({})", quote(k)));
            }
        }
        conditions.insert(1, format!("descriptor [{}]", shape.join(", ")));
        let _ = writeln!(out.text, "\n# {at}");
        let _ = writeln!(out.text, "limit {name} {{");
        let _ = writeln!(out.text, "  match {{");
        for c in &conditions {
            let _ = writeln!(out.text, "    {c};");
        }
        let _ = writeln!(out.text, "  }}");
        let key = if key.is_empty() {
            "global".to_owned()
        } else {
            key.join(" + ")
        };
        let _ = writeln!(out.text, "  key {key};");
        let _ = writeln!(out.text, "  algorithm fixed_window;");
        let _ = writeln!(out.text, "  rate {rate_text};");
        if node.shadow_mode {
            let _ = writeln!(out.text, "  mode shadow;");
        }
        if !rate.replaces.is_empty() {
            let replaced: Vec<String> = rate.replaces.iter().map(|r| identifier(&r.name)).collect();
            let _ = writeln!(out.text, "  replaces {};", replaced.join(", "));
        }
        let _ = writeln!(out.text, "}}");
    }

    /// The `rate` statement's value: `N/unit`, `unlimited`, or `blocked` for 0 per unit.
    fn rate_text(&self, rate: &Rate, at: &str, out: &mut Imported) -> Option<String> {
        let unit = match rate.unit.to_ascii_lowercase().as_str() {
            "second" => Some("s"),
            "minute" => Some("min"),
            "hour" => Some("h"),
            "day" => Some("24h"),
            "week" => Some("168h"),
            // As envoyproxy/ratelimit counts them: 30 and 365 days.
            "month" => Some("720h"),
            "year" => Some("8760h"),
            _ => None,
        };
        match (rate.unlimited, unit) {
            (true, None) => Some("unlimited".to_owned()),
            (true, Some(_)) => {
                out.errors.push(format!(
                    "{at}: an `unlimited` rate has no unit (`{}`)",
                    rate.unit
                ));
                None
            }
            (false, None) => {
                out.errors.push(format!(
                    "{at}: `{}` is not a unit: second, minute, hour, day, week, month or year",
                    rate.unit
                ));
                None
            }
            (false, Some(_)) if rate.requests_per_unit == 0 => Some("blocked".to_owned()),
            (false, Some(unit)) => Some(format!("{}/{unit}", rate.requests_per_unit)),
        }
    }
}

/// envoyproxy/ratelimit's wildcard (`*` for any text, anywhere) as an anchored expression.
fn wildcard_regex(value: &str) -> String {
    let parts: Vec<String> = value.split('*').map(regex_escape).collect();
    format!("^{}$", parts.join(".*"))
}

fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A `.rl` string literal.
fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// A name usable as a limit's: letters, digits and `_`, not starting with a digit.
fn identifier(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        out.insert(0, '_');
    }
    out
}

/// The limit's name: its `name`, else the domain and the walk; unique in the output.
fn limit_name(
    config: &Config,
    path: &[Step<'_>],
    rate: &Rate,
    names: &mut HashSet<String>,
) -> String {
    let base = if rate.name.is_empty() {
        let mut parts = vec![config.domain.clone()];
        for step in path {
            parts.push(step.node.key.clone());
            if !step.node.value.is_empty() {
                parts.push(step.node.value.replace('*', "any"));
            }
        }
        identifier(&parts.join("_"))
    } else {
        identifier(&rate.name)
    };
    let mut name = base.clone();
    let mut n = 2;
    while !names.insert(name.clone()) {
        name = format!("{base}_{n}");
        n += 1;
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_become_anchored_expressions() {
        assert_eq!(wildcard_regex("foo*"), "^foo.*$");
        assert_eq!(wildcard_regex("foo*bar*baz"), "^foo.*bar.*baz$");
        assert_eq!(wildcard_regex("a.b*"), "^a\\.b.*$");
        assert_eq!(identifier("9lives-x"), "_9lives_x");
    }
}
