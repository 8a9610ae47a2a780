//! `cargo xtask compat [--json FILE]`: does any application notice Weft? Each case runs between
//! two pods three ways — on a node without Weft, on a meshed node as a user gets it (the socket
//! fast path where the kernel's self-test allows it), and on a meshed node with the socket fast
//! path enabled for both pods — and what the client saw (bytes as sha256, errors, outcomes) must
//! be the same as without Weft. Real programs (Python sockets, a Go `io.Copy` proxy, haproxy
//! with splice, nginx with sendfile, redis-benchmark, Node's http) beside socket patterns written
//! as applications write them (`xtask/compat/cases.py`).
//!
//! The kernel's fast-path byte counters say whether each case really took the socket fast path:
//! a case that silently fell back would prove nothing about it.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;
use serde_json::Value;
use testbed::{Node, Pod, Proc, Testbed, agent::Agent};

use crate::{setup, step};

/// Programs the cases run, from Debian.
pub const PACKAGES: &[&str] = &[
    "golang-go",
    "haproxy",
    "nginx",
    "redis-server",
    "redis-tools",
    "nodejs",
    "curl",
];

const CASES_PY: &str = include_str!("../compat/cases.py");

/// A Go TCP proxy: `io.Copy` both ways, which splices between TCP connections on Linux.
const GO_PROXY: &str = r#"package main

import (
	"io"
	"net"
	"os"
)

func main() {
	l, err := net.Listen("tcp", os.Args[1])
	if err != nil {
		panic(err)
	}
	os.Stdout.WriteString("{\"listening\": true}\n")
	for {
		c, err := l.Accept()
		if err != nil {
			continue
		}
		go func(c net.Conn) {
			defer c.Close()
			b, err := net.Dial("tcp", os.Args[2])
			if err != nil {
				return
			}
			defer b.Close()
			done := make(chan struct{})
			go func() {
				io.Copy(b, c)
				b.(*net.TCPConn).CloseWrite()
				close(done)
			}()
			io.Copy(c, b)
			c.(*net.TCPConn).CloseWrite()
			<-done
		}(c)
	}
}
"#;

const NODE_SERVER: &str = r"
const http = require('http');
const body = Buffer.alloc(256 * 1024, 'n');
http.createServer((req, res) => { res.end(body); }).listen(+process.argv[2], () => console.log('{\u0022listening\u0022: true}'));
";

const NODE_CLIENT: &str = r"
const http = require('http');
const crypto = require('crypto');
let ok = 0, errors = {}, left = 100;
const next = () => {
  if (left-- === 0) { console.log(JSON.stringify({ok, of: 100, errors})); return; }
  http.get({host: process.argv[2], port: +process.argv[3], path: '/', agent: false}, res => {
    const h = crypto.createHash('sha256');
    res.on('data', d => h.update(d));
    res.on('end', () => { if (res.statusCode === 200 && h.digest('hex').length === 64) ok++; next(); });
  }).on('error', e => { errors[e.code] = (errors[e.code] || 0) + 1; next(); });
};
next();
";

/// One case's outcome in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// What the client saw (compared with the run without Weft).
    pub seen: Value,
    /// Bytes of the case the kernel moved on the socket fast path.
    pub fast_path_bytes: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub name: &'static str,
    /// As a user gets it (socket fast path where the kernel passed the self-test).
    pub fast_path: bool,
    pub pass: bool,
    pub detail: String,
    /// With the socket fast path enabled for both pods.
    pub socket_fast_path: SocketMode,
}

#[derive(Debug, Clone, Serialize)]
pub struct SocketMode {
    pub fast_path: bool,
    pub pass: bool,
    pub detail: String,
    /// A failure here is one the agent's self-test predicts for this kernel (so the agent keeps
    /// the default path for everyone who did not opt in).
    pub predicted_by_self_test: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub self_test: Value,
    pub cases: Vec<Case>,
}

/// The self-test case whose failure explains an application case failing with the socket fast
/// path on.
fn self_test_case(case: &str) -> &'static str {
    match case {
        "splice_reader" | "go_io_copy" | "haproxy_splice" => "splice_reader",
        "blocking_recv" | "half_close" | "python_blocking" | "rst_close" => "blocking_wakeup",
        "rcvlowat" => "rcvlowat",
        _ => "",
    }
}

/// Where a case's server listens, and what drives it.
struct Spec {
    name: &'static str,
    port: u16,
}

const PY_CASES: [&str; 14] = [
    "blocking_recv",
    "epoll_recv",
    "msg_peek",
    "msg_waitall",
    "rcvlowat",
    "half_close",
    "rst_close",
    "big_transfer_hash",
    "small_writes_nodelay",
    "splice_reader",
    "sendfile_writer",
    "send_before_accept",
    "v4_mapped_v6_socket",
    "python_blocking",
];
const PROGRAM_CASES: [&str; 5] = [
    "go_io_copy",
    "haproxy_splice",
    "nginx_sendfile",
    "redis_benchmark",
    "node_http",
];

fn specs() -> Vec<Spec> {
    PY_CASES
        .iter()
        .chain(&PROGRAM_CASES)
        .enumerate()
        .map(|(i, name)| Spec {
            name,
            port: 9100 + u16::try_from(i).unwrap_or(0) * 10,
        })
        .collect()
}

/// Files the cases need, written once per run.
struct Files {
    dir: PathBuf,
    go_proxy: PathBuf,
}

fn prepare(dir: &Path) -> Result<Files> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("cases.py"), CASES_PY)?;
    std::fs::write(dir.join("server.js"), NODE_SERVER)?;
    std::fs::write(dir.join("client.js"), NODE_CLIENT)?;
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    let big: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(www.join("big"), &big)?;
    // The Go proxy, built once and cached (Debian's Go, standard library only).
    let cache = Path::new("/var/cache/weft/compat");
    std::fs::create_dir_all(cache)?;
    let go_proxy = cache.join("go-proxy");
    if !go_proxy.exists() {
        step!("compat: building the Go io.Copy proxy (Debian's Go)");
        let src = cache.join("go-proxy-src");
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("main.go"), GO_PROXY)?;
        crate::run(
            Command::new("go")
                .args(["build", "-o"])
                .arg(&go_proxy)
                .arg("main.go")
                .current_dir(&src)
                .env("GOCACHE", cache.join("gocache"))
                .env("GO111MODULE", "off"),
        )?;
    }
    Ok(Files {
        dir: dir.to_owned(),
        go_proxy,
    })
}

/// Starts the servers of every case in `server` (each waits for its first line on stdout).
fn start_servers(server: &Pod, files: &Files) -> Result<Vec<Proc>> {
    let py = files.dir.join("cases.py").display().to_string();
    let mut procs = Vec::new();
    for spec in specs() {
        let port = spec.port.to_string();
        let backend = (spec.port + 1).to_string();
        let started: Vec<Proc> = match spec.name {
            "go_io_copy" => vec![
                server.spawn(
                    "python3",
                    [py.as_str(), "server", "big_transfer_hash", &backend],
                )?,
                server.spawn(
                    &files.go_proxy,
                    [format!("0.0.0.0:{port}"), format!("127.0.0.1:{backend}")],
                )?,
            ],
            "haproxy_splice" => {
                let cfg = files
                    .dir
                    .join(format!("haproxy-{}.cfg", server.node().name()));
                std::fs::write(
                    &cfg,
                    format!(
                        "global\n  maxconn 256\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  option splice-auto\nfrontend f\n  bind 0.0.0.0:{port}\n  default_backend b\nbackend b\n  server s 127.0.0.1:{backend}\n"
                    ),
                )?;
                vec![
                    server.spawn(
                        "python3",
                        [py.as_str(), "server", "big_transfer_hash", &backend],
                    )?,
                    server.spawn("haproxy", ["-db".as_ref(), "-f".as_ref(), cfg.as_os_str()])?,
                ]
            }
            "nginx_sendfile" => {
                let prefix = files.dir.join(format!("nginx-{}", server.node().name()));
                std::fs::create_dir_all(prefix.join("logs"))?;
                let cfg = prefix.join("nginx.conf");
                std::fs::write(
                    &cfg,
                    format!(
                        "daemon off;\nworker_processes 1;\nerror_log stderr;\npid {pid};\nevents {{}}\nhttp {{\n  access_log off;\n  sendfile on;\n  client_body_temp_path {p}/tmp;\n  proxy_temp_path {p}/tmp;\n  fastcgi_temp_path {p}/tmp;\n  uwsgi_temp_path {p}/tmp;\n  scgi_temp_path {p}/tmp;\n  server {{ listen {port}; root {www}; }}\n}}\n",
                        pid = prefix.join("nginx.pid").display(),
                        p = prefix.display(),
                        www = files.dir.join("www").display()
                    ),
                )?;
                vec![server.spawn(
                    "nginx",
                    [
                        "-p".as_ref(),
                        prefix.as_os_str(),
                        "-c".as_ref(),
                        cfg.as_os_str(),
                    ],
                )?]
            }
            "redis_benchmark" => vec![server.spawn(
                "redis-server",
                [
                    "--port",
                    &port,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                ],
            )?],
            "node_http" => vec![server.spawn(
                "node",
                [
                    files.dir.join("server.js").display().to_string(),
                    port.clone(),
                ],
            )?],
            py_case => vec![server.spawn("python3", [py.as_str(), "server", py_case, &port])?],
        };
        procs.extend(started);
    }
    // Give every server a moment to bind (each prints or listens within milliseconds).
    std::thread::sleep(Duration::from_millis(1500));
    for p in &mut procs {
        ensure!(p.is_running(), "{} exited: {}", p.label(), p.stderr());
    }
    Ok(procs)
}

/// Runs case `name`'s client in `client` against `server`; returns what the application saw.
fn run_client(name: &str, port: u16, client: &Pod, server: &Pod, files: &Files) -> Result<Value> {
    let host = server.ip().to_string();
    let port_s = port.to_string();
    let timeout = Duration::from_mins(2);
    let py = files.dir.join("cases.py").display().to_string();
    let out = match name {
        "go_io_copy" | "haproxy_splice" => client.run(
            timeout,
            "python3",
            [py.as_str(), "client", "splice_reader", &host, &port_s],
        )?,
        "nginx_sendfile" => client.run(
            timeout,
            "sh",
            [
                "-c",
                &format!(
                    "curl -sS --max-time 60 http://{host}:{port}/big | sha256sum | cut -d' ' -f1"
                ),
            ],
        )?,
        "redis_benchmark" => client.run(
            timeout,
            "redis-benchmark",
            [
                "-h", &host, "-p", &port_s, "-n", "3000", "-c", "10", "-t", "set,get", "--csv",
            ],
        )?,
        "node_http" => client.run(
            timeout,
            "node",
            [
                files.dir.join("client.js").display().to_string(),
                host.clone(),
                port_s.clone(),
            ],
        )?,
        py_case => client.run(
            timeout,
            "python3",
            [py.as_str(), "client", py_case, &host, &port_s],
        )?,
    };
    Ok(normalise(
        name,
        &out.stdout,
        &out.stderr,
        out.status.success(),
    ))
}

/// The part of a client's output that must not change with Weft: throughput numbers and
/// timings are dropped.
fn normalise(name: &str, stdout: &str, stderr: &str, success: bool) -> Value {
    match name {
        "nginx_sendfile" => serde_json::json!({"sha256": stdout.trim(), "ok": success}),
        "redis_benchmark" => {
            // One CSV row per test: only which tests completed is compared.
            let tests: Vec<String> = stdout
                .lines()
                .skip(1)
                .filter_map(|l| l.split(',').next())
                .map(|t| t.trim_matches('"').to_owned())
                .collect();
            serde_json::json!({"completed": tests, "ok": success, "errors": stderr.lines().filter(|l| l.contains("rror")).count()})
        }
        _ => {
            let line = stdout
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Value>(l).ok());
            match line {
                Some(mut v) => {
                    if let Some(o) = v.as_object_mut() {
                        o.remove("secs");
                    }
                    v
                }
                None => {
                    serde_json::json!({"no_report": true, "stderr": stderr.lines().last().unwrap_or("")})
                }
            }
        }
    }
}

/// Bytes the kernel moved on the socket fast path between the client and server pods (both
/// directions, all their connections so far).
fn fast_bytes(agent: &Agent) -> Result<f64> {
    agent.metric(
        "weft_tcp_fast_path_bytes_total",
        &[
            ("source_workload", "client"),
            ("destination_workload", "server"),
        ],
    )
}

fn side(node: &Node) -> Result<(Pod, Pod)> {
    Ok((node.pod("client")?, node.pod("server")?))
}

/// `cargo xtask compat`.
#[allow(clippy::too_many_lines, reason = "one linear measurement script")]
pub fn run(json: Option<&Path>) -> Result<Report> {
    setup::ensure_packages(PACKAGES)?;
    let tb = Testbed::new("compat")?;
    let files = prepare(&std::env::temp_dir().join(format!("weft-compat-{}", std::process::id())))?;
    let off = tb.node("off")?;
    let mesh = tb.node("mesh")?;
    let socket = tb.node("sock")?;
    let (off_client, off_server) = side(&off)?;
    let (mesh_client, mesh_server) = side(&mesh)?;
    let (sock_client, sock_server) = side(&socket)?;
    let agents = [
        (Agent::start(&mesh, &[])?, &mesh_client, &mesh_server, false),
        (
            Agent::start(&socket, &[])?,
            &sock_client,
            &sock_server,
            true,
        ),
    ];
    for (agent, client, server, enable) in &agents {
        let annotations: &[(&str, &str)] = if *enable {
            &[("weft.dev/socket-fast-path", "enabled")]
        } else {
            &[]
        };
        agent.apply(
            "pods.yaml",
            &[
                client.manifest_annotated(&[("app", "client")], "client", annotations),
                server.manifest_annotated(&[("app", "server")], "server", annotations),
            ]
            .join("\n---\n"),
        )?;
        agent.wait_workloads(2)?;
    }
    let self_test = agents[0].0.status()?["socket_self_test"].clone();
    let kernel_fails = |case: &str| {
        self_test["cases"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["name"] == case && c["passed"] == false)
    };
    let _servers = [
        start_servers(&off_server, &files)?,
        start_servers(&mesh_server, &files)?,
        start_servers(&sock_server, &files)?,
    ];
    let mut cases = Vec::new();
    for spec in specs() {
        step!("compat: {}", spec.name);
        let baseline = run_client(spec.name, spec.port, &off_client, &off_server, &files)?;
        let mut runs = Vec::new();
        for (agent, client, server, _) in &agents {
            let before = fast_bytes(agent)?;
            let seen = run_client(spec.name, spec.port, client, server, &files)?;
            // The counters reach the metrics at the agent's next stats pass.
            std::thread::sleep(Duration::from_millis(400));
            let moved = fast_bytes(agent)? - before;
            runs.push(Run {
                seen,
                fast_path_bytes: moved,
            });
        }
        let describe = |r: &Run| {
            if r.seen == baseline {
                format!("same as without Weft: {}", r.seen)
            } else {
                format!("differs: {} (without Weft: {baseline})", r.seen)
            }
        };
        let socket_pass = runs[1].seen == baseline;
        let st = self_test_case(spec.name);
        cases.push(Case {
            name: spec.name,
            fast_path: runs[0].fast_path_bytes > 0.0,
            pass: runs[0].seen == baseline,
            detail: describe(&runs[0]),
            socket_fast_path: SocketMode {
                fast_path: runs[1].fast_path_bytes > 0.0,
                pass: socket_pass,
                detail: describe(&runs[1]),
                predicted_by_self_test: !socket_pass && !st.is_empty() && kernel_fails(st),
            },
        });
        let c = cases.last().context("just pushed")?;
        println!(
            "    as users get it: {} (fast path {}) | socket fast path on: {} (fast path {}){}",
            if c.pass { "same" } else { "DIFFERENT" },
            if c.fast_path { "yes" } else { "no" },
            if c.socket_fast_path.pass {
                "same"
            } else {
                "DIFFERENT"
            },
            if c.socket_fast_path.fast_path {
                "yes"
            } else {
                "no"
            },
            if c.socket_fast_path.predicted_by_self_test {
                ", as the self-test predicts"
            } else {
                ""
            }
        );
    }
    let report = Report {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        self_test,
        cases,
    };
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        step!("compat: wrote {}", path.display());
    }
    std::fs::remove_dir_all(&files.dir).ok();
    Ok(report)
}

/// What `cargo xtask test` requires of the matrix: every case behaves as without Weft as users
/// get it; with the socket fast path forced on, every difference is one the kernel's self-test
/// predicts (so the agent is right to keep it off by default), and the cases that differ did
/// take the fast path (else they proved nothing).
pub fn verdict(report: &Report) -> Result<()> {
    let mut problems = Vec::new();
    for c in &report.cases {
        if !c.pass {
            problems.push(format!("{}: {}", c.name, c.detail));
        }
        if !c.socket_fast_path.pass && !c.socket_fast_path.predicted_by_self_test {
            problems.push(format!(
                "{} with the socket fast path on, not predicted by the self-test: {}",
                c.name, c.socket_fast_path.detail
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("compatibility matrix: {}", problems.join("; "))
    }
}
