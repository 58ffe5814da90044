//! Rates and algorithms: what a rate value means for each algorithm, tier values, durations.

use super::*;

impl<'a> Compiler<'a> {
    pub(super) fn implied_algorithm(&self, value: &Spanned<ast::RateValue>) -> Option<Algorithm> {
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

    pub(super) fn limit_rate(
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
    pub(super) fn tier_value(
        &mut self,
        f: usize,
        value: &Spanned<ast::RateValue>,
        algorithm: Option<Algorithm>,
        lease: u64,
        limit: &str,
    ) -> Option<TierValue> {
        // Checks that hold whatever the algorithm come first, so that they are reported even
        // when the algorithm itself is wrong.
        if let ast::RateValue::Rate(rate) = &value.node
            && !self.rate_is_positive(f, rate)
        {
            return None;
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
            ast::RateValue::Rate(rate) => self
                .rate_quota(f, value.span, rate, algorithm, &used_by)
                .map(TierValue::Quota),
        }
    }

    /// A rate's count, period and burst are at least 1.
    fn rate_is_positive(&mut self, f: usize, rate: &ast::RateLit) -> bool {
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
        ok
    }

    /// `N/period` (with its burst) as the quota of a counting algorithm.
    fn rate_quota(
        &mut self,
        f: usize,
        span: Span,
        rate: &ast::RateLit,
        algorithm: Algorithm,
        used_by: &str,
    ) -> Option<Quota> {
        if algorithm == Algorithm::Concurrency {
            self.error_help(
                f,
                span,
                "a concurrency limit takes a count in flight, not a rate",
                "a rate",
                "write `rate 5 concurrent;`",
            );
            return None;
        }
        let count = NonZeroU64::new(rate.count.node)?;
        if let Some(burst) = &rate.burst
            && !matches!(algorithm, Algorithm::TokenBucket | Algorithm::Gcra)
        {
            self.error_help(
                f,
                burst.span,
                "`burst` applies only to `token_bucket` and `gcra`",
                "no burst for this algorithm",
                format!(
                    "{used_by}; for bursts, use `algorithm token_bucket;` or `algorithm gcra;`"
                ),
            );
            return None;
        }
        if algorithm == Algorithm::Calendar {
            return self.calendar_quota(f, rate, count, used_by);
        }
        let window = self.window(f, rate, algorithm)?;
        let micros = window.get();
        match algorithm {
            Algorithm::FixedWindow => Some(Quota::FixedWindow(WindowQuota {
                limit: count,
                window,
            })),
            Algorithm::SlidingWindow => {
                if u128::from(count.get()) * u128::from(micros) >= EXACT_IN_LUA {
                    self.error_help(
                        f,
                        span,
                        "this rate is too large for the sliding window's arithmetic",
                        "too large",
                        "lower the count or the window, or use `fixed_window`",
                    );
                    return None;
                }
                Some(Quota::SlidingWindow(WindowQuota {
                    limit: count,
                    window,
                }))
            }
            _ => self.bucket_quota(f, span, rate, count, window, algorithm),
        }
    }

    /// `N/day` or `N/month` counted per calendar period.
    fn calendar_quota(
        &mut self,
        f: usize,
        rate: &ast::RateLit,
        count: NonZeroU64,
        used_by: &str,
    ) -> Option<Quota> {
        let calendar = match (rate.period.node.amount, rate.period.node.unit) {
            (1, ast::Unit::Day) => CalendarPeriod::Day,
            (1, ast::Unit::Month) => CalendarPeriod::Month,
            _ => {
                self.error_help(
                    f,
                    rate.period.span,
                    "a quota counts per calendar day or month",
                    "not a calendar period",
                    format!("write `/day` or `/month`; {used_by}"),
                );
                return None;
            }
        };
        Some(Quota::Calendar {
            limit: count,
            period: calendar,
        })
    }

    /// The rate's period as a window the algorithm can count: not months, at least 1 ms,
    /// at most what the algorithm supports.
    fn window(
        &mut self,
        f: usize,
        rate: &ast::RateLit,
        algorithm: Algorithm,
    ) -> Option<NonZeroU64> {
        if rate.period.node.unit == ast::Unit::Month {
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
        NonZeroU64::new(micros)
    }

    /// A token bucket or GCRA quota: the burst (else the count) refilled over the window.
    fn bucket_quota(
        &mut self,
        f: usize,
        span: Span,
        rate: &ast::RateLit,
        count: NonZeroU64,
        window: NonZeroU64,
        algorithm: Algorithm,
    ) -> Option<Quota> {
        let capacity = rate
            .burst
            .as_ref()
            .and_then(|b| NonZeroU64::new(b.node))
            .unwrap_or(count);
        let q = BucketQuota::new(capacity, count, window);
        if algorithm == Algorithm::Gcra && q.period.get() < q.count.get() {
            self.error_help(
                f,
                span,
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
                span,
                "the burst and the period are too large together",
                "too large",
                "lower the burst, or express the rate over a shorter period",
            );
            return None;
        }
        Some(match algorithm {
            Algorithm::Gcra => Quota::Gcra(q),
            _ => Quota::TokenBucket(q),
        })
    }

    pub(super) fn duration_micros(
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
}
