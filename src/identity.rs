//! Who the client is: the address behind trusted proxies, the user, the API token.
//!
//! Forwarding headers (`Forwarded`, `X-Forwarded-For`, `X-Real-IP`) are believed only when
//! the direct peer is a trusted proxy; the client is then the rightmost address that is not
//! one. A user header is believed only from a trusted peer. Bearer JWTs are verified when a
//! key is configured; a token that fails verification never becomes an identity.

use std::collections::BTreeMap;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, header};
use ipnet::IpNet;
use jsonwebtoken::{DecodingKey, Validation};
use smallvec::SmallVec;

use crate::request::RequestCtx;

/// How clients are identified.
#[derive(Clone)]
pub struct Identifier {
    trusted: Vec<IpNet>,
    user_header: Option<HeaderName>,
    api_key_header: HeaderName,
    jwt: Option<Jwt>,
}

#[derive(Clone)]
struct Jwt {
    key: DecodingKey,
    validation: Validation,
    user_claim: String,
}

impl std::fmt::Debug for Identifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identifier")
            .field("trusted", &self.trusted)
            .field("user_header", &self.user_header)
            .field("api_key_header", &self.api_key_header)
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

impl Default for Identifier {
    fn default() -> Self {
        Identifier {
            trusted: Vec::new(),
            user_header: None,
            api_key_header: HeaderName::from_static("x-api-key"),
            jwt: None,
        }
    }
}

/// A JWT key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid JWT verification key: {0}")]
pub struct JwtKeyError(#[from] jsonwebtoken::errors::Error);

/// How bearer JWTs are verified.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// The algorithm tokens must use.
    pub algorithm: jsonwebtoken::Algorithm,
    /// The verification key: HMAC secret bytes, or a PEM public key.
    pub key: JwtKey,
    /// Required `iss`, if any.
    pub issuer: Option<String>,
    /// Required `aud`, if any.
    pub audience: Option<String>,
    /// The claim that names the user.
    pub user_claim: String,
}

/// A JWT verification key.
#[derive(Clone)]
pub enum JwtKey {
    /// An HMAC secret.
    Secret(Vec<u8>),
    /// A PEM-encoded RSA or EC public key.
    PublicKeyPem(Vec<u8>),
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtKey::Secret(_) => f.write_str("Secret(..)"),
            JwtKey::PublicKeyPem(_) => f.write_str("PublicKeyPem(..)"),
        }
    }
}

impl Identifier {
    /// Identification with no trusted proxies, no user header, no JWT: the socket peer is
    /// the client, and `X-Api-Key` or a bearer token is the API token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Believes forwarding headers from these proxies.
    pub fn with_trusted_proxies(mut self, nets: Vec<IpNet>) -> Self {
        self.trusted = nets;
        self
    }

    /// Takes the user from this header, when a trusted proxy sent it.
    pub fn with_user_header(mut self, name: HeaderName) -> Self {
        self.user_header = Some(name);
        self
    }

    /// Takes API keys from this header.
    pub fn with_api_key_header(mut self, name: HeaderName) -> Self {
        self.api_key_header = name;
        self
    }

    /// Verifies bearer tokens as JWTs; the user is the configured claim.
    pub fn with_jwt(mut self, settings: &JwtSettings) -> Result<Self, JwtKeyError> {
        let key = match &settings.key {
            JwtKey::Secret(s) => DecodingKey::from_secret(s),
            JwtKey::PublicKeyPem(pem) => match settings.algorithm {
                jsonwebtoken::Algorithm::ES256 | jsonwebtoken::Algorithm::ES384 => {
                    DecodingKey::from_ec_pem(pem)?
                }
                jsonwebtoken::Algorithm::EdDSA => DecodingKey::from_ed_pem(pem)?,
                _ => DecodingKey::from_rsa_pem(pem)?,
            },
        };
        let mut validation = Validation::new(settings.algorithm);
        if let Some(iss) = &settings.issuer {
            validation.set_issuer(&[iss]);
        }
        match &settings.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        self.jwt = Some(Jwt {
            key,
            validation,
            user_claim: settings.user_claim.clone(),
        });
        Ok(self)
    }

    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: the peer, or, behind trusted proxies, the rightmost forwarded
    /// address that is not a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.is_trusted(peer) {
            return peer;
        }
        let chain = forwarded_chain(headers);
        let mut client = peer;
        for hop in chain.iter().rev() {
            match hop {
                // A hop that cannot be read ends what can be believed: the client is the
                // last proxy that passed it on.
                None => break,
                Some(ip) => {
                    client = *ip;
                    if !self.is_trusted(*ip) {
                        break;
                    }
                }
            }
        }
        client
    }

    /// Fills the identity fields of `request` from its headers, given the direct peer.
    pub fn identify(&self, request: &mut RequestCtx, peer: Option<IpAddr>) {
        let trusted_peer = peer.is_some_and(|p| self.is_trusted(p));
        request.headers_trusted = trusted_peer;
        if let Some(peer) = peer {
            request.client_ip = Some(self.client_ip(peer, &request.headers));
        }
        self.identify_user(request, trusted_peer);
    }

    /// Fills the user, token and claims of a request described by a decision API caller,
    /// which has set its client address and says in `headers_trusted` whether the headers
    /// it describes were set by a trusted component (then the user header counts).
    pub fn identify_vouched(&self, request: &mut RequestCtx) {
        let trusted = request.headers_trusted;
        self.identify_user(request, trusted);
    }

    fn identify_user(&self, request: &mut RequestCtx, trusted_peer: bool) {
        if trusted_peer
            && let Some(name) = &self.user_header
            && let Some(user) = request.header(name)
            && !user.is_empty()
        {
            request.user_id = Some(user.to_owned());
        }
        let bearer = request
            .header(&header::AUTHORIZATION)
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        match (&self.jwt, bearer) {
            (Some(jwt), Some(token)) => {
                if let Some((user, claims)) = jwt.verify(&token) {
                    if request.user_id.is_none() {
                        request.user_id = user;
                    }
                    request.claims.extend(claims);
                }
            }
            (None, Some(token)) => request.api_token = Some(token),
            (_, None) => {}
        }
        if request.api_token.is_none()
            && let Some(key) = request.header(&self.api_key_header)
            && !key.is_empty()
        {
            request.api_token = Some(key.to_owned());
        }
    }
}

impl Jwt {
    /// The user and the claims of a valid token: those with string, number or boolean values,
    /// and arrays of strings (read as their items joined by commas: `["staff","dev"]` is
    /// `staff,dev`, what Cedar `parents … from claim(…)` splits).
    fn verify(&self, token: &str) -> Option<(Option<String>, BTreeMap<String, String>)> {
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .ok()?;
        let claims: BTreeMap<String, String> = data
            .claims
            .into_iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::String(s) => Some((k, s)),
                serde_json::Value::Number(n) => Some((k, n.to_string())),
                serde_json::Value::Bool(b) => Some((k, b.to_string())),
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|i| i.as_str().filter(|s| !s.contains(',')))
                    .collect::<Option<Vec<_>>>()
                    .map(|items| (k, items.join(","))),
                _ => None,
            })
            .collect();
        Some((claims.get(&self.user_claim).cloned(), claims))
    }
}

/// IPv4 seen through an IPv6 socket is IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The forwarded addresses, nearest last; `None` for a hop that cannot be read. RFC 7239
/// `Forwarded` wins over `X-Forwarded-For`, which wins over `X-Real-IP`.
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let forwarded: Vec<&str> = headers
        .get_all(header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !forwarded.is_empty() {
        return forwarded
            .iter()
            .flat_map(|v| v.split(','))
            .filter_map(forwarded_element)
            .collect();
    }
    let xff: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !xff.is_empty() {
        return xff
            .iter()
            .flat_map(|v| v.split(','))
            .map(|s| parse_addr(s.trim()))
            .collect();
    }
    headers
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .map(|v| vec![parse_addr(v.trim())])
        .unwrap_or_default()
}

/// One `Forwarded` element (`for=…;proto=…;by=…`): `None` when it says nothing about the
/// client (no `for`), `Some(None)` when it cannot be read — a pair without `=`, an empty
/// name, or a parameter given twice, which RFC 7239 §4 does not allow and which a spoofer
/// would use to hide an address behind a believed one.
fn forwarded_element(element: &str) -> Option<Option<IpAddr>> {
    let mut seen: SmallVec<[&str; 4]> = SmallVec::new();
    let mut client = None;
    for pair in element.split(';') {
        let Some((name, value)) = pair.split_once('=') else {
            return Some(None);
        };
        let name = name.trim();
        if name.is_empty() || seen.iter().any(|s| s.eq_ignore_ascii_case(name)) {
            return Some(None);
        }
        seen.push(name);
        if name.eq_ignore_ascii_case("for") {
            client = Some(value.trim());
        }
    }
    client.map(parse_forwarded_for)
}

/// `for=` values: `192.0.2.60`, `"192.0.2.60:47011"`, `"[2001:db8::17]:4711"`; `unknown` and
/// obfuscated names (`_hidden`) are unreadable.
fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let v = value.trim_matches('"');
    if let Some(rest) = v.strip_prefix('[') {
        let (addr, _port) = rest.split_once(']')?;
        return addr.parse().ok().map(canonical);
    }
    parse_addr(v)
}

/// An address, maybe with a port (`1.2.3.4:80`).
fn parse_addr(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn behind(nets: &[&str]) -> Identifier {
        let nets = nets
            .iter()
            .map(|n| n.parse().unwrap_or_else(|_| IpNet::from(ip(n))))
            .collect();
        Identifier::new().with_trusted_proxies(nets)
    }

    #[test]
    fn spoofed_forwarding_from_an_untrusted_peer_is_ignored() {
        let id = behind(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("forwarded", "for=5.6.7.8")]);
        assert_eq!(id.client_ip(ip("203.0.113.9"), &h), ip("203.0.113.9"));
        // With no trusted proxies at all, headers never count.
        assert_eq!(
            Identifier::new().client_ip(ip("10.0.0.1"), &h),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let id = behind(&["10.0.0.0/8", "192.168.1.1"]);
        // client, then an attacker-supplied value before it, then two trusted proxies.
        let h = headers(&[(
            "x-forwarded-for",
            "6.6.6.6, 198.51.100.7, 192.168.1.1, 10.1.1.1",
        )]);
        assert_eq!(id.client_ip(ip("10.0.0.2"), &h), ip("198.51.100.7"));
        // Several header lines form one list.
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.8"),
            ("x-forwarded-for", "10.1.1.1"),
        ]);
        assert_eq!(id.client_ip(ip("10.0.0.2"), &h), ip("198.51.100.8"));
        // Only trusted hops: the leftmost one is the client.
        let h = headers(&[("x-forwarded-for", "10.9.9.9, 10.1.1.1")]);
        assert_eq!(id.client_ip(ip("10.0.0.2"), &h), ip("10.9.9.9"));
    }

    #[test]
    fn forwarded_header_takes_precedence_and_tolerates_ports_and_ipv6() {
        let id = behind(&["10.0.0.0/8"]);
        let h = headers(&[
            (
                "forwarded",
                r#"for="[2001:db8:cafe::17]:4711";proto=https, for=10.0.0.5"#,
            ),
            ("x-forwarded-for", "1.1.1.1"),
        ]);
        assert_eq!(id.client_ip(ip("10.0.0.2"), &h), ip("2001:db8:cafe::17"));
        let h = headers(&[("forwarded", r#"for="192.0.2.60:47011""#)]);
        assert_eq!(id.client_ip(ip("10.0.0.2"), &h), ip("192.0.2.60"));
    }

    #[test]
    fn malformed_hops_stop_the_chain_at_the_last_trusted_proxy() {
        let id = behind(&["10.0.0.0/8"]);
        for bad in [
            "for=unknown",
            "for=_hidden",
            "for=\"[::1\"",
            "for=999.1.1.1",
            // RFC 7239: a parameter at most once per element; a pair has a name and `=`.
            "for=1.2.3.4;for=5.6.7.8",
            "for=1.2.3.4;FOR=5.6.7.8",
            "proto=http;for=1.2.3.4;proto=https",
            "for=1.2.3.4;secret",
            "=1.2.3.4",
        ] {
            let h = headers(&[(
                "forwarded",
                &format!("for=198.51.100.1, {bad}, for=10.0.0.7"),
            )]);
            assert_eq!(id.client_ip(ip("10.0.0.2"), &h), ip("10.0.0.7"), "{bad}");
        }
        let h = headers(&[("x-forwarded-for", "garbage")]);
        assert_eq!(id.client_ip(ip("10.0.0.2"), &h), ip("10.0.0.2"));
        let h = headers(&[("x-real-ip", "198.51.100.4")]);
        assert_eq!(id.client_ip(ip("10.0.0.2"), &h), ip("198.51.100.4"));
    }

    #[test]
    fn ipv4_mapped_peers_are_ipv4() {
        let id = behind(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "198.51.100.9")]);
        assert_eq!(id.client_ip(ip("::ffff:10.0.0.2"), &h), ip("198.51.100.9"));
    }
}
