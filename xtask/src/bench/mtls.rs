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
//! - `ztunnel` (with `--ztunnel BIN`): a pair of Istio's ztunnel doing the same job as Weft's
//!   tunnel (HBONE), in unmeshed pods of their own (see [`super::ztunnel`]). Without a binary the
//!   report names Istio's published figures instead, labelled as such.
//!
//! Each column, each round: `weft-workload http-load` at a fixed rate over 16 keep-alive
//! connections (latency from the intended send time, like wrk2: no coordinated omission), GET of
//! a 1 KiB body, p50/p99; the CPU time the system under test spent in that run (both sides,
//! `utime + stime` from `/proc`) per 1000 requests; requests/s at saturation (`wrk -t1 -c32`,
//! closed loop); and for the L4 columns a bulk stream (`weft-workload stream`, one TCP
//! connection). The order of the columns rotates each round; medians over rounds, with a 95 %
//! interval of the median for the p99s and the per-round ratios. Peak RSS (the kernel's `VmHWM`)
//! of each side during its column's runs.
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

use super::{
    l7::{
        Interval, Options, TICKS_PER_SEC, agent_pid, cpu_ticks, mib, peak_rss_kb, reset_peak_rss,
    },
    median,
    proxies::Proxy,
    wrk, ztunnel,
};
use crate::step;

const WEB_VIP: &str = "198.19.0.50";
const LOAD_CONNECTIONS: u32 = 16;
/// What every fixed-rate request asks for: a 1 KiB body.
const PATH: &str = "/bytes/1024";
/// Targets of issue 16: Weft's added p99 at most half the peer pair's and half ztunnel's; bulk
/// at least 1.5 × the haproxy pair's; CPU per 1000 requests no more than ztunnel's.
const TARGET_ADDED_P99_RATIO: f64 = 0.5;
const TARGET_GBPS_RATIO: f64 = 1.5;
const TARGET_CPU_RATIO: f64 = 1.0;

#[derive(Debug, Serialize)]
#[allow(clippy::struct_field_names, reason = "flat JSON for scripts")]
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
    /// `null` when no ztunnel binary was given (see `ztunnel_reference`).
    ztunnel_p50_us: Option<f64>,
    ztunnel_p99_us: Option<f64>,
    /// The p99 of each round: median and 95 % interval of the median.
    direct_p99_ci: Option<Interval>,
    weft_tunnel_p99_ci: Option<Interval>,
    weft_l7_p99_ci: Option<Interval>,
    peer_tls_p99_ci: Option<Interval>,
    ztunnel_p99_ci: Option<Interval>,
    direct_gbps: f64,
    weft_tunnel_gbps: f64,
    peer_tls_gbps: f64,
    ztunnel_gbps: Option<f64>,
    /// Requests/s at saturation (`wrk -t1 -c32`, closed loop).
    direct_max_rps: f64,
    weft_tunnel_max_rps: f64,
    weft_l7_max_rps: f64,
    peer_tls_max_rps: f64,
    ztunnel_max_rps: Option<f64>,
    /// CPU seconds both sides of the system under test spent per 1000 requests in the
    /// fixed-rate runs (= vCPUs used at 1000 requests/s).
    weft_cpu_per_krps: f64,
    weft_l7_cpu_per_krps: f64,
    haproxy_cpu_per_krps: f64,
    ztunnel_cpu_per_krps: Option<f64>,
    /// (weft tunnel p99 − direct p99) / (peer p99 − direct p99): target ≤ 0.5.
    added_p99_ratio: f64,
    /// The same ratio round by round (the columns of one round run back to back).
    added_p99_ratio_per_round: Vec<f64>,
    added_p99_ratio_ci: Option<Interval>,
    /// (weft tunnel p99 − direct p99) / (ztunnel p99 − direct p99): target ≤ 0.5.
    added_p99_ratio_vs_ztunnel: Option<f64>,
    added_p99_ratio_vs_ztunnel_ci: Option<Interval>,
    /// weft tunnel / peer pair bulk: target ≥ 1.5.
    gbps_ratio: f64,
    /// weft tunnel / ztunnel bulk.
    gbps_ratio_vs_ztunnel: Option<f64>,
    /// weft / ztunnel CPU per 1000 requests: target ≤ 1.
    cpu_ratio_vs_ztunnel: Option<f64>,
    /// Peak RSS (`VmHWM`) of each agent during the weft runs, bulk included (MiB).
    client_agent_rss_mb: f64,
    server_agent_rss_mb: f64,
    ztunnel_client_rss_mb: Option<f64>,
    ztunnel_server_rss_mb: Option<f64>,
    /// `ztunnel version` of the binary measured.
    ztunnel_version: Option<String>,
    /// Without a binary: why, and the published figures (not measured here).
    ztunnel_reference: Option<String>,
    /// Evidence: streams the server's agent accepted.
    tunnel_streams: f64,
}

/// One column: who sends, to which HTTP URL and bulk sink, and which processes do the work.
struct Column {
    name: &'static str,
    client: Pod,
    url: String,
    sink: Option<SocketAddr>,
    /// Both sides of the system under test (none for direct).
    pids: Vec<u32>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    gbps: Vec<f64>,
    max_rps: Vec<f64>,
    cpu_per_krps: Vec<f64>,
    /// Per pid, the highest `VmHWM` seen (KiB).
    peak_kb: Vec<u64>,
}

impl Column {
    fn new(name: &'static str, client: &Pod, url: String, sink: Option<SocketAddr>) -> Self {
        Self {
            name,
            client: client.clone(),
            url,
            sink,
            pids: Vec::new(),
            p50: Vec::new(),
            p99: Vec::new(),
            gbps: Vec::new(),
            max_rps: Vec::new(),
            cpu_per_krps: Vec::new(),
            peak_kb: Vec::new(),
        }
    }

    fn run_by(mut self, pids: Vec<u32>) -> Self {
        self.peak_kb = vec![0; pids.len()];
        self.pids = pids;
        self
    }

    fn peak_mb(&self, side: usize) -> f64 {
        mib(self.peak_kb.get(side).copied().unwrap_or(0))
    }
}

fn run_column(col: &mut Column, options: &Options) -> Result<()> {
    let load = HttpLoadArgs::new(
        col.url.parse()?,
        options.rate,
        Duration::from_secs(options.secs),
    )
    .connections(LOAD_CONNECTIONS);
    for pid in &col.pids {
        reset_peak_rss(*pid)?;
    }
    let before = cpu_ticks(&col.pids)?;
    let report = col.client.http_load(&load)?;
    let used = cpu_ticks(&col.pids)? - before;
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
    if !col.pids.is_empty() {
        #[allow(clippy::cast_precision_loss, reason = "tick and request counts")]
        col.cpu_per_krps
            .push(used as f64 / TICKS_PER_SEC / report.completed as f64 * 1000.0);
    }
    let saturated = wrk::run(&col.client, &col.url, options.secs, None)?;
    col.max_rps.push(saturated.rps);
    if let Some(sink) = col.sink {
        let s = col.client.stream(sink, Duration::from_secs(options.secs))?;
        ensure!(s.ok, "{}: stream failed: {:?}", col.name, s.error);
        col.gbps.push(s.gbps);
    }
    for (peak, pid) in col.peak_kb.iter_mut().zip(&col.pids) {
        *peak = (*peak).max(peak_rss_kb(*pid)?);
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

/// The ztunnel column's pods (unmeshed: Weft leaves them alone) and the pair in them.
struct ZtunnelSide {
    pair: ztunnel::Pair,
    client: Pod,
    server: Pod,
    _servers: (HttpServer, Server),
}

fn ztunnel_side(bin: &Path, n1: &Node, n2: &Node, client: Pod, server: Pod) -> Result<ZtunnelSide> {
    step!("starting a ztunnel pair ({})", bin.display());
    crate::setup::ensure_packages(&["nftables"])?;
    let servers = servers(&server)?;
    let pair = ztunnel::Pair::start(
        bin,
        &n1.run_dir().join("ztunnel"),
        (&client, n1.name()),
        (&server, n2.name()),
        &[8080, 7001],
    )?;
    step!("ztunnel: {}", pair.version);
    Ok(ZtunnelSide {
        pair,
        client,
        server,
        _servers: servers,
    })
}

/// Runs every column once per round, starting one column later each round.
fn rounds(columns: &mut [Column], options: &Options) -> Result<()> {
    let repeats = options.repeats.max(1);
    let mut progress = crate::progress::Steps::new("round", repeats);
    for round in 0..repeats {
        progress.advance(&format!(
            "per column: {} req/s for {}s, {}s at saturation, a {}s bulk stream",
            options.rate, options.secs, options.secs, options.secs
        ));
        for i in 0..columns.len() {
            let col = &mut columns[(i + round) % columns.len()];
            run_column(col, options)?;
        }
    }
    progress.finish();
    Ok(())
}

/// `(x p99 − direct p99) / (y p99 − direct p99)` round by round.
fn added_ratio_per_round(direct: &Column, x: &Column, y: &Column) -> Vec<f64> {
    direct
        .p99
        .iter()
        .zip(&x.p99)
        .zip(&y.p99)
        .map(|((d, a), b)| ratio(a - d, b - d))
        .collect()
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

#[allow(clippy::too_many_lines, reason = "one linear measurement script")]
pub fn mtls(
    weft: &Path,
    workload: &Path,
    options: &Options,
    ztunnel_bin: Option<&Path>,
    json: Option<&Path>,
) -> Result<()> {
    testbed::use_binaries(weft, workload)?;
    if let Some(bin) = ztunnel_bin {
        ensure!(bin.is_file(), "--ztunnel {}: no such file", bin.display());
    }
    step!("bench mtls: two nodes linked by the fabric; client pods on n1, servers on n2");
    let tb = Testbed::new("bench-mtls")?;
    let n1 = tb.node("n1")?;
    let n2 = tb.node("n2")?;
    let client = n1.pod("client")?;
    let plain = n1.pod("plain")?;
    let server = n2.pod("server")?;
    let bare = n2.pod("bare")?;
    let mut objects = vec![
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
    ];
    // ztunnel's pods are declared unmeshed, so the agents leave their traffic alone.
    let zpods = match ztunnel_bin {
        Some(_) => {
            let (zc, zs) = (n1.pod("zclient")?, n2.pod("zserver")?);
            objects.push(zc.manifest_unmeshed(&[("app", "zclient")], "zclient"));
            objects.push(zs.manifest_unmeshed(&[("app", "zserver")], "zserver"));
            Some((zc, zs))
        }
        None => None,
    };
    let objects = objects.join("\n---\n");
    let ca = agent::identity_args(&n1)?;
    let mut args: Vec<&str> = ca.iter().map(String::as_str).collect();
    args.extend(Agent::PRODUCTION_INTERVALS);
    let a1 = Agent::start(&n1, &args)?;
    let a2 = Agent::start(&n2, &args)?;
    for a in [&a1, &a2] {
        a.apply("objects.yaml", &objects)?;
        a.wait_workloads(if zpods.is_some() { 6 } else { 4 })?;
    }
    let _servers = [servers(&server)?, servers(&bare)?];
    let (proxies, peer_http, peer_bulk) = peer_pair(&n1, &n2, &bare, &ca)?;
    let zt = match (ztunnel_bin, zpods) {
        (Some(bin), Some((zc, zs))) => Some(ztunnel_side(bin, &n1, &n2, zc, zs)?),
        _ => None,
    };
    let agents = vec![agent_pid(&n1)?, agent_pid(&n2)?];
    let mut columns = vec![
        Column::new(
            "direct",
            &plain,
            format!("http://{}:8080{PATH}", bare.ip()),
            Some(SocketAddr::from((bare.ip(), 7001))),
        ),
        Column::new(
            "weft tunnel",
            &client,
            format!("http://{}:8080{PATH}", server.ip()),
            Some(SocketAddr::from((server.ip(), 7001))),
        )
        .run_by(agents.clone()),
        Column::new(
            "weft l7+tunnel",
            &client,
            format!("http://{WEB_VIP}{PATH}"),
            None,
        )
        .run_by(agents),
        Column::new(
            "peer tls",
            &plain,
            format!("http://{}:{peer_http}{PATH}", n1.bridge_ip()),
            Some(SocketAddr::from((n1.bridge_ip(), peer_bulk))),
        )
        .run_by(proxies.iter().map(Proxy::pid).collect()),
    ];
    if let Some(z) = &zt {
        columns.push(
            Column::new(
                "ztunnel",
                &z.client,
                format!("http://{}:8080{PATH}", z.server.ip()),
                Some(SocketAddr::from((z.server.ip(), 7001))),
            )
            .run_by(z.pair.pids()),
        );
    }
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
    rounds(&mut columns, options)?;
    let r = report(
        &columns,
        options,
        zt.as_ref().map(|z| z.pair.version.clone()),
    )?;
    let r = Report {
        tunnel_streams: a2.metric(
            "weft_tunnel_streams_total",
            &[("direction", "inbound"), ("result", "ok")],
        )?,
        ..r
    };
    print_report(&r);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&r)?)?;
        step!("wrote {}", path.display());
    }
    if let Some(z) = zt {
        z.pair.stop()?;
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

fn report(
    columns: &[Column],
    options: &Options,
    ztunnel_version: Option<String>,
) -> Result<Report> {
    let [direct, tunnel, l7, peer, rest @ ..] = columns else {
        anyhow::bail!("bench mtls measures at least four columns");
    };
    let zt = rest.first();
    let med = |v: &[f64]| median(v.to_vec());
    let ci = |c: &Column| Interval::of(c.p99.clone());
    let per_round = added_ratio_per_round(direct, tunnel, peer);
    let vs_zt = zt.map(|z| added_ratio_per_round(direct, tunnel, z));
    let added = |c: &Column| med(&c.p99) - med(&direct.p99);
    Ok(Report {
        tool: "weft-workload http-load (fixed rate, 16 keep-alive connections, GET 1 KiB), \
               wrk -t1 -c32 (saturation) and weft-workload stream (bulk)",
        secs_per_run: options.secs,
        rate_rps: options.rate,
        repeats: options.repeats.max(1),
        direct_p50_us: med(&direct.p50),
        direct_p99_us: med(&direct.p99),
        weft_tunnel_p50_us: med(&tunnel.p50),
        weft_tunnel_p99_us: med(&tunnel.p99),
        weft_l7_p50_us: med(&l7.p50),
        weft_l7_p99_us: med(&l7.p99),
        peer_tls_p50_us: med(&peer.p50),
        peer_tls_p99_us: med(&peer.p99),
        ztunnel_p50_us: zt.map(|z| med(&z.p50)),
        ztunnel_p99_us: zt.map(|z| med(&z.p99)),
        direct_p99_ci: ci(direct),
        weft_tunnel_p99_ci: ci(tunnel),
        weft_l7_p99_ci: ci(l7),
        peer_tls_p99_ci: ci(peer),
        ztunnel_p99_ci: zt.and_then(ci),
        direct_gbps: med(&direct.gbps),
        weft_tunnel_gbps: med(&tunnel.gbps),
        peer_tls_gbps: med(&peer.gbps),
        ztunnel_gbps: zt.map(|z| med(&z.gbps)),
        direct_max_rps: med(&direct.max_rps),
        weft_tunnel_max_rps: med(&tunnel.max_rps),
        weft_l7_max_rps: med(&l7.max_rps),
        peer_tls_max_rps: med(&peer.max_rps),
        ztunnel_max_rps: zt.map(|z| med(&z.max_rps)),
        weft_cpu_per_krps: med(&tunnel.cpu_per_krps),
        weft_l7_cpu_per_krps: med(&l7.cpu_per_krps),
        haproxy_cpu_per_krps: med(&peer.cpu_per_krps),
        ztunnel_cpu_per_krps: zt.map(|z| med(&z.cpu_per_krps)),
        added_p99_ratio: ratio(added(tunnel), added(peer)),
        added_p99_ratio_ci: Interval::of(per_round.clone()),
        added_p99_ratio_per_round: per_round,
        added_p99_ratio_vs_ztunnel: zt.map(|z| ratio(added(tunnel), added(z))),
        added_p99_ratio_vs_ztunnel_ci: vs_zt.and_then(Interval::of),
        gbps_ratio: ratio(med(&tunnel.gbps), med(&peer.gbps)),
        gbps_ratio_vs_ztunnel: zt.map(|z| ratio(med(&tunnel.gbps), med(&z.gbps))),
        cpu_ratio_vs_ztunnel: zt.map(|z| ratio(med(&tunnel.cpu_per_krps), med(&z.cpu_per_krps))),
        client_agent_rss_mb: tunnel.peak_mb(0).max(l7.peak_mb(0)),
        server_agent_rss_mb: tunnel.peak_mb(1).max(l7.peak_mb(1)),
        ztunnel_client_rss_mb: zt.map(|z| z.peak_mb(0)),
        ztunnel_server_rss_mb: zt.map(|z| z.peak_mb(1)),
        ztunnel_reference: ztunnel_version.is_none().then(|| {
            format!(
                "no ztunnel binary given (--ztunnel BIN): not run. {}",
                ztunnel::PUBLISHED
            )
        }),
        ztunnel_version,
        tunnel_streams: 0.0,
    })
}

fn print_report(r: &Report) {
    let opt =
        |v: Option<f64>, prec: usize| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"));
    println!();
    println!(
        "{:<26} {:>10} {:>12} {:>15} {:>10} {:>10}",
        "cross-node", "direct", "weft tunnel", "weft l7+tunnel", "peer tls", "ztunnel"
    );
    println!(
        "{:<26} {:>10.0} {:>12.0} {:>15.0} {:>10.0} {:>10}",
        "p50 (µs)",
        r.direct_p50_us,
        r.weft_tunnel_p50_us,
        r.weft_l7_p50_us,
        r.peer_tls_p50_us,
        opt(r.ztunnel_p50_us, 0)
    );
    println!(
        "{:<26} {:>10.0} {:>12.0} {:>15.0} {:>10.0} {:>10}",
        "p99 (µs)",
        r.direct_p99_us,
        r.weft_tunnel_p99_us,
        r.weft_l7_p99_us,
        r.peer_tls_p99_us,
        opt(r.ztunnel_p99_us, 0)
    );
    println!(
        "{:<26} {:>10.0} {:>12.0} {:>15.0} {:>10.0} {:>10}",
        "max requests/s",
        r.direct_max_rps,
        r.weft_tunnel_max_rps,
        r.weft_l7_max_rps,
        r.peer_tls_max_rps,
        opt(r.ztunnel_max_rps, 0)
    );
    println!(
        "{:<26} {:>10.2} {:>12.2} {:>15} {:>10.2} {:>10}",
        "bulk (Gbit/s)",
        r.direct_gbps,
        r.weft_tunnel_gbps,
        "-",
        r.peer_tls_gbps,
        opt(r.ztunnel_gbps, 2)
    );
    println!(
        "{:<26} {:>10} {:>12.3} {:>15.3} {:>10.3} {:>10}",
        "vCPU·s per 1000 requests",
        "-",
        r.weft_cpu_per_krps,
        r.weft_l7_cpu_per_krps,
        r.haproxy_cpu_per_krps,
        opt(r.ztunnel_cpu_per_krps, 3)
    );
    let interval = |i: &Option<Interval>| {
        i.as_ref()
            .map_or_else(|| "-".to_owned(), ToString::to_string)
    };
    println!(
        "added p99, weft tunnel / peer pair: {} (target ≤ {TARGET_ADDED_P99_RATIO}; {})",
        interval(&r.added_p99_ratio_ci),
        r.added_p99_ratio_ci
            .as_ref()
            .map_or("no rounds", |i| i.side_of(TARGET_ADDED_P99_RATIO))
    );
    match (&r.added_p99_ratio_vs_ztunnel_ci, &r.ztunnel_reference) {
        (Some(i), _) => println!(
            "added p99, weft tunnel / ztunnel: {i} (target ≤ {TARGET_ADDED_P99_RATIO}; {}); \
             CPU per 1000 requests, weft / ztunnel: {} (target ≤ {TARGET_CPU_RATIO}); \
             bulk, weft / ztunnel: {}",
            i.side_of(TARGET_ADDED_P99_RATIO),
            opt(r.cpu_ratio_vs_ztunnel, 2),
            opt(r.gbps_ratio_vs_ztunnel, 2)
        ),
        (None, Some(reference)) => println!("ztunnel: {reference}"),
        (None, None) => {}
    }
    println!(
        "bulk, weft / peer pair: {:.2} (target ≥ {TARGET_GBPS_RATIO})",
        r.gbps_ratio
    );
    println!(
        "peak RSS: weft agents {:.1} / {:.1} MiB (client / server node), ztunnels {} / {} MiB; \
         tunnel streams {:.0}",
        r.client_agent_rss_mb,
        r.server_agent_rss_mb,
        opt(r.ztunnel_client_rss_mb, 1),
        opt(r.ztunnel_server_rss_mb, 1),
        r.tunnel_streams
    );
    if let Some(v) = &r.ztunnel_version {
        println!("ztunnel: {v}");
    }
}
