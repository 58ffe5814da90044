//! The reverse proxy of `tollgate serve --upstream URL`: allowed requests go on to the
//! application, bodies streamed both ways (nothing is buffered), hop-by-hop headers dropped,
//! `X-Forwarded-For`, `-Proto` and `-Host` added.

use std::net::SocketAddr;

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

/// The axum handler: forwards whatever reaches it.
pub async fn handler(
    State(upstream): State<Upstream>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    upstream.forward(peer, request).await
}
