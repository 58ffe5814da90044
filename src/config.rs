//! Settings for `tollgate serve`: defaults, then a TOML file, then `TOLLGATE_*` variables,
//! then flags, each overriding the one before. Every invalid value is reported at once,
//! naming where it came from, and the server does not start.

mod raw;
mod read;
mod regions;

use std::net::SocketAddr;
use std::path::PathBuf;

use http::HeaderName;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use self::raw::{Problems, Sources};
pub use crate::telemetry::LogFormat;

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
    /// The sentinels' password (`redis+sentinel://` URLs; the URL's credentials are the
    /// master's).
    pub redis_sentinel_password: Option<crate::store::redis::Password>,
    /// This node's region and the others, for limits counted across regions (`global;`).
    pub regions: Option<crate::store::redis::RegionSettings>,
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
    /// Address of Envoy's gRPC rate-limit service (off when unset).
    pub grpc_listen: Option<SocketAddr>,
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
        settings.read_analytics(&mut raw, &mut problems);
        settings.read_store(&mut raw, &mut problems);
        settings.read_regions(&mut raw, &mut problems);
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
            redis_sentinel_password: None,
            regions: None,
            store_timeout_ms: 50,
            store_clock: StoreClock::Local,
            expected_nodes: 1,
            deny_cache_keys: 100_000,
            redis_batch_max: 64,
            memory_max_keys: crate::store::memory::DEFAULT_MAX_KEYS,
            breaker_failures: 3,
            breaker_max_backoff_ms: 1_000,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            grpc_listen: None,
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
