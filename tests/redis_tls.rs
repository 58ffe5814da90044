//! TLS to Redis (`rediss://`, `rediss+cluster://`): real `redis-server`s with a TLS port,
//! certificates made by the test. Counting over TLS agrees with the quota; a server whose
//! certificate no trusted CA signed, and a server that wants a client certificate we do not
//! have, are refused at connection time with an error, never used.

mod support;

use std::time::Duration;

use http::Method;
use support::redis::{Cluster, Redis};
use support::tls::Certs;
use tollgate::store::redis::{RedisOptions, RedisStore, RedisTls};
use tollgate::verdict::Counted;
use tollgate::{Engine, ManualClock, PolicySet, RequestCtx, Timestamp, compile};

const POLICY: &str = r#"
limit api { match { route ANY "/**"; } algorithm fixed_window; rate 3/min; }
"#;

fn options(tls: RedisTls) -> RedisOptions {
    RedisOptions {
        timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(5),
        tls: Some(tls),
        ..RedisOptions::default()
    }
}

fn trusting(certs: &Certs) -> RedisTls {
    RedisTls {
        ca_pem: Some(certs.read("ca.pem")),
        client: None,
    }
}

/// Sends four requests from each client address; every one must be counted in Redis, and
/// each client gets exactly its three.
async fn counts_the_quota_for_each_client(store: RedisStore, clients: &[&str]) {
    let plan = compile(&PolicySet::from_sources([("tls.rl", POLICY)])).expect("compiles");
    let clock = ManualClock::new(Timestamp::from_secs(1_700_006_400));
    let engine = Engine::with_clock(plan, store, clock);
    for client in clients {
        let mut admitted = 0;
        for _ in 0..4 {
            let ctx = RequestCtx::new(Method::GET, "/x").with_client_ip(client.parse().unwrap());
            let verdict = engine.decide(&ctx).await;
            assert_eq!(verdict.reports[0].counted, Counted::Store, "{verdict:?}");
            admitted += usize::from(verdict.is_allowed());
        }
        assert_eq!(admitted, 3, "{client}");
    }
}

#[tokio::test]
async fn one_server_over_tls_counts_every_request() {
    let certs = Certs::generate();
    let Some(server) = Redis::start_tls(&certs, false) else {
        return;
    };
    let store = RedisStore::connect_with(&server.tls_url(), options(trusting(&certs)))
        .await
        .expect("connects over TLS");
    counts_the_quota_for_each_client(store, &["198.51.100.7", "203.0.113.9"]).await;
    // The calls went to this server (read back over its plain port).
    assert_eq!(server.calls("evalsha"), 8);
}

#[tokio::test]
async fn a_server_no_trusted_ca_signed_is_refused() {
    let certs = Certs::generate();
    let stranger = Certs::generate();
    let Some(server) = Redis::start_tls(&certs, false) else {
        return;
    };
    // Another CA, and the system's roots: neither signed this server's certificate.
    for tls in [trusting(&stranger), RedisTls::default()] {
        let error = RedisStore::connect_with(&server.tls_url(), options(tls))
            .await
            .expect_err("an unknown certificate is refused");
        let text = error.to_string().to_ascii_lowercase();
        assert!(
            text.contains("certificate") || text.contains("issuer"),
            "the error says why: {text}"
        );
    }
    assert_eq!(server.calls("evalsha"), 0);
}

#[tokio::test]
async fn a_server_that_requires_client_certificates_gets_ours() {
    let certs = Certs::generate();
    let Some(server) = Redis::start_tls(&certs, true) else {
        return;
    };
    // Without a client certificate the handshake (or the first command) fails.
    assert!(
        RedisStore::connect_with(&server.tls_url(), options(trusting(&certs)))
            .await
            .is_err(),
        "no client certificate, no connection"
    );
    let with_client = RedisTls {
        client: Some((certs.read("client.pem"), certs.read("client.key"))),
        ..trusting(&certs)
    };
    let store = RedisStore::connect_with(&server.tls_url(), options(with_client))
        .await
        .expect("connects with a client certificate");
    counts_the_quota_for_each_client(store, &["198.51.100.7"]).await;
}

#[tokio::test]
async fn a_cluster_over_tls_counts_on_every_master() {
    let certs = Certs::generate();
    let Some(cluster) = Cluster::start_tls(3, 0, &certs) else {
        return;
    };
    let store = RedisStore::connect_with(&cluster.tls_url(), options(trusting(&certs)))
        .await
        .expect("connects to the cluster over TLS");
    assert!(store.is_cluster());
    // Clients whose keys fall in different slots, so that more than one master counts.
    let clients = [
        "198.51.100.7",
        "203.0.113.9",
        "192.0.2.1",
        "198.51.100.200",
        "203.0.113.77",
        "192.0.2.140",
    ];
    counts_the_quota_for_each_client(store, &clients).await;
    let busy = cluster
        .nodes
        .iter()
        .filter(|n| n.calls("evalsha") > 0)
        .count();
    assert!(busy >= 2, "the keys went to {busy} master(s)");
    assert_eq!(cluster.calls("evalsha"), 4 * clients.len() as u64);
}

/// Rotated certificates are picked up without a restart: the server comes to trust only
/// another CA's client certificates (as when an operator rotates them); once the new
/// certificate and key are written over the files the settings name, the watch puts them in
/// use and decisions count in Redis again. Certificates that do not connect (a CA that did
/// not sign the server, a client certificate the server does not trust) and unreadable
/// files keep the ones in use.
#[tokio::test]
async fn rotated_certificates_are_picked_up_without_a_restart() {
    use tollgate::store::AnyStore;
    use tollgate::store::redis::RedisTlsFiles;
    let old = Certs::generate();
    let new = Certs::generate();
    let Some(server) = Redis::start_tls(&old, true) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let files = RedisTlsFiles {
        ca: Some(dir.path().join("ca.pem")),
        cert: Some(dir.path().join("client.pem")),
        key: Some(dir.path().join("client.key")),
    };
    let write = |certs: &Certs, file: &str| {
        // Written beside and renamed over, as deployment tools do.
        let temp = dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&temp, certs.read(file)).unwrap();
        std::fs::rename(&temp, dir.path().join(file)).unwrap();
    };
    for file in ["ca.pem", "client.pem", "client.key"] {
        write(&old, file);
    }
    let in_use = files.read().expect("the files hold certificates");
    let store = RedisStore::connect_with(&server.tls_url(), options(in_use.clone()))
        .await
        .expect("connects with the first client certificate");
    let plan = compile(&PolicySet::from_sources([("tls.rl", POLICY)])).expect("compiles");
    let engine = std::sync::Arc::new(Engine::new(plan, AnyStore::Redis(Box::new(store))));
    let counted = async |engine: &Engine<AnyStore>| {
        let ctx = RequestCtx::new(Method::GET, "/x").with_client_ip([198, 51, 100, 7].into());
        engine.decide(&ctx).await.reports[0].counted == Counted::Store
    };
    let rotations = |engine: &Engine<AnyStore>| match engine.store() {
        AnyStore::Redis(r) => r.tls_rotations(),
        AnyStore::Memory(_) => unreachable!(),
    };
    assert!(counted(&engine).await);

    // Certificates that do not connect are refused; the connection in use stays.
    let AnyStore::Redis(redis) = engine.store() else {
        unreachable!()
    };
    let wrong_ca = RedisTls {
        ca_pem: Some(new.read("ca.pem")),
        client: in_use.client.clone(),
    };
    let untrusted_client = RedisTls {
        ca_pem: in_use.ca_pem.clone(),
        client: Some((new.read("client.pem"), new.read("client.key"))),
    };
    for tls in [wrong_ca, untrusted_client] {
        assert!(redis.rotate_tls(&tls).await.is_err());
        assert!(counted(&engine).await, "the connection in use stays");
    }
    assert_eq!(rotations(&engine), 0);

    let _watch = tollgate::server::watch_redis_tls(
        std::sync::Arc::clone(&engine),
        files.clone(),
        Some(in_use),
        Duration::from_millis(50),
    )
    .expect("the files are watched");
    // An unreadable file is not put in use.
    std::fs::write(dir.path().join("client.pem"), "not a certificate").unwrap();
    assert!(files.read().is_err());

    // The server now trusts only the new CA's clients, and drops its connections: the old
    // certificate no longer connects.
    server.cli(&[
        "CONFIG",
        "SET",
        "tls-ca-cert-file",
        &new.path("ca.pem").display().to_string(),
    ]);
    server.cli(&["CLIENT", "KILL", "TYPE", "normal"]);
    let mut failing = false;
    for _ in 0..100 {
        if !counted(&engine).await {
            failing = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        failing,
        "with the old certificate, Redis refuses the connection"
    );
    assert_eq!(rotations(&engine), 0, "the unreadable file was not used");

    // The operator writes the new client certificate and key; the server certificate (and
    // so the CA file) stays the old one.
    write(&new, "client.key");
    write(&new, "client.pem");
    let mut picked_up = false;
    for _ in 0..500 {
        if rotations(&engine) == 1 && counted(&engine).await {
            picked_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(picked_up, "the new certificate is in use within 10 s");
}
