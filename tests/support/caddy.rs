//! A real Caddy (Debian's package) on a free port, with `examples/caddy/Caddyfile`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

/// A running Caddy, stopped on drop.
pub struct Caddy {
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl Caddy {
    /// Starts Caddy in front of `app`, asking Tollgate at `tollgate`; `None` (or a panic in
    /// CI) when Caddy is not installed.
    pub fn start(app: SocketAddr, tollgate: SocketAddr) -> Option<Caddy> {
        let Some(caddy) = ["/usr/bin/caddy", "/usr/local/bin/caddy"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
        else {
            super::require("caddy");
            return None;
        };
        let port = super::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let dir =
            std::env::temp_dir().join(format!("tollgate-caddy-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let site = std::fs::read_to_string("examples/caddy/Caddyfile")
            .unwrap()
            .replace("{{LISTEN}}", &format!("http://{addr}"))
            .replace("{{APP}}", &app.to_string())
            .replace("{{TOLLGATE}}", &tollgate.to_string());
        // No admin endpoint (it would take a fixed port); the site as documented.
        let config = format!("{{\n\tadmin off\n}}\n\n{site}");
        let path = dir.join("Caddyfile");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.join("caddy.log")).unwrap();
        let child = super::process::spawn(
            Command::new(caddy)
                .args(["run", "--adapter", "caddyfile", "--config"])
                .arg(&path)
                .env("HOME", &dir)
                .env("XDG_DATA_HOME", dir.join("data"))
                .env("XDG_CONFIG_HOME", dir.join("config"))
                .stdout(Stdio::null())
                .stderr(log),
        )
        .expect("caddy starts");
        let caddy = Caddy { addr, child, dir };
        // Up to 10 s for Caddy to listen (a start-up wait, not a timing test).
        let mut attempts = 0;
        while std::net::TcpStream::connect(addr).is_err() {
            attempts += 1;
            assert!(attempts < 500, "caddy did not listen: {}", caddy.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(caddy)
    }

    /// What Caddy logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("caddy.log")).unwrap_or_default()
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        super::process::stop_group(&mut self.child, Signal::SIGTERM, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
