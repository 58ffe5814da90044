//! The request data of Envoy's rate-limit service: a domain and one descriptor (ordered
//! `key`/`value` entries), asked about over gRPC (`envoy.service.ratelimit.v3`).

use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::Arc;

use http::Method;

use super::RequestCtx;

/// The gRPC method Envoy calls: the path a descriptor request is recorded with.
pub const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// The descriptor entry Envoy's `remote_address` action writes: the client's address.
pub const REMOTE_ADDRESS: &str = "remote_address";

/// One descriptor of an Envoy rate-limit request, with the request's domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// The domain (`RateLimitRequest.domain`).
    pub domain: String,
    /// The entries, in order.
    pub entries: Vec<(String, String)>,
    /// The rate Envoy asks to count instead of the limits' own (`RateLimitDescriptor.limit`).
    pub limit: Option<LimitOverride>,
    /// Limits that do not count this descriptor: another descriptor of the same request met
    /// a limit that `replaces` them.
    pub replaced: Vec<Arc<str>>,
}

/// A rate sent with a descriptor, counted instead of the rate of each limit that counts the
/// descriptor (with the limit's algorithm), on a counter of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitOverride {
    /// Requests (or hits) per unit.
    pub requests: NonZeroU64,
    /// The unit, in microseconds.
    pub per_micros: NonZeroU64,
}

impl Descriptor {
    /// A descriptor of `domain` with `entries`.
    pub fn new(domain: impl Into<String>, entries: Vec<(String, String)>) -> Self {
        Descriptor {
            domain: domain.into(),
            entries,
            limit: None,
            replaced: Vec::new(),
        }
    }

    /// The same descriptor, counted at `limit` instead of its limits' own rates.
    pub fn with_limit(mut self, limit: LimitOverride) -> Self {
        self.limit = Some(limit);
        self
    }

    /// The value of the first entry with `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The entries as `key=value` joined by `, ` (for explanations).
    pub fn shown(&self) -> String {
        let entries: Vec<String> = self
            .entries
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        entries.join(", ")
    }
}

impl RequestCtx {
    /// The request one descriptor of an Envoy rate-limit request stands for: `POST` to the
    /// service's method, its client address the `remote_address` entry when it is one (Envoy
    /// writes the downstream address there), nothing else known.
    pub fn for_descriptor(descriptor: Descriptor) -> Self {
        let client_ip = descriptor
            .get(REMOTE_ADDRESS)
            .and_then(|v| v.parse::<IpAddr>().ok());
        let mut request = RequestCtx::new(Method::POST, SHOULD_RATE_LIMIT);
        request.client_ip = client_ip;
        request.descriptor = Some(Box::new(descriptor));
        request
    }

    /// The domain, for a descriptor request.
    pub fn domain(&self) -> Option<&str> {
        self.descriptor.as_ref().map(|d| d.domain.as_str())
    }

    /// A descriptor entry's value, for a descriptor request.
    pub fn descriptor_value(&self, key: &str) -> Option<&str> {
        self.descriptor.as_ref()?.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_remote_address_entry_is_the_client_address() {
        let d = Descriptor::new(
            "edge",
            vec![
                ("remote_address".into(), "203.0.113.7".into()),
                ("path".into(), "/login".into()),
            ],
        );
        let r = RequestCtx::for_descriptor(d);
        assert_eq!(r.client_ip, Some("203.0.113.7".parse().unwrap()));
        assert_eq!(r.domain(), Some("edge"));
        assert_eq!(r.descriptor_value("path"), Some("/login"));
        assert_eq!(r.descriptor_value("nope"), None);
        let masked = Descriptor::new(
            "edge",
            vec![("remote_address".into(), "203.0.113.0/24".into())],
        );
        assert_eq!(RequestCtx::for_descriptor(masked).client_ip, None);
        let plain = RequestCtx::new(Method::GET, "/");
        assert_eq!(
            (plain.domain(), plain.descriptor_value("path")),
            (None, None)
        );
    }
}
