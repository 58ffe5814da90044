//! Reading an `http::Request`: its path (made canonical in the request itself), headers,
//! host, matched route and peer address, and its request id.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, MatchedPath};
use http::{HeaderMap, HeaderName, Request};

use super::{PathError, RequestCtx, normalize_host};

/// `X-Request-Id`
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

impl RequestCtx {
    /// The engine's view of an HTTP request, and the address of the peer that sent it (from
    /// axum's `ConnectInfo`, a `SocketAddr` extension, or tonic's connection info); who the
    /// client is, is for an [`Identifier`](crate::identity::Identifier) to say.
    ///
    /// The headers are moved, not copied; the caller puts them back. The request's path is
    /// replaced by its canonical form, so that what follows (the application, the upstream)
    /// sees the path that was limited; a path that cannot be normalized safely is refused.
    pub fn from_http<B>(
        request: &mut Request<B>,
    ) -> Result<(RequestCtx, Option<IpAddr>), PathError> {
        let path_and_query = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut ctx = RequestCtx::try_new(request.method().clone(), path_and_query)?;
        if ctx.path != request.uri().path() {
            set_path(request.uri_mut(), &ctx.path);
        }
        ctx.headers = std::mem::take(request.headers_mut());
        ctx.host = request
            .uri()
            .host()
            .or_else(|| {
                ctx.headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .map(normalize_host);
        ctx.route_template = request
            .extensions()
            .get::<MatchedPath>()
            .map(|m| m.as_str().to_owned());
        Ok((ctx, peer(request.extensions())))
    }
}

/// The peer's address, from whichever server put it in the extensions.
fn peer(extensions: &http::Extensions) -> Option<IpAddr> {
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .or_else(|| extensions.get::<SocketAddr>().map(|a| a.ip()));
    #[cfg(feature = "tonic")]
    let peer = peer.or_else(|| {
        extensions
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|c| c.remote_addr())
            .map(|a| a.ip())
    });
    peer
}

/// Replaces `uri`'s path, keeping its scheme, authority and query.
fn set_path(uri: &mut http::Uri, path: &str) {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = std::mem::take(uri).into_parts();
    // A canonical path is a valid one: every character it holds is allowed in a URI.
    parts.path_and_query = path_and_query.parse().ok();
    if let Ok(new) = http::Uri::from_parts(parts) {
        *uri = new;
    }
}

/// The request's id: its `X-Request-Id` when well-formed (1–128 of `A–Z a–z 0–9 . _ -`),
/// else a new random one.
pub fn request_id(headers: &HeaderMap) -> String {
    request_id_from(headers.get(&X_REQUEST_ID).and_then(|v| v.to_str().ok()))
}

/// The id a request carries (`X-Request-Id`, or gRPC's `x-request-id` metadata) when
/// well-formed, else a new random one.
pub fn request_id_from(carried: Option<&str>) -> String {
    carried
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        .map_or_else(new_request_id, str::to_owned)
}

/// A new id: 16 hex digits drawn once per process, then a counter in 16 more. Unique per
/// process and across processes with overwhelming probability; cheap enough for every
/// request.
fn new_request_id() -> String {
    use std::cell::Cell;
    // Per thread: a random prefix and a counter, so that threads never share a cache line.
    thread_local! {
        static NEXT: Cell<(u64, u64)> = Cell::new((rand::random(), 0));
    }
    let (prefix, n) = NEXT.with(|next| {
        let (prefix, n) = next.get();
        next.set((prefix, n.wrapping_add(1)));
        (prefix, n)
    });
    let mut digits = [0u8; 32];
    hex(&mut digits[..16], prefix);
    hex(&mut digits[16..], n);
    // Hex digits are ASCII: the conversion cannot fail.
    String::from_utf8(digits.to_vec()).unwrap_or_default()
}

/// Writes `n` as lowercase hex digits into `out`, the last digit last.
fn hex(out: &mut [u8], mut n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// The media type `headers` say the body is (`Content-Type` without its parameters,
/// lowercased); empty when they say none.
pub fn media_type(headers: &http::HeaderMap) -> String {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// Whether `media_type` is JSON: `application/json`, or a `…+json` type.
pub fn is_json_media(media_type: &str) -> bool {
    media_type == "application/json" || media_type.ends_with("+json")
}
