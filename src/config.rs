//! Settings for `tollgate serve`: defaults, then a TOML file, then `TOLLGATE_*` variables,
//! then flags, each overriding the one before. Every invalid value is reported at once,
//! naming where it came from, and the server does not start.

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

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
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
    /// Per-call store timeout, in milliseconds.
    pub store_timeout_ms: u64,
    /// Whose clock the Redis store counts with: this node's, or Redis's (`TIME`).
    pub store_clock: StoreClock,
    /// Nodes sharing the quotas: a limit with `on_store_error local` counts `limit / nodes`
    /// in each node's memory while the store fails.
    pub expected_nodes: u64,
    /// Keys whose rejections are remembered locally (0: no deny cache).
    pub deny_cache_keys: usize,
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
];

/// Settings whose values are numbers.
const NUMERIC: &[&str] = &[
    "store_timeout_ms",
    "expected_nodes",
    "deny_cache_keys",
    "memory_max_keys",
    "breaker_failures",
    "breaker_max_backoff_ms",
    "max_body_bytes",
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
    pub fn load_from(
        flags: &Flags,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with("TOLLGATE_"))
            .collect();
        let mut problems = Vec::new();
        let file_text = match &flags.config {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => Some((path.clone(), text)),
                Err(e) => {
                    problems.push(ConfigProblem {
                        key: "config".into(),
                        source: "--config".into(),
                        message: format!("cannot read `{}`: {e}", path.display()),
                    });
                    None
                }
            },
            None => None,
        };

        let mut figment = Figment::from(Serialized::defaults(Raw::default()));
        if let Some((path, text)) = &file_text {
            figment = figment.merge(Toml::string(text));
            for key in toml_keys(text) {
                if !KEYS.contains(&key.as_str()) {
                    problems.push(ConfigProblem {
                        source: format!("{}:{}", path.display(), line_of(text, &key)),
                        message: suggest_key(&key),
                        key,
                    });
                }
            }
        }
        // Variables of ours that name no setting are reported: a typo would otherwise be
        // silently ignored. Values stay text (a numeric token is still a token), except for
        // the numeric settings.
        let mut from_env = figment::value::Dict::new();
        for (name, value) in &vars {
            let key = name.trim_start_matches("TOLLGATE_").to_ascii_lowercase();
            if KEYS.contains(&key.as_str()) {
                let value: figment::value::Value =
                    match (NUMERIC.contains(&key.as_str()), value.trim().parse::<u64>()) {
                        (true, Ok(n)) => n.into(),
                        _ => value.as_str().into(),
                    };
                from_env.insert(key, value);
            } else {
                problems.push(ConfigProblem {
                    message: suggest_key(&key),
                    key,
                    source: name.clone(),
                });
            }
        }
        figment = figment.merge(Serialized::defaults(from_env));
        figment = figment.merge(Serialized::defaults(FlagValues::from(flags)));

        let source = |key: &str| -> String {
            if flag_set(flags, key) {
                return format!("--{}", key.replace('_', "-"));
            }
            let var = format!("TOLLGATE_{}", key.to_ascii_uppercase());
            if vars.iter().any(|(k, _)| *k == var) {
                return var;
            }
            if let Some((path, text)) = &file_text
                && toml_keys(text).iter().any(|k| k == key)
            {
                return format!("{}:{}", path.display(), line_of(text, key));
            }
            "default".to_owned()
        };
        let mut problem = |key: &str, message: String| {
            problems.push(ConfigProblem {
                key: key.to_owned(),
                source: source(key),
                message,
            })
        };

        // Each field alone, so that one bad value does not hide the next.
        macro_rules! field {
            ($key:literal, $ty:ty) => {
                match figment.extract_inner::<Option<$ty>>($key) {
                    Ok(v) => v,
                    Err(e) => {
                        problem($key, first_line(&e.to_string()));
                        None
                    }
                }
            };
        }
        let listen = field!("listen", String);
        let policies = field!("policies", String);
        let env = field!("env", String);
        let redis_url = field!("redis_url", String);
        let redis_tls_ca_file = field!("redis_tls_ca_file", String);
        let redis_tls_cert_file = field!("redis_tls_cert_file", String);
        let redis_tls_key_file = field!("redis_tls_key_file", String);
        let store_timeout_ms = field!("store_timeout_ms", u64);
        let store_clock = field!("store_clock", String);
        let expected_nodes = field!("expected_nodes", u64);
        let deny_cache_keys = field!("deny_cache_keys", usize);
        let memory_max_keys = field!("memory_max_keys", usize);
        let breaker_failures = field!("breaker_failures", u32);
        let breaker_max_backoff_ms = field!("breaker_max_backoff_ms", u64);
        let admin_listen = field!("admin_listen", String);
        let admin_token = field!("admin_token", String);
        let trusted_proxies = field!("trusted_proxies", StringList);
        let key_secret = field!("key_secret", String);
        let upstream = field!("upstream", String);
        let header_families = field!("header_families", StringList);
        let user_header = field!("user_header", String);
        let api_key_header = field!("api_key_header", String);
        let jwt_algorithm = field!("jwt_algorithm", String);
        let jwt_secret = field!("jwt_secret", String);
        let jwt_public_key_file = field!("jwt_public_key_file", String);
        let jwt_issuer = field!("jwt_issuer", String);
        let jwt_audience = field!("jwt_audience", String);
        let jwt_user_claim = field!("jwt_user_claim", String);
        let max_body_bytes = field!("max_body_bytes", usize);
        let log_format = field!("log_format", String);

        let mut addr = |key: &str, value: Option<String>, default: &str| -> SocketAddr {
            let text = value.unwrap_or_else(|| default.to_owned());
            text.parse().unwrap_or_else(|_| {
                problem(
                    key,
                    format!("`{text}` is not an address like `127.0.0.1:8080`"),
                );
                default
                    .parse()
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
            })
        };
        let listen = addr("listen", listen, "127.0.0.1:8080");
        let admin_listen = addr("admin_listen", admin_listen, "127.0.0.1:9091");

        let env = match env.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("dev") => Environment::Dev,
            Some("prod") => Environment::Prod,
            Some(other) => {
                problem("env", format!("`{other}` is not `dev` or `prod`"));
                Environment::Dev
            }
        };
        let log_format = match log_format.as_deref() {
            None | Some("pretty") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                problem("log_format", format!("`{other}` is not `pretty` or `json`"));
                LogFormat::Pretty
            }
        };

        let policies = PathBuf::from(policies.unwrap_or_else(|| "policies".to_owned()));
        if !policies.exists() {
            problem(
                "policies",
                format!("`{}` does not exist", policies.display()),
            );
        }

        let store_timeout_ms = store_timeout_ms.unwrap_or(50);
        if store_timeout_ms == 0 || store_timeout_ms > 10_000 {
            problem(
                "store_timeout_ms",
                format!("{store_timeout_ms} is not between 1 and 10000"),
            );
        }

        if let Some(url) = &redis_url {
            let schemes = [
                "redis://",
                "rediss://",
                "redis+cluster://",
                "rediss+cluster://",
                "unix://",
                "redis+unix://",
            ];
            if !schemes.iter().any(|s| url.starts_with(s)) {
                problem(
                    "redis_url",
                    "not a Redis URL: use `redis://host:port/db`, `redis+cluster://host:port,host:port` (`rediss` for TLS) or `unix:///path/to/redis.sock`".to_owned(),
                );
            } else if url.ends_with("#insecure") {
                problem(
                    "redis_url",
                    "certificate checks cannot be turned off (`#insecure`): give the CA in `redis_tls_ca_file`".to_owned(),
                );
            }
        }
        let redis_tls = redis_tls(
            redis_url.as_deref(),
            redis_tls_ca_file,
            redis_tls_cert_file,
            redis_tls_key_file,
            &mut problem,
        );
        let store_clock = match store_clock
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("local") => StoreClock::Local,
            Some("redis") => StoreClock::Redis,
            Some(other) => {
                problem(
                    "store_clock",
                    format!("`{other}` is not `local` or `redis`"),
                );
                StoreClock::Local
            }
        };
        let expected_nodes = expected_nodes.unwrap_or(1);
        if !(1..=10_000).contains(&expected_nodes) {
            problem(
                "expected_nodes",
                format!("{expected_nodes} is not between 1 and 10000"),
            );
        }
        let deny_cache_keys = deny_cache_keys.unwrap_or(100_000);
        let memory_max_keys = memory_max_keys.unwrap_or(crate::store::memory::DEFAULT_MAX_KEYS);
        if memory_max_keys < 1_000 {
            problem(
                "memory_max_keys",
                format!("{memory_max_keys} is below 1000: every client would evict another"),
            );
        }
        let breaker_failures = breaker_failures.unwrap_or(3);
        if breaker_failures == 0 {
            problem("breaker_failures", "must be at least 1".to_owned());
        }
        let breaker_max_backoff_ms = breaker_max_backoff_ms.unwrap_or(1_000);
        if !(1..=600_000).contains(&breaker_max_backoff_ms) {
            problem(
                "breaker_max_backoff_ms",
                format!("{breaker_max_backoff_ms} is not between 1 and 600000"),
            );
        }

        let mut proxies = Vec::new();
        for item in trusted_proxies.map(|l| l.items()).unwrap_or_default() {
            match item
                .parse::<IpNet>()
                .ok()
                .or_else(|| item.parse::<std::net::IpAddr>().ok().map(IpNet::from))
            {
                Some(net) => proxies.push(net),
                None => problem(
                    "trusted_proxies",
                    format!("`{item}` is not an address or a network like `10.0.0.0/8`"),
                ),
            }
        }

        let upstream = upstream.and_then(|u| match u.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some() =>
            {
                Some(uri)
            }
            _ => {
                problem(
                    "upstream",
                    format!("`{u}` is not an http(s) URL like `http://127.0.0.1:3000`"),
                );
                None
            }
        });

        let (mut legacy_headers, mut ietf_headers) = (true, true);
        if let Some(families) = header_families {
            (legacy_headers, ietf_headers) = (false, false);
            for family in families.items() {
                match family.to_ascii_lowercase().as_str() {
                    "x-ratelimit" => legacy_headers = true,
                    "ietf" => ietf_headers = true,
                    other => problem(
                        "header_families",
                        format!("`{other}` is not `x-ratelimit` or `ietf`"),
                    ),
                }
            }
        }

        let mut header = |key: &str, value: Option<String>| -> Option<HeaderName> {
            let value = value?;
            HeaderName::from_bytes(value.trim().as_bytes())
                .map_err(|_| problem(key, format!("`{value}` is not a header name")))
                .ok()
        };
        let user_header = header("user_header", user_header);
        let api_key_header = header("api_key_header", api_key_header)
            .unwrap_or(HeaderName::from_static("x-api-key"));

        let jwt = jwt_settings(
            jwt_algorithm,
            jwt_secret,
            jwt_public_key_file,
            jwt_issuer,
            jwt_audience,
            jwt_user_claim,
            &mut problem,
        );

        if env == Environment::Prod {
            if redis_url.is_none() {
                problem(
                    "redis_url",
                    "production needs a shared store: set TOLLGATE_REDIS_URL".to_owned(),
                );
            }
            if key_secret.is_none() {
                problem(
                    "key_secret",
                    "production needs a key secret, so that hashed tokens agree across nodes and restarts".to_owned(),
                );
            }
        }
        if let Some(secret) = &key_secret
            && secret.len() < 16
        {
            problem("key_secret", "use at least 16 characters".to_owned());
        }
        if let Some(token) = &admin_token
            && token.len() < 16
        {
            problem("admin_token", "use at least 16 characters".to_owned());
        }
        let max_body_bytes = max_body_bytes.unwrap_or(64 * 1024);
        if max_body_bytes == 0 {
            problem("max_body_bytes", "must be at least 1".to_owned());
        }

        if !problems.is_empty() {
            return Err(ConfigError(problems));
        }
        Ok(Settings {
            listen,
            policies,
            env,
            redis_url,
            redis_tls,
            store_timeout_ms,
            store_clock,
            expected_nodes,
            deny_cache_keys,
            memory_max_keys,
            breaker_failures,
            breaker_max_backoff_ms,
            admin_listen,
            admin_token,
            trusted_proxies: proxies,
            key_secret,
            upstream,
            legacy_headers,
            ietf_headers,
            user_header,
            api_key_header,
            jwt,
            max_body_bytes,
            log_format,
        })
    }
}

/// The certificates for TLS to Redis, read now so that a missing file stops the start.
fn redis_tls(
    url: Option<&str>,
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
    problem: &mut impl FnMut(&str, String),
) -> Option<crate::store::redis::RedisTls> {
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
    let mut read = |key: &str, path: Option<String>, marker: &str, what: &str| {
        let path = path?;
        match std::fs::read(&path) {
            Ok(pem) if pem.windows(marker.len()).any(|w| w == marker.as_bytes()) => Some(pem),
            Ok(_) => {
                problem(key, format!("`{path}` holds no PEM {what}"));
                None
            }
            Err(e) => {
                problem(key, format!("cannot read `{path}`: {e}"));
                None
            }
        }
    };
    let ca_pem = read(
        "redis_tls_ca_file",
        ca_file,
        "-----BEGIN CERTIFICATE-----",
        "certificate",
    );
    let (has_cert, has_key) = (cert_file.is_some(), key_file.is_some());
    let cert = read(
        "redis_tls_cert_file",
        cert_file,
        "-----BEGIN CERTIFICATE-----",
        "certificate",
    );
    let key = read(
        "redis_tls_key_file",
        key_file,
        "PRIVATE KEY-----",
        "private key",
    );
    let client = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        _ if has_cert != has_key => {
            let missing = if has_cert {
                "redis_tls_key_file"
            } else {
                "redis_tls_cert_file"
            };
            problem(
                missing,
                "a client certificate needs both `redis_tls_cert_file` and `redis_tls_key_file`"
                    .to_owned(),
            );
            None
        }
        _ => None,
    };
    Some(crate::store::redis::RedisTls { ca_pem, client })
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
    let close = KEYS
        .iter()
        .map(|k| (strsim::jaro_winkler(key, k), *k))
        .filter(|(s, _)| *s > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match close {
        Some((_, k)) => format!("unknown setting; did you mean `{k}`?"),
        None => "unknown setting".to_owned(),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_owned()
}
