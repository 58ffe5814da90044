//! `tollgate serve` as its own process, for tests of the binary.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `tollgate serve` with only `env` (and `PATH`) for environment.
pub fn tollgate(env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    c.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// A running `tollgate serve`, killed on drop. What it logs is read as it comes (a full
/// pipe would stop a server that logs each decision).
pub struct Serving {
    pub addr: SocketAddr,
    child: Option<Child>,
    log: Option<std::thread::JoinHandle<String>>,
}

impl Serving {
    /// Starts it, listening on a free port; panics with its log when it exits.
    pub fn start(env: &[(&str, &str)]) -> Serving {
        Self::try_start(env).unwrap_or_else(|log| panic!("{log}"))
    }

    /// Starts it with `env` and a free port to listen on, on a port that is free still:
    /// another process may take a port between the probe and the bind, and then it is
    /// tried again (`env` from `settings()` each time, for ports of the caller's own).
    pub fn start_retrying(settings: impl Fn() -> Vec<(String, String)>) -> Serving {
        let mut last = String::new();
        for _ in 0..5 {
            let owned = settings();
            let env: Vec<(&str, &str)> = owned
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            match Self::try_start(&env) {
                Ok(serving) => return serving,
                Err(log) if log.contains("Address already in use") => last = log,
                Err(log) => panic!("{log}"),
            }
        }
        panic!("no free port after five tries:\n{last}");
    }

    /// Starts it with `env` and an admin listener (on a free port, retried like the main
    /// one): the server and the admin address.
    pub fn start_with_admin(env: &[(&str, &str)]) -> (Serving, SocketAddr) {
        let admin = std::cell::Cell::new(None);
        let serving = Self::start_retrying(|| {
            let port: SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
            admin.set(Some(port));
            let mut all: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            all.push(("TOLLGATE_ADMIN_LISTEN".to_owned(), port.to_string()));
            all
        });
        (serving, admin.get().expect("an admin port"))
    }

    /// Starts it; what it logged when it exited instead of listening.
    pub fn try_start(env: &[(&str, &str)]) -> Result<Serving, String> {
        let addr: SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
        let listen = addr.to_string();
        let mut all = env.to_vec();
        all.push(("TOLLGATE_LISTEN", &listen));
        let mut child = super::process::spawn(&mut tollgate(&all)).expect("tollgate starts");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let log = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
            text
        });
        // Up to 20 s to listen (a start-up wait, not a timing test).
        for _ in 0..1000 {
            if let Ok(Some(status)) = child.try_wait() {
                let log = log.join().unwrap_or_default();
                return Err(format!("tollgate exited with {status}:\n{log}"));
            }
            if std::net::TcpStream::connect(addr).is_ok() {
                return Ok(Serving {
                    addr,
                    child: Some(child),
                    log: Some(log),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tollgate did not listen on {addr}");
    }
}

impl Serving {
    /// Stops the server and returns what it logged.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().unwrap();
        super::process::signal_group(&child, nix::sys::signal::Signal::SIGKILL);
        child.wait().unwrap();
        self.log.take().unwrap().join().unwrap()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            super::process::kill_group(child);
        }
    }
}

impl Serving {
    /// Sends `signal` to the server.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            super::process::signal_group(child, signal);
        }
    }
}

/// `GET path` on an admin listener with `token`, once it listens (it starts just after the
/// main one).
pub fn admin_get(admin: SocketAddr, token: &str, path: &str) -> super::Reply {
    let auth = format!("Bearer {token}");
    for _ in 0..500 {
        if std::net::TcpStream::connect(admin).is_ok() {
            return super::send(admin, "GET", path, &[("Authorization", &auth)], b"");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no admin listener on {admin}");
}
