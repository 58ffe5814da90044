//! Decisions to ClickHouse: the schema, created and upgraded by versioned migrations
//! (`tollgate analytics migrate`).
//!
//! The base schema runs on ClickHouse 18.16 (Debian's package, what the tests start) and on
//! current servers alike: `MergeTree` partitioned by day, `DateTime`, `Enum8`,
//! `Array(String)`, `SummingMergeTree` materialized views for per-minute and per-hour counts.
//! What only newer servers have (`TTL`, `LowCardinality`) comes as migrations gated on the
//! server's version: applied when the server is new enough, left pending otherwise, so that
//! they apply after an upgrade.

use clickhouse::Client;

pub mod export;
pub mod report;
pub mod rows;
pub mod spool;

/// One schema change.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its number: applied in order, each once.
    pub version: u32,
    /// What it does.
    pub name: &'static str,
    /// The oldest server (major, minor) it runs on.
    pub needs: (u32, u32),
    /// The statements, with `{db}` for the database.
    pub statements: &'static [&'static str],
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "decisions, per-minute and per-hour rollups",
        needs: (18, 16),
        statements: &[
            "CREATE TABLE IF NOT EXISTS {db}.decisions (
                ts DateTime,
                node String,
                plan_version String,
                namespace String,
                limit_name String,
                algorithm String,
                decision Enum8('allow' = 1, 'near_limit' = 2, 'warn' = 3, 'delay' = 4,
                    'reject' = 5, 'shadow_reject' = 6, 'forbid' = 7, 'unauthorized' = 8,
                    'bypass' = 9, 'store_error' = 10),
                tier String,
                tenant String,
                key_kind String,
                key_hash String,
                client_ip String,
                method String,
                route String,
                status UInt16,
                cost UInt64,
                used UInt64,
                quota UInt64,
                remaining UInt64,
                delay_ms UInt32,
                latency_us UInt32,
                policies Array(String),
                shadow UInt8,
                sample_rate Float32,
                request_id String,
                batch_id String
            ) ENGINE = MergeTree PARTITION BY toYYYYMMDD(ts) ORDER BY (namespace, limit_name, ts)",
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.decisions_per_minute
            ENGINE = SummingMergeTree PARTITION BY toYYYYMMDD(minute)
            ORDER BY (namespace, limit_name, decision, minute)
            AS SELECT toStartOfMinute(ts) AS minute, namespace, limit_name, decision,
                count() AS events, sum(1 / sample_rate) AS requests
            FROM {db}.decisions GROUP BY minute, namespace, limit_name, decision",
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.decisions_per_hour
            ENGINE = SummingMergeTree PARTITION BY toYYYYMMDD(hour)
            ORDER BY (namespace, limit_name, decision, hour)
            AS SELECT toStartOfHour(ts) AS hour, namespace, limit_name, decision,
                count() AS events, sum(1 / sample_rate) AS requests
            FROM {db}.decisions GROUP BY hour, namespace, limit_name, decision",
        ],
    },
    Migration {
        version: 2,
        name: "raw decisions expire after 90 days (TTL)",
        needs: (19, 6),
        statements: &["ALTER TABLE {db}.decisions MODIFY TTL ts + INTERVAL 90 DAY"],
    },
    Migration {
        version: 3,
        name: "low-cardinality strings",
        needs: (19, 9),
        statements: &[
            "ALTER TABLE {db}.decisions MODIFY COLUMN node LowCardinality(String)",
            "ALTER TABLE {db}.decisions MODIFY COLUMN namespace LowCardinality(String)",
            "ALTER TABLE {db}.decisions MODIFY COLUMN limit_name LowCardinality(String)",
            "ALTER TABLE {db}.decisions MODIFY COLUMN algorithm LowCardinality(String)",
            "ALTER TABLE {db}.decisions MODIFY COLUMN tier LowCardinality(String)",
            "ALTER TABLE {db}.decisions MODIFY COLUMN route LowCardinality(String)",
        ],
    },
    Migration {
        version: 4,
        name: "anomalies, and the flags decisions carry",
        needs: (18, 16),
        statements: &[
            "CREATE TABLE IF NOT EXISTS {db}.anomalies (
                ts DateTime,
                node String,
                plan_version String,
                namespace String,
                anomaly String,
                key_kind String,
                key_hash String,
                client_ip String,
                observed UInt64,
                threshold Float64,
                window_s UInt32,
                ban_s UInt32,
                flag_s UInt32,
                tarpit_ms UInt32,
                alerts Array(String)
            ) ENGINE = MergeTree PARTITION BY toYYYYMMDD(ts) ORDER BY (namespace, anomaly, ts)",
            "ALTER TABLE {db}.decisions ADD COLUMN flags Array(String)",
        ],
    },
    Migration {
        version: 5,
        name: "usage: what requests reserved and what they used, settled",
        needs: (18, 16),
        statements: &[
            "ALTER TABLE {db}.decisions ADD COLUMN reserved UInt64",
            // Rows from before count what they were charged.
            "ALTER TABLE {db}.decisions ADD COLUMN settled UInt64 DEFAULT cost",
        ],
    },
];

/// Every statement Tollgate sends to ClickHouse besides its inserts, for `database`, with
/// sample values and a name: what the tests run on current ClickHouse (chdb) too. In
/// order: the database, the migrations' bookkeeping, every migration (whatever server it
/// needs), the exporter's batch lookup, and every query of `tollgate analytics`.
pub fn every_statement(database: &str) -> Vec<(String, String)> {
    let sql = |s: &str| s.replace("{db}", database);
    let mut out = vec![
        (
            "create database".to_owned(),
            format!("CREATE DATABASE IF NOT EXISTS {database}"),
        ),
        ("migrations table".to_owned(), sql(VERSIONS)),
        ("migrations applied".to_owned(), sql(APPLIED)),
        ("server version".to_owned(), VERSION.to_owned()),
    ];
    for m in MIGRATIONS {
        for (i, statement) in m.statements.iter().enumerate() {
            out.push((
                format!("migration {} ({})", m.version, i + 1),
                sql(statement),
            ));
        }
        let record = report::Query {
            sql: sql(RECORD),
            params: vec![
                report::Param::Number(u64::from(m.version)),
                report::Param::Text(m.name.to_owned()),
            ],
        };
        out.push((
            format!("migration {} recorded", m.version),
            record.literal(),
        ));
    }
    let lookup = report::Query {
        sql: export::BATCH_LOOKUP.replace("FROM decisions", &format!("FROM {database}.decisions")),
        params: vec![report::Param::Text("0123456789abcdef".to_owned())],
    };
    out.push(("batch lookup".to_owned(), lookup.literal()));
    for (i, q) in report::all(database).iter().enumerate() {
        out.push((format!("analytics query {i}"), q.literal()));
    }
    out
}

const APPLIED: &str = "SELECT version FROM {db}.tollgate_migrations";
const VERSION: &str = "SELECT version()";
const RECORD: &str = "INSERT INTO {db}.tollgate_migrations (version, name, applied_at) \
                      SELECT ?, ?, now()";

/// The table that records which migrations ran.
const VERSIONS: &str = "CREATE TABLE IF NOT EXISTS {db}.tollgate_migrations
    (version UInt32, name String, applied_at DateTime)
    ENGINE = MergeTree ORDER BY version";

/// What [`migrate`] did with each migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Applied now.
    Applied(u32),
    /// Applied before.
    AlreadyApplied(u32),
    /// Left for a newer server.
    NeedsNewerServer {
        /// The migration.
        version: u32,
        /// The server it needs.
        needs: (u32, u32),
    },
}

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database name is not a plain identifier.
    #[error("`{0}` is not a database name (letters, digits and `_`)")]
    Database(String),
    /// ClickHouse refused a statement, or did not answer.
    #[error("migration {version} ({name}): {source}")]
    Statement {
        /// The migration.
        version: u32,
        /// What it does.
        name: &'static str,
        /// ClickHouse's error.
        source: clickhouse::error::Error,
    },
    /// ClickHouse did not answer.
    #[error("ClickHouse: {0}")]
    Server(#[from] clickhouse::error::Error),
}

/// Whether `name` is a plain identifier (it is written into statements).
/// Whether `name` can be a database name as written in SQL without quoting (letters,
/// digits, `_`; what settings and flags accept).
pub fn plain_database(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The server's version as (major, minor).
pub async fn server_version(client: &Client) -> Result<(u32, u32), clickhouse::error::Error> {
    let text: String = client.query(VERSION).fetch_one().await?;
    let mut parts = text.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0)))
}

/// Creates `database` and brings its schema up to date; idempotent (run it on every start
/// if you like). Migrations a server is too old for are left pending.
pub async fn migrate(client: &Client, database: &str) -> Result<Vec<Step>, MigrateError> {
    if !plain_database(database) {
        return Err(MigrateError::Database(database.to_owned()));
    }
    let sql = |s: &str| s.replace("{db}", database);
    client
        .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
        .execute()
        .await?;
    client.query(&sql(VERSIONS)).execute().await?;
    let applied: Vec<u32> = client.query(&sql(APPLIED)).fetch_all().await?;
    let version = server_version(client).await?;
    let mut steps = Vec::new();
    for m in MIGRATIONS {
        if applied.contains(&m.version) {
            steps.push(Step::AlreadyApplied(m.version));
            continue;
        }
        if version < m.needs {
            steps.push(Step::NeedsNewerServer {
                version: m.version,
                needs: m.needs,
            });
            continue;
        }
        let failed = |source| MigrateError::Statement {
            version: m.version,
            name: m.name,
            source,
        };
        for statement in m.statements {
            client
                .query(&sql(statement))
                .execute()
                .await
                .map_err(failed)?;
        }
        client
            .query(&sql(RECORD))
            .bind(m.version)
            .bind(m.name)
            .execute()
            .await
            .map_err(failed)?;
        steps.push(Step::Applied(m.version));
    }
    Ok(steps)
}

/// A client for `url` that works with ClickHouse 18.16 too (the crate's schema validation
/// sends a setting 18.16 does not know; it is turned on for servers that have it).
pub async fn client(url: &str) -> Result<Client, clickhouse::error::Error> {
    let plain = Client::default().with_url(url).with_validation(false);
    let version = server_version(&plain).await?;
    Ok(if version >= (24, 10) {
        plain.with_validation(true)
    } else {
        plain
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_and_databases_are_plain_names() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.statements.iter().all(|s| s.contains("{db}.")));
        }
        assert!(plain_database("tollgate") && plain_database("_t1"));
        for bad in ["", "1db", "db; DROP TABLE x", "a-b", "a.b"] {
            assert!(!plain_database(bad), "{bad}");
        }
    }
}
