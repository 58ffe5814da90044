//! `tollgate import envoy-ratelimit` on envoyproxy/ratelimit's own example configurations
//! (`tests/envoy_ratelimit/`, with their license): the converted limits, served by the gRPC
//! service on a clock that stands still, give the answers envoyproxy/ratelimit gives for the
//! same descriptors — the most specific node wins, key-only entries count per value,
//! wildcards, `unlimited`, a rate of 0, `shadow_mode`, `replaces`, descriptors deeper than
//! the configuration. What cannot be expressed is a located error.

#![cfg(feature = "envoy")]

mod support;

use std::process::Command;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use support::envoy::descriptor;
use tollgate::server::EnvoyService;
use tollgate::store::MemoryStore;
use tollgate::{ManualClock, Timestamp};

const DIR: &str = "tests/envoy_ratelimit";

/// `tollgate import envoy-ratelimit FILES`: (exit success, stdout, stderr).
fn import(files: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["import", "envoy-ratelimit"])
        .args(files.iter().map(|f| format!("{DIR}/{f}")))
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The converted limits behind the gRPC service, at the start of a day (every window whole).
struct Served {
    service: EnvoyService<MemoryStore, ManualClock>,
}

impl Served {
    fn of(files: &[&str]) -> Served {
        let (ok, text, stderr) = import(files);
        assert!(ok, "{stderr}");
        let plan = tollgate::compile(&tollgate::PolicySet::from_sources([(
            "i.rl",
            text.as_str(),
        )]))
        .unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
        let clock = ManualClock::new(Timestamp::from_secs(1_800_000_000 / 86_400 * 86_400));
        let engine = Arc::new(tollgate::Engine::with_clock(
            plan,
            MemoryStore::new(),
            clock,
        ));
        let observers = tollgate::server::Observers::new(&engine, None, None);
        let state = tollgate::server::AppState::new(engine, observers, Default::default());
        Served {
            service: EnvoyService::new(Arc::new(state)),
        }
    }

    /// The codes of one request of `descriptors` in `domain`.
    async fn codes(&self, domain: &str, descriptors: &[&[(&str, &str)]]) -> Vec<Code> {
        let request = RateLimitRequest {
            domain: domain.into(),
            descriptors: descriptors.iter().map(|d| descriptor(d)).collect(),
            hits_addend: 0,
        };
        let answer = self.service.decide(request, "t".into()).await.unwrap();
        answer
            .statuses
            .iter()
            .map(|s| Code::try_from(s.code).unwrap())
            .collect()
    }

    /// The code of `descriptor` asked alone, `n` times.
    async fn alone(&self, domain: &str, d: &[(&str, &str)], n: usize) -> Vec<Code> {
        let mut codes = Vec::new();
        for _ in 0..n {
            codes.extend(self.codes(domain, &[d]).await);
        }
        codes
    }
}

use Code::{Ok as OK, OverLimit as OVER};

#[tokio::test]
async fn the_example_decides_as_envoyproxy_ratelimit_documents() {
    let rl = Served::of(&["example_without_quota_mode.yaml"]);
    // key_value at two levels: 1 per minute.
    let mock = [("source_cluster", "proxy"), ("destination_cluster", "mock")];
    assert_eq!(rl.alone("rl", &mock, 2).await, [OK, OVER]);
    // A node without a rate limit, and a descriptor deeper than the configuration: none.
    let shallow = [("source_cluster", "proxy")];
    assert_eq!(rl.alone("rl", &shallow, 3).await, [OK, OK, OK]);
    let deeper = [("foo", "a"), ("bar", "b"), ("extra", "c")];
    assert_eq!(rl.alone("rl", &deeper, 4).await, [OK, OK, OK, OK]);
    // Key-only `foo`: 2 per minute for each value.
    assert_eq!(rl.alone("rl", &[("foo", "a")], 3).await, [OK, OK, OVER]);
    assert_eq!(rl.alone("rl", &[("foo", "b")], 1).await, [OK]);
    // `foo` then key-only `bar`: 3 per minute per pair; `bar: bkthomps` wins over it: 1.
    let pair = [("foo", "a"), ("bar", "x")];
    assert_eq!(rl.alone("rl", &pair, 4).await, [OK, OK, OK, OVER]);
    let named = [("foo", "a"), ("bar", "bkthomps")];
    assert_eq!(rl.alone("rl", &named, 2).await, [OK, OVER]);
    // A rate of 0 refuses at once; `unlimited` never does; shadow mode answers OK.
    let banned = [("foo", "a"), ("bar", "banned")];
    assert_eq!(rl.alone("rl", &banned, 1).await, [OVER]);
    let bay = [("foo", "a"), ("bay", "z")];
    assert_eq!(rl.alone("rl", &bay, 5).await, [OK; 5]);
    let shady = [("foo", "a"), ("baz", "shady")];
    assert_eq!(rl.alone("rl", &shady, 5).await, [OK; 5]);
    assert_eq!(rl.alone("rl", &[("qux", "q")], 5).await, [OK; 5]);
    // Key-only `baz`: 1 per second; `not-so-shady` has its own 3 per minute.
    let baz = [("foo", "a"), ("baz", "other")];
    assert_eq!(rl.alone("rl", &baz, 2).await, [OK, OVER]);
    let not_shady = [("foo", "a"), ("baz", "not-so-shady")];
    assert_eq!(rl.alone("rl", &not_shady, 4).await, [OK, OK, OK, OVER]);
    // Another domain of the same file.
    assert_eq!(rl.alone("rl", &[("database", "users")], 1).await, [OK]);
}

#[tokio::test]
async fn replaces_takes_the_named_limits_off_the_whole_request() {
    let rl = Served::of(&["example_without_quota_mode.yaml"]);
    let banned: &[(&str, &str)] = &[("foo", "a"), ("bar", "banned")];
    let override_: &[(&str, &str)] = &[
        ("source_cluster", "proxy"),
        ("destination_cluster", "override"),
    ];
    // `override` replaces `banned_limit`: the banned descriptor passes while it is asked with it.
    assert_eq!(rl.codes("rl", &[override_, banned]).await, [OK, OK]);
    assert_eq!(rl.codes("rl", &[banned]).await, [OVER]);
    // `category: account` replaces `bkthomps` and `fake_name`.
    let bkthomps: &[(&str, &str)] = &[("foo", "b"), ("bar", "bkthomps")];
    let account: &[(&str, &str)] = &[("category", "account")];
    assert_eq!(rl.codes("rl", &[bkthomps]).await, [OK]);
    assert_eq!(rl.codes("rl", &[bkthomps]).await, [OVER]);
    assert_eq!(rl.codes("rl", &[account, bkthomps]).await, [OK, OK]);
}

#[tokio::test]
async fn wildcards_match_as_envoyproxy_ratelimit_matches_them() {
    let test = Served::of(&["wildcard.yaml"]);
    // `foo*`: 20 per minute for each value it matches.
    assert_eq!(
        test.alone("test-domain", &[("wild", "foo1")], 21)
            .await
            .last(),
        Some(&OVER)
    );
    assert_eq!(
        test.alone("test-domain", &[("wild", "foo2")], 1).await,
        [OK]
    );
    assert_eq!(
        test.alone("test-domain", &[("wild", "goo1")], 25).await,
        [OK; 25]
    );
    // `bar*b` and `foo*bar*baz`: a wildcard anywhere.
    assert_eq!(
        test.alone("test-domain", &[("midWild", "barXYb")], 21)
            .await
            .last(),
        Some(&OVER)
    );
    assert_eq!(
        test.alone("test-domain", &[("midWild", "barXY")], 25).await,
        [OK; 25]
    );
    let multi = [("multiWild", "foo-bar-baz")];
    assert_eq!(
        test.alone("test-domain", &multi, 11).await.last(),
        Some(&OVER)
    );
    // Nested under an exact value.
    let nested = [("nestedWild", "val1"), ("wild", "goo7")];
    assert_eq!(
        test.alone("test-domain", &nested, 21).await.last(),
        Some(&OVER)
    );
    let elsewhere = [("nestedWild", "val2"), ("wild", "goo7")];
    assert_eq!(test.alone("test-domain", &elsewhere, 25).await, [OK; 25]);
}

#[tokio::test]
async fn several_files_convert_together() {
    let both = Served::of(&["config.yaml", "wildcard.yaml"]);
    let users = [("database", "users")];
    let codes = both.alone("mongo_cps", &users, 501).await;
    assert_eq!((codes[499], codes[500]), (OK, OVER), "500 per second");
    assert_eq!(
        both.alone("mongo_cps", &[("database", "other")], 3).await,
        [OK; 3]
    );
    assert_eq!(
        both.alone("test-domain", &[("noWild", "foo")], 1).await,
        [OK]
    );
}

#[test]
fn what_cannot_be_expressed_is_a_located_error_and_nothing_is_written() {
    let (ok, stdout, stderr) = import(&["example.yaml"]);
    assert!(!ok);
    assert_eq!(stdout, "");
    // The two `quota_mode` descriptors, each at its own line.
    assert!(
        stderr.contains("example.yaml:87: `quota_mode` cannot be expressed")
            && stderr.contains("example.yaml:96: `quota_mode` cannot be expressed"),
        "{stderr}"
    );
    // `detailed_metric` has no equivalent: a warning, the rest still converts.
    let (ok, _, stderr) = import(&["example_without_quota_mode.yaml"]);
    assert!(ok);
    assert!(
        stderr.contains("example_without_quota_mode.yaml:80: `detailed_metric`"),
        "{stderr}"
    );
}

#[test]
fn malformed_configurations_say_where() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: fortnight\n      requests_per_unit: 1\n",
            "bad.yaml:3: `fortnight` is not a unit",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unlimited: true\n      unit: second\n",
            "bad.yaml:3: an `unlimited` rate has no unit",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    colour: blue\n",
            "bad.yaml:4:5: descriptors[0]: unknown field `colour`",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    value: x\n  - key: a\n    value: x\n",
            "`a` `x` is written twice at one level",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit:\n      unit: second\n      requests_per_unit: 2\n      name: n\n      replaces:\n        - name: n\n",
            "`replaces` names `n`",
        ),
    ];
    for (text, says) in cases {
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, text).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["import", "envoy-ratelimit"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{text}");
        assert!(stderr.contains(says), "{says}:\n{stderr}");
    }
}
