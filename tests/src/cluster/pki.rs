//! The cluster's certificates, made with `openssl` once per `up`: one CA; the API server's
//! serving certificate (loopback, the first node's address, the `kubernetes` Service names and
//! address); one `system:masters` client certificate used by every component and by the tools;
//! the service-account signing key pair.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

/// Paths of the files [`make`] writes.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
}

impl Pki {
    pub(super) fn at(dir: &Path) -> Self {
        let f = |name: &str| dir.join(name);
        Self {
            dir: dir.to_owned(),
            ca_cert: f("ca.crt"),
            ca_key: f("ca.key"),
            apiserver_cert: f("apiserver.crt"),
            apiserver_key: f("apiserver.key"),
            admin_cert: f("admin.crt"),
            admin_key: f("admin.key"),
            sa_key: f("sa.key"),
            sa_pub: f("sa.pub"),
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (Debian package openssl)")?;
    ensure!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Writes every certificate and key into `dir`.
pub(super) fn make(dir: &Path, api_addresses: &[Ipv4Addr]) -> Result<Pki> {
    std::fs::create_dir_all(dir)?;
    let days = "3650";
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            days,
            "-subj",
            "/CN=weft-cluster-ca",
        ],
    )?;
    let mut sans = vec![
        "DNS:kubernetes".to_owned(),
        "DNS:kubernetes.default".into(),
        "DNS:kubernetes.default.svc".into(),
        "DNS:kubernetes.default.svc.cluster.local".into(),
        "DNS:localhost".into(),
        "IP:127.0.0.1".into(),
    ];
    sans.extend(api_addresses.iter().map(|a| format!("IP:{a}")));
    std::fs::write(
        dir.join("san.cnf"),
        format!(
            "[v3]\nsubjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\n",
            sans.join(",")
        ),
    )?;
    for (name, subject, ext) in [
        ("apiserver", "/CN=kube-apiserver", true),
        ("admin", "/O=system:masters/CN=weft-admin", false),
    ] {
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        openssl(
            dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                subject,
            ],
        )?;
        let mut sign = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            days,
        ];
        if ext {
            sign.extend(["-extfile", "san.cnf", "-extensions", "v3"]);
        }
        openssl(dir, &sign)?;
    }
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"])?;
    openssl(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    Ok(Pki::at(dir))
}
