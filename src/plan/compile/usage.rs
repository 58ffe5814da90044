//! Costs known after the response: `cost response …` with its `reserve`, checked together.

use super::*;
use crate::json::MAX_SAFE_INTEGER;
use crate::plan::{Amount, Usage};
use crate::request::JsonPath;

/// The most terms a `cost response` adds up.
const MAX_TERMS: usize = 8;

impl<'a> Compiler<'a> {
    /// The limit's cost at admission and, with `cost response`, what is settled after the
    /// response. `None` when something is wrong (reported).
    pub(super) fn costs(
        &mut self,
        f: usize,
        settings: &Settings<'a>,
        algorithm: Option<Algorithm>,
        name: &ast::Ident,
    ) -> Option<(Cost, Option<Arc<Usage>>)> {
        let algorithm = algorithm.unwrap_or(Algorithm::SlidingWindow);
        let response = settings
            .cost
            .filter(|c| matches!(c.node, ast::CostExpr::Response { .. }));
        match (response, settings.reserve) {
            (None, Some(reserve)) => {
                self.error_help(
                    f,
                    reserve.span,
                    format!("limit `{}` reserves, but its cost is not read from the response", name.node),
                    "nothing to settle",
                    "`reserve` is what `cost response …` counts before the response says what was used; without it, write `cost N;` or `cost header(…);`",
                );
                None
            }
            (Some(cost), None) if hits_only(cost) => {
                // Envoy's call once the stream is done says what was used: nothing is
                // counted at admission.
                let usage = self.usage(f, cost)?;
                Some((Cost::Fixed(0), Some(Arc::new(usage))))
            }
            (Some(cost), None) => {
                self.error_help(
                    f,
                    cost.span,
                    format!("limit `{}` reads its cost from the response, but reserves nothing", name.node),
                    "no `reserve`",
                    "add `reserve N;` (or `reserve json(\"max_tokens\") default N max M;`): what is counted at admission, before the response says what was used",
                );
                None
            }
            (Some(cost), Some(reserve)) => {
                if hits_only(cost) {
                    self.error_help(
                        f,
                        reserve.span,
                        format!("limit `{}` counts Envoy's hits_addend: it reserves nothing", name.node),
                        "nothing to settle against",
                        "Envoy's call before the request and its call once the stream is done are separate requests: the second counts what was used, the first (hits_addend 0) only asks; drop `reserve`",
                    );
                    return None;
                }
                if algorithm.counts_in_flight() {
                    // The same problem as any cost on a concurrency limit.
                    return self.cost(f, cost, algorithm).map(|c| (c, None));
                }
                let usage = self.usage(f, cost);
                let reserved = self.reserve(f, reserve);
                Some((reserved?, Some(Arc::new(usage?))))
            }
            (None, None) => {
                let cost = match settings.cost {
                    Some(cost) => self.cost(f, cost, algorithm)?,
                    None => Cost::Fixed(1),
                };
                Some((cost, None))
            }
        }
    }

    /// Whether a cost read from the response can be read for what the limit counts: HTTP
    /// requests (not WebSocket messages or streamed bytes), or — `hits_addend` — Envoy's
    /// descriptors.
    pub(super) fn usage_applies(
        &mut self,
        f: usize,
        at: Span,
        counts: Option<Counts>,
        for_descriptors: bool,
        hits: bool,
    ) -> bool {
        if hits && !for_descriptors {
            self.error_help(
                f,
                at,
                "`hits_addend` is what an Envoy rate-limit request reports",
                "for HTTP requests",
                "match Envoy's requests with `domain` or `descriptor`, or read the response: `json(\"…\")`, `header(\"…\")`",
            );
            return false;
        }
        if hits {
            return true;
        }
        if counts.is_some_and(|c| c != Counts::Requests) {
            self.error_help(
                f,
                at,
                "a cost read from the response applies to limits that count requests",
                "with `counts messages` or `counts bytes`",
                "messages and bytes are counted as they pass; a request's usage is counted when its response says it",
            );
            return false;
        }
        if for_descriptors {
            self.error_help(
                f,
                at,
                "a cost read from the response does not apply to Envoy rate-limit requests",
                "for Envoy's descriptors",
                "Envoy never sends the response: count what its call once the stream is done reports, `cost response hits_addend;`, or read the response where it passes (the layer, `tollgate serve --upstream`)",
            );
            return false;
        }
        true
    }

    fn usage(&mut self, f: usize, cost: &Spanned<ast::CostExpr>) -> Option<Usage> {
        if reads_hits(cost) && !hits_only(cost) {
            self.error_help(
                f,
                cost.span,
                "`hits_addend` is counted alone",
                "with other amounts",
                "Envoy reports one figure, its hits_addend; what a response says is read where the response passes (the layer or the proxy)",
            );
            return None;
        }
        let ast::CostExpr::Response {
            terms,
            default,
            max,
        } = &cost.node
        else {
            return None;
        };
        if terms.len() > MAX_TERMS {
            self.error_help(
                f,
                cost.span,
                format!("a cost adds up at most {MAX_TERMS} amounts"),
                "too many terms",
                "add the amounts up in the upstream, or keep the ones that matter",
            );
            return None;
        }
        let mut ok = true;
        let mut read = Vec::with_capacity(terms.len());
        for term in terms {
            let weight = term.weight.as_ref().map_or(1, |w| w.node);
            if let Some(w) = term.weight.as_ref().filter(|w| w.node == 0) {
                self.error_help(
                    f,
                    w.span,
                    "a weight is at least 1",
                    "zero",
                    "leave out an amount that should not count",
                );
                ok = false;
            }
            match self.amount_source(f, &term.source) {
                Some(source) => read.push((weight, source)),
                None => ok = false,
            }
        }
        let max = match max {
            Some(m) => self.amount_bound(f, m)?,
            None => MAX_SAFE_INTEGER,
        };
        let default = match default.as_ref().map(|d| (d.node, d.span)) {
            None | Some((ast::UsageDefault::Reserved, _)) => None,
            Some((ast::UsageDefault::Amount(n), span)) => {
                if n > max {
                    self.error_help(
                        f,
                        span,
                        format!("the default cost {n} is above the maximum {max}"),
                        "above `max`",
                        "the default cost must be within `max`",
                    );
                    ok = false;
                }
                Some(n)
            }
        };
        ok.then(|| Usage {
            terms: read.into(),
            default,
            max,
        })
    }

    fn reserve(&mut self, f: usize, reserve: &Spanned<ast::ReserveExpr>) -> Option<Cost> {
        match &reserve.node {
            ast::ReserveExpr::Fixed(n) => Some(Cost::Fixed(self.amount_bound(f, n)?)),
            ast::ReserveExpr::Read {
                source,
                default,
                max,
            } => {
                let max = match max {
                    Some(m) => self.amount_bound(f, m)?,
                    None => MAX_SAFE_INTEGER,
                };
                let default = match default {
                    Some(d) if d.node > max => {
                        self.error_help(
                            f,
                            d.span,
                            format!(
                                "the default reservation {} is above the maximum {max}",
                                d.node
                            ),
                            "above `max`",
                            "the default must be within `max`",
                        );
                        return None;
                    }
                    Some(d) => d.node,
                    None => {
                        self.error_help(
                            f,
                            reserve.span,
                            "a reservation read from the request needs a default",
                            "no `default`",
                            "add `default N`: what a request that does not say reserves (for tokens, the largest answer the upstream gives)",
                        );
                        return None;
                    }
                };
                match self.amount_source(f, source)? {
                    Amount::Header(name) => Some(Cost::Header { name, default, max }),
                    Amount::Json(path) => Some(Cost::Json { path, default, max }),
                    // Not in the grammar of `reserve`.
                    Amount::Hits => None,
                }
            }
        }
    }

    fn amount_source(&mut self, f: usize, source: &ast::AmountSource) -> Option<Amount> {
        match source {
            ast::AmountSource::Hits(_) => Some(Amount::Hits),
            ast::AmountSource::Header(name) => self.header_name(f, name).map(Amount::Header),
            ast::AmountSource::Json(path) => match JsonPath::parse(&path.node) {
                Ok(p) => Some(Amount::Json(p)),
                Err(e) => {
                    self.error_help(
                        f,
                        path.span,
                        format!("`{}` is not a field path", path.node),
                        "not a path",
                        format!("{e}, such as \"usage.total_tokens\""),
                    );
                    None
                }
            },
        }
    }

    /// An amount written in a policy, within what every store counts exactly.
    fn amount_bound(&mut self, f: usize, n: &Spanned<u64>) -> Option<u64> {
        if n.node > MAX_SAFE_INTEGER {
            self.error_help(
                f,
                n.span,
                format!("{} is above the largest amount, {MAX_SAFE_INTEGER}", n.node),
                "too large",
                "amounts are counted exactly up to 2^53 − 1",
            );
            return None;
        }
        Some(n.node)
    }
}

/// Whether `cost response …` has a `hits_addend` term.
fn reads_hits(cost: &Spanned<ast::CostExpr>) -> bool {
    match &cost.node {
        ast::CostExpr::Response { terms, .. } => terms
            .iter()
            .any(|t| matches!(t.source, ast::AmountSource::Hits(_))),
        _ => false,
    }
}

/// Whether `cost response …`'s terms are all `hits_addend`.
fn hits_only(cost: &Spanned<ast::CostExpr>) -> bool {
    match &cost.node {
        ast::CostExpr::Response { terms, .. } => terms
            .iter()
            .all(|t| matches!(t.source, ast::AmountSource::Hits(_))),
        _ => false,
    }
}
