//! A real nginx (Debian's package) on a free port, with `examples/nginx/tollgate.conf`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

/// A running nginx, stopped on drop.
pub struct Nginx {
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

fn binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl Nginx {
    /// Starts nginx in front of `app`, asking Tollgate at `tollgate`; `None` (or a panic in
    /// CI) when nginx is not installed.
    pub fn start(app: SocketAddr, tollgate: SocketAddr) -> Option<Nginx> {
        let Some(nginx) = binary() else {
            super::require("nginx");
            return None;
        };
        let port = super::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let dir =
            std::env::temp_dir().join(format!("tollgate-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let site = std::fs::read_to_string("examples/nginx/tollgate.conf")
            .unwrap()
            .replace("{{LISTEN}}", &addr.to_string())
            .replace("{{APP}}", &app.to_string())
            .replace("{{TOLLGATE}}", &tollgate.to_string());
        let d = dir.display();
        let conf = format!(
            "user root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 128; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             {site}\n}}\n"
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = super::process::spawn(
            Command::new(nginx)
                .args([
                    "-p",
                    &d.to_string(),
                    "-c",
                    &conf_path.display().to_string(),
                    "-g",
                    "daemon off;",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("nginx starts");
        let nginx = Nginx { addr, child, dir };
        // Up to 10 s for nginx to listen (a start-up wait, not a timing test).
        let mut attempts = 0;
        while std::net::TcpStream::connect(addr).is_err() {
            attempts += 1;
            assert!(attempts < 500, "nginx did not listen: {}", nginx.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(nginx)
    }

    /// nginx's error log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: the master stops its workers and exits; then the group is killed, so no
        // worker outlives the test even if the master did not get to it.
        super::process::stop_group(&mut self.child, Signal::SIGQUIT, Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
