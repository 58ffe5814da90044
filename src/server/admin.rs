//! The admin API, on its own listener (`admin_listen`), documented in
//! `docs/admin-openapi.yaml`. Every route requires `Authorization: Bearer <admin_token>`
//! (compared in constant time); without a configured token the listener does not start.
//! Errors are problem documents; every change is logged with what it changed.
//!
//! - `GET /admin/plan`: the plan serving (version, files, limits, Cedar policies), when it
//!   was loaded, and the last reload's error until a good version loads;
//! - `POST /admin/reload`: rebuilds the plan now (422 with the located problems when broken);
//! - `POST /admin/explain`: a described request (the `/v1/check` body) → `tollgate explain`'s
//!   words;
//! - `GET /admin/keys` (count live keys), `DELETE /admin/keys` (reset), `GET /admin/key`
//!   (one key's state): by `key`, `client`, `namespace` or `limit`, on memory, Redis or a
//!   Cluster (`SCAN`, never `KEYS`);
//! - `GET|POST|DELETE /admin/lists`: runtime safelist and denylist entries (addresses or
//!   networks, for a time or until removed: a ban is a denylist entry that ends), shared by
//!   every node through the store;
//! - `GET /admin/diagnostics`: the store's health and latency, memory evictions, where the
//!   adaptive limits stand on this node, the build.

use axum::middleware::Next;
use subtle::ConstantTimeEq;

use super::decision::{CheckRequest, check_ctx};
use super::extract::{BodyLimit, JsonBody, QueryParams, Refused, RequestId};
use super::*;
use crate::plan::KeyHasher;
use crate::plan::key::KeySource;
use crate::reload::{Reloader, Trigger};
use crate::store::runtime::{MAX_CLIENT_LEN, RuntimeEntry, RuntimeList, Target};
use crate::store::{KeySelector, StoreError};

/// What the admin handlers share.
pub struct AdminState<S, C = SystemClock> {
    /// The engine whose plan and store are administered.
    pub engine: Arc<Engine<S, C>>,
    /// The observers of its pipeline (`/metrics` reads them).
    pub observers: Observers<S, C>,
    /// How requests are identified (for explain).
    pub identifier: Identifier,
    /// Reloads the plan.
    pub reloader: Reloader,
    /// The bearer token every route requires.
    pub token: String,
}

impl<S, C> BodyLimit for AdminState<S, C> {
    fn max_body_bytes(&self) -> usize {
        64 * 1024
    }
}

/// The admin routes around `state`, behind the token check.
pub fn admin_router<S: ServedStore, C: Clock>(state: Arc<AdminState<S, C>>) -> Router {
    Router::new()
        .route("/admin/plan", get(plan::<S, C>))
        .route("/admin/reload", post(reload::<S, C>))
        .route("/admin/explain", post(explain::<S, C>))
        .route("/admin/keys", get(keys::<S, C>).delete(keys::<S, C>))
        .route("/admin/key", get(inspect_key::<S, C>))
        .route(
            "/admin/lists",
            get(lists::<S, C>)
                .post(add_entry::<S, C>)
                .delete(remove_entry::<S, C>),
        )
        .route("/admin/diagnostics", get(diagnostics::<S, C>))
        .route("/metrics", get(metrics::<S, C>))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            authorized::<S, C>,
        ))
        .with_state(state)
}

/// Lets through requests that carry the token; 401 for the others.
async fn authorized<S: ServedStore, C: Clock>(
    State(state): State<Arc<AdminState<S, C>>>,
    request: Request,
    next: Next,
) -> Response {
    let detail = match bearer_token(request.headers()) {
        Ok(presented) if bool::from(presented.as_bytes().ct_eq(state.token.as_bytes())) => {
            return next.run(request).await;
        }
        Ok(_) => "the admin API needs `Authorization: Bearer <admin_token>`".to_owned(),
        Err(detail) => detail,
    };
    let request_id = crate::request::request_id(request.headers());
    tracing::warn!(request_id, path = %request.uri().path(), "admin request without the admin token");
    let mut response = problem_response(
        Problem::new(
            "urn:tollgate:problem:unauthenticated",
            "Unauthorized",
            StatusCode::UNAUTHORIZED,
            detail,
        ),
        &request_id,
    );
    response.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer"),
    );
    response
}

/// The token of the request's one `Authorization: Bearer` header: the scheme in any case
/// (RFC 9110 §11.1), then one or more spaces. Empty when there is none or another scheme;
/// an error when the request carries several `Authorization` headers (never choose one).
fn bearer_token(headers: &http::HeaderMap) -> Result<&str, String> {
    let mut all = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = all.next() else {
        return Ok("");
    };
    if all.next().is_some() {
        return Err("the request has more than one `Authorization` header: send one".to_owned());
    }
    let value = value.to_str().unwrap_or("");
    Ok(value
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim_start_matches(' ')))
}

#[derive(Serialize)]
struct PlanInfo {
    version: String,
    loaded_at: u64,
    files: Vec<String>,
    limits: Vec<LimitInfo>,
    cedar_policies: usize,
    reloads_succeeded: u64,
    reloads_failed: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
}

#[derive(Serialize)]
struct LimitInfo {
    name: String,
    namespace: String,
    mode: &'static str,
}

async fn plan<S: ServedStore, C: Clock>(State(state): State<Arc<AdminState<S, C>>>) -> Response {
    let plan = state.engine.plan();
    let status = state.reloader.status();
    let mut files: Vec<String> = plan
        .cedar_imports()
        .iter()
        .flat_map(|i| {
            std::iter::once(&i.policies)
                .chain(i.schema.iter())
                .chain(i.entities.iter())
        })
        .map(|p| p.display().to_string())
        .collect();
    files.extend(plan.source_files().iter().map(|f| f.to_string()));
    files.sort();
    let body = PlanInfo {
        version: plan.version().to_owned(),
        loaded_at: status.loaded_at.as_micros() / 1_000_000,
        files,
        limits: plan
            .limits()
            .iter()
            .map(|l| LimitInfo {
                name: l.name.to_string(),
                namespace: l.namespace.to_string(),
                mode: match l.mode {
                    crate::plan::Mode::Enforce => "enforce",
                    crate::plan::Mode::Shadow => "shadow",
                    crate::plan::Mode::Off => "off",
                },
            })
            .collect(),
        cedar_policies: plan.cedar().iter().map(|c| c.len()).sum(),
        reloads_succeeded: status.succeeded,
        reloads_failed: status.failed,
        last_error: status.last_error,
    };
    axum::Json(body).into_response()
}

async fn reload<S: ServedStore, C: Clock>(
    State(state): State<Arc<AdminState<S, C>>>,
    RequestId(request_id): RequestId,
) -> Response {
    match state.reloader.reload(Trigger::Request).await {
        Ok(version) => {
            tracing::info!(request_id, plan = %version, "admin: policies reloaded");
            axum::Json(serde_json::json!({ "version": &*version })).into_response()
        }
        Err(errors) => problem_response(
            Problem::new(
                "urn:tollgate:problem:invalid-policies",
                "Unprocessable Content",
                StatusCode::UNPROCESSABLE_ENTITY,
                errors.render_plain(100),
            ),
            &request_id,
        ),
    }
}

async fn explain<S: ServedStore, C: Clock>(
    State(state): State<Arc<AdminState<S, C>>>,
    RequestId(request_id): RequestId,
    JsonBody(input): JsonBody<CheckRequest>,
) -> Result<Response, Refused> {
    let ctx = check_ctx(input, &state.identifier)
        .map_err(|problem| Refused::new(problem, &request_id))?;
    let plan = state.engine.plan();
    let mut explanation = crate::explain::explain(&plan, &ctx, state.engine.key_hasher());
    for limit in &mut explanation.limits {
        limit.now = limit
            .key
            .as_deref()
            .and_then(|key| state.engine.adaptive_reading(key))
            .map(|r| r.to_string());
    }
    Ok(axum::Json(serde_json::json!({
        "plan_version": plan.version(),
        "explanation": explanation.to_string(),
    }))
    .into_response())
}

/// Which keys a `/admin/keys` request is about: exactly one of these.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Selecting {
    key: Option<String>,
    client: Option<String>,
    namespace: Option<String>,
    limit: Option<String>,
}

/// The one selector a `/admin/keys` request names.
enum KeysTarget {
    Key(String),
    Client(String),
    Namespace(String),
    Limit(String),
}

impl KeysTarget {
    fn selector(&self) -> KeySelector<'_> {
        match self {
            KeysTarget::Key(k) => KeySelector::Key(k),
            KeysTarget::Client(c) => KeySelector::Client(c),
            KeysTarget::Namespace(n) => KeySelector::Namespace(n),
            KeysTarget::Limit(l) => KeySelector::Limit(l),
        }
    }
}

/// The query's selector, or the problem naming what is wrong.
fn target(selecting: Selecting, request_id: &str) -> Result<KeysTarget, Refused> {
    match selecting {
        Selecting {
            key: Some(k),
            client: None,
            namespace: None,
            limit: None,
        } => Ok(KeysTarget::Key(k)),
        Selecting {
            key: None,
            client: Some(c),
            namespace: None,
            limit: None,
        } => Ok(KeysTarget::Client(c)),
        Selecting {
            key: None,
            client: None,
            namespace: Some(n),
            limit: None,
        } => Ok(KeysTarget::Namespace(n)),
        Selecting {
            key: None,
            client: None,
            namespace: None,
            limit: Some(l),
        } => Ok(KeysTarget::Limit(l)),
        _ => Err(Refused::new(
            Box::new(Problem::bad_request(
                "name exactly one of `key`, `client`, `namespace` or `limit`",
            )),
            request_id,
        )),
    }
}

/// The refusal of a request the store could not serve.
fn store_refusal(error: &StoreError, request_id: &str) -> Refused {
    let problem = Problem::new(
        "urn:tollgate:problem:store-unavailable",
        "Service Unavailable",
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the counter store failed: {error}"),
    );
    Refused::new(Box::new(problem), request_id)
}

/// `GET /admin/keys` counts the selected live counters; `DELETE` forgets them.
async fn keys<S: ServedStore, C: Clock>(
    State(state): State<Arc<AdminState<S, C>>>,
    method: Method,
    RequestId(request_id): RequestId,
    QueryParams(selecting): QueryParams<Selecting>,
) -> Result<Response, Refused> {
    let target = target(selecting, &request_id)?;
    let selector = target.selector();
    let store = state.engine.store();
    let answer = if method == Method::DELETE {
        store.reset(selector).await.map(|removed| {
            tracing::info!(request_id, ?selector, removed, "admin: counters reset");
            serde_json::json!({ "removed_keys": removed })
        })
    } else {
        let live = store.count(selector, state.engine.now()).await;
        live.map(|live| serde_json::json!({ "live_keys": live }))
    };
    answer
        .map(|body| axum::Json(body).into_response())
        .map_err(|e| store_refusal(&e, &request_id))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OneKey {
    key: String,
}

async fn inspect_key<S: ServedStore, C: Clock>(
    State(state): State<Arc<AdminState<S, C>>>,
    RequestId(request_id): RequestId,
    QueryParams(one): QueryParams<OneKey>,
) -> Result<Response, Refused> {
    let found = state
        .engine
        .store()
        .inspect(&one.key, state.engine.now())
        .await
        .map_err(|e| store_refusal(&e, &request_id))?;
    Ok(axum::Json(serde_json::json!({
        "key": one.key,
        "state": found.state,
        "banned_until": found.banned_until.map(|t| t.as_micros()),
    }))
    .into_response())
}

async fn diagnostics<S: ServedStore, C: Clock>(
    State(state): State<Arc<AdminState<S, C>>>,
) -> Response {
    let clock = state.engine.clock();
    let started = clock.now();
    let ping = state.engine.store().ping().await;
    let took = clock.now().saturating_since(started);
    let mut store = match ping {
        Ok(()) => serde_json::json!({ "ok": true, "latency_ms": took.as_secs_f64() * 1e3 }),
        Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
    };
    if let (Some(store), Ok(serde_json::Value::Object(health))) = (
        store.as_object_mut(),
        serde_json::to_value(state.engine.store().health()),
    ) {
        store.extend(health);
    }
    axum::Json(serde_json::json!({
        "store": store,
        "memory_evictions": state.engine.evictions(),
        "adaptive": state.engine.adaptive_summary(),
        "plan_version": state.engine.plan().version(),
        "build": { "version": env!("CARGO_PKG_VERSION") },
    }))
    .into_response()
}

/// `GET /metrics`: Prometheus's text format, reloads included.
async fn metrics<S: ServedStore, C: Clock>(State(state): State<Arc<AdminState<S, C>>>) -> Response {
    let status = state.reloader.status();
    super::metrics_response(
        &state.engine,
        &state.observers,
        Some((status.succeeded, status.failed)),
    )
}

/// `GET /admin/lists`: the runtime entries in force on this node (read from the store).
async fn lists<S: ServedStore, C: Clock>(
    State(state): State<Arc<AdminState<S, C>>>,
    RequestId(request_id): RequestId,
) -> Result<Response, Refused> {
    state
        .engine
        .refresh_runtime_lists()
        .await
        .map_err(|e| store_refusal(&e, &request_id))?;
    Ok(axum::Json(serde_json::json!({
        "entries": state.engine.runtime_lists().entries(),
    }))
    .into_response())
}

/// `POST /admin/lists` input: an entry, its duration instead of its end.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEntry {
    list: RuntimeList,
    #[serde(default)]
    net: Option<String>,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    for_seconds: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    delay_ms: Option<u64>,
}

/// What an entry holds for, as operators write it: exactly one of an address or network
/// (`net`), a client as counter keys name it (`client`), or a raw API token (`token`, hashed
/// here, never stored); or the problem with it.
fn entry_target(
    net: &Option<String>,
    client: &Option<String>,
    token: &Option<String>,
    hasher: &KeyHasher,
) -> Result<Target, Box<Problem>> {
    let field_problem = |field: &str, detail: String| {
        let mut p = Problem::bad_request(detail);
        p.field = Some(field.to_owned());
        Box::new(p)
    };
    match (net, client, token) {
        (Some(net), None, None) => network(net).map(Target::Net),
        (None, Some(client), None) => {
            // A key's address part is a network: the same entry as `net`.
            if let Some(net) = client
                .strip_prefix("ip:")
                .and_then(crate::plan::ipset::parse_net)
            {
                return Ok(Target::Net(net.trunc()));
            }
            let well_formed = client.len() <= MAX_CLIENT_LEN
                && client.split('+').all(|part| {
                    part.split_once(':')
                        .is_some_and(|(label, value)| !label.is_empty() && !value.is_empty())
                })
                && client.bytes().all(|b| b.is_ascii_graphic());
            if well_formed {
                Ok(Target::Client(client.clone()))
            } else {
                Err(field_problem(
                    "client",
                    format!(
                        "`{}` is not a client as counter keys name it, like `user:alice` \
                         or `token:<hash>` (at most {MAX_CLIENT_LEN} printable bytes)",
                        client.chars().take(64).collect::<String>()
                    ),
                ))
            }
        }
        (None, None, Some(token)) if !token.is_empty() && token.len() <= 4096 => {
            let mut client = String::new();
            let request = RequestCtx::new(http::Method::GET, "/").with_api_token(token);
            KeySource::ApiToken.write(&request, None, hasher, &mut client);
            Ok(Target::Client(client))
        }
        (None, None, Some(_)) => Err(field_problem(
            "token",
            "a `token` has 1 to 4096 bytes".to_owned(),
        )),
        _ => Err(field_problem(
            "net",
            "name exactly one of `net`, `client` or `token`".to_owned(),
        )),
    }
}

/// An address or a network, as operators write them.
fn network(text: &str) -> Result<ipnet::IpNet, Box<Problem>> {
    crate::plan::ipset::parse_net(text)
        .map(|n| n.trunc())
        .ok_or_else(|| {
            let mut p = Problem::bad_request(format!(
                "`{text}` is not an address or a network like `203.0.113.0/24`"
            ));
            p.field = Some("net".to_owned());
            Box::new(p)
        })
}

async fn add_entry<S: ServedStore, C: Clock>(
    State(state): State<Arc<AdminState<S, C>>>,
    RequestId(request_id): RequestId,
    JsonBody(input): JsonBody<NewEntry>,
) -> Result<Response, Refused> {
    let refused = |problem: Box<Problem>| Refused::new(problem, &request_id);
    let hasher = state.engine.key_hasher();
    let target = entry_target(&input.net, &input.client, &input.token, hasher).map_err(refused)?;
    check_entry(&input).map_err(refused)?;
    let now = state.engine.now();
    let entry = RuntimeEntry {
        list: input.list,
        target,
        until: input
            .for_seconds
            .map(|s| now.saturating_add(Duration::from_secs(s)).as_micros()),
        reason: input.reason,
        delay_ms: input.delay_ms,
    };
    state
        .engine
        .put_runtime_entry(&entry)
        .await
        .map_err(|e| store_refusal(&e, &request_id))?;
    tracing::info!(request_id, list = ?entry.list, target = %entry.target, until = ?entry.until, reason = ?entry.reason, "admin: runtime list entry added");
    Ok((StatusCode::CREATED, axum::Json(entry)).into_response())
}

/// The problem with a new entry's duration, reason or tarpit delay, if any.
fn check_entry(input: &NewEntry) -> Result<(), Box<Problem>> {
    let problem = |field: &str, detail: &str| {
        let mut p = Problem::bad_request(detail);
        p.field = Some(field.to_owned());
        Box::new(p)
    };
    let bounds = "`for_seconds` is at least 1; a `reason` at most 500 bytes";
    if input.for_seconds == Some(0) {
        return Err(problem("for_seconds", bounds));
    }
    if input.reason.as_ref().is_some_and(|r| r.len() > 500) {
        return Err(problem("reason", bounds));
    }
    let tarpit = input.list == RuntimeList::Tarpit;
    if tarpit != input.delay_ms.is_some() || input.delay_ms.is_some_and(|d| d == 0 || d > 30_000) {
        return Err(problem(
            "delay_ms",
            "`delay_ms` (1 to 30000) is required for a tarpit and refused for the other lists",
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryAt {
    list: RuntimeList,
    #[serde(default)]
    net: Option<String>,
    #[serde(default)]
    client: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

async fn remove_entry<S: ServedStore, C: Clock>(
    State(state): State<Arc<AdminState<S, C>>>,
    RequestId(request_id): RequestId,
    QueryParams(at): QueryParams<EntryAt>,
) -> Result<Response, Refused> {
    let target = entry_target(&at.net, &at.client, &at.token, state.engine.key_hasher())
        .map_err(|problem| Refused::new(problem, &request_id))?;
    let removed = state
        .engine
        .remove_runtime_entry(at.list, &target)
        .await
        .map_err(|e| store_refusal(&e, &request_id))?;
    tracing::info!(request_id, list = ?at.list, %target, removed, "admin: runtime list entry removed");
    Ok(axum::Json(serde_json::json!({ "removed": removed })).into_response())
}
