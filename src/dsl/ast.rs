//! The syntax tree of a policy file: what was written, where, before any meaning is checked.

use std::fmt;

pub use crate::diagnostic::Span;

mod cost;
mod tuning;

pub use self::cost::{AmountSource, CostExpr, ReserveExpr, UsageDefault, UsageTerm};
pub use self::tuning::{AdaptiveBlock, AdmissionBlock, StatusRange, Tuning, TuningValue};

/// A node and the place it was written.
#[derive(Clone, PartialEq, Eq)]
pub struct Spanned<T> {
    /// The node.
    pub node: T,
    /// Where it was written.
    pub span: Span,
}

impl<T> Spanned<T> {
    /// Wraps `node` written at `span`.
    pub fn new(node: T, span: Span) -> Self {
        Spanned { node, span }
    }
}

impl<T: fmt::Debug> fmt::Debug for Spanned<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.node.fmt(f)?;
        write!(f, " @ {:?}", self.span)
    }
}

/// A name as written.
pub type Ident = Spanned<String>;

/// A parsed file: its items in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyFile {
    /// Top-level items.
    pub items: Vec<Item>,
}

/// A top-level item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// `version 1;`
    Version(Spanned<u64>),
    /// `namespace "name";`
    Namespace(Spanned<String>),
    /// `import cedar "…" schema "…" namespace "…";`
    Import(ImportStmt),
    /// `key name = …;`
    Key(KeyDef),
    /// `defaults { … }`
    Defaults(DefaultsBlock),
    /// `tiers name { … }`
    Tiers(TiersBlock),
    /// `limit name { … }`
    Limit(LimitBlock),
    /// `safelist name { … }`
    Safelist(ListBlock),
    /// `denylist name { … }`
    Denylist(ListBlock),
    /// `anomaly name { … }`
    Anomaly(AnomalyBlock),
}

/// `import cedar "api.cedar" schema "api.cedarschema" namespace "Api";`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportStmt {
    /// The Cedar policy file, relative to this file.
    pub cedar: Spanned<String>,
    /// The Cedar schema file, relative to this file.
    pub schema: Option<Spanned<String>>,
    /// The Cedar namespace of the policies.
    pub namespace: Option<Spanned<String>>,
    /// The Cedar entities file (JSON), relative to this file.
    pub entities: Option<Spanned<String>>,
    /// `principal Account;`: the principals' entity type (every one given, in order).
    pub principal_type: Vec<Ident>,
    /// `resource Route;`: the resources' entity type (every one given, in order).
    pub resource_type: Vec<Ident>,
    /// `parents Role from claim("roles");`: the principal's parents from the request.
    pub parents: Vec<ImportValue>,
    /// `context "client" from header("X-Client");`: context attributes from the request.
    pub context: Vec<ImportValue>,
    /// The whole statement.
    pub span: Span,
}

/// `parents Role from claim("roles");` or `context "client" from header("X-Client");`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportValue {
    /// The entity type (`Role`) or the context attribute (`client`).
    pub name: Spanned<String>,
    /// Where the request's value comes from.
    pub source: ValueSource,
    /// The whole statement.
    pub span: Span,
}

/// A request value read by name: a header or a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSource {
    /// `header("X-Name")`: believed from trusted proxies only.
    Header(Spanned<String>),
    /// `header("X-Name") trusted`: believed from any client.
    TrustedHeader(Spanned<String>),
    /// `claim("name")`
    Claim(Spanned<String>),
    /// `descriptor("key")`: an entry of an Envoy rate-limit request's descriptor.
    Descriptor(Spanned<String>),
}

/// `key identity = first_of(user_id, ip);`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDef {
    /// The key's name.
    pub name: Ident,
    /// What it is made of.
    pub expr: KeyExpr,
}

/// Parts joined by `+`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyExpr {
    /// Each part.
    pub terms: Vec<KeyTerm>,
    /// The whole expression.
    pub span: Span,
}

/// One part of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyTerm {
    /// `first_of(a, b, …)`: the first source with a value.
    FirstOf(Spanned<Vec<KeySource>>),
    /// A single source.
    Source(KeySource),
}

/// Where a key value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `header("X-Name")`: believed from trusted proxies only.
    Header(Spanned<String>),
    /// `header("X-Name") trusted`: believed from any client.
    TrustedHeader(Spanned<String>),
    /// `claim("name")`
    Claim(Spanned<String>),
    /// `query("name")`
    Query(Spanned<String>),
    /// `descriptor("key")`: an entry of an Envoy rate-limit request's descriptor.
    Descriptor(Spanned<String>),
    /// `ip/24`
    IpPrefix(Spanned<u64>),
    /// A built-in source (`ip`, `user_id`, …) or a named key.
    Name(Ident),
}

/// `defaults { … }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultsBlock {
    /// The settings, in order.
    pub settings: Vec<Setting>,
    /// The whole block.
    pub span: Span,
}

/// A setting of a limit (or of `defaults`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// `key …;`
    Key(KeyExpr),
    /// `algorithm name;`
    Algorithm(Ident),
    /// `rate …;`
    Rate(Spanned<RateValue>),
    /// `lease 60s;`
    Lease(Spanned<DurationLit>),
    /// `cost …;`
    Cost(Spanned<CostExpr>),
    /// `reserve …;`
    Reserve(Spanned<ReserveExpr>),
    /// `soft …;`
    Soft(Spanned<Vec<SoftStep>>),
    /// `on_exceed reject …;`
    OnExceed(Spanned<OnExceed>),
    /// `mode name;`
    Mode(Ident),
    /// `on_store_error name;`
    OnStoreError(Ident),
    /// `on_missing_key name;`
    OnMissingKey(Ident),
    /// `priority n;`
    Priority(Spanned<i64>),
    /// `counts messages;`
    Counts(Ident),
    /// `authorize action "read";`
    Authorize(Spanned<String>),
    /// `sync every 50ms;`
    Sync(Spanned<DurationLit>),
    /// `global;`
    Global(Span),
    /// `on_partition name;`
    OnPartition(Ident),
    /// `replaces a, b;`
    Replaces(Spanned<Vec<Ident>>),
}

/// A time unit as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    /// `ms`
    Millisecond,
    /// `s`, `sec`, `second`
    Second,
    /// `m`, `min`, `minute`
    Minute,
    /// `h`, `hour`
    Hour,
    /// `d`, `day`
    Day,
    /// `w`, `week`
    Week,
    /// `month` (calendar)
    Month,
}

/// `250ms`, `5min`: an amount of a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationLit {
    /// How many units.
    pub amount: u64,
    /// Which unit.
    pub unit: Unit,
}

/// What a `rate` statement or a tier entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateValue {
    /// `unlimited`: the limit does not apply.
    Unlimited,
    /// `blocked`: every request is refused.
    Blocked,
    /// `5 concurrent`: at most this many in flight.
    Concurrent(Spanned<u64>),
    /// `100/min burst 10`
    Rate(RateLit),
    /// `plans.api`: an entry of a tier table.
    TierRef {
        /// The tier table.
        table: Ident,
        /// The entry.
        entry: Ident,
    },
}

/// `100/5min burst 10`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLit {
    /// Requests (or cost units) per period.
    pub count: Spanned<u64>,
    /// The period.
    pub period: Spanned<DurationLit>,
    /// The most that may be spent at once.
    pub burst: Option<Spanned<u64>>,
}

/// One step of `soft`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SoftStep {
    /// `warn at 80%`
    Warn {
        /// Share of the limit used.
        at: Spanned<u64>,
    },
    /// `delay 250ms at 95%`
    Delay {
        /// How long to hold the request.
        delay: Spanned<DurationLit>,
        /// Share of the limit used.
        at: Spanned<u64>,
    },
}

/// `on_exceed reject 429 reason "…" ban 15min;`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnExceed {
    /// The status to answer with.
    pub status: Option<Spanned<u64>>,
    /// The reason shown to the client.
    pub reason: Option<Spanned<String>>,
    /// How long the key stays refused after exceeding.
    pub ban: Option<Spanned<DurationLit>>,
}

/// `tiers name { … }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TiersBlock {
    /// The table's name.
    pub name: Ident,
    /// Where the tier of a request comes from.
    pub sources: Vec<Spanned<TierSource>>,
    /// `default name;`
    pub defaults: Vec<Ident>,
    /// The tiers, in order.
    pub tiers: Vec<TierDef>,
    /// The whole block.
    pub span: Span,
}

/// Where a request's tier comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierSource {
    /// `from header("X-Plan");` (believed from trusted proxies only), `from header("X-Plan")
    /// trusted;`, `from claim("plan");`
    Request(ValueSource),
    /// `from cedar annotation "rl_tier" pick highest;`
    CedarAnnotation {
        /// The annotation's name.
        annotation: Spanned<String>,
        /// The action asked about (`for action "x"`); `read` when not named.
        action: Option<Spanned<String>>,
        /// Which value wins when several policies apply.
        pick: Option<Ident>,
    },
}

/// `tier pro extends free { … }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierDef {
    /// The tier's name.
    pub name: Ident,
    /// The tier it inherits entries from.
    pub extends: Option<Ident>,
    /// Its own entries.
    pub entries: Vec<TierEntry>,
    /// The whole definition.
    pub span: Span,
}

/// `api = 600/min burst 100;`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierEntry {
    /// The entry's name.
    pub name: Ident,
    /// Its value.
    pub value: Spanned<RateValue>,
}

/// `limit name { … }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitBlock {
    /// The limit's name.
    pub name: Ident,
    /// Its statements, in order.
    pub stmts: Vec<LimitStmt>,
    /// The whole block.
    pub span: Span,
}

/// A statement inside a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitStmt {
    /// `match { … }`
    Match(Spanned<Vec<Condition>>),
    /// `when …;`
    When(Condition),
    /// Any setting.
    Setting(Setting),
    /// `adaptive gradient { … }`
    Adaptive(Spanned<AdaptiveBlock>),
    /// `admission { … }`
    Admission(Spanned<AdmissionBlock>),
}

/// A condition on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// What it tests.
    pub kind: ConditionKind,
    /// Where it was written.
    pub span: Span,
}

/// How a header or user agent is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `~=` (regular expression)
    Matches,
}

/// The kinds of condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKind {
    /// `a or b or …`
    Or(Vec<Condition>),
    /// `a and b and …`
    And(Vec<Condition>),
    /// `not a`
    Not(Box<Condition>),
    /// `route GET|POST "/t1", "/t2"`
    Route {
        /// Methods; none means every method.
        methods: Vec<Ident>,
        /// Path templates.
        templates: Vec<Spanned<String>>,
    },
    /// `method GET|POST`
    Method(Vec<Ident>),
    /// `host "h"` or `host ~= "re"`
    Host {
        /// Whether the value is a regular expression.
        regex: bool,
        /// The host or the expression.
        value: Spanned<String>,
    },
    /// `header("X")`, `header("X") == "v"`
    Header {
        /// The header's name.
        name: Spanned<String>,
        /// The comparison; none means "present".
        test: Option<(CmpOp, Spanned<String>)>,
    },
    /// `user_agent ~= "re"`
    UserAgent(CmpOp, Spanned<String>),
    /// `ip in [cidr, …]`
    Ip(Vec<Spanned<String>>),
    /// `cedar permits action "a"`
    Cedar(Spanned<String>),
    /// `cedar principal in Role "staff"`: the entity type and id of an ancestor.
    CedarPrincipalIn(Ident, Spanned<String>),
    /// `domain "d"` or `domain ~= "re"`: an Envoy rate-limit request's domain.
    Domain {
        /// Whether the value is a regular expression.
        regex: bool,
        /// The domain or the expression.
        value: Spanned<String>,
    },
    /// `descriptor("k")`, `descriptor("k") == "v"`: an entry of the descriptor, anywhere.
    Descriptor {
        /// The entry's key.
        key: Spanned<String>,
        /// The comparison; none means "present".
        test: Option<(CmpOp, Spanned<String>)>,
    },
    /// `descriptor ["k" == "v", "k2"]`: the descriptor's entries, exactly and in order.
    DescriptorShape(Vec<ShapeEntry>),
}

/// One entry of `descriptor [...]`: its key, and a test of its value if one is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeEntry {
    /// The entry's key.
    pub key: Spanned<String>,
    /// The comparison; none means any value.
    pub test: Option<(CmpOp, Spanned<String>)>,
}

/// `safelist name { … }` or `denylist name { … }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListBlock {
    /// The list's name.
    pub name: Ident,
    /// Any one of these puts a request on the list.
    pub conditions: Vec<Condition>,
    /// `respond 403 reason "…";` (denylists only)
    pub respond: Vec<Spanned<Respond>>,
    /// The whole block.
    pub span: Span,
}

/// `respond 403 reason "…";`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Respond {
    /// The status.
    pub status: Spanned<u64>,
    /// The reason shown to the client.
    pub reason: Option<Spanned<String>>,
}

/// `anomaly name { … }`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnomalyBlock {
    /// The detector's name.
    pub name: Ident,
    /// Its statements, in order.
    pub stmts: Vec<AnomalyStmt>,
    /// The whole block.
    pub span: Span,
}

/// A statement inside an anomaly block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnomalyStmt {
    /// `match { … }`
    Match(Spanned<Vec<Condition>>),
    /// `key …;`
    Key(KeyExpr),
    /// `count when status in [401, 403];`
    Count(Spanned<Vec<Spanned<u64>>>),
    /// `detect …;`
    Detect(Spanned<Detect>),
    /// `then ban 15min, alert "security";`
    Then(Spanned<Vec<ThenAction>>),
}

/// What an anomaly detects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detect {
    /// `detect 10 in 5min`: that many counted responses within the window.
    Count {
        /// How many.
        count: Spanned<u64>,
        /// Within how long.
        window: Spanned<DurationLit>,
    },
    /// `detect rate > 10x baseline over 1min`: a window's count above the key's average.
    Rate {
        /// How many times the baseline.
        factor: Spanned<u64>,
        /// The window counts are compared over.
        window: Spanned<DurationLit>,
    },
    /// `detect distinct header("X-User") > 20 in 10min`: more distinct values than that.
    Distinct {
        /// Where the value comes from.
        source: ValueSource,
        /// How many distinct values are allowed.
        count: Spanned<u64>,
        /// Within how long.
        window: Spanned<DurationLit>,
    },
}

/// What happens when an anomaly is detected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThenAction {
    /// `ban 15min`
    Ban(Spanned<DurationLit>),
    /// `alert "channel"`
    Alert(Spanned<String>),
    /// `flag` or `flag for 1h`
    Flag(Spanned<Option<Spanned<DurationLit>>>),
    /// `tarpit 2s` or `tarpit 2s for 10min`
    Tarpit {
        /// How long each request is held.
        delay: Spanned<DurationLit>,
        /// For how long (`None`: the default).
        lasting: Option<Spanned<DurationLit>>,
    },
}
