//! Real `redis-server`s (Debian's package) on free ports, stopped on drop: one server, or a
//! Cluster of masters (and replicas) created with `redis-cli --cluster create`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running Redis.
pub struct Redis {
    pub addr: SocketAddr,
    /// The TLS port, for a server started with one (see [`Redis::start_tls`]).
    pub tls_port: Option<u16>,
    child: Child,
    dir: PathBuf,
}

fn binary(name: &str) -> Option<PathBuf> {
    let found = ["/usr/bin", "/usr/local/bin"]
        .into_iter()
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.exists());
    if found.is_none() {
        super::require(name);
    }
    found
}

/// Waits up to 30 s for `check` (a start-up wait on a possibly loaded machine, not a timing
/// test).
fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1500 {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what}");
}

impl Redis {
    /// Starts one on a free port; `None` (or a panic in CI) when Redis is not installed.
    pub fn start() -> Option<Redis> {
        Self::start_with(&[])
    }

    /// Starts one with extra `redis-server` arguments, on a free port. Another test process
    /// may take the same port between our probe and Redis's bind: then another port is tried.
    pub fn start_with(extra: &[&str]) -> Option<Redis> {
        Self::start_retrying(|| {
            (
                super::free_port(),
                extra.iter().map(|s| s.to_string()).collect(),
            )
        })
    }

    /// Starts one with a TLS port too (certificates from `certs`), requiring client
    /// certificates when `clients` is true. The plain port stays for the harness's checks.
    pub fn start_tls(certs: &super::tls::Certs, clients: bool) -> Option<Redis> {
        Self::start_retrying(|| {
            (
                super::free_port(),
                certs.redis_args(super::free_port(), clients),
            )
        })
    }

    /// Starts one on a port (and with arguments) from `next`, trying again with new ones when
    /// the port turns out to be taken.
    fn start_retrying(next: impl FnMut() -> (u16, Vec<String>)) -> Option<Redis> {
        Self::start_retrying_with(None, next)
    }

    /// [`Redis::start_retrying`], with a configuration file's text (`sentinel`: a sentinel's,
    /// run in sentinel mode).
    fn start_retrying_with(
        sentinel: Option<&str>,
        mut next: impl FnMut() -> (u16, Vec<String>),
    ) -> Option<Redis> {
        let mut last = String::new();
        for _ in 0..5 {
            let (port, extra) = next();
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            match Self::launch(port, &extra, sentinel)? {
                Ok(redis) => return Some(redis),
                Err(why) => last = why,
            }
        }
        panic!("redis-server would not start: {last}");
    }

    /// Starts one on `port` (e.g. again, after [`Redis::kill`]).
    pub fn start_on(port: u16, extra: &[&str]) -> Option<Redis> {
        Some(Self::launch(port, extra, None)?.unwrap_or_else(|why| panic!("{why}")))
    }

    /// Runs `redis-server` on `port` and waits until it answers — itself, not another test's
    /// server that took the port first.
    fn launch(port: u16, extra: &[&str], sentinel: Option<&str>) -> Option<Result<Redis, String>> {
        let binary = binary("redis-server")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let dir =
            std::env::temp_dir().join(format!("tollgate-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut command = Command::new(binary);
        if let Some(config) = sentinel {
            // A sentinel rewrites its configuration file: it must be one of its own.
            let file = dir.join("sentinel.conf");
            std::fs::write(&file, config).unwrap();
            command.arg(file).arg("--sentinel");
        }
        let child = super::process::spawn(
            command
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(&dir)
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("redis-server starts");
        let tls_port = extra
            .iter()
            .position(|a| *a == "--tls-port")
            .and_then(|i| extra.get(i + 1))
            .and_then(|p| p.parse().ok());
        let mut redis = Redis {
            addr,
            tls_port,
            child,
            dir,
        };
        let pid = format!("process_id:{}", redis.child.id());
        let mut outcome = Err(format!("redis-server on {addr} did not answer"));
        wait_for(&format!("redis-server on {addr} did not answer"), || {
            if let Ok(Some(status)) = redis.child.try_wait() {
                outcome = Err(format!(
                    "redis-server on {addr} exited ({status}): port taken?"
                ));
                return true;
            }
            if redis.ping() && redis.cli(&["INFO", "server"]).contains(&pid) {
                outcome = Ok(());
                return true;
            }
            false
        });
        Some(match outcome {
            Ok(()) => Ok(redis),
            Err(why) => {
                redis.kill();
                Err(why)
            }
        })
    }

    /// Starts a sentinel on a free port, watching `master` as `service`: quorum 2, down after
    /// `down_after_ms` without an answer.
    pub fn start_sentinel(master: SocketAddr, service: &str, down_after_ms: u64) -> Option<Redis> {
        Self::start_sentinel_with(master, service, down_after_ms, 2, None)
    }

    /// [`Redis::start_sentinel`] with a quorum, and optionally a TLS port too (certificates
    /// from `certs`; it then reaches the master over TLS: give the master's TLS address).
    pub fn start_sentinel_with(
        master: SocketAddr,
        service: &str,
        down_after_ms: u64,
        quorum: u32,
        certs: Option<&super::tls::Certs>,
    ) -> Option<Redis> {
        let config = format!(
            "sentinel monitor {service} {} {} {quorum}\n\
             sentinel down-after-milliseconds {service} {down_after_ms}\n\
             sentinel failover-timeout {service} 10000\n\
             sentinel parallel-syncs {service} 2\n",
            master.ip(),
            master.port()
        );
        Self::start_retrying_with(Some(&config), || {
            let mut args = Vec::new();
            if let Some(certs) = certs {
                args.extend(certs.redis_args(super::free_port(), false));
                args.extend(["--tls-replication".to_owned(), "yes".to_owned()]);
            }
            (super::free_port(), args)
        })
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// `rediss://127.0.0.1:TLS_PORT`, for a server started with [`Redis::start_tls`].
    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_port.expect("a TLS port"))
    }

    /// Kills the server and anything it forked (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        super::process::kill_group(&mut self.child);
    }

    /// Stops (`SIGSTOP`) or resumes (`SIGCONT`) the server: a hung Redis.
    pub fn pause(&self, paused: bool) {
        let signal = if paused { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Runs `redis-cli` against this server and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.addr.port(), args)
    }

    /// A hash's fields and values (`HGETALL`).
    pub fn hash(&self, key: &str) -> std::collections::HashMap<String, String> {
        let out = self.cli(&["HGETALL", key]);
        let lines: Vec<&str> = out.lines().collect();
        lines
            .chunks(2)
            .filter(|p| p.len() == 2)
            .map(|p| (p[0].to_owned(), p[1].to_owned()))
            .collect()
    }

    /// The `calls` of one command from `INFO commandstats` (e.g. `evalsha`).
    pub fn calls(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(self.addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster on this machine: `masters` masters, each with `replicas` replicas.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    /// Starts the nodes, joins them with `redis-cli --cluster create`, and waits until every
    /// node reports `cluster_state:ok` (and every replica is in sync).
    pub fn start(masters: usize, replicas: usize) -> Option<Cluster> {
        Self::start_with(masters, replicas, None)
    }

    /// The same, every node also listening with TLS (certificates from `certs`), the cluster
    /// bus on TLS too, created through the TLS ports.
    pub fn start_tls(
        masters: usize,
        replicas: usize,
        certs: &super::tls::Certs,
    ) -> Option<Cluster> {
        Self::start_with(masters, replicas, Some(certs))
    }

    fn start_with(
        masters: usize,
        replicas: usize,
        certs: Option<&super::tls::Certs>,
    ) -> Option<Cluster> {
        binary("redis-cli")?;
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            nodes.push(Redis::start_retrying(|| {
                let port = super::free_port();
                // The bus port defaults to port + 10000, which may be taken or past 65535.
                let bus = super::free_port();
                let args = [
                    "--cluster-enabled".to_owned(),
                    "yes".to_owned(),
                    "--cluster-port".to_owned(),
                    bus.to_string(),
                    "--cluster-config-file".to_owned(),
                    format!("nodes-{port}.conf"),
                    "--cluster-node-timeout".to_owned(),
                    "1000".to_owned(),
                ];
                let mut args = args.to_vec();
                if let Some(certs) = certs {
                    args.extend(certs.redis_args(super::free_port(), false));
                    args.extend(
                        ["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from),
                    );
                }
                (port, args)
            })?);
        }
        let mut create = Command::new("redis-cli");
        if let Some(certs) = certs {
            create
                .arg("--tls")
                .arg("--cacert")
                .arg(certs.path("ca.pem"));
        }
        create.arg("--cluster").arg("create");
        for node in &nodes {
            match node.tls_port {
                Some(port) => create.arg(format!("127.0.0.1:{port}")),
                None => create.arg(node.addr.to_string()),
            };
        }
        // `--cluster create` waits for the nodes to join with no end of its own: give it 30 s.
        let mut creating = super::process::Guard(
            super::process::spawn(
                create
                    .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null()),
            )
            .expect("redis-cli runs"),
        );
        let mut status = None;
        wait_for("redis-cli --cluster create did not finish", || {
            status = creating.0.try_wait().ok().flatten();
            status.is_some()
        });
        let mut printed = String::new();
        if let Some(mut out) = creating.0.stdout.take() {
            let _ = out.read_to_string(&mut printed);
        }
        assert!(
            status.is_some_and(|s| s.success()),
            "redis-cli --cluster create failed: {printed}"
        );
        let cluster = Cluster { nodes };
        wait_for("the cluster did not become ok", || {
            cluster.nodes.iter().all(|n| {
                let info = n.cli(&["CLUSTER", "INFO"]);
                let replication = n.cli(&["INFO", "replication"]);
                info.contains("cluster_state:ok")
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            })
        });
        Some(cluster)
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| n.addr.to_string()).collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// `rediss+cluster://` with every node's TLS port as a seed.
    pub fn tls_url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.tls_port.expect("a TLS port")))
            .collect();
        format!("rediss+cluster://{}", hosts.join(","))
    }

    /// The node that is master for `key`'s slot now.
    pub fn master_of(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers");
        self.nodes
            .iter()
            .position(|n| owns(n, slot))
            .expect("a master owns the slot")
    }

    /// Sums `calls` of `command` over every node.
    pub fn calls(&self, command: &str) -> u64 {
        self.nodes.iter().map(|n| n.calls(command)).sum()
    }
}

/// Whether `node` is, by its own `CLUSTER NODES` line, a master serving `slot`.
fn owns(node: &Redis, slot: u16) -> bool {
    let myself = node.cli(&["CLUSTER", "MYID"]).trim().to_owned();
    let nodes = node.cli(&["CLUSTER", "NODES"]);
    nodes.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.first() == Some(&myself.as_str())
            && fields.get(2).is_some_and(|f| f.contains("master"))
            && fields.iter().skip(8).any(|range| {
                let mut ends = range.split('-');
                let start = ends.next().and_then(|s| s.parse::<u16>().ok());
                let end = ends.next().and_then(|s| s.parse::<u16>().ok()).or(start);
                matches!((start, end), (Some(a), Some(b)) if a <= slot && slot <= b)
            })
    })
}

/// A master with two replicas and three sentinels watching them, on this machine.
pub struct Sentinels {
    /// The servers; the first was the master at the start.
    pub servers: Vec<Redis>,
    pub sentinels: Vec<Redis>,
}

/// The name the sentinels watch the master under.
pub const SERVICE: &str = "tollgate";

impl Sentinels {
    /// Starts them and waits until the replicas are in sync and every sentinel knows both
    /// replicas and the other two sentinels (a failover needs them to agree).
    pub fn start(down_after_ms: u64) -> Option<Sentinels> {
        let master = Redis::start()?;
        let port = master.addr.port().to_string();
        let mut servers = vec![master];
        for _ in 0..2 {
            servers.push(Redis::start_with(&["--replicaof", "127.0.0.1", &port])?);
        }
        let sentinels = (0..3)
            .map(|_| Redis::start_sentinel(servers[0].addr, SERVICE, down_after_ms))
            .collect::<Option<Vec<_>>>()?;
        let set = Sentinels { servers, sentinels };
        wait_for("the replicas did not sync", || {
            set.servers[1..].iter().all(|r| {
                r.cli(&["INFO", "replication"])
                    .contains("master_link_status:up")
            })
        });
        wait_for("the sentinels did not find each other", || {
            set.sentinels.iter().all(|s| {
                let fields = s.cli(&["SENTINEL", "MASTER", SERVICE]);
                let field = |name: &str| {
                    let mut lines = fields.lines();
                    lines.find(|l| *l == name)?;
                    lines.next().map(str::to_owned)
                };
                field("num-slaves").as_deref() == Some("2")
                    && field("num-other-sentinels").as_deref() == Some("2")
            })
        });
        Some(set)
    }

    /// `redis+sentinel://` with the three sentinels.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.sentinels.iter().map(|s| s.addr.to_string()).collect();
        format!("redis+sentinel://{}/{SERVICE}", hosts.join(","))
    }

    /// The master, as the first sentinel names it now.
    pub fn master(&self) -> SocketAddr {
        let said = self.sentinels[0].cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE]);
        let mut lines = said.lines();
        let (ip, port) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
        format!("{ip}:{port}")
            .parse()
            .unwrap_or_else(|_| panic!("no master named: {said:?}"))
    }

    /// The server at `addr`.
    pub fn server(&mut self, addr: SocketAddr) -> &mut Redis {
        self.servers
            .iter_mut()
            .find(|s| s.addr == addr)
            .expect("one of the servers")
    }
}

/// A global limit's key as a region's Redis holds it: the region's own count (`c`), and the
/// sum of the counts the other regions sent (`g:<region>` = "<window start> <count>").
pub fn components(hash: &std::collections::HashMap<String, String>) -> (u64, u64) {
    let own = hash.get("c").map_or(0, |c| c.parse().unwrap());
    let others = hash
        .iter()
        .filter(|(field, _)| field.starts_with("g:"))
        .map(|(_, value)| value.split_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum();
    (own, others)
}
