//! Runtime list entries: addresses, networks or clients safelisted or denylisted while
//! Tollgate runs (through the admin API), with an optional end (a ban is a denylist entry
//! that ends), kept in the store so that every node sharing it applies them. Each node reads
//! them back every second (and at once after its own change); a request checks them before
//! the plan's lists.
//!
//! A client entry names a client the way counter keys do (`user:alice`, `token:<hash>`,
//! `h.x-tenant:acme`, `ip:203.0.113.9`): it holds for a request whose user, token or address
//! is that client, or when the client part of a limit that applies to the request is the
//! entry or has it as one of its `+`-joined parts.

use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;

/// The Redis hash holding every safelist and denylist entry: not a counter key (no braces),
/// so no counter selector of the admin API ever reaches it.
pub const RUNTIME_KEY: &str = "tollgate:runtime-lists";

/// The Redis hash holding flags and tarpits: apart from the lists, because nodes of earlier
/// versions drop entries of lists they do not know from the lists' hash.
pub const MARKS_KEY: &str = "tollgate:runtime-marks";

/// The longest client an entry may name (counter keys hash longer values).
pub const MAX_CLIENT_LEN: usize = 512;

/// Which list an entry is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeList {
    /// No limit applies (authorization still does).
    Safelist,
    /// Refused with 403.
    Denylist,
    /// Decisions carry the entry's reason (exported and logged): `flag` of an anomaly.
    Flag,
    /// Each request is held `delay_ms` before it goes on: `tarpit` of an anomaly.
    Tarpit,
}

impl RuntimeList {
    /// Its name, as in store fields and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeList::Safelist => "safelist",
            RuntimeList::Denylist => "denylist",
            RuntimeList::Flag => "flag",
            RuntimeList::Tarpit => "tarpit",
        }
    }

    /// Whether it marks requests (flag, tarpit) rather than deciding them.
    pub fn is_mark(self) -> bool {
        matches!(self, RuntimeList::Flag | RuntimeList::Tarpit)
    }

    /// The Redis hash its entries live in.
    pub fn store_key(self) -> &'static str {
        if self.is_mark() {
            MARKS_KEY
        } else {
            RUNTIME_KEY
        }
    }
}

/// What an entry holds for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Clients at an address or in a network.
    Net(IpNet),
    /// A client as counter keys name it (`user:alice`, `token:<hash>`).
    Client(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Net(net) => write!(f, "{}", net.trunc()),
            Target::Client(client) => write!(f, "client={client}"),
        }
    }
}

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeEntry {
    /// The list.
    pub list: RuntimeList,
    /// What it holds for: `"net": "203.0.113.0/24"` or `"client": "user:alice"`.
    #[serde(flatten)]
    pub target: Target,
    /// When it ends, in microseconds since the epoch (`None`: until removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// Why, as shown to refused clients and operators (for a flag: what decisions carry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long a tarpit holds each request, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
}

impl RuntimeEntry {
    /// The entry's field in the store: its list and target.
    pub fn field(&self) -> String {
        field(self.list, &self.target)
    }

    /// Whether it still holds at `now`.
    pub fn live(&self, now: Timestamp) -> bool {
        self.until.is_none_or(|until| until > now.as_micros())
    }
}

/// The store field of `target` on `list` (`denylist|203.0.113.0/24`,
/// `denylist|client=user:alice`).
pub fn field(list: RuntimeList, target: &Target) -> String {
    format!("{}|{target}", list.as_str())
}

/// The entries a node applies, as last read from the store.
#[derive(Debug, Clone, Default)]
pub struct RuntimeLists {
    entries: Arc<[RuntimeEntry]>,
    clients: bool,
    marks: bool,
}

impl RuntimeLists {
    /// The lists holding `entries`.
    pub fn new(entries: Vec<RuntimeEntry>) -> Self {
        let clients = entries
            .iter()
            .any(|e| matches!(e.target, Target::Client(_)));
        let marks = entries.iter().any(|e| e.list.is_mark());
        RuntimeLists {
            entries: entries.into(),
            clients,
            marks,
        }
    }

    /// Every entry.
    pub fn entries(&self) -> &[RuntimeEntry] {
        &self.entries
    }

    /// Whether any entry names a client (else no key needs checking).
    pub fn has_clients(&self) -> bool {
        self.clients
    }

    /// Whether any entry is a flag or a tarpit.
    pub fn has_marks(&self) -> bool {
        self.marks
    }

    /// The live flags and tarpits that hold for a request from `ip` whose identity or keys
    /// name `clients`: the flags' reasons, and the longest hold.
    pub fn marks<'c>(
        &self,
        ip: Option<std::net::IpAddr>,
        clients: impl Iterator<Item = &'c str> + Clone,
        now: Timestamp,
    ) -> (Vec<Arc<str>>, Option<std::time::Duration>) {
        let mut flags = Vec::new();
        let mut hold = None;
        if !self.marks {
            return (flags, hold);
        }
        let ip = ip.map(|ip| match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        });
        for e in self
            .entries
            .iter()
            .filter(|e| e.list.is_mark() && e.live(now))
        {
            let holds = match &e.target {
                Target::Net(net) => ip.is_some_and(|ip| net.contains(&ip)),
                Target::Client(c) => clients
                    .clone()
                    .any(|client| client == c || client.split('+').any(|part| part == c)),
            };
            if !holds {
                continue;
            }
            match e.list {
                RuntimeList::Flag => {
                    let label: Arc<str> = Arc::from(e.reason.as_deref().unwrap_or("flagged"));
                    if !flags.contains(&label) {
                        flags.push(label);
                    }
                }
                _ => {
                    let d = std::time::Duration::from_millis(e.delay_ms.unwrap_or(0));
                    hold = hold.max(Some(d));
                }
            }
        }
        (flags, hold)
    }

    /// The live entry of `list` that holds `ip`, the narrowest first.
    pub fn find(
        &self,
        list: RuntimeList,
        ip: std::net::IpAddr,
        now: Timestamp,
    ) -> Option<&RuntimeEntry> {
        // Few entries (operators add them by hand): a scan, and nothing at all when empty.
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.entries
            .iter()
            .filter(|e| e.list == list && e.live(now))
            .filter_map(|e| match &e.target {
                Target::Net(net) => net.contains(&ip).then_some((e, net.prefix_len())),
                Target::Client(_) => None,
            })
            .max_by_key(|(_, len)| *len)
            .map(|(e, _)| e)
    }

    /// The live client entry of `list` that holds the client part `client` of a key: the
    /// whole of it or one of its `+`-joined parts.
    pub fn find_client(
        &self,
        list: RuntimeList,
        client: &str,
        now: Timestamp,
    ) -> Option<&RuntimeEntry> {
        if !self.clients {
            return None;
        }
        self.entries.iter().find(|e| {
            e.list == list
                && e.live(now)
                && matches!(&e.target, Target::Client(c)
                    if c == client || client.split('+').any(|part| part == c))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(list: RuntimeList, net: &str, until: Option<u64>, reason: &str) -> RuntimeEntry {
        RuntimeEntry {
            list,
            target: Target::Net(net.parse().unwrap()),
            until,
            reason: Some(reason.to_owned()),
            delay_ms: None,
        }
    }

    #[test]
    fn the_narrowest_live_entry_of_the_list_holds() {
        let lists = RuntimeLists::new(vec![
            entry(RuntimeList::Denylist, "10.0.0.0/8", None, "wide"),
            entry(RuntimeList::Denylist, "10.1.0.0/16", None, "narrow"),
            entry(RuntimeList::Denylist, "10.1.2.0/24", Some(1_000), "ended"),
            entry(RuntimeList::Safelist, "10.1.2.3/32", None, "safe"),
        ]);
        let now = Timestamp::from_micros(5_000);
        let deny = |ip: &str| {
            lists
                .find(RuntimeList::Denylist, ip.parse().unwrap(), now)
                .and_then(|e| e.reason.clone())
        };
        assert_eq!(deny("10.1.2.3").as_deref(), Some("narrow"), "the /24 ended");
        assert_eq!(deny("10.9.9.9").as_deref(), Some("wide"));
        assert_eq!(
            deny("::ffff:10.1.2.3").as_deref(),
            Some("narrow"),
            "mapped IPv4"
        );
        assert_eq!(deny("192.0.2.1"), None);
        let earlier = Timestamp::from_micros(999);
        let found = lists.find(RuntimeList::Denylist, "10.1.2.3".parse().unwrap(), earlier);
        assert_eq!(found.and_then(|e| e.reason.as_deref()), Some("ended"));
        assert!(
            lists
                .find(RuntimeList::Safelist, "10.1.2.3".parse().unwrap(), now)
                .is_some()
        );
    }

    #[test]
    fn fields_name_the_list_and_the_network() {
        let e = entry(RuntimeList::Safelist, "203.0.113.9/24", None, "x");
        assert_eq!(e.field(), "safelist|203.0.113.0/24");
    }

    #[test]
    fn client_entries_hold_for_the_whole_client_or_one_of_its_parts() {
        let client = |list, c: &str, until| RuntimeEntry {
            list,
            target: Target::Client(c.to_owned()),
            until,
            reason: None,
            delay_ms: None,
        };
        let lists = RuntimeLists::new(vec![
            client(RuntimeList::Denylist, "user:alice", None),
            client(RuntimeList::Denylist, "token:ab12", Some(1_000)),
            client(RuntimeList::Safelist, "h.x-tenant:acme", None),
        ]);
        assert!(lists.has_clients());
        let now = Timestamp::from_micros(5_000);
        let deny = |c: &str| lists.find_client(RuntimeList::Denylist, c, now).is_some();
        assert!(deny("user:alice"));
        assert!(deny("user:alice+route:/x"), "one part of a composite key");
        assert!(!deny("user:alicea"), "a prefix is not the client");
        assert!(!deny("token:ab12"), "ended");
        assert!(
            lists
                .find_client(RuntimeList::Safelist, "ip:10.0.0.1+h.x-tenant:acme", now)
                .is_some()
        );
        assert!(
            lists
                .find(RuntimeList::Denylist, "10.0.0.1".parse().unwrap(), now)
                .is_none()
        );
        let e = client(RuntimeList::Denylist, "user:alice", None);
        assert_eq!(e.field(), "denylist|client=user:alice");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"list": "denylist", "client": "user:alice"})
        );
        assert_eq!(serde_json::from_value::<RuntimeEntry>(json).unwrap(), e);
        assert!(!RuntimeLists::new(vec![]).has_clients());
    }
}
