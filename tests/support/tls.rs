//! Certificates for TLS tests, made on the spot with `rcgen`: a CA, a server certificate for
//! 127.0.0.1 and `localhost` signed by it, and a client certificate signed by it.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// PEM files in a directory of their own, removed on drop.
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// A fresh CA and the server and client certificates it signed.
    pub fn generate() -> Certs {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tollgate-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("Tollgate test CA {n}"));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca.self_signed(&ca_key).unwrap();

        let leaf = |name: &str, purposes: &[ExtendedKeyUsagePurpose]| {
            let mut params =
                CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                    .unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = purposes.to_vec();
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        // A Cluster's nodes are each other's clients on the TLS bus, which always checks the
        // peer's certificate: the server's serves both ends.
        let (server, server_key) = leaf(
            "redis",
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let (client, client_key) = leaf("tollgate", &[ExtendedKeyUsagePurpose::ClientAuth]);
        for (file, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", server),
            ("server.key", server_key),
            ("client.pem", client),
            ("client.key", client_key),
        ] {
            std::fs::write(dir.join(file), pem).unwrap();
        }
        Certs { dir }
    }

    /// The path of one of the files: `ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The contents of one of the files.
    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }

    /// `redis-server` arguments for a TLS port beside the plain one (which the harness keeps
    /// for its own checks), requiring client certificates when `clients` is true.
    pub fn redis_args(&self, tls_port: u16, clients: bool) -> Vec<String> {
        let p = |f: &str| display(&self.path(f));
        [
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &p("server.pem"),
            "--tls-key-file",
            &p("server.key"),
            "--tls-ca-cert-file",
            &p("ca.pem"),
            "--tls-auth-clients",
            if clients { "yes" } else { "no" },
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
