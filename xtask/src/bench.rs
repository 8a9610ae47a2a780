//! `cargo xtask bench l4` (here), `cargo xtask bench l7` (in `l7`, with the reverse proxies
//! it compares with in `proxies` and its `wrk` driver) and `cargo xtask bench mtls` (in `mtls`).
//!
//! `bench l4`: same-node pod-to-pod TCP, without a mesh and with Weft's socket fast
//! path, measured side by side in one run on two identical testbed nodes. Runs alternate
//! (baseline, mesh, baseline, mesh, …) so that drift on the machine hits both equally; the
//! median of the repeats is reported.
//!
//! The load generator is the project's own `weft-workload` (Rust, std sockets): `rr` is a
//! netperf TCP_RR-style ping-pong on one connection, `stream` a TCP_STREAM-style bulk send.
use std::{path::Path, time::Duration};

use anyhow::{Result, ensure};
use serde::Serialize;
use testbed::{Pod, ServeMode, Testbed, agent::Agent};

use crate::step;

mod h2load;
mod l7;
mod mtls;
mod proxies;
mod scale;
mod soak;
mod wrk;
mod ztunnel;

pub use l7::{Options as RateOptions, l7};
pub use mtls::mtls;
pub use scale::{Options as ScaleOptions, scale};
pub use soak::{Options as SoakOptions, soak};

#[derive(Debug, Default, Clone, Copy, Serialize)]
struct Rr {
    tps: f64,
    p50_us: f64,
    p99_us: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    tool: &'static str,
    secs_per_run: u64,
    repeats: usize,
    baseline_rr_p50_us: f64,
    mesh_rr_p50_us: f64,
    baseline_rr_p99_us: f64,
    mesh_rr_p99_us: f64,
    baseline_rr_tps: f64,
    mesh_rr_tps: f64,
    baseline_rr_1k_p50_us: f64,
    mesh_rr_1k_p50_us: f64,
    baseline_rr_1k_p99_us: f64,
    mesh_rr_1k_p99_us: f64,
    baseline_rr_1k_tps: f64,
    mesh_rr_1k_tps: f64,
    baseline_stream_gbps: f64,
    mesh_stream_gbps: f64,
    /// mesh / baseline: latency target ≤ 0.85, throughput target ≥ 1.2.
    ratio_rr_p50: f64,
    ratio_rr_p99: f64,
    ratio_rr_1k_p50: f64,
    ratio_rr_1k_p99: f64,
    ratio_stream: f64,
    /// Evidence that the mesh runs used the fast path: bytes redirected in the kernel.
    mesh_fast_path_bytes: f64,
    /// A third node whose agent runs with `--ebpf-log debug` (every program log statement
    /// loaded), against the mesh node with logs off: what the logs cost on the fast path.
    log_debug_rr_p50_us: f64,
    log_debug_rr_p99_us: f64,
    log_debug_stream_gbps: f64,
    /// log debug ÷ log off (1.0: no difference).
    ratio_log_debug_rr_p50: f64,
    ratio_log_debug_rr_p99: f64,
    ratio_log_debug_stream: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

struct Side {
    client: Pod,
    echo: std::net::SocketAddr,
    sink: std::net::SocketAddr,
    _servers: Vec<testbed::Server>,
}

fn side(client: Pod, server: &Pod) -> Result<Side> {
    let echo = server.serve(ServeMode::Echo, 7000)?;
    let sink = server.serve(ServeMode::Sink, 7001)?;
    Ok(Side {
        client,
        echo: echo.addr(),
        sink: sink.addr(),
        _servers: vec![echo, sink],
    })
}

fn round_trip(side: &Side, payload: usize, secs: u64) -> Result<Rr> {
    let r = side
        .client
        .rr(side.echo, payload, Duration::from_secs(secs))?;
    ensure!(r.error.is_none(), "rr failed: {:?}", r.error);
    Ok(Rr {
        tps: r.tps,
        p50_us: r.p50_us,
        p99_us: r.p99_us,
    })
}

fn stream(side: &Side, secs: u64) -> Result<f64> {
    let r = side.client.stream(side.sink, Duration::from_secs(secs))?;
    ensure!(r.ok, "stream failed: {:?}", r.error);
    Ok(r.gbps)
}

#[allow(clippy::too_many_lines, reason = "one linear measurement script")]
pub fn l4(
    weft: &Path,
    workload: &Path,
    secs: u64,
    repeats: usize,
    json: Option<&Path>,
) -> Result<()> {
    testbed::use_binaries(weft, workload)?;
    let repeats = repeats.max(1);
    step!("bench l4: two identical nodes, one without a mesh, one with Weft's fast path");
    let tb = Testbed::new("bench-l4")?;
    let base_node = tb.node("base")?;
    let mesh_node = tb.node("mesh")?;
    let log_node = tb.node("meshlog")?;
    let (bc, bs) = (base_node.pod("client")?, base_node.pod("server")?);
    let meshed = |node: &testbed::Node, extra: &[&str]| -> Result<(Agent, Pod, Pod)> {
        let (c, s) = (node.pod("client")?, node.pod("server")?);
        let args: Vec<&str> = Agent::PRODUCTION_INTERVALS
            .iter()
            .copied()
            .chain(extra.iter().copied())
            .collect();
        let agent = Agent::start(node, &args)?;
        agent.enable_socket_fast_path()?;
        agent.apply(
            "pods.yaml",
            &[
                c.manifest(&[("app", "client")], "client"),
                s.manifest(&[("app", "server")], "server"),
            ]
            .join("\n---\n"),
        )?;
        agent.wait_workloads(2)?;
        Ok((agent, c, s))
    };
    let (agent, mc, ms) = meshed(&mesh_node, &[])?;
    let (log_agent, lc, ls) = meshed(&log_node, &["--ebpf-log", "debug"])?;
    let base = side(bc, &bs)?;
    let mesh = side(mc, &ms)?;
    let logged = side(lc, &ls)?;

    // base 1B, mesh 1B, base 1K, mesh 1K, log debug 1B
    let mut samples: [Vec<Rr>; 5] = Default::default();
    let mut gbps: [Vec<f64>; 3] = Default::default();
    let mut rounds = crate::progress::Steps::new("round", repeats);
    for _ in 1..=repeats {
        rounds.advance(&format!(
            "request/response 1 B and 1 KiB, then bulk stream ({secs}s each)"
        ));
        for (i, s) in [&base, &mesh].into_iter().enumerate() {
            samples[i].push(round_trip(s, 1, secs)?);
            samples[2 + i].push(round_trip(s, 1024, secs)?);
            gbps[i].push(stream(s, secs)?);
        }
        samples[4].push(round_trip(&logged, 1, secs)?);
        gbps[2].push(stream(&logged, secs)?);
    }
    rounds.finish();
    let pick = |i: usize, f: fn(&Rr) -> f64| median(samples[i].iter().map(f).collect());
    let fast = agent.metric("weft_tcp_fast_path_bytes_total", &[])?;
    let r = Report {
        tool: "weft-workload (Rust; rr = TCP_RR-style ping-pong, stream = TCP_STREAM-style bulk)",
        secs_per_run: secs,
        repeats,
        baseline_rr_p50_us: pick(0, |r| r.p50_us),
        mesh_rr_p50_us: pick(1, |r| r.p50_us),
        baseline_rr_p99_us: pick(0, |r| r.p99_us),
        mesh_rr_p99_us: pick(1, |r| r.p99_us),
        baseline_rr_tps: pick(0, |r| r.tps),
        mesh_rr_tps: pick(1, |r| r.tps),
        baseline_rr_1k_p50_us: pick(2, |r| r.p50_us),
        mesh_rr_1k_p50_us: pick(3, |r| r.p50_us),
        baseline_rr_1k_p99_us: pick(2, |r| r.p99_us),
        mesh_rr_1k_p99_us: pick(3, |r| r.p99_us),
        baseline_rr_1k_tps: pick(2, |r| r.tps),
        mesh_rr_1k_tps: pick(3, |r| r.tps),
        baseline_stream_gbps: median(gbps[0].clone()),
        mesh_stream_gbps: median(gbps[1].clone()),
        ratio_rr_p50: 0.0,
        ratio_rr_p99: 0.0,
        ratio_rr_1k_p50: 0.0,
        ratio_rr_1k_p99: 0.0,
        ratio_stream: 0.0,
        mesh_fast_path_bytes: fast,
        log_debug_rr_p50_us: pick(4, |r| r.p50_us),
        log_debug_rr_p99_us: pick(4, |r| r.p99_us),
        log_debug_stream_gbps: median(gbps[2].clone()),
        ratio_log_debug_rr_p50: 0.0,
        ratio_log_debug_rr_p99: 0.0,
        ratio_log_debug_stream: 0.0,
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let r = Report {
        ratio_rr_p50: ratio(r.mesh_rr_p50_us, r.baseline_rr_p50_us),
        ratio_rr_p99: ratio(r.mesh_rr_p99_us, r.baseline_rr_p99_us),
        ratio_rr_1k_p50: ratio(r.mesh_rr_1k_p50_us, r.baseline_rr_1k_p50_us),
        ratio_rr_1k_p99: ratio(r.mesh_rr_1k_p99_us, r.baseline_rr_1k_p99_us),
        ratio_stream: ratio(r.mesh_stream_gbps, r.baseline_stream_gbps),
        ratio_log_debug_rr_p50: ratio(r.log_debug_rr_p50_us, r.mesh_rr_p50_us),
        ratio_log_debug_rr_p99: ratio(r.log_debug_rr_p99_us, r.mesh_rr_p99_us),
        ratio_log_debug_stream: ratio(r.log_debug_stream_gbps, r.mesh_stream_gbps),
        ..r
    };

    println!();
    println!(
        "{:<26} {:>12} {:>12} {:>9}  target",
        "same-node pod→pod TCP", "no mesh", "weft", "ratio"
    );
    let row = |name: &str, b: f64, m: f64, target: &str| {
        println!(
            "{name:<26} {b:>12.1} {m:>12.1} {:>9.2}  {target}",
            ratio(m, b)
        );
    };
    row(
        "rr 1 B p50 (µs)",
        r.baseline_rr_p50_us,
        r.mesh_rr_p50_us,
        "≤ 0.85",
    );
    row(
        "rr 1 B p99 (µs)",
        r.baseline_rr_p99_us,
        r.mesh_rr_p99_us,
        "≤ 0.85",
    );
    row(
        "rr 1 B transactions/s",
        r.baseline_rr_tps,
        r.mesh_rr_tps,
        "",
    );
    row(
        "rr 1 KiB p50 (µs)",
        r.baseline_rr_1k_p50_us,
        r.mesh_rr_1k_p50_us,
        "≤ 0.85",
    );
    row(
        "rr 1 KiB p99 (µs)",
        r.baseline_rr_1k_p99_us,
        r.mesh_rr_1k_p99_us,
        "≤ 0.85",
    );
    row(
        "rr 1 KiB transactions/s",
        r.baseline_rr_1k_tps,
        r.mesh_rr_1k_tps,
        "",
    );
    row(
        "stream (Gbit/s)",
        r.baseline_stream_gbps,
        r.mesh_stream_gbps,
        "≥ 1.2",
    );
    println!("fast-path bytes in the mesh runs: {fast:.0}");
    println!();
    println!(
        "{:<26} {:>12} {:>12} {:>9}",
        "the programs' logs", "--ebpf-log off", "debug", "ratio"
    );
    row(
        "rr 1 B p50 (µs)",
        r.mesh_rr_p50_us,
        r.log_debug_rr_p50_us,
        "",
    );
    row(
        "rr 1 B p99 (µs)",
        r.mesh_rr_p99_us,
        r.log_debug_rr_p99_us,
        "",
    );
    row(
        "stream (Gbit/s)",
        r.mesh_stream_gbps,
        r.log_debug_stream_gbps,
        "",
    );
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&r)?)?;
        step!("wrote {}", path.display());
    }
    drop((base, mesh, logged, bs, ms, ls));
    let mut agent = agent;
    agent.uninstall(&mesh_node)?;
    let mut log_agent = log_agent;
    log_agent.uninstall(&log_node)?;
    let left = tb.teardown()?;
    ensure!(
        left.is_empty(),
        "the benchmark left something behind: {left:?}"
    );
    Ok(())
}
