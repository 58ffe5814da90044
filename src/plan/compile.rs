//! Lowering syntax trees into a [`Plan`]: name resolution, validation, route compilation.
//!
//! Every check reports into one list, so a run shows every problem of every file at once.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};
use ipnet::IpNet;
use regex::{Regex, RegexBuilder};

use super::condition::Condition;
use super::ipset::IpSet;
use super::key::{KeyPart, KeySource, KeySpec, is_secret_header};
use super::route::{PatternId, RouteIndex, Template};
use super::{
    Anomaly, CedarImport, Cost, Counts, DenyRule, Limit, LimitRate, ListRule, MissingKey, Mode,
    OnExceed, Pick, Plan, SoftAction, SoftStep, StoreErrorMode, TierSource, TierTable, TierValue,
};
use crate::diagnostic::{PolicyError, PolicyErrors, Span};
use crate::dsl::ast::{self, Spanned};
use crate::dsl::{ParsedFile, PolicySet};
use crate::limiter::{BucketQuota, CalendarPeriod, ConcurrencyQuota, Quota, WindowQuota};

const SECOND: u64 = 1_000_000;
const DAY: u64 = 86_400 * SECOND;
/// Largest integer a Lua number (a double) holds exactly: state must stay below it.
const EXACT_IN_LUA: u128 = 1 << 53;
const DEFAULT_LEASE: u64 = 60 * SECOND;
const MAX_SOFT_DELAY: u64 = 60 * SECOND;
const MAX_BAN: u64 = 30 * DAY;
/// One set of keywords and what each means: the only list of them, read both ways.
type Keywords<T> = &'static [(&'static str, T)];

const ALGORITHMS: Keywords<Algorithm> = &[
    ("fixed_window", Algorithm::FixedWindow),
    ("sliding_window", Algorithm::SlidingWindow),
    ("token_bucket", Algorithm::TokenBucket),
    ("gcra", Algorithm::Gcra),
    ("concurrency", Algorithm::Concurrency),
    ("quota", Algorithm::Calendar),
];
const MODES: Keywords<Mode> = &[
    ("enforce", Mode::Enforce),
    ("shadow", Mode::Shadow),
    ("off", Mode::Off),
];
const STORE_ERROR_MODES: Keywords<StoreErrorMode> = &[
    ("allow", StoreErrorMode::Allow),
    ("deny", StoreErrorMode::Deny),
    ("local", StoreErrorMode::Local),
];
const MISSING_KEY_MODES: Keywords<MissingKey> = &[
    ("ip", MissingKey::Ip),
    ("skip", MissingKey::Skip),
    ("refuse", MissingKey::Refuse),
];
const COUNTS: Keywords<Counts> = &[
    ("requests", Counts::Requests),
    ("messages", Counts::Messages),
    ("bytes", Counts::Bytes),
];
const PICKS: Keywords<Pick> = &[
    ("highest", Pick::Highest),
    ("lowest", Pick::Lowest),
    ("first", Pick::First),
];

/// What `word` means in `table`.
fn lookup<T: Copy>(table: Keywords<T>, word: &str) -> Option<T> {
    table.iter().find(|(w, _)| *w == word).map(|(_, v)| *v)
}

/// The words of `table`, for suggestions and help lines.
fn words<T>(table: Keywords<T>) -> Vec<&'static str> {
    table.iter().map(|(w, _)| *w).collect()
}
const BUILTIN_KEYS: &[&str] = &[
    "ip",
    "user_id",
    "api_token",
    "route",
    "method",
    "host",
    "global",
    "connection",
];
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

/// Compiles a parsed policy set into a plan, or reports every problem found, syntax errors
/// included.
pub fn compile(set: &PolicySet) -> Result<Plan, PolicyErrors> {
    let mut cx = Compiler {
        files: set.files(),
        errors: set.errors().to_vec(),
        keys: HashMap::new(),
        resolved_keys: HashMap::new(),
        tables: Vec::new(),
        table_names: HashMap::new(),
        pattern_ids: HashMap::new(),
        templates: Vec::new(),
        has_cedar: false,
        warnings: Vec::new(),
    };
    let mut plan = cx.run();
    plan.warnings = std::mem::take(&mut cx.warnings);
    let mut errors = cx.errors;
    // In file order, then by position, whichever pass found them.
    let order: HashMap<&str, usize> = set
        .files()
        .iter()
        .enumerate()
        .map(|(i, f)| (f.source.name(), i))
        .collect();
    errors.sort_by_key(|e| {
        (
            order.get(e.file_name()).copied().unwrap_or(usize::MAX),
            e.span().map_or(0, |s| s.start),
        )
    });
    // One tier entry used by several limits reports the same problem once.
    let mut seen = std::collections::HashSet::new();
    errors.retain(|e| seen.insert((e.file_name().to_owned(), e.span(), e.message().to_owned())));
    if errors.is_empty() {
        Ok(plan)
    } else {
        Err(PolicyErrors::new(errors))
    }
}

/// Where something was defined: file index and span.
#[derive(Clone, Copy)]
struct Site {
    file: usize,
    span: Span,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Algorithm {
    FixedWindow,
    SlidingWindow,
    TokenBucket,
    Gcra,
    Concurrency,
    Calendar,
}

impl Algorithm {
    fn name(self) -> &'static str {
        ALGORITHMS
            .iter()
            .find(|(_, a)| *a == self)
            .map_or("", |(w, _)| *w)
    }

    /// The longest window or period the algorithm supports, in microseconds.
    fn max_window(self) -> u64 {
        match self {
            Algorithm::FixedWindow => 7 * DAY,
            _ => DAY,
        }
    }
}

/// A compiled tier table with each tier's entries resolved through inheritance.
struct CompiledTable {
    table: TierTable,
    /// `entries[tier]`: entry name → (file, value as written).
    entries: Vec<HashMap<String, (usize, Spanned<ast::RateValue>)>>,
}

/// A limit's settings after `defaults` are applied; each with the file it was written in.
#[derive(Default)]
struct Settings<'a> {
    key: Option<(usize, &'a ast::KeyExpr)>,
    algorithm: Option<(usize, &'a ast::Ident)>,
    algorithm_explicit: bool,
    rate: Option<(usize, &'a Spanned<ast::RateValue>)>,
    lease: Option<(usize, &'a Spanned<ast::DurationLit>)>,
    cost: Option<(usize, &'a Spanned<ast::CostExpr>)>,
    soft: Option<(usize, &'a Spanned<Vec<ast::SoftStep>>)>,
    on_exceed: Option<(usize, &'a Spanned<ast::OnExceed>)>,
    mode: Option<(usize, &'a ast::Ident)>,
    on_store_error: Option<(usize, &'a ast::Ident)>,
    on_missing_key: Option<(usize, &'a ast::Ident)>,
    priority: Option<(usize, &'a Spanned<i64>)>,
    counts: Option<(usize, &'a ast::Ident)>,
}

struct Compiler<'a> {
    files: &'a [ParsedFile],
    errors: Vec<PolicyError>,
    keys: HashMap<&'a str, (usize, &'a ast::KeyDef)>,
    resolved_keys: HashMap<String, Option<KeySpec>>,
    tables: Vec<CompiledTable>,
    table_names: HashMap<String, usize>,
    pattern_ids: HashMap<Template, PatternId>,
    templates: Vec<(Arc<str>, Template)>,
    has_cedar: bool,
    /// Problems worth reading that do not stop the plan.
    warnings: Vec<PolicyError>,
}

impl<'a> Compiler<'a> {
    fn error_help(
        &mut self,
        file: usize,
        span: Span,
        message: impl Into<String>,
        label: &str,
        help: impl Into<String>,
    ) {
        let error =
            PolicyError::new(&self.files[file].source, span, message, label).with_help(help);
        self.errors.push(error);
    }

    /// A limit's key may have no value and the policy does not say what that means: it is
    /// counted by address (the default), which the operator should know.
    fn warn_missing_key(&mut self, file: usize, span: Span, limit: &str, missing: &str) {
        let warning = PolicyError::new(
            &self.files[file].source,
            span,
            format!(
                "limit `{limit}`'s key has no value for requests without {missing}: they are \
                 counted by client address"
            ),
            "may have no value",
        )
        .with_help(
            "say so with `key first_of(…, ip);`, or choose with `on_missing_key ip;`, \
             `on_missing_key skip;` (the limit does not apply) or `on_missing_key refuse;`",
        )
        .warning();
        self.warnings.push(warning);
    }

    /// `file:line:column` of a site, for "first defined here" help lines.
    fn location(&self, site: Site) -> String {
        let source = &self.files[site.file].source;
        let (line, column) = source.line_column(site.span.start);
        format!("{}:{line}:{column}", source.name())
    }

    /// Reports a second definition of a name.
    fn duplicate(&mut self, kind: &str, name: &ast::Ident, file: usize, first: Site) {
        let help = format!("first defined at {}", self.location(first));
        self.error_help(
            file,
            name.span,
            format!("{kind} `{}` is defined twice", name.node),
            "defined again here",
            help,
        );
    }

    fn run(&mut self) -> Plan {
        let files = self.files;
        let mut namespaces: Vec<Arc<str>> = Vec::with_capacity(files.len());
        let mut defaults: Vec<Vec<&'a ast::Setting>> = vec![Vec::new(); files.len()];
        let mut cedar_imports = Vec::new();
        let mut limit_sites: HashMap<&str, Site> = HashMap::new();
        let mut list_sites: HashMap<&str, Site> = HashMap::new();
        let mut anomaly_sites: HashMap<&str, Site> = HashMap::new();
        let mut key_sites: HashMap<&str, Site> = HashMap::new();
        let mut table_sites: HashMap<&str, Site> = HashMap::new();
        let mut limits: Vec<(usize, &'a ast::LimitBlock)> = Vec::new();
        let mut tables: Vec<(usize, &'a ast::TiersBlock)> = Vec::new();
        let mut safelists = Vec::new();
        let mut denylists = Vec::new();
        let mut anomalies = Vec::new();

        // Pass 1: file headers, and every name with where it was defined.
        for (f, file) in files.iter().enumerate() {
            let mut namespace: Option<&Spanned<String>> = None;
            let mut version: Option<Span> = None;
            let mut defaults_site: Option<Span> = None;
            for item in &file.ast.items {
                match item {
                    ast::Item::Version(v) => {
                        if version.is_some() {
                            self.error_help(
                                f,
                                v.span,
                                "`version` is given twice",
                                "given again here",
                                "keep one `version 1;` at the top of the file",
                            );
                        } else if v.node != 1 {
                            self.error_help(
                                f,
                                v.span,
                                format!("unsupported policy version `{}`", v.node),
                                "unknown version",
                                "this Tollgate reads `version 1;`",
                            );
                        }
                        version = Some(v.span);
                    }
                    ast::Item::Namespace(ns) => {
                        if namespace.is_some() {
                            self.error_help(
                                f,
                                ns.span,
                                "`namespace` is given twice",
                                "given again here",
                                "a file has one namespace; keep one",
                            );
                        } else if ns.node.is_empty()
                            || !ns
                                .node
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
                        {
                            self.error_help(
                                f,
                                ns.span,
                                format!("namespace `{}` is not a valid name", ns.node),
                                "invalid namespace",
                                "use letters, digits, `_`, `-` and `.`",
                            );
                        }
                        namespace = Some(ns);
                    }
                    ast::Item::Import(import) => {
                        self.has_cedar = true;
                        if let Some(import) = self.import(f, import) {
                            cedar_imports.push(import);
                        }
                    }
                    ast::Item::Key(def) => {
                        let site = Site {
                            file: f,
                            span: def.name.span,
                        };
                        if BUILTIN_KEYS.contains(&def.name.node.as_str()) {
                            self.error_help(
                                f,
                                def.name.span,
                                format!(
                                    "`{}` is a built-in key and cannot be redefined",
                                    def.name.node
                                ),
                                "built-in name",
                                "choose another name",
                            );
                        } else if let Some(first) = key_sites.get(def.name.node.as_str()) {
                            self.duplicate("key", &def.name, f, *first);
                        } else {
                            key_sites.insert(&def.name.node, site);
                            self.keys.insert(&def.name.node, (f, def));
                        }
                    }
                    ast::Item::Defaults(block) => {
                        if let Some(first) = defaults_site {
                            let help = format!(
                                "the first is at {}; merge them",
                                self.location(Site {
                                    file: f,
                                    span: first
                                })
                            );
                            self.error_help(
                                f,
                                Span::new(block.span.start, block.span.start + 8),
                                "a file has at most one `defaults` block",
                                "second `defaults`",
                                help,
                            );
                        } else {
                            defaults_site = Some(block.span);
                            defaults[f] = block.settings.iter().collect();
                        }
                    }
                    ast::Item::Tiers(block) => {
                        if let Some(first) = table_sites.get(block.name.node.as_str()) {
                            self.duplicate("tier table", &block.name, f, *first);
                        } else {
                            table_sites.insert(
                                &block.name.node,
                                Site {
                                    file: f,
                                    span: block.name.span,
                                },
                            );
                            tables.push((f, block));
                        }
                    }
                    ast::Item::Limit(block) => {
                        if let Some(first) = limit_sites.get(block.name.node.as_str()) {
                            self.duplicate("limit", &block.name, f, *first);
                        } else {
                            limit_sites.insert(
                                &block.name.node,
                                Site {
                                    file: f,
                                    span: block.name.span,
                                },
                            );
                            limits.push((f, block));
                        }
                    }
                    ast::Item::Safelist(block) | ast::Item::Denylist(block) => {
                        if let Some(first) = list_sites.get(block.name.node.as_str()) {
                            self.duplicate("list", &block.name, f, *first);
                        } else {
                            list_sites.insert(
                                &block.name.node,
                                Site {
                                    file: f,
                                    span: block.name.span,
                                },
                            );
                            if matches!(item, ast::Item::Safelist(_)) {
                                safelists.push((f, block));
                            } else {
                                denylists.push((f, block));
                            }
                        }
                    }
                    ast::Item::Anomaly(block) => {
                        if let Some(first) = anomaly_sites.get(block.name.node.as_str()) {
                            self.duplicate("anomaly", &block.name, f, *first);
                        } else {
                            anomaly_sites.insert(
                                &block.name.node,
                                Site {
                                    file: f,
                                    span: block.name.span,
                                },
                            );
                            anomalies.push((f, block));
                        }
                    }
                }
            }
            namespaces.push(Arc::from(
                namespace.map_or(file.stem.as_str(), |n| n.node.as_str()),
            ));
        }

        // Every named key, used or not, so that a broken one is reported.
        let mut names: Vec<(&'a str, usize, Span)> = self
            .keys
            .iter()
            .map(|(name, (f, def))| (*name, *f, def.name.span))
            .collect();
        names.sort_by_key(|(_, f, span)| (*f, span.start));
        for (name, f, span) in names {
            let source = ast::KeySource::Name(Spanned::new(name.to_owned(), span));
            self.key_source(f, &source, &mut Vec::new());
        }

        // Pass 2: tier tables (limits refer to them).
        for (f, block) in tables {
            if let Some(table) = self.tier_table(f, block) {
                self.table_names
                    .insert(block.name.node.clone(), self.tables.len());
                self.tables.push(table);
            }
        }

        // Pass 3: limits, lists, anomalies.
        let mut compiled_limits = Vec::new();
        for (f, block) in limits {
            if let Some(limit) = self.limit(f, block, &defaults[f], &namespaces[f]) {
                compiled_limits.push(limit);
            }
        }
        compiled_limits.sort_by(|a: &Limit, b: &Limit| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.name.cmp(&b.name))
        });
        let safelists = safelists
            .into_iter()
            .map(|(f, block)| self.list(f, block, true).0)
            .collect();
        let denylists = denylists
            .into_iter()
            .map(|(f, block)| {
                let (list, status, reason) = self.list(f, block, false);
                DenyRule {
                    list,
                    status,
                    reason,
                }
            })
            .collect();
        let anomalies = anomalies
            .into_iter()
            .filter_map(|(f, block)| self.anomaly(f, block, &namespaces[f]))
            .collect();

        let guards: Vec<Option<Vec<PatternId>>> = compiled_limits
            .iter()
            .map(|l| l.condition.required_patterns())
            .collect();
        let routes = RouteIndex::new(std::mem::take(&mut self.templates), &guards);
        let tiers = std::mem::take(&mut self.tables)
            .into_iter()
            .map(|t| t.table)
            .collect();
        Plan {
            version: version_hash(files, &cedar_imports),
            limits: compiled_limits,
            routes,
            safelists,
            denylists,
            anomalies,
            tiers,
            cedar_imports,
            warnings: Vec::new(),
        }
    }

    fn import(&mut self, f: usize, import: &ast::ImportStmt) -> Option<CedarImport> {
        let dir = &self.files[f].dir;
        let mut ok = true;
        let mut resolve = |cx: &mut Self, path: &Spanned<String>, what: &str| {
            let full = dir.join(&path.node);
            if !full.is_file() {
                ok = false;
                cx.error_help(
                    f,
                    path.span,
                    format!("cannot find Cedar {what} `{}`", path.node),
                    "no such file",
                    format!(
                        "paths are relative to the policy file; looked for `{}`",
                        full.display()
                    ),
                );
            }
            full
        };
        let policies = resolve(self, &import.cedar, "policy file");
        let schema = import.schema.as_ref().map(|s| resolve(self, s, "schema"));
        ok.then(|| CedarImport {
            policies,
            schema,
            namespace: import
                .namespace
                .as_ref()
                .map(|n| Arc::from(n.node.as_str())),
        })
    }

    // ─── keys ────────────────────────────────────────────────────────────────────────────

    fn key_expr(&mut self, f: usize, expr: &ast::KeyExpr) -> Option<KeySpec> {
        self.key_terms(f, &expr.terms, &mut Vec::new())
            .map(|parts| KeySpec { parts })
    }

    /// The parts of a key expression, with named keys expanded; inside `first_of`, the
    /// sources of a named key become alternatives.
    fn key_terms(
        &mut self,
        f: usize,
        terms: &[ast::KeyTerm],
        stack: &mut Vec<String>,
    ) -> Option<Vec<KeyPart>> {
        let mut parts = Vec::new();
        let mut ok = true;
        for term in terms {
            match term {
                ast::KeyTerm::Source(source) => match self.key_source(f, source, stack) {
                    Some(mut expanded) => parts.append(&mut expanded),
                    None => ok = false,
                },
                ast::KeyTerm::FirstOf(sources) => {
                    let mut alternatives = Vec::new();
                    for source in &sources.node {
                        match self.key_source(f, source, stack) {
                            Some(expanded) => {
                                for part in expanded {
                                    match part {
                                        KeyPart::One(s) => alternatives.push(s),
                                        KeyPart::FirstOf(mut inner) => {
                                            alternatives.append(&mut inner)
                                        }
                                    }
                                }
                            }
                            None => ok = false,
                        }
                    }
                    parts.push(KeyPart::FirstOf(alternatives));
                }
            }
        }
        ok.then_some(parts)
    }

    /// One source, with named keys expanded (`stack` holds the names being expanded, to
    /// catch cycles).
    fn key_source(
        &mut self,
        f: usize,
        source: &ast::KeySource,
        stack: &mut Vec<String>,
    ) -> Option<Vec<KeyPart>> {
        let one = |s| Some(vec![KeyPart::One(s)]);
        match source {
            ast::KeySource::Header(name) | ast::KeySource::TrustedHeader(name) => {
                let trusted = matches!(source, ast::KeySource::TrustedHeader(_));
                let name = self.header_name(f, name)?;
                let secret = is_secret_header(&name);
                one(KeySource::Header {
                    name,
                    secret,
                    trusted,
                })
            }
            ast::KeySource::Claim(name) => one(KeySource::Claim(Arc::from(name.node.as_str()))),
            ast::KeySource::Query(name) => one(KeySource::Query(Arc::from(name.node.as_str()))),
            ast::KeySource::IpPrefix(bits) => {
                let b = bits.node;
                match b {
                    1..=32 => one(KeySource::Ip {
                        v4: b as u8,
                        v6: 64,
                    }),
                    33..=128 => one(KeySource::Ip {
                        v4: 32,
                        v6: b as u8,
                    }),
                    _ => {
                        self.error_help(
                            f,
                            bits.span,
                            format!("`ip/{b}` is not a network prefix"),
                            "prefix out of range",
                            "use 1 to 32 for IPv4 networks (IPv6 then counts by /64), or 33 to 128 for IPv6",
                        );
                        None
                    }
                }
            }
            ast::KeySource::Name(name) => match name.node.as_str() {
                "ip" => one(KeySource::Ip { v4: 32, v6: 64 }),
                "user_id" => one(KeySource::UserId),
                "api_token" => one(KeySource::ApiToken),
                "route" => one(KeySource::Route),
                "method" => one(KeySource::Method),
                "host" => one(KeySource::Host),
                "global" => one(KeySource::Global),
                "connection" => one(KeySource::Connection),
                other => {
                    if stack.iter().any(|s| s == other) {
                        let cycle = format!("{} → {other}", stack.join(" → "));
                        self.error_help(
                            f,
                            name.span,
                            format!("key `{other}` is defined in terms of itself"),
                            "cycle",
                            format!("the definitions go round: {cycle}"),
                        );
                        return None;
                    }
                    if let Some(done) = self.resolved_keys.get(other) {
                        return done.clone().map(|k| k.parts);
                    }
                    let Some(&(kf, def)) = self.keys.get(other) else {
                        let mut known: Vec<&str> = self.keys.keys().copied().collect();
                        known.extend(BUILTIN_KEYS);
                        let help = suggest(other, &known).unwrap_or_else(|| {
                            "define it with `key NAME = …;` or use a built-in: ip, user_id, api_token, route, method, host, global, header(\"…\"), claim(\"…\"), query(\"…\")".to_owned()
                        });
                        self.error_help(
                            f,
                            name.span,
                            format!("unknown key `{other}`"),
                            "not defined",
                            help,
                        );
                        return None;
                    };
                    stack.push(other.to_owned());
                    let parts = self.key_terms(kf, &def.expr.terms, stack);
                    stack.pop();
                    let spec = parts.map(|parts| KeySpec { parts });
                    self.resolved_keys.insert(other.to_owned(), spec.clone());
                    spec.map(|k| k.parts)
                }
            },
        }
    }

    fn header_name(&mut self, f: usize, name: &Spanned<String>) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.node.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.error_help(
                    f,
                    name.span,
                    format!("`{}` is not a valid header name", name.node),
                    "invalid header name",
                    "header names are letters, digits and `-`, with no spaces",
                );
                None
            }
        }
    }

    // ─── tiers ───────────────────────────────────────────────────────────────────────────

    fn tier_table(&mut self, f: usize, block: &'a ast::TiersBlock) -> Option<CompiledTable> {
        let mut ok = true;
        let source = match block.sources.as_slice() {
            [] => {
                self.error_help(
                    f,
                    block.name.span,
                    format!("tier table `{}` does not say where the tier comes from", block.name.node),
                    "no `from`",
                    "add `from header(\"X-Plan\");`, `from claim(\"plan\");` or `from cedar annotation \"rl_tier\";`",
                );
                None
            }
            [one, rest @ ..] => {
                for extra in rest {
                    self.error_help(
                        f,
                        extra.span,
                        "a tier table has one `from`",
                        "second `from`",
                        "keep the `from` the tier should come from",
                    );
                    ok = false;
                }
                self.tier_source(f, one)
            }
        };
        // Tier names, in order.
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, tier) in block.tiers.iter().enumerate() {
            if let Some(&first) = index.get(tier.name.node.as_str()) {
                let site = Site {
                    file: f,
                    span: block.tiers[first].name.span,
                };
                self.duplicate("tier", &tier.name, f, site);
                ok = false;
            } else {
                index.insert(&tier.name.node, i);
            }
        }
        if block.tiers.is_empty() {
            self.error_help(
                f,
                block.name.span,
                format!("tier table `{}` has no tiers", block.name.node),
                "empty table",
                "add a tier such as `tier free { api = 60/min; }`",
            );
            return None;
        }
        // Entries through inheritance: a tier's own entries override its parent's.
        let mut entries = Vec::with_capacity(block.tiers.len());
        for tier in &block.tiers {
            let mut chain = vec![tier];
            let mut current = tier;
            while let Some(parent) = &current.extends {
                let Some(&p) = index.get(parent.node.as_str()) else {
                    let names: Vec<&str> = index.keys().copied().collect();
                    let help = suggest(&parent.node, &names)
                        .unwrap_or_else(|| format!("the tiers are: {}", names.join(", ")));
                    self.error_help(
                        f,
                        parent.span,
                        format!("unknown tier `{}`", parent.node),
                        "not a tier of this table",
                        help,
                    );
                    ok = false;
                    break;
                };
                let next = &block.tiers[p];
                if let Some(pos) = chain.iter().position(|t| std::ptr::eq(*t, next)) {
                    // Report a cycle once: at the member defined first, when its own chain
                    // closes on itself.
                    let first = chain[pos..]
                        .iter()
                        .min_by_key(|t| t.span.start)
                        .is_some_and(|t| std::ptr::eq(*t, tier));
                    if pos == 0 && first {
                        let names: Vec<&str> = chain.iter().map(|t| t.name.node.as_str()).collect();
                        let at = tier.extends.as_ref().map_or(parent.span, |e| e.span);
                        self.error_help(
                            f,
                            at,
                            format!("tier `{}` inherits from itself", tier.name.node),
                            "inheritance cycle",
                            format!(
                                "the chain goes round: {} → {}",
                                names.join(" → "),
                                tier.name.node
                            ),
                        );
                    }
                    ok = false;
                    break;
                }
                chain.push(next);
                current = next;
            }
            let mut resolved: HashMap<String, (usize, Spanned<ast::RateValue>)> = HashMap::new();
            for t in chain.iter().rev() {
                let mut own: HashMap<&str, Span> = HashMap::new();
                for entry in &t.entries {
                    if std::ptr::eq(*t, tier) {
                        if let Some(first) = own.get(entry.name.node.as_str()) {
                            let site = Site {
                                file: f,
                                span: *first,
                            };
                            self.duplicate("tier entry", &entry.name, f, site);
                            ok = false;
                        }
                        own.insert(&entry.name.node, entry.name.span);
                    }
                    resolved.insert(entry.name.node.clone(), (f, entry.value.clone()));
                }
            }
            entries.push(resolved);
        }
        let default = match block.defaults.as_slice() {
            [] => {
                self.error_help(
                    f,
                    block.name.span,
                    format!("tier table `{}` has no default tier", block.name.node),
                    "no `default`",
                    format!(
                        "add `default {};`: it applies when a request names no known tier",
                        block.tiers[0].name.node
                    ),
                );
                None
            }
            [d, rest @ ..] => {
                for extra in rest {
                    self.error_help(
                        f,
                        extra.span,
                        "a tier table has one `default`",
                        "second `default`",
                        "keep one `default` tier",
                    );
                }
                match index.get(d.node.as_str()) {
                    Some(&i) => Some(i),
                    None => {
                        let names: Vec<&str> = index.keys().copied().collect();
                        let help = suggest(&d.node, &names)
                            .unwrap_or_else(|| format!("the tiers are: {}", names.join(", ")));
                        self.error_help(
                            f,
                            d.span,
                            format!("unknown tier `{}`", d.node),
                            "not a tier of this table",
                            help,
                        );
                        None
                    }
                }
            }
        };
        let (Some(source), Some(default), true) = (source, default, ok) else {
            return None;
        };
        Some(CompiledTable {
            table: TierTable {
                name: Arc::from(block.name.node.as_str()),
                source,
                tiers: block
                    .tiers
                    .iter()
                    .map(|t| Arc::from(t.name.node.as_str()))
                    .collect(),
                default,
            },
            entries,
        })
    }

    fn tier_source(&mut self, f: usize, source: &Spanned<ast::TierSource>) -> Option<TierSource> {
        match &source.node {
            ast::TierSource::Header(name) => {
                self.header_name(f, name).map(|name| TierSource::Header {
                    name,
                    trusted: false,
                })
            }
            ast::TierSource::TrustedHeader(name) => {
                self.header_name(f, name).map(|name| TierSource::Header {
                    name,
                    trusted: true,
                })
            }
            ast::TierSource::Claim(name) => Some(TierSource::Claim(Arc::from(name.node.as_str()))),
            ast::TierSource::CedarAnnotation { annotation, pick } => {
                if !self.has_cedar_import() {
                    self.error_help(
                        f,
                        source.span,
                        "tiers from a Cedar annotation need Cedar policies",
                        "no Cedar policies imported",
                        "add `import cedar \"policies.cedar\";` to a policy file",
                    );
                    return None;
                }
                let pick = match pick {
                    None => Pick::Highest,
                    Some(p) => self.keyword(f, p, "pick", PICKS)?,
                };
                Some(TierSource::CedarAnnotation {
                    annotation: Arc::from(annotation.node.as_str()),
                    pick,
                })
            }
        }
    }

    fn has_cedar_import(&self) -> bool {
        self.has_cedar
            || self.files.iter().any(|f| {
                f.ast
                    .items
                    .iter()
                    .any(|i| matches!(i, ast::Item::Import(_)))
            })
    }

    // ─── limits ──────────────────────────────────────────────────────────────────────────

    fn limit(
        &mut self,
        f: usize,
        block: &'a ast::LimitBlock,
        defaults: &[&'a ast::Setting],
        namespace: &Arc<str>,
    ) -> Option<Limit> {
        let mut settings = Settings::default();
        for setting in defaults {
            self.apply_setting(f, &mut settings, setting, false, &mut HashMap::new());
        }
        let mut seen: HashMap<&'static str, Span> = HashMap::new();
        let mut conditions = Vec::new();
        let mut ok = true;
        for stmt in &block.stmts {
            match stmt {
                ast::LimitStmt::Match(block) => {
                    for c in &block.node {
                        match self.condition(f, c) {
                            Some(c) => conditions.push(c),
                            None => ok = false,
                        }
                    }
                }
                ast::LimitStmt::When(c) => match self.condition(f, c) {
                    Some(c) => conditions.push(c),
                    None => ok = false,
                },
                ast::LimitStmt::Setting(s) => {
                    ok &= self.apply_setting(f, &mut settings, s, true, &mut seen);
                }
            }
        }
        let name = &block.name;

        let key = match settings.key {
            Some((kf, expr)) => self.key_expr(kf, expr),
            None => Some(KeySpec {
                parts: vec![KeyPart::One(KeySource::Ip { v4: 32, v6: 64 })],
            }),
        };
        if let (Some(spec), Some((kf, expr)), None) = (&key, settings.key, settings.on_missing_key)
            && let Some(missing) = spec.may_be_missing()
        {
            self.warn_missing_key(kf, expr.span, &name.node, missing);
        }
        let Some((rf, rate_value)) = settings.rate else {
            self.error_help(
                f,
                name.span,
                format!("limit `{}` has no rate", name.node),
                "no `rate`",
                "add a rate such as `rate 100/min;`, or set one in `defaults`",
            );
            return None;
        };

        // The algorithm: written in the limit; else implied by the rate (`5 concurrent`,
        // `/month`); else from defaults; else the sliding window.
        let implied = self.implied_algorithm(rate_value);
        let algorithm = match settings.algorithm {
            Some((af, ident)) if settings.algorithm_explicit || implied.is_none() => {
                match lookup(ALGORITHMS, &ident.node) {
                    Some(a) => Some(a),
                    None => {
                        let known = words(ALGORITHMS);
                        let help = suggest(&ident.node, &known)
                            .unwrap_or_else(|| format!("the algorithms are: {}", known.join(", ")));
                        self.error_help(
                            af,
                            ident.span,
                            format!("unknown algorithm `{}`", ident.node),
                            "unknown algorithm",
                            help,
                        );
                        None
                    }
                }
            }
            _ => Some(implied.unwrap_or(Algorithm::SlidingWindow)),
        };

        let lease = match settings.lease {
            Some((lf, lease)) => {
                if algorithm.is_some_and(|a| a != Algorithm::Concurrency) {
                    self.error_help(
                        lf,
                        lease.span,
                        "`lease` applies only to concurrency limits",
                        "not a concurrency limit",
                        format!(
                            "limit `{}` uses `{}`",
                            name.node,
                            algorithm.map_or("", Algorithm::name)
                        ),
                    );
                    ok = false;
                }
                match self.duration_micros(lf, lease, "lease") {
                    Some(d) if d <= DAY => d,
                    Some(_) => {
                        self.error_help(lf, lease.span, "a lease lasts at most 1 day", "too long", "a lease only matters when a request never reports its end; minutes are typical");
                        ok = false;
                        DEFAULT_LEASE
                    }
                    None => {
                        ok = false;
                        DEFAULT_LEASE
                    }
                }
            }
            None => DEFAULT_LEASE,
        };

        let rate = self.limit_rate(rf, rate_value, algorithm, lease, &name.node);
        let cost = match settings.cost {
            Some((cf, cost)) => self.cost(cf, cost, algorithm.unwrap_or(Algorithm::SlidingWindow)),
            None => Some(Cost::Fixed(1)),
        };
        let soft = match settings.soft {
            Some((sf, soft)) => self.soft(sf, soft),
            None => Some(Vec::new()),
        };
        let on_exceed = match settings.on_exceed {
            Some((ef, exceed)) => self.on_exceed(ef, exceed),
            None => Some(OnExceed {
                status: StatusCode::TOO_MANY_REQUESTS,
                reason: None,
                ban: None,
            }),
        };
        let mode = match settings.mode {
            Some((mf, m)) => self.keyword(mf, m, "mode", MODES),
            None => Some(Mode::Enforce),
        };
        let on_store_error = match settings.on_store_error {
            Some((mf, m)) => self.keyword(mf, m, "on_store_error", STORE_ERROR_MODES),
            None => Some(StoreErrorMode::Allow),
        };
        let on_missing_key = match settings.on_missing_key {
            Some((mf, m)) => self.keyword(mf, m, "on_missing_key", MISSING_KEY_MODES),
            None => Some(MissingKey::Ip),
        };
        let priority = match settings.priority {
            Some((pf, p)) => match i32::try_from(p.node) {
                Ok(p) => Some(p),
                Err(_) => {
                    self.error_help(
                        pf,
                        p.span,
                        "priority is out of range",
                        "out of range",
                        "use a number between -2147483648 and 2147483647",
                    );
                    None
                }
            },
            None => Some(0),
        };

        let counts = match settings.counts {
            Some((cf, c)) => self.keyword(cf, c, "counts", COUNTS),
            None => Some(Counts::Requests),
        };
        if counts.is_some_and(|c| c != Counts::Requests)
            && algorithm == Some(Algorithm::Concurrency)
        {
            self.error_help(
                f,
                name.span,
                "a concurrency limit counts requests",
                "counts messages or bytes",
                "count messages or bytes with a rate, such as `rate 10/s;`",
            );
            ok = false;
        }
        let condition = match conditions.len() {
            0 => Condition::Always,
            1 => conditions.remove(0),
            _ => Condition::All(conditions),
        };
        algorithm?;
        Some(Limit {
            name: Arc::from(name.node.as_str()),
            namespace: Arc::clone(namespace),
            condition,
            key: key?,
            rate: rate?,
            cost: cost?,
            soft: soft?,
            on_exceed: on_exceed?,
            mode: mode?,
            on_store_error: on_store_error?,
            on_missing_key: on_missing_key?,
            priority: priority?,
            counts: counts?,
        })
        .filter(|_| ok)
    }

    /// Records one setting; returns false when it was set twice in the same block.
    fn apply_setting(
        &mut self,
        f: usize,
        settings: &mut Settings<'a>,
        setting: &'a ast::Setting,
        explicit: bool,
        seen: &mut HashMap<&'static str, Span>,
    ) -> bool {
        let (name, span) = match setting {
            ast::Setting::Key(k) => {
                settings.key = Some((f, k));
                ("key", k.span)
            }
            ast::Setting::Algorithm(a) => {
                settings.algorithm = Some((f, a));
                settings.algorithm_explicit = explicit;
                ("algorithm", a.span)
            }
            ast::Setting::Rate(r) => {
                settings.rate = Some((f, r));
                ("rate", r.span)
            }
            ast::Setting::Lease(l) => {
                settings.lease = Some((f, l));
                ("lease", l.span)
            }
            ast::Setting::Cost(c) => {
                settings.cost = Some((f, c));
                ("cost", c.span)
            }
            ast::Setting::Soft(s) => {
                settings.soft = Some((f, s));
                ("soft", s.span)
            }
            ast::Setting::OnExceed(e) => {
                settings.on_exceed = Some((f, e));
                ("on_exceed", e.span)
            }
            ast::Setting::Mode(m) => {
                settings.mode = Some((f, m));
                ("mode", m.span)
            }
            ast::Setting::OnStoreError(m) => {
                settings.on_store_error = Some((f, m));
                ("on_store_error", m.span)
            }
            ast::Setting::OnMissingKey(m) => {
                settings.on_missing_key = Some((f, m));
                ("on_missing_key", m.span)
            }
            ast::Setting::Priority(p) => {
                settings.priority = Some((f, p));
                ("priority", p.span)
            }
            ast::Setting::Counts(c) => {
                settings.counts = Some((f, c));
                ("counts", c.span)
            }
        };
        if let Some(first) = seen.insert(name, span) {
            let help = format!(
                "it was first set at {}; keep one",
                self.location(Site {
                    file: f,
                    span: first
                })
            );
            self.error_help(
                f,
                span,
                format!("`{name}` is set twice"),
                "set again here",
                help,
            );
            return false;
        }
        true
    }

    fn implied_algorithm(&self, value: &Spanned<ast::RateValue>) -> Option<Algorithm> {
        let shape = |v: &ast::RateValue| match v {
            ast::RateValue::Concurrent(_) => Some(Algorithm::Concurrency),
            ast::RateValue::Rate(r) if r.period.node.unit == ast::Unit::Month => {
                Some(Algorithm::Calendar)
            }
            _ => None,
        };
        match &value.node {
            ast::RateValue::TierRef { table, entry } => {
                let t = self.tables.get(*self.table_names.get(&table.node)?)?;
                t.entries
                    .iter()
                    .find_map(|e| e.get(&entry.node).and_then(|(_, v)| shape(&v.node)))
            }
            other => shape(other),
        }
    }

    fn limit_rate(
        &mut self,
        f: usize,
        value: &Spanned<ast::RateValue>,
        algorithm: Option<Algorithm>,
        lease: u64,
        limit: &str,
    ) -> Option<LimitRate> {
        let ast::RateValue::TierRef { table, entry } = &value.node else {
            return self
                .tier_value(f, value, algorithm, lease, limit)
                .map(LimitRate::Fixed);
        };
        let Some(&t) = self.table_names.get(&table.node) else {
            let names: Vec<&str> = self.table_names.keys().map(String::as_str).collect();
            let help = suggest(&table.node, &names).unwrap_or_else(|| {
                "define it with `tiers NAME { … }`, or check for errors in its definition"
                    .to_owned()
            });
            // A table that exists but failed to compile has already been reported.
            let defined = self.files.iter().any(|file| {
                file.ast
                    .items
                    .iter()
                    .any(|i| matches!(i, ast::Item::Tiers(b) if b.name.node == table.node))
            });
            if !defined {
                self.error_help(
                    f,
                    table.span,
                    format!("unknown tier table `{}`", table.node),
                    "not defined",
                    help,
                );
            }
            return None;
        };
        let tiers = self.tables[t].table.tiers.clone();
        let mut values = Vec::with_capacity(tiers.len());
        let mut ok = true;
        for (i, tier) in tiers.iter().enumerate() {
            match self.tables[t].entries[i].get(&entry.node).cloned() {
                Some((ef, v)) => match self.tier_value(ef, &v, algorithm, lease, limit) {
                    Some(v) => values.push(v),
                    None => ok = false,
                },
                None => {
                    self.error_help(
                        f,
                        entry.span,
                        format!(
                            "tier `{tier}` of `{}` has no entry `{}`",
                            table.node, entry.node
                        ),
                        "missing in a tier",
                        format!(
                            "add `{} = …;` to tier `{tier}` (or to a tier it extends), or `{} = unlimited;`",
                            entry.node, entry.node
                        ),
                    );
                    ok = false;
                }
            }
        }
        ok.then(|| LimitRate::Tiered {
            table: t,
            entry: Arc::from(entry.node.as_str()),
            values: values.into_boxed_slice(),
        })
    }

    /// One rate value checked against the algorithm that will count it.
    fn tier_value(
        &mut self,
        f: usize,
        value: &Spanned<ast::RateValue>,
        algorithm: Option<Algorithm>,
        lease: u64,
        limit: &str,
    ) -> Option<TierValue> {
        // Checks that hold whatever the algorithm come first, so that they are reported even
        // when the algorithm itself is wrong.
        if let ast::RateValue::Rate(rate) = &value.node {
            let mut ok = true;
            if rate.count.node == 0 {
                self.error_help(
                    f,
                    rate.count.span,
                    "a rate allows at least 1 per period",
                    "zero",
                    "to refuse everything, write `blocked`",
                );
                ok = false;
            }
            if rate.period.node.amount == 0 {
                self.error_help(
                    f,
                    rate.period.span,
                    "a period is longer than zero",
                    "zero",
                    "write a period such as `/min` or `/5s`",
                );
                ok = false;
            }
            if let Some(burst) = rate.burst.as_ref().filter(|b| b.node == 0) {
                self.error_help(
                    f,
                    burst.span,
                    "burst must be at least 1",
                    "zero",
                    "the burst is how many requests may come at once",
                );
                ok = false;
            }
            if !ok {
                return None;
            }
        }
        let algorithm = algorithm?;
        let used_by = format!("limit `{limit}` counts this with `{}`", algorithm.name());
        match &value.node {
            ast::RateValue::Unlimited => Some(TierValue::Unlimited),
            ast::RateValue::Blocked => Some(TierValue::Blocked),
            ast::RateValue::TierRef { .. } => {
                self.error_help(
                    f,
                    value.span,
                    "a tier entry cannot refer to another tier table",
                    "nested tier reference",
                    "write the rate itself, such as `100/min`",
                );
                None
            }
            ast::RateValue::Concurrent(n) => {
                if algorithm != Algorithm::Concurrency {
                    self.error_help(
                        f,
                        value.span,
                        format!("`{} concurrent` is a concurrency limit", n.node),
                        "not a rate",
                        format!(
                            "{used_by}; write a rate such as `100/min`, or `algorithm concurrency;`"
                        ),
                    );
                    return None;
                }
                let Some(max) = NonZeroU64::new(n.node) else {
                    self.error_help(
                        f,
                        n.span,
                        "a concurrency limit allows at least 1",
                        "zero",
                        "to refuse everything, write `blocked`",
                    );
                    return None;
                };
                let lease = NonZeroU64::new(lease).unwrap_or(NonZeroU64::MIN);
                Some(TierValue::Quota(Quota::Concurrency(ConcurrencyQuota {
                    max,
                    lease,
                })))
            }
            ast::RateValue::Rate(rate) => {
                if algorithm == Algorithm::Concurrency {
                    self.error_help(
                        f,
                        value.span,
                        "a concurrency limit takes a count in flight, not a rate",
                        "a rate",
                        "write `rate 5 concurrent;`",
                    );
                    return None;
                }
                let count = NonZeroU64::new(rate.count.node)?;
                let period = rate.period.node;
                if let Some(burst) = &rate.burst {
                    if !matches!(algorithm, Algorithm::TokenBucket | Algorithm::Gcra) {
                        self.error_help(
                            f,
                            burst.span,
                            "`burst` applies only to `token_bucket` and `gcra`",
                            "no burst for this algorithm",
                            format!("{used_by}; for bursts, use `algorithm token_bucket;` or `algorithm gcra;`"),
                        );
                        return None;
                    }
                }
                if algorithm == Algorithm::Calendar {
                    let calendar = match (period.amount, period.unit) {
                        (1, ast::Unit::Day) => Some(CalendarPeriod::Day),
                        (1, ast::Unit::Month) => Some(CalendarPeriod::Month),
                        _ => None,
                    };
                    let Some(calendar) = calendar else {
                        self.error_help(
                            f,
                            rate.period.span,
                            "a quota counts per calendar day or month",
                            "not a calendar period",
                            format!("write `/day` or `/month`; {used_by}"),
                        );
                        return None;
                    };
                    return Some(TierValue::Quota(Quota::Calendar {
                        limit: count,
                        period: calendar,
                    }));
                }
                if period.unit == ast::Unit::Month {
                    self.error_help(
                        f,
                        rate.period.span,
                        format!("`{}` cannot count per month", algorithm.name()),
                        "months vary in length",
                        "use `algorithm quota;` for calendar quotas",
                    );
                    return None;
                }
                let micros = self.duration_micros(f, &rate.period, "period")?;
                if micros > algorithm.max_window() {
                    self.error_help(
                        f,
                        rate.period.span,
                        format!(
                            "the window is longer than `{}` supports",
                            algorithm.name()
                        ),
                        "window too long",
                        format!(
                            "`{}` counts windows of at most {}; for longer periods use `algorithm quota;` with `/day` or `/month`",
                            algorithm.name(),
                            if algorithm == Algorithm::FixedWindow { "7 days" } else { "1 day" }
                        ),
                    );
                    return None;
                }
                if micros < 1_000 {
                    self.error_help(
                        f,
                        rate.period.span,
                        "a window is at least 1ms",
                        "too short",
                        "lengthen the window, for example `10/100ms`",
                    );
                    return None;
                }
                let window = NonZeroU64::new(micros)?;
                match algorithm {
                    Algorithm::FixedWindow => {
                        Some(TierValue::Quota(Quota::FixedWindow(WindowQuota {
                            limit: count,
                            window,
                        })))
                    }
                    Algorithm::SlidingWindow => {
                        if u128::from(count.get()) * u128::from(micros) >= EXACT_IN_LUA {
                            self.error_help(
                                f,
                                value.span,
                                "this rate is too large for the sliding window's arithmetic",
                                "too large",
                                "lower the count or the window, or use `fixed_window`",
                            );
                            return None;
                        }
                        Some(TierValue::Quota(Quota::SlidingWindow(WindowQuota {
                            limit: count,
                            window,
                        })))
                    }
                    _ => {
                        let capacity = rate
                            .burst
                            .as_ref()
                            .and_then(|b| NonZeroU64::new(b.node))
                            .unwrap_or(count);
                        let q = BucketQuota::new(capacity, count, window);
                        if algorithm == Algorithm::Gcra && q.period.get() < q.count.get() {
                            self.error_help(
                                f,
                                value.span,
                                "this rate is faster than one request per microsecond",
                                "too fast",
                                "GCRA counts in microseconds; lower the rate",
                            );
                            return None;
                        }
                        let scaled = u128::from(q.capacity.get()) * u128::from(q.period.get());
                        if scaled >= EXACT_IN_LUA {
                            self.error_help(
                                f,
                                value.span,
                                "the burst and the period are too large together",
                                "too large",
                                "lower the burst, or express the rate over a shorter period",
                            );
                            return None;
                        }
                        if algorithm == Algorithm::Gcra {
                            Some(TierValue::Quota(Quota::Gcra(q)))
                        } else {
                            Some(TierValue::Quota(Quota::TokenBucket(q)))
                        }
                    }
                }
            }
        }
    }

    fn duration_micros(
        &mut self,
        f: usize,
        d: &Spanned<ast::DurationLit>,
        what: &str,
    ) -> Option<u64> {
        let unit = match d.node.unit {
            ast::Unit::Millisecond => 1_000,
            ast::Unit::Second => SECOND,
            ast::Unit::Minute => 60 * SECOND,
            ast::Unit::Hour => 3_600 * SECOND,
            ast::Unit::Day => DAY,
            ast::Unit::Week => 7 * DAY,
            ast::Unit::Month => {
                self.error_help(
                    f,
                    d.span,
                    format!("a {what} cannot be given in months"),
                    "months vary in length",
                    "use days",
                );
                return None;
            }
        };
        match d.node.amount.checked_mul(unit) {
            Some(0) => {
                self.error_help(
                    f,
                    d.span,
                    format!("a {what} is longer than zero"),
                    "zero",
                    "write a duration such as `30s` or `5min`",
                );
                None
            }
            Some(v) => Some(v),
            None => {
                self.error_help(
                    f,
                    d.span,
                    format!("this {what} is too long"),
                    "too long",
                    "durations are counted in microseconds and must fit in 64 bits",
                );
                None
            }
        }
    }

    fn cost(
        &mut self,
        f: usize,
        cost: &Spanned<ast::CostExpr>,
        algorithm: Algorithm,
    ) -> Option<Cost> {
        if algorithm == Algorithm::Concurrency {
            self.error_help(
                f,
                cost.span,
                "`cost` does not apply to concurrency limits",
                "not counted by cost",
                "a concurrency limit counts requests in flight, one each",
            );
            return None;
        }
        match &cost.node {
            ast::CostExpr::Fixed(n) => {
                if n.node == 0 {
                    self.error_help(
                        f,
                        n.span,
                        "a cost is at least 1",
                        "zero",
                        "to exempt requests from a limit, narrow its `match`",
                    );
                    return None;
                }
                Some(Cost::Fixed(n.node))
            }
            ast::CostExpr::Header { name, default, max } => {
                let header = self.header_name(f, name)?;
                let default_value = default.as_ref().map_or(1, |d| d.node);
                let max_value = max.as_ref().map_or(u64::MAX, |m| m.node);
                if default_value == 0 || max_value == 0 {
                    let span = if default_value == 0 {
                        default.as_ref().map_or(cost.span, |d| d.span)
                    } else {
                        max.as_ref().map_or(cost.span, |m| m.span)
                    };
                    self.error_help(
                        f,
                        span,
                        "a cost is at least 1",
                        "zero",
                        "to exempt requests from a limit, narrow its `match`",
                    );
                    return None;
                }
                if default_value > max_value {
                    let span = default.as_ref().map_or(cost.span, |d| d.span);
                    self.error_help(
                        f,
                        span,
                        format!(
                            "the default cost {default_value} is above the maximum {max_value}"
                        ),
                        "above `max`",
                        "the default cost must be within `max`",
                    );
                    return None;
                }
                Some(Cost::Header {
                    name: header,
                    default: default_value,
                    max: max_value,
                })
            }
        }
    }

    fn soft(&mut self, f: usize, soft: &Spanned<Vec<ast::SoftStep>>) -> Option<Vec<SoftStep>> {
        let mut steps: Vec<(SoftStep, Span)> = Vec::new();
        let mut ok = true;
        for step in &soft.node {
            let (at, action) = match step {
                ast::SoftStep::Warn { at } => (at, SoftAction::Warn),
                ast::SoftStep::Delay { delay, at } => {
                    let Some(micros) = self.duration_micros(f, delay, "delay") else {
                        ok = false;
                        continue;
                    };
                    if micros > MAX_SOFT_DELAY {
                        self.error_help(
                            f,
                            delay.span,
                            "a soft delay is at most 60s",
                            "too long",
                            "long delays hold connections open; reject instead",
                        );
                        ok = false;
                        continue;
                    }
                    (at, SoftAction::Delay(Duration::from_micros(micros)))
                }
            };
            if at.node == 0 || at.node > 100 {
                self.error_help(
                    f,
                    at.span,
                    "a soft threshold is between 1% and 100%",
                    "out of range",
                    "write the share of the limit in use, such as `80%`",
                );
                ok = false;
                continue;
            }
            steps.push((
                SoftStep {
                    at_percent: at.node as u8,
                    action,
                },
                at.span,
            ));
        }
        steps.sort_by_key(|(s, _)| s.at_percent);
        for pair in steps.windows(2) {
            let ((a, _), (b, b_span)) = (&pair[0], &pair[1]);
            let overlap = a.at_percent == b.at_percent
                || (matches!(a.action, SoftAction::Delay(_)) && b.action == SoftAction::Warn)
                || matches!((a.action, b.action), (SoftAction::Delay(x), SoftAction::Delay(y)) if y <= x);
            if overlap {
                self.error_help(
                    f,
                    *b_span,
                    "soft thresholds overlap",
                    "overlaps an earlier step",
                    "give each step its own share, warnings below delays, and longer delays at higher shares",
                );
                ok = false;
            }
        }
        ok.then(|| steps.into_iter().map(|(s, _)| s).collect())
    }

    fn on_exceed(&mut self, f: usize, exceed: &Spanned<ast::OnExceed>) -> Option<OnExceed> {
        let status = match &exceed.node.status {
            Some(s) => self.error_status(f, s)?,
            None => StatusCode::TOO_MANY_REQUESTS,
        };
        let ban = match &exceed.node.ban {
            Some(b) => {
                let micros = self.duration_micros(f, b, "ban")?;
                if micros > MAX_BAN {
                    self.error_help(
                        f,
                        b.span,
                        "a ban lasts at most 30 days",
                        "too long",
                        "for longer, put the client on a denylist",
                    );
                    return None;
                }
                Some(Duration::from_micros(micros))
            }
            None => None,
        };
        Some(OnExceed {
            status,
            reason: exceed
                .node
                .reason
                .as_ref()
                .map(|r| Arc::from(r.node.as_str())),
            ban,
        })
    }

    fn error_status(&mut self, f: usize, status: &Spanned<u64>) -> Option<StatusCode> {
        match u16::try_from(status.node)
            .ok()
            .filter(|s| (400..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
        {
            Some(s) => Some(s),
            None => {
                self.error_help(
                    f,
                    status.span,
                    format!("`{}` is not an error status", status.node),
                    "not 4xx or 5xx",
                    "a refusal answers with a status from 400 to 599, such as 429 or 403",
                );
                None
            }
        }
    }

    fn keyword<T: Copy>(
        &mut self,
        f: usize,
        ident: &ast::Ident,
        what: &str,
        table: Keywords<T>,
    ) -> Option<T> {
        if let Some(found) = lookup(table, &ident.node) {
            return Some(found);
        }
        let allowed = words(table);
        let help = suggest(&ident.node, &allowed)
            .unwrap_or_else(|| format!("`{what}` is one of: {}", allowed.join(", ")));
        self.error_help(
            f,
            ident.span,
            format!("unknown {what} `{}`", ident.node),
            "not allowed here",
            help,
        );
        None
    }

    // ─── conditions ──────────────────────────────────────────────────────────────────────

    fn condition(&mut self, f: usize, c: &ast::Condition) -> Option<Condition> {
        use ast::ConditionKind as K;
        match &c.kind {
            K::Or(parts) | K::And(parts) => {
                let mut out = Vec::with_capacity(parts.len());
                let mut ok = true;
                for p in parts {
                    match self.condition(f, p) {
                        Some(c) => out.push(c),
                        None => ok = false,
                    }
                }
                if !ok {
                    return None;
                }
                Some(if matches!(c.kind, K::Or(_)) {
                    Condition::Any(out)
                } else {
                    Condition::All(out)
                })
            }
            K::Not(inner) => self
                .condition(f, inner)
                .map(|c| Condition::Not(Box::new(c))),
            K::Route { methods, templates } => {
                let methods = self.methods(f, methods);
                let patterns: Vec<Option<PatternId>> =
                    templates.iter().map(|t| self.pattern(f, t)).collect();
                let patterns = patterns.into_iter().collect::<Option<Vec<_>>>()?;
                Some(Condition::Route {
                    methods: methods?,
                    patterns,
                })
            }
            K::Method(methods) => {
                let methods = self.methods(f, methods)?;
                Some(if methods.is_empty() {
                    Condition::Always
                } else {
                    Condition::Method(methods)
                })
            }
            K::Host { regex, value } => {
                if *regex {
                    self.regex(f, value).map(Condition::HostMatches)
                } else {
                    Some(Condition::HostIs(Arc::from(
                        value.node.to_ascii_lowercase(),
                    )))
                }
            }
            K::Header { name, test } => {
                let header = self.header_name(f, name)?;
                self.header_test(f, header, test.as_ref())
            }
            K::UserAgent(op, value) => {
                self.header_test(f, http::header::USER_AGENT, Some(&(*op, value.clone())))
            }
            K::Ip(items) => {
                let mut nets = Vec::with_capacity(items.len());
                let mut ok = true;
                for item in items {
                    let text = item.node.trim();
                    let net = text
                        .parse::<IpNet>()
                        .ok()
                        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from));
                    match net {
                        Some(n) => nets.push(n),
                        None => {
                            self.error_help(
                                f,
                                item.span,
                                format!("`{text}` is not an IP address or network"),
                                "invalid network",
                                "write an address (`192.0.2.1`) or a network in CIDR form (`10.0.0.0/8`, `fd00::/8`)",
                            );
                            ok = false;
                        }
                    }
                }
                if nets.is_empty() && ok {
                    self.error_help(
                        f,
                        c.span,
                        "the address list is empty",
                        "empty list",
                        "list at least one address or network",
                    );
                    return None;
                }
                ok.then(|| Condition::IpIn(Arc::new(IpSet::new(nets))))
            }
            K::Cedar(action) => {
                if !self.has_cedar_import() {
                    self.error_help(
                        f,
                        c.span,
                        "`cedar` conditions need Cedar policies",
                        "no Cedar policies imported",
                        "add `import cedar \"policies.cedar\";` to a policy file",
                    );
                    return None;
                }
                Some(Condition::Cedar(Arc::from(action.node.as_str())))
            }
        }
    }

    fn header_test(
        &mut self,
        f: usize,
        name: HeaderName,
        test: Option<&(ast::CmpOp, Spanned<String>)>,
    ) -> Option<Condition> {
        Some(match test {
            None => Condition::HeaderPresent(name),
            Some((ast::CmpOp::Eq, v)) => Condition::HeaderIs(name, Arc::from(v.node.as_str())),
            Some((ast::CmpOp::Ne, v)) => Condition::HeaderIsNot(name, Arc::from(v.node.as_str())),
            Some((ast::CmpOp::Matches, v)) => Condition::HeaderMatches(name, self.regex(f, v)?),
        })
    }

    fn regex(&mut self, f: usize, pattern: &Spanned<String>) -> Option<Regex> {
        match RegexBuilder::new(&pattern.node).size_limit(1 << 20).build() {
            Ok(re) => Some(re),
            Err(e) => {
                let text = e.to_string();
                let reason = text
                    .lines()
                    .rev()
                    .find(|l| l.trim_start().starts_with("error:"))
                    .map(|l| {
                        l.trim_start()
                            .trim_start_matches("error:")
                            .trim()
                            .to_owned()
                    })
                    .unwrap_or_else(|| text.lines().last().unwrap_or("").trim().to_owned());
                self.error_help(
                    f,
                    pattern.span,
                    format!("invalid regular expression: {reason}"),
                    "invalid regex",
                    "the syntax is Rust's `regex` crate's; inside a string, write `\\\\` for a backslash",
                );
                None
            }
        }
    }

    fn methods(&mut self, f: usize, methods: &[ast::Ident]) -> Option<Vec<Method>> {
        let mut out = Vec::new();
        let mut ok = true;
        for m in methods {
            if m.node == "ANY" {
                if methods.len() > 1 {
                    self.error_help(
                        f,
                        m.span,
                        "`ANY` stands alone",
                        "combined with other methods",
                        "write `ANY` for every method, or list the methods",
                    );
                    ok = false;
                }
                continue;
            }
            if METHODS.contains(&m.node.as_str()) {
                if let Ok(method) = Method::from_bytes(m.node.as_bytes()) {
                    out.push(method);
                }
                continue;
            }
            let upper = m.node.to_ascii_uppercase();
            let help = if METHODS.contains(&upper.as_str()) || upper == "ANY" {
                format!("methods are written in capitals: `{upper}`")
            } else {
                suggest(&upper, METHODS)
                    .unwrap_or_else(|| format!("methods are {} or ANY", METHODS.join(", ")))
            };
            self.error_help(
                f,
                m.span,
                format!("unknown HTTP method `{}`", m.node),
                "unknown method",
                help,
            );
            ok = false;
        }
        ok.then_some(out)
    }

    fn pattern(&mut self, f: usize, template: &Spanned<String>) -> Option<PatternId> {
        match Template::parse(&template.node) {
            Ok(parsed) => {
                if let Some(&id) = self.pattern_ids.get(&parsed) {
                    return Some(id);
                }
                let id = PatternId(self.templates.len());
                self.pattern_ids.insert(parsed.clone(), id);
                self.templates
                    .push((Arc::from(template.node.as_str()), parsed));
                Some(id)
            }
            Err(e) => {
                self.error_help(
                    f,
                    template.span,
                    format!("invalid route template `{}`", template.node),
                    "invalid template",
                    e.0,
                );
                None
            }
        }
    }

    // ─── lists and anomalies ─────────────────────────────────────────────────────────────

    fn list(
        &mut self,
        f: usize,
        block: &ast::ListBlock,
        safelist: bool,
    ) -> (ListRule, StatusCode, Option<Arc<str>>) {
        let conditions: Vec<Condition> = block
            .conditions
            .iter()
            .filter_map(|c| self.condition(f, c))
            .collect();
        if block.conditions.is_empty() {
            self.error_help(
                f,
                block.name.span,
                format!("list `{}` has no entries", block.name.node),
                "empty list",
                "add a condition such as `ip in [10.0.0.0/8];`",
            );
        }
        let mut status = StatusCode::FORBIDDEN;
        let mut reason = None;
        for (i, respond) in block.respond.iter().enumerate() {
            if safelist {
                self.error_help(
                    f,
                    respond.span,
                    "a safelist does not respond",
                    "only denylists respond",
                    "requests on a safelist skip every limit",
                );
            } else if i > 0 {
                self.error_help(
                    f,
                    respond.span,
                    "a denylist has one `respond`",
                    "second `respond`",
                    "keep one `respond`",
                );
            } else {
                if let Some(s) = self.error_status(f, &respond.node.status) {
                    status = s;
                }
                reason = respond
                    .node
                    .reason
                    .as_ref()
                    .map(|r| Arc::from(r.node.as_str()));
            }
        }
        (
            ListRule {
                name: Arc::from(block.name.node.as_str()),
                conditions,
            },
            status,
            reason,
        )
    }

    fn anomaly(
        &mut self,
        f: usize,
        block: &ast::AnomalyBlock,
        namespace: &Arc<str>,
    ) -> Option<Anomaly> {
        let mut conditions = Vec::new();
        let mut key = None;
        let mut statuses = None;
        let mut detect = None;
        let mut then = None;
        let mut ok = true;
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for stmt in &block.stmts {
            let (name, span) = match stmt {
                ast::AnomalyStmt::Match(m) => {
                    for c in &m.node {
                        match self.condition(f, c) {
                            Some(c) => conditions.push(c),
                            None => ok = false,
                        }
                    }
                    continue;
                }
                ast::AnomalyStmt::Key(k) => {
                    key = Some(k);
                    ("key", k.span)
                }
                ast::AnomalyStmt::Count(c) => {
                    statuses = Some(c);
                    ("count", c.span)
                }
                ast::AnomalyStmt::Detect {
                    count,
                    window,
                    span,
                } => {
                    detect = Some((count, window));
                    ("detect", *span)
                }
                ast::AnomalyStmt::Then(t) => {
                    then = Some(t);
                    ("then", t.span)
                }
            };
            if seen.insert(name, span).is_some() {
                self.error_help(
                    f,
                    span,
                    format!("`{name}` is set twice"),
                    "set again here",
                    "keep one",
                );
                ok = false;
            }
        }
        let key = match key {
            Some(k) => self.key_expr(f, k),
            None => Some(KeySpec {
                parts: vec![KeyPart::One(KeySource::Ip { v4: 32, v6: 64 })],
            }),
        };
        let mut status_codes = Vec::new();
        match statuses {
            Some(list) => {
                for s in &list.node {
                    match u16::try_from(s.node)
                        .ok()
                        .filter(|s| (100..=599).contains(s))
                    {
                        Some(code) => status_codes.push(code),
                        None => {
                            self.error_help(
                                f,
                                s.span,
                                format!("`{}` is not an HTTP status", s.node),
                                "not a status",
                                "statuses are between 100 and 599",
                            );
                            ok = false;
                        }
                    }
                }
            }
            None => {
                self.error_help(
                    f,
                    block.name.span,
                    format!("anomaly `{}` does not say what to count", block.name.node),
                    "no `count`",
                    "add `count when status in [401, 403];`",
                );
                ok = false;
            }
        }
        let (threshold, window) = match detect {
            Some((count, window)) => {
                if count.node == 0 {
                    self.error_help(
                        f,
                        count.span,
                        "a threshold is at least 1",
                        "zero",
                        "write how many counted responses trigger it, such as `detect 10 in 5min;`",
                    );
                    ok = false;
                }
                let w = self.duration_micros(f, window, "window");
                if w.is_none() {
                    ok = false;
                }
                (count.node, Duration::from_micros(w.unwrap_or(1)))
            }
            None => {
                self.error_help(
                    f,
                    block.name.span,
                    format!("anomaly `{}` has no threshold", block.name.node),
                    "no `detect`",
                    "add `detect 10 in 5min;`",
                );
                ok = false;
                (1, Duration::from_secs(1))
            }
        };
        let mut ban = None;
        let mut alerts = Vec::new();
        match then {
            Some(actions) => {
                for action in &actions.node {
                    match action {
                        ast::ThenAction::Ban(d) => match self.duration_micros(f, d, "ban") {
                            Some(m) if m <= MAX_BAN => ban = Some(Duration::from_micros(m)),
                            Some(_) => {
                                self.error_help(
                                    f,
                                    d.span,
                                    "a ban lasts at most 30 days",
                                    "too long",
                                    "for longer, put the client on a denylist",
                                );
                                ok = false;
                            }
                            None => ok = false,
                        },
                        ast::ThenAction::Alert(a) => alerts.push(Arc::from(a.node.as_str())),
                    }
                }
            }
            None => {
                self.error_help(
                    f,
                    block.name.span,
                    format!("anomaly `{}` does nothing when detected", block.name.node),
                    "no `then`",
                    "add `then ban 15min;` or `then alert \"security\";`",
                );
                ok = false;
            }
        }
        let condition = match conditions.len() {
            0 => Condition::Always,
            1 => conditions.remove(0),
            _ => Condition::All(conditions),
        };
        let key = key?;
        ok.then(|| Anomaly {
            name: Arc::from(block.name.node.as_str()),
            namespace: Arc::clone(namespace),
            condition,
            key,
            statuses: status_codes,
            threshold,
            window,
            ban,
            alerts,
        })
    }
}

/// "did you mean `x`?" when a known name is close.
fn suggest(name: &str, known: &[&str]) -> Option<String> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(name, k), *k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| format!("did you mean `{k}`?"))
}

/// The plan's version: a hash of every source file and imported Cedar file.
fn version_hash(files: &[ParsedFile], imports: &[CedarImport]) -> Arc<str> {
    let mut hasher = blake3::Hasher::new();
    for file in files {
        hasher.update(file.source.name().as_bytes());
        hasher.update(&[0]);
        hasher.update(file.source.text().as_bytes());
        hasher.update(&[0]);
    }
    for import in imports {
        for path in std::iter::once(&import.policies).chain(import.schema.as_ref()) {
            hasher.update(path.to_string_lossy().as_bytes());
            if let Ok(bytes) = std::fs::read(path) {
                hasher.update(&bytes);
            }
        }
    }
    let hex = hasher.finalize().to_hex();
    Arc::from(&hex.as_str()[..16])
}
