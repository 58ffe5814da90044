//! The selection stage: which list or limits apply to one request, each limit with its tier,
//! counter key, cost and quota.
//!
//! A pure function of the plan, the request and the key hasher: no store, no clock, no I/O.
//! The engine counts what it selects and `explain` prints it, so that what `explain` says
//! cannot drift from what the engine does. Cedar conditions, Cedar-chosen tiers and Cedar
//! `forbid` belong here.

use std::sync::Arc;

use smallvec::SmallVec;

use super::condition::Env;
use super::key::{CounterKey, KeySource};
use super::{
    Cost, Counts, DenyRule, KeyHasher, Limit, LimitRate, ListRule, MissingKey, Mode, Pick, Plan,
    PolicyHeaders, TierSource, TierTable, TierValue,
};
use crate::authz::{Answer, Asking};
use crate::clock::Timestamp;
use crate::limiter::Quota;
use crate::request::{LimitOverride, RequestCtx, ValueFrom};

/// Which limits a decision considers.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// Only these limits, whatever their `match` conditions (a route that names its limit in
    /// code); `None`: every limit whose conditions hold.
    pub only: Option<&'a [Arc<str>]>,
    /// What is counted: requests, or the messages or bytes of a stream.
    pub counts: Counts,
    /// The amount of messages or bytes (every limit's cost), for streams.
    pub amount: Option<u64>,
}

impl Scope<'_> {
    /// Every limit that counts requests.
    pub const REQUESTS: Scope<'static> = Scope {
        only: None,
        counts: Counts::Requests,
        amount: None,
    };

    /// Every limit that counts requests, or only the ones `only` names.
    pub fn only(only: Option<&[Arc<str>]>) -> Scope<'_> {
        Scope {
            only,
            counts: Counts::Requests,
            amount: None,
        }
    }
}

/// What selection found for one request.
#[derive(Debug)]
pub enum Selection<'p> {
    /// On a safelist: no limit applies.
    Bypass(&'p ListRule),
    /// On a denylist: refused.
    Forbid(&'p DenyRule),
    /// A limit that applies requires Cedar's permit (`authorize`), and Cedar does not give
    /// it: refused, nothing counted.
    Unauthorized(Unauthorized<'p>),
    /// The limits that apply went to the caller's `each`, in plan order (highest priority
    /// first); these matched but did not apply.
    Limits {
        /// Limits that matched but were skipped (`on_missing_key skip`).
        skipped: Vec<&'p Limit>,
    },
}

/// A limit whose `authorize` Cedar denied.
#[derive(Debug)]
pub struct Unauthorized<'p> {
    /// The limit.
    pub limit: &'p Limit,
    /// The action it asked about.
    pub action: Arc<str>,
    /// Cedar's answer, with the determining policies.
    pub answer: Arc<Answer>,
}

/// One limit that applies, with what the store needs to count it.
#[derive(Debug)]
pub struct Selected<'p> {
    /// The limit.
    pub limit: &'p Limit,
    /// The tier chosen, for tiered limits.
    pub tier: Option<Arc<str>>,
    /// The counter key.
    pub key: CounterKey,
    /// Whether the limit's own key had no value (`on_missing_key` chose the key).
    pub key_missing: bool,
    /// What the limit does with the request.
    pub charge: Charge,
    /// Cedar's answer to the limit's `authorize`, if it has one (a denial here means the
    /// limit is in shadow mode: it is reported, not enforced).
    pub authorization: Option<Arc<Answer>>,
    /// The quota's constant header values.
    pub headers: Option<Arc<PolicyHeaders>>,
}

/// What a selected limit does with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Count `cost` against `quota`.
    Count {
        /// The quota.
        quota: Quota,
        /// What the request costs.
        cost: u64,
    },
    /// Nothing counted in the store: the limit is decided in the node's memory only
    /// (adaptive concurrency, admission control: [`Limit::adaptive`]).
    Node,
    /// Refuse without counting: the tier's value is `blocked`.
    Blocked,
    /// Refuse without counting: the request has no value for the key
    /// (`on_missing_key refuse`).
    Refused,
}

/// The client part of the key of requests with neither a key value nor an address
/// (`on_missing_key ip`).
pub const UNIDENTIFIED: &str = "unidentified";

/// The client part shown for a request refused for having no key value.
const MISSING: &str = "missing";

/// Selects what applies to `request` under `plan`; each limit that applies is handed to
/// `each` as it is found (no list is built or moved: the caller keeps what it needs).
#[inline]
pub fn select<'p>(
    plan: &'p Plan,
    request: &RequestCtx,
    hasher: &KeyHasher,
    now: Timestamp,
    scope: Scope<'_>,
    each: impl FnMut(Selected<'p>),
) -> Selection<'p> {
    with_env(plan, request, hasher, now, |env| {
        select_in(plan, env, hasher, scope, each)
    })
}

/// What conditions need to evaluate `request` under `plan` (the routes matched, Cedar's
/// questions), for `f`.
#[inline]
pub(crate) fn with_env<R>(
    plan: &Plan,
    request: &RequestCtx,
    hasher: &KeyHasher,
    now: Timestamp,
    f: impl FnOnce(&Env<'_>) -> R,
) -> R {
    let routes = plan.routes.matches(&request.path);
    let asking = Asking::new(&plan.cedar, hasher, now.as_micros());
    f(&Env {
        request,
        routes: &routes,
        index: &plan.routes,
        cedar: &asking,
    })
}

/// [`select`] once the environment is built.
#[inline]
fn select_in<'p>(
    plan: &'p Plan,
    env: &Env<'_>,
    hasher: &KeyHasher,
    scope: Scope<'_>,
    each: impl FnMut(Selected<'p>),
) -> Selection<'p> {
    if let Some(list) = plan
        .safelists
        .iter()
        .find(|l| l.conditions.iter().any(|c| c.meets(env)))
    {
        // A safelist lifts limits, not authorization: `authorize` still holds.
        return match authorization_only(plan, env) {
            Some(denied) => Selection::Unauthorized(denied),
            None => Selection::Bypass(list),
        };
    }
    if let Some(deny) = plan
        .denylists
        .iter()
        .find(|d| d.list.conditions.iter().any(|c| c.meets(env)))
    {
        return Selection::Forbid(deny);
    }
    match select_limits(plan, env, hasher, scope, each) {
        Ok(skipped) => Selection::Limits { skipped },
        Err(denied) => Selection::Unauthorized(denied),
    }
}

/// The limits that apply, handed to `each`, and those skipped (returned), lists aside: what
/// [`select`] does past the lists, and what `explain` shows whatever the lists say. Stops at
/// the first enforced limit whose `authorize` Cedar denies.
#[inline]
pub fn select_limits<'p>(
    plan: &'p Plan,
    env: &Env<'_>,
    hasher: &KeyHasher,
    scope: Scope<'_>,
    mut each: impl FnMut(Selected<'p>),
) -> Result<Vec<&'p Limit>, Unauthorized<'p>> {
    let request = env.request;
    let candidates: SmallVec<[usize; 8]> = match scope.only {
        None => plan.routes.candidates(env.routes),
        Some(names) => (0..plan.limits.len())
            .filter(|i| names.contains(&plan.limits[*i].name))
            .collect(),
    };
    let mut skipped = Vec::new();
    for index in candidates {
        let limit = &plan.limits[index];
        if limit.mode == Mode::Off
            || limit.counts != scope.counts
            || limit.for_descriptors != request.descriptor.is_some()
            || request
                .descriptor
                .as_ref()
                .is_some_and(|d| d.replaced.contains(&limit.name))
        {
            continue;
        }
        let route = focus(plan, limit, env);
        if scope.only.is_none() && !limit.condition.eval(env) {
            continue;
        }
        let authorization = limit
            .authorize
            .as_ref()
            .map(|auth| (auth, env.cedar.answer(request, auth.cedar, &auth.action)));
        if let Some((auth, answer)) = &authorization
            && !answer.allowed
            && limit.mode == Mode::Enforce
        {
            return Err(Unauthorized {
                limit,
                action: Arc::clone(&auth.action),
                answer: Arc::clone(answer),
            });
        }
        let (value, tier, position) = tier_value(plan, limit, env);
        let overridden = request.descriptor.as_ref().and_then(|d| d.limit);
        let quota = match value {
            // Nothing to count: only what the node decides, if anything.
            TierValue::Unlimited if limit.adaptive.is_none() => continue,
            TierValue::Unlimited => Ok(None),
            TierValue::Quota(q) => Ok(Some(match overridden {
                Some(o) => q.with_rate(o.requests, o.per_micros),
                None => q,
            })),
            TierValue::Blocked => Err(()),
        };
        let mut refused = false;
        let mut key_missing = false;
        let key = CounterKey::build(&limit.namespace, &limit.name, |out| {
            if limit.key.write(request, route, hasher, out) {
                // An overriding rate counts on a counter of its own.
                if let Some(o) = overridden {
                    write_override(o, out);
                }
                return true;
            }
            key_missing = true;
            match limit.on_missing_key {
                MissingKey::Skip => return false,
                MissingKey::Ip => write_fallback(request, hasher, out),
                MissingKey::Refuse => {
                    out.push_str(MISSING);
                    refused = true;
                }
            }
            true
        });
        let Some(key) = key else {
            skipped.push(limit);
            continue;
        };
        let charge = match quota {
            _ if refused => Charge::Refused,
            Err(()) => Charge::Blocked,
            Ok(None) => Charge::Node,
            Ok(Some(quota)) => Charge::Count {
                quota,
                cost: cost(limit, quota, request, scope.amount),
            },
        };
        each(Selected {
            limit,
            tier,
            key,
            key_missing,
            charge,
            // The plan made the quota's constant headers; an overriding rate has its own.
            headers: match overridden {
                None => limit.headers.get(position).cloned().flatten(),
                Some(_) => None,
            },
            authorization: authorization.map(|(_, answer)| answer),
        });
    }
    Ok(skipped)
}

/// The first enforced limit that applies to `request` whose `authorize` Cedar denies: what
/// still refuses a request that no limit counts (safelisted at run time).
pub fn authorization_only_for<'p>(
    plan: &'p Plan,
    request: &RequestCtx,
    hasher: &KeyHasher,
    now: Timestamp,
) -> Option<Unauthorized<'p>> {
    with_env(plan, request, hasher, now, |env| {
        authorization_only(plan, env)
    })
}

/// The first enforced limit that applies whose `authorize` Cedar denies, for requests no
/// limit counts (safelisted).
fn authorization_only<'p>(plan: &'p Plan, env: &Env<'_>) -> Option<Unauthorized<'p>> {
    plan.routes
        .candidates(env.routes)
        .into_iter()
        .find_map(|index| {
            let limit = &plan.limits[index];
            let auth = limit.authorize.as_ref()?;
            if limit.mode != Mode::Enforce
                || limit.for_descriptors != env.request.descriptor.is_some()
            {
                return None;
            }
            focus(plan, limit, env);
            if !limit.condition.eval(env) {
                return None;
            }
            let answer = env.cedar.answer(env.request, auth.cedar, &auth.action);
            (!answer.allowed).then(|| Unauthorized {
                limit,
                action: Arc::clone(&auth.action),
                answer,
            })
        })
}

/// The route template `limit` matched, made the resource of Cedar's next questions (with
/// the limit's tier in their context).
#[inline]
pub fn focus<'p>(plan: &'p Plan, limit: &Limit, env: &Env<'_>) -> Option<&'p str> {
    let route = limit
        .condition
        .matched_route(env)
        .map(|p| plan.routes.template(p));
    // Without Cedar nobody asks about the resource.
    if !plan.cedar.is_empty() {
        env.cedar.focus(route, context_tier(plan, limit, env));
    }
    route.map(|r| &**r)
}

/// The limit's tier as Cedar's context sees it: known before Cedar is asked, so not when
/// the tier table itself asks Cedar.
fn context_tier(plan: &Plan, limit: &Limit, env: &Env<'_>) -> Option<Arc<str>> {
    let LimitRate::Tiered { table, .. } = &limit.rate else {
        return None;
    };
    let table = &plan.tiers[*table];
    if matches!(table.source, TierSource::CedarAnnotation { .. }) {
        return None;
    }
    Some(Arc::clone(&table.tiers[resolve_tier(table, env)]))
}

/// The limit's value for this request, the tier it came from, and the value's position
/// among the limit's (its headers' too).
fn tier_value(plan: &Plan, limit: &Limit, env: &Env<'_>) -> (TierValue, Option<Arc<str>>, usize) {
    match &limit.rate {
        LimitRate::Fixed(v) => (*v, None, 0),
        LimitRate::Tiered { table, values, .. } => {
            let table = &plan.tiers[*table];
            let t = resolve_tier(table, env);
            (values[t], Some(Arc::clone(&table.tiers[t])), t)
        }
    }
}

/// What one request costs a limit: 1 for concurrency; the stream's amount; the decision
/// API's override; else the limit's own cost.
fn cost(limit: &Limit, quota: Quota, request: &RequestCtx, amount: Option<u64>) -> u64 {
    if matches!(quota, Quota::Concurrency(_)) {
        return 1;
    }
    if limit.usage.as_ref().is_some_and(|u| u.reads_hits()) {
        // Envoy's hits are what the request used, settled after: nothing at admission.
        return 0;
    }
    if let Some(amount) = amount.or(request.cost) {
        return amount;
    }
    match &limit.cost {
        Cost::Fixed(c) => *c,
        Cost::Header { name, default, max } => request
            .header(name)
            .and_then(|v| v.trim().parse::<u64>().ok())
            // A cost is at least 1; a reservation (a usage limit's) may be 0.
            .filter(|c| *c > 0 || limit.usage.is_some())
            .unwrap_or(*default)
            .min(*max),
        Cost::Json { path, default, max } => request
            .body
            .as_deref()
            .and_then(|body| path.amount(body))
            .unwrap_or(*default)
            .min(*max),
    }
}

/// An overriding rate in a key's client part: `;rate=10/60s`.
fn write_override(o: LimitOverride, out: &mut String) {
    let mut digits = itoa::Buffer::new();
    out.push_str(";rate=");
    out.push_str(digits.format(o.requests.get()));
    out.push('/');
    out.push_str(digits.format(o.per_micros.get().div_ceil(1_000_000)));
    out.push('s');
}

/// The client part of a key for a request that has no value for the limit's own key
/// (`on_missing_key ip`): its address, as `key ip` writes it, or one counter for every
/// request whose address is unknown too.
pub(crate) fn write_fallback(request: &RequestCtx, hasher: &KeyHasher, out: &mut String) {
    let by_address = KeySource::Ip { v4: 32, v6: 64 };
    if !by_address.write(request, None, hasher, out) {
        out.push_str(UNIDENTIFIED);
    }
}

/// The request's tier in a table: from its source, else the default.
pub fn resolve_tier(table: &TierTable, env: &Env<'_>) -> usize {
    choose_tier(table, env).index
}

/// A tier chosen for a request, and why.
#[derive(Debug, Clone)]
pub struct TierChoice<'t> {
    /// The tier's index in its table.
    pub index: usize,
    /// How it was chosen.
    pub reason: TierReason<'t>,
}

/// How a request's tier was chosen (what `tollgate explain` puts into words).
#[derive(Debug, Clone)]
pub enum TierReason<'t> {
    /// The request names it (a header, a claim).
    Named(&'t ValueFrom),
    /// The default: the request names something that is no tier of the table.
    NotATier(&'t ValueFrom, String),
    /// The default: the header is there, but not believed from this client.
    NotBelieved(&'t http::HeaderName),
    /// The default: the request has no such header or claim.
    Missing(&'t ValueFrom),
    /// From the annotations of the policies that permit the request; the default when none
    /// names a tier or Cedar does not permit.
    Cedar {
        /// The annotation read.
        annotation: &'t str,
        /// The Cedar policy set asked.
        cedar: usize,
        /// The action asked about.
        action: &'t Arc<str>,
        /// Cedar's answer.
        answer: Arc<Answer>,
    },
}

/// The request's tier in a table, and why (see [`TierReason`]).
pub fn choose_tier<'t>(table: &'t TierTable, env: &Env<'_>) -> TierChoice<'t> {
    let request = env.request;
    match &table.source {
        // From a client that is not a trusted proxy, the plan it claims is not believed.
        TierSource::Request(from) => {
            let (index, reason) = match from.read(request) {
                Some(named) => match table.tier_index(named.trim()) {
                    Some(index) => (index, TierReason::Named(from)),
                    None => (table.default, TierReason::NotATier(from, named.to_owned())),
                },
                None => match from {
                    ValueFrom::Header { name, .. } if request.header(name).is_some() => {
                        (table.default, TierReason::NotBelieved(name))
                    }
                    _ => (table.default, TierReason::Missing(from)),
                },
            };
            TierChoice { index, reason }
        }
        TierSource::CedarAnnotation {
            annotation,
            pick,
            cedar,
            action,
        } => cedar_tier(table, env, annotation, *pick, *cedar, action),
    }
}

/// The tier the annotations of the policies that permit the request name: the highest,
/// lowest or first (in policy order) of those that name a tier of the table.
fn cedar_tier<'t>(
    table: &'t TierTable,
    env: &Env<'_>,
    annotation: &'t str,
    pick: Pick,
    cedar: usize,
    action: &'t Arc<str>,
) -> TierChoice<'t> {
    let answer = env.cedar.answer(env.request, cedar, action);
    let mut index = table.default;
    if answer.allowed {
        let mut named = env
            .cedar
            .set(cedar)
            .annotations(&answer.policies, annotation)
            .filter_map(|value| table.tier_index(value.trim()));
        let chosen = match pick {
            Pick::First => named.next(),
            Pick::Highest => named.max(),
            Pick::Lowest => named.min(),
        };
        index = chosen.unwrap_or(table.default);
    }
    TierChoice {
        index,
        reason: TierReason::Cedar {
            annotation,
            cedar,
            action,
            answer,
        },
    }
}

/// One anomaly watching a request: what its response is counted under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// The anomaly's index in the plan.
    pub anomaly: usize,
    /// The counter key (`{namespace}:{client}:anomaly.{name}`), secrets hashed.
    pub key: CounterKey,
    /// For `detect distinct`: the request's value, hashed (`None` for other detectors).
    pub value: Option<String>,
}

/// The anomalies whose conditions `request` meets and that have a key for it (and, for
/// `detect distinct`, a value): nothing at all for a plan without anomalies.
pub fn watching(
    plan: &Plan,
    request: &RequestCtx,
    hasher: &KeyHasher,
    now: Timestamp,
) -> SmallVec<[Watched; 1]> {
    if plan.anomalies.is_empty() {
        return SmallVec::new();
    }
    with_env(plan, request, hasher, now, |env| {
        plan.anomalies
            .iter()
            .enumerate()
            .filter(|(_, a)| a.condition.meets(env))
            .filter_map(|(i, a)| {
                let route = a
                    .condition
                    .matched_route(env)
                    .map(|p| &**plan.routes.template(p));
                let value = match &a.detector {
                    super::Detector::Distinct { source, .. } => {
                        Some(hasher.hash(source.read(request)?))
                    }
                    _ => None,
                };
                let key = CounterKey::build(&a.namespace, &a.counter, |out| {
                    a.key.write(request, route, hasher, out)
                })?;
                Some(Watched {
                    anomaly: i,
                    key,
                    value,
                })
            })
            .collect()
    })
}

/// What an anomaly's counter keys have in place of a limit's name, before its own name.
pub const ANOMALY_PREFIX: &str = "anomaly.";
