//! Envoy's global rate-limit service over gRPC (`envoy.service.ratelimit.v3.RateLimitService`,
//! `ShouldRateLimit`), on `grpc_listen`.
//!
//! Each descriptor of a request is decided as one request through the pipeline (so metrics,
//! exports, anomalies, lists and bans see it as they see HTTP requests); the descriptors are
//! decided together, and the answer is over the limit when any of them is. A soft delay holds
//! the answer; the completion phase runs when it is sent (or, when Envoy gives up first, as
//! a client gone away).

use std::num::NonZeroU64;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::HeaderValue as EnvoyHeader;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::envoy::r#type::v3::RateLimitUnit;
use envoy_types::pb::google::protobuf::Duration as ProtoDuration;
use tonic::{Request, Status};

use super::*;
use crate::request::{Descriptor, LimitOverride, request_id_from};
use crate::verdict::Verdict;

/// The largest request message accepted, in bytes.
pub(super) const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The most descriptors in one request.
pub(super) const MAX_DESCRIPTORS: usize = 64;
/// The most entries in one descriptor.
pub(super) const MAX_ENTRIES: usize = 32;
/// The longest domain, entry key or entry value, in bytes.
pub(super) const MAX_TEXT_BYTES: usize = 1024;
/// The most hits one descriptor may add (what JSON and Redis's scripts count exactly).
pub(super) const MAX_HITS: u64 = (1 << 53) - 1;

/// The rate-limit service around a server's state.
pub struct EnvoyService<S, C = SystemClock> {
    app: Arc<AppState<S, C>>,
}

impl<S: ServedStore, C: Clock> EnvoyService<S, C> {
    /// The service deciding through `app`'s pipeline.
    pub fn new(app: Arc<AppState<S, C>>) -> Self {
        EnvoyService { app }
    }

    /// The tonic service, with the message bound.
    pub fn into_server(self) -> RateLimitServiceServer<Self> {
        RateLimitServiceServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Decides every descriptor of `request` (id `request_id`), holds a soft delay, and
    /// answers.
    pub async fn decide(
        &self,
        request: RateLimitRequest,
        request_id: String,
    ) -> Result<RateLimitResponse, Status> {
        let mut asked = read_request(request)?;
        let pipeline = &self.app.pipeline;
        replace(pipeline.engine(), &mut asked);
        // Most requests carry one descriptor: decided without a set of futures.
        let admissions = match asked.as_slice() {
            [one] => vec![pipeline.admit(one, request_id, None).await],
            _ => {
                futures_util::future::join_all(
                    asked
                        .iter()
                        .map(|ctx| pipeline.admit(ctx, request_id.clone(), None)),
                )
                .await
            }
        };
        let delay = admissions
            .iter()
            .filter_map(|a| match a.verdict.action {
                Action::Delay(wait) => Some(wait),
                _ => None,
            })
            .max();
        if let Some(wait) = delay {
            tokio::time::sleep(wait).await;
        }
        let answer = answer(
            admissions.iter().map(|a| &a.verdict),
            self.app.options.headers,
        );
        for (admission, ctx) in admissions.into_iter().zip(&asked) {
            let status = admission.status();
            // Envoy's rule: a request without hits counts 1.
            admission.complete_hits(status, ctx.cost.unwrap_or(1));
        }
        Ok(answer)
    }
}

#[tonic::async_trait]
impl<S: ServedStore, C: Clock> RateLimitService for EnvoyService<S, C> {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, Status> {
        let id = request
            .metadata()
            .get(X_REQUEST_ID.as_str())
            .and_then(|v| v.to_str().ok());
        let request_id = request_id_from(id);
        let answer = self.decide(request.into_inner(), request_id).await?;
        Ok(tonic::Response::new(answer))
    }
}

/// Serves the rate-limit service of `state` on `listener` until `shutdown` completes.
pub async fn serve_envoy<S: ServedStore, C: Clock>(
    state: Arc<AppState<S, C>>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    tonic::transport::Server::builder()
        .add_service(EnvoyService::new(state).into_server())
        .serve_with_incoming_shutdown(
            // Small messages both ways: no Nagle delay.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| ServeError::Io(std::io::Error::other(e)))
}

/// Takes the limits that a descriptor's limits `replace` off every descriptor of the request.
fn replace<S: Store, C: Clock>(engine: &Engine<S, C>, asked: &mut [RequestCtx]) {
    let plan = engine.plan_guard();
    if !plan.replaces_any() {
        return;
    }
    let (hasher, now) = (engine.key_hasher(), engine.now());
    let mut replaced = Vec::new();
    for request in asked.iter() {
        plan.replaced_by(request, hasher, now, &mut replaced);
    }
    for request in asked.iter_mut() {
        if let Some(descriptor) = &mut request.descriptor {
            descriptor.replaced.clone_from(&replaced);
        }
    }
}

/// The requests a `RateLimitRequest` stands for, one per descriptor; a malformed one is
/// `INVALID_ARGUMENT`, saying what is wrong.
fn read_request(request: RateLimitRequest) -> Result<Vec<RequestCtx>, Status> {
    let invalid = |what: String| Err(Status::invalid_argument(what));
    if request.domain.is_empty() {
        return invalid("the domain is empty".into());
    }
    if request.domain.len() > MAX_TEXT_BYTES {
        return invalid(format!("the domain is over {MAX_TEXT_BYTES} bytes"));
    }
    if request.descriptors.is_empty() {
        return invalid("there is no descriptor".into());
    }
    if request.descriptors.len() > MAX_DESCRIPTORS {
        return invalid(format!(
            "{} descriptors: at most {MAX_DESCRIPTORS} in one request",
            request.descriptors.len()
        ));
    }
    // Envoy's rule: the request's hits apply where a descriptor has none; 0 (unset) is 1.
    let request_hits = (request.hits_addend > 0).then_some(u64::from(request.hits_addend));
    request
        .descriptors
        .into_iter()
        .enumerate()
        .map(|(i, d)| read_descriptor(&request.domain, i, d, request_hits))
        .collect()
}

/// Descriptor `i` as a request.
fn read_descriptor(
    domain: &str,
    i: usize,
    d: RateLimitDescriptor,
    request_hits: Option<u64>,
) -> Result<RequestCtx, Status> {
    let invalid = |what: String| Err(Status::invalid_argument(format!("descriptor {i}: {what}")));
    if d.entries.is_empty() {
        return invalid("it has no entry".into());
    }
    if d.entries.len() > MAX_ENTRIES {
        return invalid(format!("at most {MAX_ENTRIES} entries"));
    }
    if let Some(e) = d.entries.iter().find(|e| e.key.is_empty()) {
        return invalid(format!("an entry has no key (its value is `{}`)", e.value));
    }
    if d.entries
        .iter()
        .any(|e| e.key.len() > MAX_TEXT_BYTES || e.value.len() > MAX_TEXT_BYTES)
    {
        return invalid(format!(
            "an entry's key or value is over {MAX_TEXT_BYTES} bytes"
        ));
    }
    if d.is_negative_hits {
        return invalid(
            "negative hits (a refund) are not taken: Tollgate counts what a request uses \
             with `cost`, and gives back nothing it did not count"
                .into(),
        );
    }
    // A descriptor's own hits may be 0: asked without counting.
    let hits = d.hits_addend.map(|h| h.value).or(request_hits);
    if let Some(hits) = hits
        && hits > MAX_HITS
    {
        return invalid(format!("hits_addend {hits} is over {MAX_HITS}"));
    }
    let limit = match d.limit {
        None => None,
        Some(o) => Some(read_override(o.requests_per_unit, o.unit).map_err(|what| {
            Status::invalid_argument(format!("descriptor {i}: the limit override {what}"))
        })?),
    };
    let entries = d.entries.into_iter().map(|e| (e.key, e.value)).collect();
    let mut descriptor = Descriptor::new(domain, entries);
    if let Some(limit) = limit {
        descriptor = descriptor.with_limit(limit);
    }
    let mut ctx = RequestCtx::for_descriptor(descriptor);
    if let Some(hits) = hits {
        ctx = ctx.with_cost(hits);
    }
    Ok(ctx)
}

/// Envoy's limit override, in Tollgate's terms.
fn read_override(requests: u32, unit: i32) -> Result<LimitOverride, String> {
    let requests = NonZeroU64::new(u64::from(requests)).ok_or("allows no request")?;
    let seconds = match RateLimitUnit::try_from(unit) {
        Ok(RateLimitUnit::Second) => 1,
        Ok(RateLimitUnit::Minute) => 60,
        Ok(RateLimitUnit::Hour) => 3_600,
        Ok(RateLimitUnit::Day) => DAY,
        // As envoyproxy/ratelimit counts them.
        Ok(RateLimitUnit::Month) => 30 * DAY,
        Ok(RateLimitUnit::Year) => 365 * DAY,
        Ok(RateLimitUnit::Unknown) | Err(_) => return Err(format!("has no unit ({unit})")),
    };
    let per_micros = NonZeroU64::new(seconds * 1_000_000).ok_or("has no unit")?;
    Ok(LimitOverride {
        requests,
        per_micros,
    })
}

const DAY: u64 = 86_400;

/// Envoy's units, longest first, with their seconds.
const UNITS: [(u64, Unit); 7] = [
    (365 * DAY, Unit::Year),
    (30 * DAY, Unit::Month),
    (7 * DAY, Unit::Week),
    (DAY, Unit::Day),
    (3_600, Unit::Hour),
    (60, Unit::Minute),
    (1, Unit::Second),
];

/// The answer to the descriptors decided in `verdicts` (in their order): over the limit
/// when any is; the rate-limit headers of the one that refused, else of the one with the
/// least remaining.
fn answer<'v>(
    verdicts: impl Iterator<Item = &'v Verdict> + Clone,
    families: response::HeaderFamilies,
) -> RateLimitResponse {
    let statuses: Vec<DescriptorStatus> = verdicts.clone().map(descriptor_status).collect();
    let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
    let shown = verdicts
        .clone()
        .find(|v| !v.is_allowed())
        .or_else(|| verdicts.min_by_key(|v| v.headline().map(|h| h.decision.remaining)));
    let response_headers_to_add = shown
        .map(|v| response::rate_limit_headers(v, families))
        .unwrap_or_default()
        .iter()
        .filter_map(|(name, value)| {
            Some(EnvoyHeader {
                key: name.to_string(),
                value: value.to_str().ok()?.to_owned(),
                raw_value: Vec::new(),
            })
        })
        .collect();
    RateLimitResponse {
        overall_code: if over { Code::OverLimit } else { Code::Ok } as i32,
        statuses,
        response_headers_to_add,
        ..Default::default()
    }
}

/// One descriptor's status: OK when its request goes on; the figures of the limit that
/// refused, else of the enforced one with the least remaining; none when no limit counted it.
fn descriptor_status(verdict: &Verdict) -> DescriptorStatus {
    let code = if verdict.is_allowed() {
        Code::Ok
    } else {
        Code::OverLimit
    };
    let Some(report) = verdict.headline() else {
        return DescriptorStatus {
            code: code as i32,
            ..Default::default()
        };
    };
    let d = &report.decision;
    let (requests_per_unit, unit) = per_unit(report.policy);
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(RateLimit {
            name: report.limit.to_string(),
            requests_per_unit,
            unit: unit as i32,
        }),
        limit_remaining: u32::try_from(d.remaining).unwrap_or(u32::MAX),
        duration_until_reset: Some(proto_duration(d.reset)),
        quota: None,
    }
}

/// A quota of `q` per `w` seconds in Envoy's terms: exact when `w` is one of its units,
/// else the same average rate per the next longer unit, rounded down (at least 1).
fn per_unit((q, w): (u64, u64)) -> (u32, Unit) {
    let w = w.max(1);
    let (seconds, unit) = UNITS
        .iter()
        .rev()
        .find(|(s, _)| *s >= w)
        .copied()
        .unwrap_or(UNITS[0]);
    let scaled = u128::from(q) * u128::from(seconds) / u128::from(w);
    (u32::try_from(scaled.max(1)).unwrap_or(u32::MAX), unit)
}

fn proto_duration(d: Duration) -> ProtoDuration {
    ProtoDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_are_shown_per_envoy_unit() {
        assert_eq!(per_unit((100, 60)), (100, Unit::Minute));
        assert_eq!(per_unit((5, 86_400)), (5, Unit::Day));
        assert_eq!(per_unit((10, 1)), (10, Unit::Second));
        // 1 per 90 s is 40 per hour.
        assert_eq!(per_unit((1, 90)), (40, Unit::Hour));
        // 30 per 2 s is 900 per minute; nothing is shown as 0.
        assert_eq!(per_unit((30, 2)), (900, Unit::Minute));
        assert_eq!(per_unit((1, 400 * DAY)), (1, Unit::Year));
        assert_eq!(per_unit((u64::MAX, 1)), (u32::MAX, Unit::Second));
    }

    #[test]
    fn overrides_take_envoys_units() {
        let o = read_override(10, RateLimitUnit::Month as i32).unwrap();
        assert_eq!(o.requests.get(), 10);
        assert_eq!(o.per_micros.get(), 30 * DAY * 1_000_000);
        assert!(read_override(0, RateLimitUnit::Second as i32).is_err());
        assert!(read_override(5, RateLimitUnit::Unknown as i32).is_err());
        assert!(read_override(5, 99).is_err());
    }
}
