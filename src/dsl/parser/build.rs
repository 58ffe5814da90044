//! Building the AST from pest's pairs: every node with its span.

use pest::Parser as _;
use pest::iterators::Pair;

use super::grammar::{PolicyParser, Rule};
use crate::diagnostic::{PolicyError, SourceFile, Span};
use crate::dsl::ast::*;

/// Lowers pest pairs into the syntax tree; positions are shifted by `base`, the offset of the
/// parsed slice in the file.
pub(super) struct Builder<'a> {
    pub(super) file: &'a SourceFile,
    pub(super) base: usize,
    pub(super) errors: &'a mut Vec<PolicyError>,
}

pub(super) type P<'i> = Pair<'i, Rule>;

impl Builder<'_> {
    pub(super) fn span(&self, pair: &P<'_>) -> Span {
        let s = pair.as_span();
        Span::new(self.base + s.start(), self.base + s.end())
    }

    pub(super) fn ident(&self, pair: P<'_>) -> Ident {
        Spanned::new(pair.as_str().to_owned(), self.span(&pair))
    }

    /// `parents Role from claim("roles");` or `context "client" from header("X-Client");`.
    pub(super) fn import_value(&self, item: P<'_>) -> ImportValue {
        let span = self.span(&item);
        let mut parts = item.into_inner();
        let name = next(&mut parts);
        let name = if name.as_rule() == Rule::string {
            self.string(name)
        } else {
            self.ident(name)
        };
        let source = self.value_source(next(&mut parts));
        ImportValue { name, source, span }
    }

    /// `header("X")`, `header("X") trusted`, `claim("c")` or `descriptor("k")`.
    pub(super) fn value_source(&self, source: P<'_>) -> ValueSource {
        match source.as_rule() {
            Rule::trusted_header => ValueSource::TrustedHeader(
                self.string(next(&mut next(&mut source.into_inner()).into_inner())),
            ),
            Rule::header_ref => ValueSource::Header(self.string(next(&mut source.into_inner()))),
            Rule::descriptor_ref => {
                ValueSource::Descriptor(self.string(next(&mut source.into_inner())))
            }
            _ => ValueSource::Claim(self.string(next(&mut source.into_inner()))),
        }
    }

    pub(super) fn string(&self, pair: P<'_>) -> Spanned<String> {
        let span = self.span(&pair);
        let raw = pair.into_inner().next().map(|p| p.as_str()).unwrap_or("");
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(other) => out.push(other),
                    None => {}
                }
            } else {
                out.push(c);
            }
        }
        Spanned::new(out, span)
    }

    pub(super) fn number(&mut self, pair: P<'_>) -> Spanned<u64> {
        // On overflow, a stand-in that does not set off further complaints (`zero`, say).
        self.integer(
            pair,
            1,
            "is too large",
            format!("the largest number is {}", u64::MAX),
        )
    }

    pub(super) fn signed(&mut self, pair: P<'_>) -> Spanned<i64> {
        let help = format!("numbers range from {} to {}", i64::MIN, i64::MAX);
        self.integer(pair, 0, "is out of range", help)
    }

    /// A whole number with `_` separators; out of range, a problem and `fallback`.
    pub(super) fn integer<T: std::str::FromStr>(
        &mut self,
        pair: P<'_>,
        fallback: T,
        problem: &str,
        help: String,
    ) -> Spanned<T> {
        let span = self.span(&pair);
        let digits: String = pair.as_str().chars().filter(|c| *c != '_').collect();
        let value = digits.parse().unwrap_or_else(|_| {
            let message = format!("number `{}` {problem}", pair.as_str());
            let label = problem.trim_start_matches("is ").to_owned();
            self.errors
                .push(PolicyError::new(self.file, span, message, label).with_help(help));
            fallback
        });
        Spanned::new(value, span)
    }

    pub(super) fn unit(pair: &P<'_>) -> Unit {
        match pair.as_str() {
            "ms" | "millisecond" | "milliseconds" => Unit::Millisecond,
            "s" | "sec" | "second" | "seconds" => Unit::Second,
            "m" | "min" | "minute" | "minutes" => Unit::Minute,
            "h" | "hour" | "hours" => Unit::Hour,
            "d" | "day" | "days" => Unit::Day,
            "w" | "week" | "weeks" => Unit::Week,
            _ => Unit::Month,
        }
    }

    /// `duration` and `period` share a shape: an optional number, then a unit.
    pub(super) fn duration(&mut self, pair: P<'_>) -> Spanned<DurationLit> {
        let span = self.span(&pair);
        let mut amount = 1;
        let mut unit = Unit::Second;
        for part in pair.into_inner() {
            match part.as_rule() {
                Rule::number => amount = self.number(part).node,
                _ => unit = Self::unit(&part),
            }
        }
        Spanned::new(DurationLit { amount, unit }, span)
    }

    pub(super) fn percent(&mut self, pair: P<'_>) -> Spanned<u64> {
        let span = self.span(&pair);
        let value = pair
            .into_inner()
            .next()
            .map(|n| self.number(n).node)
            .unwrap_or(0);
        Spanned::new(value, span)
    }

    pub(super) fn item(&mut self, pair: P<'_>) -> Item {
        let span = self.span(&pair);
        let rule = pair.as_rule();
        let mut inner = pair.into_inner();
        match rule {
            Rule::version_stmt => Item::Version(self.number(next(&mut inner))),
            Rule::namespace_stmt => Item::Namespace(self.string(next(&mut inner))),
            Rule::import_stmt => {
                let cedar = self.string(next(&mut inner));
                let (mut schema, mut namespace, mut entities) = (None, None, None);
                let (mut parents, mut context) = (Vec::new(), Vec::new());
                let (mut principal_type, mut resource_type) = (Vec::new(), Vec::new());
                for part in inner {
                    let rule = part.as_rule();
                    if rule == Rule::import_block {
                        for item in part.into_inner() {
                            match item.as_rule() {
                                Rule::import_principal => {
                                    principal_type.push(self.ident(next(&mut item.into_inner())));
                                }
                                Rule::import_resource => {
                                    resource_type.push(self.ident(next(&mut item.into_inner())));
                                }
                                Rule::import_parents => parents.push(self.import_value(item)),
                                _ => context.push(self.import_value(item)),
                            }
                        }
                        continue;
                    }
                    let value = Some(self.string(next(&mut part.into_inner())));
                    match rule {
                        Rule::import_schema => schema = value,
                        Rule::import_namespace => namespace = value,
                        _ => entities = value,
                    }
                }
                Item::Import(ImportStmt {
                    cedar,
                    schema,
                    namespace,
                    entities,
                    principal_type,
                    resource_type,
                    parents,
                    context,
                    span,
                })
            }
            Rule::key_def => {
                let name = self.ident(next(&mut inner));
                let expr = self.key_expr(next(&mut inner));
                Item::Key(KeyDef { name, expr })
            }
            Rule::defaults_block => Item::Defaults(DefaultsBlock {
                settings: inner.map(|p| self.setting(p)).collect(),
                span,
            }),
            Rule::tiers_block => Item::Tiers(self.tiers(inner, span)),
            Rule::limit_block => {
                let name = self.ident(next(&mut inner));
                let stmts = inner
                    .map(|p| match p.as_rule() {
                        Rule::match_block => LimitStmt::Match(self.match_block(p)),
                        Rule::when_stmt => {
                            LimitStmt::When(self.condition(next(&mut p.into_inner())))
                        }
                        Rule::adaptive_block => LimitStmt::Adaptive(self.adaptive(p)),
                        Rule::admission_block => LimitStmt::Admission(self.admission(p)),
                        _ => LimitStmt::Setting(self.setting(p)),
                    })
                    .collect();
                Item::Limit(LimitBlock { name, stmts, span })
            }
            Rule::safelist_block | Rule::denylist_block => {
                let name = self.ident(next(&mut inner));
                let mut conditions = Vec::new();
                let mut respond = Vec::new();
                for part in inner {
                    if part.as_rule() == Rule::respond_stmt {
                        let rspan = self.span(&part);
                        let mut parts = part.into_inner();
                        let status = self.number(next(&mut parts));
                        let reason = parts.next().map(|r| self.string(next(&mut r.into_inner())));
                        respond.push(Spanned::new(Respond { status, reason }, rspan));
                    } else {
                        conditions.push(self.condition(part));
                    }
                }
                let block = ListBlock {
                    name,
                    conditions,
                    respond,
                    span,
                };
                if rule == Rule::safelist_block {
                    Item::Safelist(block)
                } else {
                    Item::Denylist(block)
                }
            }
            _ => Item::Anomaly(self.anomaly(inner, span)),
        }
    }

    pub(super) fn key_expr(&mut self, pair: P<'_>) -> KeyExpr {
        let span = self.span(&pair);
        let terms = pair
            .into_inner()
            .map(|term| {
                if term.as_rule() == Rule::first_of {
                    let tspan = self.span(&term);
                    let sources = term.into_inner().map(|s| self.key_source(s)).collect();
                    KeyTerm::FirstOf(Spanned::new(sources, tspan))
                } else {
                    KeyTerm::Source(self.key_source(term))
                }
            })
            .collect();
        KeyExpr { terms, span }
    }

    pub(super) fn key_source(&mut self, pair: P<'_>) -> KeySource {
        match pair.as_rule() {
            Rule::header_ref => KeySource::Header(self.string(next(&mut pair.into_inner()))),
            Rule::trusted_header => KeySource::TrustedHeader(
                self.string(next(&mut next(&mut pair.into_inner()).into_inner())),
            ),
            Rule::claim_ref => KeySource::Claim(self.string(next(&mut pair.into_inner()))),
            Rule::query_ref => KeySource::Query(self.string(next(&mut pair.into_inner()))),
            Rule::descriptor_ref => {
                KeySource::Descriptor(self.string(next(&mut pair.into_inner())))
            }
            Rule::ip_prefix => KeySource::IpPrefix(self.number(next(&mut pair.into_inner()))),
            _ => KeySource::Name(self.ident(pair)),
        }
    }

    /// `response json("a") + 4 * header("B") default reserved max 100`
    fn cost_response(&mut self, pair: P<'_>) -> CostExpr {
        let mut terms = Vec::new();
        let (mut default, mut max) = (None, None);
        for p in pair.into_inner() {
            match p.as_rule() {
                Rule::usage_term => {
                    let mut parts = p.into_inner();
                    let first = next(&mut parts);
                    let (weight, source) = if first.as_rule() == Rule::number {
                        (Some(self.number(first)), next(&mut parts))
                    } else {
                        (None, first)
                    };
                    let source = self.amount_source(source);
                    terms.push(UsageTerm { weight, source });
                }
                Rule::usage_default => {
                    let span = self.span(&p);
                    let value = next(&mut p.into_inner());
                    let value = if value.as_rule() == Rule::usage_reserved {
                        UsageDefault::Reserved
                    } else {
                        UsageDefault::Amount(self.number(value).node)
                    };
                    default = Some(Spanned::new(value, span));
                }
                _ => max = Some(self.number(next(&mut p.into_inner()))),
            }
        }
        CostExpr::Response {
            terms,
            default,
            max,
        }
    }

    /// `json("a.b")`, `header("X")` or `hits_addend`.
    fn amount_source(&mut self, pair: P<'_>) -> AmountSource {
        if pair.as_rule() == Rule::hits_ref {
            return AmountSource::Hits(self.span(&pair));
        }
        let is_json = pair.as_rule() == Rule::json_ref;
        let name = self.string(next(&mut pair.into_inner()));
        if is_json {
            AmountSource::Json(name)
        } else {
            AmountSource::Header(name)
        }
    }

    pub(super) fn setting(&mut self, pair: P<'_>) -> Setting {
        let span = self.span(&pair);
        let rule = pair.as_rule();
        let mut inner = pair.into_inner();
        match rule {
            Rule::key_stmt => Setting::Key(self.key_expr(next(&mut inner))),
            Rule::algorithm_stmt => Setting::Algorithm(self.ident(next(&mut inner))),
            Rule::rate_stmt => Setting::Rate(self.rate_value(next(&mut inner))),
            Rule::lease_stmt => Setting::Lease(self.duration(next(&mut inner))),
            Rule::sync_stmt => Setting::Sync(self.duration(next(&mut inner))),
            Rule::global_stmt => Setting::Global(span),
            Rule::on_partition_stmt => Setting::OnPartition(self.ident(next(&mut inner))),
            Rule::replaces_stmt => {
                Setting::Replaces(Spanned::new(inner.map(|p| self.ident(p)).collect(), span))
            }
            Rule::cost_stmt => {
                let part = next(&mut inner);
                let cost = if part.as_rule() == Rule::number {
                    CostExpr::Fixed(self.number(part))
                } else if part.as_rule() == Rule::cost_response {
                    self.cost_response(part)
                } else {
                    let mut parts = part.into_inner();
                    let name = self.string(next(&mut next(&mut parts).into_inner()));
                    let mut default = None;
                    let mut max = None;
                    // `default N` and `max N` keep their keyword in the text before the number.
                    for n in parts {
                        let value = self.number(n.clone());
                        let before = &self.file.text()[..value.span.start];
                        if before.trim_end().ends_with("max") {
                            max = Some(value);
                        } else {
                            default = Some(value);
                        }
                    }
                    CostExpr::Header { name, default, max }
                };
                Setting::Cost(Spanned::new(cost, span))
            }
            Rule::reserve_stmt => {
                let part = next(&mut inner);
                let reserve = if part.as_rule() == Rule::number {
                    ReserveExpr::Fixed(self.number(part))
                } else {
                    let mut parts = part.into_inner();
                    let source = self.amount_source(next(&mut parts));
                    let (mut default, mut max) = (None, None);
                    for p in parts {
                        let is_max = p.as_rule() == Rule::usage_max;
                        let value = Some(self.number(next(&mut p.into_inner())));
                        if is_max {
                            max = value;
                        } else {
                            default = value;
                        }
                    }
                    ReserveExpr::Read {
                        source,
                        default,
                        max,
                    }
                };
                Setting::Reserve(Spanned::new(reserve, span))
            }
            Rule::soft_stmt => {
                let steps = inner
                    .map(|step| {
                        let is_warn = step.as_rule() == Rule::soft_warn;
                        let mut parts = step.into_inner();
                        if is_warn {
                            SoftStep::Warn {
                                at: self.percent(next(&mut parts)),
                            }
                        } else {
                            let delay = self.duration(next(&mut parts));
                            let at = self.percent(next(&mut parts));
                            SoftStep::Delay { delay, at }
                        }
                    })
                    .collect();
                Setting::Soft(Spanned::new(steps, span))
            }
            Rule::on_exceed_stmt => {
                let mut exceed = OnExceed {
                    status: None,
                    reason: None,
                    ban: None,
                };
                for part in inner {
                    match part.as_rule() {
                        Rule::number => exceed.status = Some(self.number(part)),
                        Rule::reason => {
                            exceed.reason = Some(self.string(next(&mut part.into_inner())))
                        }
                        _ => exceed.ban = Some(self.duration(next(&mut part.into_inner()))),
                    }
                }
                Setting::OnExceed(Spanned::new(exceed, span))
            }
            Rule::mode_stmt => Setting::Mode(self.ident(next(&mut inner))),
            Rule::on_store_error_stmt => Setting::OnStoreError(self.ident(next(&mut inner))),
            Rule::on_missing_key_stmt => Setting::OnMissingKey(self.ident(next(&mut inner))),
            Rule::counts_stmt => Setting::Counts(self.ident(next(&mut inner))),
            Rule::authorize_stmt => Setting::Authorize(self.string(next(&mut inner))),
            _ => Setting::Priority(self.signed(next(&mut inner))),
        }
    }

    pub(super) fn rate_value(&mut self, pair: P<'_>) -> Spanned<RateValue> {
        let span = self.span(&pair);
        let rule = pair.as_rule();
        let mut inner = pair.into_inner();
        let value = match rule {
            Rule::unlimited => RateValue::Unlimited,
            Rule::blocked => RateValue::Blocked,
            Rule::concurrent => RateValue::Concurrent(self.number(next(&mut inner))),
            Rule::tier_ref => RateValue::TierRef {
                table: self.ident(next(&mut inner)),
                entry: self.ident(next(&mut inner)),
            },
            _ => {
                let count = self.number(next(&mut inner));
                let period = self.duration(next(&mut inner));
                let burst = inner.next().map(|b| self.number(next(&mut b.into_inner())));
                RateValue::Rate(RateLit {
                    count,
                    period,
                    burst,
                })
            }
        };
        Spanned::new(value, span)
    }

    pub(super) fn tiers(
        &mut self,
        mut inner: pest::iterators::Pairs<'_, Rule>,
        span: Span,
    ) -> TiersBlock {
        let name = self.ident(next(&mut inner));
        let mut block = TiersBlock {
            name,
            sources: Vec::new(),
            defaults: Vec::new(),
            tiers: Vec::new(),
            span,
        };
        for part in inner {
            let pspan = self.span(&part);
            match part.as_rule() {
                Rule::tier_from => {
                    let source = next(&mut part.into_inner());
                    let value = match source.as_rule() {
                        Rule::header_ref
                        | Rule::trusted_header
                        | Rule::claim_ref
                        | Rule::descriptor_ref => TierSource::Request(self.value_source(source)),
                        _ => {
                            let mut parts = source.into_inner();
                            let annotation = self.string(next(&mut parts));
                            let (mut action, mut pick) = (None, None);
                            for part in parts {
                                if part.as_rule() == Rule::cedar_for_action {
                                    action = Some(self.string(next(&mut part.into_inner())));
                                } else {
                                    pick = Some(self.ident(part));
                                }
                            }
                            TierSource::CedarAnnotation {
                                annotation,
                                action,
                                pick,
                            }
                        }
                    };
                    block.sources.push(Spanned::new(value, pspan));
                }
                Rule::tier_default => {
                    block
                        .defaults
                        .push(self.ident(next(&mut part.into_inner())));
                }
                _ => {
                    let mut parts = part.into_inner();
                    let name = self.ident(next(&mut parts));
                    let mut extends = None;
                    let mut entries = Vec::new();
                    for p in parts {
                        if p.as_rule() == Rule::tier_extends {
                            extends = Some(self.ident(next(&mut p.into_inner())));
                        } else {
                            let mut e = p.into_inner();
                            let name = self.ident(next(&mut e));
                            let value = self.rate_value(next(&mut e));
                            entries.push(TierEntry { name, value });
                        }
                    }
                    block.tiers.push(TierDef {
                        name,
                        extends,
                        entries,
                        span: pspan,
                    });
                }
            }
        }
        block
    }
}

/// The next child of a pair. The grammar guarantees it exists wherever this is called; an
/// empty pair would be a grammar bug, and yields an empty placeholder rather than a panic.
pub(super) fn next<'i>(pairs: &mut pest::iterators::Pairs<'i, Rule>) -> P<'i> {
    match pairs.next() {
        Some(p) => p,
        None => unreachable_pair(),
    }
}

#[cold]
fn unreachable_pair() -> P<'static> {
    // Parsing an empty input as EOI always succeeds and gives a pair to stand in.
    match PolicyParser::parse(Rule::EOI, "")
        .ok()
        .and_then(|mut p| p.next())
    {
        Some(p) => p,
        None => unreachable!("EOI matches the empty input"),
    }
}
