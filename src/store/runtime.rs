//! Runtime list entries: addresses or networks safelisted or denylisted while Tollgate runs
//! (through the admin API), with an optional end (a ban is a denylist entry that ends), kept
//! in the store so that every node sharing it applies them. Each node reads them back every
//! second (and at once after its own change); a request checks them before the plan's lists.

use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;

/// The Redis hash holding every entry: not a counter key (no braces), so no counter
/// selector of the admin API ever reaches it.
pub const RUNTIME_KEY: &str = "tollgate:runtime-lists";

/// Which list an entry is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeList {
    /// No limit applies (authorization still does).
    Safelist,
    /// Refused with 403.
    Denylist,
}

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeEntry {
    /// The list.
    pub list: RuntimeList,
    /// The address or network.
    pub net: IpNet,
    /// When it ends, in microseconds since the epoch (`None`: until removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// Why, as shown to refused clients and operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl RuntimeEntry {
    /// The entry's field in the store: its list and network.
    pub fn field(&self) -> String {
        field(self.list, &self.net)
    }

    /// Whether it still holds at `now`.
    pub fn live(&self, now: Timestamp) -> bool {
        self.until.is_none_or(|until| until > now.as_micros())
    }
}

/// The store field of `net` on `list`.
pub fn field(list: RuntimeList, net: &IpNet) -> String {
    let list = match list {
        RuntimeList::Safelist => "safelist",
        RuntimeList::Denylist => "denylist",
    };
    format!("{list}|{}", net.trunc())
}

/// The entries a node applies, as last read from the store.
#[derive(Debug, Clone, Default)]
pub struct RuntimeLists {
    entries: Arc<[RuntimeEntry]>,
}

impl RuntimeLists {
    /// The lists holding `entries`.
    pub fn new(entries: Vec<RuntimeEntry>) -> Self {
        RuntimeLists {
            entries: entries.into(),
        }
    }

    /// Every entry.
    pub fn entries(&self) -> &[RuntimeEntry] {
        &self.entries
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
            .filter(|e| e.list == list && e.live(now) && e.net.contains(&ip))
            .max_by_key(|e| e.net.prefix_len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(list: RuntimeList, net: &str, until: Option<u64>, reason: &str) -> RuntimeEntry {
        RuntimeEntry {
            list,
            net: net.parse().unwrap(),
            until,
            reason: Some(reason.to_owned()),
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
}
