//! The request's span: what the application logs while handling the request carries the
//! request id and, once decided, the decision, namespace, limit, tier and hashed key.

use crate::request::{KeyHasher, RequestCtx};
use crate::verdict::Verdict;

/// The span a request is handled in. Disabled, and free, when nothing listens at `info`.
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
    verdict: &Verdict,
    request: &RequestCtx,
    hasher: &KeyHasher,
) {
    if span.is_disabled() {
        return;
    }
    if let Some(route) = &request.route_template {
        span.record("route", route.as_str());
    }
    span.record("decision", verdict.action.outcome().0);
    if let Some(headline) = verdict.headline() {
        span.record("namespace", headline.key.namespace());
        span.record("limit", &*headline.limit);
        if let Some(tier) = &headline.tier {
            span.record("tier", &**tier);
        }
        span.record("key_hash", hasher.hash(&headline.key).as_str());
    }
}
