//! The `tollgate` command: serve, check and explain policies.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate::config::{Flags, Settings};
use tollgate::plan::KeyHasher;
use tollgate::{PolicySet, RequestCtx, compile};

/// glibc's allocator serialises threads that free each other's memory (a tokio worker often
/// frees what another allocated); mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Policy-driven HTTP rate limiter")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Show which limits apply to a request, and why the others do not.
    Explain {
        /// Policy directory (or file).
        #[arg(long, default_value = "policies")]
        policies: PathBuf,
        /// The request's method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// The request's path, with an optional query string.
        #[arg(long)]
        path: String,
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
enum AnalyticsAction {
    /// Create the database, the events table and its rollups, or bring them up to date
    /// (idempotent; migrations the server is too old for stay pending).
    Migrate,
    /// The keys, limits, routes or tenants with the most decisions of a kind.
    Top {
        /// What to rank: key, limit, route, tenant.
        #[arg(long, default_value = "key", value_parser = parse_top_by)]
        by: tollgate::analytics::report::TopBy,
        /// Which decisions: reject, forbid, allow, near_limit… or `any`.
        #[arg(long, default_value = "reject", value_parser = parse_decision)]
        decision: String,
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
enum AdminAction {
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
struct NewEntry {
    #[command(flatten)]
    target: EntryTarget,
    /// For how many seconds [default: until removed].
    #[arg(long = "for")]
    for_seconds: Option<u64>,
    /// Why (a ban's reason is shown to the clients it refuses).
    #[arg(long)]
    reason: Option<String>,
}

/// What a runtime entry holds for: one of these.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct EntryTarget {
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
    fn fields(&self) -> Result<Vec<(&'static str, String)>, String> {
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

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve {
            listen,
            policies,
            config,
            upstream,
        } => serve(Flags {
            listen,
            policies,
            config,
            upstream,
        }),
        Command::Check { paths } => check(&paths),
        Command::Explain {
            policies,
            method,
            path,
            headers,
            ip,
            user_id,
            api_token,
            claims,
            untrusted,
        } => {
            let request =
                match build_request(&method, &path, &headers, ip, user_id, api_token, &claims) {
                    Ok(r) if untrusted => r,
                    Ok(r) => r.with_trusted_headers(),
                    Err(message) => {
                        eprintln!("error: {message}");
                        return ExitCode::from(2);
                    }
                };
            let set = PolicySet::load(&[policies]);
            match compile(&set) {
                Ok(plan) => {
                    let explanation =
                        tollgate::explain::explain(&plan, &request, &KeyHasher::random());
                    print!("{explanation}");
                    ExitCode::SUCCESS
                }
                Err(errors) => report(&errors),
            }
        }
        Command::Admin {
            url,
            token,
            config,
            action,
        } => admin(url, token, config, action),
        Command::Analytics {
            url,
            database,
            config,
            action,
        } => analytics(url, database, config, action),
    }
}

/// `tollgate analytics …`.
fn analytics(
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

/// The runtime a CLI command's calls run on, or the exit code after saying why not.
fn cli_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
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

/// `tollgate admin …`: one call to the admin API; the answer as JSON (explain: as text).
fn admin(
    url: Option<String>,
    token: Option<String>,
    config: Option<PathBuf>,
    action: AdminAction,
) -> ExitCode {
    let settings = Settings::load(&Flags {
        config,
        ..Flags::default()
    });
    let (url, token) = match (url, token, &settings) {
        (Some(url), Some(token), _) => (url, token),
        (url, token, Ok(s)) => {
            let url = url.unwrap_or_else(|| format!("http://{}", s.admin_listen));
            match token.or_else(|| s.admin_token.clone()) {
                Some(token) => (url, token),
                None => {
                    eprintln!("error: no admin token: set TOLLGATE_ADMIN_TOKEN, or pass --token");
                    return ExitCode::from(2);
                }
            }
        }
        (_, _, Err(e)) => {
            eprintln!("error: {e}");
            eprintln!("(or pass both --url and --token)");
            return ExitCode::from(2);
        }
    };
    let client = match tollgate::server::AdminClient::new(&url, &token) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let query = |pairs: &[(&str, &Option<String>)]| -> String {
        let parts: Vec<String> = pairs
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
            .collect();
        parts.join("&")
    };
    use http::Method;
    let (method, path, body) = match &action {
        AdminAction::Plan => (Method::GET, "/admin/plan".to_owned(), None),
        AdminAction::Reload => (Method::POST, "/admin/reload".to_owned(), None),
        AdminAction::Explain {
            method,
            path,
            ip,
            headers,
            trusted_headers,
        } => {
            let mut described = serde_json::json!({
                "method": method, "path": path, "trusted_headers": trusted_headers,
            });
            if let Some(ip) = ip {
                described["client_ip"] = serde_json::json!(ip);
            }
            let mut map = serde_json::Map::new();
            for header in headers {
                let Some((name, value)) = header.split_once(':') else {
                    eprintln!("error: `{header}` is not `Name: value`");
                    return ExitCode::from(2);
                };
                map.insert(name.trim().to_owned(), value.trim().into());
            }
            described["headers"] = map.into();
            (Method::POST, "/admin/explain".to_owned(), Some(described))
        }
        AdminAction::Keys {
            key,
            client,
            namespace,
            limit,
            reset,
        } => {
            let q = query(&[
                ("key", key),
                ("client", client),
                ("namespace", namespace),
                ("limit", limit),
            ]);
            let method = if *reset { Method::DELETE } else { Method::GET };
            (method, format!("/admin/keys?{q}"), None)
        }
        AdminAction::Key { key } => (Method::GET, format!("/admin/key?key={}", encode(key)), None),
        AdminAction::Diagnostics => (Method::GET, "/admin/diagnostics".to_owned(), None),
        AdminAction::Lists => (Method::GET, "/admin/lists".to_owned(), None),
        AdminAction::Ban(NewEntry {
            target,
            for_seconds,
            reason,
        })
        | AdminAction::Allow(NewEntry {
            target,
            for_seconds,
            reason,
        }) => {
            let list = match action {
                AdminAction::Ban(_) => "denylist",
                _ => "safelist",
            };
            let mut entry = serde_json::json!({ "list": list });
            match target.fields() {
                Ok(fields) => {
                    for (name, value) in fields {
                        entry[name] = value.into();
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            }
            if let Some(s) = for_seconds {
                entry["for_seconds"] = serde_json::json!(s);
            }
            if let Some(r) = reason {
                entry["reason"] = serde_json::json!(r);
            }
            (Method::POST, "/admin/lists".to_owned(), Some(entry))
        }
        AdminAction::Unlist { list, target } => {
            let fields = match target.fields() {
                Ok(fields) => fields,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut q = format!("/admin/lists?list={}", encode(list));
            for (name, value) in fields {
                q.push_str(&format!("&{name}={}", encode(&value)));
            }
            (Method::DELETE, q, None)
        }
    };
    let runtime = match cli_runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(client.call(method, &path, body)) {
        Ok(reply) if (200..300).contains(&reply.status) => {
            match (
                &action,
                reply.body.get("explanation").and_then(|e| e.as_str()),
            ) {
                (AdminAction::Explain { .. }, Some(text)) => print!("{text}"),
                _ => println!(
                    "{}",
                    serde_json::to_string_pretty(&reply.body).unwrap_or_default()
                ),
            }
            ExitCode::SUCCESS
        }
        Ok(reply) => {
            let detail = reply
                .body
                .get("detail")
                .and_then(|d| d.as_str())
                .map_or_else(|| reply.body.to_string(), str::to_owned);
            eprintln!("error: {} {detail}", reply.status);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `value` percent-encoded for a query string.
fn encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn serve(flags: Flags) -> ExitCode {
    let settings = match Settings::load(&flags) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("see docs/configuration.md for every setting");
            return ExitCode::from(2);
        }
    };
    tollgate::telemetry::init(settings.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tollgate::server::serve(&settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(tollgate::server::ServeError::Policies { path, errors }) => {
            eprintln!("error: the policies in `{path}` do not compile");
            report(&errors)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C or SIGTERM: stop accepting, finish what is in flight.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

fn check(paths: &[PathBuf]) -> ExitCode {
    let set = PolicySet::load(paths);
    match compile(&set) {
        Ok(plan) => {
            print_problems(plan.warnings());
            let warnings = match plan.warnings().len() {
                0 => String::new(),
                1 => ", 1 warning".to_owned(),
                n => format!(", {n} warnings"),
            };
            let cedar = match plan.cedar().iter().map(|c| c.len()).sum::<usize>() {
                0 if plan.cedar().is_empty() => String::new(),
                n => format!(", {n} Cedar polic{}", if n == 1 { "y" } else { "ies" }),
            };
            println!(
                "ok: {} file(s), {} limit(s){cedar}, plan {}{warnings}",
                set.files().len(),
                plan.limits().len(),
                plan.version()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => report(&errors),
    }
}

/// Prints problems rustc-style on standard error, coloured on a terminal.
fn print_problems(problems: &[tollgate::PolicyError]) {
    let width = terminal_width();
    let color = std::env::var_os("NO_COLOR").is_none()
        && std::io::IsTerminal::is_terminal(&std::io::stderr());
    for problem in problems {
        let text = if color {
            problem.render_terminal(width)
        } else {
            problem.render_plain(width)
        };
        eprintln!("{text}");
    }
}

fn report(errors: &tollgate::PolicyErrors) -> ExitCode {
    print_problems(errors.errors());
    eprintln!("error: {errors}");
    ExitCode::FAILURE
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(100)
}

fn build_request(
    method: &str,
    path: &str,
    headers: &[String],
    ip: Option<IpAddr>,
    user_id: Option<String>,
    api_token: Option<String>,
    claims: &[String],
) -> Result<RequestCtx, String> {
    let method = http::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
        .map_err(|_| format!("`{method}` is not an HTTP method"))?;
    let mut request =
        RequestCtx::try_new(method, path).map_err(|e| format!("the path `{path}`: {e}"))?;
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| format!("`{header}` is not `Name: value`"))?;
        request = request.try_header(name, value).map_err(|e| e.to_string())?;
    }
    if let Some(ip) = ip {
        request = request.with_client_ip(ip);
    }
    if let Some(user) = user_id {
        request = request.with_user_id(user);
    }
    if let Some(token) = api_token {
        request = request.with_api_token(token);
    }
    for claim in claims {
        let (name, value) = claim
            .split_once('=')
            .ok_or_else(|| format!("`{claim}` is not `name=value`"))?;
        request = request.with_claim(name.trim(), value.trim());
    }
    Ok(request)
}
