//! The reverse proxies `bench l7` compares Weft's L7 engine with: nginx and haproxy as Debian 12
//! ships them, each a plain HTTP/1.1 reverse proxy with upstream keep-alive (and a second
//! listener, [`H2_PORT_OFFSET`] ports up, for HTTP/2 with prior knowledge), running in the node's
//! network namespace (where Weft's engine runs too), with one worker (nginx: one worker process
//! beside its idle master; haproxy: `nbthread 1`). Their configuration files are written into the
//! node's run directory, so the testbed's teardown removes them; the processes run in the
//! foreground and are stopped by pid.
use std::{
    fs,
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix_free::{alive, children_of, kill_by_pid};
use testbed::{Node, Proc, eventually};

/// How long a proxy gets to listen after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a proxy gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The HTTP/2 (h2c, prior knowledge) listener's port: the HTTP/1.1 one's plus this.
pub const H2_PORT_OFFSET: u16 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Nginx,
    Haproxy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
        }
    }
}

/// A running proxy; stop it with [`Proxy::stop`] (dropping it SIGKILLs the main process only).
#[derive(Debug)]
pub struct Proxy {
    kind: Kind,
    proc: Proc,
    listen: SocketAddrV4,
    /// The h2c listener, when the configuration has one.
    listen_h2: Option<SocketAddrV4>,
}

impl Proxy {
    /// Writes the configuration into `<node run dir>/<kind>/` and starts the proxy listening on
    /// `listen`, forwarding to `upstream`; returns once it listens.
    pub fn start(
        node: &Node,
        kind: Kind,
        listen: SocketAddrV4,
        upstream: SocketAddr,
    ) -> Result<Self> {
        let dir = node.run_dir().join(kind.name());
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let listen_h2 = SocketAddrV4::new(*listen.ip(), listen.port() + H2_PORT_OFFSET);
        let proc = match kind {
            Kind::Nginx => {
                for sub in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                    fs::create_dir_all(dir.join("tmp").join(sub))?;
                }
                let conf = dir.join("nginx.conf");
                fs::write(&conf, nginx_conf(&dir, listen, listen_h2, upstream))
                    .with_context(|| format!("writing {}", conf.display()))?;
                node.spawn(
                    "nginx",
                    [
                        "-p".to_owned(),
                        path(&dir),
                        "-c".to_owned(),
                        path(&conf),
                        // The error log before the configuration is read (default: /var/log).
                        "-e".to_owned(),
                        path(&dir.join("error.log")),
                        "-g".to_owned(),
                        "daemon off;".to_owned(),
                    ],
                )?
            }
            Kind::Haproxy => {
                let conf = dir.join("haproxy.cfg");
                fs::write(&conf, haproxy_cfg(listen, listen_h2, upstream))
                    .with_context(|| format!("writing {}", conf.display()))?;
                node.spawn("haproxy", ["-f".to_owned(), path(&conf), "-db".to_owned()])?
            }
        };
        let mut proxy = Self {
            kind,
            proc,
            listen,
            listen_h2: Some(listen_h2),
        };
        proxy.wait_listening(node)?;
        Ok(proxy)
    }

    /// haproxy with a configuration of the caller's (written into `<node run dir>/<name>/`),
    /// listening on `listen` once started.
    pub fn haproxy_with(
        node: &Node,
        name: &str,
        config: &str,
        listen: SocketAddrV4,
    ) -> Result<Self> {
        let dir = node.run_dir().join(name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let conf = dir.join("haproxy.cfg");
        fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
        let proc = node.spawn("haproxy", ["-f".to_owned(), path(&conf), "-db".to_owned()])?;
        let mut proxy = Self {
            kind: Kind::Haproxy,
            proc,
            listen,
            listen_h2: None,
        };
        proxy.wait_listening(node)?;
        Ok(proxy)
    }

    /// The proxy's main process (nginx's workers are its children).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    #[must_use]
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The URL clients use (`path` starts with `/`).
    #[must_use]
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.listen)
    }

    /// The URL of the HTTP/2 (h2c) listener, if there is one.
    #[must_use]
    pub fn url_h2(&self, path: &str) -> Option<String> {
        Some(format!("http://{}{path}", self.listen_h2?))
    }

    fn wait_listening(&mut self, node: &Node) -> Result<()> {
        let name = self.kind.name();
        for listen in std::iter::once(self.listen).chain(self.listen_h2) {
            let filter = format!("sport = :{}", listen.port());
            eventually(START_TIMEOUT, || {
                if !self.proc.is_running() {
                    bail!("{name} exited: {}", self.proc.stderr());
                }
                let ss = node.run(Duration::from_secs(5), "ss", ["-Hltn", filter.as_str()])?;
                if ss.stdout.trim().is_empty() {
                    bail!("{name} does not listen on {listen} yet");
                }
                Ok(())
            })
            .with_context(|| format!("{name} did not start"))?;
        }
        Ok(())
    }

    /// SIGTERM to the main process (nginx's master stops its worker), then makes sure no
    /// process it started is left (SIGKILL by pid, for stragglers).
    pub fn stop(mut self) -> Result<()> {
        let children = children_of(self.proc.pid());
        let finished = self.proc.terminate(STOP_GRACE)?;
        let mut left = Vec::new();
        for pid in children {
            if alive(pid) {
                left.push(pid);
                kill_by_pid(pid);
            }
        }
        if !left.is_empty() {
            eprintln!(
                "[bench] {} left processes {left:?} after SIGTERM; killed them. stderr: {}",
                self.kind.name(),
                finished.stderr
            );
        }
        Ok(())
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// nginx: one worker, no access log, upstream keep-alive (HTTP/1.1 with the `Connection` header
/// cleared), and no per-connection request limits on either side (nginx closes keep-alive
/// connections after 1000 requests by default, HTTP/2 ones too; haproxy and Weft do not). The
/// h2c server is the same proxy on a listener of its own (nginx 1.22 cannot serve both on one).
fn nginx_conf(
    dir: &Path,
    listen: SocketAddrV4,
    listen_h2: SocketAddrV4,
    upstream: SocketAddr,
) -> String {
    let dir = path(dir);
    format!(
        "# Written by `cargo xtask bench l7`.
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/client_body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    keepalive_requests 1000000;
    upstream upstream {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
    server {{
        listen {listen_h2} http2;
        location / {{
            proxy_pass http://upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    )
}

/// haproxy: one thread, HTTP mode, keep-alive on both sides, idle server connections reused
/// by any client (`http-reuse always`), no logging.
fn haproxy_cfg(listen: SocketAddrV4, listen_h2: SocketAddrV4, upstream: SocketAddr) -> String {
    format!(
        "# Written by `cargo xtask bench l7`.
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s

frontend bench
    bind {listen}
    default_backend upstream

frontend bench_h2
    bind {listen_h2} proto h2
    default_backend upstream

backend upstream
    server upstream {upstream}
"
    )
}

/// Process bookkeeping by pid through `/proc` (no signals to anything we did not start).
mod nix_free {
    use std::fs;

    /// Pids whose parent is `pid`.
    pub fn children_of(pid: u32) -> Vec<u32> {
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|child| parent(*child) == Some(pid))
            .collect()
    }

    /// The parent pid from `/proc/<pid>/stat` (the field after the parenthesised name).
    fn parent(pid: u32) -> Option<u32> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after_name = &stat[stat.rfind(')')? + 1..];
        after_name.split_whitespace().nth(1)?.parse().ok()
    }

    pub fn alive(pid: u32) -> bool {
        fs::metadata(format!("/proc/{pid}")).is_ok()
    }

    pub fn kill_by_pid(pid: u32) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_name_the_addresses() {
        let listen: SocketAddrV4 = "198.18.1.1:8081".parse().unwrap();
        let upstream: SocketAddr = "198.18.1.11:8080".parse().unwrap();
        let h2: SocketAddrV4 = "198.18.1.1:8091".parse().unwrap();
        let nginx = nginx_conf(Path::new("/run/x"), listen, h2, upstream);
        assert!(nginx.contains("listen 198.18.1.1:8081;"));
        assert!(nginx.contains("listen 198.18.1.1:8091 http2;"));
        assert!(nginx.contains("server 198.18.1.11:8080;"));
        assert!(nginx.contains("keepalive 64;"));
        assert!(nginx.contains("proxy_set_header Connection \"\";"));
        let haproxy = haproxy_cfg(listen, h2, upstream);
        assert!(haproxy.contains("bind 198.18.1.1:8081"));
        assert!(haproxy.contains("bind 198.18.1.1:8091 proto h2"));
        assert!(haproxy.contains("server upstream 198.18.1.11:8080"));
        assert!(haproxy.contains("http-reuse always"));
    }
}
