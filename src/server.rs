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

use crate::analytics::export::Exporting;
use crate::clock::{Clock, SystemClock};
use crate::config::{Environment, Settings, StoreClock};
use crate::diagnostic::PolicyErrors;
use crate::engine::Engine;
use crate::identity::{Identifier, JwtKeyError};
use crate::middleware::{HttpOptions, RateLimitLayer, ReadJsonBodyLayer};
pub use crate::observers::Observers;
use crate::pipeline::Pipeline;
use crate::plan::KeyHasher;
use crate::proxy::Upstream;
use crate::request::RequestCtx;
use crate::request::X_REQUEST_ID;
use crate::response::{self, Problem, problem_response};
use crate::store::redis::{BreakerSettings, RedisOptions, RedisStore};
use crate::store::{AnyStore, MemoryStore, ServedStore, Store};
use crate::verdict::{Action, Lease, SkippedLimit};
use crate::{PolicySet, compile};

mod admin;
mod admin_client;
mod decision;
#[cfg(feature = "envoy")]
mod envoy;
mod extract;
mod forward_auth;
mod health;
mod start;

pub use self::admin::{AdminState, admin_router};
pub use self::admin_client::{AdminClient, AdminError, AdminReply};
use self::decision::{check, release, report};
#[cfg(feature = "envoy")]
pub use self::envoy::{EnvoyService, serve_envoy};
use self::forward_auth::forward_auth;
use self::health::{not_found, ready, set_request_id};
pub use self::start::{build, identifier, load_plan, redis_options};

/// `X-Tollgate-Status`: the real status of a refusal, for nginx (which only understands 401
/// and 403 from an auth endpoint).
pub static X_TOLLGATE_STATUS: HeaderName = HeaderName::from_static("x-tollgate-status");
/// `X-Tollgate-Policy`: the limit or list that refused.
pub static X_TOLLGATE_POLICY: HeaderName = HeaderName::from_static("x-tollgate-policy");

/// What the handlers share.
pub struct AppState<S, C = SystemClock> {
    /// The pipeline every request goes through (its engine decides).
    pub pipeline: Arc<Pipeline<S, C>>,
    /// Its observers.
    pub observers: Observers<S, C>,
    /// Identity and header options.
    pub options: HttpOptions,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The application allowed requests go on to, if any.
    pub upstream: Option<Upstream>,
    /// Serve `/metrics` here too, without a token.
    pub metrics_on_main: bool,
}

impl<S: ServedStore, C: Clock> AppState<S, C> {
    /// The state of a server deciding with `engine` through `observers`' pipeline, reading
    /// requests with `options`; bodies up to 64 KiB, no upstream, `/metrics` on the admin
    /// listener only.
    pub fn new(
        engine: Arc<Engine<S, C>>,
        observers: Observers<S, C>,
        options: HttpOptions,
    ) -> Self {
        AppState {
            pipeline: Arc::new(observers.pipeline(engine)),
            observers,
            options,
            max_body_bytes: 64 * 1024,
            upstream: None,
            metrics_on_main: false,
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine<S, C>> {
        self.pipeline.engine()
    }
}

impl<S, C> extract::BodyLimit for AppState<S, C> {
    fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }
}

/// The server's routes around `state`.
pub fn router<S: ServedStore, C: Clock>(state: Arc<AppState<S, C>>) -> Router {
    let fallback = match &state.upstream {
        // Everything that is not Tollgate's own goes on to the application, rate-limited.
        Some(upstream) => Router::new()
            .fallback(crate::proxy::handler::<S, C>)
            .with_state(Arc::new(crate::proxy::ProxyState {
                upstream: upstream.clone(),
                engine: Arc::clone(state.engine()),
            }))
            .layer(
                RateLimitLayer::from_pipeline(Arc::clone(&state.pipeline))
                    .with_options(state.options.clone())
                    .keep_context(),
            )
            // Before deciding: the JSON body, for limits that reserve from it.
            .layer(ReadJsonBodyLayer::new(state.engine())),
        None => Router::new().fallback(not_found),
    };
    let own = if state.metrics_on_main {
        Router::new().route(
            "/metrics",
            get(|State(state): State<Arc<AppState<S, C>>>| async move {
                metrics_response(state.engine(), &state.observers, None)
            }),
        )
    } else {
        Router::new()
    };
    own.route("/v1/check", post(check::<S, C>))
        .route("/v1/release", post(release::<S, C>))
        .route("/v1/report", post(report::<S, C>))
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

/// `GET /metrics`: every family in Prometheus's text format (404 when nothing is counted).
/// `reloads`: the reloader's counts, when there is one.
pub fn metrics_response<S: ServedStore, C: Clock>(
    engine: &Engine<S, C>,
    observers: &Observers<S, C>,
    reloads: Option<(u64, u64)>,
) -> Response {
    let Some(metrics) = &observers.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are off").into_response();
    };
    let now = engine.now();
    let active_bans = engine
        .runtime_lists()
        .entries()
        .iter()
        .filter(|e| e.list == crate::store::runtime::RuntimeList::Denylist && e.live(now))
        .count();
    let plan = engine.plan();
    let body = metrics.render(&crate::metrics::Scrape {
        store: engine.store().health(),
        evictions: engine.evictions(),
        reloads,
        active_bans,
        plan_version: plan.version(),
        export: observers.exporting.as_ref().map(|e| e.exporter().stats()),
        adaptive: engine.adaptive_summary(),
    });
    (
        [(http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        body,
    )
        .into_response()
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
    /// Decisions cannot be exported as configured.
    #[error(transparent)]
    Export(#[from] crate::analytics::export::ExportError),
    /// `clickhouse_migrate` is set and the migrations failed.
    #[error("ClickHouse migrations failed: {0}")]
    Migrate(#[from] crate::analytics::MigrateError),
    /// Serving failed.
    #[error("the server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the server on `listener` until `shutdown` completes.
pub async fn run<S: ServedStore>(
    state: Arc<AppState<S>>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // Expired counters are dropped in the background, so that idle keys free their memory.
    // Evictions (live keys dropped at the memory cap) are reported once per sweep, with how
    // many: state was lost, and the cap may be too small.
    let sweeper = {
        let engine = Arc::clone(state.engine());
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
    // Runtime list entries (bans, safelisted addresses) are shared through the store: every
    // node reads them back each second. A failing store keeps the last ones read.
    let refresher = {
        let engine = Arc::clone(state.engine());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut failing = false;
            loop {
                tick.tick().await;
                match engine.refresh_runtime_lists().await {
                    Ok(_) => failing = false,
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(error = %e, "cannot read the runtime lists; the last ones read stay in force");
                    }
                    Err(_) => {}
                }
            }
        })
    };
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    // Answers go out as they are written: a streamed response's small frames (server-sent
    // events through the proxy) are not held back by Nagle's algorithm for the client's
    // delayed acknowledgement (40 ms on Linux).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
        }
    });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    sweeper.abort();
    refresher.abort();
    Ok(result?)
}

/// Watches the files of the Redis TLS certificates: once they have been quiet for
/// `debounce` after a change, they are read again and, when they differ from those in use
/// (`in_use` at first), put in use for new connections. A file that cannot be read, or certificates the server
/// refuses, keep the ones in use (the error is logged).
pub fn watch_redis_tls<C: Clock>(
    engine: Arc<Engine<AnyStore, C>>,
    files: crate::store::redis::RedisTlsFiles,
    in_use: Option<crate::store::redis::RedisTls>,
    debounce: Duration,
) -> Result<crate::reload::WatchGuard, notify::Error> {
    let current = Arc::new(tokio::sync::Mutex::new(in_use));
    crate::reload::watch_paths(&files.paths(), debounce, "Redis TLS", move || {
        let (engine, files, current) = (Arc::clone(&engine), files.clone(), Arc::clone(&current));
        async move {
            let mut current = current.lock().await;
            let tls = match files.read() {
                Ok(tls) => tls,
                Err(problems) => {
                    for (setting, problem) in problems {
                        tracing::warn!(
                            setting,
                            problem,
                            "Redis TLS files unreadable; the certificates in use stay"
                        );
                    }
                    return;
                }
            };
            if current.as_ref() == Some(&tls) {
                return;
            }
            match engine.store().rotate_tls(&tls).await {
                Ok(()) => {
                    tracing::info!("Redis TLS certificates reloaded: new connections use them");
                    *current = Some(tls);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the new Redis TLS certificates do not connect; the ones in use stay")
                }
            }
        }
    })
}

/// Binds `settings.listen` and runs until `shutdown`.
pub async fn serve(
    settings: &Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let state = build(settings).await?;
    let reloader = crate::reload::Reloader::new(Arc::clone(state.engine()), {
        let settings = settings.clone();
        move || load_plan(&settings)
    });
    // The policy files and the Cedar files they import, wherever those are.
    let mut watched = vec![settings.policies.clone()];
    for import in state.engine().plan().cedar_imports() {
        watched.push(import.policies.clone());
        watched.extend(import.schema.iter().chain(import.entities.iter()).cloned());
    }
    let _watching = reloader
        .watch(&watched, crate::reload::DEFAULT_DEBOUNCE)
        .map_err(|e| tracing::warn!(error = %e, "policy files are not watched: reload with SIGHUP"))
        .ok();
    let _tls_watch = settings.redis_tls_files.clone().and_then(|files| {
        let in_use = settings.redis_tls.clone();
        watch_redis_tls(Arc::clone(state.engine()), files, in_use, crate::reload::DEFAULT_DEBOUNCE)
            .map_err(|e| tracing::warn!(error = %e, "the Redis TLS files are not watched: rotating them needs a restart"))
            .ok()
    });
    #[cfg(unix)]
    let hangups = reloader.on_sighup()?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: settings.listen,
            source,
        })?;
    let admin = match &settings.admin_token {
        Some(token) => {
            let admin = Arc::new(AdminState {
                engine: Arc::clone(state.engine()),
                observers: state.observers.clone(),
                identifier: state.options.identifier.clone(),
                reloader: reloader.clone(),
                token: token.clone(),
            });
            let listener = tokio::net::TcpListener::bind(settings.admin_listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: settings.admin_listen,
                    source,
                })?;
            tracing::info!(listen = %settings.admin_listen, "admin API serving");
            let app = admin_router(admin);
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "the admin listener failed");
                }
            }))
        }
        None => {
            tracing::info!("admin API off: set admin_token to serve it on admin_listen");
            None
        }
    };
    // The gRPC listener stops with the HTTP one.
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let grpc = grpc_listener(settings, &state, stopped).await?;
    tracing::info!(listen = %settings.listen, env = ?settings.env, "tollgate serving");
    let shutdown = async move {
        shutdown.await;
        let _ = stopping.send(true);
    };
    let served = run(state, listener, shutdown).await;
    #[cfg(unix)]
    hangups.abort();
    if let Some(admin) = admin {
        admin.abort();
    }
    if let Some(grpc) = grpc
        && let Ok(Err(e)) = grpc.await
    {
        tracing::error!(error = %e, "the gRPC listener failed");
    }
    served
}

/// Envoy's rate-limit service on `grpc_listen`, when set, until `stopped` turns true.
async fn grpc_listener<S: ServedStore>(
    settings: &Settings,
    state: &Arc<AppState<S>>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<Result<(), ServeError>>>, ServeError> {
    let Some(addr) = settings.grpc_listen else {
        return Ok(None);
    };
    #[cfg(not(feature = "envoy"))]
    {
        let _ = (state, &mut stopped);
        Err(ServeError::Store(format!(
            "grpc_listen is {addr}, but this build has no gRPC service (the `envoy` feature)"
        )))
    }
    #[cfg(feature = "envoy")]
    {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        tracing::info!(listen = %addr, "Envoy's rate-limit service (gRPC) serving");
        let shutdown = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        Ok(Some(tokio::spawn(serve_envoy(
            Arc::clone(state),
            listener,
            shutdown,
        ))))
    }
}
