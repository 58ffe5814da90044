//! Logging: `tracing` to standard error, human-readable or JSON, filtered by `RUST_LOG`
//! (default `info`); the [`Logs`] observer writes one line per decision worth one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

use crate::clock::Timestamp;
use crate::pipeline::{Admitted, Completion, Observer};
use crate::request::KeyHasher;
use crate::verdict::{Action, Verdict};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

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
    next: AtomicU64,
    suppressed: AtomicU64,
}

impl Burst {
    /// One line per `window`.
    pub fn new(window: Duration) -> Self {
        Burst {
            window_micros: u64::try_from(window.as_micros()).unwrap_or(u64::MAX),
            next: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log now, mentioning the `n` lines held back since the last one; `None`:
    /// hold this one back.
    pub fn admit(&self, now: Timestamp) -> Option<u64> {
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

/// How long a burst of the same warning is logged once.
pub const BURST_WINDOW: Duration = Duration::from_secs(10);

/// The decision log: one line per decision worth a line (see [`log_verdict`]), and a
/// warning when the store fails, once per burst.
#[derive(Debug)]
pub struct Logs {
    hasher: KeyHasher,
    store_failures: Burst,
}

impl Logs {
    /// Logs decisions, hashing their keys with `hasher` (the engine's).
    pub fn new(hasher: KeyHasher) -> Self {
        Logs {
            hasher,
            store_failures: Burst::new(BURST_WINDOW),
        }
    }
}

impl Observer for Logs {
    fn admitted(&self, admitted: &Admitted<'_>) -> Option<Box<dyn Completion>> {
        let verdict = admitted.verdict;
        if let Some(failure) = verdict.store_call.as_ref().and_then(|c| c.error.as_ref()) {
            if failure.circuit_open {
                // The breaker logged when it opened; once per request would flood.
                tracing::debug!(error = %failure.message, "applying each limit's on_store_error");
            } else if let Some(suppressed) = self.store_failures.admit(admitted.now) {
                tracing::warn!(
                    error = %failure.message,
                    suppressed,
                    "counter store failed; applying each limit's on_store_error (`suppressed`: \
                     failures not logged since the last line)"
                );
            }
        }
        log_verdict(verdict, admitted.request_id, &self.hasher);
        None
    }
}

/// One line per decision worth a line: refusals (`reject`, `forbid`, `unauthorized`,
/// `store_error`), soft actions and shadow rejections at `info`, allows at `debug`. The
/// fields: `request_id`, `decision`, `namespace`, `limit`, `tier`, `key_hash` (the keyed
/// hash of the counter key: no client, user or token appears) and `reason`.
pub fn log_verdict(verdict: &Verdict, request_id: &str, hasher: &KeyHasher) {
    // Most requests are allowed, and allows log at debug: no hashing when nobody listens.
    let quiet = matches!(verdict.action, Action::Allow | Action::Bypass { .. })
        && !tracing::enabled!(tracing::Level::DEBUG)
        && verdict.shadow_rejections().next().is_none();
    if quiet {
        return;
    }
    let headline = verdict.headline();
    let namespace = headline.map(|r| r.key.namespace()).unwrap_or_default();
    let key_hash = headline.map(|r| hasher.hash(&r.key)).unwrap_or_default();
    let tier = headline.and_then(|r| r.tier.as_deref()).unwrap_or_default();
    let limit = headline.map(|r| &*r.limit).unwrap_or_default();
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
            decision = verdict.action.outcome().0,
            namespace,
            limit,
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
            limit,
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
