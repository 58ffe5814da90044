//! The command line, as clap reads it.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Policy-driven HTTP rate limiter")]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the server: decision API, forward-auth, health checks.
    Serve {
        /// Address to listen on [env: TOLLGATE_LISTEN; default 127.0.0.1:8080].
        #[arg(long)]
        listen: Option<String>,
        /// Policy directory [env: TOLLGATE_POLICIES; default policies].
        #[arg(long)]
        policies: Option<PathBuf>,
        /// Settings file (TOML); variables and flags override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Forward allowed requests to this application [env: TOLLGATE_UPSTREAM].
        #[arg(long)]
        upstream: Option<String>,
    },
    /// Validate policy files; print every problem, rustc-style.
    Check {
        /// Policy files or directories of `.rl` files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Convert another rate limiter's configuration into `.rl` limits.
    Import {
        #[command(subcommand)]
        from: ImportFrom,
    },
    /// Show which limits apply to a request, and why the others do not.
    Explain {
        /// Policy directory (or file).
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
        /// The request's method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// The request's path, with an optional query string.
        #[arg(long, required_unless_present = "domain")]
        path: Option<String>,
        /// Explain an Envoy rate-limit request instead: its domain.
        #[arg(long, conflicts_with = "path")]
        domain: Option<String>,
        /// With `--domain`: a descriptor entry, `key=value`, in order (repeatable).
        #[arg(long = "descriptor", value_name = "KEY=VALUE", requires = "domain")]
        descriptor: Vec<String>,
        /// A request header, `Name: value` (repeatable).
        #[arg(long = "header", value_name = "NAME:VALUE")]
        headers: Vec<String>,
        /// The client's address.
        #[arg(long)]
        ip: Option<IpAddr>,
        /// The authenticated user.
        #[arg(long)]
        user_id: Option<String>,
        /// The API token presented (shown only hashed).
        #[arg(long)]
        api_token: Option<String>,
        /// A claim of the verified token, `name=value` (repeatable).
        #[arg(long = "claim", value_name = "NAME=VALUE")]
        claims: Vec<String>,
        /// The headers come from the client itself, not through a trusted proxy: header
        /// tiers and keys not marked `trusted` are then not believed.
        #[arg(long)]
        untrusted: bool,
    },
    /// Call a running server's admin API (address and token from the same settings as
    /// `serve`: `TOLLGATE_ADMIN_LISTEN`, `TOLLGATE_ADMIN_TOKEN`, `--config`).
    Admin {
        /// The admin API's URL [default: http://{admin_listen}].
        #[arg(long)]
        url: Option<String>,
        /// The admin token [default: admin_token from the settings].
        #[arg(long)]
        token: Option<String>,
        /// Settings file (TOML), as for `serve`.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: AdminAction,
    },
    /// Decisions in ClickHouse: the schema (address and database from the same settings as
    /// `serve`: `TOLLGATE_CLICKHOUSE_URL`, `TOLLGATE_CLICKHOUSE_DATABASE`, `--config`).
    Analytics {
        /// ClickHouse's HTTP URL [default: clickhouse_url from the settings].
        #[arg(long, global = true)]
        url: Option<String>,
        /// The database [default: clickhouse_database, `tollgate`].
        #[arg(long, global = true)]
        database: Option<String>,
        /// Settings file (TOML), as for `serve`.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: AnalyticsAction,
    },
}

#[derive(Subcommand)]
pub(crate) enum ImportFrom {
    /// envoyproxy/ratelimit's YAML (one domain per document): prints limits that decide
    /// what it decides, for `tollgate serve`'s gRPC rate-limit service.
    EnvoyRatelimit {
        /// The configuration files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Write the limits to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum AnalyticsAction {
    /// Create the database, the events table and its rollups, or bring them up to date
    /// (idempotent; migrations the server is too old for stay pending).
    Migrate,
    /// The keys, limits, routes or tenants with the most decisions of a kind.
    Top {
        /// What to rank: key, limit, route, tenant, or cost (keys by the units they used).
        #[arg(long, default_value = "key", value_parser = parse_top_by)]
        by: tollgate::analytics::report::TopBy,
        /// Which decisions: reject, forbid, allow, near_limit… or `any` [default: reject;
        /// with `--by cost`, any].
        #[arg(long, value_parser = parse_decision)]
        decision: Option<String>,
        /// How far back: `1h`, `30min`, `1d`.
        #[arg(long, default_value = "1h", value_parser = parse_since)]
        since: std::time::Duration,
        /// How many lines.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        rows: u64,
        /// JSON lines for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Admitted and refused decisions over time, with a bar per step (at most 60 steps).
    Timeline {
        /// One limit (its name); all by default.
        #[arg(long)]
        limit: Option<String>,
        /// How far back: `1h`, `1d`, `7d`.
        #[arg(long, default_value = "1d", value_parser = parse_since)]
        since: std::time::Duration,
        /// JSON lines for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The anomalies detected, latest first.
    Anomalies {
        /// How far back: `1h`, `1d`.
        #[arg(long, default_value = "1d", value_parser = parse_since)]
        since: std::time::Duration,
        /// How many lines.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        rows: u64,
        /// JSON lines for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_top_by(text: &str) -> Result<tollgate::analytics::report::TopBy, String> {
    use tollgate::analytics::report::TopBy;
    TopBy::NAMES
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, by)| *by)
        .ok_or_else(|| {
            let names: Vec<_> = TopBy::NAMES.iter().map(|(n, _)| *n).collect();
            format!("one of {}", names.join(", "))
        })
}

fn parse_decision(text: &str) -> Result<String, String> {
    let known = tollgate::analytics::report::DECISIONS;
    if text == "any" || known.contains(&text) {
        Ok(text.to_owned())
    } else {
        Err(format!("`any` or one of {}", known.join(", ")))
    }
}

fn parse_since(text: &str) -> Result<std::time::Duration, String> {
    let d =
        humantime::parse_duration(text).map_err(|e| format!("{e} (write `1h`, `30min`, `7d`)"))?;
    if d < std::time::Duration::from_secs(60) || d > std::time::Duration::from_secs(400 * 86_400) {
        return Err("between 1 minute and 400 days".to_owned());
    }
    Ok(d)
}

#[derive(Subcommand)]
pub(crate) enum AdminAction {
    /// The plan serving, and the last reload's error.
    Plan,
    /// Rebuild the plan from the files now.
    Reload,
    /// Which limits apply to a described request, and why.
    Explain {
        /// The request's method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// The request's path.
        #[arg(long)]
        path: String,
        /// The client's address.
        #[arg(long)]
        ip: Option<IpAddr>,
        /// A request header, `Name: value` (repeatable).
        #[arg(long = "header", value_name = "NAME:VALUE")]
        headers: Vec<String>,
        /// The headers were set by a trusted component.
        #[arg(long)]
        trusted_headers: bool,
    },
    /// Count (or `--reset`) the counters of a key, client, namespace or limit.
    Keys {
        /// One counter: `api:{user:alice}:api`.
        #[arg(long, group = "selector")]
        key: Option<String>,
        /// One client in every limit: `user:alice`.
        #[arg(long, group = "selector")]
        client: Option<String>,
        /// Every counter of a namespace.
        #[arg(long, group = "selector")]
        namespace: Option<String>,
        /// Every client of a limit.
        #[arg(long, group = "selector")]
        limit: Option<String>,
        /// Forget them (counters and bans) instead of counting.
        #[arg(long)]
        reset: bool,
    },
    /// One counter's state and ban.
    Key {
        /// The key: `api:{user:alice}:api`.
        key: String,
    },
    /// The store's health and latency, memory evictions, the build.
    Diagnostics,
    /// The runtime safelist and denylist entries in force.
    Lists,
    /// Refuse an address, a network or a client (403) on every node: for a time, or until
    /// `unlist`.
    Ban(NewEntry),
    /// Count nothing for an address, a network or a client on every node (authorization
    /// still applies).
    Allow(NewEntry),
    /// Remove a runtime entry.
    Unlist {
        /// `denylist` (a ban), `safelist`, `flag` or `tarpit`.
        #[arg(long, default_value = "denylist")]
        list: String,
        #[command(flatten)]
        target: EntryTarget,
    },
}

/// A runtime entry to add: what it holds for, for how long, why.
#[derive(Debug, clap::Args)]
pub(crate) struct NewEntry {
    #[command(flatten)]
    pub(crate) target: EntryTarget,
    /// For how many seconds [default: until removed].
    #[arg(long = "for")]
    pub(crate) for_seconds: Option<u64>,
    /// Why (a ban's reason is shown to the clients it refuses).
    #[arg(long)]
    pub(crate) reason: Option<String>,
}

/// What a runtime entry holds for: one of these.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub(crate) struct EntryTarget {
    /// An address or network: `203.0.113.9`, `203.0.113.0/24`.
    net: Option<String>,
    /// A client as counter keys name it: `user:alice`, `token:<hash>`, `h.x-tenant:acme`.
    #[arg(long)]
    client: Option<String>,
    /// An API token, read from standard input (so that it is not on the command line); the
    /// server stores only its hash.
    #[arg(long)]
    token_stdin: bool,
}

impl EntryTarget {
    /// The JSON fields naming the target.
    pub(crate) fn fields(&self) -> Result<Vec<(&'static str, String)>, String> {
        if let Some(net) = &self.net {
            return Ok(vec![("net", net.clone())]);
        }
        if let Some(client) = &self.client {
            return Ok(vec![("client", client.clone())]);
        }
        let mut token = String::new();
        std::io::stdin()
            .read_line(&mut token)
            .map_err(|e| format!("cannot read the token from standard input: {e}"))?;
        let token = token.trim_end_matches(['\r', '\n']);
        if token.is_empty() {
            return Err("standard input holds no token".to_owned());
        }
        Ok(vec![("token", token.to_owned())])
    }
}
