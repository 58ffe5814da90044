//! Reading each group of settings from what was written, one function per group; every
//! problem joins one list.

use std::net::SocketAddr;
use std::path::PathBuf;

use http::HeaderName;

use super::raw::{BoolText, Problems, Raw};
use super::{Environment, JwtKey, JwtSettings, LogFormat, Settings, StoreClock};

impl Settings {
    /// Listeners, the environment and the log format, then the paths and the input bounds.
    pub(super) fn read_server(&mut self, raw: &mut Raw, p: &mut Problems) {
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
        if let Some(text) = raw.grpc_listen.take() {
            let mut grpc = SocketAddr::from(([127, 0, 0, 1], 0));
            addr("grpc_listen", Some(text), &mut grpc);
            self.grpc_listen = Some(grpc);
        }

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
        self.read_paths(raw, p);
        self.read_input_bounds(raw, p);
    }

    /// The ClickHouse export: where, which database, the spool, sampling, truncation.
    pub(super) fn read_analytics(&mut self, raw: &mut Raw, p: &mut Problems) {
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
    }

    /// The policy directory, the upstream, the admin token.
    fn read_paths(&mut self, raw: &mut Raw, p: &mut Problems) {
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
    }

    /// Limits on input: the largest body, the Cedar answer cache.
    fn read_input_bounds(&mut self, raw: &mut Raw, p: &mut Problems) {
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
    pub(super) fn read_store(&mut self, raw: &mut Raw, p: &mut Problems) {
        self.redis_url = raw.redis_url.take();
        if let Some(url) = &self.redis_url {
            if !REDIS_SCHEMES.iter().any(|s| url.starts_with(s)) {
                p.add(
                    "redis_url",
                    "not a Redis URL: use `redis://host:port/db`, `redis+cluster://host:port,host:port`, `redis+sentinel://host:port,host:port/service` (`rediss` for TLS) or `unix:///path/to/redis.sock`".to_owned(),
                );
            } else if let Err(e) = crate::store::redis::check_url(url) {
                p.add("redis_url", e.to_string());
            } else if url.ends_with("#insecure") {
                p.add(
                    "redis_url",
                    "certificate checks cannot be turned off (`#insecure`): give the CA in `redis_tls_ca_file`".to_owned(),
                );
            }
        }
        self.redis_sentinel_password = raw
            .redis_sentinel_password
            .take()
            .map(crate::store::redis::Password::new);
        if self.redis_sentinel_password.is_some()
            && !self
                .redis_url
                .as_deref()
                .is_some_and(|u| u.contains("+sentinel://"))
        {
            p.add(
                "redis_sentinel_password",
                "applies to Sentinel only: use a `redis+sentinel://` redis_url".to_owned(),
            );
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
    pub(super) fn read_identity(&mut self, raw: &mut Raw, p: &mut Problems) {
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
    pub(super) fn read_headers(&mut self, raw: &mut Raw, p: &mut Problems) {
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
}

const REDIS_SCHEMES: &[&str] = &[
    "redis://",
    "rediss://",
    "redis+cluster://",
    "rediss+cluster://",
    "redis+sentinel://",
    "rediss+sentinel://",
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
pub(super) fn keyword<T: Copy>(
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
