//! `cargo xtask bench mtls`: encrypted cross-node traffic, side by side in one run on two
//! testbed nodes linked by the fabric.
//!
//! Columns, each from a client pod on node `n1` to a server pod on node `n2`:
//! - `direct`: no mesh (unmeshed pods, plaintext);
//! - `weft tunnel`: meshed pods, plain L4 through Weft's mTLS tunnel (HTTP/2 CONNECT streams in
//!   one TLS 1.3 connection between the agents);
//! - `weft l7+tunnel`: the same pods through a Service with an `HTTPRoute`: the engine parses and
//!   routes each request, then the tunnel carries it;
//! - `peer tls`: a pair of haproxy (Debian 12's 2.6, one thread each) doing what a sidecar pair
//!   does for L4: the client's node proxy originates mutual TLS 1.3 (TCP mode), the server's node
//!   proxy terminates it and forwards to the unmeshed server pod. Certificates come from the same
//!   kind of CA (`weft ca issue`).
//!
//! Latency: `weft-workload http-load` at a fixed rate over 16 keep-alive connections (latency from
//! the intended send time, like wrk2), p50/p99. Throughput: `weft-workload stream` (one TCP
//! connection, bulk) for the L4 columns. Runs alternate between columns each round; medians over
//! rounds. Both agents' peak RSS during the weft runs (load and bulk, the kernel's `VmHWM`) is
//! reported.
use std::{
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use anyhow::{Result, ensure};
use serde::Serialize;
use testbed::{
    Node, Pod, ServeMode, Server, Testbed,
    agent::{self, Agent},
    eventually,
    http::{HttpGetArgs, HttpLoadArgs, HttpServer, HttpServerArgs},
};

use super::proxies::Proxy;
use crate::step;

const WEB_VIP: &str = "198.19.0.50";
const LOAD_CONNECTIONS: u32 = 16;
/// Targets of the issue: Weft's added p99 at most half the peer pair's; throughput at least
/// the peer pair's.
const TARGET_ADDED_P99_RATIO: f64 = 0.5;
const TARGET_GBPS_RATIO: f64 = 1.0;

use super::l7::{Options, agent_pid, mib, peak_rss_kb, reset_peak_rss};

#[derive(Debug, Serialize)]
struct Report {
    tool: &'static str,
    secs_per_run: u64,
    rate_rps: f64,
    repeats: usize,
    direct_p50_us: f64,
    direct_p99_us: f64,
    weft_tunnel_p50_us: f64,
    weft_tunnel_p99_us: f64,
    weft_l7_p50_us: f64,
    weft_l7_p99_us: f64,
    peer_tls_p50_us: f64,
    peer_tls_p99_us: f64,
    direct_gbps: f64,
    weft_tunnel_gbps: f64,
    peer_tls_gbps: f64,
    /// (weft tunnel p99 − direct p99) / (peer p99 − direct p99): target ≤ 0.5.
    added_p99_ratio: f64,
    /// weft tunnel / peer pair: target ≥ 1.
    gbps_ratio: f64,
    /// The added-p99 ratio of each round alone (the columns of one round run back to back):
    /// shows how much of the spread is the machine's.
    added_p99_ratio_per_round: Vec<f64>,
    /// Peak RSS (`VmHWM`) of each agent during the weft runs, bulk included (MiB).
    client_agent_rss_mb: f64,
    server_agent_rss_mb: f64,
    /// Evidence: streams the server's agent accepted.
    tunnel_streams: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// One column: who sends, to which HTTP URL and bulk sink.
struct Column {
    name: &'static str,
    client: Pod,
    url: String,
    sink: Option<SocketAddr>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    gbps: Vec<f64>,
}

impl Column {
    fn new(name: &'static str, client: &Pod, url: String, sink: Option<SocketAddr>) -> Self {
        Self {
            name,
            client: client.clone(),
            url,
            sink,
            p50: Vec::new(),
            p99: Vec::new(),
            gbps: Vec::new(),
        }
    }
}

/// The agents whose peak RSS is read after each weft run (load and bulk stream).
struct Watched {
    pids: [u32; 2],
    peak_kb: [u64; 2],
}

fn run_column(col: &mut Column, options: &Options, watch: Option<&mut Watched>) -> Result<()> {
    let load = HttpLoadArgs::new(
        col.url.parse()?,
        options.rate,
        Duration::from_secs(options.secs),
    )
    .connections(LOAD_CONNECTIONS);
    if let Some(w) = &watch {
        for pid in w.pids {
            reset_peak_rss(pid)?;
        }
    }
    let report = col.client.http_load(&load)?;
    ensure!(
        report.clean(),
        "{}: {} of {} answered, {} errors {:?}, {} not 2xx",
        col.name,
        report.completed,
        report.scheduled,
        report.errors,
        report.error_samples,
        report.non_2xx
    );
    col.p50.push(report.p50_us);
    col.p99.push(report.p99_us);
    if let Some(sink) = col.sink {
        let s = col.client.stream(sink, Duration::from_secs(options.secs))?;
        ensure!(s.ok, "{}: stream failed: {:?}", col.name, s.error);
        col.gbps.push(s.gbps);
    }
    if let Some(w) = watch {
        for (peak, pid) in w.peak_kb.iter_mut().zip(w.pids) {
            *peak = (*peak).max(peak_rss_kb(pid)?);
        }
    }
    Ok(())
}

/// The two haproxy of the peer pair: client side on n1 (`16080` HTTP, `17001` bulk, plain from
/// the pod, mutual TLS out), server side on n2 (`16443`, `17443`, mutual TLS in, plain to the
/// unmeshed server pod).
fn peer_pair(n1: &Node, n2: &Node, bare: &Pod, ca: &[String]) -> Result<(Vec<Proxy>, u16, u16)> {
    let dir = n1.run_dir().join("peer-certs");
    std::fs::create_dir_all(&dir)?;
    let (ca_cert, ca_key) = (&ca[1], &ca[3]);
    let issue = |name: &str| -> Result<String> {
        let out = dir.join(format!("{name}.pem"));
        let done = std::process::Command::new(testbed::weft_bin())
            .args(["ca", "issue", "--ca-cert", ca_cert, "--ca-key", ca_key])
            .args([
                "--id",
                &format!("spiffe://cluster.local/ns/default/sa/{name}"),
            ])
            .arg("--out")
            .arg(&out)
            .output()?;
        ensure!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
        Ok(out.display().to_string())
    };
    let (client_pem, server_pem) = (issue("peer-client")?, issue("peer-server")?);
    let head = "global\n  nbthread 1\n  maxconn 4096\n  ssl-default-bind-options ssl-min-ver TLSv1.3\n  \
                ssl-default-server-options ssl-min-ver TLSv1.3\n\
                defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n";
    let (up1, up2) = (n2.uplink_ip(), n2.uplink_ip());
    let client_cfg = format!(
        "{head}\
         listen http\n  bind {b}:16080\n  server s {up1}:16443 ssl crt {client_pem} ca-file {ca_cert} verify required\n\
         listen bulk\n  bind {b}:17001\n  server s {up2}:17443 ssl crt {client_pem} ca-file {ca_cert} verify required\n",
        b = n1.bridge_ip()
    );
    let server_cfg = format!(
        "{head}\
         listen http\n  bind {u}:16443 ssl crt {server_pem} ca-file {ca_cert} verify required\n  server s {ip}:8080\n\
         listen bulk\n  bind {u}:17443 ssl crt {server_pem} ca-file {ca_cert} verify required\n  server s {ip}:7001\n",
        u = n2.uplink_ip(),
        ip = bare.ip()
    );
    let server = Proxy::haproxy_with(
        n2,
        "peer-server",
        &server_cfg,
        SocketAddrV4::new(n2.uplink_ip(), 16443),
    )?;
    let client = Proxy::haproxy_with(
        n1,
        "peer-client",
        &client_cfg,
        SocketAddrV4::new(n1.bridge_ip(), 16080),
    )?;
    Ok((vec![client, server], 16080, 17001))
}

fn servers(pod: &Pod) -> Result<(HttpServer, Server)> {
    Ok((
        pod.serve_http(&HttpServerArgs::new(pod.name(), 8080))?,
        pod.serve(ServeMode::Sink, 7001)?,
    ))
}

#[allow(clippy::too_many_lines, reason = "one linear measurement script")]
pub fn mtls(weft: &Path, workload: &Path, options: &Options, json: Option<&Path>) -> Result<()> {
    testbed::use_binaries(weft, workload)?;
    let repeats = options.repeats.max(1);
    step!("bench mtls: two nodes linked by the fabric; client pods on n1, servers on n2");
    let tb = Testbed::new("bench-mtls")?;
    let n1 = tb.node("n1")?;
    let n2 = tb.node("n2")?;
    let client = n1.pod("client")?;
    let plain = n1.pod("plain")?;
    let server = n2.pod("server")?;
    let bare = n2.pod("bare")?;
    let objects = [
        n1.manifest(),
        n2.manifest(),
        client.manifest(&[("app", "client")], "client"),
        plain.manifest_unmeshed(&[("app", "plain")], "plain"),
        server.manifest(&[("app", "web")], "web"),
        bare.manifest_unmeshed(&[("app", "bare")], "bare"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec: {{clusterIP: {WEB_VIP}, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080}}]}}"
        ),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {name: web, namespace: default}\n\
         spec:\n  parentRefs: [{kind: Service, name: web, port: 80}]\n  rules:\n  \
         - matches: [{path: {type: PathPrefix, value: /}}]\n    backendRefs: [{name: web, port: 80}]"
            .to_owned(),
    ]
    .join("\n---\n");
    let ca = agent::identity_args(&n1)?;
    let mut args: Vec<&str> = ca.iter().map(String::as_str).collect();
    args.extend(Agent::PRODUCTION_INTERVALS);
    let a1 = Agent::start(&n1, &args)?;
    let a2 = Agent::start(&n2, &args)?;
    for a in [&a1, &a2] {
        a.apply("objects.yaml", &objects)?;
        a.wait_workloads(4)?;
    }
    let _servers = [servers(&server)?, servers(&bare)?];
    let (proxies, peer_http, peer_bulk) = peer_pair(&n1, &n2, &bare, &ca)?;

    let mut columns = [
        Column::new(
            "direct",
            &plain,
            format!("http://{}:8080/", bare.ip()),
            Some(SocketAddr::from((bare.ip(), 7001))),
        ),
        Column::new(
            "weft tunnel",
            &client,
            format!("http://{}:8080/", server.ip()),
            Some(SocketAddr::from((server.ip(), 7001))),
        ),
        Column::new(
            "weft l7+tunnel",
            &client,
            format!("http://{WEB_VIP}/"),
            None,
        ),
        Column::new(
            "peer tls",
            &plain,
            format!("http://{}:{peer_http}/", n1.bridge_ip()),
            Some(SocketAddr::from((n1.bridge_ip(), peer_bulk))),
        ),
    ];
    // Every path answers before measuring (the route is programmed, the tunnel is up).
    for col in &columns {
        eventually(Duration::from_secs(10), || {
            let r = col.client.http_get(&HttpGetArgs::new(col.url.parse()?))?;
            ensure!(r.by_status.get(&200) == Some(&1), "{}: {r:?}", col.name);
            Ok(())
        })?;
    }
    // One unrecorded second of load per column: every column's connections (TLS handshakes
    // included) are open before anything is measured.
    step!("warm-up: 1 s of load per column");
    for col in &columns {
        let warm = HttpLoadArgs::new(col.url.parse()?, options.rate, Duration::from_secs(1))
            .connections(LOAD_CONNECTIONS);
        col.client.http_load(&warm)?;
    }
    let mut watched = Watched {
        pids: [agent_pid(&n1)?, agent_pid(&n2)?],
        peak_kb: [0, 0],
    };
    let mut rounds = crate::progress::Steps::new("round", repeats);
    for _ in 1..=repeats {
        rounds.advance(&format!(
            "{} req/s for {}s per column, then a {}s bulk stream",
            options.rate, options.secs, options.secs
        ));
        for col in &mut columns {
            let weft = col.name.starts_with("weft");
            run_column(col, options, weft.then_some(&mut watched))?;
        }
    }
    rounds.finish();
    let [direct, tunnel, l7, peer] = &columns;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let r = Report {
        tool: "weft-workload http-load (fixed rate, 16 keep-alive connections) and stream",
        secs_per_run: options.secs,
        rate_rps: options.rate,
        repeats,
        direct_p50_us: median(direct.p50.clone()),
        direct_p99_us: median(direct.p99.clone()),
        weft_tunnel_p50_us: median(tunnel.p50.clone()),
        weft_tunnel_p99_us: median(tunnel.p99.clone()),
        weft_l7_p50_us: median(l7.p50.clone()),
        weft_l7_p99_us: median(l7.p99.clone()),
        peer_tls_p50_us: median(peer.p50.clone()),
        peer_tls_p99_us: median(peer.p99.clone()),
        direct_gbps: median(direct.gbps.clone()),
        weft_tunnel_gbps: median(tunnel.gbps.clone()),
        peer_tls_gbps: median(peer.gbps.clone()),
        added_p99_ratio: 0.0,
        gbps_ratio: 0.0,
        added_p99_ratio_per_round: direct
            .p99
            .iter()
            .zip(&tunnel.p99)
            .zip(&peer.p99)
            .map(|((d, t), p)| ratio(t - d, p - d))
            .collect(),
        client_agent_rss_mb: mib(watched.peak_kb[0]),
        server_agent_rss_mb: mib(watched.peak_kb[1]),
        tunnel_streams: a2.metric(
            "weft_tunnel_streams_total",
            &[("direction", "inbound"), ("result", "ok")],
        )?,
    };
    let r = Report {
        added_p99_ratio: ratio(
            r.weft_tunnel_p99_us - r.direct_p99_us,
            r.peer_tls_p99_us - r.direct_p99_us,
        ),
        gbps_ratio: ratio(r.weft_tunnel_gbps, r.peer_tls_gbps),
        ..r
    };
    println!();
    println!(
        "{:<22} {:>10} {:>12} {:>15} {:>10}",
        "cross-node", "direct", "weft tunnel", "weft l7+tunnel", "peer tls"
    );
    println!(
        "{:<22} {:>10.0} {:>12.0} {:>15.0} {:>10.0}",
        "p50 (µs)", r.direct_p50_us, r.weft_tunnel_p50_us, r.weft_l7_p50_us, r.peer_tls_p50_us
    );
    println!(
        "{:<22} {:>10.0} {:>12.0} {:>15.0} {:>10.0}",
        "p99 (µs)", r.direct_p99_us, r.weft_tunnel_p99_us, r.weft_l7_p99_us, r.peer_tls_p99_us
    );
    println!(
        "{:<22} {:>10.2} {:>12.2} {:>15} {:>10.2}",
        "bulk (Gbit/s)", r.direct_gbps, r.weft_tunnel_gbps, "-", r.peer_tls_gbps
    );
    println!(
        "added p99, weft tunnel / peer pair: {:.2} (target ≤ {TARGET_ADDED_P99_RATIO}); \
         bulk, weft / peer: {:.2} (target ≥ {TARGET_GBPS_RATIO})",
        r.added_p99_ratio, r.gbps_ratio
    );
    println!(
        "added p99 ratio per round: {}",
        r.added_p99_ratio_per_round
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "agent RSS peak: client node {:.1} MiB, server node {:.1} MiB; tunnel streams {:.0}",
        r.client_agent_rss_mb, r.server_agent_rss_mb, r.tunnel_streams
    );
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&r)?)?;
        step!("wrote {}", path.display());
    }
    for p in proxies {
        p.stop()?;
    }
    drop((a1, a2));
    let left = tb.teardown()?;
    ensure!(
        left.is_empty(),
        "the benchmark left something behind: {left:?}"
    );
    Ok(())
}
