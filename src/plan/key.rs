//! Keys: what a limit counts by, evaluated per request, with secrets hashed.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderName;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

mod counter;

pub use self::counter::{
    BAN_SUFFIX, CounterKey, CounterKeyParts, FIRED_SUFFIX, ban_key, is_ban_key,
};
pub use crate::request::KeyHasher;
use crate::request::RequestCtx;

/// The client part of a counter key: parts joined by `+`, each `source:value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// The parts; every one must have a value for the key to have one.
    pub parts: Vec<KeyPart>,
}

/// One part of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPart {
    /// The first source that has a value.
    FirstOf(Vec<KeySource>),
    /// A single source.
    One(KeySource),
}

/// A source of a key value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The client address, grouped by prefix length per family.
    Ip {
        /// Prefix length for IPv4 clients.
        v4: u8,
        /// Prefix length for IPv6 clients.
        v6: u8,
    },
    /// The authenticated user.
    UserId,
    /// The API token, hashed.
    ApiToken,
    /// A header; `secret` headers are hashed.
    Header {
        /// The header.
        name: HeaderName,
        /// Whether its value is a credential.
        secret: bool,
        /// Believed from any client (`header("…") trusted`), not only when the request's
        /// headers come from a trusted proxy.
        trusted: bool,
    },
    /// A claim of the verified token.
    Claim(Arc<str>),
    /// A query parameter.
    Query(Arc<str>),
    /// An entry of an Envoy rate-limit request's descriptor; `secret` ones are hashed.
    Descriptor {
        /// The entry's key.
        key: Arc<str>,
        /// Whether its value is a credential (the key's name says so).
        secret: bool,
    },
    /// The domain of an Envoy rate-limit request.
    Domain,
    /// The route template that matched.
    Route,
    /// The method.
    Method,
    /// The host.
    Host,
    /// One counter shared by every client.
    Global,
    /// The connection (a WebSocket, a streamed response): one counter per connection.
    Connection,
}

impl KeySpec {
    /// The first part of the key that a request may lack (a user, a header…), in words;
    /// `None` when every request has a value for every part.
    pub fn may_be_missing(&self) -> Option<&'static str> {
        self.may_be_missing_unless(|_| false)
    }

    /// [`KeySpec::may_be_missing`], for requests known to have a value for the sources
    /// `present` says (a descriptor entry the conditions require).
    pub fn may_be_missing_unless(
        &self,
        present: impl Fn(&KeySource) -> bool,
    ) -> Option<&'static str> {
        let missing = |s: &KeySource| if present(s) { None } else { s.may_be_missing() };
        self.parts.iter().find_map(|part| match part {
            KeyPart::One(source) => missing(source),
            KeyPart::FirstOf(sources) => {
                let missing: Vec<_> = sources.iter().map(missing).collect();
                missing
                    .iter()
                    .all(Option::is_some)
                    .then(|| missing[0])
                    .flatten()
            }
        })
    }
}

impl KeySource {
    /// What a request may lack for this source to have a value, in words. The address counts
    /// as always known (HTTP has a peer); a decision API caller that leaves it out meets
    /// `on_missing_key`.
    fn may_be_missing(&self) -> Option<&'static str> {
        match self {
            KeySource::UserId => Some("user_id"),
            KeySource::ApiToken => Some("api_token"),
            KeySource::Header { .. } => Some("a header"),
            KeySource::Claim(_) => Some("a claim"),
            KeySource::Query(_) => Some("a query parameter"),
            KeySource::Descriptor { .. } => Some("a descriptor entry"),
            KeySource::Host => Some("host"),
            KeySource::Connection => Some("connection"),
            // Every Envoy rate-limit request has a domain (HTTP requests cannot name it).
            KeySource::Ip { .. }
            | KeySource::Route
            | KeySource::Method
            | KeySource::Global
            | KeySource::Domain => None,
        }
    }
}

/// Header names whose values are credentials: hashed before use.
pub(crate) fn is_secret_header(name: &HeaderName) -> bool {
    is_secret_name(name.as_str())
}

/// Names (of headers, of descriptor entries) whose values are credentials, in any case and
/// with `_` or `-`: `authorization`, `cookie`, `x-api-key`, `api_key`, anything with
/// `token` or `secret`.
pub(crate) fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase().replace('_', "-");
    matches!(
        n.as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "x-api-key"
    ) || n.contains("token")
        || n.contains("secret")
        || n.contains("api-key")
        || n.contains("apikey")
        || n.contains("password")
}

/// Values longer than this are hashed, so that keys stay short.
const MAX_VALUE_LEN: usize = 96;

impl KeySpec {
    /// The client part of the key for `request`, or `None` when a part has no value.
    /// `route` is the template that matched for this limit.
    pub fn eval(
        &self,
        request: &RequestCtx,
        route: Option<&str>,
        hasher: &KeyHasher,
    ) -> Option<String> {
        let mut out = String::with_capacity(48);
        self.write(request, route, hasher, &mut out).then_some(out)
    }

    /// Appends the client part of the key to `out`; `false` (with `out` in an unspecified
    /// state) when a part has no value.
    pub fn write(
        &self,
        request: &RequestCtx,
        route: Option<&str>,
        hasher: &KeyHasher,
        out: &mut String,
    ) -> bool {
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                out.push('+');
            }
            let written = match part {
                KeyPart::One(source) => source.write(request, route, hasher, out),
                KeyPart::FirstOf(sources) => {
                    sources.iter().any(|s| s.write(request, route, hasher, out))
                }
            };
            if !written {
                return false;
            }
        }
        true
    }

    /// The first part that has no value for `request`, in words.
    pub fn missing_part(&self, request: &RequestCtx) -> Option<String> {
        let hasher = KeyHasher::new([0; 32]);
        let mut scratch = String::new();
        self.parts.iter().find_map(|part| {
            let sources: &[KeySource] = match part {
                KeyPart::One(source) => std::slice::from_ref(source),
                KeyPart::FirstOf(sources) => sources,
            };
            let any = sources
                .iter()
                .any(|s| s.write(request, None, &hasher, &mut scratch));
            (!any).then(|| {
                let names: Vec<String> = sources
                    .iter()
                    .map(|s| match s {
                        KeySource::Header {
                            trusted: false,
                            name,
                            ..
                        } if !request.headers_trusted && request.headers.contains_key(name) => {
                            format!(
                                "{} (sent, but not believed from a client that is not a \
                                 trusted proxy)",
                                s.describe()
                            )
                        }
                        _ => s.describe(),
                    })
                    .collect();
                names.join(" or ")
            })
        })
    }

    /// Whether the key is the same for every request.
    pub fn is_global(&self) -> bool {
        self.parts
            .iter()
            .all(|p| matches!(p, KeyPart::One(KeySource::Global)))
    }
}

impl KeySource {
    /// The source as written in policies.
    pub fn describe(&self) -> String {
        match self {
            KeySource::Ip { v4: 32, v6: 64 } => "ip".to_owned(),
            KeySource::Ip { v4, v6: 64 } => format!("ip/{v4}"),
            KeySource::Ip { v6, .. } => format!("ip/{v6}"),
            KeySource::UserId => "user_id".to_owned(),
            KeySource::ApiToken => "api_token".to_owned(),
            KeySource::Header {
                name,
                trusted: true,
                ..
            } => format!("header(\"{name}\") trusted"),
            KeySource::Header { name, .. } => format!("header(\"{name}\")"),
            KeySource::Claim(c) => format!("claim(\"{c}\")"),
            KeySource::Query(q) => format!("query(\"{q}\")"),
            KeySource::Descriptor { key, .. } => format!("descriptor(\"{key}\")"),
            KeySource::Domain => "domain".to_owned(),
            KeySource::Route => "route".to_owned(),
            KeySource::Method => "method".to_owned(),
            KeySource::Host => "host".to_owned(),
            KeySource::Global => "global".to_owned(),
            KeySource::Connection => "connection".to_owned(),
        }
    }

    /// Appends `label:value` to `out`; `false` (and nothing appended) when there is no value.
    pub(crate) fn write(
        &self,
        r: &RequestCtx,
        route: Option<&str>,
        hasher: &KeyHasher,
        out: &mut String,
    ) -> bool {
        let (label, value): (&str, std::borrow::Cow<'_, str>) = match self {
            KeySource::Ip { v4, v6 } => {
                let Some(ip) = r.client_ip else { return false };
                out.push_str("ip:");
                write_net(out, group(ip, *v4, *v6));
                return true;
            }
            KeySource::UserId => match &r.user_id {
                Some(u) => ("user", u.into()),
                None => return false,
            },
            KeySource::ApiToken => match &r.api_token {
                Some(t) => ("token", hasher.hash(t).into()),
                None => return false,
            },
            // A header a client may write names nothing unless a trusted proxy set it, or
            // the policy believes it from anyone.
            KeySource::Header { trusted: false, .. } if !r.headers_trusted => return false,
            KeySource::Header { name, secret, .. } => match r.header(name) {
                Some(v) if *secret => {
                    out.push_str("h.");
                    out.push_str(name.as_str());
                    out.push_str(":#");
                    out.push_str(&hasher.hash(v));
                    return true;
                }
                Some(v) => {
                    out.push_str("h.");
                    out.push_str(name.as_str());
                    ("", v.into())
                }
                None => return false,
            },
            KeySource::Claim(name) => match r.claims.get(&**name) {
                Some(v) => {
                    out.push_str("claim.");
                    out.push_str(name);
                    ("", v.into())
                }
                None => return false,
            },
            KeySource::Query(name) => match r.query_param(name) {
                Some(v) => {
                    out.push_str("q.");
                    out.push_str(name);
                    ("", v.into())
                }
                None => return false,
            },
            KeySource::Descriptor { key, secret } => match r.descriptor_value(key) {
                Some(v) if *secret => {
                    out.push_str("d.");
                    push_escaped(out, key, hasher);
                    out.push_str(":#");
                    out.push_str(&hasher.hash(v));
                    return true;
                }
                Some(v) => {
                    out.push_str("d.");
                    push_escaped(out, key, hasher);
                    ("", v.into())
                }
                None => return false,
            },
            KeySource::Domain => match r.domain() {
                Some(d) => ("domain", d.into()),
                None => return false,
            },
            KeySource::Route => (
                "route",
                route
                    .or(r.route_template.as_deref())
                    .unwrap_or(&r.path)
                    .into(),
            ),
            KeySource::Method => ("method", r.method.as_str().into()),
            KeySource::Host => match &r.host {
                Some(h) => ("host", h.into()),
                None => return false,
            },
            KeySource::Global => {
                out.push_str("global");
                return true;
            }
            KeySource::Connection => match r.connection_id {
                Some(id) => {
                    out.push_str("conn:");
                    out.push_str(itoa::Buffer::new().format(id));
                    return true;
                }
                None => return false,
            },
        };
        out.push_str(label);
        out.push(':');
        push_escaped(out, &value, hasher);
        true
    }
}

/// Appends `net` (`203.0.113.0/24`).
fn write_net(out: &mut String, net: IpNet) {
    match net {
        // The common case, written without the formatting machinery.
        IpNet::V4(net) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in net.addr().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(digits.format(octet));
            }
            out.push('/');
            out.push_str(digits.format(net.prefix_len()));
        }
        net => {
            let _ = write!(out, "{net}");
        }
    }
}

/// The client address grouped to its network: `v4` bits for IPv4, `v6` bits for IPv6.
fn group(ip: IpAddr, v4: u8, v6: u8) -> IpNet {
    match ip {
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(mapped) => group(IpAddr::V4(mapped), v4, v6),
            None => IpNet::V6(Ipv6Net::new(a, v6).map_or_else(|_| a.into(), |n| n.trunc())),
        },
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, v4).map_or_else(|_| a.into(), |n| n.trunc())),
    }
}

/// Appends `value` with every byte that could confuse a key's structure (`{`, `}`, `:`, `+`,
/// `%`, spaces, controls, non-ASCII) percent-encoded; long values are hashed instead.
fn push_escaped(out: &mut String, value: &str, hasher: &KeyHasher) {
    if value.len() > MAX_VALUE_LEN {
        out.push('#');
        out.push_str(&hasher.hash(value));
        return;
    }
    if value.bytes().all(is_safe) {
        out.push_str(value);
        return;
    }
    for byte in value.bytes() {
        if is_safe(byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

/// Bytes written as they are in a key.
fn is_safe(byte: u8) -> bool {
    const SAFE: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            table[b] = c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'/'
                        | b'@'
                        | b'='
                        | b','
                        | b';'
                        | b'!'
                        | b'*'
                        | b'\''
                        | b'('
                        | b')'
                        | b'['
                        | b']'
                        | b'|'
                );
            b += 1;
        }
        table
    };
    SAFE[usize::from(byte)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn request() -> RequestCtx {
        RequestCtx::new(Method::GET, "/a?k=v")
            .with_client_ip("2001:db8:1:2:3:4:5:6".parse().unwrap())
            .try_header("X-Client", "a}b:c")
            .unwrap()
            .try_header("Authorization", "Bearer sekrit")
            .unwrap()
    }

    #[test]
    fn groups_ipv6_by_prefix_and_escapes_values() {
        let hasher = KeyHasher::new([7; 32]);
        let spec = KeySpec {
            parts: vec![
                KeyPart::One(KeySource::Ip { v4: 32, v6: 64 }),
                KeyPart::One(KeySource::Header {
                    name: HeaderName::from_static("x-client"),
                    secret: false,
                    trusted: true,
                }),
            ],
        };
        assert_eq!(
            spec.eval(&request(), None, &hasher).unwrap(),
            "ip:2001:db8:1:2::/64+h.x-client:a%7Db%3Ac"
        );
    }

    #[test]
    fn secrets_never_appear_in_clear() {
        let hasher = KeyHasher::new([7; 32]);
        let spec = KeySpec {
            parts: vec![KeyPart::One(KeySource::Header {
                name: HeaderName::from_static("authorization"),
                secret: true,
                trusted: true,
            })],
        };
        let key = spec.eval(&request(), None, &hasher).unwrap();
        assert!(!key.contains("sekrit"), "{key}");
        let other = KeyHasher::new([8; 32]);
        assert_ne!(key, spec.eval(&request(), None, &other).unwrap());
    }

    #[test]
    fn first_of_takes_the_first_present_source() {
        let hasher = KeyHasher::new([7; 32]);
        let spec = KeySpec {
            parts: vec![KeyPart::FirstOf(vec![
                KeySource::UserId,
                KeySource::Query("k".into()),
                KeySource::Global,
            ])],
        };
        assert_eq!(spec.eval(&request(), None, &hasher).unwrap(), "q.k:v");
        let missing = KeySpec {
            parts: vec![KeyPart::One(KeySource::UserId)],
        };
        assert_eq!(missing.eval(&request(), None, &hasher), None);
    }
}
