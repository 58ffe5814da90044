//! `tollgate analytics`: queries over the decisions exported to ClickHouse.

use std::path::PathBuf;
use std::process::ExitCode;

use tollgate::config::{Flags, Settings};

use super::args::AnalyticsAction;
use super::cli_runtime;

/// `tollgate analytics …`.
pub(crate) fn analytics(
    url: Option<String>,
    database: Option<String>,
    config: Option<PathBuf>,
    action: AnalyticsAction,
) -> ExitCode {
    let settings = Settings::load(&Flags {
        config,
        ..Flags::default()
    });
    let (url, database) = match (url, settings) {
        (Some(url), settings) => {
            let db = database
                .or_else(|| settings.ok().map(|s| s.clickhouse_database))
                .unwrap_or_else(|| "tollgate".to_owned());
            (url, db)
        }
        (None, Ok(s)) => match s.clickhouse_url {
            Some(url) => (url, database.unwrap_or(s.clickhouse_database)),
            None => {
                eprintln!("error: no ClickHouse: set TOLLGATE_CLICKHOUSE_URL, or pass --url");
                return ExitCode::from(2);
            }
        },
        (None, Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match cli_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let client = tollgate::analytics::client(&url)
            .await
            .map_err(|e| format!("ClickHouse does not answer: {e}"))?;
        analytics_run(&client, &database, action).await
    });
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `tollgate analytics …` once connected: what `migrate` did, or the query's answer as a
/// table or JSON lines.
async fn analytics_run(
    client: &clickhouse::Client,
    database: &str,
    action: AnalyticsAction,
) -> Result<String, String> {
    use tollgate::analytics::report;
    if !tollgate::analytics::plain_database(database) {
        return Err(format!(
            "`{database}` is not a database name (letters, digits and `_`)"
        ));
    }
    fn lines<T: serde::Serialize>(rows: &[T]) -> String {
        rows.iter()
            .filter_map(|r| serde_json::to_string(r).ok())
            .map(|l| l + "\n")
            .collect()
    }
    let failed = |e: clickhouse::error::Error| format!("the query failed: {e}");
    match action {
        AnalyticsAction::Migrate => analytics_migrate(client, database).await,
        AnalyticsAction::Top {
            by,
            decision,
            since,
            rows,
            json,
        } => {
            // Refusals by default; what keys used, over every decision.
            let decision = decision.unwrap_or_else(|| {
                if by == report::TopBy::Cost {
                    "any"
                } else {
                    "reject"
                }
                .to_owned()
            });
            let decision = (decision != "any").then_some(decision.as_str());
            let found: Vec<report::TopRow> = report::top(database, by, decision, since, rows)
                .fetch(client)
                .await
                .map_err(failed)?;
            Ok(if json {
                lines(&found)
            } else {
                report::render_top(&found, by)
            })
        }
        AnalyticsAction::Timeline { limit, since, json } => {
            let q = report::timeline(database, limit.as_deref(), since, report::step_for(since));
            let found: Vec<report::TimelineRow> = q.fetch(client).await.map_err(failed)?;
            Ok(if json {
                lines(&found)
            } else {
                report::render_timeline(&found)
            })
        }
        AnalyticsAction::Anomalies { since, rows, json } => {
            let found: Vec<tollgate::analytics::rows::AnomalyRow> =
                report::anomalies(database, since, rows)
                    .fetch(client)
                    .await
                    .map_err(failed)?;
            Ok(if json {
                lines(&found)
            } else {
                report::render_anomalies(&found)
            })
        }
    }
}

/// `tollgate analytics migrate`.
async fn analytics_migrate(client: &clickhouse::Client, database: &str) -> Result<String, String> {
    use std::fmt::Write as _;
    use tollgate::analytics::Step;
    let steps = tollgate::analytics::migrate(client, database)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    for step in steps {
        let _ = match step {
            Step::Applied(v) => writeln!(out, "migration {v}: applied"),
            Step::AlreadyApplied(v) => writeln!(out, "migration {v}: already applied"),
            Step::NeedsNewerServer { version, needs } => writeln!(
                out,
                "migration {version}: pending (needs ClickHouse {}.{} or newer)",
                needs.0, needs.1
            ),
        };
    }
    Ok(out)
}
