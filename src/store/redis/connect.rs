//! Reaching Redis: the store's options, TLS material, and the connection — one server (a
//! multiplexed [`ConnectionManager`]) or a Cluster — from a URL.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use super::sentinel::SentinelTarget;
use super::{BreakerSettings, backend};
use crate::store::StoreError;

/// How the store talks to Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// The most one call may take before it counts as failed (default 50 ms).
    pub timeout: Duration,
    /// The most connecting may take (default 1 s).
    pub connect_timeout: Duration,
    /// Read the time from Redis (`TIME`) instead of the engine's clock, so that nodes with
    /// skewed clocks agree. Calendar quotas still take their period from the engine's clock.
    pub server_time: bool,
    /// When to stop calling a failing Redis, and how to probe it again.
    pub breaker: BreakerSettings,
    /// Remember rejections locally until they end, for up to this many keys (`None`: off).
    pub deny_cache: Option<usize>,
    /// Certificates for `rediss://` URLs (`None`: the system's roots, no client certificate).
    pub tls: Option<RedisTls>,
    /// The most requests decided in one call (default 64): requests that arrive while a call
    /// to their server (Cluster: their slot) is in flight wait for it and go out together in
    /// the next one. 1: every request is its own call, sent at once.
    pub batch_max: usize,
    /// The sentinels' password, for `redis+sentinel://` URLs whose sentinels require one (the
    /// URL's credentials are the master's).
    pub sentinel_password: Option<Password>,
    /// This node's region and the other regions, for limits counted across regions
    /// (`global;`); `None`: one region.
    pub regions: Option<super::RegionSettings>,
}

/// A password: shown as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps `text`.
    pub fn new(text: impl Into<String>) -> Self {
        Password(text.into())
    }

    pub(super) fn reveal(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// Certificates for TLS to Redis, in PEM.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RedisTls {
    /// The CA that signed the servers' certificates, instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its private key, for servers that require one
    /// (`tls-auth-clients yes`).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

impl RedisTls {
    pub(super) fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca_pem.clone(),
        }
    }
}

/// Where the certificates for TLS to Redis are read from (`redis_tls_ca_file`,
/// `redis_tls_cert_file`, `redis_tls_key_file`): read at start-up, and again when they
/// change (a rotated certificate is picked up without a restart).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RedisTlsFiles {
    /// The CA that signed the servers' certificates.
    pub ca: Option<std::path::PathBuf>,
    /// The client certificate.
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key.
    pub key: Option<std::path::PathBuf>,
}

impl RedisTlsFiles {
    /// The files' paths, to watch.
    pub fn paths(&self) -> Vec<std::path::PathBuf> {
        [&self.ca, &self.cert, &self.key]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }

    /// Reads the certificates; every problem, each with the setting it is about.
    pub fn read(&self) -> Result<RedisTls, Vec<(&'static str, String)>> {
        let mut problems = Vec::new();
        let mut read = |key: &'static str,
                        path: &Option<std::path::PathBuf>,
                        marker: &str,
                        what: &str| {
            let path = path.as_ref()?;
            match std::fs::read(path) {
                Ok(pem) if pem.windows(marker.len()).any(|w| w == marker.as_bytes()) => Some(pem),
                Ok(_) => {
                    problems.push((key, format!("`{}` holds no PEM {what}", path.display())));
                    None
                }
                Err(e) => {
                    problems.push((key, format!("cannot read `{}`: {e}", path.display())));
                    None
                }
            }
        };
        const CERTIFICATE: &str = "-----BEGIN CERTIFICATE-----";
        let ca_pem = read("redis_tls_ca_file", &self.ca, CERTIFICATE, "certificate");
        let cert = read(
            "redis_tls_cert_file",
            &self.cert,
            CERTIFICATE,
            "certificate",
        );
        let key = read(
            "redis_tls_key_file",
            &self.key,
            "PRIVATE KEY-----",
            "private key",
        );
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            _ if self.cert.is_some() != self.key.is_some() => {
                let missing = if self.cert.is_some() {
                    "redis_tls_key_file"
                } else {
                    "redis_tls_cert_file"
                };
                problems.push((
                    missing,
                    "a client certificate needs both `redis_tls_cert_file` and `redis_tls_key_file`"
                        .to_owned(),
                ));
                None
            }
            _ => None,
        };
        if problems.is_empty() {
            Ok(RedisTls { ca_pem, client })
        } else {
            Err(problems)
        }
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(1),
            server_time: false,
            breaker: BreakerSettings::default(),
            deny_cache: Some(100_000),
            tls: None,
            batch_max: 64,
            sentinel_password: None,
            regions: None,
        }
    }
}

/// One server or a Cluster, behind one connection interface.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(cmd, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// A connection to `url` with `tls` (for `rediss` URLs), within `options.connect_timeout`;
/// behind Sentinel, also the master's `host:port`.
pub(super) async fn open(
    url: &str,
    options: &RedisOptions,
    tls: Option<&RedisTls>,
) -> Result<(Connection, Option<String>), StoreError> {
    let wait = options.connect_timeout;
    let secure = url.starts_with("rediss");
    let tls = tls.filter(|_| secure);
    if secure {
        // rustls picks its crypto from the process default: make it ring (the one compiled
        // in). An error only says a default is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let connecting = async {
        match target(url)? {
            Target::Single(url) => {
                let client = match tls {
                    Some(tls) => redis::Client::build_with_tls(url.as_str(), tls.certificates()),
                    None => redis::Client::open(url.as_str()),
                }
                .map_err(backend)?;
                Ok((manager(client, options).await?, None))
            }
            Target::Sentinel(target) => {
                let (connection, master) = super::sentinel::open(&target, options, tls).await?;
                Ok((connection, Some(master)))
            }
            Target::Cluster(seeds) => {
                let mut builder = ClusterClientBuilder::new(seeds);
                if let Some(tls) = tls {
                    builder = builder.certs(tls.certificates());
                }
                let client = builder
                    .connection_timeout(wait)
                    .response_timeout(options.timeout)
                    .retries(3)
                    .min_retry_wait(5)
                    .max_retry_wait(50)
                    .build()
                    .map_err(backend)?;
                client
                    .get_async_connection()
                    .await
                    .map(|c| (Connection::Cluster(c), None))
                    .map_err(backend)
            }
        }
    };
    tokio::time::timeout(wait, connecting)
        .await
        .map_err(|_| StoreError::Timeout(wait))?
}

/// A multiplexed connection to one server that reconnects after errors (one attempt per
/// call: reconnecting is the breaker's job).
pub(super) async fn manager(
    client: redis::Client,
    options: &RedisOptions,
) -> Result<Connection, StoreError> {
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_connection_timeout(Some(options.connect_timeout))
        .set_response_timeout(None);
    ConnectionManager::new_with_config(client, config)
        .await
        .map(Connection::Single)
        .map_err(backend)
}

/// Where a URL points: one server, a Cluster's seed nodes, or the sentinels of a master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    Single(String),
    Cluster(Vec<String>),
    Sentinel(SentinelTarget),
}

/// `redis://…` (or `rediss://…`, `unix://…`) names one server;
/// `redis+cluster://[auth@]h1:p1,h2:p2` (or `rediss+cluster://…`) a Cluster, by any of its
/// nodes; `redis+sentinel://[auth@]h1:p1,h2:p2/service[/db]` (or `rediss+sentinel://…`) the
/// master the sentinels `h1:p1`… name `service`.
pub(super) fn target(url: &str) -> Result<Target, StoreError> {
    if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        return SentinelTarget::parse(rest, false).map(Target::Sentinel);
    }
    if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
        return SentinelTarget::parse(rest, true).map(Target::Sentinel);
    }
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return Ok(Target::Single(url.to_owned()));
    };
    let (auth, hosts) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    let seeds: Vec<String> = hosts
        .trim_end_matches('/')
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{auth}{h}"))
        .collect();
    if seeds.is_empty() {
        return Err(StoreError::Backend(format!(
            "`{scheme}+cluster://` needs at least one host:port"
        )));
    }
    Ok(Target::Cluster(seeds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_server_or_a_cluster() {
        assert_eq!(
            target("redis://h:1/0").unwrap(),
            Target::Single("redis://h:1/0".to_owned())
        );
        assert_eq!(
            target("redis+cluster://u:p@a:1, b:2").unwrap(),
            Target::Cluster(vec![
                "redis://u:p@a:1".to_owned(),
                "redis://u:p@b:2".to_owned()
            ])
        );
        assert_eq!(
            target("rediss+cluster://a:1,b:2").unwrap(),
            Target::Cluster(vec!["rediss://a:1".to_owned(), "rediss://b:2".to_owned()])
        );
        assert_eq!(
            target("rediss://h:1").unwrap(),
            Target::Single("rediss://h:1".to_owned())
        );
        assert!(target("redis+cluster://").is_err());
        assert!(target("rediss+cluster://").is_err());
    }
}
