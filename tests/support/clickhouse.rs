//! A real `clickhouse-server` (Debian's package, 18.16) on free ports, from a copy of the
//! packaged configuration with its ports and paths moved to a temporary directory; stopped
//! with its children on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running ClickHouse.
pub struct ClickHouse {
    /// The HTTP port (what the `clickhouse` crate talks to).
    pub http_port: u16,
    child: Child,
    dir: tempfile::TempDir,
    binary: PathBuf,
}

const PACKAGED: &str = "/etc/clickhouse-server";

impl ClickHouse {
    /// Starts one; `None` (or a panic in CI) when ClickHouse is not installed.
    pub fn start() -> Option<ClickHouse> {
        let binary = ["/usr/bin/clickhouse-server", "/usr/sbin/clickhouse-server"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        let (Some(binary), true) = (binary, PathBuf::from(PACKAGED).join("config.xml").exists())
        else {
            super::require("clickhouse-server");
            return None;
        };
        for _ in 0..5 {
            if let Some(started) = Self::try_start(&binary) {
                return Some(started);
            }
        }
        panic!("clickhouse-server did not start on free ports after 5 tries");
    }

    fn try_start(binary: &std::path::Path) -> Option<ClickHouse> {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (http_port, tcp_port, interserver) =
            (super::free_port(), super::free_port(), super::free_port());
        let path = |p: &str| format!("{}/{p}", root.display());
        let config = std::fs::read_to_string(format!("{PACKAGED}/config.xml")).unwrap();
        let replace = |text: String, tag: &str, value: &str| -> String {
            let open = format!("<{tag}>");
            let close = format!("</{tag}>");
            match (text.find(&open), text.find(&close)) {
                (Some(a), Some(b)) if a < b => {
                    format!("{}{open}{value}{}", &text[..a], &text[b..])
                }
                _ => text,
            }
        };
        let mut config = config;
        for (tag, value) in [
            ("http_port", http_port.to_string()),
            ("tcp_port", tcp_port.to_string()),
            ("interserver_http_port", interserver.to_string()),
            ("log", path("log/server.log")),
            ("errorlog", path("log/error.log")),
            ("path", path("data/")),
            ("tmp_path", path("tmp/")),
            ("user_files_path", path("user_files/")),
            ("format_schema_path", path("format_schemas/")),
            ("users_config", format!("{PACKAGED}/users.xml")),
        ] {
            config = replace(config, tag, &value);
        }
        // Only the first `<path>` is the data path (the DDL queue's is in ZooKeeper's
        // section, unused here); the other ports (MySQL, TLS) are not in 18.16's file.
        std::fs::create_dir_all(root.join("log")).unwrap();
        let config_file = root.join("config.xml");
        std::fs::write(&config_file, config).unwrap();
        let child = Self::spawn(binary, root);
        let mut server = ClickHouse {
            http_port,
            child,
            dir,
            binary: binary.to_owned(),
        };
        server.wait_ready().then_some(server)
    }

    fn spawn(binary: &std::path::Path, root: &std::path::Path) -> Child {
        super::process::spawn(
            Command::new(binary)
                .arg(format!(
                    "--config-file={}",
                    root.join("config.xml").display()
                ))
                .current_dir(root)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("clickhouse-server starts")
    }

    /// Starts it again after [`ClickHouse::kill`], on the same ports and data.
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.binary, self.dir.path());
        assert!(self.wait_ready(), "clickhouse-server restarts on its port");
    }

    /// Waits until it answers (`false`: it exited, its port was taken).
    fn wait_ready(&mut self) -> bool {
        let server = self;
        // Up to 30 s: a start-up wait on a loaded machine, not a timing test.
        for _ in 0..1500 {
            if server.query("SELECT 1").is_ok_and(|r| r.trim() == "1") {
                return true;
            }
            if let Ok(Some(_)) = server.child.try_wait() {
                // A port was taken between the probe and the bind: another try.
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log =
            std::fs::read_to_string(server.dir.path().join("log/error.log")).unwrap_or_default();
        panic!("clickhouse-server did not answer within 30 s:\n{log}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Runs `sql` over HTTP; the body (tab-separated) or the server's error.
    pub fn query(&self, sql: &str) -> Result<String, String> {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", self.http_port).parse().unwrap();
        if std::net::TcpStream::connect(addr).is_err() {
            return Err("not listening".to_owned());
        }
        let reply = super::send(addr, "POST", "/", &[], sql.as_bytes());
        if reply.status == 200 {
            Ok(reply.text())
        } else {
            Err(format!("{}: {}", reply.status, reply.text()))
        }
    }

    /// Stops it (SIGKILL to its group, as a crash would).
    pub fn kill(&mut self) {
        super::process::kill_group(&mut self.child);
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        super::process::stop_group(
            &mut self.child,
            nix::sys::signal::Signal::SIGTERM,
            Duration::from_secs(5),
        );
    }
}
