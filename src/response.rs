//! What a verdict looks like in HTTP: rate-limit headers, `Retry-After`, the unified
//! RFC 9457 `application/problem+json` body, and refusals for HTTP and gRPC clients. Shared
//! by the middleware, the decision API and forward-auth, so that every way of running
//! Tollgate answers alike.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde::Serialize;

use crate::request::X_REQUEST_ID;
use crate::verdict::{Action, LimitReport, Verdict};

/// `X-RateLimit-Limit`
pub static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining`
pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `X-RateLimit-Reset` (seconds until the quota is whole again)
pub static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers)
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers)
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `Tollgate-Warning`: a soft threshold was crossed.
pub static TOLLGATE_WARNING: HeaderName = HeaderName::from_static("tollgate-warning");

/// Which header families to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderFamilies {
    /// `X-RateLimit-Limit`, `-Remaining`, `-Reset`.
    pub legacy: bool,
    /// `RateLimit-Policy` and `RateLimit`.
    pub ietf: bool,
}

impl Default for HeaderFamilies {
    fn default() -> Self {
        HeaderFamilies {
            legacy: true,
            ietf: true,
        }
    }
}

/// `n` as a header value: for the small numbers most headers carry (seconds to a reset,
/// what is left of a quota), one made once and shared, without an allocation.
fn number(n: u64) -> HeaderValue {
    /// Values below this are kept.
    const KEPT: usize = 1024;
    static SMALL: std::sync::LazyLock<Vec<HeaderValue>> = std::sync::LazyLock::new(|| {
        (0..KEPT)
            .map(|n| {
                // Made once per process: static bytes are shared without a count.
                let text: &'static str = Box::leak(n.to_string().into_boxed_str());
                HeaderValue::from_static(text)
            })
            .collect()
    });
    match usize::try_from(n).ok().and_then(|i| SMALL.get(i)) {
        Some(value) => value.clone(),
        None => HeaderValue::from(n),
    }
}

/// Whole seconds, rounded up: a client that waits this long is not early.
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_micros().div_ceil(1_000_000) as u64
}

/// The rate-limit headers for a verdict: the headline limit's figures, `Retry-After` on a
/// refusal, and `Tollgate-Warning` past a soft threshold.
pub fn rate_limit_headers(verdict: &Verdict, families: HeaderFamilies) -> HeaderMap {
    let mut headers = HeaderMap::new();
    write_rate_limit_headers(verdict, families, &mut headers);
    headers
}

/// Writes the headers of [`rate_limit_headers`] into `headers`, replacing any of the same
/// name.
pub fn write_rate_limit_headers(
    verdict: &Verdict,
    families: HeaderFamilies,
    headers: &mut HeaderMap,
) {
    let num = number;
    // Up to six more headers: grow the map once.
    headers.reserve(6);
    if let Some(report) = verdict.headline() {
        let d = &report.decision;
        let reset = ceil_secs(d.reset);
        // The quota's own values were made with the plan; a report without them (a
        // limit refused without counting) has them made here.
        let made = report.headers.clone();
        if families.legacy {
            let limit = made
                .as_ref()
                .map_or_else(|| num(d.limit), |h| h.limit.clone());
            headers.insert(X_RATELIMIT_LIMIT.clone(), limit);
            headers.insert(X_RATELIMIT_REMAINING.clone(), num(d.remaining));
            headers.insert(X_RATELIMIT_RESET.clone(), num(reset));
        }
        if families.ietf {
            // `"name";q=100;w=60` and `"name";r=42;t=17`, written without `format!` (these
            // two headers are on every response).
            let item = |a: &str, x: u64, b: &str, y: u64| {
                let mut digits = itoa::Buffer::new();
                let mut v = String::with_capacity(report.limit.len() + 32);
                v.push('"');
                v.push_str(&report.limit);
                v.push_str(a);
                v.push_str(digits.format(x));
                v.push_str(b);
                v.push_str(digits.format(y));
                HeaderValue::try_from(v)
            };
            let (q, w) = report.policy;
            let policy = match made {
                Some(h) => Ok(h.policy.clone()),
                None => item("\";q=", q, ";w=", w),
            };
            if let (Ok(p), Ok(c)) = (policy, item("\";r=", d.remaining, ";t=", reset)) {
                headers.insert(RATELIMIT_POLICY.clone(), p);
                headers.insert(RATELIMIT.clone(), c);
            }
        }
    }
    match &verdict.action {
        Action::Reject {
            retry_after: Some(wait),
            ..
        }
        | Action::Forbid {
            retry_after: Some(wait),
            ..
        } => {
            headers.insert(http::header::RETRY_AFTER, num(ceil_secs(*wait).max(1)));
        }
        Action::Unavailable { .. } => {
            headers.insert(http::header::RETRY_AFTER, num(1));
        }
        Action::Warn | Action::Delay(_) => {
            if let Some(report) = verdict.headline()
                && let Ok(v) = HeaderValue::from_str(&format!(
                    "\"{}\";used={}",
                    report.limit,
                    report.decision.used_percent()
                ))
            {
                headers.insert(TOLLGATE_WARNING.clone(), v);
            }
        }
        _ => {}
    }
}

/// An RFC 9457 problem document, with Tollgate's extension members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// A short summary of the kind.
    pub title: &'static str,
    /// The HTTP status.
    pub status: u16,
    /// What happened to this request.
    pub detail: String,
    /// The limit or list that decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// What is left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// Seconds until the quota is whole again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset: Option<u64>,
    /// Seconds until the same request would be allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// The policy's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The request field that is invalid, for `400` answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The Cedar policies that decided a `403` for authorization (the `forbid`s; empty when
    /// no policy permits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub determining_policies: Option<Vec<String>>,
    /// The request's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl Problem {
    /// A problem with only the RFC 9457 members.
    pub fn new(
        kind: &'static str,
        title: &'static str,
        status: StatusCode,
        detail: String,
    ) -> Self {
        Problem {
            kind,
            title,
            status: status.as_u16(),
            detail,
            policy: None,
            limit: None,
            remaining: None,
            reset: None,
            retry_after: None,
            reason: None,
            field: None,
            determining_policies: None,
            request_id: None,
        }
    }

    /// A `400 Bad Request` problem.
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Problem::new(
            "urn:tollgate:problem:invalid-request",
            "Bad Request",
            StatusCode::BAD_REQUEST,
            detail.into(),
        )
    }

    /// The body as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// The status, as a code.
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// A response carrying `problem`, with its status and the request's id.
pub fn problem_response(
    mut problem: Problem,
    request_id: &str,
) -> http::Response<axum::body::Body> {
    problem.request_id = Some(request_id.to_owned());
    let mut response = http::Response::new(axum::body::Body::from(problem.to_json()));
    *response.status_mut() = problem.status_code();
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID.clone(), id);
    }
    response
}

/// The problem for a refused request, or `None` when the request goes on.
pub fn problem(verdict: &Verdict, request_id: Option<&str>) -> Option<Problem> {
    let mut problem = match &verdict.action {
        Action::Allow | Action::Warn | Action::Delay(_) | Action::Bypass { .. } => return None,
        Action::Reject {
            status,
            limit,
            reason,
            retry_after,
        } => rejected(verdict.headline(), *status, limit, reason, *retry_after),
        Action::Forbid {
            status,
            list,
            reason,
            retry_after,
        } => {
            let detail = reason
                .as_deref()
                .map_or_else(|| format!("refused by `{list}`"), str::to_owned);
            let mut p = Problem::new(
                "urn:tollgate:problem:forbidden",
                title(*status),
                *status,
                detail,
            );
            p.policy = Some(list.to_string());
            p.reason = reason.as_deref().map(str::to_owned);
            p.retry_after = retry_after.map(|w| ceil_secs(w).max(1));
            p
        }
        Action::Unauthorized {
            limit,
            action,
            policies,
        } => unauthorized(limit, action, policies),
        Action::Unavailable { limit } => {
            let mut p = Problem::new(
                "urn:tollgate:problem:store-unavailable",
                "Service Unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the rate-limit store is unavailable and limit `{limit}` fails closed"),
            );
            p.policy = Some(limit.to_string());
            p.retry_after = Some(1);
            p
        }
    };
    problem.request_id = request_id.map(str::to_owned);
    Some(problem)
}

/// The problem of a request over `limit`, with the figures of its `report`.
fn rejected(
    report: Option<&LimitReport>,
    status: StatusCode,
    limit: &str,
    reason: &Option<Arc<str>>,
    retry_after: Option<Duration>,
) -> Problem {
    let banned = report.is_some_and(|r| r.banned);
    let detail = match (reason, retry_after) {
        (Some(reason), _) => reason.to_string(),
        (None, _) if banned => format!("temporarily banned by limit `{limit}`"),
        (None, Some(wait)) => format!(
            "limit `{limit}` exceeded; retry in {}s",
            ceil_secs(wait).max(1)
        ),
        (None, None) => format!("limit `{limit}` refuses this request"),
    };
    let mut p = Problem::new(
        "urn:tollgate:problem:rate-limited",
        title(status),
        status,
        detail,
    );
    p.policy = Some(limit.to_owned());
    if let Some(r) = report {
        p.limit = Some(r.decision.limit);
        p.remaining = Some(r.decision.remaining);
        p.reset = Some(ceil_secs(r.decision.reset));
    }
    p.retry_after = retry_after.map(|w| ceil_secs(w).max(1));
    p.reason = reason.as_deref().map(str::to_owned);
    p
}

/// The problem of a request Cedar does not permit for `limit`'s `authorize`.
fn unauthorized(limit: &str, action: &str, policies: &[Arc<str>]) -> Problem {
    let because = match policies {
        [] => "no policy permits it".to_owned(),
        ids => format!(
            "forbidden by {}",
            ids.iter()
                .map(|id| format!("`{id}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut p = Problem::new(
        "urn:tollgate:problem:unauthorized",
        "Forbidden",
        StatusCode::FORBIDDEN,
        format!("limit `{limit}` requires Cedar's permit for action `{action}`: {because}"),
    );
    p.policy = Some(limit.to_owned());
    p.determining_policies = Some(policies.iter().map(|id| id.to_string()).collect());
    p
}

fn title(status: StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("Refused")
}

// ─── refusals: HTTP and gRPC ─────────────────────────────────────────────────────────────

/// The gRPC status for a refusal: `RESOURCE_EXHAUSTED` (8) for a rate limit,
/// `PERMISSION_DENIED` (7) for a denylist, `UNAVAILABLE` (14) when the store fails closed;
/// other statuses a policy chose map as gRPC's HTTP-to-status table does.
pub fn grpc_status(verdict: &Verdict, status: http::StatusCode) -> u8 {
    match (&verdict.action, status.as_u16()) {
        (Action::Unavailable { .. }, _) | (_, 502..=504) => 14,
        (_, 429) => 8,
        (Action::Forbid { .. }, _) | (_, 403) => 7,
        (_, 401) => 16,
        (_, 404) => 12,
        (_, 400..=499) => 9,
        _ => 2,
    }
}

/// Characters `grpc-message` carries percent-encoded: controls, `%`, and (always) non-ASCII.
const GRPC_MESSAGE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

/// A refusal for a gRPC client: HTTP 200 with no body ("trailers-only"), `grpc-status` and
/// the reason in `grpc-message`; the rate-limit headers and `Retry-After` ride along as
/// metadata.
pub fn grpc_refusal(
    verdict: &Verdict,
    problem: &Problem,
    families: HeaderFamilies,
    request_id: &str,
) -> Response<Body> {
    let mut response = Response::new(Body::empty());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    let code = grpc_status(verdict, problem.status_code());
    headers.insert("grpc-status", HeaderValue::from(u16::from(code)));
    let message = percent_encoding::utf8_percent_encode(&problem.detail, GRPC_MESSAGE).to_string();
    if let Ok(message) = HeaderValue::from_str(&message) {
        headers.insert("grpc-message", message);
    }
    write_rate_limit_headers(verdict, families, headers);
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID.clone(), id);
    }
    response
}

/// A refusal: the problem document with its status and headers.
pub fn refusal(
    verdict: &Verdict,
    problem: &Problem,
    families: HeaderFamilies,
    request_id: &str,
) -> Response<Body> {
    let mut response = Response::new(Body::from(problem.to_json()));
    *response.status_mut() = problem.status_code();
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    write_rate_limit_headers(verdict, families, headers);
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID.clone(), id);
    }
    response
}
