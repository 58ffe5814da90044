//! Envoy's rate-limit requests (gRPC): a limit or an anomaly whose conditions name `domain` or
//! `descriptor` is for them, the others for HTTP requests. What could never hold, or never
//! have a value, for the requests an item is for is a located error: the language accepts
//! nothing that does nothing.

use super::*;
use crate::plan::ValueFrom;

/// Which requests can give a key source a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fits {
    /// HTTP requests only (headers, tokens, paths).
    Http,
    /// Envoy rate-limit requests only (domain, descriptor entries).
    Descriptors,
    /// Both (the client address, the global key).
    Both,
}

fn fits(source: &KeySource) -> Fits {
    match source {
        KeySource::Descriptor { .. } | KeySource::Domain => Fits::Descriptors,
        KeySource::Ip { .. } | KeySource::Global => Fits::Both,
        KeySource::UserId
        | KeySource::ApiToken
        | KeySource::Header { .. }
        | KeySource::Claim(_)
        | KeySource::Query(_)
        | KeySource::Route
        | KeySource::Method
        | KeySource::Host
        | KeySource::Connection => Fits::Http,
    }
}

/// What Envoy sends in place of a condition on HTTP request data, for the help line.
const ENVOY_SENDS: &str = "Envoy sends what it knows of the request as descriptor entries: \
     match them with `descriptor(\"…\")` (the `request_headers`, `header_value_match` and \
     `generic_key` actions write them)";

impl<'a> Compiler<'a> {
    /// Errors for the conditions of an item for Envoy rate-limit requests that test HTTP
    /// request data (route, method, host, headers): they would never hold. `false` when
    /// there was one.
    pub(super) fn descriptor_conditions(
        &mut self,
        f: usize,
        conditions: &[&ast::Condition],
    ) -> bool {
        let mut ok = true;
        for c in conditions {
            ok &= self.descriptor_condition(f, c);
        }
        ok
    }

    fn descriptor_condition(&mut self, f: usize, c: &ast::Condition) -> bool {
        use ast::ConditionKind as K;
        let what = match &c.kind {
            K::Or(parts) | K::And(parts) => {
                let mut ok = true;
                for part in parts {
                    ok &= self.descriptor_condition(f, part);
                }
                return ok;
            }
            K::Not(part) => return self.descriptor_condition(f, part),
            K::Route { .. } => "`route`",
            K::Method(_) => "`method`",
            K::Host { .. } => "`host`",
            K::Header { .. } => "`header(\"…\")`",
            K::UserAgent(..) => "`user_agent`",
            K::Ip(_)
            | K::Cedar(_)
            | K::CedarPrincipalIn(..)
            | K::Domain { .. }
            | K::Descriptor { .. }
            | K::DescriptorShape(_) => return true,
        };
        self.error_help(
            f,
            c.span,
            format!("{what} never holds for an Envoy rate-limit request"),
            "HTTP request data",
            format!(
                "this item is for Envoy rate-limit requests (its conditions name `domain` or \
                 `descriptor`); {ENVOY_SENDS}"
            ),
        );
        false
    }

    /// An error when a part of `key` can never have a value for the requests the item is
    /// for (a `first_of` needs one alternative that can). `false` when there was one.
    pub(super) fn key_fits(
        &mut self,
        f: usize,
        span: Span,
        key: &KeySpec,
        for_descriptors: bool,
    ) -> bool {
        let (wrong, kind, help) = if for_descriptors {
            (
                Fits::Http,
                "an Envoy rate-limit request",
                format!(
                    "this item is for Envoy rate-limit requests (its conditions name `domain` \
                     or `descriptor`): count by `descriptor(\"…\")`, `domain`, `ip` (the \
                     `remote_address` entry) or `global`; {ENVOY_SENDS}"
                ),
            )
        } else {
            (
                Fits::Descriptors,
                "an HTTP request",
                "`descriptor(\"…\")` and `domain` have values only for Envoy rate-limit \
                 requests: name them in the item's conditions (`match { domain \"…\"; }`) to \
                 make it one for those requests"
                    .to_owned(),
            )
        };
        for part in &key.parts {
            let sources: &[KeySource] = match part {
                KeyPart::One(source) => std::slice::from_ref(source),
                KeyPart::FirstOf(sources) => sources,
            };
            if sources.iter().all(|s| fits(s) == wrong) {
                let names: Vec<String> = sources.iter().map(KeySource::describe).collect();
                self.error_help(
                    f,
                    span,
                    format!("`{}` never has a value for {kind}", names.join(" or ")),
                    "no value",
                    help,
                );
                return false;
            }
        }
        true
    }

    /// Errors for what a limit for Envoy rate-limit requests cannot do: hold a concurrency
    /// slot (Envoy never says when the request ends), count messages or bytes, or read its
    /// cost or tier from HTTP request data. `false` when there was one.
    pub(super) fn descriptor_limit(
        &mut self,
        f: usize,
        name: &ast::Ident,
        settings: &Settings<'a>,
        limit: &Limit,
    ) -> bool {
        let mut ok = true;
        let values: &[TierValue] = match &limit.rate {
            LimitRate::Fixed(v) => std::slice::from_ref(v),
            LimitRate::Tiered { values, .. } => values,
        };
        if values
            .iter()
            .any(|v| matches!(v, TierValue::Quota(Quota::Concurrency(_))))
        {
            let span = settings.rate.map_or(name.span, |r| r.span);
            self.error_help(
                f,
                span,
                format!(
                    "limit `{}` is for Envoy rate-limit requests, whose end Envoy never reports: a concurrency slot would never be given back",
                    name.node
                ),
                "concurrency",
                "limit the rate (`rate 100/s;`); Envoy's own `max_requests` circuit breaker caps requests in flight",
            );
            ok = false;
        }
        if limit.counts != Counts::Requests {
            let span = settings.counts.map_or(name.span, |c| c.span);
            self.error_help(
                f,
                span,
                "an Envoy rate-limit request is one request: it has no messages or bytes to count",
                "not requests",
                "remove `counts`; Envoy's `hits_addend` sets what a request costs",
            );
            ok = false;
        }
        if let (Cost::Header { .. }, Some(cost)) = (&limit.cost, settings.cost) {
            self.error_help(
                f,
                cost.span,
                "an Envoy rate-limit request has no headers to read a cost from",
                "HTTP request data",
                "write a fixed cost (`cost 5;`), or let Envoy send `hits_addend`",
            );
            ok = false;
        }
        if let LimitRate::Tiered { table, .. } = &limit.rate
            && let TierSource::Request(from) = &self.tables[*table].table.source
            && !matches!(from, ValueFrom::Descriptor(_))
        {
            let span = settings.rate.map_or(name.span, |r| r.span);
            let table = self.tables[*table].table.name.clone();
            self.error_help(
                f,
                span,
                format!(
                    "tier table `{table}` reads its tier from HTTP request data, which an Envoy rate-limit request does not have"
                ),
                "HTTP request data",
                "read the tier from a descriptor entry in a table of its own: `from descriptor(\"plan\");`",
            );
            ok = false;
        }
        ok
    }

    /// An error for a limit for HTTP requests whose tier table reads a descriptor entry:
    /// every request would get the default tier. `false` when there was one.
    pub(super) fn http_limit_tiers(
        &mut self,
        f: usize,
        name: &ast::Ident,
        settings: &Settings<'a>,
        limit: &Limit,
    ) -> bool {
        let LimitRate::Tiered { table, .. } = &limit.rate else {
            return true;
        };
        let table = &self.tables[*table].table;
        if !matches!(&table.source, TierSource::Request(ValueFrom::Descriptor(_))) {
            return true;
        }
        let message = format!(
            "tier table `{}` reads its tier from a descriptor entry, which an HTTP request does not have",
            table.name
        );
        let span = settings.rate.map_or(name.span, |r| r.span);
        self.error_help(
            f,
            span,
            message,
            "descriptor",
            "use this table in limits whose conditions name `domain` or `descriptor`, or read the tier from a header or a claim",
        );
        false
    }
}

impl<'a> Compiler<'a> {
    /// Every `replaces` names other limits for Envoy rate-limit requests, from one.
    pub(super) fn check_replaces(
        &mut self,
        blocks: &[(usize, &'a ast::LimitBlock)],
        limits: &[Limit],
    ) {
        let for_descriptors = |name: &str| {
            limits
                .iter()
                .find(|l| &*l.name == name)
                .map(|l| l.for_descriptors)
        };
        let known: Vec<&str> = limits
            .iter()
            .filter(|l| l.for_descriptors)
            .map(|l| &*l.name)
            .collect();
        for &(f, block) in blocks {
            let Some(replaces) = block.stmts.iter().find_map(|s| match s {
                ast::LimitStmt::Setting(ast::Setting::Replaces(r)) => Some(r),
                _ => None,
            }) else {
                continue;
            };
            match for_descriptors(&block.name.node) {
                None => continue,
                Some(false) => {
                    self.error_help(
                        f,
                        replaces.span,
                        "`replaces` works across the descriptors of one Envoy rate-limit request",
                        "in a limit for HTTP requests",
                        "name `domain` or `descriptor` in this limit's conditions, or remove `replaces`",
                    );
                    continue;
                }
                Some(true) => {}
            }
            for name in &replaces.node {
                if name.node == block.name.node {
                    self.error_help(
                        f,
                        name.span,
                        format!("limit `{}` replaces itself", name.node),
                        "itself",
                        "name other limits",
                    );
                    continue;
                }
                let written = blocks.iter().any(|(_, b)| b.name.node == name.node);
                match for_descriptors(&name.node) {
                    Some(true) => {}
                    // A limit that did not compile has its own errors.
                    None if written => {}
                    Some(false) => self.error_help(
                        f,
                        name.span,
                        format!("limit `{}` is for HTTP requests", name.node),
                        "not for descriptors",
                        "`replaces` names limits whose conditions name `domain` or `descriptor`",
                    ),
                    None => self.unknown_name(
                        f,
                        name,
                        "limit",
                        "no such limit",
                        &known,
                        "the limits for descriptors are",
                    ),
                }
            }
        }
    }
}

/// The descriptor entries that written conditions name (`descriptor("k")`, `descriptor
/// ["k", …]`), outside `not` and `or`: a request that meets them has these entries.
pub(super) fn entries_named<'c>(conditions: &[&'c ast::Condition]) -> Vec<&'c str> {
    fn walk<'c>(c: &'c ast::Condition, out: &mut Vec<&'c str>) {
        use ast::ConditionKind as K;
        match &c.kind {
            K::And(parts) => parts.iter().for_each(|p| walk(p, out)),
            K::Descriptor { key, test } if !matches!(test, Some((ast::CmpOp::Ne, _))) => {
                out.push(&key.node)
            }
            K::DescriptorShape(entries) => out.extend(entries.iter().map(|e| e.key.node.as_str())),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for c in conditions {
        walk(c, &mut out);
    }
    out
}
