//! The rows of ClickHouse's `decisions` and `anomalies` tables, and the event a decision
//! becomes on the request path (names shared, nothing formatted or hashed) before the
//! exporter's task makes its rows.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::plan::Mode;
use crate::plan::key::CounterKey;
use crate::request::{KeyHasher, RequestCtx};
use crate::verdict::{Action, Detection, Verdict};

/// One row of `decisions` (see the migrations in [`super::MIGRATIONS`]); field names are the
/// columns.
#[derive(
    Debug, Clone, Default, PartialEq, clickhouse::Row, serde::Serialize, serde::Deserialize,
)]
pub struct DecisionRow {
    /// Seconds since the epoch.
    pub ts: u32,
    /// The node that decided.
    pub node: Arc<str>,
    /// The plan's version.
    pub plan_version: Arc<str>,
    /// The policy file's namespace.
    pub namespace: String,
    /// The limit (or list) that decided.
    pub limit_name: Arc<str>,
    /// The limit's algorithm.
    pub algorithm: std::borrow::Cow<'static, str>,
    /// The `decision` enum's value (see [`Decision`]).
    pub decision: i8,
    /// The tier, for tiered limits.
    pub tier: Arc<str>,
    /// The tenant, when known.
    pub tenant: Arc<str>,
    /// What the key counts by (`ip`, `user`, `token`, …).
    pub key_kind: String,
    /// The counter key's keyed hash.
    pub key_hash: String,
    /// The client's address.
    pub client_ip: Arc<str>,
    /// The request's method.
    pub method: Arc<str>,
    /// The route template (else the path).
    pub route: Arc<str>,
    /// The status Tollgate answered (200 when it let the request through).
    pub status: u16,
    /// Units charged.
    pub cost: u64,
    /// Units used after the decision.
    pub used: u64,
    /// The quota.
    pub quota: u64,
    /// Units left.
    pub remaining: u64,
    /// The delay imposed, in milliseconds.
    pub delay_ms: u32,
    /// The decision's own latency, in microseconds (0: not measured).
    pub latency_us: u32,
    /// Cedar's determining policies.
    pub policies: Vec<Arc<str>>,
    /// 1 in shadow mode.
    pub shadow: u8,
    /// The share of such decisions exported (allows may be sampled).
    pub sample_rate: f32,
    /// The request's id.
    pub request_id: Arc<str>,
    /// The batch it was inserted in (set by the exporter).
    pub batch_id: Arc<str>,
    /// The flags (anomalies' `flag`) the client carried.
    #[serde(default)]
    pub flags: Vec<Arc<str>>,
    /// For a limit whose cost the response says: what was counted at admission (else 0).
    #[serde(default)]
    pub reserved: u64,
    /// The units the counter holds for this request in the end: what the response said
    /// was used, once settled (else `cost`).
    #[serde(default)]
    pub settled: u64,
}

/// One row of `anomalies`: a detection acted on.
#[derive(
    Debug, Clone, Default, PartialEq, clickhouse::Row, serde::Serialize, serde::Deserialize,
)]
pub struct AnomalyRow {
    /// Seconds since the epoch.
    pub ts: u32,
    /// The node that acted.
    pub node: String,
    /// The plan's version.
    pub plan_version: String,
    /// The anomaly block's namespace.
    pub namespace: String,
    /// The anomaly block.
    pub anomaly: String,
    /// What its key counts by (`ip`, `user`, …).
    pub key_kind: String,
    /// The counter key's keyed hash.
    pub key_hash: String,
    /// The client's address.
    pub client_ip: String,
    /// What was seen in the window (responses, distinct values).
    pub observed: u64,
    /// What it was compared with.
    pub threshold: f64,
    /// The detector's window, in seconds.
    pub window_s: u32,
    /// The ban imposed, in seconds (0: none).
    pub ban_s: u32,
    /// How long the key is flagged, in seconds (0: not).
    pub flag_s: u32,
    /// The tarpit's hold, in milliseconds (0: none).
    pub tarpit_ms: u32,
    /// The alert channels told.
    pub alerts: Vec<String>,
}

/// The `decision` column's values (`Enum8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i8)]
pub enum Decision {
    /// Admitted.
    Allow = 1,
    /// Admitted, 80 % or more used.
    NearLimit = 2,
    /// Admitted past a soft `warn`.
    Warn = 3,
    /// Admitted past a soft `delay`.
    Delay = 4,
    /// Refused by a limit.
    Reject = 5,
    /// Over a limit in shadow mode.
    ShadowReject = 6,
    /// Refused by a denylist.
    Forbid = 7,
    /// Refused by Cedar.
    Unauthorized = 8,
    /// Passed by a safelist.
    Bypass = 9,
    /// The store failed.
    StoreError = 10,
}

impl Decision {
    /// The row's decision for what a limit did.
    pub fn of(outcome: crate::verdict::Outcome) -> Decision {
        use crate::verdict::Outcome;
        match outcome {
            Outcome::Allow => Decision::Allow,
            Outcome::NearLimit => Decision::NearLimit,
            Outcome::Warn => Decision::Warn,
            Outcome::Delay => Decision::Delay,
            Outcome::Reject => Decision::Reject,
            Outcome::ShadowReject => Decision::ShadowReject,
            Outcome::StoreError => Decision::StoreError,
        }
    }
}

/// How rows are shaped, from the export settings.
#[derive(Debug, Clone, Default)]
pub struct RowShape {
    /// See [`ExportSettings::sample_allows`].
    pub sample_allows: f64,
    /// See [`ExportSettings::tenant_header`].
    pub tenant_header: Option<http::HeaderName>,
    /// See [`ExportSettings::truncate_ip`].
    pub truncate_ip: bool,
}

/// The row of an anomaly detected on `node`.
pub fn anomaly_row(d: &Detection, node: &str, key_hash: &str) -> AnomalyRow {
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    let client = d.key.client();
    AnomalyRow {
        ts: u32::try_from(d.at.as_micros() / 1_000_000).unwrap_or(u32::MAX),
        node: node.to_owned(),
        plan_version: d.plan_version.to_string(),
        namespace: d.namespace.to_string(),
        anomaly: d.anomaly.to_string(),
        key_kind: key_kind(client),
        key_hash: key_hash.to_owned(),
        client_ip: d.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        observed: d.observed,
        threshold: d.threshold,
        window_s: secs(d.window),
        ban_s: d.actions.ban.map_or(0, secs),
        flag_s: d.actions.flag.map_or(0, secs),
        tarpit_ms: d
            .actions
            .tarpit
            .map_or(0, |(h, _)| u32::try_from(h.as_millis()).unwrap_or(u32::MAX)),
        alerts: d.actions.alerts.iter().map(|a| a.to_string()).collect(),
    }
}

/// What a key's client part counts by: its parts' labels (`ip`, `user+h.x-tenant`).
fn key_kind(client: &str) -> String {
    client
        .split('+')
        .map(|part| part.split(':').next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("+")
}

/// What a decision's rows need, gathered on the request path without formatting or hashing
/// (shared names, the counter keys): the rows are made by the exporter's task.
#[derive(Debug)]
pub struct DecisionEvent {
    ts: u32,
    node: Arc<str>,
    plan_version: crate::plan::PlanVersion,
    tenant: String,
    client_ip: Option<std::net::IpAddr>,
    truncate_ip: bool,
    method: http::Method,
    route: String,
    status: u16,
    delay_ms: u32,
    latency_us: u32,
    sample_rate: f32,
    request_id: String,
    flags: Vec<Arc<str>>,
    hasher: KeyHasher,
    rows: Rows,
}

/// What decided a request.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "the event is boxed whole; the limits stay inline, saving an allocation a request"
)]
enum Rows {
    /// A list or Cedar, without counting: one row.
    DecidedBy {
        decision: Decision,
        name: Arc<str>,
        policies: Vec<Arc<str>>,
    },
    /// Limits: a row each.
    Limits(smallvec::SmallVec<[LimitEvent; 3]>),
}

/// One limit's part of a decision.
#[derive(Debug)]
struct LimitEvent {
    key: CounterKey,
    limit: Arc<str>,
    algorithm: &'static str,
    decision: Decision,
    tier: Option<Arc<str>>,
    cost: u64,
    quota: u64,
    remaining: u64,
    shadow: bool,
    /// What the response said was used, once the request ended (usage limits).
    used: Option<u64>,
}

impl DecisionEvent {
    /// How many rows it makes.
    pub fn rows_len(&self) -> u64 {
        match &self.rows {
            Rows::DecidedBy { .. } => 1,
            Rows::Limits(limits) => limits.len() as u64,
        }
    }

    /// Sets the status the rows report: what the client got.
    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    /// Sets what the request used of each limit whose cost its response says.
    pub fn set_usage(&mut self, usage: &[crate::pipeline::Settled]) {
        if let Rows::Limits(limits) = &mut self.rows {
            for settled in usage {
                if let Some(l) = limits.iter_mut().find(|l| l.limit == settled.limit) {
                    l.used = Some(settled.used);
                }
            }
        }
    }

    /// Its rows, added to `batch`.
    pub fn into_rows(self, batch: &mut Vec<DecisionRow>) {
        let base = DecisionRow {
            ts: self.ts,
            node: self.node,
            plan_version: Arc::from(self.plan_version.as_str()),
            tenant: Arc::from(self.tenant),
            client_ip: self.client_ip.map_or_else(Arc::default, |ip| {
                Arc::from(client_ip(ip, self.truncate_ip))
            }),
            method: Arc::from(self.method.as_str()),
            route: Arc::from(self.route),
            status: self.status,
            delay_ms: self.delay_ms,
            latency_us: self.latency_us,
            sample_rate: self.sample_rate,
            request_id: Arc::from(self.request_id),
            flags: self.flags,
            ..DecisionRow::default()
        };
        match self.rows {
            Rows::DecidedBy {
                decision,
                name,
                policies,
            } => batch.push(DecisionRow {
                decision: decision as i8,
                limit_name: name,
                policies,
                ..base
            }),
            Rows::Limits(limits) => {
                for l in limits {
                    let parts = l.key.parts();
                    batch.push(DecisionRow {
                        namespace: parts.namespace.to_owned(),
                        limit_name: l.limit,
                        algorithm: std::borrow::Cow::Borrowed(l.algorithm),
                        decision: l.decision as i8,
                        tier: l.tier.unwrap_or_default(),
                        key_kind: key_kind(parts.client),
                        key_hash: self.hasher.hash(&l.key),
                        cost: l.cost,
                        reserved: if l.used.is_some() { l.cost } else { 0 },
                        settled: l.used.unwrap_or(l.cost),
                        used: l.quota.saturating_sub(l.remaining),
                        quota: l.quota,
                        remaining: l.remaining,
                        shadow: u8::from(l.shadow),
                        ..base.clone()
                    });
                }
            }
        }
    }
}

/// What a decision's event says besides the decision.
#[derive(Debug)]
pub struct EventContext<'a> {
    /// The request's id.
    pub request_id: &'a str,
    /// This Tollgate's name.
    pub node: &'a Arc<str>,
    /// Hashes counter keys (in the exporter's task).
    pub hasher: &'a KeyHasher,
    /// The decision's time.
    pub now: Timestamp,
    /// Sampling, tenant, address truncation.
    pub shape: &'a RowShape,
    /// The status Tollgate answered (what the row says until the response's is known).
    pub status: u16,
}

/// A decision's event: one row per limit that applied (its outcome, counter and tier), or
/// one for the list or Cedar answer that decided without counting; `None` when the request
/// is sampled out. Its status is what Tollgate answered.
pub fn event(
    verdict: &Verdict,
    request: &RequestCtx,
    cx: &EventContext<'_>,
) -> Option<DecisionEvent> {
    let sample_rate = if !verdict.is_plain_admission() {
        1.0
    } else {
        cx.shape.sample_allows
    };
    if sample_rate < 1.0 && rand::random::<f64>() >= sample_rate {
        return None;
    }
    let rows = match &verdict.action {
        Action::Bypass { list } => Rows::DecidedBy {
            decision: Decision::Bypass,
            name: Arc::clone(list),
            policies: Vec::new(),
        },
        Action::Forbid { list, .. } => Rows::DecidedBy {
            decision: Decision::Forbid,
            name: Arc::clone(list),
            policies: Vec::new(),
        },
        Action::Unauthorized {
            limit, policies, ..
        } => Rows::DecidedBy {
            decision: Decision::Unauthorized,
            name: Arc::clone(limit),
            policies: policies.clone(),
        },
        _ => Rows::Limits(
            verdict
                .reports
                .iter()
                .map(|r| LimitEvent {
                    key: r.key.clone(),
                    limit: Arc::clone(&r.limit),
                    algorithm: r.algorithm,
                    decision: Decision::of(r.outcome),
                    tier: r.tier.clone(),
                    cost: r.cost,
                    quota: r.decision.limit,
                    remaining: r.decision.remaining,
                    shadow: r.mode == Mode::Shadow,
                    used: None,
                })
                .collect(),
        ),
    };
    Some(DecisionEvent {
        ts: u32::try_from(cx.now.as_micros() / 1_000_000).unwrap_or(u32::MAX),
        node: Arc::clone(cx.node),
        plan_version: verdict.plan_version,
        tenant: cx
            .shape
            .tenant_header
            .as_ref()
            .and_then(|h| request.headers.get(h))
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(64).collect())
            .unwrap_or_default(),
        client_ip: request.client_ip,
        truncate_ip: cx.shape.truncate_ip,
        method: request.method.clone(),
        route: request
            .route_template
            .clone()
            .unwrap_or_else(|| request.path.clone()),
        status: cx.status,
        delay_ms: match verdict.action {
            Action::Delay(d) => u32::try_from(d.as_millis()).unwrap_or(u32::MAX),
            _ => 0,
        },
        latency_us: u32::try_from(verdict.elapsed.as_micros()).unwrap_or(u32::MAX),
        sample_rate: sample_rate as f32,
        request_id: cx.request_id.to_owned(),
        flags: verdict.flags.clone(),
        hasher: cx.hasher.clone(),
        rows,
    })
}

/// `ip` as a row shows it: whole, or cut to its /24 or /48 network.
fn client_ip(ip: std::net::IpAddr, truncate: bool) -> String {
    use std::net::IpAddr;
    if !truncate {
        return ip.to_string();
    }
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            std::net::Ipv4Addr::new(a, b, c, 0).to_string()
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0).to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncated_addresses_keep_their_network_only() {
        let ip = |s: &str| s.parse().unwrap();
        assert_eq!(super::client_ip(ip("203.0.113.77"), true), "203.0.113.0");
        assert_eq!(super::client_ip(ip("203.0.113.77"), false), "203.0.113.77");
        assert_eq!(
            super::client_ip(ip("2001:db8:1:2:3:4:5:6"), true),
            "2001:db8:1::"
        );
    }
}
