//! `tollgate serve`: the decision API, forward-auth for nginx and Traefik, health checks.
//!
//! - `POST /v1/check`: a described request in, the verdict and the headers to set out;
//! - `GET|POST /v1/auth`: forward-auth (Traefik `ForwardAuth`, nginx `auth_request`);
//! - `POST /v1/release`: gives back concurrency leases taken through `/v1/check`;
//! - `GET /healthz` (the process runs), `GET /readyz` (a plan is loaded and the store answers).
//!
//! Every error is an `application/problem+json` answer; no input makes the server panic.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, on, post};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock};
use crate::config::{Environment, Settings, StoreClock};
use crate::diagnostic::PolicyErrors;
use crate::engine::{Action, Engine, Lease, SkippedLimit, Verdict};
use crate::identity::{Identifier, JwtKeyError};
use crate::middleware::{HttpOptions, RateLimitLayer};
use crate::plan::KeyHasher;
use crate::proxy::Upstream;
use crate::request::RequestCtx;
use crate::response::{self, Problem, X_REQUEST_ID, problem_response};
use crate::store::redis::{BreakerSettings, RedisOptions, RedisStore};
use crate::store::{AnyStore, MemoryStore, Store};
use crate::{PolicySet, compile};

/// `X-Tollgate-Status`: the real status of a refusal, for nginx (which only understands 401
/// and 403 from an auth endpoint).
pub static X_TOLLGATE_STATUS: HeaderName = HeaderName::from_static("x-tollgate-status");
/// `X-Tollgate-Policy`: the limit or list that refused.
pub static X_TOLLGATE_POLICY: HeaderName = HeaderName::from_static("x-tollgate-policy");

/// What the handlers share.
pub struct AppState<S, C = SystemClock> {
    /// The engine.
    pub engine: Arc<Engine<S, C>>,
    /// Identity and header options.
    pub options: HttpOptions,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The application allowed requests go on to, if any.
    pub upstream: Option<Upstream>,
}

/// The server's routes around `state`.
pub fn router<S: Store, C: Clock>(state: Arc<AppState<S, C>>) -> Router {
    let fallback = match &state.upstream {
        // Everything that is not Tollgate's own goes on to the application, rate-limited.
        Some(upstream) => Router::new()
            .fallback(crate::proxy::handler::<S, C>)
            .with_state(Arc::new(crate::proxy::ProxyState {
                upstream: upstream.clone(),
                engine: Arc::clone(&state.engine),
                identifier: state.options.identifier.clone(),
            }))
            .layer(
                RateLimitLayer::new(Arc::clone(&state.engine)).with_options(state.options.clone()),
            ),
        None => Router::new().fallback(not_found),
    };
    Router::new()
        .route("/v1/check", post(check::<S, C>))
        .route("/v1/release", post(release::<S, C>))
        .route(
            "/v1/auth",
            on(
                axum::routing::MethodFilter::GET
                    .or(axum::routing::MethodFilter::POST)
                    .or(axum::routing::MethodFilter::HEAD),
                forward_auth::<S, C>,
            ),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready::<S, C>))
        .with_state(state)
        .fallback_service(fallback)
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The policies do not compile.
    #[error("the policies in `{path}` are invalid: {errors}")]
    Policies {
        /// Where they are.
        path: String,
        /// What is wrong.
        errors: PolicyErrors,
    },
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The configured store cannot be used.
    #[error("{0}")]
    Store(String),
    /// The JWT key is unusable.
    #[error(transparent)]
    Jwt(#[from] JwtKeyError),
    /// Serving failed.
    #[error("the server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the engine and state for `settings`: the Redis store when `redis_url` is set and
/// answers; when it does not, `prod` refuses to start and `dev` warns and counts in memory.
pub async fn build(settings: &Settings) -> Result<Arc<AppState<AnyStore>>, ServeError> {
    let set = PolicySet::load(&[&settings.policies]);
    let plan = compile(&set).map_err(|errors| ServeError::Policies {
        path: settings.policies.display().to_string(),
        errors,
    })?;
    let store = match &settings.redis_url {
        None => AnyStore::Memory(MemoryStore::with_max_keys(settings.memory_max_keys)),
        Some(url) => {
            let options = redis_options(settings);
            match RedisStore::connect_with(url, options).await {
                Ok(store) => {
                    tracing::info!(url = %redact(url), cluster = store.is_cluster(), "counting in Redis");
                    AnyStore::Redis(Box::new(store))
                }
                Err(e) if settings.env == Environment::Prod => {
                    return Err(ServeError::Store(format!(
                        "cannot reach Redis at `{}`: {e}",
                        redact(url)
                    )));
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot reach Redis at `{}` ({e}): COUNTING IN THIS PROCESS'S MEMORY (dev only; prod refuses to start)",
                        redact(url)
                    );
                    AnyStore::Memory(MemoryStore::with_max_keys(settings.memory_max_keys))
                }
            }
        }
    };
    let hasher = match &settings.key_secret {
        Some(secret) => KeyHasher::from_secret(secret),
        None => {
            tracing::warn!(
                "no TOLLGATE_KEY_SECRET: hashed tokens in keys change at every restart (dev only)"
            );
            KeyHasher::random()
        }
    };
    for warning in plan.warnings() {
        tracing::warn!(
            file = warning.file_name(),
            "policy warning: {}",
            warning.message()
        );
    }
    tracing::info!(
        limits = plan.limits().len(),
        version = plan.version(),
        policies = %settings.policies.display(),
        "policies loaded"
    );
    let nodes = NonZeroU64::new(settings.expected_nodes).unwrap_or(NonZeroU64::MIN);
    let engine = Arc::new(
        Engine::new(plan, store)
            .with_key_hasher(hasher)
            .with_local_share(nodes)
            .with_local_max_keys(settings.memory_max_keys),
    );
    Ok(Arc::new(AppState {
        engine,
        options: HttpOptions {
            identifier: identifier(settings)?,
            headers: response::HeaderFamilies {
                legacy: settings.legacy_headers,
                ietf: settings.ietf_headers,
            },
        },
        max_body_bytes: settings.max_body_bytes,
        upstream: settings.upstream.clone().map(Upstream::new),
    }))
}

/// How clients are identified, from the settings (the library's `Identifier` knows nothing
/// of the server's configuration).
pub fn identifier(settings: &Settings) -> Result<Identifier, JwtKeyError> {
    let mut id = Identifier::new()
        .with_trusted_proxies(settings.trusted_proxies.clone())
        .with_api_key_header(settings.api_key_header.clone());
    if let Some(h) = &settings.user_header {
        id = id.with_user_header(h.clone());
    }
    if let Some(jwt) = &settings.jwt {
        id = id.with_jwt(jwt)?;
    }
    Ok(id)
}

/// The Redis store's options from the settings.
pub fn redis_options(settings: &Settings) -> RedisOptions {
    let timeout = Duration::from_millis(settings.store_timeout_ms);
    let max_backoff = Duration::from_millis(settings.breaker_max_backoff_ms);
    RedisOptions {
        timeout,
        // Connecting may take longer than one call: give it a second at least.
        connect_timeout: timeout.max(Duration::from_secs(1)),
        server_time: settings.store_clock == StoreClock::Redis,
        breaker: BreakerSettings {
            failures: settings.breaker_failures,
            min_backoff: max_backoff.min(Duration::from_millis(100)),
            max_backoff,
        },
        deny_cache: (settings.deny_cache_keys > 0).then_some(settings.deny_cache_keys),
        tls: settings.redis_tls.clone(),
    }
}

/// Runs the server on `listener` until `shutdown` completes.
pub async fn run<S: Store>(
    state: Arc<AppState<S>>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Expired counters are dropped in the background, so that idle keys free their memory.
    // Evictions (live keys dropped at the memory cap) are reported once per sweep, with how
    // many: state was lost, and the cap may be too small.
    let sweeper = {
        let engine = Arc::clone(&state.engine);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            let mut evictions = engine.evictions();
            loop {
                tick.tick().await;
                let purged = engine.sweep();
                tracing::debug!(purged, "expired counters dropped");
                let now = engine.evictions();
                if now > evictions {
                    tracing::warn!(
                        evicted = now - evictions,
                        total = now,
                        "the memory store is at its key cap: live counters were evicted \
                         (raise memory_max_keys, or count in Redis)"
                    );
                }
                evictions = now;
            }
        })
    };
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    sweeper.abort();
    Ok(result?)
}

/// Binds `settings.listen` and runs until `shutdown`.
pub async fn serve(
    settings: &Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let state = build(settings).await?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: settings.listen,
            source,
        })?;
    tracing::info!(listen = %settings.listen, env = ?settings.env, "tollgate serving");
    run(state, listener, shutdown).await
}

fn redact(url: &str) -> String {
    // `redis://user:password@host` → `redis://user:***@host`
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

// ─── the decision API ────────────────────────────────────────────────────────────────────

/// `POST /v1/check` input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    method: String,
    path: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    client_ip: Option<IpAddr>,
    #[serde(default)]
    cost: Option<u64>,
    /// The caller says the described headers were set by a trusted component (its gateway),
    /// not by the client: header-derived identities and tiers then count.
    #[serde(default)]
    trusted_headers: bool,
}

/// `POST /v1/check` output.
#[derive(Debug, Serialize)]
struct CheckResponse {
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
struct ReleaseRequest {
    leases: Vec<Lease>,
}

async fn check<S: Store, C: Clock>(
    State(app): State<Arc<AppState<S, C>>>,
    request: Request,
) -> Response {
    let request_id = response::request_id(request.headers());
    let input: CheckRequest = match read_json(request, app.max_body_bytes).await {
        Ok(input) => input,
        Err(problem) => return problem_response(*problem, &request_id),
    };
    let ctx = match check_ctx(input, &app.options.identifier) {
        Ok(ctx) => ctx,
        Err(problem) => return problem_response(*problem, &request_id),
    };
    let verdict = app.engine.decide(&ctx).await;
    let headers = response::rate_limit_headers(&verdict, app.options.headers);
    let problem = response::problem(&verdict, Some(&request_id));
    let headline = verdict.headline();
    let body = CheckResponse {
        allowed: verdict.is_allowed(),
        action: action_name(&verdict.action),
        status: problem.as_ref().map_or(200, |p| p.status),
        policy: problem
            .as_ref()
            .and_then(|p| p.policy.clone())
            .or_else(|| headline.map(|h| h.limit.to_string())),
        limit: headline.map(|h| h.decision.limit),
        remaining: headline.map(|h| h.decision.remaining),
        reset: headline.map(|h| response::ceil_secs(h.decision.reset)),
        retry_after: problem.as_ref().and_then(|p| p.retry_after),
        delay_ms: match verdict.action {
            Action::Delay(d) => Some(d.as_millis() as u64),
            _ => None,
        },
        reason: problem.as_ref().and_then(|p| p.reason.clone()),
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
            .collect(),
        leases: verdict.leases.clone(),
        skipped: verdict.skipped.clone(),
        request_id: request_id.clone(),
    };
    let mut response = axum::Json(body).into_response();
    set_request_id(response.headers_mut(), &request_id);
    response
}

async fn release<S: Store, C: Clock>(
    State(app): State<Arc<AppState<S, C>>>,
    request: Request,
) -> Response {
    let request_id = response::request_id(request.headers());
    match read_json::<ReleaseRequest>(request, app.max_body_bytes).await {
        Ok(input) => {
            app.engine.release(&input.leases).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(problem) => problem_response(*problem, &request_id),
    }
}

fn action_name(action: &Action) -> &'static str {
    match action {
        Action::Allow => "allow",
        Action::Warn => "warn",
        Action::Delay(_) => "delay",
        Action::Bypass { .. } => "bypass",
        Action::Reject { .. } => "reject",
        Action::Forbid { .. } => "forbid",
        Action::Unavailable { .. } => "unavailable",
    }
}

/// The body as JSON of type `T`, or a problem naming what is wrong and where.
async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request,
    limit: usize,
) -> Result<T, Box<Problem>> {
    let bytes = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| {
            Box::new(Problem::new(
                "urn:tollgate:problem:too-large",
                "Content Too Large",
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {limit} bytes"),
            ))
        })?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        // serde_json appends "at line 1 column 7"; the field path says more.
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(m, _)| m)
            .to_owned();
        let mut p = Problem::bad_request(if path == "." || inner.is_syntax() || inner.is_eof() {
            format!("invalid JSON: {message}")
        } else {
            format!("invalid field `{path}`: {message}")
        });
        if path != "." {
            p.field = Some(path);
        }
        Box::new(p)
    })?;
    // One JSON document: anything after it but whitespace is refused, not ignored.
    de.end().map_err(|e| {
        let message = e.to_string();
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(m, _)| m);
        Box::new(Problem::bad_request(format!("invalid JSON: {message}")))
    })?;
    Ok(value)
}

fn check_ctx(input: CheckRequest, identifier: &Identifier) -> Result<RequestCtx, Box<Problem>> {
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

fn field_problem(field: &str, message: String) -> Box<Problem> {
    let mut p = Problem::bad_request(format!("invalid field `{field}`: {message}"));
    p.field = Some(field.to_owned());
    Box::new(p)
}

// ─── forward-auth ────────────────────────────────────────────────────────────────────────

/// Traefik sends `X-Forwarded-Method`, `-Uri`, `-Host`, `-For`; nginx `X-Original-URI` and
/// `X-Original-Method` (and the `X-Forwarded-For` its config sets). The answer: 200 to allow;
/// to refuse, Traefik gets the real status, headers and body; nginx, which understands only
/// 401 and 403 from an auth endpoint, gets 403 with the real status in `X-Tollgate-Status`.
async fn forward_auth<S: Store, C: Clock>(
    State(app): State<Arc<AppState<S, C>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let headers = request.headers();
    let request_id = response::request_id(headers);
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let nginx = headers.contains_key("x-original-uri");
    let method = text("x-forwarded-method")
        .or_else(|| text("x-original-method"))
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .unwrap_or_else(|| request.method().clone());
    let uri = text("x-forwarded-uri")
        .or_else(|| text("x-original-uri"))
        .unwrap_or("/")
        .to_owned();
    let mut ctx = match RequestCtx::try_new(method, &uri) {
        Ok(ctx) => ctx,
        Err(e) => {
            let problem = Problem::bad_request(format!("the forwarded URI `{uri}`: {e}"));
            return problem_response(problem, &request_id);
        }
    };
    let host = text("x-forwarded-host")
        .or_else(|| text("host"))
        .map(str::to_owned);
    ctx.headers = headers.clone();
    if let Some(host) = host {
        ctx = ctx.with_host(&host);
    }
    if !app.options.identifier.is_trusted(peer.ip()) && ctx.headers.contains_key("x-forwarded-for")
    {
        tracing::debug!(peer = %peer.ip(), "forward-auth from an untrusted peer: X-Forwarded-For ignored; add the proxy to trusted_proxies");
    }
    app.options.identifier.identify(&mut ctx, Some(peer.ip()));
    let verdict = app.engine.decide(&ctx).await;
    if let Action::Delay(wait) = verdict.action {
        tokio::time::sleep(wait).await;
    }
    let mut response = match response::problem(&verdict, Some(&request_id)) {
        None => {
            let mut r = StatusCode::OK.into_response();
            r.headers_mut()
                .extend(response::rate_limit_headers(&verdict, app.options.headers));
            r
        }
        Some(problem) => {
            let mut r =
                crate::middleware::refusal(&verdict, &problem, app.options.headers, &request_id);
            if let Some(policy) = problem
                .policy
                .as_deref()
                .and_then(|p| HeaderValue::from_str(p).ok())
            {
                r.headers_mut().insert(X_TOLLGATE_POLICY.clone(), policy);
            }
            r.headers_mut()
                .insert(X_TOLLGATE_STATUS.clone(), HeaderValue::from(problem.status));
            if nginx && !matches!(problem.status, 401 | 403) {
                *r.status_mut() = StatusCode::FORBIDDEN;
            }
            r
        }
    };
    set_request_id(response.headers_mut(), &request_id);
    log_refusal(&verdict, &request_id);
    response
}

fn log_refusal(verdict: &Verdict, request_id: &str) {
    if let Action::Reject { limit, .. } = &verdict.action {
        tracing::info!(request_id, %limit, "rejected (forward-auth)");
    }
}

// ─── health and errors ───────────────────────────────────────────────────────────────────

async fn ready<S: Store, C: Clock>(State(app): State<Arc<AppState<S, C>>>) -> Response {
    match app.engine.store().ping().await {
        Ok(()) => (
            StatusCode::OK,
            format!("ready: plan {}", app.engine.plan().version()),
        )
            .into_response(),
        Err(e) => problem_response(
            Problem::new(
                "urn:tollgate:problem:not-ready",
                "Service Unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {e}"),
            ),
            &response::request_id(&HeaderMap::new()),
        ),
    }
}

async fn not_found(request: Request) -> Response {
    let request_id = response::request_id(request.headers());
    problem_response(
        Problem::new(
            "urn:tollgate:problem:not-found",
            "Not Found",
            StatusCode::NOT_FOUND,
            format!("no endpoint at `{}`", request.uri().path()),
        ),
        &request_id,
    )
}

fn set_request_id(headers: &mut HeaderMap, request_id: &str) {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted_from_store_urls() {
        assert_eq!(
            redact("redis://u:secret@h:6379/0"),
            "redis://u:***@h:6379/0"
        );
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
