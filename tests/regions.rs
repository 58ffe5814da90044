//! Limits counted across regions (`global;`), on real servers: three regions, each its own
//! Redis, the exchanges between them through proxies that can be cut. Each region counts its
//! own and what the others sent, pushes are idempotent, a partition follows `on_partition`
//! (share: the regions together within the quota, each within its share; local; deny), and
//! after healing the counts merge without counting twice.

mod support;

use std::time::Duration;

use http::Method;
use support::netem::Netem;
use support::redis::Redis;
use tollgate::store::redis::{Peer, RedisOptions, RedisStore, RegionSettings};
use tollgate::{Engine, ManualClock, PolicySet, RequestCtx, Timestamp, compile};

/// An hour boundary, so that windows start aligned.
const START: u64 = 1_700_006_400;
const NAMES: [&str; 3] = ["eu", "us", "ap"];

const POLICY: &str = r#"
limit shared { match { route ANY "/shared"; } key global; algorithm fixed_window; rate 100/h; global; }
limit share { match { route ANY "/share"; } key global; algorithm fixed_window; rate 90/h; global; on_partition share; }
limit local { match { route ANY "/local"; } key global; algorithm fixed_window; rate 90/h; global; on_partition local; }
limit deny { match { route ANY "/deny"; } key global; algorithm fixed_window; rate 90/h; global; on_partition deny; }
"#;

type Node = Engine<RedisStore, ManualClock>;

/// Three regions on this machine: each a Redis and one node, every exchange through a proxy
/// (`links[from][to]`) that can be cut.
struct Regions {
    nodes: Vec<Node>,
    links: Vec<Vec<Option<Netem>>>,
    servers: Vec<Redis>,
    clock: ManualClock,
}

impl Regions {
    async fn start(partition_after: Duration) -> Option<Regions> {
        let servers = (0..3).map(|_| Redis::start()).collect::<Option<Vec<_>>>()?;
        let links: Vec<Vec<Option<Netem>>> = (0..3)
            .map(|from| {
                (0..3)
                    .map(|to| (from != to).then(|| Netem::start(servers[to].addr)))
                    .collect()
            })
            .collect();
        let clock = ManualClock::new(Timestamp::from_secs(START));
        let plan = || {
            compile(&PolicySet::from_sources([("regions.rl", POLICY)]))
                .unwrap_or_else(|e| panic!("{}", e.render_plain(100)))
        };
        let mut nodes = Vec::new();
        for (i, server) in servers.iter().enumerate() {
            let peers = (0..3)
                .filter(|&j| j != i)
                .map(|j| Peer {
                    name: NAMES[j].to_owned(),
                    url: format!("redis://{}", links[i][j].as_ref().unwrap().addr),
                    weight: 1,
                })
                .collect();
            let options = RedisOptions {
                timeout: Duration::from_secs(2),
                connect_timeout: Duration::from_secs(2),
                deny_cache: None,
                regions: Some(RegionSettings {
                    name: NAMES[i].to_owned(),
                    weight: 1,
                    peers,
                    // The test exchanges when it says so; the background one rarely.
                    interval: Duration::from_secs(60),
                    partition_after,
                }),
                ..RedisOptions::default()
            };
            let store = RedisStore::connect_with(&server.url(), options)
                .await
                .expect("the store connects");
            nodes.push(
                Engine::with_clock(plan(), store, clock.clone())
                    .with_key_hasher(tollgate::plan::KeyHasher::new([7; 32])),
            );
        }
        Some(Regions {
            nodes,
            links,
            servers,
            clock,
        })
    }

    /// Requests to `path` on region `r` until one is refused (at most `most`); how many got
    /// in.
    async fn admit(&self, r: usize, path: &str, most: u32) -> u32 {
        let request = RequestCtx::new(Method::GET, path);
        for admitted in 0..most {
            if !self.nodes[r].decide(&request).await.is_allowed() {
                return admitted;
            }
        }
        most
    }

    async fn exchange(&self, r: usize) {
        self.nodes[r]
            .store()
            .exchange_now()
            .await
            .expect("the region's Redis answers");
    }

    async fn exchange_all(&self) {
        for r in 0..3 {
            self.exchange(r).await;
        }
    }

    /// Cuts (or heals) every link between region `r` and the others, both ways.
    fn isolate(&self, r: usize, cut: bool) {
        for other in (0..3).filter(|&o| o != r) {
            self.links[r][other].as_ref().unwrap().cut(cut);
            self.links[other][r].as_ref().unwrap().cut(cut);
        }
    }

    /// Exchanges until every region sees region `r` as `partitioned` (and `r` sees the
    /// others so): the silence is measured on each Redis's own clock, which the test does
    /// not control.
    async fn until_partitioned(&self, r: usize, partitioned: bool) {
        for _ in 0..1000 {
            let mut all = true;
            for node in 0..3 {
                let _ = self.nodes[node].store().exchange_now().await;
                let health = tollgate::store::Store::health(self.nodes[node].store());
                let regions = health.regions.expect("regions in the health");
                for peer in &regions.peers {
                    let involved = node == r || peer.name == NAMES[r];
                    if involved && peer.partitioned != partitioned {
                        all = false;
                    }
                }
            }
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "region {} never became partitioned = {partitioned}",
            NAMES[r]
        );
    }

    /// What region `r`'s Redis holds for `limit`'s key: field → value.
    fn held(&self, r: usize, limit: &str) -> std::collections::HashMap<String, String> {
        self.servers[r].hash(&format!("regions:{{global}}:{limit}"))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    support::runtime()
}

#[test]
fn each_region_counts_its_own_and_what_the_others_sent_once() {
    runtime().block_on(async {
        let Some(regions) = Regions::start(Duration::from_secs(3600)).await else {
            return;
        };
        let _ = &regions.clock;
        // Between exchanges a region knows only its own count: at most the quota each.
        assert_eq!(regions.admit(0, "/shared", 60).await, 60);
        regions.exchange(0).await;
        let window = START * 1_000_000;
        for r in [1, 2] {
            let held = regions.held(r, "shared");
            assert_eq!(held["g:eu"], format!("{window} 60"), "{held:?}");
            assert_eq!(held["o"], "60");
        }
        // The others decide on their count plus what eu sent.
        assert_eq!(regions.admit(1, "/shared", 100).await, 40);
        regions.exchange(1).await;
        assert_eq!(regions.admit(2, "/shared", 100).await, 0);
        assert_eq!(regions.admit(0, "/shared", 100).await, 0);
        // Pushes sent again change nothing: components, not deltas.
        for _ in 0..3 {
            regions.exchange_all().await;
        }
        for (r, name) in NAMES.iter().enumerate() {
            let held = regions.held(r, "shared");
            let (own, others) = support::redis::components(&held);
            assert_eq!(own + others, 100, "region {}: {held:?}", name);
            assert_eq!(held["o"], others.to_string());
        }
    });
}

#[test]
fn without_exchanges_no_region_admits_more_than_the_quota() {
    runtime().block_on(async {
        let Some(regions) = Regions::start(Duration::from_secs(3600)).await else {
            return;
        };
        // The worst case, R × quota: no region has heard what the others admitted.
        let admitted: Vec<u32> = [
            regions.admit(0, "/shared", 200).await,
            regions.admit(1, "/shared", 200).await,
            regions.admit(2, "/shared", 200).await,
        ]
        .to_vec();
        assert_eq!(admitted, [100, 100, 100]);
        // Once they have, none admits more.
        regions.exchange_all().await;
        for r in 0..3 {
            assert_eq!(regions.admit(r, "/shared", 10).await, 0);
        }
    });
}

#[test]
fn a_partition_follows_on_partition_and_heals_without_counting_twice() {
    runtime().block_on(async {
        let Some(regions) = Regions::start(Duration::from_secs(2)).await else {
            return;
        };
        // Before the partition: eu counted 10 in each limit, and every region knows it.
        for path in ["/share", "/local", "/deny"] {
            assert_eq!(regions.admit(0, path, 10).await, 10);
        }
        regions.exchange_all().await;
        regions.until_partitioned(2, false).await;

        regions.isolate(2, true);
        regions.until_partitioned(2, true).await;
        // `share` (90, three regions: 30 each): ap counts eu as at least 30 and us as at
        // least 30, so it admits its share; eu and us count ap as 30, and share the rest.
        // A key ap had not counted in before is read at its next exchange: until then ap
        // assumes the silent regions used at least their shares, whatever they sent.
        let first = regions.admit(2, "/share", 100).await;
        assert_eq!(first, 20, "eu's 10 not yet read: 30 + 30 + 10 assumed");
        regions.exchange(2).await;
        let ap = first + regions.admit(2, "/share", 100).await;
        assert_eq!(ap, 30, "ap keeps within its share");
        let us = regions.admit(1, "/share", 100).await;
        regions.exchange_all().await;
        let eu = regions.admit(0, "/share", 100).await;
        assert_eq!(
            10 + eu + us,
            60,
            "eu and us keep within the rest: {eu} + {us}"
        );
        // `local`: each side goes on with what it last knew of the other.
        assert_eq!(regions.admit(2, "/local", 100).await, 80);
        assert_eq!(regions.admit(1, "/local", 100).await, 80);
        // `deny`: refused while a region is silent.
        for (r, name) in NAMES.iter().enumerate() {
            assert_eq!(regions.admit(r, "/deny", 10).await, 0, "{}", name);
        }

        regions.isolate(2, false);
        regions.until_partitioned(2, false).await;
        regions.exchange_all().await;
        // `deny` counted nothing meanwhile: eu's 10, and 80 left for anyone.
        assert_eq!(regions.admit(0, "/deny", 100).await, 80);
        regions.exchange_all().await;
        // Healed: every region holds every other's count once, and admits by the total.
        for (r, name) in NAMES.iter().enumerate() {
            let held = regions.held(r, "share");
            let (own, others) = support::redis::components(&held);
            assert_eq!(own + others, 90, "region {}: {held:?}", name);
            assert_eq!(regions.admit(r, "/share", 10).await, 0);
            assert_eq!(regions.admit(r, "/deny", 10).await, 0);
        }
        // `local` over-admitted during the partition (10 + 80 + 80 of 90): after healing
        // nobody admits until the window ends.
        for r in 0..3 {
            assert_eq!(regions.admit(r, "/local", 10).await, 0);
        }
    });
}
