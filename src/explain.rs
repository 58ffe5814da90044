//! `tollgate explain`: which limits apply to a described request, and why the others do not.
//!
//! Nothing is counted: this reads the plan only.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::authz::Asking;
use crate::limiter::Quota;
use crate::plan::ValueFrom;
use crate::plan::condition::Env;
use crate::plan::condition::describe;
use crate::plan::select::{Scope, focus, resolve_tier, select_limits};
use crate::plan::{Counts, KeyHasher, LimitRate, MissingKey, Mode, Plan, TierSource, TierValue};
use crate::request::RequestCtx;

/// The explanation for one request.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The plan version explained.
    pub plan_version: Arc<str>,
    /// The safelist the request is on, with the reason.
    pub safelisted: Option<(Arc<str>, String)>,
    /// The denylist the request is on, with the reason.
    pub denylisted: Option<(Arc<str>, String)>,
    /// The limit whose `authorize` Cedar denies, with Cedar's answer in words: the request
    /// is refused with 403 and nothing is counted.
    pub unauthorized: Option<(Arc<str>, String)>,
    /// Every limit of the plan, highest priority first.
    pub limits: Vec<LimitExplanation>,
}

/// One limit, for one request.
#[derive(Debug, Clone)]
pub struct LimitExplanation {
    /// The limit.
    pub name: Arc<str>,
    /// Its mode.
    pub mode: Mode,
    /// Whether it applies.
    pub applies: bool,
    /// Why it applies or not.
    pub why: String,
    /// The counter key it would use.
    pub key: Option<String>,
    /// The tier chosen and how.
    pub tier: Option<String>,
    /// The rate it would count against.
    pub rate: String,
    /// Cedar's answer to its `authorize`, in words, if it has one.
    pub authorization: Option<String>,
}

/// Explains `request` against `plan`.
pub fn explain(plan: &Plan, request: &RequestCtx, hasher: &KeyHasher) -> Explanation {
    let routes = plan.routes.matches(&request.path);
    let asking = Asking::new(&plan.cedar, hasher, 0);
    let env = Env {
        request,
        routes: &routes,
        index: &plan.routes,
        cedar: &asking,
    };
    let mut applied = Vec::new();
    let (skipped, unauthorized) =
        match select_limits(plan, &env, hasher, Scope::REQUESTS, |s| applied.push(s)) {
            Ok(skipped) => (skipped, None),
            Err(denied) => {
                let why = format!(
                    "Cedar does not permit action `{}`: {}",
                    denied.action,
                    describe(&denied.answer)
                );
                (Vec::new(), Some((Arc::clone(&denied.limit.name), why)))
            }
        };
    let on_list = |conditions: &[crate::plan::Condition]| {
        conditions.iter().find_map(|c| c.explain(&env).ok())
    };
    let safelisted = plan
        .safelists
        .iter()
        .find_map(|l| on_list(&l.conditions).map(|why| (Arc::clone(&l.name), why)));
    let denylisted = plan
        .denylists
        .iter()
        .find_map(|d| on_list(&d.list.conditions).map(|why| (Arc::clone(&d.list.name), why)));
    let limits = plan
        .limits
        .iter()
        .map(|limit| {
            focus(plan, limit, &env);
            let authorization = limit.authorize.as_ref().map(|auth| {
                let answer = env.cedar.answer(request, auth.cedar, &auth.action);
                let verdict = if answer.allowed {
                    "permits"
                } else {
                    "does not permit"
                };
                format!(
                    "Cedar {verdict} action `{}` for {} ({})",
                    auth.action,
                    env.cedar.principal(request, auth.cedar),
                    describe(&answer)
                )
            });
            let (tier, value) = match &limit.rate {
                LimitRate::Fixed(v) => (None, *v),
                LimitRate::Tiered {
                    table,
                    entry,
                    values,
                } => {
                    let table = &plan.tiers[*table];
                    let t = resolve_tier(table, &env);
                    let how = match &table.source {
                        TierSource::Request(ValueFrom::Header { name, trusted })
                            if request.header(name).is_some()
                                && (*trusted || request.headers_trusted) =>
                        {
                            format!("from header `{name}`")
                        }
                        TierSource::Request(ValueFrom::Header { name, .. })
                            if request.header(name).is_some() =>
                        {
                            format!(
                                "the default: header `{name}` is not believed from a client \
                                 that is not a trusted proxy (add the proxy to \
                                 trusted_proxies, or write `from header(\"{name}\") trusted`)"
                            )
                        }
                        TierSource::Request(ValueFrom::Header { name, .. }) => {
                            format!("the default: header `{name}` is missing")
                        }
                        TierSource::Request(ValueFrom::Claim(c))
                            if request.claims.contains_key(&**c) =>
                        {
                            format!("from claim `{c}`")
                        }
                        TierSource::Request(ValueFrom::Claim(c)) => {
                            format!("the default: claim `{c}` is missing")
                        }
                        TierSource::CedarAnnotation {
                            annotation,
                            cedar,
                            action,
                            ..
                        } => {
                            let answer = env.cedar.answer(request, *cedar, action);
                            let values: Vec<&str> = env
                                .cedar
                                .set(*cedar)
                                .annotations(&answer.policies, annotation)
                                .collect();
                            if !answer.allowed {
                                format!(
                                    "the default: Cedar does not permit action `{action}` ({})",
                                    describe(&answer)
                                )
                            } else if values.is_empty() {
                                format!(
                                    "the default: no permitting policy has `@{annotation}` ({})",
                                    describe(&answer)
                                )
                            } else {
                                format!(
                                    "from Cedar annotation `@{annotation}` ({}: {})",
                                    describe(&answer),
                                    values.join(", ")
                                )
                            }
                        }
                    };
                    let tier = format!(
                        "`{}` of `{}` ({how}), entry `{entry}`",
                        table.tiers[t], table.name
                    );
                    (Some(tier), values[t])
                }
            };
            // Whether it applies, and its key, come from the engine's own selection.
            let selected = applied.iter().find(|s| std::ptr::eq(s.limit, limit));
            let missing = || limit.key.missing_part(request).unwrap_or_default();
            let (applies, why) = match (selected, limit.condition.explain(&env)) {
                (Some(s), Ok(why)) if s.key_missing => {
                    let then = match limit.on_missing_key {
                        MissingKey::Refuse => "so the request is refused (on_missing_key refuse)",
                        _ => "so it counts by client address (on_missing_key ip)",
                    };
                    (
                        true,
                        format!(
                            "{why}; its key has no value ({} is missing), {then}",
                            missing()
                        ),
                    )
                }
                (Some(_), Ok(why)) => (true, why),
                (Some(_), Err(why)) => (true, why),
                (None, Err(why)) => (false, why),
                (None, Ok(_)) if limit.mode == Mode::Off => (false, "`mode off`".to_owned()),
                (None, Ok(why)) if unauthorized.is_some() => (
                    false,
                    format!("{why}; not counted: the request is refused by authorization"),
                ),
                (None, Ok(_)) if skipped.iter().any(|s| std::ptr::eq(*s, limit)) => (
                    false,
                    format!(
                        "its key has no value: {} is missing (on_missing_key skip)",
                        missing()
                    ),
                ),
                (None, Ok(_)) if value == TierValue::Unlimited => {
                    (false, "the tier is unlimited".to_owned())
                }
                (None, Ok(_)) => (
                    false,
                    format!(
                        "it counts {} (a stream's), not requests",
                        counts_name(limit.counts)
                    ),
                ),
            };
            let key = selected.map(|s| s.key.to_string());
            LimitExplanation {
                name: Arc::clone(&limit.name),
                mode: limit.mode,
                applies,
                why,
                key,
                tier,
                rate: match limit.sync {
                    Some(every) => format!(
                        "{}, local-first (synced every {})",
                        describe_value(value),
                        human(every)
                    ),
                    None => describe_value(value),
                },
                authorization,
            }
        })
        .collect();
    Explanation {
        plan_version: Arc::clone(&plan.version),
        safelisted,
        denylisted,
        unauthorized,
        limits,
    }
}

fn counts_name(counts: Counts) -> &'static str {
    match counts {
        Counts::Requests => "requests",
        Counts::Messages => "messages",
        Counts::Bytes => "bytes",
    }
}

/// A rate in words: `60 per 1m (sliding_window)`.
pub fn describe_value(value: TierValue) -> String {
    match value {
        TierValue::Unlimited => "unlimited".to_owned(),
        TierValue::Blocked => "blocked: every request is refused".to_owned(),
        TierValue::Quota(q) => describe_quota(&q),
    }
}

fn describe_quota(q: &Quota) -> String {
    let per = |micros: u64| human(Duration::from_micros(micros));
    match q {
        Quota::FixedWindow(w) | Quota::SlidingWindow(w) => {
            format!(
                "{} per {} ({})",
                w.limit,
                per(w.window.get()),
                q.algorithm()
            )
        }
        Quota::TokenBucket(b) | Quota::Gcra(b) => {
            // The rate is kept in lowest terms (30/min is 1 per 2s); show it per the
            // shortest whole unit it fills instead.
            let (count, period) = [1_000_000u64, 60_000_000, 3_600_000_000, 86_400_000_000]
                .into_iter()
                .map(|unit| (u128::from(b.count.get()) * u128::from(unit), unit))
                .find(|(scaled, _)| scaled % u128::from(b.period.get()) == 0)
                .map_or(
                    (u128::from(b.count.get()), b.period.get()),
                    |(scaled, unit)| (scaled / u128::from(b.period.get()), unit),
                );
            format!(
                "{count} per {}, burst {} ({})",
                per(period),
                b.capacity,
                q.algorithm()
            )
        }
        Quota::Concurrency(c) => format!("{} in flight, lease {}", c.max, per(c.lease.get())),
        Quota::Calendar { limit, period } => {
            format!("{limit} per calendar {period:?} (UTC)").to_lowercase()
        }
    }
}

fn human(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        _ if ms.is_multiple_of(86_400_000) => format!("{}d", ms / 86_400_000),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}min", ms / 60_000),
        _ if ms.is_multiple_of(1_000) => format!("{}s", ms / 1_000),
        _ if d.as_micros().is_multiple_of(1_000) => format!("{ms}ms"),
        _ => format!("{}µs", d.as_micros()),
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "plan {}", self.plan_version)?;
        if let Some((list, why)) = &self.safelisted {
            writeln!(f, "safelisted by `{list}`: {why}; no limit applies")?;
        }
        if let Some((list, why)) = &self.denylisted {
            writeln!(f, "denylisted by `{list}`: {why}; the request is refused")?;
        }
        if let Some((limit, why)) = &self.unauthorized {
            writeln!(
                f,
                "unauthorized by limit `{limit}`: {why}; the request is refused with 403"
            )?;
        }
        let (applies, skipped): (Vec<_>, Vec<_>) = self.limits.iter().partition(|l| l.applies);
        writeln!(f, "\n{} limit(s) apply:", applies.len())?;
        for l in &applies {
            let shadow = if l.mode == Mode::Shadow {
                " [shadow]"
            } else {
                ""
            };
            writeln!(f, "  ✓ {}{shadow}: {}", l.name, l.rate)?;
            writeln!(f, "      because {}", l.why)?;
            if let Some(key) = &l.key {
                writeln!(f, "      key   {key}")?;
            }
            if let Some(tier) = &l.tier {
                writeln!(f, "      tier  {tier}")?;
            }
            if let Some(authorization) = &l.authorization {
                writeln!(f, "      authz {authorization}")?;
            }
        }
        writeln!(f, "\n{} limit(s) do not apply:", skipped.len())?;
        for l in &skipped {
            writeln!(f, "  ✗ {}: {}", l.name, l.why)?;
        }
        Ok(())
    }
}
