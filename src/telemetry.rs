//! Logging: `tracing` to standard error, human-readable or JSON, filtered by `RUST_LOG`
//! (default `info`).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber; a second call does nothing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Lets one log line through per window and counts the others: a failing store logs once
/// per burst, with how many lines it held back, never once per request.
#[derive(Debug)]
pub struct Burst {
    window_micros: u64,
    /// When the next line may go out, in microseconds since the epoch.
    next: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl Burst {
    /// One line per `window`.
    pub fn new(window: std::time::Duration) -> Self {
        Burst {
            window_micros: u64::try_from(window.as_micros()).unwrap_or(u64::MAX),
            next: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log now, mentioning the `n` lines held back since the last one; `None`:
    /// hold this one back.
    pub fn admit(&self, now: crate::Timestamp) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let now = now.as_micros();
        let next = self.next.load(Ordering::Relaxed);
        if now >= next
            && self
                .next
                .compare_exchange(
                    next,
                    now.saturating_add(self.window_micros),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// The span a request is handled in (the layer's): what the application logs while
/// handling the request carries the request id and, once decided, the decision, namespace,
/// limit, tier and hashed key. Disabled, and free, when nothing listens at `info`.
pub fn request_span(request_id: &str, method: &http::Method) -> tracing::Span {
    use tracing::field::Empty;
    tracing::info_span!(
        "request",
        request_id,
        method = method.as_str(),
        route = Empty,
        decision = Empty,
        namespace = Empty,
        limit = Empty,
        tier = Empty,
        key_hash = Empty,
    )
}

/// Records `verdict` in `span` (see [`request_span`]).
pub fn record_verdict(
    span: &tracing::Span,
    verdict: &crate::Verdict,
    request: &crate::RequestCtx,
    hasher: &crate::plan::KeyHasher,
) {
    if span.is_disabled() {
        return;
    }
    if let Some(route) = &request.route_template {
        span.record("route", route.as_str());
    }
    span.record(
        "decision",
        crate::metrics::request_outcome_name(&verdict.action),
    );
    if let Some(headline) = verdict.headline() {
        if let Some(parts) = crate::plan::key::CounterKey::parse(&headline.key) {
            span.record("namespace", parts.namespace);
        }
        span.record("limit", &*headline.limit);
        if let Some(tier) = &headline.tier {
            span.record("tier", &**tier);
        }
        span.record("key_hash", hasher.hash(&headline.key).as_str());
    }
}

/// How long a burst of the same warning is logged once.
pub const BURST_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// One line per decision worth a line: refusals (`reject`, `forbid`, `unauthorized`,
/// `store_error`), soft actions and shadow rejections at `info`, allows at `debug`. The
/// fields: `request_id`, `decision`, `namespace`, `limit`, `tier`, `key_hash` (the keyed
/// hash of the counter key: no client, user or token appears) and `reason`.
pub fn log_verdict(verdict: &crate::Verdict, request_id: &str, hasher: &crate::plan::KeyHasher) {
    use crate::engine::Action;
    // Most requests are allowed, and allows log at debug: no hashing when nobody listens.
    let quiet = matches!(verdict.action, Action::Allow | Action::Bypass { .. })
        && !tracing::enabled!(tracing::Level::DEBUG)
        && verdict.shadow_rejections().next().is_none();
    if quiet {
        return;
    }
    let headline = verdict.headline();
    let key = headline.map(|r| r.key.as_str()).unwrap_or_default();
    let parts = crate::plan::key::CounterKey::parse(key);
    let namespace = parts.map(|p| p.namespace).unwrap_or_default();
    let key_hash = if key.is_empty() {
        String::new()
    } else {
        hasher.hash(key)
    };
    let tier = headline.and_then(|r| r.tier.as_deref()).unwrap_or_default();
    let version = &*verdict.plan_version;
    match &verdict.action {
        Action::Reject { limit, reason, .. } => tracing::info!(
            request_id, decision = "reject", namespace, %limit, tier, key_hash,
            reason = reason.as_deref().unwrap_or_default(), plan = version, "rejected"
        ),
        Action::Forbid { list, reason, .. } => tracing::info!(
            request_id, decision = "forbid", list = %list,
            reason = reason.as_deref().unwrap_or_default(), plan = version, "forbidden"
        ),
        Action::Unauthorized {
            limit, policies, ..
        } => tracing::info!(
            request_id, decision = "unauthorized", %limit, ?policies, plan = version,
            "unauthorized by Cedar"
        ),
        Action::Unavailable { limit } => tracing::info!(
            request_id, decision = "store_error", %limit, plan = version,
            "refused: the store failed and the limit fails closed"
        ),
        Action::Warn | Action::Delay(_) => tracing::info!(
            request_id,
            decision = if matches!(verdict.action, Action::Warn) {
                "warn"
            } else {
                "delay"
            },
            namespace,
            limit = headline.map(|r| &*r.limit).unwrap_or_default(),
            tier,
            key_hash,
            used_percent = headline
                .map(|r| r.decision.used_percent())
                .unwrap_or_default(),
            "soft threshold"
        ),
        Action::Bypass { list } => {
            tracing::debug!(request_id, decision = "bypass", list = %list, "safelisted");
        }
        Action::Allow => tracing::debug!(
            request_id,
            decision = "allow",
            namespace,
            limit = headline.map(|r| &*r.limit).unwrap_or_default(),
            tier,
            key_hash,
            "allowed"
        ),
    }
    for shadow in verdict.shadow_rejections() {
        tracing::info!(
            request_id, decision = "shadow_reject", limit = %shadow.limit,
            key_hash = hasher.hash(&shadow.key), "shadow limit would reject"
        );
    }
}
