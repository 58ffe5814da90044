//! `tollgate explain`: which limits apply to a described request, and why the others do not.
//!
//! Nothing is counted: this reads the plan only.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::limiter::Quota;
use crate::plan::condition::{Env, describe};
use crate::plan::select::{self, Scope, TierReason, choose_tier, focus, select_limits, with_env};
use crate::plan::{Counts, KeyHasher, Limit, LimitRate, MissingKey, Mode, Plan, TierValue};
use crate::request::{RequestCtx, ValueFrom};

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
    /// For a cost its response says (`cost response …`): what the request reserves, and
    /// how what it used is read.
    pub usage: Option<String>,
    /// For an adaptive limit, where it stands on the node that explains (its current
    /// limit, in flight, admission control's refusals); `None` offline.
    pub now: Option<String>,
}

/// Explains `request` against `plan`.
pub fn explain(plan: &Plan, request: &RequestCtx, hasher: &KeyHasher) -> Explanation {
    // The engine's own selection stage, with no time (nothing is cached or counted).
    with_env(plan, request, hasher, Timestamp::from_micros(0), |env| {
        let mut applied = Vec::new();
        let selection = select_limits(plan, env, hasher, Scope::REQUESTS, |s| applied.push(s));
        let (skipped, unauthorized) = match selection {
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
            conditions
                .iter()
                .filter(|c| c.names_descriptor() == env.request.descriptor.is_some())
                .find_map(|c| c.explain(env).ok())
        };
        let selected = Selected {
            applied: &applied,
            skipped: &skipped,
            unauthorized: unauthorized.is_some(),
        };
        Explanation {
            plan_version: Arc::from(plan.version()),
            safelisted: plan
                .safelists
                .iter()
                .find_map(|l| on_list(&l.conditions).map(|why| (Arc::clone(&l.name), why))),
            denylisted: plan.denylists.iter().find_map(|d| {
                on_list(&d.list.conditions).map(|why| (Arc::clone(&d.list.name), why))
            }),
            limits: plan
                .limits
                .iter()
                .map(|limit| explain_limit(plan, limit, env, &selected))
                .collect(),
            unauthorized,
        }
    })
}

/// What the selection stage said of the request.
struct Selected<'s, 'p> {
    applied: &'s [select::Selected<'p>],
    skipped: &'s [&'p Limit],
    unauthorized: bool,
}

/// One limit, in words.
fn explain_limit(
    plan: &Plan,
    limit: &Limit,
    env: &Env<'_>,
    selected: &Selected<'_, '_>,
) -> LimitExplanation {
    focus(plan, limit, env);
    let (tier, value) = match &limit.rate {
        LimitRate::Fixed(v) => (None, *v),
        LimitRate::Tiered {
            table,
            entry,
            values,
        } => {
            let table = &plan.tiers[*table];
            let choice = choose_tier(table, env);
            let tier = format!(
                "`{}` of `{}` ({}), entry `{entry}`",
                table.tiers[choice.index],
                table.name,
                tier_words(&choice.reason, env)
            );
            (Some(tier), values[choice.index])
        }
    };
    let chosen = selected
        .applied
        .iter()
        .find(|s| std::ptr::eq(s.limit, limit));
    let (applies, why) = applies(limit, env, chosen, selected, value);
    LimitExplanation {
        name: Arc::clone(&limit.name),
        mode: limit.mode,
        applies,
        why,
        key: chosen.map(|s| s.key.to_string()),
        tier,
        rate: match (limit.sync, limit.global) {
            (Some(every), _) => format!(
                "{}, local-first (synced every {})",
                describe_value(value),
                human(every)
            ),
            (None, Some(partition)) => format!(
                "{}, across regions (on partition: {})",
                describe_value(value),
                match partition {
                    crate::plan::OnPartition::Share => "share",
                    crate::plan::OnPartition::Local => "local",
                    crate::plan::OnPartition::Deny => "deny",
                }
            ),
            (None, None) => match &limit.adaptive {
                Some(adaptive) => describe_adaptive(adaptive, value),
                None => describe_value(value),
            },
        },
        now: None,
        usage: limit
            .usage
            .as_ref()
            .map(|usage| crate::plan::describe_usage(&limit.cost, usage, env.request)),
        authorization: limit.authorize.as_ref().map(|auth| {
            let answer = env.cedar.answer(env.request, auth.cedar, &auth.action);
            let verdict = if answer.allowed {
                "permits"
            } else {
                "does not permit"
            };
            format!(
                "Cedar {verdict} action `{}` for {} ({})",
                auth.action,
                env.cedar.principal(env.request, auth.cedar),
                describe(&answer)
            )
        }),
    }
}

/// Whether a limit applies, and why, from what the selection did with it.
fn applies(
    limit: &Limit,
    env: &Env<'_>,
    chosen: Option<&select::Selected<'_>>,
    selected: &Selected<'_, '_>,
    value: TierValue,
) -> (bool, String) {
    let missing = || limit.key.missing_part(env.request).unwrap_or_default();
    match (limit.for_descriptors, env.request.descriptor.is_some()) {
        (true, false) => {
            return (
                false,
                "it is for Envoy rate-limit requests (its conditions name `domain` or `descriptor`), not HTTP requests".to_owned(),
            );
        }
        (false, true) => {
            return (
                false,
                "it is for HTTP requests (its conditions name neither `domain` nor `descriptor`)"
                    .to_owned(),
            );
        }
        _ => {}
    }
    match (chosen, limit.condition.explain(env)) {
        (Some(s), Ok(why)) if s.key_missing => {
            let then = match limit.on_missing_key {
                MissingKey::Refuse => "so the request is refused (on_missing_key refuse)",
                _ => "so it counts by client address (on_missing_key ip)",
            };
            let why = format!(
                "{why}; its key has no value ({} is missing), {then}",
                missing()
            );
            (true, why)
        }
        (Some(_), Ok(why) | Err(why)) => (true, why),
        (None, Err(why)) => (false, why),
        (None, Ok(_)) if limit.mode == Mode::Off => (false, "`mode off`".to_owned()),
        (None, Ok(why)) if selected.unauthorized => (
            false,
            format!("{why}; not counted: the request is refused by authorization"),
        ),
        (None, Ok(_)) if selected.skipped.iter().any(|s| std::ptr::eq(*s, limit)) => (
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
    }
}

/// How the selection chose a tier, in words.
fn tier_words(reason: &TierReason<'_>, env: &Env<'_>) -> String {
    let source = |from: &ValueFrom| match from {
        ValueFrom::Header { name, .. } => format!("header `{name}`"),
        ValueFrom::Claim(c) => format!("claim `{c}`"),
        ValueFrom::Descriptor(k) => format!("descriptor entry `{k}`"),
    };
    match reason {
        TierReason::Named(from) => format!("from {}", source(from)),
        TierReason::NotATier(from, named) => format!(
            "the default: {} names `{named}`, which is no tier of the table",
            source(from)
        ),
        TierReason::NotBelieved(name) => format!(
            "the default: header `{name}` is not believed from a client that is not a \
             trusted proxy (add the proxy to trusted_proxies, or write \
             `from header(\"{name}\") trusted`)"
        ),
        TierReason::Missing(from) => format!("the default: {} is missing", source(from)),
        TierReason::Cedar {
            annotation,
            cedar,
            action,
            answer,
        } => {
            let values: Vec<&str> = env
                .cedar
                .set(*cedar)
                .annotations(&answer.policies, annotation)
                .collect();
            if !answer.allowed {
                format!(
                    "the default: Cedar does not permit action `{action}` ({})",
                    describe(answer)
                )
            } else if values.is_empty() {
                format!(
                    "the default: no permitting policy has `@{annotation}` ({})",
                    describe(answer)
                )
            } else {
                format!(
                    "from Cedar annotation `@{annotation}` ({}: {})",
                    describe(answer),
                    values.join(", ")
                )
            }
        }
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

/// An adaptive limit in words: its method and bounds, its admission control, and the rate it
/// also counts, if any.
fn describe_adaptive(adaptive: &crate::plan::adaptive::Adaptive, value: TierValue) -> String {
    use crate::limiter::adaptive::Method;
    let mut parts = Vec::new();
    if value != TierValue::Unlimited {
        parts.push(describe_value(value));
    }
    if let Some(c) = &adaptive.concurrency {
        let method = match c.method {
            Method::Gradient { tolerance, .. } => format!("gradient, tolerance {tolerance}"),
            Method::Gradient2 { tolerance, .. } => format!("gradient2, tolerance {tolerance}"),
            Method::Aimd { backoff, timeout } => {
                format!("aimd, backoff {backoff}, timeout {}", human(timeout))
            }
            Method::Vegas { alpha, beta } => format!("vegas, alpha {alpha}, beta {beta}"),
        };
        parts.push(format!(
            "adaptive concurrency ({method}): starts at {} in flight, within {}–{}, per node",
            c.initial, c.min, c.max
        ));
    }
    if let Some(a) = &adaptive.admission {
        let statuses: Vec<String> = a
            .success
            .iter()
            .map(|&(low, high)| match low == high {
                true => low.to_string(),
                false => format!("{low}–{high}"),
            })
            .collect();
        parts.push(format!(
            "admission control: refuses up to {}% while under {}% of answers over {} succeed (statuses {}), per node",
            a.max_probability * 100.0,
            a.threshold * 100.0,
            human(a.window),
            statuses.join(", ")
        ));
    }
    parts.join("; ")
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
            if let Some(now) = &l.now {
                writeln!(f, "      now   {now}")?;
            }
            if let Some(usage) = &l.usage {
                writeln!(f, "      usage {usage}")?;
            }
        }
        writeln!(f, "\n{} limit(s) do not apply:", skipped.len())?;
        for l in &skipped {
            writeln!(f, "  ✗ {}: {}", l.name, l.why)?;
        }
        Ok(())
    }
}
