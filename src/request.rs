//! What the engine knows about one request.

pub mod amount;
mod descriptor;
mod incoming;
pub mod path;
mod value;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

pub use self::amount::JsonPath;
pub use self::descriptor::{Descriptor, LimitOverride, REMOTE_ADDRESS, SHOULD_RATE_LIMIT};
pub use self::incoming::{X_REQUEST_ID, is_json_media, media_type, request_id, request_id_from};
pub use self::path::PathError;
pub use self::value::{KeyHasher, ValueFrom};

/// One request as the engine sees it: method, path, host, headers, client address, and the
/// identities that the middleware established (user, token, claims).
#[derive(Debug, Clone)]
pub struct RequestCtx {
    /// The method.
    pub method: Method,
    /// The path in its canonical form (see [`path`]), without the query string.
    pub path: String,
    /// The query string, without `?`.
    pub query: Option<String>,
    /// The host, lowercase, without port.
    pub host: Option<String>,
    /// The headers.
    pub headers: HeaderMap,
    /// The client's address, after trusted-proxy resolution.
    pub client_ip: Option<IpAddr>,
    /// The authenticated user, if any.
    pub user_id: Option<String>,
    /// The API token presented, if any (it is hashed before any use).
    pub api_token: Option<String>,
    /// Claims of a verified token.
    pub claims: BTreeMap<String, String>,
    /// The route template the application matched (axum's `MatchedPath`), if known.
    pub route_template: Option<String>,
    /// A cost that overrides every limit's `cost` (the decision API's `cost` field).
    pub cost: Option<u64>,
    /// The connection's id, for `connection` keys (WebSockets, streamed responses).
    pub connection_id: Option<u64>,
    /// Whether the headers come from a trusted proxy (or a decision API caller that says
    /// they do): only then do header-derived identities and tiers count, unless the
    /// policy marks the header `trusted`.
    pub headers_trusted: bool,
    /// For a descriptor of an Envoy rate-limit request (gRPC): its domain and entries. Only
    /// limits, lists and anomalies whose conditions name `domain` or `descriptor` meet these
    /// requests, and only these requests meet them.
    pub descriptor: Option<Box<Descriptor>>,
    /// The request's JSON body, when a limit reads its reservation from it (`reserve
    /// json(…)`) and the body was read (see `docs/language.md` for the cap).
    pub body: Option<std::sync::Arc<serde_json::Value>>,
}

/// A header name or value that HTTP does not allow.
#[derive(Debug, thiserror::Error)]
#[error("invalid header `{0}`")]
pub struct InvalidHeader(String);

impl RequestCtx {
    /// A request for `path_and_query` (`/a/b?x=1`) with `method` and nothing else known, its
    /// path normalized, or refused when it cannot be normalized safely (see [`path`]).
    pub fn try_new(method: Method, path_and_query: &str) -> Result<Self, PathError> {
        let (raw, query) = split_query(path_and_query);
        let path = path::normalize(raw)?.into_owned();
        Ok(Self::with_parts(method, path, query))
    }

    /// Like [`RequestCtx::try_new`], for a path known to be well formed: one that cannot be
    /// normalized safely is kept as given (and matches no route template that its
    /// normalized form would). Entry points that take paths from clients use `try_new`.
    pub fn new(method: Method, path_and_query: &str) -> Self {
        let (raw, query) = split_query(path_and_query);
        let path = path::normalize(raw).map_or_else(|_| raw.to_owned(), Cow::into_owned);
        Self::with_parts(method, path, query)
    }

    fn with_parts(method: Method, path: String, query: Option<String>) -> Self {
        RequestCtx {
            method,
            path,
            query,
            host: None,
            headers: HeaderMap::new(),
            client_ip: None,
            user_id: None,
            api_token: None,
            claims: BTreeMap::new(),
            route_template: None,
            cost: None,
            connection_id: None,
            headers_trusted: false,
            descriptor: None,
            body: None,
        }
    }

    /// Sets the client address.
    pub fn with_client_ip(mut self, ip: IpAddr) -> Self {
        self.client_ip = Some(ip);
        self
    }

    /// Sets the host (lowercased, port removed).
    pub fn with_host(mut self, host: &str) -> Self {
        self.host = Some(normalize_host(host));
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        if name == http::header::HOST && self.host.is_none() {
            self.host = value.to_str().ok().map(normalize_host);
        }
        self.headers.append(name, value);
        self
    }

    /// Adds a header given as text, refusing names and values HTTP does not allow.
    pub fn try_header(self, name: &str, value: &str) -> Result<Self, InvalidHeader> {
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| InvalidHeader(name.to_owned()))?;
        let value =
            HeaderValue::from_str(value.trim()).map_err(|_| InvalidHeader(name.to_string()))?;
        Ok(self.with_header(name, value))
    }

    /// Sets the authenticated user.
    pub fn with_user_id(mut self, user: impl Into<String>) -> Self {
        self.user_id = Some(user.into());
        self
    }

    /// Sets the API token presented.
    pub fn with_api_token(mut self, token: impl Into<String>) -> Self {
        self.api_token = Some(token.into());
        self
    }

    /// Adds a claim of a verified token.
    pub fn with_claim(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.claims.insert(name.into(), value.into());
        self
    }

    /// Sets the route template the application matched.
    pub fn with_route_template(mut self, template: impl Into<String>) -> Self {
        self.route_template = Some(template.into());
        self
    }

    /// Marks the headers as set by a trusted proxy: header-derived identities and tiers
    /// count.
    pub fn with_trusted_headers(mut self) -> Self {
        self.headers_trusted = true;
        self
    }

    /// Sets a cost that overrides every limit's own.
    pub fn with_cost(mut self, cost: u64) -> Self {
        self.cost = Some(cost);
        self
    }

    /// A header's value as text, if present and printable.
    pub fn header(&self, name: &HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A query parameter's raw value.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    }
}

/// The path and the query string (without `?`) of `path_and_query`.
fn split_query(path_and_query: &str) -> (&str, Option<String>) {
    match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (path_and_query, None),
    }
}

/// A host as conditions compare it: lowercase, without port.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    // `[v6]:port`, `name:port`: drop the port, keep a bare IPv6 address whole.
    let without_port = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or(host)
    } else {
        host
    };
    let mut host = without_port.to_owned();
    host.make_ascii_lowercase();
    host
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_query_and_normalizes_host() {
        let r = RequestCtx::new(Method::GET, "/a?x=1&y=2")
            .try_header("Host", "API.Example.com:8443")
            .unwrap();
        assert_eq!(r.path, "/a");
        assert_eq!(r.query_param("y"), Some("2"));
        assert_eq!(r.query_param("z"), None);
        assert_eq!(r.host.as_deref(), Some("api.example.com"));
        assert!(
            RequestCtx::new(Method::GET, "/")
                .try_header("bad name", "v")
                .is_err()
        );
    }
}
