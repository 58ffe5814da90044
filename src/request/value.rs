//! What can be read from a request by name (a header, a claim), and the keyed hash that
//! secrets read from it go through before any use.

use std::sync::Arc;

use super::RequestCtx;

/// A request value read by name: a header (believed from trusted proxies unless `trusted`),
/// a claim of the verified token, or a descriptor entry of an Envoy rate-limit request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueFrom {
    /// A request header.
    Header {
        /// The header.
        name: http::HeaderName,
        /// Believed from any client.
        trusted: bool,
    },
    /// A claim (a JSON array of strings is read as its items joined by commas).
    Claim(Arc<str>),
    /// An entry of an Envoy rate-limit request's descriptor.
    Descriptor(Arc<str>),
}

impl ValueFrom {
    /// The request's value, if it has one that is believed.
    pub fn read<'r>(&self, request: &'r RequestCtx) -> Option<&'r str> {
        match self {
            ValueFrom::Header { name, trusted } if *trusted || request.headers_trusted => {
                request.header(name)
            }
            ValueFrom::Header { .. } => None,
            ValueFrom::Claim(claim) => request.claims.get(&**claim).map(String::as_str),
            ValueFrom::Descriptor(key) => request.descriptor_value(key),
        }
    }
}

/// A keyed hash for secrets (BLAKE3 with a 32-byte key): tokens never appear in clear in a
/// counter key, a log line or an event, and without the key they cannot be guessed back.
#[derive(Clone)]
pub struct KeyHasher {
    key: [u8; 32],
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher(..)")
    }
}

impl KeyHasher {
    /// A hasher with the given secret key.
    pub fn new(key: [u8; 32]) -> Self {
        KeyHasher { key }
    }

    /// A hasher whose key is derived from a secret phrase of any length.
    pub fn from_secret(secret: &str) -> Self {
        KeyHasher {
            key: blake3::derive_key("tollgate 2026 key hashing", secret.as_bytes()),
        }
    }

    /// A hasher with a random key: hashes agree only within this process.
    pub fn random() -> Self {
        KeyHasher {
            key: rand::random(),
        }
    }

    /// The hash of `value`: 24 hex digits (96 bits).
    pub fn hash(&self, value: &str) -> String {
        let digest = blake3::keyed_hash(&self.key, value.as_bytes());
        digest.to_hex()[..24].to_owned()
    }
}
