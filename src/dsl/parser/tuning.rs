//! Building the blocks of adaptive limits: `adaptive <method> { … }` and `admission { … }`.

use super::build::{Builder, P, next};
use super::grammar::Rule;
use crate::dsl::ast::*;

impl Builder<'_> {
    /// `adaptive gradient { … }`
    pub(super) fn adaptive(&mut self, pair: P<'_>) -> Spanned<AdaptiveBlock> {
        let span = self.span(&pair);
        let mut inner = pair.into_inner();
        let method = self.ident(next(&mut inner));
        let tuning = inner.map(|t| self.tuning(t)).collect();
        Spanned::new(AdaptiveBlock { method, tuning }, span)
    }

    /// `admission { … }`
    pub(super) fn admission(&mut self, pair: P<'_>) -> Spanned<AdmissionBlock> {
        let span = self.span(&pair);
        let mut block = AdmissionBlock {
            success: None,
            tuning: Vec::new(),
        };
        for part in pair.into_inner() {
            if part.as_rule() == Rule::admission_success {
                let at = self.span(&part);
                let ranges = part
                    .into_inner()
                    .map(|range| {
                        let at = self.span(&range);
                        let mut ends = range.into_inner();
                        let low = self.number(next(&mut ends)).node;
                        let high = ends.next().map_or(low, |n| self.number(n).node);
                        Spanned::new((low, high), at)
                    })
                    .collect();
                block.success = Some(Spanned::new(ranges, at));
            } else {
                block.tuning.push(self.tuning(part));
            }
        }
        Spanned::new(block, span)
    }

    /// `initial 20;`, `tolerance 1.5;`, `smoothing 20%;`, `timeout 500ms;`
    fn tuning(&mut self, pair: P<'_>) -> Tuning {
        let mut inner = pair.into_inner();
        let name = self.ident(next(&mut inner));
        let value = next(&mut inner);
        let span = self.span(&value);
        let value = match value.as_rule() {
            Rule::duration => TuningValue::Duration(self.duration(value).node),
            Rule::percent => TuningValue::Percent(self.percent(value).node),
            Rule::decimal => TuningValue::Decimal(value.as_str().to_owned()),
            _ => TuningValue::Number(self.number(value).node),
        };
        Tuning {
            name,
            value: Spanned::new(value, span),
        }
    }
}
