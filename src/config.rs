//! Settings for `tollgate serve`: defaults, then a TOML file, then `TOLLGATE_*` variables,
//! then flags, each overriding the one before. Every invalid value is reported at once,
//! naming where it came from, and the server does not start.

pub use crate::telemetry::LogFormat;
use std::net::SocketAddr;
use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use http::HeaderName;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Where the server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Development: the memory store is fine, loud warnings instead of refusals.
    #[default]
    Dev,
    /// Production: a shared store and a key secret are required.
    Prod,
}

/// Whose clock the Redis store counts with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StoreClock {
    /// This node's clock (deterministic, and what the memory store uses).
    #[default]
    Local,
    /// Redis's `TIME`: nodes whose clocks drift still agree.
    Redis,
}

/// Every setting, validated. See `docs/configuration.md`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address of the decision API, forward-auth and proxy listener.
    pub listen: SocketAddr,
    /// Policy directory (or file).
    pub policies: PathBuf,
    /// `dev` or `prod`.
    pub env: Environment,
    /// Redis URL; unset means the memory store.
    pub redis_url: Option<String>,
    /// Certificates for `rediss://` (read from `redis_tls_ca_file`, `redis_tls_cert_file` and
    /// `redis_tls_key_file`); `None`: the system's roots, no client certificate.
    pub redis_tls: Option<crate::store::redis::RedisTls>,
    /// Where `redis_tls` was read from: watched, so that rotated certificates are picked up.
    pub redis_tls_files: Option<crate::store::redis::RedisTlsFiles>,
    /// Per-call store timeout, in milliseconds.
    pub store_timeout_ms: u64,
    /// Whose clock the Redis store counts with: this node's, or Redis's (`TIME`).
    pub store_clock: StoreClock,
    /// Nodes sharing the quotas: a limit with `on_store_error local` counts `limit / nodes`
    /// in each node's memory while the store fails.
    pub expected_nodes: u64,
    /// Keys whose rejections are remembered locally (0: no deny cache).
    pub deny_cache_keys: usize,
    /// The most requests decided in one Redis call (1: no batching).
    pub redis_batch_max: usize,
    /// Keys the memory store holds (the store itself in dev, the `local` fallback with
    /// Redis) before it evicts.
    pub memory_max_keys: usize,
    /// Consecutive store failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// The longest wait between probes of a failing store, in milliseconds.
    pub breaker_max_backoff_ms: u64,
    /// Address of the admin listener.
    pub admin_listen: SocketAddr,
    /// Token the admin API requires.
    pub admin_token: Option<String>,
    /// Proxies whose forwarding headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Secret for hashing tokens in keys.
    pub key_secret: Option<String>,
    /// Application to forward allowed requests to.
    pub upstream: Option<http::Uri>,
    /// Whether to send `X-RateLimit-*` headers.
    pub legacy_headers: bool,
    /// Whether to send the IETF `RateLimit` and `RateLimit-Policy` headers.
    pub ietf_headers: bool,
    /// Header a trusted upstream puts the authenticated user in.
    pub user_header: Option<HeaderName>,
    /// Header clients send API keys in (besides `Authorization: Bearer`).
    pub api_key_header: HeaderName,
    /// Verification of bearer JWTs.
    pub jwt: Option<JwtSettings>,
    /// Largest `/v1/check` body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// How long a Cedar answer is kept, in milliseconds (0: not kept).
    pub cedar_cache_ttl_ms: u64,
    /// How many Cedar answers are kept per policy set.
    pub cedar_cache_size: usize,
    /// Serve `/metrics` on the main listener too, without a token (it is always on the
    /// admin listener, behind the admin token).
    pub metrics_on_main: bool,
    /// ClickHouse's HTTP URL, for decisions and analytics (`None`: no export).
    pub clickhouse_url: Option<String>,
    /// The ClickHouse database Tollgate's tables live in.
    pub clickhouse_database: String,
    /// Where decisions wait on disk while ClickHouse is down (`None`: in memory only).
    pub clickhouse_spool_dir: Option<PathBuf>,
    /// The most the spool holds, in MiB; past that, decisions are dropped and counted.
    pub clickhouse_spool_max_mb: u64,
    /// The share of admitted requests exported, in `(0, 1]`; refusals always are.
    pub clickhouse_sample_allows: f64,
    /// The request header whose value is each row's tenant.
    pub clickhouse_tenant_header: Option<HeaderName>,
    /// Client addresses are exported cut to their /24 or /48 network.
    pub clickhouse_truncate_ip: bool,
    /// `tollgate serve` runs the migrations before it exports.
    pub clickhouse_migrate: bool,
}

pub use crate::identity::{JwtKey, JwtSettings};

/// The settings as written: every field optional, so that each is read (and fails) alone.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Raw {
    listen: Option<String>,
    policies: Option<String>,
    env: Option<String>,
    redis_url: Option<String>,
    redis_tls_ca_file: Option<String>,
    redis_tls_cert_file: Option<String>,
    redis_tls_key_file: Option<String>,
    store_timeout_ms: Option<u64>,
    store_clock: Option<String>,
    expected_nodes: Option<u64>,
    deny_cache_keys: Option<usize>,
    redis_batch_max: Option<u64>,
    memory_max_keys: Option<usize>,
    breaker_failures: Option<u32>,
    breaker_max_backoff_ms: Option<u64>,
    admin_listen: Option<String>,
    admin_token: Option<String>,
    trusted_proxies: Option<StringList>,
    key_secret: Option<String>,
    upstream: Option<String>,
    header_families: Option<StringList>,
    user_header: Option<String>,
    api_key_header: Option<String>,
    jwt_algorithm: Option<String>,
    jwt_secret: Option<String>,
    jwt_public_key_file: Option<String>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    jwt_user_claim: Option<String>,
    max_body_bytes: Option<usize>,
    log_format: Option<String>,
    cedar_cache_ttl_ms: Option<u64>,
    cedar_cache_size: Option<usize>,
    metrics_on_main: Option<BoolText>,
    clickhouse_url: Option<String>,
    clickhouse_database: Option<String>,
    clickhouse_spool_dir: Option<String>,
    clickhouse_spool_max_mb: Option<u64>,
    clickhouse_sample_allows: Option<NumberText>,
    clickhouse_tenant_header: Option<String>,
    clickhouse_truncate_ip: Option<BoolText>,
    clickhouse_migrate: Option<BoolText>,
}

/// A fractional setting: a number in the file, text in a variable or a flag.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum NumberText {
    Number(f64),
    Text(String),
}

impl NumberText {
    fn value(&self) -> Option<f64> {
        match self {
            NumberText::Number(n) => Some(*n),
            NumberText::Text(t) => t.trim().parse().ok(),
        }
    }
}

/// A yes/no setting: a boolean in the file, `true` or `false` in a variable or a flag.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum BoolText {
    Bool(bool),
    Text(String),
}

impl BoolText {
    fn into_text(self) -> String {
        match self {
            BoolText::Bool(b) => b.to_string(),
            BoolText::Text(t) => t,
        }
    }
}

/// The setting names, for unknown-key checks.
const KEYS: &[&str] = &[
    "listen",
    "policies",
    "env",
    "redis_url",
    "redis_tls_ca_file",
    "redis_tls_cert_file",
    "redis_tls_key_file",
    "store_timeout_ms",
    "store_clock",
    "expected_nodes",
    "deny_cache_keys",
    "redis_batch_max",
    "memory_max_keys",
    "breaker_failures",
    "breaker_max_backoff_ms",
    "admin_listen",
    "admin_token",
    "trusted_proxies",
    "key_secret",
    "upstream",
    "header_families",
    "user_header",
    "api_key_header",
    "jwt_algorithm",
    "jwt_secret",
    "jwt_public_key_file",
    "jwt_issuer",
    "jwt_audience",
    "jwt_user_claim",
    "max_body_bytes",
    "log_format",
    "cedar_cache_ttl_ms",
    "cedar_cache_size",
    "metrics_on_main",
    "clickhouse_url",
    "clickhouse_database",
    "clickhouse_spool_dir",
    "clickhouse_spool_max_mb",
    "clickhouse_sample_allows",
    "clickhouse_tenant_header",
    "clickhouse_truncate_ip",
    "clickhouse_migrate",
];

/// Settings whose values are numbers.
const NUMERIC: &[&str] = &[
    "store_timeout_ms",
    "expected_nodes",
    "deny_cache_keys",
    "redis_batch_max",
    "memory_max_keys",
    "breaker_failures",
    "breaker_max_backoff_ms",
    "max_body_bytes",
    "cedar_cache_ttl_ms",
    "cedar_cache_size",
    "clickhouse_spool_max_mb",
];

/// A list given either as a list or as one comma-separated string (as variables are).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum StringList {
    List(Vec<String>),
    Joined(String),
}

impl StringList {
    fn items(&self) -> Vec<String> {
        match self {
            StringList::List(items) => items.iter().map(|s| s.trim().to_owned()).collect(),
            StringList::Joined(s) => s
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }
}

/// Settings given as flags; they override everything else.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    /// `--listen`
    pub listen: Option<String>,
    /// `--policies`
    pub policies: Option<PathBuf>,
    /// `--config`
    pub config: Option<PathBuf>,
    /// `--upstream`
    pub upstream: Option<String>,
}

/// One invalid setting: where it came from and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The setting's name.
    pub key: String,
    /// Where its value came from: `config.toml:3`, `TOLLGATE_LISTEN`, `--listen`, a default.
    pub source: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in the settings.
#[derive(Debug, thiserror::Error)]
#[error("{}", render(.0))]
pub struct ConfigError(pub Vec<ConfigProblem>);

fn render(problems: &[ConfigProblem]) -> String {
    let mut out = format!(
        "{} invalid setting{}:",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str(&format!("\n  - `{}` ({}): {}", p.key, p.source, p.message));
    }
    out
}

impl Settings {
    /// Reads the settings from the process environment, an optional file, and flags.
    pub fn load(flags: &Flags) -> Result<Settings, ConfigError> {
        Self::load_from(flags, std::env::vars())
    }

    /// Reads the settings with `vars` standing for the environment (for tests).
    ///
    /// Each group of settings is read by its own function; all of them add to one list of
    /// problems, so that every invalid value is reported at once.
    pub fn load_from(
        flags: &Flags,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let (sources, early) = Sources::read(flags, vars);
        let mut problems = Problems {
            sources: &sources,
            list: early,
        };
        let mut raw = sources.raw(&mut problems);
        let mut settings = Settings::defaults();
        settings.read_server(&mut raw, &mut problems);
        settings.read_store(&mut raw, &mut problems);
        settings.read_identity(&mut raw, &mut problems);
        settings.read_headers(&mut raw, &mut problems);
        settings.check_production(&mut problems);
        match problems.list.is_empty() {
            true => Ok(settings),
            false => Err(ConfigError(problems.list)),
        }
    }

    /// The defaults, before any source is read.
    fn defaults() -> Settings {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            policies: PathBuf::from("policies"),
            env: Environment::Dev,
            redis_url: None,
            redis_tls: None,
            redis_tls_files: None,
            store_timeout_ms: 50,
            store_clock: StoreClock::Local,
            expected_nodes: 1,
            deny_cache_keys: 100_000,
            redis_batch_max: 64,
            memory_max_keys: crate::store::memory::DEFAULT_MAX_KEYS,
            breaker_failures: 3,
            breaker_max_backoff_ms: 1_000,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            admin_token: None,
            trusted_proxies: Vec::new(),
            key_secret: None,
            upstream: None,
            legacy_headers: true,
            ietf_headers: true,
            user_header: None,
            api_key_header: HeaderName::from_static("x-api-key"),
            jwt: None,
            max_body_bytes: 64 * 1024,
            log_format: LogFormat::Pretty,
            cedar_cache_ttl_ms: 1_000,
            cedar_cache_size: 100_000,
            metrics_on_main: false,
            clickhouse_url: None,
            clickhouse_database: "tollgate".to_owned(),
            clickhouse_spool_dir: None,
            clickhouse_spool_max_mb: 1024,
            clickhouse_sample_allows: 1.0,
            clickhouse_tenant_header: None,
            clickhouse_truncate_ip: false,
            clickhouse_migrate: false,
        }
    }

    /// Listeners, the policy directory, the environment, the upstream, limits on input.
    fn read_server(&mut self, raw: &mut Raw, p: &mut Problems) {
        let mut addr = |key: &str, value: Option<String>, into: &mut SocketAddr| {
            let Some(text) = value else { return };
            match text.parse() {
                Ok(addr) => *into = addr,
                Err(_) => p.add(
                    key,
                    format!("`{text}` is not an address like `127.0.0.1:8080`"),
                ),
            }
        };
        addr("listen", raw.listen.take(), &mut self.listen);
        addr(
            "admin_listen",
            raw.admin_listen.take(),
            &mut self.admin_listen,
        );

        self.env = keyword(p, "env", raw.env.take(), ENVIRONMENTS, self.env);
        // JSON for log collectors in production, readable lines in development, unless set.
        let by_env = match self.env {
            Environment::Prod => LogFormat::Json,
            Environment::Dev => self.log_format,
        };
        self.log_format = keyword(p, "log_format", raw.log_format.take(), LOG_FORMATS, by_env);
        self.metrics_on_main = keyword(
            p,
            "metrics_on_main",
            raw.metrics_on_main.take().map(BoolText::into_text),
            BOOLEANS,
            self.metrics_on_main,
        );
        if let Some(url) = raw.clickhouse_url.take() {
            if url.starts_with("http://") || url.starts_with("https://") {
                self.clickhouse_url = Some(url);
            } else {
                p.add(
                    "clickhouse_url",
                    "ClickHouse's HTTP interface: a URL like `http://127.0.0.1:8123`".to_owned(),
                );
            }
        }
        if let Some(db) = raw.clickhouse_database.take() {
            if crate::analytics::plain_database(&db) {
                self.clickhouse_database = db;
            } else {
                p.add(
                    "clickhouse_database",
                    format!("`{db}` is not a database name (letters, digits and `_`)"),
                );
            }
        }

        if let Some(dir) = raw.clickhouse_spool_dir.take() {
            self.clickhouse_spool_dir = Some(PathBuf::from(dir));
        }
        self.clickhouse_spool_max_mb = raw
            .clickhouse_spool_max_mb
            .take()
            .unwrap_or(self.clickhouse_spool_max_mb);
        if self.clickhouse_spool_max_mb == 0 {
            p.add("clickhouse_spool_max_mb", "must be at least 1".to_owned());
        }
        if let Some(rate) = raw.clickhouse_sample_allows.take() {
            match rate.value() {
                Some(r) if r > 0.0 && r <= 1.0 => self.clickhouse_sample_allows = r,
                _ => p.add(
                    "clickhouse_sample_allows",
                    "a share of admitted requests above 0 and at most 1, like `0.1`".to_owned(),
                ),
            }
        }
        for (key, value, field) in [
            (
                "clickhouse_truncate_ip",
                raw.clickhouse_truncate_ip.take(),
                &mut self.clickhouse_truncate_ip,
            ),
            (
                "clickhouse_migrate",
                raw.clickhouse_migrate.take(),
                &mut self.clickhouse_migrate,
            ),
        ] {
            *field = keyword(p, key, value.map(BoolText::into_text), BOOLEANS, *field);
        }

        if let Some(policies) = raw.policies.take() {
            self.policies = PathBuf::from(policies);
        }
        if !self.policies.exists() {
            p.add(
                "policies",
                format!("`{}` does not exist", self.policies.display()),
            );
        }

        self.upstream = raw
            .upstream
            .take()
            .and_then(|u| match u.parse::<http::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.authority().is_some() =>
                {
                    Some(uri)
                }
                _ => {
                    p.add(
                        "upstream",
                        format!("`{u}` is not an http(s) URL like `http://127.0.0.1:3000`"),
                    );
                    None
                }
            });

        self.admin_token = raw.admin_token.take();
        if let Some(token) = &self.admin_token
            && token.len() < 16
        {
            p.add("admin_token", "use at least 16 characters".to_owned());
        }
        self.max_body_bytes = raw.max_body_bytes.take().unwrap_or(self.max_body_bytes);
        if self.max_body_bytes == 0 {
            p.add("max_body_bytes", "must be at least 1".to_owned());
        }
        if let Some(ttl) = raw.cedar_cache_ttl_ms.take() {
            match ttl {
                0..=60_000 => self.cedar_cache_ttl_ms = ttl,
                _ => p.add(
                    "cedar_cache_ttl_ms",
                    format!("{ttl} is not between 0 and 60000"),
                ),
            }
        }
        if let Some(size) = raw.cedar_cache_size.take() {
            match size {
                1..=10_000_000 => self.cedar_cache_size = size,
                _ => p.add(
                    "cedar_cache_size",
                    format!("{size} is not between 1 and 10000000"),
                ),
            }
        }
    }

    /// The store: Redis URL and TLS, timeouts, clock, nodes, caches, the circuit breaker.
    fn read_store(&mut self, raw: &mut Raw, p: &mut Problems) {
        self.redis_url = raw.redis_url.take();
        if let Some(url) = &self.redis_url {
            if !REDIS_SCHEMES.iter().any(|s| url.starts_with(s)) {
                p.add(
                    "redis_url",
                    "not a Redis URL: use `redis://host:port/db`, `redis+cluster://host:port,host:port` (`rediss` for TLS) or `unix:///path/to/redis.sock`".to_owned(),
                );
            } else if url.ends_with("#insecure") {
                p.add(
                    "redis_url",
                    "certificate checks cannot be turned off (`#insecure`): give the CA in `redis_tls_ca_file`".to_owned(),
                );
            }
        }
        (self.redis_tls, self.redis_tls_files) = redis_tls(
            self.redis_url.as_deref(),
            raw.redis_tls_ca_file.take(),
            raw.redis_tls_cert_file.take(),
            raw.redis_tls_key_file.take(),
            &mut |key, message| p.add(key, message),
        )
        .unzip();
        self.store_clock = keyword(
            p,
            "store_clock",
            raw.store_clock.take(),
            STORE_CLOCKS,
            self.store_clock,
        );

        let mut number = |key: &str,
                          value: Option<u64>,
                          range: std::ops::RangeInclusive<u64>,
                          into: &mut u64| {
            let Some(value) = value else { return };
            if range.contains(&value) {
                *into = value;
            } else {
                p.add(
                    key,
                    format!(
                        "{value} is not between {} and {}",
                        range.start(),
                        range.end()
                    ),
                );
            }
        };
        number(
            "store_timeout_ms",
            raw.store_timeout_ms.take(),
            1..=10_000,
            &mut self.store_timeout_ms,
        );
        number(
            "expected_nodes",
            raw.expected_nodes.take(),
            1..=10_000,
            &mut self.expected_nodes,
        );
        let mut batch_max = self.redis_batch_max as u64;
        number(
            "redis_batch_max",
            raw.redis_batch_max.take(),
            1..=1_000,
            &mut batch_max,
        );
        self.redis_batch_max = usize::try_from(batch_max).unwrap_or(1);
        number(
            "breaker_max_backoff_ms",
            raw.breaker_max_backoff_ms.take(),
            1..=600_000,
            &mut self.breaker_max_backoff_ms,
        );

        self.deny_cache_keys = raw.deny_cache_keys.take().unwrap_or(self.deny_cache_keys);
        self.memory_max_keys = raw.memory_max_keys.take().unwrap_or(self.memory_max_keys);
        if self.memory_max_keys < 1_000 {
            p.add(
                "memory_max_keys",
                format!(
                    "{} is below 1000: every client would evict another",
                    self.memory_max_keys
                ),
            );
        }
        self.breaker_failures = raw.breaker_failures.take().unwrap_or(self.breaker_failures);
        if self.breaker_failures == 0 {
            p.add("breaker_failures", "must be at least 1".to_owned());
        }
    }

    /// Who the client is: trusted proxies, the key secret, user and API-key headers, JWTs.
    fn read_identity(&mut self, raw: &mut Raw, p: &mut Problems) {
        for item in raw
            .trusted_proxies
            .take()
            .map(|l| l.items())
            .unwrap_or_default()
        {
            match crate::plan::ipset::parse_net(&item) {
                Some(net) => self.trusted_proxies.push(net),
                None => p.add(
                    "trusted_proxies",
                    format!("`{item}` is not an address or a network like `10.0.0.0/8`"),
                ),
            }
        }

        self.key_secret = raw.key_secret.take();
        if let Some(secret) = &self.key_secret
            && secret.len() < 16
        {
            p.add("key_secret", "use at least 16 characters".to_owned());
        }

        let mut header = |key: &str, value: Option<String>| -> Option<HeaderName> {
            let value = value?;
            HeaderName::from_bytes(value.trim().as_bytes())
                .map_err(|_| p.add(key, format!("`{value}` is not a header name")))
                .ok()
        };
        self.user_header = header("user_header", raw.user_header.take());
        self.clickhouse_tenant_header = header(
            "clickhouse_tenant_header",
            raw.clickhouse_tenant_header.take(),
        );
        if let Some(name) = header("api_key_header", raw.api_key_header.take()) {
            self.api_key_header = name;
        }

        self.jwt = jwt_settings(
            raw.jwt_algorithm.take(),
            raw.jwt_secret.take(),
            raw.jwt_public_key_file.take(),
            raw.jwt_issuer.take(),
            raw.jwt_audience.take(),
            raw.jwt_user_claim.take(),
            &mut |key, message| p.add(key, message),
        );
    }

    /// Which families of rate-limit headers responses carry.
    fn read_headers(&mut self, raw: &mut Raw, p: &mut Problems) {
        let Some(families) = raw.header_families.take() else {
            return;
        };
        (self.legacy_headers, self.ietf_headers) = (false, false);
        for family in families.items() {
            match family.to_ascii_lowercase().as_str() {
                "x-ratelimit" => self.legacy_headers = true,
                "ietf" => self.ietf_headers = true,
                other => p.add(
                    "header_families",
                    format!("`{other}` is not `x-ratelimit` or `ietf`"),
                ),
            }
        }
    }

    /// What production requires beyond valid values: a shared store and a key secret.
    fn check_production(&self, p: &mut Problems) {
        if self.env != Environment::Prod {
            return;
        }
        if self.redis_url.is_none() {
            p.add(
                "redis_url",
                "production needs a shared store: set TOLLGATE_REDIS_URL".to_owned(),
            );
        }
        if self.key_secret.is_none() {
            p.add(
                "key_secret",
                "production needs a key secret, so that hashed tokens agree across nodes and restarts".to_owned(),
            );
        }
    }
}

const REDIS_SCHEMES: &[&str] = &[
    "redis://",
    "rediss://",
    "redis+cluster://",
    "rediss+cluster://",
    "unix://",
    "redis+unix://",
];
const ENVIRONMENTS: &[(&str, Environment)] =
    &[("dev", Environment::Dev), ("prod", Environment::Prod)];
const LOG_FORMATS: &[(&str, LogFormat)] =
    &[("pretty", LogFormat::Pretty), ("json", LogFormat::Json)];
const BOOLEANS: &[(&str, bool)] = &[("true", true), ("false", false)];
const STORE_CLOCKS: &[(&str, StoreClock)] =
    &[("local", StoreClock::Local), ("redis", StoreClock::Redis)];

/// A keyword setting (case-insensitive): its value from `table`, or `default` and a problem
/// naming the words it may be.
fn keyword<T: Copy>(
    p: &mut Problems,
    key: &str,
    value: Option<String>,
    table: &[(&str, T)],
    default: T,
) -> T {
    let Some(value) = value else { return default };
    let lower = value.to_ascii_lowercase();
    if let Some((_, v)) = table.iter().find(|(word, _)| *word == lower) {
        return *v;
    }
    let words: Vec<String> = table.iter().map(|(w, _)| format!("`{w}`")).collect();
    p.add(key, format!("`{lower}` is not {}", words.join(" or ")));
    default
}

/// Where the values come from: the file (if any), our variables, the flags.
struct Sources<'f> {
    flags: &'f Flags,
    vars: Vec<(String, String)>,
    file: Option<(PathBuf, String)>,
}

impl<'f> Sources<'f> {
    /// Reads the file the flags name; a file that cannot be read is the first problem.
    fn read(
        flags: &'f Flags,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> (Self, Vec<ConfigProblem>) {
        let vars = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("TOLLGATE_"))
            .collect();
        let mut problems = Vec::new();
        let file = flags
            .config
            .as_ref()
            .and_then(|path| match std::fs::read_to_string(path) {
                Ok(text) => Some((path.clone(), text)),
                Err(e) => {
                    problems.push(ConfigProblem {
                        key: "config".into(),
                        source: "--config".into(),
                        message: format!("cannot read `{}`: {e}", path.display()),
                    });
                    None
                }
            });
        (Sources { flags, vars, file }, problems)
    }

    /// Every value as written, merged in order (file, variables, flags), each field read
    /// alone so that one bad value does not hide the next. Names that are no setting, in the
    /// file or among our variables, are problems: a typo would otherwise be silently ignored.
    fn raw(&self, p: &mut Problems) -> Raw {
        let mut figment = Figment::from(Serialized::defaults(Raw::default()));
        if let Some((path, text)) = &self.file {
            figment = figment.merge(Toml::string(text));
            for key in toml_keys(text) {
                if !KEYS.contains(&key.as_str()) {
                    p.list.push(ConfigProblem {
                        source: format!("{}:{}", path.display(), line_of(text, &key)),
                        message: suggest_key(&key),
                        key,
                    });
                }
            }
        }
        // Values stay text (a numeric token is still a token), except for numeric settings.
        let mut from_env = figment::value::Dict::new();
        for (name, value) in &self.vars {
            let key = name.trim_start_matches("TOLLGATE_").to_ascii_lowercase();
            if KEYS.contains(&key.as_str()) {
                let value: figment::value::Value =
                    match (NUMERIC.contains(&key.as_str()), value.trim().parse::<u64>()) {
                        (true, Ok(n)) => n.into(),
                        _ => value.as_str().into(),
                    };
                from_env.insert(key, value);
            } else {
                p.list.push(ConfigProblem {
                    message: suggest_key(&key),
                    key,
                    source: name.clone(),
                });
            }
        }
        figment = figment.merge(Serialized::defaults(from_env));
        figment = figment.merge(Serialized::defaults(FlagValues::from(self.flags)));

        macro_rules! each_field {
            ($($name:ident),* $(,)?) => {
                Raw { $($name: p.field(&figment, stringify!($name)),)* }
            };
        }
        each_field!(
            listen,
            policies,
            env,
            redis_url,
            redis_tls_ca_file,
            redis_tls_cert_file,
            redis_tls_key_file,
            store_timeout_ms,
            store_clock,
            expected_nodes,
            deny_cache_keys,
            redis_batch_max,
            memory_max_keys,
            breaker_failures,
            breaker_max_backoff_ms,
            admin_listen,
            admin_token,
            trusted_proxies,
            key_secret,
            upstream,
            header_families,
            user_header,
            api_key_header,
            jwt_algorithm,
            jwt_secret,
            jwt_public_key_file,
            jwt_issuer,
            jwt_audience,
            jwt_user_claim,
            max_body_bytes,
            log_format,
            cedar_cache_ttl_ms,
            cedar_cache_size,
            metrics_on_main,
            clickhouse_url,
            clickhouse_database,
            clickhouse_spool_dir,
            clickhouse_spool_max_mb,
            clickhouse_sample_allows,
            clickhouse_tenant_header,
            clickhouse_truncate_ip,
            clickhouse_migrate,
        )
    }

    /// Where the value of `key` came from: a flag, a variable, the file's line, the default.
    fn source(&self, key: &str) -> String {
        if flag_set(self.flags, key) {
            return format!("--{}", key.replace('_', "-"));
        }
        let var = format!("TOLLGATE_{}", key.to_ascii_uppercase());
        if self.vars.iter().any(|(k, _)| *k == var) {
            return var;
        }
        if let Some((path, text)) = &self.file
            && toml_keys(text).iter().any(|k| k == key)
        {
            return format!("{}:{}", path.display(), line_of(text, key));
        }
        "default".to_owned()
    }
}

/// The problems found so far, each told where its value came from.
struct Problems<'s> {
    sources: &'s Sources<'s>,
    list: Vec<ConfigProblem>,
}

impl Problems<'_> {
    fn add(&mut self, key: &str, message: String) {
        self.list.push(ConfigProblem {
            key: key.to_owned(),
            source: self.sources.source(key),
            message,
        });
    }

    /// One field of the merged settings, or `None` and a problem.
    fn field<T: serde::de::DeserializeOwned>(&mut self, figment: &Figment, key: &str) -> Option<T> {
        figment.extract_inner::<Option<T>>(key).unwrap_or_else(|e| {
            self.add(key, first_line(&e.to_string()));
            None
        })
    }
}

/// Where the certificates for TLS to Redis are, and what they hold, read now so that a
/// missing file stops the start.
fn redis_tls(
    url: Option<&str>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    problem: &mut impl FnMut(&str, String),
) -> Option<(
    crate::store::redis::RedisTls,
    crate::store::redis::RedisTlsFiles,
)> {
    if ca_file.is_none() && cert_file.is_none() && key_file.is_none() {
        return None;
    }
    if !url.is_some_and(|u| u.starts_with("rediss")) {
        let key = match (&ca_file, &cert_file) {
            (Some(_), _) => "redis_tls_ca_file",
            (None, Some(_)) => "redis_tls_cert_file",
            (None, None) => "redis_tls_key_file",
        };
        problem(
            key,
            "applies to TLS only: use a `rediss://` or `rediss+cluster://` redis_url".to_owned(),
        );
        return None;
    }
    let files = crate::store::redis::RedisTlsFiles {
        ca: ca_file.map(PathBuf::from),
        cert: cert_file.map(PathBuf::from),
        key: key_file.map(PathBuf::from),
    };
    match files.read() {
        Ok(tls) => Some((tls, files)),
        Err(problems) => {
            for (key, message) in problems {
                problem(key, message);
            }
            None
        }
    }
}

fn jwt_settings(
    algorithm: Option<String>,
    secret: Option<String>,
    public_key_file: Option<String>,
    issuer: Option<String>,
    audience: Option<String>,
    user_claim: Option<String>,
    problem: &mut impl FnMut(&str, String),
) -> Option<JwtSettings> {
    use jsonwebtoken::Algorithm as A;
    if secret.is_none() && public_key_file.is_none() {
        if algorithm.is_some() {
            problem(
                "jwt_algorithm",
                "set `jwt_secret` or `jwt_public_key_file` too".to_owned(),
            );
        }
        return None;
    }
    let name =
        algorithm.unwrap_or_else(|| if secret.is_some() { "HS256" } else { "RS256" }.to_owned());
    let Ok(alg) = name.to_ascii_uppercase().parse::<A>() else {
        problem(
            "jwt_algorithm",
            format!("`{name}` is not a JWT algorithm (HS256, RS256, ES256, EdDSA, …)"),
        );
        return None;
    };
    let hmac = matches!(alg, A::HS256 | A::HS384 | A::HS512);
    let key = match (secret, public_key_file) {
        (Some(_), Some(_)) => {
            problem(
                "jwt_secret",
                "set either `jwt_secret` or `jwt_public_key_file`, not both".to_owned(),
            );
            return None;
        }
        (Some(s), None) if hmac => JwtKey::Secret(s.into_bytes()),
        (None, Some(path)) if !hmac => match std::fs::read(&path) {
            Ok(pem) => JwtKey::PublicKeyPem(pem),
            Err(e) => {
                problem("jwt_public_key_file", format!("cannot read `{path}`: {e}"));
                return None;
            }
        },
        _ => {
            problem(
                "jwt_algorithm",
                format!(
                    "`{name}` needs {}",
                    if hmac {
                        "`jwt_secret`"
                    } else {
                        "`jwt_public_key_file`"
                    }
                ),
            );
            return None;
        }
    };
    Some(JwtSettings {
        algorithm: alg,
        key,
        issuer,
        audience,
        user_claim: user_claim.unwrap_or_else(|| "sub".to_owned()),
    })
}

/// Flag values in the shape of the file, for merging last.
#[derive(Debug, Default, Serialize)]
struct FlagValues {
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policies: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<String>,
}

impl From<&Flags> for FlagValues {
    fn from(flags: &Flags) -> Self {
        FlagValues {
            listen: flags.listen.clone(),
            policies: flags.policies.as_ref().map(|p| p.display().to_string()),
            upstream: flags.upstream.clone(),
        }
    }
}

fn flag_set(flags: &Flags, key: &str) -> bool {
    match key {
        "listen" => flags.listen.is_some(),
        "policies" => flags.policies.is_some(),
        "upstream" => flags.upstream.is_some(),
        _ => false,
    }
}

/// The top-level keys of a TOML text (what parses of it).
fn toml_keys(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if line.starts_with('#') || line.starts_with('[') {
                return None;
            }
            let (key, _) = line.split_once('=')?;
            Some(key.trim().trim_matches('"').to_owned())
        })
        .collect()
}

/// The line a key is set on, 1-based.
fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

fn suggest_key(key: &str) -> String {
    match crate::diagnostic::did_you_mean(key, KEYS) {
        Some(help) => format!("unknown setting; {help}"),
        None => "unknown setting".to_owned(),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unknown-key check and the fields read must name the same settings.
    #[test]
    fn every_setting_is_a_known_key() {
        let raw = serde_json::to_value(Raw::default()).unwrap();
        let mut fields: Vec<&str> = raw
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut keys = KEYS.to_vec();
        fields.sort_unstable();
        keys.sort_unstable();
        assert_eq!(fields, keys);
        assert!(NUMERIC.iter().all(|k| KEYS.contains(k)));
    }
}
