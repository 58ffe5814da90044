//! The queries `tollgate analytics top|timeline|anomalies` run, and how their answers are
//! shown. Each query is SQL with `?` placeholders (bound by the `clickhouse` crate, which
//! quotes values itself, so it also runs on 18.16, which has no server-side parameters) and
//! `{db}` for the database; [`Query::literal`] gives the same SQL with the values inlined,
//! to run it elsewhere (the tests run every shipped query on current ClickHouse too).

use std::fmt::Write as _;
use std::time::Duration;

use clickhouse::Client;
use serde::{Deserialize, Serialize};

/// A query and its values, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// The SQL, `{db}` already replaced, with one `?` per value.
    pub sql: String,
    /// The values.
    pub params: Vec<Param>,
}

/// One value of a query.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    /// A string (quoted).
    Text(String),
    /// A number.
    Number(u64),
}

impl Query {
    fn new(database: &str, sql: &str) -> Query {
        Query {
            sql: sql.replace("{db}", database),
            params: Vec::new(),
        }
    }

    fn text(mut self, value: &str) -> Query {
        self.params.push(Param::Text(value.to_owned()));
        self
    }

    fn number(mut self, value: u64) -> Query {
        self.params.push(Param::Number(value));
        self
    }

    /// The SQL with the values written in (strings quoted and escaped as ClickHouse reads
    /// them).
    pub fn literal(&self) -> String {
        let mut out = String::with_capacity(self.sql.len());
        let mut params = self.params.iter();
        for (i, piece) in self.sql.split('?').enumerate() {
            if i > 0 {
                match params.next() {
                    Some(Param::Number(n)) => {
                        let _ = write!(out, "{n}");
                    }
                    Some(Param::Text(t)) => {
                        out.push('\'');
                        for c in t.chars() {
                            if matches!(c, '\\' | '\'') {
                                out.push('\\');
                            }
                            out.push(c);
                        }
                        out.push('\'');
                    }
                    None => out.push('?'),
                }
            }
            out.push_str(piece);
        }
        out
    }

    /// Runs it, reading rows of type `T`.
    pub async fn fetch<T>(&self, client: &Client) -> Result<Vec<T>, clickhouse::error::Error>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        let mut query = client.query(&self.sql);
        for p in &self.params {
            query = match p {
                Param::Text(t) => query.bind(t.as_str()),
                Param::Number(n) => query.bind(*n),
            };
        }
        query.fetch_all::<T>().await
    }
}

/// What `top` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopBy {
    /// Counter keys (their kind and hash).
    Key,
    /// Limits (namespace and name).
    Limit,
    /// Routes (method and template).
    Route,
    /// Tenants.
    Tenant,
    /// Counter keys, by the units they used (limits whose cost the response says: what
    /// was settled; other limits: what was charged).
    Cost,
}

impl TopBy {
    /// Every choice, as written on the command line.
    pub const NAMES: &[(&str, TopBy)] = &[
        ("key", TopBy::Key),
        ("limit", TopBy::Limit),
        ("route", TopBy::Route),
        ("tenant", TopBy::Tenant),
        ("cost", TopBy::Cost),
    ];

    fn column(self) -> &'static str {
        match self {
            TopBy::Key | TopBy::Cost => "concat(key_kind, ':', key_hash)",
            TopBy::Limit => "concat(namespace, '/', limit_name)",
            TopBy::Route => "concat(method, ' ', route)",
            TopBy::Tenant => "tenant",
        }
    }
}

/// The `decision` column's values, as written on the command line.
pub const DECISIONS: &[&str] = &[
    "allow",
    "near_limit",
    "warn",
    "delay",
    "reject",
    "shadow_reject",
    "forbid",
    "unauthorized",
    "bypass",
    "store_error",
];

/// Decisions that refused the request (the timeline's `refused`).
const REFUSED: &str = "('reject', 'forbid', 'unauthorized')";

/// One line of `top`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct TopRow {
    /// What is ranked.
    pub item: String,
    /// Decisions, scaled back by their sample rate.
    pub requests: u64,
    /// Rows exported.
    pub events: u64,
    /// Distinct counter keys among them.
    pub keys: u64,
    /// Units used (settled, or charged), scaled back by the sample rate.
    pub units: u64,
}

/// The `rows` most frequent `by` among the decisions of kind `decision` (`None`: all) in
/// the last `since`.
pub fn top(database: &str, by: TopBy, decision: Option<&str>, since: Duration, rows: u64) -> Query {
    let filter = if decision.is_some() {
        " AND decision = ?"
    } else {
        ""
    };
    let order = if by == TopBy::Cost {
        "units"
    } else {
        "requests"
    };
    let sql = format!(
        "SELECT {} AS item, toUInt64(round(sum(1 / sample_rate))) AS requests, \
         count() AS events, uniqExact(key_hash) AS keys, \
         toUInt64(round(sum(settled / sample_rate))) AS units \
         FROM {{db}}.decisions WHERE ts >= now() - ?{filter} \
         GROUP BY item ORDER BY {order} DESC, item LIMIT ?",
        by.column()
    );
    let mut q = Query::new(database, &sql).number(since.as_secs());
    if let Some(d) = decision {
        q = q.text(d);
    }
    q.number(rows)
}

/// One step of `timeline`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct TimelineRow {
    /// The step's start, in seconds since the epoch.
    pub at: u32,
    /// Limit decisions that let the request through.
    pub admitted: u64,
    /// Limit decisions that refused it (reject, forbid, unauthorized).
    pub refused: u64,
}

/// Per-`step` counts of the last `since`, for one limit (`None`: all), from the per-minute
/// rollup.
pub fn timeline(database: &str, limit: Option<&str>, since: Duration, step: Duration) -> Query {
    let filter = if limit.is_some() {
        " AND limit_name = ?"
    } else {
        ""
    };
    let sql = format!(
        "SELECT toUInt32(intDiv(toUInt32(minute), ?) * ?) AS at, \
         toUInt64(round(sumIf(requests, decision NOT IN {REFUSED}))) AS admitted, \
         toUInt64(round(sumIf(requests, decision IN {REFUSED}))) AS refused \
         FROM {{db}}.decisions_per_minute WHERE minute >= now() - ?{filter} \
         GROUP BY at ORDER BY at"
    );
    let step = step.as_secs().max(60);
    let mut q = Query::new(database, &sql)
        .number(step)
        .number(step)
        .number(since.as_secs());
    if let Some(l) = limit {
        q = q.text(l);
    }
    q
}

/// The timeline step that shows `since` in at most 60 lines, in whole minutes.
pub fn step_for(since: Duration) -> Duration {
    let minutes = since.as_secs().div_ceil(60);
    Duration::from_secs(minutes.div_ceil(60).max(1) * 60)
}

/// The latest `rows` anomalies of the last `since`.
pub fn anomalies(database: &str, since: Duration, rows: u64) -> Query {
    Query::new(
        database,
        "SELECT ts, node, plan_version, namespace, anomaly, key_kind, key_hash, client_ip, \
         observed, threshold, window_s, ban_s, flag_s, tarpit_ms, alerts \
         FROM {db}.anomalies WHERE ts >= now() - ? ORDER BY ts DESC, anomaly LIMIT ?",
    )
    .number(since.as_secs())
    .number(rows)
}

/// Every shipped query, with sample values (for checks against other servers).
pub fn all(database: &str) -> Vec<Query> {
    let day = Duration::from_secs(86_400);
    let mut queries: Vec<Query> = TopBy::NAMES
        .iter()
        .flat_map(|(_, by)| {
            [
                top(database, *by, Some("reject"), day, 10),
                top(database, *by, None, day, 10),
            ]
        })
        .collect();
    queries.push(timeline(database, Some("login"), day, step_for(day)));
    queries.push(timeline(database, None, day, step_for(day)));
    queries.push(anomalies(database, day, 50));
    queries
}

fn time(secs: u32) -> String {
    chrono::DateTime::from_timestamp(i64::from(secs), 0)
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
        .set_header(header.iter().copied());
    t
}

/// `top` as a table.
pub fn render_top(rows: &[TopRow], by: TopBy) -> String {
    let name = TopBy::NAMES
        .iter()
        .find(|(_, b)| *b == by)
        .map_or("item", |(n, _)| n);
    if rows.is_empty() {
        return "no decisions in that period\n".to_owned();
    }
    let name = if by == TopBy::Cost { "key" } else { name };
    let mut header = vec![name, "requests", "rows", "keys"];
    if by == TopBy::Cost {
        header.push("units");
    }
    let mut t = table(&header);
    for r in rows {
        let mut row = vec![
            r.item.clone(),
            r.requests.to_string(),
            r.events.to_string(),
            r.keys.to_string(),
        ];
        if by == TopBy::Cost {
            row.push(r.units.to_string());
        }
        t.add_row(row);
    }
    format!("{t}\n")
}

/// `timeline` as a table with a bar per step (`█` admitted, `▒` refused), scaled to the
/// busiest step.
pub fn render_timeline(rows: &[TimelineRow]) -> String {
    if rows.is_empty() {
        return "no decisions in that period\n".to_owned();
    }
    const WIDTH: u64 = 40;
    let most = rows
        .iter()
        .map(|r| r.admitted + r.refused)
        .max()
        .unwrap_or(1)
        .max(1);
    let bar = |n: u64| (n * WIDTH).div_ceil(most) as usize;
    let mut t = table(&["from (UTC)", "admitted", "refused", ""]);
    for r in rows {
        let refused = bar(r.refused);
        let admitted = bar(r.admitted + r.refused).saturating_sub(refused);
        t.add_row(vec![
            time(r.at),
            r.admitted.to_string(),
            r.refused.to_string(),
            format!("{}{}", "█".repeat(admitted), "▒".repeat(refused)),
        ]);
    }
    format!("{t}\n")
}

/// `anomalies` as a table.
pub fn render_anomalies(rows: &[super::rows::AnomalyRow]) -> String {
    if rows.is_empty() {
        return "no anomalies in that period\n".to_owned();
    }
    let mut t = table(&[
        "at (UTC)",
        "anomaly",
        "key",
        "address",
        "seen",
        "threshold",
        "ban",
        "alerts",
    ]);
    for r in rows {
        t.add_row(vec![
            time(r.ts),
            format!("{}/{}", r.namespace, r.anomaly),
            format!("{}:{}", r.key_kind, r.key_hash),
            r.client_ip.clone(),
            r.observed.to_string(),
            format!("{:.1}", r.threshold),
            if r.ban_s == 0 {
                String::new()
            } else {
                humantime::format_duration(Duration::from_secs(u64::from(r.ban_s))).to_string()
            },
            r.alerts.join(", "),
        ]);
    }
    format!("{t}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_quoted_as_clickhouse_reads_them() {
        let q = Query::new("db", "SELECT ? FROM {db}.t WHERE a = ? AND b = ?")
            .number(3)
            .text("it's \\ fine");
        assert_eq!(
            q.literal(),
            "SELECT 3 FROM db.t WHERE a = 'it\\'s \\\\ fine' AND b = ?"
        );
    }

    #[test]
    fn a_timeline_has_at_most_sixty_steps_of_whole_minutes() {
        let step = |s: u64| step_for(Duration::from_secs(s)).as_secs();
        assert_eq!(step(3600), 60);
        assert_eq!(step(86_400), 1440);
        assert_eq!(step(90), 60);
        assert_eq!(step(7 * 86_400), 10_080);
    }

    #[test]
    fn bars_scale_to_the_busiest_step() {
        let text = render_timeline(&[
            TimelineRow {
                at: 0,
                admitted: 30,
                refused: 10,
            },
            TimelineRow {
                at: 60,
                admitted: 20,
                refused: 0,
            },
        ]);
        assert!(
            text.contains(&format!("{}{}", "█".repeat(30), "▒".repeat(10))),
            "{text}"
        );
        assert!(text.contains(&"█".repeat(20)), "{text}");
        assert!(text.contains("1970-01-01 00:01"), "{text}");
    }
}
