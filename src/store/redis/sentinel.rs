//! Redis behind Sentinel: the master discovered through the sentinels (asked in order, the
//! server they name checked with `ROLE`, as Sentinel's guidelines for clients describe), and
//! followed when they fail it over.
//!
//! Following needs no subscription: after a failover the old master is either gone (calls
//! fail) or demoted (writes answer `READONLY`), so every failed call wakes a re-query, at most
//! one per [`REQUERY_GAP`]; a re-query every [`POLL`] also catches a switch nothing failed
//! on. When the sentinels name another master, a connection to it is opened and checked
//! before it is swapped in, and the breakers are closed: the failures they counted were the
//! old master's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use super::breaker::Breaker;
use super::connect::{Connection, Password, RedisOptions, RedisTls, manager};
use super::{Link, backend};
use crate::store::StoreError;

/// The longest a switch nothing failed on goes unnoticed.
pub(super) const POLL: Duration = Duration::from_secs(1);
/// The shortest time between two re-queries woken by failures.
const REQUERY_GAP: Duration = Duration::from_millis(100);

/// `redis+sentinel://[user:pass@]host:port[,host:port…]/service[/db]`, read.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct SentinelTarget {
    /// The sentinels, as `(host, port)`.
    pub(super) sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the master under.
    pub(super) service: String,
    pub(super) db: i64,
    /// The master's credentials (the URL's); the sentinels' come from
    /// [`RedisOptions::sentinel_password`].
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    /// `rediss+sentinel://`: TLS to the sentinels and to the master.
    pub(super) tls: bool,
}

impl std::fmt::Debug for SentinelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelTarget")
            .field("sentinels", &self.sentinels)
            .field("service", &self.service)
            .field("db", &self.db)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

fn invalid(why: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{why}"))
}

fn decoded(text: &str) -> Result<String, StoreError> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| invalid("the credentials of a `redis+sentinel://` URL are not UTF-8"))
}

impl SentinelTarget {
    /// Reads what follows `redis+sentinel://` (`tls`: `rediss+sentinel://`).
    pub(super) fn parse(rest: &str, tls: bool) -> Result<SentinelTarget, StoreError> {
        const FORM: &str = "use `redis+sentinel://[user:pass@]host:port[,host:port…]/service[/db]`";
        let (auth, rest) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let sentinels = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| {
                let (host, port) = h
                    .rsplit_once(':')
                    .map_or((h, Some(26_379)), |(host, port)| (host, port.parse().ok()));
                match port {
                    Some(port) if !host.is_empty() => Ok((host.to_owned(), port)),
                    _ => Err(invalid(format_args!("`{h}` is not a sentinel's host:port"))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if sentinels.is_empty() {
            return Err(invalid(format_args!("no sentinel in the URL: {FORM}")));
        }
        let mut parts = path.trim_end_matches('/').split('/');
        let service = parts.next().filter(|s| !s.is_empty());
        let Some(service) = service else {
            return Err(invalid(format_args!(
                "the URL names no service (the master's name in the sentinels): {FORM}"
            )));
        };
        let db = match parts.next() {
            None => 0,
            Some(db) => db
                .parse()
                .map_err(|_| invalid(format_args!("`{db}` is not a database number: {FORM}")))?,
        };
        if parts.next().is_some() {
            return Err(invalid(format_args!("too many path segments: {FORM}")));
        }
        let (username, password) = match auth {
            None => (None, None),
            Some(auth) => match auth.split_once(':') {
                Some((user, pass)) => (
                    Some(decoded(user)?).filter(|u| !u.is_empty()),
                    Some(decoded(pass)?),
                ),
                None => (Some(decoded(auth)?), None),
            },
        };
        Ok(SentinelTarget {
            sentinels,
            service: decoded(service)?,
            db,
            username,
            password,
            tls,
        })
    }

    /// Asks the sentinels, in order, for the master (`SENTINEL GET-MASTER-ADDR-BY-NAME`) and
    /// checks that the server named says it is one (`ROLE`), as Sentinel's guidelines for
    /// clients describe: a client for it, and its `host:port`. (The `redis` crate's Sentinel
    /// client reads `SENTINEL MASTERS` instead and skips a master still flagged down, which
    /// after a failover can be a second after the sentinels name the new one: measured by
    /// `tests/sentinel.rs`.)
    pub(super) async fn discover(
        &self,
        options: &RedisOptions,
        tls: Option<&RedisTls>,
    ) -> Result<(redis::Client, String), StoreError> {
        let wait = options.connect_timeout;
        tokio::time::timeout(wait, async {
            let mut last = invalid("no sentinel answered");
            for (host, sentinel_port) in &self.sentinels {
                let sentinel = self.client(host, *sentinel_port, None, options, tls)?;
                let named: Result<Option<(String, u16)>, _> = async {
                    let mut c = sentinel.get_multiplexed_async_connection().await?;
                    redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(&self.service)
                        .query_async(&mut c)
                        .await
                }
                .await;
                let (ip, port) = match named {
                    Ok(Some(address)) => address,
                    Ok(None) => {
                        last = invalid(format_args!(
                            "sentinel {host}:{sentinel_port} knows no master `{}`",
                            self.service
                        ));
                        continue;
                    }
                    Err(e) => {
                        last = backend(e);
                        continue;
                    }
                };
                let master = self.client(&ip, port, Some(self.db), options, tls)?;
                let mut c = master
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(backend)?;
                let role: Vec<redis::Value> = redis::cmd("ROLE")
                    .query_async(&mut c)
                    .await
                    .map_err(backend)?;
                let is_master = matches!(
                    role.first(),
                    Some(redis::Value::BulkString(b)) if b.as_slice() == b"master"
                );
                if is_master {
                    return Ok((master, format!("{ip}:{port}")));
                }
                last = invalid(format_args!(
                    "{ip}:{port}, the master sentinel {host}:{sentinel_port} names, is not one (yet)"
                ));
            }
            Err(last)
        })
        .await
        .map_err(|_| StoreError::Timeout(wait))?
    }

    /// A client for `host:port`: the master (`db`: with the URL's credentials and database)
    /// or a sentinel (`None`: with `redis_sentinel_password`), over TLS for `rediss+sentinel`.
    fn client(
        &self,
        host: &str,
        port: u16,
        db: Option<i64>,
        options: &RedisOptions,
        tls: Option<&RedisTls>,
    ) -> Result<redis::Client, StoreError> {
        use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
        let encode = |text: &str| utf8_percent_encode(text, NON_ALPHANUMERIC).to_string();
        let (user, password) = match db {
            Some(_) => (self.username.as_deref(), self.password.as_deref()),
            None => (
                None,
                options.sentinel_password.as_ref().map(Password::reveal),
            ),
        };
        let auth = match (user, password) {
            (None, None) => String::new(),
            (user, password) => format!(
                "{}:{}@",
                user.map(encode).unwrap_or_default(),
                password.map(encode).unwrap_or_default()
            ),
        };
        let scheme = if self.tls { "rediss" } else { "redis" };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let url = format!("{scheme}://{auth}{host}:{port}/{}", db.unwrap_or(0));
        match tls.filter(|_| self.tls) {
            Some(tls) => redis::Client::build_with_tls(url.as_str(), tls.certificates()),
            None => redis::Client::open(url.as_str()),
        }
        .map_err(backend)
    }
}

/// What following a master keeps: which one is in use, how often it changed, and the wake-up
/// failed calls ring.
#[derive(Debug)]
pub(super) struct Follower {
    target: SentinelTarget,
    master: ArcSwap<String>,
    switches: AtomicU64,
    /// The certificates in use (replaced when they rotate).
    tls: ArcSwap<Option<RedisTls>>,
    pub(super) wake: Arc<Notify>,
}

impl Follower {
    pub(super) fn new(target: SentinelTarget, master: String, tls: Option<RedisTls>) -> Self {
        Follower {
            target,
            master: ArcSwap::from_pointee(master),
            switches: AtomicU64::new(0),
            tls: ArcSwap::from_pointee(tls),
            wake: Arc::new(Notify::new()),
        }
    }

    /// The master in use, `host:port`.
    pub(super) fn master(&self) -> String {
        self.master.load().as_ref().clone()
    }

    /// How many times another master was put in use.
    pub(super) fn switches(&self) -> u64 {
        self.switches.load(Ordering::Relaxed)
    }

    /// Discovers with `tls` from now on.
    pub(super) fn set_tls(&self, tls: RedisTls) {
        self.tls.store(Arc::new(Some(tls)));
    }

    /// Follows the master until the store is dropped: a re-query when woken (at most one per
    /// [`REQUERY_GAP`]) or every [`POLL`].
    pub(super) fn start(
        self: &Arc<Self>,
        link: Weak<Link>,
        breakers: Arc<[Breaker]>,
        options: RedisOptions,
    ) {
        let follower = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = follower.wake.notified() => {}
                    () = tokio::time::sleep(POLL) => {}
                }
                let Some(link) = link.upgrade() else { return };
                if let Err(e) = follower.follow(&link, &breakers, &options).await {
                    tracing::debug!(error = %e, "asking the sentinels for the master failed");
                }
                drop(link);
                tokio::time::sleep(REQUERY_GAP).await;
            }
        });
    }

    /// One re-query: when the sentinels name another master, a connection to it, checked,
    /// swapped in.
    async fn follow(
        &self,
        link: &Link,
        breakers: &[Breaker],
        options: &RedisOptions,
    ) -> Result<(), StoreError> {
        let tls = self.tls.load_full();
        let (client, address) = self.target.discover(options, tls.as_ref().as_ref()).await?;
        if address == **self.master.load() {
            return Ok(());
        }
        let connection = manager(client, options).await?;
        link.ready(&connection, options.connect_timeout).await?;
        let was = self.master.swap(Arc::new(address.clone()));
        link.swap(connection);
        for breaker in breakers {
            breaker.close();
        }
        self.switches.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(master = %address, was = %was, "Redis master switched (Sentinel)");
        Ok(())
    }
}

/// Opens a connection to the master `target` names now: the connection and the master's
/// address.
pub(super) async fn open(
    target: &SentinelTarget,
    options: &RedisOptions,
    tls: Option<&RedisTls>,
) -> Result<(Connection, String), StoreError> {
    let (client, address) = target.discover(options, tls).await?;
    Ok((manager(client, options).await?, address))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<SentinelTarget, StoreError> {
        SentinelTarget::parse(url, false)
    }

    #[test]
    fn urls_name_the_sentinels_the_service_and_the_database() {
        let t = parse("u:p%40ss@a:1, b:2/mymaster/3").unwrap();
        assert_eq!(t.sentinels, [("a".to_owned(), 1), ("b".to_owned(), 2)]);
        assert_eq!(t.service, "mymaster");
        assert_eq!(t.db, 3);
        assert_eq!(t.username.as_deref(), Some("u"));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        let t = parse(":secret@a/m").unwrap();
        assert_eq!(t.sentinels, [("a".to_owned(), 26_379)], "the default port");
        assert_eq!(
            (t.username.as_deref(), t.password.as_deref()),
            (None, Some("secret"))
        );
        assert_eq!(t.db, 0);
        assert!(!format!("{t:?}").contains("secret"), "never shown");
    }

    #[test]
    fn the_master_gets_the_urls_credentials_and_the_sentinels_their_own() {
        let t = parse("us%3Aer:p%40ss%2F@a:1/m/2").unwrap();
        let options = RedisOptions {
            sentinel_password: Some(Password::new("sentinel secret")),
            ..RedisOptions::default()
        };
        let master = t
            .client("10.0.0.9", 6380, Some(t.db), &options, None)
            .unwrap();
        let info = master.get_connection_info();
        assert_eq!(info.addr().to_string(), "10.0.0.9:6380");
        let settings = info.redis_settings();
        assert_eq!(settings.username(), Some("us:er"));
        assert_eq!(settings.password(), Some("p@ss/"));
        assert_eq!(settings.db(), 2);
        let sentinel = t.client("a", 1, None, &options, None).unwrap();
        let settings = sentinel.get_connection_info().redis_settings();
        assert_eq!(settings.username(), None);
        assert_eq!(settings.password(), Some("sentinel secret"));
        assert_eq!(settings.db(), 0);
        let v6 = t.client("::1", 6379, Some(0), &RedisOptions::default(), None);
        assert_eq!(
            v6.unwrap().get_connection_info().addr().to_string(),
            "::1:6379"
        );
    }

    #[test]
    fn what_a_sentinel_url_lacks_is_said() {
        for (url, says) in [
            ("a:1", "names no service"),
            ("a:1/", "names no service"),
            ("/m", "no sentinel"),
            ("a:x/m", "`a:x` is not a sentinel's host:port"),
            ("a:1/m/x", "`x` is not a database number"),
            ("a:1/m/0/9", "too many path segments"),
        ] {
            let e = parse(url).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
    }
}
