//! The reverse proxy of `tollgate serve --upstream URL`: allowed requests go on to the
//! application, bodies streamed both ways (nothing is buffered), hop-by-hop headers dropped,
//! `X-Forwarded-For`, `-Proto` and `-Host` added.
//!
//! WebSocket upgrades are relayed message by message. Limits that `counts messages` are
//! decided for each client message; over one, the connection is closed with code 1008
//! (policy violation) and the limit's reason. Limits that `counts bytes` pace streamed
//! response bodies: a chunk over the limit waits until it fits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::FromRequestParts;
use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite;

use crate::clock::Clock;
use crate::engine::Engine;
use crate::middleware::LayerContext;
use crate::plan::Counts;
use crate::request::RequestCtx;
use crate::store::Store;
use crate::verdict::Action;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::response::Problem;

/// Forwards requests to one upstream.
#[derive(Clone, Debug)]
pub struct Upstream {
    base: Uri,
    client: Client<HttpConnector, Body>,
}

impl Upstream {
    /// A proxy to `base` (`http://host:port`, maybe with a path prefix).
    pub fn new(base: Uri) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Upstream {
            base,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    fn target(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let prefix = self.base.path().trim_end_matches('/');
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        Uri::builder()
            .scheme(self.base.scheme_str().unwrap_or("http"))
            .authority(self.base.authority().map_or("", |a| a.as_str()))
            .path_and_query(format!("{prefix}{path}"))
            .build()
    }

    fn websocket_target(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let http = self.target(uri)?;
        let scheme = if http.scheme_str() == Some("https") {
            "wss"
        } else {
            "ws"
        };
        Uri::builder()
            .scheme(scheme)
            .authority(http.authority().map_or("", |a| a.as_str()))
            .path_and_query(http.path_and_query().map_or("/", |p| p.as_str()))
            .build()
    }

    /// Sends `request` on and streams the answer back; 502 when the upstream cannot be
    /// reached.
    pub async fn forward(&self, peer: SocketAddr, mut request: Request) -> Response {
        let target = match self.target(request.uri()) {
            Ok(t) => t,
            Err(e) => return bad_gateway(format!("cannot build the upstream URI: {e}")),
        };
        let host = request.headers().get(http::header::HOST).cloned();
        strip_hop_by_hop(request.headers_mut());
        let headers = request.headers_mut();
        let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(chain) => format!("{chain}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
            headers.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("http"),
        );
        if let Some(host) = host {
            headers.insert(HeaderName::from_static("x-forwarded-host"), host);
        }
        headers.remove(http::header::HOST);
        *request.uri_mut() = target;
        match self.client.request(request).await {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Body::new(body))
            }
            Err(e) => bad_gateway(format!("the upstream did not answer: {e}")),
        }
    }
}

/// Drops the headers that belong to one connection, not to the message (RFC 9110 §7.6.1),
/// including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

fn bad_gateway(detail: String) -> Response {
    tracing::warn!(%detail, "proxy");
    let problem = Problem::new(
        "urn:tollgate:problem:bad-gateway",
        "Bad Gateway",
        StatusCode::BAD_GATEWAY,
        detail,
    );
    let mut response = (StatusCode::BAD_GATEWAY, problem.to_json()).into_response();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// What the proxy handler needs: where to forward, and the engine for message and byte
/// limits.
pub struct ProxyState<S, C> {
    /// The application.
    pub upstream: Upstream,
    /// The engine deciding messages and bytes.
    pub engine: Arc<Engine<S, C>>,
}

static CONNECTIONS: AtomicU64 = AtomicU64::new(1);

/// The axum handler: forwards whatever reaches it. The request-phase limits have already
/// been applied by the [`RateLimitLayer`](crate::RateLimitLayer) around it, which left its
/// context in the request (`keep_context`): WebSocket messages and streamed bytes are
/// decided with that context, not by reading the request again.
pub async fn handler<S: Store, C: Clock>(
    State(state): State<Arc<ProxyState<S, C>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Response {
    let is_websocket = request
        .headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let kept = request.extensions_mut().remove::<LayerContext>();
    let paced = state.engine.plan_guard().counts_bytes();
    let Some(LayerContext(mut ctx)) = kept.filter(|_| is_websocket || paced) else {
        // Nothing to count past the request itself, which the layer already decided.
        return state.upstream.forward(peer, request).await;
    };
    // The stream's own view of the request: the layer's, with the headers it gave back.
    ctx.headers = request.headers().clone();
    ctx.connection_id = Some(CONNECTIONS.fetch_add(1, Ordering::Relaxed));
    if is_websocket {
        return websocket(state, ctx, request).await;
    }
    let response = state.upstream.forward(peer, request).await;
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, pace(Arc::clone(&state.engine), ctx, body))
}

/// The body, streamed with every `counts bytes` limit of the plan decided for each chunk: a
/// chunk over a limit waits (on tokio's timer) until it fits. Without such limits, the body
/// as it is.
pub fn pace<S: Store, C: Clock>(engine: Arc<Engine<S, C>>, ctx: RequestCtx, body: Body) -> Body {
    if !engine.plan_guard().counts_bytes() {
        return body;
    }
    let ctx = Arc::new(ctx);
    let chunks = body.into_data_stream().then(move |chunk| {
        let engine = Arc::clone(&engine);
        let ctx = Arc::clone(&ctx);
        async move {
            let chunk = chunk?;
            // Bounded: a chunk that can never fit (larger than a whole burst) goes after the
            // last wait rather than never.
            for _ in 0..64 {
                let verdict = engine
                    .decide_units(&ctx, Counts::Bytes, chunk.len() as u64)
                    .await;
                match verdict.action {
                    Action::Reject {
                        retry_after: Some(wait),
                        ..
                    } => tokio::time::sleep(wait).await,
                    _ => break,
                }
            }
            Ok::<_, axum::Error>(chunk)
        }
    });
    Body::from_stream(chunks)
}

async fn websocket<S: Store, C: Clock>(
    state: Arc<ProxyState<S, C>>,
    ctx: RequestCtx,
    request: Request,
) -> Response {
    let (mut parts, _body) = request.into_parts();
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(rejection) => return rejection.into_response(),
    };
    let target = match state.upstream.websocket_target(&parts.uri) {
        Ok(t) => t,
        Err(e) => return bad_gateway(format!("cannot build the upstream URI: {e}")),
    };
    let mut upstream_request =
        match tungstenite::client::IntoClientRequest::into_client_request(target.to_string()) {
            Ok(r) => r,
            Err(e) => return bad_gateway(format!("cannot build the upstream request: {e}")),
        };
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if !n.starts_with("sec-websocket") && !matches!(n, "host" | "connection" | "upgrade") {
            upstream_request
                .headers_mut()
                .append(name.clone(), value.clone());
        }
    }
    let upstream = match tokio_tungstenite::connect_async(upstream_request).await {
        Ok((stream, _)) => stream,
        Err(e) => return bad_gateway(format!("the upstream refused the WebSocket: {e}")),
    };
    upgrade.on_upgrade(move |client| relay(state, ctx, client, upstream))
}

/// Relays messages both ways until either side closes or a message limit is exceeded.
async fn relay<S: Store, C: Clock>(
    state: Arc<ProxyState<S, C>>,
    ctx: RequestCtx,
    client: WebSocket,
    upstream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) {
    let (mut to_client, mut from_client) = client.split();
    let (mut to_upstream, mut from_upstream) = upstream.split();
    loop {
        tokio::select! {
            message = from_client.next() => {
                let Some(Ok(message)) = message else { break };
                if matches!(message, ws::Message::Text(_) | ws::Message::Binary(_)) {
                    let verdict = state.engine.decide_units(&ctx, Counts::Messages, 1).await;
                    if !verdict.is_allowed() {
                        let reason = match &verdict.action {
                            Action::Reject { reason: Some(r), .. } => r.to_string(),
                            Action::Reject { limit, .. } => format!("message limit `{limit}` exceeded"),
                            _ => "refused".to_owned(),
                        };
                        tracing::info!(%reason, "closing a WebSocket over its message limit");
                        let frame = ws::CloseFrame {
                            code: 1008,
                            reason: truncate(&reason, 120).into(),
                        };
                        let _ = to_client.send(ws::Message::Close(Some(frame))).await;
                        let _ = to_upstream.send(tungstenite::Message::Close(None)).await;
                        break;
                    }
                }
                let forwarded = match message {
                    ws::Message::Text(t) => tungstenite::Message::text(t.as_str()),
                    ws::Message::Binary(b) => tungstenite::Message::binary(b),
                    ws::Message::Ping(p) => tungstenite::Message::Ping(p),
                    ws::Message::Pong(p) => tungstenite::Message::Pong(p),
                    ws::Message::Close(_) => {
                        let _ = to_upstream.send(tungstenite::Message::Close(None)).await;
                        break;
                    }
                };
                if to_upstream.send(forwarded).await.is_err() {
                    break;
                }
            }
            message = from_upstream.next() => {
                let Some(Ok(message)) = message else { break };
                let forwarded = match message {
                    tungstenite::Message::Text(t) => ws::Message::Text(t.as_str().into()),
                    tungstenite::Message::Binary(b) => ws::Message::Binary(b),
                    tungstenite::Message::Ping(p) => ws::Message::Ping(p),
                    tungstenite::Message::Pong(p) => ws::Message::Pong(p),
                    tungstenite::Message::Close(_) => {
                        let _ = to_client.send(ws::Message::Close(None)).await;
                        break;
                    }
                    tungstenite::Message::Frame(_) => continue,
                };
                if to_client.send(forwarded).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// At most `max` bytes, cut at a character boundary (close reasons are limited to 123).
fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
