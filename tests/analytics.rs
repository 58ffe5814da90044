//! Decisions to ClickHouse, against a real `clickhouse-server` (Debian's 18.16) that the test
//! starts: the migrations create the schema once however often they run, leave what the
//! server is too old for pending, and the rollups count what lands in the events table.

mod support;

use tollgate::analytics::{MIGRATIONS, Step, migrate};

use support::runtime;

#[test]
fn migrations_create_the_schema_once_and_wait_for_newer_servers() {
    let Some(server) = support::clickhouse::ClickHouse::start() else {
        return;
    };
    let rt = runtime();
    let client = rt
        .block_on(tollgate::analytics::client(&server.url()))
        .expect("ClickHouse answers");
    let first = rt.block_on(migrate(&client, "tollgate")).expect("migrates");
    assert_eq!(first[0], Step::Applied(1));
    // 18.16 has neither TTL nor LowCardinality: those wait.
    assert!(
        first[1..]
            .iter()
            .all(|s| matches!(s, Step::NeedsNewerServer { .. })),
        "{first:?}"
    );
    let again = rt
        .block_on(migrate(&client, "tollgate"))
        .expect("migrates again");
    assert_eq!(again[0], Step::AlreadyApplied(1));
    assert_eq!(again.len(), MIGRATIONS.len());
    assert_eq!(
        server
            .query("SELECT count() FROM tollgate.tollgate_migrations")
            .unwrap()
            .trim(),
        "1",
        "recorded once"
    );
    let tables = server
        .query("SELECT name FROM system.tables WHERE database = 'tollgate' ORDER BY name")
        .unwrap();
    for table in [
        "decisions",
        "decisions_per_hour",
        "decisions_per_minute",
        "tollgate_migrations",
    ] {
        assert!(tables.lines().any(|t| t == table), "{table} in {tables}");
    }

    // The rollups sum what is inserted: three rejections (one sampled at 1/2) and an allow.
    server
        .query(
            "INSERT INTO tollgate.decisions (ts, namespace, limit_name, decision, sample_rate) VALUES \
             ('2026-11-30 10:00:01', 'shop', 'api', 'reject', 1), \
             ('2026-11-30 10:00:30', 'shop', 'api', 'reject', 1), \
             ('2026-11-30 10:00:59', 'shop', 'api', 'reject', 0.5), \
             ('2026-11-30 10:01:00', 'shop', 'api', 'allow', 1)",
        )
        .unwrap();
    let per_minute = server
        .query(
            "SELECT toString(minute), decision, sum(events), sum(requests) \
             FROM tollgate.decisions_per_minute GROUP BY minute, decision ORDER BY minute, decision",
        )
        .unwrap();
    assert_eq!(
        per_minute,
        "2026-11-30 10:00:00\treject\t3\t4\n2026-11-30 10:01:00\tallow\t1\t1\n"
    );
    let per_hour = server
        .query("SELECT sum(events), sum(requests) FROM tollgate.decisions_per_hour")
        .unwrap();
    assert_eq!(per_hour, "4\t5\n");

    let refused = rt.block_on(migrate(&client, "x; DROP DATABASE tollgate"));
    assert!(refused.is_err());
}

#[test]
fn tollgate_analytics_migrate_from_the_command_line() {
    let Some(server) = support::clickhouse::ClickHouse::start() else {
        return;
    };
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["analytics", "migrate"])
            .args(args)
            .env_clear()
            .env("TOLLGATE_CLICKHOUSE_URL", server.url())
            .env("TOLLGATE_CLICKHOUSE_DATABASE", "from_settings")
            .output()
            .unwrap()
    };
    let first = run(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let text = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(text.starts_with("migration 1: applied\n"), "{text}");
    assert!(
        text.contains("pending (needs ClickHouse 19.6 or newer)"),
        "{text}"
    );
    let again = String::from_utf8_lossy(&run(&[]).stdout).into_owned();
    assert!(
        again.starts_with("migration 1: already applied\n"),
        "{again}"
    );
    assert!(
        server
            .query("EXISTS TABLE from_settings.decisions")
            .unwrap()
            .starts_with('1')
    );

    let nowhere = run(&["--url", "http://127.0.0.1:1"]);
    assert!(!nowhere.status.success());
    let message = String::from_utf8_lossy(&nowhere.stderr);
    assert!(
        message.starts_with("error: ClickHouse does not answer"),
        "{message}"
    );
    let bad = run(&["--database", "no-such;name"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a database name"));
}

/// Traffic through the layer lands in ClickHouse: one row per limit decision, with the
/// request id, the key's hash (never the token), the outcome, the counter; rollups agree.
#[test]
fn decisions_through_the_layer_land_in_clickhouse() {
    use std::sync::Arc;
    use tollgate::analytics::export::{ExportSettings, Exporter};
    use tower::ServiceExt;
    const TOKEN: &str = "sk-export-test-token-42";
    let Some(server) = support::clickhouse::ClickHouse::start() else {
        return;
    };
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let rt = runtime();
    rt.block_on(async {
        let client = tollgate::analytics::client(&server.url()).await.unwrap();
        migrate(&client, "tollgate").await.unwrap();
        let exporter = Exporter::start(
            client,
            ExportSettings {
                batch_rows: 5,
                ..ExportSettings::default()
            },
        );
        let plan = tollgate::compile(&tollgate::PolicySet::from_sources([(
            "shop.rl",
            r#"namespace "shop";
limit api { match { route ANY "/api/**"; } key api_token; algorithm fixed_window; rate 10/min; }
"#,
        )]))
        .unwrap();
        let engine = Arc::new(
            tollgate::Engine::new(plan, tollgate::store::MemoryStore::new())
                .with_exporter(exporter.clone(), "node-a"),
        );
        let app = axum::Router::new().fallback(|| async { "ok" }).layer(
            tollgate::RateLimitLayer::new(engine).with_options(tollgate::middleware::HttpOptions {
                identifier: tollgate::identity::Identifier::new()
                    .with_api_key_header(http::HeaderName::from_static("x-api-key")),
                ..Default::default()
            }),
        );
        for n in 0..12 {
            let request = http::Request::builder()
                .uri("/api/orders")
                .header("x-api-key", TOKEN)
                .header("x-request-id", format!("req-{n}"))
                .body(axum::body::Body::empty())
                .unwrap();
            app.clone().oneshot(request).await.unwrap();
        }
        exporter.flush().await;
        let stats = exporter.stats();
        assert_eq!(stats.sent.load(std::sync::atomic::Ordering::Relaxed), 12);
        assert_eq!(stats.dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
    });
    let by_decision = server
        .query(
            "SELECT decision, count() FROM tollgate.decisions GROUP BY decision ORDER BY decision",
        )
        .unwrap();
    assert_eq!(by_decision, "allow\t7\nnear_limit\t3\nreject\t2\n");
    let row = server
        .query(
            "SELECT node, namespace, limit_name, algorithm, key_kind, length(key_hash), status, \
             quota, remaining, route, method FROM tollgate.decisions WHERE request_id = 'req-11'",
        )
        .unwrap();
    assert_eq!(
        row,
        "node-a\tshop\tapi\tfixed_window\ttoken\t24\t429\t10\t0\t/api/orders\tGET\n"
    );
    let everything = server
        .query("SELECT * FROM tollgate.decisions FORMAT TSV")
        .unwrap();
    assert!(!everything.contains(TOKEN), "no token in any column");
    assert_eq!(
        server
            .query("SELECT uniqExact(batch_id) FROM tollgate.decisions")
            .unwrap()
            .trim(),
        "3",
        "batches of at most 5 rows"
    );
    assert_eq!(
        server
            .query(
                "SELECT sum(requests) FROM tollgate.decisions_per_minute WHERE decision = 'reject'"
            )
            .unwrap()
            .trim(),
        "2"
    );
}
