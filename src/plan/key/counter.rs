//! Counter keys and every name derived from one (its ban, an anomaly's once-per-window
//! mark): spelled here, and only here.

/// The name of one counter: `{namespace}:{client}:{limit}`, the client in braces so that a
/// Redis Cluster keeps every counter of one client in one slot. Built in one place, it keeps
/// where its parts are: what needs the namespace or the client reads them from here, never by
/// parsing the string again. Keys read back from a store are parsed with
/// [`CounterKey::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CounterKey {
    key: String,
    /// Where the client part starts and ends (between the braces).
    client: (u32, u32),
}

/// The parts of a counter key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterKeyParts<'a> {
    /// The policy file's namespace.
    pub namespace: &'a str,
    /// The client (what the limit's key wrote, secrets hashed).
    pub client: &'a str,
    /// The limit's name.
    pub limit: &'a str,
}

/// What follows a counter key in the name of its ban (`{key}:ban`: same slot, same client).
pub const BAN_SUFFIX: &str = ":ban";

/// What follows an anomaly's counter key in the name of its once-per-window mark.
pub const FIRED_SUFFIX: &str = ".fired";

/// The name of the ban of the counter `key`.
pub fn ban_key(key: &str) -> String {
    let mut ban = String::with_capacity(key.len() + BAN_SUFFIX.len());
    ban.push_str(key);
    ban.push_str(BAN_SUFFIX);
    ban
}

/// Whether `key` names a ban (see [`ban_key`]).
pub fn is_ban_key(key: &str) -> bool {
    key.ends_with(BAN_SUFFIX)
}

impl CounterKey {
    /// The key of `limit` in `namespace` for the client that `client` writes; `None` when
    /// `client` writes nothing (returns `false`).
    pub fn build(
        namespace: &str,
        limit: &str,
        client: impl FnOnce(&mut String) -> bool,
    ) -> Option<CounterKey> {
        let mut key = String::with_capacity(namespace.len() + limit.len() + 48);
        key.push_str(namespace);
        key.push_str(":{");
        let start = key.len();
        if !client(&mut key) {
            return None;
        }
        let end = key.len();
        key.push_str("}:");
        key.push_str(limit);
        let at = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Some(CounterKey {
            key,
            client: (at(start), at(end)),
        })
    }

    /// Reads a stored key (or its ban, see [`ban_key`]) back into its parts.
    pub fn parse(key: &str) -> Option<CounterKeyParts<'_>> {
        let key = key.strip_suffix(BAN_SUFFIX).unwrap_or(key);
        let open = key.find(":{")?;
        let close = key.rfind("}:")?;
        (close > open).then(|| CounterKeyParts {
            namespace: &key[..open],
            client: &key[open + 2..close],
            limit: &key[close + 2..],
        })
    }

    /// The parts of this key.
    pub fn parts(&self) -> CounterKeyParts<'_> {
        let (start, end) = (self.client.0 as usize, self.client.1 as usize);
        CounterKeyParts {
            namespace: &self.key[..start.saturating_sub(2)],
            client: &self.key[start..end],
            limit: &self.key[(end + 2).min(self.key.len())..],
        }
    }

    /// The policy file's namespace.
    pub fn namespace(&self) -> &str {
        self.parts().namespace
    }

    /// The client part (what the limit's key wrote, secrets hashed).
    pub fn client(&self) -> &str {
        self.parts().client
    }

    /// The name of this key's ban.
    pub fn ban_key(&self) -> String {
        ban_key(&self.key)
    }

    /// The key as stored.
    pub fn as_str(&self) -> &str {
        &self.key
    }
}

impl serde::Serialize for CounterKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.key)
    }
}

impl std::ops::Deref for CounterKey {
    type Target = str;
    fn deref(&self) -> &str {
        &self.key
    }
}

impl std::fmt::Display for CounterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key)
    }
}

impl PartialEq<str> for CounterKey {
    fn eq(&self, other: &str) -> bool {
        self.key == other
    }
}

impl PartialEq<&str> for CounterKey {
    fn eq(&self, other: &&str) -> bool {
        self.key == *other
    }
}

impl From<CounterKey> for String {
    fn from(key: CounterKey) -> String {
        key.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_keeps_its_parts_and_parses_back_to_them() {
        let key = CounterKey::build("shop", "api", |out| {
            out.push_str("ip:203.0.113.0/24");
            true
        })
        .unwrap();
        assert_eq!(key.as_str(), "shop:{ip:203.0.113.0/24}:api");
        let parts = key.parts();
        assert_eq!(
            (parts.namespace, parts.client, parts.limit),
            ("shop", "ip:203.0.113.0/24", "api")
        );
        assert_eq!(CounterKey::parse(&key), Some(parts));
        assert_eq!(CounterKey::parse(&key.ban_key()), Some(parts));
        assert!(is_ban_key(&key.ban_key()) && !is_ban_key(&key));
        assert!(CounterKey::build("shop", "api", |_| false).is_none());
    }
}
