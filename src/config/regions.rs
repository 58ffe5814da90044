//! The region settings: this node's region, the other regions' Redis, weights, the
//! exchange interval and when a silent region counts as partitioned off.

use std::time::Duration;

use super::Settings;
use super::raw::{Problems, Raw};

use crate::store::redis::{Peer, RegionSettings, check_url};

/// A region name: what `g:<region>` fields and logs show.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Settings {
    /// `region`, `region_peers`, `region_weights`, `region_sync_ms`, `region_partition_ms`.
    pub(super) fn read_regions(&mut self, raw: &mut Raw, p: &mut Problems) {
        let name = raw.region.take();
        // In a comma-separated list, a Cluster URL's further hosts (`…,host:port`) are items
        // without `=`: they continue the URL before them.
        let peers = raw.region_peers.take().map(|l| {
            let mut joined: Vec<String> = Vec::new();
            for item in l.items() {
                match joined.last_mut() {
                    Some(last) if !item.contains('=') => {
                        last.push(',');
                        last.push_str(&item);
                    }
                    _ => joined.push(item),
                }
            }
            joined
        });
        let weights = raw.region_weights.take().map(|l| l.items());
        let sync_ms = raw.region_sync_ms.take();
        let partition_ms = raw.region_partition_ms.take();
        let Some(name) = name else {
            for (key, set) in [
                ("region_peers", peers.is_some()),
                ("region_weights", weights.is_some()),
                ("region_sync_ms", sync_ms.is_some()),
                ("region_partition_ms", partition_ms.is_some()),
            ] {
                if set {
                    p.add(
                        key,
                        "needs `region`: the name of this node's region".to_owned(),
                    );
                }
            }
            return;
        };
        let before = p.list.len();
        if !valid_name(&name) {
            p.add(
                "region",
                format!("`{name}` is not a region name: letters, digits, `-` and `_`"),
            );
        }
        if self.redis_url.is_none() {
            p.add(
                "region",
                "regions exchange counts between Redis stores: set `redis_url`".to_owned(),
            );
        }
        let mut list = Vec::new();
        for item in peers.unwrap_or_default() {
            let Some((peer, url)) = item.split_once('=') else {
                p.add("region_peers", format!("`{item}` is not `name=redis-url`"));
                continue;
            };
            let (peer, url) = (peer.trim(), url.trim());
            if !valid_name(peer) || peer == name || list.iter().any(|q: &Peer| q.name == peer) {
                p.add(
                    "region_peers",
                    format!(
                        "`{peer}` is not a region name of its own (another region, named once)"
                    ),
                );
            } else if let Err(e) = check_url(url) {
                p.add("region_peers", format!("region `{peer}`: {e}"));
            } else {
                list.push(Peer {
                    name: peer.to_owned(),
                    url: url.to_owned(),
                    weight: 1,
                });
            }
        }
        if list.is_empty() && p.list.len() == before {
            p.add(
                "region_peers",
                "name the other regions: `name=redis-url`, separated by commas".to_owned(),
            );
        }
        let mut weight = 1;
        for item in weights.unwrap_or_default() {
            let parsed = item
                .split_once('=')
                .and_then(|(n, w)| Some((n.trim(), w.trim().parse::<u64>().ok()?)))
                .filter(|(_, w)| (1..=1000).contains(w));
            match parsed {
                Some((n, w)) if n == name => weight = w,
                Some((n, w)) => match list.iter_mut().find(|q| q.name == n) {
                    Some(q) => q.weight = w,
                    None => p.add("region_weights", format!("`{n}` is not a region")),
                },
                None => p.add(
                    "region_weights",
                    format!("`{item}` is not `region=weight` with a weight from 1 to 1000"),
                ),
            }
        }
        let interval = sync_ms.unwrap_or(500);
        if !(10..=60_000).contains(&interval) {
            p.add(
                "region_sync_ms",
                format!("{interval} is not between 10 and 60000"),
            );
        }
        let partition = partition_ms.unwrap_or(interval.saturating_mul(6).max(3_000));
        if !(2 * interval..=3_600_000).contains(&partition) {
            p.add(
                "region_partition_ms",
                format!(
                    "{partition} is not between twice region_sync_ms ({}) and 3600000",
                    2 * interval
                ),
            );
        }
        self.regions = (p.list.len() == before).then(|| RegionSettings {
            name,
            weight,
            peers: list,
            interval: Duration::from_millis(interval),
            partition_after: Duration::from_millis(partition),
        });
    }
}
