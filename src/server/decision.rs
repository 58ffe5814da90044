//! The decision API: `POST /v1/check` (the admission phase, decided through the pipeline),
//! `POST /v1/report` (the completion an application reports: anomalies count it) and
//! `POST /v1/release`, and their request and response types.

use super::extract::{JsonBody, Refused, RequestId, field_problem};
use super::*;
use crate::pipeline::meter::Meter;

/// `POST /v1/check` input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckRequest {
    method: String,
    path: String,
    #[serde(default, deserialize_with = "some_string")]
    host: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    client_ip: Option<IpAddr>,
    #[serde(default, deserialize_with = "crate::json::some_safe_integer")]
    cost: Option<u64>,
    /// The caller says the described headers were set by a trusted component (its gateway),
    /// not by the client: header-derived identities and tiers then count.
    #[serde(default)]
    trusted_headers: bool,
}

/// `POST /v1/check` output.
#[derive(Debug, Serialize)]
pub(super) struct CheckResponse {
    allowed: bool,
    action: &'static str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remaining: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delay_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    determining_policies: Option<Vec<String>>,
    headers: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    leases: Vec<Lease>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    skipped: Vec<SkippedLimit>,
    request_id: String,
}

/// `POST /v1/release` input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReleaseRequest {
    leases: Vec<Lease>,
}

pub(super) async fn check<S: Store, C: Clock>(
    State(app): State<Arc<AppState<S, C>>>,
    RequestId(request_id): RequestId,
    JsonBody(input): JsonBody<CheckRequest>,
) -> Result<Response, Refused> {
    let ctx = check_ctx(input, &app.options.identifier)
        .map_err(|problem| Refused::new(problem, &request_id))?;
    let admission = app.pipeline.admit(&ctx, request_id, None).await;
    let verdict = &admission.verdict;
    let problem = admission.problem.as_ref();
    let headline = verdict.headline();
    let headers = response::rate_limit_headers(verdict, app.options.headers);
    let body = CheckResponse {
        allowed: verdict.is_allowed(),
        action: action_name(&verdict.action),
        status: admission.status(),
        policy: problem
            .and_then(|p| p.policy.clone())
            .or_else(|| headline.map(|h| h.limit.to_string())),
        limit: headline.map(|h| h.decision.limit),
        remaining: headline.map(|h| h.decision.remaining),
        reset: headline.map(|h| response::ceil_secs(h.decision.reset)),
        retry_after: problem.and_then(|p| p.retry_after),
        delay_ms: match verdict.action {
            Action::Delay(d) => Some(d.as_millis() as u64),
            _ => None,
        },
        reason: problem.and_then(|p| p.reason.clone()),
        determining_policies: problem.and_then(|p| p.determining_policies.clone()),
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
            .collect(),
        leases: verdict.leases.clone(),
        skipped: verdict.skipped.clone(),
        request_id: admission.request_id().to_owned(),
    };
    let mut response = axum::Json(body).into_response();
    set_request_id(response.headers_mut(), admission.request_id());
    // The caller holds the leases (`/v1/release`); the decision's own outcome is the answer.
    let mut admission = admission;
    admission.verdict.leases.clear();
    // And the reservations: its `/v1/report` settles them; and the adaptive limits' slots,
    // which its `/v1/report` gives back.
    admission.verdict.reservations.clear();
    app.pipeline.engine().await_report(&mut admission.verdict);
    let status = admission.status();
    admission.complete(status);
    Ok(response)
}

pub(super) async fn release<S: Store, C: Clock>(
    State(app): State<Arc<AppState<S, C>>>,
    JsonBody(input): JsonBody<ReleaseRequest>,
) -> Response {
    app.pipeline.engine().release(&input.leases).await;
    StatusCode::NO_CONTENT.into_response()
}

/// `POST /v1/report` input: a request as `/v1/check` describes it, its status, and what it
/// used (for limits whose cost the response says).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReportRequest {
    request: CheckRequest,
    #[serde(deserialize_with = "crate::json::u16_integer")]
    status: u16,
    /// What the request used, in the units of every such limit.
    #[serde(default, deserialize_with = "crate::json::some_safe_integer")]
    cost: Option<u64>,
    /// The response as the caller saw it, for each limit to read its own `cost response`.
    #[serde(default)]
    response: Option<ReportedResponse>,
    /// From the check to the end of the response: when the reservation was counted.
    #[serde(default, deserialize_with = "crate::json::some_safe_integer")]
    latency_ms: Option<u64>,
}

/// The response a report describes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportedResponse {
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Its JSON body, or the event of its stream that carries the usage.
    #[serde(default)]
    body: Option<serde_json::Value>,
}

/// One reservation a report settled.
#[derive(Debug, Serialize)]
struct SettledOut {
    limit: String,
    reserved: u64,
    used: u64,
}

/// An optional string field: absent is `None`; `null` is refused, as the spec's `type:
/// string` says.
fn some_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d).map(Some)
}

/// `POST /v1/report` output.
#[derive(Debug, Serialize)]
struct ReportResponse {
    watched: usize,
    detected: Vec<DetectionOut>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    settled: Vec<SettledOut>,
    request_id: String,
}

/// One anomaly detected, as `/v1/report` shows it.
#[derive(Debug, Serialize)]
struct DetectionOut {
    anomaly: String,
    observed: u64,
    threshold: f64,
    window_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ban_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    flag_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tarpit_ms: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    alerts: Vec<String>,
}

pub(super) async fn report<S: ServedStore, C: Clock>(
    State(app): State<Arc<AppState<S, C>>>,
    RequestId(request_id): RequestId,
    JsonBody(input): JsonBody<ReportRequest>,
) -> Result<Response, Refused> {
    if !(100..=599).contains(&input.status) {
        let problem = field_problem("status", "an HTTP status, 100 to 599".into());
        return Err(Refused::new(problem, &request_id));
    }
    if input.cost.is_some() && input.response.is_some() {
        let problem = field_problem(
            "cost",
            "give what was used as `cost` or as `response`, not both".into(),
        );
        return Err(Refused::new(problem, &request_id));
    }
    let response = input
        .response
        .map(|r| described_response(r.headers).map(|headers| (headers, r.body)))
        .transpose()
        .map_err(|problem| Refused::new(problem, &request_id))?;
    let ctx = check_ctx(input.request, &app.options.identifier)
        .map_err(|problem| Refused::new(problem, &request_id))?;
    let settled = settle_reported(
        app.pipeline.engine(),
        &ctx,
        input.cost,
        response.as_ref(),
        input.latency_ms,
    )
    .await;
    let latency = input.latency_ms.map(std::time::Duration::from_millis);
    app.pipeline
        .engine()
        .report_adaptive(&ctx, input.status, latency);
    let (watched, detected) = app.observers.anomalies.report(&ctx, input.status).await;
    let detected = detected
        .into_iter()
        .map(|d| DetectionOut {
            anomaly: d.anomaly.to_string(),
            observed: d.observed,
            threshold: d.threshold,
            window_seconds: d.window.as_secs(),
            ban_seconds: d.actions.ban.map(|b| b.as_secs()),
            flag_seconds: d.actions.flag.map(|f| f.as_secs()),
            tarpit_ms: d.actions.tarpit.map(|(h, _)| h.as_millis() as u64),
            alerts: d.actions.alerts.iter().map(|a| a.to_string()).collect(),
        })
        .collect();
    let mut response = axum::Json(ReportResponse {
        watched,
        detected,
        settled,
        request_id: request_id.clone(),
    })
    .into_response();
    set_request_id(response.headers_mut(), &request_id);
    Ok(response)
}

/// A reported response's headers, refused as `/v1/check`'s are when HTTP would not allow
/// them.
fn described_response(headers: BTreeMap<String, String>) -> Result<HeaderMap, Box<Problem>> {
    let mut map = HeaderMap::new();
    for (name, value) in &headers {
        let field = || format!("response.headers.{name}");
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| field_problem(&field(), "not a header name".into()))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| field_problem(&field(), "not a valid header value".into()))?;
        map.append(header, value);
    }
    Ok(map)
}

/// Settles what a reported request reserved: selected again as it was `latency_ms` ago,
/// each reservation settled at what the report says it used (`cost`, or its `response` as
/// each limit reads it; neither: the limit's `default`, else as reserved).
async fn settle_reported<S: Store, C: Clock>(
    engine: &Engine<S, C>,
    ctx: &RequestCtx,
    cost: Option<u64>,
    response: Option<&(HeaderMap, Option<serde_json::Value>)>,
    latency_ms: Option<u64>,
) -> Vec<SettledOut> {
    let latency = std::time::Duration::from_millis(latency_ms.unwrap_or(0));
    let counted_at = engine.now().saturating_sub(latency);
    let reservations = engine.reservations_of(ctx, counted_at);
    if reservations.is_empty() {
        return Vec::new();
    }
    let said: Vec<Option<u64>> = match response {
        Some((headers, body)) => {
            let meter = Meter::described(
                reservations.iter().map(|r| &*r.usage),
                headers,
                body.as_ref(),
            );
            reservations.iter().map(|r| meter.used(&r.usage)).collect()
        }
        None => vec![cost.map(|c| c.min(crate::json::MAX_SAFE_INTEGER)); reservations.len()],
    };
    engine.settle(&reservations, &said).await;
    reservations
        .iter()
        .zip(&said)
        .map(|(r, said)| SettledOut {
            limit: r.limit.to_string(),
            reserved: r.reserved,
            used: r.used(*said),
        })
        .collect()
}

pub(super) fn action_name(action: &Action) -> &'static str {
    match action {
        Action::Allow => "allow",
        Action::Warn => "warn",
        Action::Delay(_) => "delay",
        Action::Bypass { .. } => "bypass",
        Action::Reject { .. } => "reject",
        Action::Forbid { .. } => "forbid",
        Action::Unauthorized { .. } => "unauthorized",
        Action::Unavailable { .. } => "unavailable",
    }
}

pub(super) fn check_ctx(
    input: CheckRequest,
    identifier: &Identifier,
) -> Result<RequestCtx, Box<Problem>> {
    let method = Method::from_bytes(input.method.as_bytes())
        .ok()
        .filter(|m| m.as_str().bytes().all(|b| b.is_ascii_uppercase()))
        .ok_or_else(|| {
            field_problem(
                "method",
                format!("`{}` is not an HTTP method", input.method),
            )
        })?;
    let mut ctx = RequestCtx::try_new(method, &input.path)
        .map_err(|e| field_problem("path", format!("`{}`: {e}", input.path)))?;
    for (name, value) in &input.headers {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| field_problem(&format!("headers.{name}"), "not a header name".into()))?;
        let value = HeaderValue::from_str(value).map_err(|_| {
            field_problem(
                &format!("headers.{name}"),
                "not a valid header value".into(),
            )
        })?;
        ctx = ctx.with_header(header, value);
    }
    if let Some(host) = &input.host {
        ctx = ctx.with_host(host);
    }
    ctx.client_ip = input.client_ip;
    ctx.headers_trusted = input.trusted_headers;
    if let Some(cost) = input.cost {
        if cost == 0 {
            return Err(field_problem("cost", "must be at least 1".into()));
        }
        ctx = ctx.with_cost(cost);
    }
    identifier.identify_vouched(&mut ctx);
    Ok(ctx)
}
