//! A limit's other settings: cost, soft thresholds, what happens over the limit, keywords.

use super::*;

impl<'a> Compiler<'a> {
    pub(super) fn cost(
        &mut self,
        f: usize,
        cost: &Spanned<ast::CostExpr>,
        algorithm: Algorithm,
    ) -> Option<Cost> {
        if algorithm.counts_in_flight() {
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
            // Read with its `reserve` (`usage.rs`); here only on a concurrency limit,
            // refused above.
            ast::CostExpr::Response { .. } => None,
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

    pub(super) fn soft(
        &mut self,
        f: usize,
        soft: &Spanned<Vec<ast::SoftStep>>,
    ) -> Option<Vec<SoftStep>> {
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

    pub(super) fn on_exceed(
        &mut self,
        f: usize,
        exceed: &Spanned<ast::OnExceed>,
    ) -> Option<OnExceed> {
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

    pub(super) fn error_status(&mut self, f: usize, status: &Spanned<u64>) -> Option<StatusCode> {
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

    pub(super) fn keyword<T: Copy>(
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
        let intro = format!("`{what}` is one of");
        self.unknown_name(f, ident, what, "not allowed here", &allowed, &intro);
        None
    }

    /// Reports `name` as no `what` of `known`: the closest known name as help, else the list.
    pub(super) fn unknown_name(
        &mut self,
        f: usize,
        name: &ast::Ident,
        what: &str,
        label: &str,
        known: &[&str],
        list_intro: &str,
    ) {
        let help = suggest(&name.node, known)
            .unwrap_or_else(|| format!("{list_intro}: {}", known.join(", ")));
        self.error_help(
            f,
            name.span,
            format!("unknown {what} `{}`", name.node),
            label,
            help,
        );
    }

    /// A keyword setting of a limit, or `default` when it is not set.
    pub(super) fn keyword_or<T: Copy>(
        &mut self,
        f: usize,
        setting: Option<&ast::Ident>,
        what: &str,
        table: Keywords<T>,
        default: T,
    ) -> Option<T> {
        match setting {
            Some(word) => self.keyword(f, word, what, table),
            None => Some(default),
        }
    }
}
