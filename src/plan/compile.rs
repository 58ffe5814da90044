//! Lowering syntax trees into a [`Plan`]: name resolution, validation, route compilation.
//!
//! Every check reports into one list, so a run shows every problem of every file at once.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};
use regex::{Regex, RegexBuilder};

use super::condition::{Condition, ValueTest};
use super::ipset::IpSet;
use super::key::{KeyPart, KeySource, KeySpec, is_secret_header, is_secret_name};
use super::route::{PatternId, RouteIndex, Template};
use super::{
    Anomaly, AnomalyActions, Authorize, CedarImport, Cost, Counts, DenyRule, Detector, Limit,
    LimitRate, ListRule, MissingKey, Mode, OnExceed, OnPartition, Pick, Plan, PlanVersion,
    PolicyHeaders, SoftAction, SoftStep, StoreErrorMode, TierSource, TierTable, TierValue,
};
use crate::diagnostic::{PolicyError, PolicyErrors, Span};
use crate::dsl::ast::{self, Spanned};
use crate::dsl::{ParsedFile, PolicySet};
use crate::limiter::{BucketQuota, CalendarPeriod, ConcurrencyQuota, Quota, WindowQuota};

mod adaptive;
mod conditions;
mod envoy;
mod imports;
mod keys;
mod limits;
mod lists;
mod names;
mod rates;
mod regions;
mod settings;
mod tiers;
mod usage;

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
    ("adaptive_concurrency", Algorithm::AdaptiveConcurrency),
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
const PARTITION_MODES: Keywords<OnPartition> = &[
    ("share", OnPartition::Share),
    ("local", OnPartition::Local),
    ("deny", OnPartition::Deny),
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
    "domain",
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
        warnings: Vec::new(),
        cedar: Vec::new(),
        file_cedar: vec![None; set.files().len()],
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
    /// Decided in each node's memory, by a limit that follows the upstream's latency.
    AdaptiveConcurrency,
}

impl Algorithm {
    fn name(self) -> &'static str {
        ALGORITHMS
            .iter()
            .find(|(_, a)| *a == self)
            .map_or("", |(w, _)| *w)
    }

    /// Whether the algorithm counts requests in flight, one each, until they end.
    fn counts_in_flight(self) -> bool {
        matches!(
            self,
            Algorithm::Concurrency | Algorithm::AdaptiveConcurrency
        )
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

/// A limit's settings after its file's `defaults` are applied.
#[derive(Default)]
struct Settings<'a> {
    key: Option<&'a ast::KeyExpr>,
    algorithm: Option<&'a ast::Ident>,
    algorithm_explicit: bool,
    rate: Option<&'a Spanned<ast::RateValue>>,
    lease: Option<&'a Spanned<ast::DurationLit>>,
    cost: Option<&'a Spanned<ast::CostExpr>>,
    reserve: Option<&'a Spanned<ast::ReserveExpr>>,
    soft: Option<&'a Spanned<Vec<ast::SoftStep>>>,
    on_exceed: Option<&'a Spanned<ast::OnExceed>>,
    mode: Option<&'a ast::Ident>,
    on_store_error: Option<&'a ast::Ident>,
    on_missing_key: Option<&'a ast::Ident>,
    priority: Option<&'a Spanned<i64>>,
    counts: Option<&'a ast::Ident>,
    authorize: Option<&'a Spanned<String>>,
    sync: Option<&'a Spanned<ast::DurationLit>>,
    replaces: Option<&'a Spanned<Vec<ast::Ident>>>,
    /// Whether `sync every` was written in `defaults` (it is set per limit).
    sync_in_defaults: bool,
    /// `global;`, and whether it was written in `defaults` (it is set per limit).
    global: Option<Span>,
    global_in_defaults: bool,
    on_partition: Option<&'a ast::Ident>,
    /// Whether `on_partition` was written in the limit itself.
    on_partition_explicit: bool,
    /// Whether `on_store_error` was written in the limit itself.
    on_store_error_explicit: bool,
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
    /// Problems worth reading that do not stop the plan.
    warnings: Vec<PolicyError>,
    /// The imported Cedar sets, loaded.
    cedar: Vec<crate::authz::CedarSet>,
    /// `file_cedar[file]`: the Cedar set the file imports.
    file_cedar: Vec<Option<usize>>,
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
        // Pass 1: file headers, and every name with where it was defined.
        let declared = self.declarations();
        self.check_named_keys();

        // Pass 2: tier tables (limits refer to them).
        for (f, block) in declared.tables {
            if let Some(table) = self.tier_table(f, block) {
                self.table_names
                    .insert(block.name.node.clone(), self.tables.len());
                self.tables.push(table);
            }
        }

        // Pass 3: limits, lists, anomalies.
        let namespaces = &declared.namespaces;
        let blocks = declared.limits.clone();
        let mut limits: Vec<Limit> = declared
            .limits
            .into_iter()
            .filter_map(|(f, block)| self.limit(f, block, &declared.defaults[f], &namespaces[f]))
            .collect();
        self.check_replaces(&blocks, &limits);
        limits.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| a.name.cmp(&b.name))
        });
        let safelists = declared
            .safelists
            .into_iter()
            .map(|(f, block)| self.list(f, block, true).0)
            .collect();
        let denylists = declared
            .denylists
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
        let anomalies = declared
            .anomalies
            .into_iter()
            .filter_map(|(f, block)| self.anomaly(f, block, &namespaces[f]))
            .collect();

        let guards: Vec<Option<Vec<PatternId>>> = limits
            .iter()
            .map(|l| l.condition.required_patterns())
            .collect();
        let routes = RouteIndex::new(std::mem::take(&mut self.templates), &guards);
        let tiers = std::mem::take(&mut self.tables)
            .into_iter()
            .map(|t| t.table)
            .collect();
        Plan {
            version: version_hash(files, &declared.cedar_imports),
            counts_bytes: limits.iter().any(|l| l.counts == Counts::Bytes),
            reads_request_json: limits.iter().any(|l| matches!(l.cost, Cost::Json { .. })),
            limits,
            routes,
            safelists,
            denylists,
            anomalies,
            tiers,
            cedar_imports: declared.cedar_imports,
            cedar: std::mem::take(&mut self.cedar)
                .into_iter()
                .map(Arc::new)
                .collect(),
            sources: files.iter().map(|f| Arc::from(f.source.name())).collect(),
            warnings: Vec::new(),
        }
    }

    /// Every named key, used or not, so that a broken one is reported.
    fn check_named_keys(&mut self) {
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
    }
}

use crate::diagnostic::did_you_mean as suggest;

/// The plan's version: a hash of every source file and imported Cedar file.
fn version_hash(files: &[ParsedFile], imports: &[CedarImport]) -> PlanVersion {
    let mut hasher = blake3::Hasher::new();
    for file in files {
        hasher.update(file.source.name().as_bytes());
        hasher.update(&[0]);
        hasher.update(file.source.text().as_bytes());
        hasher.update(&[0]);
    }
    for import in imports {
        let files = std::iter::once(&import.policies)
            .chain(import.schema.as_ref())
            .chain(import.entities.as_ref());
        for path in files {
            hasher.update(path.to_string_lossy().as_bytes());
            if let Ok(bytes) = std::fs::read(path) {
                hasher.update(&bytes);
            }
        }
    }
    PlanVersion::from_hex(hasher.finalize().to_hex().as_str())
}
