//! Address lists (`ip in [ … ]`) as a hash set of single addresses beside prefix tries of
//! networks: a lookup is one hash probe and a walk bounded by the address's length in bits,
//! whether the list holds ten networks or a threat feed of a hundred thousand addresses.

use std::collections::HashSet;
use std::net::IpAddr;

use foldhash::fast::RandomState;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixSet;

/// How many networks an explanation lists before it only counts the rest.
const SHOWN: usize = 5;

/// A set of IPv4 and IPv6 networks, matched by longest prefix.
#[derive(Clone)]
pub struct IpSet {
    /// Single addresses (`/32`, `/128`), the bulk of threat feeds: one probe each.
    hosts: HashSet<IpAddr, RandomState>,
    /// Networks, by longest prefix.
    v4: PrefixSet<Ipv4Net>,
    v6: PrefixSet<Ipv6Net>,
    /// The first networks as written, for explanations.
    first: Vec<IpNet>,
    len: usize,
}

impl std::fmt::Debug for IpSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IpSet({})", self.shown())
    }
}

impl IpSet {
    /// The set of `nets` (host bits are ignored: `10.1.2.3/8` is `10.0.0.0/8`).
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let mut set = IpSet {
            hosts: HashSet::default(),
            v4: PrefixSet::new(),
            v6: PrefixSet::new(),
            first: Vec::new(),
            len: 0,
        };
        for net in nets {
            let net = net.trunc();
            let fresh = match net {
                _ if net.prefix_len() == net.max_prefix_len() => set.hosts.insert(net.addr()),
                IpNet::V4(v4) => set.v4.insert(v4),
                IpNet::V6(v6) => set.v6.insert(v6),
            };
            if fresh {
                set.len += 1;
                if set.first.len() < SHOWN {
                    set.first.push(net);
                }
            }
        }
        set
    }

    /// The longest network of the set that holds `ip`. An IPv4 client seen through an IPv6
    /// socket (`::ffff:a.b.c.d`) is an IPv4 client.
    pub fn find(&self, ip: IpAddr) -> Option<IpNet> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        // A single address is the longest prefix there is.
        if self.hosts.contains(&ip) {
            return Some(IpNet::from(ip));
        }
        match ip {
            IpAddr::V4(v4) if !self.v4.is_empty() => {
                self.v4.get_lpm(&Ipv4Net::from(v4)).map(IpNet::V4)
            }
            IpAddr::V6(v6) if !self.v6.is_empty() => {
                self.v6.get_lpm(&Ipv6Net::from(v6)).map(IpNet::V6)
            }
            _ => None,
        }
    }

    /// Whether a network of the set holds `ip`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.find(ip).is_some()
    }

    /// How many distinct networks the set holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The list as explanations show it: the first few networks, then how many more.
    pub fn shown(&self) -> String {
        let mut text = self
            .first
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        if self.len > self.first.len() {
            text.push_str(&format!(", and {} more", self.len - self.first.len()));
        }
        format!("[{text}]")
    }
}

/// An address (`203.0.113.9`, a /32 or /128) or a network (`203.0.113.0/24`), as policies,
/// settings and the admin API write them.
pub fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nets: &[&str]) -> IpSet {
        IpSet::new(nets.iter().map(|n| {
            n.parse::<IpNet>()
                .unwrap_or_else(|_| IpNet::from(n.parse::<IpAddr>().unwrap()))
        }))
    }

    #[test]
    fn finds_the_longest_network_holding_an_address() {
        let s = set(&[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.0.2.7",
            "fd00::/8",
            "10.1.2.3/8",
        ]);
        assert_eq!(s.len(), 4, "10.1.2.3/8 is 10.0.0.0/8 again");
        let found = |ip: &str| s.find(ip.parse().unwrap()).map(|n| n.to_string());
        assert_eq!(found("10.1.9.9").as_deref(), Some("10.1.0.0/16"));
        assert_eq!(found("10.2.0.1").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(found("192.0.2.7").as_deref(), Some("192.0.2.7/32"));
        assert_eq!(found("192.0.2.8"), None);
        assert_eq!(found("::ffff:10.9.9.9").as_deref(), Some("10.0.0.0/8"));
        assert_eq!(found("fd12::1").as_deref(), Some("fd00::/8"));
        assert_eq!(found("fe80::1"), None);
    }

    #[test]
    fn explanations_show_a_few_networks_and_count_the_rest() {
        let many = IpSet::new(
            (0..1000u32).map(|i| IpNet::from(IpAddr::from(std::net::Ipv4Addr::from(i)))),
        );
        assert_eq!(
            many.shown(),
            "[0.0.0.0/32, 0.0.0.1/32, 0.0.0.2/32, 0.0.0.3/32, 0.0.0.4/32, and 995 more]"
        );
        assert_eq!(set(&["fd00::/8"]).shown(), "[fd00::/8]");
    }

    proptest::proptest! {
        /// The trie agrees with a scan of the list.
        #[test]
        fn agrees_with_a_linear_scan(
            nets in proptest::collection::vec((proptest::prelude::any::<u32>(), 0u8..=32), 0..50),
            probes in proptest::collection::vec(proptest::prelude::any::<u32>(), 1..50),
        ) {
            let nets: Vec<IpNet> = nets
                .into_iter()
                .map(|(a, len)| IpNet::V4(Ipv4Net::new(a.into(), len).unwrap()))
                .collect();
            let set = IpSet::new(nets.clone());
            for probe in probes {
                let ip = IpAddr::V4(probe.into());
                proptest::prop_assert_eq!(set.contains(ip), nets.iter().any(|n| n.contains(&ip)));
            }
        }
    }
}
