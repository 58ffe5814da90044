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
    // 18.16 has neither TTL nor LowCardinality: those wait; what 18.16 has is applied.
    assert_eq!(
        first,
        [
            Step::Applied(1),
            Step::NeedsNewerServer {
                version: 2,
                needs: (19, 6)
            },
            Step::NeedsNewerServer {
                version: 3,
                needs: (19, 9)
            },
            Step::Applied(4),
            Step::Applied(5),
        ]
    );
    let again = rt
        .block_on(migrate(&client, "tollgate"))
        .expect("migrates again");
    assert_eq!(again[0], Step::AlreadyApplied(1));
    assert_eq!(again[3], Step::AlreadyApplied(4));
    assert_eq!(again[4], Step::AlreadyApplied(5));
    assert_eq!(again.len(), MIGRATIONS.len());
    assert_eq!(
        server
            .query("SELECT count() FROM tollgate.tollgate_migrations")
            .unwrap()
            .trim(),
        "3",
        "recorded once each"
    );
    let tables = server
        .query("SELECT name FROM system.tables WHERE database = 'tollgate' ORDER BY name")
        .unwrap();
    for table in [
        "anomalies",
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
        )
        .unwrap();
        let plan = tollgate::compile(&tollgate::PolicySet::from_sources([(
            "shop.rl",
            r#"namespace "shop";
limit api { match { route ANY "/api/**"; } key api_token; algorithm fixed_window; rate 10/min; }
"#,
        )]))
        .unwrap();
        let engine = tollgate::Engine::new(plan, tollgate::store::MemoryStore::new());
        let app = axum::Router::new()
            .fallback(|| async { (http::StatusCode::CREATED, "ok") })
            .layer(
                exporting_layer(engine, &exporter).with_options(
                    tollgate::middleware::HttpOptions {
                        identifier: tollgate::identity::Identifier::new()
                            .with_api_key_header(http::HeaderName::from_static("x-api-key")),
                        ..Default::default()
                    },
                ),
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
    // An admitted request's row has the application's status, its cost and what was used.
    let admitted = server
        .query(
            "SELECT status, cost, used, sample_rate FROM tollgate.decisions \
             WHERE request_id = 'req-3'",
        )
        .unwrap();
    assert_eq!(admitted, "201\t1\t4\t1\n");
    let latency = server
        .query("SELECT max(latency_us) > 0 FROM tollgate.decisions")
        .unwrap();
    assert_eq!(latency.trim(), "1", "the decision's latency is recorded");
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

/// An engine on the memory store for `policy` (one file), and its exports through
/// `exporter` as `node-a`.
fn exported_engine(
    policy: &str,
    exporter: &tollgate::analytics::export::Exporter,
) -> (
    std::sync::Arc<tollgate::Engine<tollgate::store::MemoryStore>>,
    tollgate::analytics::export::Exporting,
) {
    let plan = tollgate::compile(&tollgate::PolicySet::from_sources([("shop.rl", policy)]))
        .unwrap_or_else(|e| panic!("{}", e.render_plain(100)));
    let engine = std::sync::Arc::new(tollgate::Engine::new(
        plan,
        tollgate::store::MemoryStore::new(),
    ));
    let exporting = tollgate::analytics::export::Exporting::new(
        exporter.clone(),
        "node-a",
        engine.key_hasher().clone(),
    );
    (engine, exporting)
}

/// A layer deciding with `engine`, its decisions exported through `exporter` as `node-a`.
fn exporting_layer(
    engine: tollgate::Engine<tollgate::store::MemoryStore>,
    exporter: &tollgate::analytics::export::Exporter,
) -> tollgate::RateLimitLayer<tollgate::store::MemoryStore> {
    use std::sync::Arc;
    let engine = Arc::new(engine);
    let exporting = tollgate::analytics::export::Exporting::new(
        exporter.clone(),
        "node-a",
        engine.key_hasher().clone(),
    );
    let observers = tollgate::observers::Observers::new(&engine, None, Some(exporting));
    tollgate::RateLimitLayer::from_pipeline(Arc::new(observers.pipeline(engine)))
}

/// The app the export tests send traffic through: `quota` requests a minute per API key,
/// answering 201.
fn exported_app(exporter: &tollgate::analytics::export::Exporter, quota: u64) -> axum::Router {
    let plan = tollgate::compile(&tollgate::PolicySet::from_sources([(
        "shop.rl",
        format!(
            r#"namespace "shop";
limit api {{ match {{ route ANY "/api/**"; }} key api_token; algorithm fixed_window; rate {quota}/min; }}
"#
        ),
    )]))
    .unwrap();
    let engine = tollgate::Engine::new(plan, tollgate::store::MemoryStore::new());
    axum::Router::new()
        .fallback(|| async { (http::StatusCode::CREATED, "ok") })
        .layer(
            exporting_layer(engine, exporter).with_options(tollgate::middleware::HttpOptions {
                identifier: tollgate::identity::Identifier::new()
                    .with_api_key_header(http::HeaderName::from_static("x-api-key")),
                ..Default::default()
            }),
        )
}

/// Sends `count` requests with ids `{prefix}-0`…; returns how many were admitted.
async fn traffic(app: &axum::Router, prefix: &str, count: usize) -> usize {
    use tower::ServiceExt;
    let mut admitted = 0;
    for n in 0..count {
        let request = http::Request::builder()
            .uri("/api/orders")
            .header("x-api-key", "sk-spool-test")
            .header("x-tenant", "acme")
            .header("x-request-id", format!("{prefix}-{n}"))
            .body(axum::body::Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        admitted += usize::from(response.status() == http::StatusCode::CREATED);
    }
    admitted
}

fn load(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

/// ClickHouse killed while traffic flows: requests are answered as before, batches go to
/// the spool, a new process delivers what an old one spooled, and once ClickHouse is back
/// every row is in exactly once.
#[test]
fn a_clickhouse_outage_is_spooled_and_delivered_exactly_once() {
    use tollgate::analytics::export::{ExportSettings, Exporter};
    use tollgate::analytics::spool::SpoolSettings;
    let Some(mut server) = support::clickhouse::ClickHouse::start() else {
        return;
    };
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let spool = tempfile::tempdir().unwrap();
    let settings = ExportSettings {
        batch_rows: 50,
        spool: Some(SpoolSettings {
            dir: spool.path().join("spool"),
            max_bytes: 64 << 20,
        }),
        ..ExportSettings::default()
    };
    let rt = runtime();
    let client = rt.block_on(async {
        let client = tollgate::analytics::client(&server.url()).await.unwrap();
        migrate(&client, "tollgate").await.unwrap();
        client
    });
    rt.block_on(async {
        let exporter = Exporter::start(client.clone(), settings.clone()).unwrap();
        let app = exported_app(&exporter, 100_000);
        assert_eq!(traffic(&app, "before", 100).await, 100);
        exporter.flush().await;
        assert_eq!(load(&exporter.stats().sent), 100);
    });
    server.kill();
    rt.block_on(async {
        let exporter = Exporter::start(client.clone(), settings.clone()).unwrap();
        let app = exported_app(&exporter, 100_000);
        // Every request is still answered: the request path never waits for ClickHouse.
        assert_eq!(traffic(&app, "during", 300).await, 300);
        exporter.flush().await;
        let stats = exporter.stats();
        assert_eq!(load(&stats.sent), 0);
        assert_eq!(load(&stats.spooled), 300);
        assert_eq!(load(&stats.spool_rows), 300);
        assert_eq!(load(&stats.dropped), 0);
        assert!(load(&stats.failures) >= 1);
        // Prometheus sees it.
        let text = tollgate::metrics::Metrics::new().render(&tollgate::metrics::Scrape {
            store: tollgate::store::Store::health(&tollgate::store::MemoryStore::new()),
            evictions: 0,
            reloads: None,
            active_bans: 0,
            plan_version: "v",
            export: Some(stats),
            adaptive: Vec::new(),
        });
        for line in [
            "tollgate_export_rows_spooled_total 300",
            "tollgate_export_spool_rows 300",
            "tollgate_export_rows_sent_total 0",
            "tollgate_export_rows_dropped_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // The process stops with its spool full of rows.
    });
    let files = std::fs::read_dir(spool.path().join("spool"))
        .unwrap()
        .count();
    assert_eq!(files, 6, "300 rows in batches of 50");
    rt.block_on(async {
        // Another process, still without ClickHouse, adds to what the first one left.
        let exporter = Exporter::start(client.clone(), settings.clone()).unwrap();
        assert_eq!(load(&exporter.stats().spool_rows), 300);
        let app = exported_app(&exporter, 100_000);
        assert_eq!(traffic(&app, "after", 100).await, 100);
        exporter.flush().await;
        assert_eq!(load(&exporter.stats().spool_rows), 400);
    });
    server.restart();
    rt.block_on(async {
        let exporter = Exporter::start(client.clone(), settings.clone()).unwrap();
        // The spool is delivered on the exporter's next round; a flush starts one.
        exporter.flush().await;
        let stats = exporter.stats();
        assert_eq!(load(&stats.spool_rows), 0);
        assert_eq!(load(&stats.sent), 400);
        assert_eq!(load(&stats.dropped), 0);
    });
    let counts = server
        .query("SELECT count(), uniqExact(request_id), uniqExact(batch_id) FROM tollgate.decisions")
        .unwrap();
    assert_eq!(counts, "500\t500\t10\n", "every row once, in its batch");
    let spooled = server
        .query("SELECT count() FROM tollgate.decisions WHERE request_id LIKE 'during-%'")
        .unwrap();
    assert_eq!(spooled.trim(), "300");
    assert_eq!(
        std::fs::read_dir(spool.path().join("spool"))
            .unwrap()
            .count(),
        0,
        "the spool is empty once delivered"
    );
}

/// Admitted requests are sampled at the configured rate, stored with each row; refusals
/// are all exported; the tenant comes from the configured header.
#[test]
fn admissions_are_sampled_and_refusals_are_not() {
    use tollgate::analytics::export::{ExportSettings, Exporter};
    let Some(server) = support::clickhouse::ClickHouse::start() else {
        return;
    };
    let rt = runtime();
    let (sampled_out, admitted) = rt.block_on(async {
        let client = tollgate::analytics::client(&server.url()).await.unwrap();
        migrate(&client, "tollgate").await.unwrap();
        let exporter = Exporter::start(
            client,
            ExportSettings {
                sample_allows: 0.25,
                tenant_header: Some(http::HeaderName::from_static("x-tenant")),
                ..ExportSettings::default()
            },
        )
        .unwrap();
        let app = exported_app(&exporter, 200);
        let admitted = traffic(&app, "r", 500).await;
        exporter.flush().await;
        (load(&exporter.stats().sampled_out), admitted)
    });
    assert_eq!(admitted, 200);
    let by_decision = server
        .query(
            "SELECT decision IN ('allow', 'near_limit') AS admitted, count(), min(sample_rate), \
             max(sample_rate), min(tenant) FROM tollgate.decisions GROUP BY admitted \
             ORDER BY admitted",
        )
        .unwrap();
    let lines: Vec<Vec<&str>> = by_decision
        .lines()
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(lines[0], ["0", "300", "1", "1", "acme"], "every refusal");
    assert_eq!(&lines[1][2..], ["0.25", "0.25", "acme"]);
    let exported_admissions: u64 = lines[1][1].parse().unwrap();
    assert_eq!(exported_admissions + sampled_out, 200);
    assert!(
        (10..=100).contains(&exported_admissions),
        "about a quarter of 200 admissions: {exported_admissions}"
    );
}

/// `tollgate analytics top|timeline|anomalies` over decisions and an anomaly exported by an
/// engine: tables by default, JSON lines with `--json`; the flag the anomaly set is on the
/// client's later decisions.
#[test]
fn the_analytics_commands_read_decisions_and_anomalies() {
    use tollgate::analytics::export::{ExportSettings, Exporter};
    let Some(server) = support::clickhouse::ClickHouse::start() else {
        return;
    };
    let rt = runtime();
    rt.block_on(async {
        let client = tollgate::analytics::client(&server.url()).await.unwrap();
        migrate(&client, "tollgate").await.unwrap();
        let exporter = Exporter::start(client, ExportSettings::default()).unwrap();
        let (engine, exporting) = exported_engine(
            r#"namespace "shop";
limit login { match { route POST "/login"; } key ip; algorithm fixed_window; rate 5/min; }
anomaly brute {
  match { route POST "/login"; }
  key ip;
  count when status in [401];
  detect 3 in 5min;
  then ban 10min, flag, alert "security";
}
"#,
            &exporter,
        );
        let anomalies = tollgate::anomaly::Anomalies::new(
            std::sync::Arc::clone(&engine),
            vec![std::sync::Arc::new(exporting.clone())],
        );
        let pipeline = std::sync::Arc::new(
            tollgate::pipeline::Pipeline::new(std::sync::Arc::clone(&engine))
                .observe(std::sync::Arc::new(exporting)),
        );
        // What the decision API does: admit, complete with the status, and the status
        // reported (`/v1/report`) to the anomalies.
        let attempt = async |ip: &str, n: usize, status: u16| {
            let request = tollgate::RequestCtx::new(http::Method::POST, "/login")
                .with_client_ip(ip.parse().unwrap());
            let admission = pipeline.admit(&request, format!("{ip}-{n}"), None).await;
            let status = admission.problem.as_ref().map_or(status, |p| p.status);
            let forbidden = matches!(
                admission.verdict.action,
                tollgate::verdict::Action::Forbid { .. }
            );
            admission.complete(status);
            if !forbidden {
                anomalies.report(&request, status).await;
            }
            status
        };
        let mut a = Vec::new();
        for n in 0..5 {
            a.push(attempt("203.0.113.5", n, 401).await);
        }
        assert_eq!(
            a,
            [401, 401, 401, 403, 403],
            "banned after the third failure"
        );
        let mut b = Vec::new();
        for n in 0..7 {
            b.push(attempt("198.51.100.8", n, 200).await);
        }
        assert_eq!(b, [200, 200, 200, 200, 200, 429, 429]);
        exporter.flush().await;
        assert_eq!(load(&exporter.stats().dropped), 0);
    });
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("analytics")
            .args(args)
            .env_clear()
            .env("TOLLGATE_CLICKHOUSE_URL", server.url())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let json = |text: String| -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };

    let top = json(run(&[
        "top",
        "--by",
        "key",
        "--decision",
        "reject",
        "--json",
    ]));
    assert_eq!(top.len(), 1, "{top:?}");
    assert!(top[0]["item"].as_str().unwrap().starts_with("ip:"));
    assert_eq!(
        (top[0]["requests"].as_u64(), top[0]["keys"].as_u64()),
        (Some(2), Some(1))
    );
    let limits = json(run(&[
        "top",
        "--by",
        "limit",
        "--decision",
        "any",
        "--json",
    ]));
    assert_eq!(limits[0]["item"], "shop/login");
    assert_eq!(limits[0]["requests"], 10, "3 + 7 decisions of the limit");
    let table = run(&["top", "--by", "route", "--decision", "reject"]);
    assert!(table.contains("POST /login"), "{table}");

    let steps = json(run(&[
        "timeline", "--limit", "login", "--since", "1h", "--json",
    ]));
    let sum = |field: &str| {
        steps
            .iter()
            .map(|s| s[field].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!((sum("admitted"), sum("refused")), (8, 2));
    let chart = run(&["timeline", "--limit", "login", "--since", "1h"]);
    assert!(chart.contains('█') && chart.contains('▒'), "{chart}");

    let anomalies = json(run(&["anomalies", "--json"]));
    assert_eq!(anomalies.len(), 1, "{anomalies:?}");
    let a = &anomalies[0];
    assert_eq!(
        (
            &a["anomaly"],
            &a["namespace"],
            &a["client_ip"],
            &a["observed"],
            &a["ban_s"]
        ),
        (
            &serde_json::json!("brute"),
            &serde_json::json!("shop"),
            &serde_json::json!("203.0.113.5"),
            &serde_json::json!(3),
            &serde_json::json!(600)
        )
    );
    assert_eq!(a["alerts"], serde_json::json!(["security"]));
    let listed = run(&["anomalies"]);
    assert!(
        listed.contains("shop/brute") && listed.contains("10m"),
        "{listed}"
    );
    let flagged = server
        .query("SELECT count() FROM tollgate.decisions WHERE has(flags, 'anomaly brute')")
        .unwrap();
    assert_eq!(
        flagged.trim(),
        "2",
        "the two refusals after the ban carry the flag"
    );
}

/// The Python of a virtual environment with the `chdb-core` wheel (current ClickHouse in
/// process): `TOLLGATE_CHDB_PYTHON`, else `target/chdb-venv` (scripts/test.sh makes it).
fn chdb_python() -> Option<std::path::PathBuf> {
    let python = std::env::var_os("TOLLGATE_CHDB_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chdb-venv/bin/python")
        });
    let works = std::process::Command::new(&python)
        .args(["-c", "import chdb"])
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        Some(python)
    } else {
        support::require("the chdb-core wheel (target/chdb-venv)");
        None
    }
}

/// The dashboard's ClickHouse queries, with Grafana's macros and variables filled in for
/// the day around `at` (seconds); and the metric names its Prometheus queries read.
fn dashboard_queries(at: u64) -> (Vec<(String, String)>, Vec<String>) {
    let text = std::fs::read_to_string("examples/grafana/tollgate.json").unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let time_filter = regex::Regex::new(r"\$__timeFilter\((\w+)\)").unwrap();
    let metric = regex::Regex::new(r"tollgate_[a-z_]+").unwrap();
    let (mut sql, mut metrics) = (Vec::new(), Vec::new());
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let name = format!("dashboard: {}", panel["title"].as_str().unwrap());
            if let Some(raw) = target["rawSql"].as_str() {
                let filled = time_filter.replace_all(raw, |c: &regex::Captures<'_>| {
                    format!(
                        "{0} >= toDateTime({1}) AND {0} <= toDateTime({2})",
                        &c[1],
                        at - 86_400,
                        at + 86_400
                    )
                });
                let filled = filled.replace("${database}", "tollgate");
                assert!(
                    !filled.contains('$'),
                    "{name}: an unknown macro in {filled}"
                );
                sql.push((name, filled));
            } else {
                let expr = target["expr"].as_str().expect("a Prometheus query");
                metrics.extend(metric.find_iter(expr).map(|m| m.as_str().to_owned()));
            }
        }
    }
    (sql, metrics)
}

/// The same sample rows in both servers: decisions in two minutes and an anomaly, at `at`.
fn sample_rows(at: u64) -> Vec<String> {
    let t = |s: u64| format!("toDateTime({s})");
    vec![
        format!(
            "INSERT INTO tollgate.decisions (ts, namespace, limit_name, decision, key_kind, \
             key_hash, method, route, tenant, sample_rate, latency_us) VALUES \
             ({}, 'shop', 'login', 'reject', 'ip', 'h1', 'POST', '/login', 'acme', 1, 40), \
             ({}, 'shop', 'login', 'reject', 'ip', 'h1', 'POST', '/login', 'acme', 1, 35), \
             ({}, 'shop', 'login', 'allow', 'ip', 'h2', 'POST', '/login', 'beta', 0.5, 20), \
             ({}, 'shop', 'api', 'forbid', 'user', 'h3', 'GET', '/api/{{id}}', '', 1, 0)",
            t(at),
            t(at + 1),
            t(at + 61),
            t(at + 62)
        ),
        format!(
            "INSERT INTO tollgate.anomalies (ts, namespace, anomaly, key_kind, key_hash, \
             client_ip, observed, threshold, window_s, ban_s, alerts) VALUES \
             ({}, 'shop', 'brute', 'ip', 'h1', '203.0.113.5', 10, 10, 300, 900, ['security'])",
            t(at + 2)
        ),
    ]
}

/// Current ClickHouse (26.x, through chdb) runs every migration — those 18.16 leaves pending
/// too — every statement Tollgate sends and every query of the CLI and the dashboard; the
/// CLI's queries answer there exactly as on 18.16. The dashboard's Prometheus queries read
/// only families `/metrics` has.
#[test]
fn current_clickhouse_runs_the_schema_and_every_query_as_18_16_does() {
    use tollgate::clock::Clock as _;
    let Some(python) = chdb_python() else {
        return;
    };
    let Some(server) = support::clickhouse::ClickHouse::start() else {
        return;
    };
    let now = tollgate::clock::SystemClock.now().as_micros() / 1_000_000;
    let at = now / 60 * 60 - 120;
    let statements = tollgate::analytics::every_statement("tollgate");
    let (dashboard, metrics) = dashboard_queries(at);
    let samples = sample_rows(at);
    let mut all: Vec<(String, String)> = statements.clone();
    all.extend(
        samples
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("sample rows {i}"), s.clone())),
    );
    let queries: Vec<(String, String)> = statements
        .iter()
        .filter(|(name, _)| name.starts_with("analytics query"))
        .map(|(name, sql)| (format!("{name} on samples"), sql.clone()))
        .collect();
    all.extend(queries.iter().cloned());
    all.extend(dashboard.iter().cloned());
    let input = tempfile::NamedTempFile::new().unwrap();
    let list: Vec<serde_json::Value> = all
        .iter()
        .map(|(name, sql)| serde_json::json!({ "name": name, "sql": sql }))
        .collect();
    std::fs::write(input.path(), serde_json::to_vec(&list).unwrap()).unwrap();
    let out = std::process::Command::new(&python)
        .arg("scripts/chdb-check.py")
        .arg(input.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let version = report["version"].as_str().unwrap();
    assert!(
        version.split('.').next().unwrap().parse::<u32>().unwrap() >= 23,
        "current ClickHouse, not {version}"
    );
    let results = &report["results"];
    let failed: Vec<String> = all
        .iter()
        .filter_map(|(name, sql)| {
            results[name]["error"]
                .as_str()
                .map(|e| format!("{name}: {e}\n  {sql}"))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "on ClickHouse {version}:\n{}",
        failed.join("\n")
    );

    // The same answers on 18.16 (its pending migrations aside).
    let rt = runtime();
    rt.block_on(async {
        let client = tollgate::analytics::client(&server.url()).await.unwrap();
        migrate(&client, "tollgate").await.unwrap();
    });
    for sample in &samples {
        server.query(sample).unwrap();
    }
    let mut answered = 0;
    for (name, sql) in &queries {
        let old = server
            .query(sql)
            .unwrap_or_else(|e| panic!("{name} on 18.16: {e}"));
        let new = results[name]["ok"].as_str().unwrap();
        assert_eq!(old, new, "{name}: 18.16 and {version} disagree\n  {sql}");
        answered += usize::from(!old.is_empty());
    }
    assert!(
        answered >= queries.len() - 2,
        "the samples feed the queries"
    );
    for (name, sql) in &dashboard {
        server
            .query(sql)
            .unwrap_or_else(|e| panic!("{name} on 18.16: {e}\n  {sql}"));
    }

    // Labelled families show once they have a series: one decision and one anomaly.
    let metrics_of = std::sync::Arc::new(tollgate::metrics::Metrics::new());
    let plan = tollgate::compile(&tollgate::PolicySet::from_sources([(
        "m.rl",
        r#"namespace "m";
limit api { match { route ANY "/**"; } key ip; rate 10/min; }
anomaly any { detect 1 in 1min; then alert "ops"; }
"#,
    )]))
    .unwrap();
    let engine = std::sync::Arc::new(tollgate::Engine::new(
        plan,
        tollgate::store::MemoryStore::new(),
    ));
    let anomalies = tollgate::anomaly::Anomalies::new(
        std::sync::Arc::clone(&engine),
        vec![std::sync::Arc::clone(&metrics_of) as _],
    );
    let pipeline = std::sync::Arc::new(
        tollgate::pipeline::Pipeline::new(std::sync::Arc::clone(&engine))
            .observe(std::sync::Arc::clone(&metrics_of) as _),
    );
    rt.block_on(async {
        let request = tollgate::RequestCtx::new(http::Method::GET, "/x")
            .with_client_ip("192.0.2.1".parse().unwrap());
        let admission = pipeline.admit(&request, "req-m".to_owned(), None).await;
        admission.complete(200);
        let watch = anomalies.watch(&request).unwrap();
        assert_eq!(anomalies.observe(watch, 200).await.len(), 1);
    });
    let exported = metrics_of.render(&tollgate::metrics::Scrape {
        store: tollgate::store::Store::health(&tollgate::store::MemoryStore::new()),
        evictions: 0,
        reloads: Some((0, 0)),
        active_bans: 0,
        plan_version: "v",
        export: None,
        // An adaptive limit, so that its families are exported.
        adaptive: vec![tollgate::store::adaptive::Summary {
            namespace: "shop".into(),
            limit: "upstream".into(),
            keys: 1,
            lowest: Some(20),
            highest: Some(20),
            in_flight: 3,
            reject_probability: 0.25,
        }],
    });
    assert!(!metrics.is_empty());
    for name in metrics {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            exported.contains(&format!("# TYPE {family} ")),
            "the dashboard reads {name}, which /metrics does not export"
        );
    }
}

/// `tollgate serve` with the ClickHouse settings: it migrates on start-up
/// (`clickhouse_migrate`), exports what `/v1/check` decides under its host name, and the
/// anomaly `/v1/report` detects lands in `anomalies`.
#[test]
fn tollgate_serve_migrates_and_exports_decisions_and_anomalies() {
    let Some(server) = support::clickhouse::ClickHouse::start() else {
        return;
    };
    let spool = tempfile::tempdir().unwrap();
    let url = server.url();
    let spool_dir = spool.path().display().to_string();
    let tollgate = support::serving::Serving::start(&[
        ("TOLLGATE_CLICKHOUSE_URL", &url),
        ("TOLLGATE_CLICKHOUSE_MIGRATE", "true"),
        ("TOLLGATE_CLICKHOUSE_SPOOL_DIR", &spool_dir),
        ("HOSTNAME", "node-x"),
    ]);
    let check = serde_json::json!({
        "method": "POST", "path": "/auth/login", "client_ip": "198.51.100.30"
    });
    for _ in 0..6 {
        support::check(tollgate.addr, &check);
    }
    let report = serde_json::json!({ "request": check, "status": 401 });
    let mut detected = Vec::new();
    for _ in 0..10 {
        let reply = support::send(
            tollgate.addr,
            "POST",
            "/v1/report",
            &[],
            report.to_string().as_bytes(),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        detected.extend(reply.json()["detected"].as_array().unwrap().clone());
    }
    assert_eq!(detected.len(), 1, "{detected:?}");
    assert_eq!(detected[0]["anomaly"], "login_bruteforce");
    // Rows go out within a second or so: wait for them (an external process, not a timing
    // test), up to 30 s.
    let mut rows = String::new();
    for _ in 0..300 {
        rows = server
            .query(
                "SELECT node, decision, count() FROM tollgate.decisions \
                 GROUP BY node, decision ORDER BY decision",
            )
            .unwrap_or_default();
        let anomalies = server
            .query("SELECT count() FROM tollgate.anomalies")
            .unwrap_or_default();
        if rows
            .lines()
            .map(|l| l.rsplit('\t').next().unwrap().parse::<u64>().unwrap_or(0))
            .sum::<u64>()
            == 6
            && anomalies.trim() == "1"
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        rows, "node-x\tallow\t3\nnode-x\tnear_limit\t2\nnode-x\treject\t1\n",
        "one limit (login, 5 a minute): three below 80 %, two at or above, then a rejection"
    );
    let anomaly = server
        .query("SELECT node, anomaly, observed, ban_s, alerts FROM tollgate.anomalies")
        .unwrap();
    assert_eq!(anomaly, "node-x\tlogin_bruteforce\t10\t900\t['security']\n");
    drop(tollgate);
}

/// A limit whose cost the response says: each row carries what was reserved and what was
/// used once settled (other limits: what was charged), and `top --by cost` ranks keys by
/// what they used.
#[test]
fn usage_rows_carry_the_reservation_and_the_settlement() {
    use tollgate::analytics::export::{ExportSettings, Exporter};
    use tollgate::analytics::report::{self, TopBy, TopRow};
    use tower::ServiceExt;
    let Some(server) = support::clickhouse::ClickHouse::start() else {
        return;
    };
    let rt = runtime();
    let metrics = std::sync::Arc::new(tollgate::metrics::Metrics::new());
    let top = rt.block_on(async {
        let client = tollgate::analytics::client(&server.url()).await.unwrap();
        migrate(&client, "tollgate").await.unwrap();
        let exporter = Exporter::start(client.clone(), ExportSettings::default()).unwrap();
        let (engine, exporting) = exported_engine(
            r#"namespace "llm";
limit tokens {
  match { route ANY "/v1/**"; }
  key api_token;
  algorithm fixed_window;
  rate 100_000/min;
  cost response header("X-Usage-Tokens");
  reserve 100;
}
limit calls { match { route ANY "/v1/**"; } key api_token; rate 1_000/min; }
"#,
            &exporter,
        );
        let observers = tollgate::observers::Observers::new(
            &engine,
            Some(std::sync::Arc::clone(&metrics)),
            Some(exporting),
        );
        let layer = tollgate::RateLimitLayer::from_pipeline(std::sync::Arc::new(
            observers.pipeline(engine),
        ))
        .with_options(tollgate::middleware::HttpOptions {
            identifier: tollgate::identity::Identifier::new()
                .with_api_key_header(http::HeaderName::from_static("x-api-key")),
            ..Default::default()
        });
        // The upstream says the usage the request asked it to say.
        let app = axum::Router::new()
            .fallback(|headers: http::HeaderMap| async move {
                let used = headers.get("x-test-usage").cloned().unwrap();
                ([("x-usage-tokens", used)], "ok")
            })
            .layer(layer);
        for (n, (key, used)) in [("sk-a", 30), ("sk-b", 500), ("sk-a", 50)]
            .iter()
            .enumerate()
        {
            let request = http::Request::builder()
                .uri("/v1/chat")
                .header("x-api-key", *key)
                .header("x-test-usage", used.to_string())
                .header("x-request-id", format!("u-{n}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            axum::body::to_bytes(response.into_body(), 1024)
                .await
                .unwrap();
        }
        exporter.flush().await;
        report::top(
            "tollgate",
            TopBy::Cost,
            None,
            std::time::Duration::from_secs(3600),
            10,
        )
        .fetch::<TopRow>(&client)
        .await
        .unwrap()
    });
    let rows = server
        .query(
            "SELECT request_id, limit_name, cost, reserved, settled FROM tollgate.decisions \
             ORDER BY request_id, limit_name",
        )
        .unwrap();
    assert_eq!(
        rows,
        "u-0\tcalls\t1\t0\t1\nu-0\ttokens\t100\t100\t30\n\
         u-1\tcalls\t1\t0\t1\nu-1\ttokens\t100\t100\t500\n\
         u-2\tcalls\t1\t0\t1\nu-2\ttokens\t100\t100\t50\n"
    );
    // Counter keys (one per limit and token) by what they used: the tokens' usage first,
    // then their calls.
    let units: Vec<u64> = top.iter().map(|r| r.units).collect();
    assert_eq!(units, [500, 80, 2, 1], "{top:?}");
    // Prometheus counts the units reserved and used, per limit.
    let text = metrics.render(&tollgate::metrics::Scrape {
        store: tollgate::store::Store::health(&tollgate::store::MemoryStore::new()),
        evictions: 0,
        reloads: None,
        active_bans: 0,
        plan_version: "v",
        export: None,
        adaptive: Vec::new(),
    });
    for line in [
        r#"tollgate_usage_units_total{limit="tokens",namespace="llm",phase="reserved"} 300"#,
        r#"tollgate_usage_units_total{limit="tokens",namespace="llm",phase="used"} 580"#,
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
}
