//! Settings: precedence of file, variables and flags; every problem at once, with its source.

use std::path::PathBuf;

use tollgate::config::{Environment, Flags, Settings, StoreClock};

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "tollgate-config-{}-{name}.toml",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn defaults_need_no_configuration() {
    let s = Settings::load_from(&Flags::default(), vars(&[])).unwrap();
    assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(s.admin_listen.to_string(), "127.0.0.1:9091");
    assert_eq!(s.policies, PathBuf::from("policies"));
    assert_eq!(s.env, Environment::Dev);
    assert!(s.redis_url.is_none() && s.legacy_headers && s.ietf_headers);
    assert_eq!(s.store_timeout_ms, 50);
}

#[test]
fn flags_beat_variables_which_beat_the_file() {
    let path = file(
        "precedence",
        "listen = \"127.0.0.1:1000\"\nadmin_listen = \"127.0.0.1:1001\"\nstore_timeout_ms = 10\n",
    );
    let flags = Flags {
        listen: Some("127.0.0.1:3000".into()),
        config: Some(path),
        ..Flags::default()
    };
    let s = Settings::load_from(
        &flags,
        vars(&[
            ("TOLLGATE_LISTEN", "127.0.0.1:2000"),
            ("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:2001"),
            ("TOLLGATE_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.1"),
            ("TOLLGATE_HEADER_FAMILIES", "ietf"),
            ("TOLLGATE_ADMIN_TOKEN", "12345678901234567890"),
            ("TOLLGATE_MAX_BODY_BYTES", "1024"),
            ("UNRELATED", "ignored"),
        ]),
    )
    .unwrap();
    assert_eq!(s.listen.to_string(), "127.0.0.1:3000", "flag");
    assert_eq!(s.admin_listen.to_string(), "127.0.0.1:2001", "variable");
    assert_eq!(s.store_timeout_ms, 10, "file");
    assert_eq!(s.trusted_proxies.len(), 2);
    assert!(s.ietf_headers && !s.legacy_headers);
    assert_eq!(
        s.admin_token.as_deref(),
        Some("12345678901234567890"),
        "digits stay text"
    );
    assert_eq!(s.max_body_bytes, 1024);
}

#[test]
fn every_invalid_value_is_reported_with_its_source() {
    let path = file(
        "invalid",
        "# settings\nlisten = \"nowhere\"\nstore_timeout_ms = \"soon\"\ntrusted_proxy = [\"10.0.0.0/8\"]\n",
    );
    let flags = Flags {
        config: Some(path.clone()),
        upstream: Some("ftp://x".into()),
        ..Flags::default()
    };
    let error = Settings::load_from(
        &flags,
        vars(&[
            ("TOLLGATE_TRUSTED_PROXIES", "10.0.0.0/8,not-a-net"),
            ("TOLLGATE_ENV", "staging"),
            ("TOLLGATE_LISTN", "127.0.0.1:1"),
        ]),
    )
    .unwrap_err();
    let found: Vec<(String, String)> = error
        .0
        .iter()
        .map(|p| (p.key.clone(), p.source.clone()))
        .collect();
    let file_at = |line: usize| format!("{}:{line}", path.display());
    for expected in [
        ("listen".to_owned(), file_at(2)),
        ("store_timeout_ms".to_owned(), file_at(3)),
        ("trusted_proxy".to_owned(), file_at(4)),
        (
            "trusted_proxies".to_owned(),
            "TOLLGATE_TRUSTED_PROXIES".to_owned(),
        ),
        ("env".to_owned(), "TOLLGATE_ENV".to_owned()),
        ("listn".to_owned(), "TOLLGATE_LISTN".to_owned()),
        ("upstream".to_owned(), "--upstream".to_owned()),
    ] {
        assert!(found.contains(&expected), "{expected:?} not in {found:?}");
    }
    let text = error.to_string();
    assert!(text.contains("did you mean `trusted_proxies`?"), "{text}");
    assert!(text.contains("`not-a-net` is not an address"), "{text}");
}

#[test]
fn production_requires_a_store_and_a_key_secret() {
    let error =
        Settings::load_from(&Flags::default(), vars(&[("TOLLGATE_ENV", "prod")])).unwrap_err();
    let keys: Vec<&str> = error.0.iter().map(|p| p.key.as_str()).collect();
    assert!(
        keys.contains(&"redis_url") && keys.contains(&"key_secret"),
        "{keys:?}"
    );
}

#[test]
fn jwt_settings_are_checked() {
    let error = Settings::load_from(
        &Flags::default(),
        vars(&[
            ("TOLLGATE_JWT_ALGORITHM", "RS256"),
            ("TOLLGATE_JWT_SECRET", "0123456789abcdef"),
        ]),
    )
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("`RS256` needs `jwt_public_key_file`"),
        "{error}"
    );
    let ok = Settings::load_from(
        &Flags::default(),
        vars(&[("TOLLGATE_JWT_SECRET", "0123456789abcdef")]),
    )
    .unwrap();
    assert!(ok.jwt.is_some());
}

#[test]
fn store_settings_are_read_and_checked() {
    let s = Settings::load_from(
        &Flags::default(),
        vars(&[
            (
                "TOLLGATE_REDIS_URL",
                "redis+cluster://10.0.0.5:7000,10.0.0.6:7000",
            ),
            ("TOLLGATE_STORE_CLOCK", "redis"),
            ("TOLLGATE_EXPECTED_NODES", "4"),
            ("TOLLGATE_DENY_CACHE_KEYS", "0"),
            ("TOLLGATE_MEMORY_MAX_KEYS", "5000"),
            ("TOLLGATE_BREAKER_FAILURES", "5"),
            ("TOLLGATE_BREAKER_MAX_BACKOFF_MS", "2000"),
            ("TOLLGATE_REDIS_BATCH_MAX", "8"),
        ]),
    )
    .unwrap();
    assert_eq!(s.store_clock, StoreClock::Redis);
    assert_eq!(tollgate::server::redis_options(&s).batch_max, 8);
    assert_eq!(
        (s.expected_nodes, s.deny_cache_keys, s.breaker_failures),
        (4, 0, 5)
    );
    assert_eq!(s.memory_max_keys, 5000);
    let options = tollgate::server::redis_options(&s);
    assert!(options.server_time && options.deny_cache.is_none());
    assert_eq!(options.breaker.max_backoff.as_millis(), 2000);

    let defaults = Settings::load_from(&Flags::default(), vars(&[])).unwrap();
    let options = tollgate::server::redis_options(&defaults);
    assert_eq!(defaults.store_clock, StoreClock::Local);
    assert_eq!(
        options.deny_cache,
        Some(100_000),
        "the deny cache is on by default"
    );
    assert_eq!(options.timeout.as_millis(), 50);
    assert_eq!(options.batch_max, 64, "batching is on by default");

    let error = Settings::load_from(
        &Flags::default(),
        vars(&[
            ("TOLLGATE_REDIS_URL", "http://redis:6379"),
            ("TOLLGATE_STORE_CLOCK", "ntp"),
            ("TOLLGATE_EXPECTED_NODES", "0"),
            ("TOLLGATE_BREAKER_FAILURES", "0"),
            ("TOLLGATE_BREAKER_MAX_BACKOFF_MS", "soon"),
            ("TOLLGATE_MEMORY_MAX_KEYS", "10"),
            ("TOLLGATE_REDIS_BATCH_MAX", "0"),
        ]),
    )
    .unwrap_err();
    let keys: Vec<&str> = error.0.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "redis_url",
        "store_clock",
        "expected_nodes",
        "breaker_failures",
        "breaker_max_backoff_ms",
        "memory_max_keys",
        "redis_batch_max",
    ] {
        assert!(keys.contains(&key), "{key} not in {keys:?}");
    }
}

#[test]
fn redis_tls_settings_are_read_and_checked() {
    let dir = std::env::temp_dir().join(format!("tollgate-config-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let ca = write("ca.pem", cert);
    let client = write("client.pem", cert);
    let key = write(
        "client.key",
        "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
    );
    let not_pem = write("notes.txt", "hello");

    // `rediss://` alone: the system's roots, no client certificate.
    let s = Settings::load_from(
        &Flags::default(),
        vars(&[("TOLLGATE_REDIS_URL", "rediss://cache.example:6380")]),
    )
    .unwrap();
    assert!(s.redis_tls.is_none());
    let s = Settings::load_from(
        &Flags::default(),
        vars(&[
            ("TOLLGATE_REDIS_URL", "rediss+cluster://a:6380,b:6380"),
            ("TOLLGATE_REDIS_TLS_CA_FILE", &ca),
            ("TOLLGATE_REDIS_TLS_CERT_FILE", &client),
            ("TOLLGATE_REDIS_TLS_KEY_FILE", &key),
        ]),
    )
    .unwrap();
    let tls = tollgate::server::redis_options(&s)
        .tls
        .expect("certificates");
    assert_eq!(tls.ca_pem.as_deref(), Some(cert.as_bytes()));
    assert!(tls.client.is_some());
    assert!(
        !format!("{tls:?}").contains("PRIVATE"),
        "Debug never prints the key"
    );

    let problems = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        Settings::load_from(&Flags::default(), vars(pairs))
            .unwrap_err()
            .0
            .into_iter()
            .map(|p| (p.key, p.message))
            .collect()
    };
    // Certificates with a plain URL, a missing file, a file that is not PEM, half a pair.
    let found = problems(&[
        ("TOLLGATE_REDIS_URL", "redis://cache:6379"),
        ("TOLLGATE_REDIS_TLS_CA_FILE", &ca),
    ]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].0 == "redis_tls_ca_file" && found[0].1.contains("rediss://"));
    let found = problems(&[("TOLLGATE_REDIS_URL", "rediss://cache:6380/#insecure")]);
    assert!(found[0].0 == "redis_url" && found[0].1.contains("cannot be turned off"));
    let missing = dir.join("nowhere.pem").display().to_string();
    let found = problems(&[
        ("TOLLGATE_REDIS_URL", "rediss://cache:6380"),
        ("TOLLGATE_REDIS_TLS_CA_FILE", &missing),
        ("TOLLGATE_REDIS_TLS_CERT_FILE", &not_pem),
    ]);
    let keys: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "redis_tls_ca_file",
            "redis_tls_cert_file",
            "redis_tls_key_file"
        ],
        "{found:?}"
    );
    assert!(found[0].1.contains("cannot read"));
    assert!(found[1].1.contains("no PEM certificate"));
    assert!(found[2].1.contains("both"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metrics_on_main_is_a_yes_or_no() {
    let from_file = file("metrics", "metrics_on_main = true\n");
    let flags = Flags {
        config: Some(from_file),
        ..Flags::default()
    };
    assert!(
        Settings::load_from(&flags, vars(&[]))
            .unwrap()
            .metrics_on_main
    );
    let s = Settings::load_from(
        &Flags::default(),
        vars(&[("TOLLGATE_METRICS_ON_MAIN", "true")]),
    );
    assert!(s.unwrap().metrics_on_main);
    assert!(
        !Settings::load_from(&Flags::default(), vars(&[]))
            .unwrap()
            .metrics_on_main
    );
    let wrong = Settings::load_from(
        &Flags::default(),
        vars(&[("TOLLGATE_METRICS_ON_MAIN", "yes")]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        wrong.contains("metrics_on_main") && wrong.contains("true"),
        "{wrong}"
    );
}

#[test]
fn logs_are_json_in_production_unless_set() {
    use tollgate::config::LogFormat;
    let prod = [
        ("TOLLGATE_ENV", "prod"),
        ("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6379"),
        ("TOLLGATE_KEY_SECRET", "0123456789abcdef0123"),
        ("TOLLGATE_ADMIN_TOKEN", "12345678901234567890"),
    ];
    let s = Settings::load_from(&Flags::default(), vars(&prod)).unwrap();
    assert_eq!(s.log_format, LogFormat::Json);
    let mut pretty = prod.to_vec();
    pretty.push(("TOLLGATE_LOG_FORMAT", "pretty"));
    let s = Settings::load_from(&Flags::default(), vars(&pretty)).unwrap();
    assert_eq!(s.log_format, LogFormat::Pretty);
    let dev = Settings::load_from(&Flags::default(), vars(&[])).unwrap();
    assert_eq!(dev.log_format, LogFormat::Pretty);
}

#[test]
fn export_settings_are_read_and_checked() {
    let s = Settings::load_from(
        &Flags::default(),
        vars(&[
            ("TOLLGATE_CLICKHOUSE_URL", "http://127.0.0.1:8123"),
            ("TOLLGATE_CLICKHOUSE_SAMPLE_ALLOWS", "0.1"),
            ("TOLLGATE_CLICKHOUSE_SPOOL_DIR", "/var/lib/tollgate/spool"),
            ("TOLLGATE_CLICKHOUSE_SPOOL_MAX_MB", "64"),
            ("TOLLGATE_CLICKHOUSE_TENANT_HEADER", "X-Tenant"),
            ("TOLLGATE_CLICKHOUSE_TRUNCATE_IP", "true"),
            ("TOLLGATE_CLICKHOUSE_MIGRATE", "true"),
        ]),
    )
    .unwrap();
    assert_eq!(s.clickhouse_sample_allows, 0.1);
    assert_eq!(
        s.clickhouse_spool_dir,
        Some(PathBuf::from("/var/lib/tollgate/spool"))
    );
    assert_eq!(s.clickhouse_spool_max_mb, 64);
    assert_eq!(s.clickhouse_tenant_header.unwrap().as_str(), "x-tenant");
    assert!(s.clickhouse_truncate_ip && s.clickhouse_migrate);

    let file_rate = file("sample", "clickhouse_sample_allows = 0.25\n");
    let s = Settings::load_from(
        &Flags {
            config: Some(file_rate),
            ..Flags::default()
        },
        vars(&[]),
    )
    .unwrap();
    assert_eq!(s.clickhouse_sample_allows, 0.25);

    let error = Settings::load_from(
        &Flags::default(),
        vars(&[
            ("TOLLGATE_CLICKHOUSE_SAMPLE_ALLOWS", "0"),
            ("TOLLGATE_CLICKHOUSE_SPOOL_MAX_MB", "0"),
            ("TOLLGATE_CLICKHOUSE_TENANT_HEADER", "bad header"),
            ("TOLLGATE_CLICKHOUSE_TRUNCATE_IP", "maybe"),
        ]),
    )
    .unwrap_err();
    let mut keys: Vec<&str> = error.0.iter().map(|p| p.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "clickhouse_sample_allows",
            "clickhouse_spool_max_mb",
            "clickhouse_tenant_header",
            "clickhouse_truncate_ip"
        ]
    );
}

#[test]
fn region_settings_are_read_and_checked() {
    let s = Settings::load_from(
        &Flags::default(),
        vars(&[
            ("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6379"),
            ("TOLLGATE_REGION", "eu"),
            (
                "TOLLGATE_REGION_PEERS",
                "us=redis://:secret@10.0.0.2:6379, ap=redis+cluster://10.0.0.3:7000,10.0.0.4:7000",
            ),
            ("TOLLGATE_REGION_WEIGHTS", "eu=2,us=1"),
            ("TOLLGATE_REGION_SYNC_MS", "250"),
        ]),
    );
    let regions = s.unwrap().regions.expect("regions");
    assert_eq!(regions.name, "eu");
    assert_eq!(regions.weight, 2);
    let peers: Vec<(&str, u64)> = regions
        .peers
        .iter()
        .map(|p| (p.name.as_str(), p.weight))
        .collect();
    assert_eq!(peers, [("us", 1), ("ap", 1)]);
    assert_eq!(
        regions.peers[1].url, "redis+cluster://10.0.0.3:7000,10.0.0.4:7000",
        "in a comma-separated list, a Cluster's further hosts continue its URL"
    );
    assert_eq!(regions.interval, std::time::Duration::from_millis(250));
    assert_eq!(
        regions.partition_after,
        std::time::Duration::from_secs(3),
        "6 × 250 ms is below the 3 s floor"
    );
    assert!(
        !format!("{regions:?}").contains("secret"),
        "peer URLs are never shown"
    );

    for (pairs, key, says) in [
        (
            vec![("TOLLGATE_REGION_PEERS", "us=redis://h:1")],
            "region_peers",
            "needs `region`",
        ),
        (vec![("TOLLGATE_REGION", "eu")], "region", "set `redis_url`"),
        (
            vec![
                ("TOLLGATE_REDIS_URL", "redis://h:1"),
                ("TOLLGATE_REGION", "eu"),
            ],
            "region_peers",
            "name the other regions",
        ),
        (
            vec![
                ("TOLLGATE_REDIS_URL", "redis://h:1"),
                ("TOLLGATE_REGION", "eu"),
                ("TOLLGATE_REGION_PEERS", "eu=redis://h:2"),
            ],
            "region_peers",
            "`eu` is not a region name of its own",
        ),
        (
            vec![
                ("TOLLGATE_REDIS_URL", "redis://h:1"),
                ("TOLLGATE_REGION", "eu"),
                ("TOLLGATE_REGION_PEERS", "us=redis+sentinel://h:2"),
            ],
            "region_peers",
            "names no service",
        ),
        (
            vec![
                ("TOLLGATE_REDIS_URL", "redis://h:1"),
                ("TOLLGATE_REGION", "eu"),
                ("TOLLGATE_REGION_PEERS", "us=redis://h:2"),
                ("TOLLGATE_REGION_WEIGHTS", "mars=3"),
            ],
            "region_weights",
            "`mars` is not a region",
        ),
        (
            vec![
                ("TOLLGATE_REDIS_URL", "redis://h:1"),
                ("TOLLGATE_REGION", "eu"),
                ("TOLLGATE_REGION_PEERS", "us=redis://h:2"),
                ("TOLLGATE_REGION_SYNC_MS", "1000"),
                ("TOLLGATE_REGION_PARTITION_MS", "1500"),
            ],
            "region_partition_ms",
            "not between twice region_sync_ms",
        ),
    ] {
        let error = Settings::load_from(&Flags::default(), vars(&pairs)).unwrap_err();
        let problem = error
            .0
            .iter()
            .find(|p| p.key == key)
            .unwrap_or_else(|| panic!("no problem with {key}: {error}"));
        assert!(problem.message.contains(says), "{key}: {}", problem.message);
    }
}
