//! The memory store: expiry, the key cap, bans, and atomic batches under contention.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::Duration;

use tollgate::Timestamp;
use tollgate::limiter::{LeaseId, Quota, WindowQuota};
use tollgate::store::{MemoryStore, Op};

const T0: u64 = 1_700_006_400_000_000;

fn window(limit: u64, secs: u64) -> Quota {
    Quota::FixedWindow(WindowQuota {
        limit: NonZeroU64::new(limit).unwrap(),
        window: NonZeroU64::new(secs * 1_000_000).unwrap(),
    })
}

fn op(key: &str, quota: Quota) -> Op<'_> {
    Op {
        key,
        quota,
        cost: 1,
        enforce: true,
        ban: None,
        lease: LeaseId(0),
        sync: None,
        global: None,
    }
}

fn at(secs: u64) -> Timestamp {
    Timestamp::from_micros(T0 + secs * 1_000_000)
}

#[test]
fn keys_expire_with_their_window() {
    let store = MemoryStore::new();
    for i in 0..100 {
        let key = format!("k{i}");
        store.apply_now(&[op(&key, window(5, 60))], at(0));
    }
    assert_eq!(store.len(), 100);
    assert_eq!(store.purge_expired(at(59)), 0);
    assert_eq!(store.purge_expired(at(60)), 100);
    assert!(store.is_empty());
}

#[test]
fn the_key_cap_evicts_and_counts() {
    let store = MemoryStore::with_max_keys(640);
    let cap = store.max_keys();
    for i in 0..cap * 3 {
        let key = format!("flood{i}");
        store.apply_now(&[op(&key, window(5, 3600))], at(0));
    }
    assert!(store.len() <= cap, "{} keys held, cap {cap}", store.len());
    assert!(
        store.evictions() >= (cap * 2) as u64 - 64,
        "evictions {}",
        store.evictions()
    );
    // Expired keys make room before live ones are evicted (a quarter of the cap, so that no
    // shard fills up with new keys alone). Eviction samples (up to 64 entries), so a shard
    // that holds mostly new keys may still give one up, rarely: allow 1 in 100.
    let evicted = store.evictions();
    for i in 0..cap / 4 {
        let key = format!("later{i}");
        store.apply_now(&[op(&key, window(5, 60))], at(4000));
    }
    assert!(
        store.evictions() - evicted <= (cap / 4 / 100) as u64,
        "expired keys should have made room: {} live keys evicted",
        store.evictions() - evicted
    );
}

/// At the cap, the sampled key ending first makes way: keys about to end go, keys with a
/// long life stay (a sample of 16 holds only long-lived keys one time in 65,536).
#[test]
fn at_the_cap_keys_ending_first_are_evicted() {
    let store = MemoryStore::with_max_keys(6_400);
    let cap = store.max_keys();
    for i in 0..cap {
        // Every other key ends in a minute, the others in a day; all are live throughout.
        let life = if i % 2 == 0 { 60 } else { 86_400 };
        store.apply_now(&[op(&format!("old{i}"), window(5, life))], at(0));
    }
    for i in 0..cap / 4 {
        store.apply_now(&[op(&format!("new{i}"), window(5, 3600))], at(1));
    }
    assert!(store.evictions() > 0);
    let long_lost = (0..cap)
        .filter(|i| i % 2 == 1)
        .filter(|i| store.peek(&format!("old{i}"), at(2)).is_none())
        .count();
    assert!(
        long_lost * 100 <= store.evictions() as usize,
        "{long_lost} long-lived keys of {} evictions",
        store.evictions()
    );
}

#[test]
fn a_rejected_batch_consumes_nothing() {
    let store = MemoryStore::new();
    let (small, large) = (window(1, 60), window(100, 60));
    let r = store.apply_now(&[op("a", small), op("b", large)], at(0));
    assert!(r.admitted);
    for _ in 0..5 {
        let r = store.apply_now(&[op("a", small), op("b", large)], at(1));
        assert!(!r.admitted);
        assert_eq!(r.results[1].decision.remaining, 99);
    }
    let r = store.apply_now(&[op("b", large)], at(2));
    assert_eq!(r.results[0].decision.remaining, 98);
}

#[test]
fn shadow_operations_never_block_a_batch() {
    let store = MemoryStore::new();
    let shadow = Op {
        enforce: false,
        ..op("s", window(1, 60))
    };
    assert!(
        store
            .apply_now(&[shadow, op("e", window(10, 60))], at(0))
            .admitted
    );
    let r = store.apply_now(&[shadow, op("e", window(10, 60))], at(0));
    assert!(r.admitted);
    assert!(!r.results[0].decision.allowed);
    assert_eq!(r.results[1].decision.remaining, 8);
}

#[test]
fn bans_refuse_until_they_end() {
    let store = MemoryStore::new();
    let banning = Op {
        ban: Some(Duration::from_secs(300)),
        ..op("b", window(1, 60))
    };
    assert!(
        store
            .apply_now(std::slice::from_ref(&banning), at(0))
            .admitted
    );
    assert!(
        !store
            .apply_now(std::slice::from_ref(&banning), at(1))
            .admitted
    );
    let r = store.apply_now(std::slice::from_ref(&banning), at(200));
    assert!(r.results[0].banned);
    assert_eq!(
        r.results[0].decision.retry_after,
        Some(Duration::from_secs(101))
    );
    assert!(
        store
            .apply_now(std::slice::from_ref(&banning), at(301))
            .admitted
    );
}

#[test]
fn concurrent_batches_admit_exactly_the_quota() {
    // 8 threads × 500 requests against shared keys, each request touching three keys in
    // different orders: exactly 1000 are admitted, and no lock order deadlocks.
    let store = Arc::new(MemoryStore::new());
    let q = window(1000, 3600);
    let big = window(1_000_000, 3600);
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut admitted = 0;
                for i in 0..500 {
                    let (mine, spread) = (format!("t{t}"), format!("i{}", i % 7));
                    let mut ops = vec![op("shared", q), op(&mine, big), op(&spread, big)];
                    if (t + i) % 2 == 0 {
                        ops.reverse();
                    }
                    if store.apply_now(&ops, at(0)).admitted {
                        admitted += 1;
                    }
                }
                admitted
            })
        })
        .collect();
    let total: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(total, 1000);
}
