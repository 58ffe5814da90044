//! Building conditions (`match` blocks, `when`) and anomaly blocks.

use super::build::{Builder, P, next};
use super::grammar::Rule;
use crate::diagnostic::Span;
use crate::dsl::ast::*;

impl Builder<'_> {
    pub(super) fn match_block(&mut self, pair: P<'_>) -> Spanned<Vec<Condition>> {
        let span = self.span(&pair);
        Spanned::new(pair.into_inner().map(|c| self.condition(c)).collect(), span)
    }

    pub(super) fn condition(&mut self, pair: P<'_>) -> Condition {
        let span = self.span(&pair);
        let rule = pair.as_rule();
        let mut inner = pair.into_inner();
        let kind = match rule {
            Rule::condition | Rule::and_cond => {
                let mut parts: Vec<Condition> = inner.map(|p| self.condition(p)).collect();
                if parts.len() == 1 {
                    return parts.remove(0);
                }
                if rule == Rule::condition {
                    ConditionKind::Or(parts)
                } else {
                    ConditionKind::And(parts)
                }
            }
            Rule::not_cond => ConditionKind::Not(Box::new(self.condition(next(&mut inner)))),
            Rule::route_cond => {
                let mut methods = Vec::new();
                let mut templates = Vec::new();
                for part in inner {
                    if part.as_rule() == Rule::methods {
                        methods = part.into_inner().map(|m| self.ident(m)).collect();
                    } else {
                        templates.push(self.string(part));
                    }
                }
                ConditionKind::Route { methods, templates }
            }
            Rule::method_cond => ConditionKind::Method(
                next(&mut inner)
                    .into_inner()
                    .map(|m| self.ident(m))
                    .collect(),
            ),
            Rule::host_cond => {
                let (regex, value) = self.literal_or_regex(inner);
                ConditionKind::Host { regex, value }
            }
            Rule::domain_cond => {
                let (regex, value) = self.literal_or_regex(inner);
                ConditionKind::Domain { regex, value }
            }
            Rule::header_cond => {
                let (name, test) = self.named_test(inner);
                ConditionKind::Header { name, test }
            }
            Rule::descriptor_cond => {
                let (key, test) = self.named_test(inner);
                ConditionKind::Descriptor { key, test }
            }
            Rule::descriptor_shape => ConditionKind::DescriptorShape(
                inner
                    .map(|entry| {
                        let mut parts = entry.into_inner();
                        let key = self.string(next(&mut parts));
                        let test = parts.next().map(|op| {
                            let op = cmp_op(&op);
                            (op, self.string(next(&mut parts)))
                        });
                        ShapeEntry { key, test }
                    })
                    .collect(),
            ),
            Rule::user_agent_cond => {
                let op = cmp_op(&next(&mut inner));
                ConditionKind::UserAgent(op, self.string(next(&mut inner)))
            }
            Rule::ip_cond => ConditionKind::Ip(
                inner
                    .map(|c| {
                        if c.as_rule() == Rule::string {
                            self.string(c)
                        } else {
                            Spanned::new(c.as_str().to_owned(), self.span(&c))
                        }
                    })
                    .collect(),
            ),
            _ => {
                let test = next(&mut inner);
                let is_permits = test.as_rule() == Rule::cedar_permits;
                let mut parts = test.into_inner();
                if is_permits {
                    ConditionKind::Cedar(self.string(next(&mut parts)))
                } else {
                    let kind = self.ident(next(&mut parts));
                    ConditionKind::CedarPrincipalIn(kind, self.string(next(&mut parts)))
                }
            }
        };
        Condition { kind, span }
    }

    /// `"v"` or `~= "re"`: the value, and whether it is a regular expression.
    fn literal_or_regex(
        &self,
        mut inner: pest::iterators::Pairs<'_, Rule>,
    ) -> (bool, Spanned<String>) {
        let first = next(&mut inner);
        if first.as_rule() == Rule::regex_op {
            (true, self.string(next(&mut inner)))
        } else {
            (false, self.string(first))
        }
    }

    /// `header("X") == "v"`, `descriptor("k")`: the name, and the test if one is written.
    fn named_test(
        &self,
        mut inner: pest::iterators::Pairs<'_, Rule>,
    ) -> (Spanned<String>, Option<(CmpOp, Spanned<String>)>) {
        let name = self.string(next(&mut next(&mut inner).into_inner()));
        let test = inner.next().map(|op| {
            let op = cmp_op(&op);
            (op, self.string(next(&mut inner)))
        });
        (name, test)
    }

    pub(super) fn anomaly(
        &mut self,
        mut inner: pest::iterators::Pairs<'_, Rule>,
        span: Span,
    ) -> AnomalyBlock {
        let name = self.ident(next(&mut inner));
        let stmts = inner
            .map(|part| {
                let pspan = self.span(&part);
                match part.as_rule() {
                    Rule::match_block => AnomalyStmt::Match(self.match_block(part)),
                    Rule::key_stmt => AnomalyStmt::Key(self.key_expr(next(&mut part.into_inner()))),
                    Rule::count_stmt => AnomalyStmt::Count(Spanned::new(
                        part.into_inner().map(|n| self.number(n)).collect(),
                        pspan,
                    )),
                    Rule::detect_stmt => {
                        let detect = next(&mut part.into_inner());
                        let rule = detect.as_rule();
                        let mut parts = detect.into_inner();
                        let detect = match rule {
                            Rule::detect_rate => Detect::Rate {
                                factor: self.number(next(&mut parts)),
                                window: self.duration(next(&mut parts)),
                            },
                            Rule::detect_distinct => Detect::Distinct {
                                source: self.value_source(next(&mut parts)),
                                count: self.number(next(&mut parts)),
                                window: self.duration(next(&mut parts)),
                            },
                            _ => Detect::Count {
                                count: self.number(next(&mut parts)),
                                window: self.duration(next(&mut parts)),
                            },
                        };
                        AnomalyStmt::Detect(Spanned::new(detect, pspan))
                    }
                    _ => AnomalyStmt::Then(Spanned::new(
                        part.into_inner().map(|a| self.then_action(a)).collect(),
                        pspan,
                    )),
                }
            })
            .collect();
        AnomalyBlock { name, stmts, span }
    }

    pub(super) fn then_action(&mut self, action: P<'_>) -> ThenAction {
        let span = self.span(&action);
        let rule = action.as_rule();
        let mut parts = action.into_inner();
        match rule {
            Rule::ban => ThenAction::Ban(self.duration(next(&mut parts))),
            Rule::flag => {
                ThenAction::Flag(Spanned::new(parts.next().map(|d| self.duration(d)), span))
            }
            Rule::tarpit => ThenAction::Tarpit {
                delay: self.duration(next(&mut parts)),
                lasting: parts.next().map(|d| self.duration(d)),
            },
            _ => ThenAction::Alert(self.string(next(&mut parts))),
        }
    }
}

fn cmp_op(pair: &P<'_>) -> CmpOp {
    match pair.as_str() {
        "==" => CmpOp::Eq,
        "!=" => CmpOp::Ne,
        _ => CmpOp::Matches,
    }
}
