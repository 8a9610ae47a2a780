//! `cargo xtask bench scale`: what the control path costs as the cluster grows.
//!
//! A real API server (the tests' kube-apiserver 1.20 and etcd) holds 50 Node objects, 1000
//! Services and 1000 `AuthorizationPolicy` objects in namespace `scale`, and a growing number of Pods
//! spread over those nodes (each with an address, ready, selected by one Service and one
//! policy). One testbed node runs a Weft agent in Kubernetes mode (it watches every Pod,
//! Service and policy of the cluster, as on a real node) and `weft controller`; that node has two
//! real pods, `a` and `b`.
//!
//! At each size the bench makes `--changes` policy changes on the API server (alternately
//! creating and deleting a DENY policy for `a` → `b`) and measures the time from just before
//! the write request to the moment the kernel's verdict for `a`'s next connection attempt has
//! changed: `weft-workload verdict-watch` in pod `a` tries to connect to a port of `b` every
//! millisecond (refused by `b` while allowed, refused by the kernel with `EPERM` while denied)
//! and prints the wall-clock time of every change of outcome. That is the whole path a user
//! waits for: API server, watch, the agent's recompute, the maps, the programs.
//!
//! Per size it also reports the agent's and the controller's RSS, the CPU time they spent taking
//! in the new pods and per change, the bytes the agent received from the API server per change
//! (`bytes_received` of its TCP connections to the server, from `ss`), and writes `scale.svg`
//! (the curves).
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod as KubePod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde::Serialize;
use testbed::{Node, Proc, Testbed, agent::Agent, kube::ControlPlane};

use super::l7::{TICKS_PER_SEC, cpu_ticks, mib, status_kb};
use crate::step;

/// The synthetic cluster around the measured node.
const NODES: usize = 50;
const SERVICES: usize = 1000;
const POLICIES: usize = 1000;
const NAMESPACE: &str = "scale";
/// Synthetic pods' addresses: 198.19.128.0/18 (16,384), their nodes' 198.19.192.0/24.
const POD_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 128, 0);
const MAX_PODS: usize = 16_384;
const HOST_BASE: Ipv4Addr = Ipv4Addr::new(198, 19, 192, 1);
/// A port of pod `b` nothing listens on.
const PROBE_PORT: u16 = 7999;
/// Goal of issue 16: policy change to kernel maps, p99 at 10k pods.
const TARGET_P99_MS: f64 = 100.0;
/// In-flight API requests while creating pods.
const CONCURRENCY: usize = 16;
/// How long the agent and controller get to take in a new size.
const SETTLE_TIMEOUT: Duration = Duration::from_mins(5);
/// How long one change gets to reach the kernel before the bench gives up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
const EPERM: i64 = 1;
const ECONNREFUSED: i64 = 111;

pub struct Options {
    pub sizes: Vec<usize>,
    pub changes: usize,
}

#[derive(Debug, Serialize)]
struct Size {
    pods: usize,
    changes: usize,
    /// Time from the write request to the kernel's new verdict (ms).
    policy_to_map_p50_ms: f64,
    policy_to_map_p99_ms: f64,
    policy_to_map_max_ms: f64,
    /// Creating this size's new pods on the API server (create + status), seconds.
    create_secs: f64,
    /// From the last pod written until agent and controller were idle again, seconds.
    settle_secs: f64,
    agent_rss_mb: f64,
    agent_cpu_secs_taking_in_pods: f64,
    agent_cpu_ms_per_change: f64,
    /// KiB the agent received from the API server per change (its watch streams).
    agent_read_kb_per_change: f64,
    controller_rss_mb: f64,
    controller_cpu_secs_taking_in_pods: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    nodes: usize,
    services: usize,
    policies: usize,
    target_p99_ms: f64,
    sizes: Vec<Size>,
    /// Flat copies for scripts: `scale_policy_to_map_p99_ms_<N>k` and RSS/CPU per size.
    #[serde(flatten)]
    flat: serde_json::Map<String, serde_json::Value>,
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(POD_BASE) + u32::try_from(i).expect("bounded by MAX_PODS"))
}

fn node_name(i: usize) -> String {
    format!("scale-node-{:02}", i % NODES)
}

/// Namespace, nodes, Services and policies, one YAML document each.
fn background() -> Vec<String> {
    let mut docs = vec![format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}"
    )];
    for n in 0..NODES {
        docs.push(format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\n\
             status: {{addresses: [{{type: InternalIP, address: {}}}]}}",
            node_name(n),
            Ipv4Addr::from(u32::from(HOST_BASE) + u32::try_from(n).expect("50 nodes"))
        ));
    }
    for s in 0..SERVICES {
        docs.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: {NAMESPACE}}}\n\
             spec: {{selector: {{app: svc-{s}}}, ports: [{{port: 80, targetPort: 8080, protocol: TCP}}]}}"
        ));
    }
    for p in 0..POLICIES {
        docs.push(format!(
            "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: allow-{p}, namespace: {NAMESPACE}}}\n\
             spec:\n  selector: {{matchLabels: {{app: svc-{p}}}}}\n  action: ALLOW\n  rules:\n  \
             - from: [{{source: {{serviceAccounts: [svc-{}]}}}}]",
            (p + 1) % SERVICES
        ));
    }
    docs
}

/// The change the bench makes and reverts: `a` may no longer reach `b`.
const PROBE_POLICY: &str = "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: scale-probe, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  action: DENY
  rules:
  - from: [{source: {serviceAccounts: [a]}}]
";

/// Creates pods `range` on the API server (each: create, then its status), `CONCURRENCY` at once.
fn create_pods(cp: &ControlPlane, range: std::ops::Range<usize>) -> Result<()> {
    cp.block_on(move |client| async move {
        let api: Api<KubePod> = Api::namespaced(client, NAMESPACE);
        futures_util::stream::iter(range)
            .map(|i| {
                let api = api.clone();
                async move {
                    let name = format!("pod-{i:05}");
                    let app = format!("svc-{}", i % SERVICES);
                    let pod: KubePod = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": name, "labels": {"app": app}},
                        "spec": {
                            "serviceAccountName": app,
                            "nodeName": node_name(i),
                            "containers": [{"name": "app", "image": "scale"}],
                        },
                    }))?;
                    api.create(&PostParams::default(), &pod)
                        .await
                        .with_context(|| format!("creating {name}"))?;
                    let ip = pod_ip(i).to_string();
                    let status = serde_json::json!({"status": {
                        "phase": "Running",
                        "podIP": ip,
                        "podIPs": [{"ip": ip}],
                        "conditions": [{"type": "Ready", "status": "True"}],
                    }});
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await
                        .with_context(|| format!("the status of {name}"))?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<()>()
            .await
    })
}

/// Bytes `pid` has received on its TCP connections to the API server (`ss -ti`'s
/// `bytes_received`, summed over the sockets `ss -p` names it as the owner of).
fn api_bytes_received(node: &Node, pid: u32) -> Result<u64> {
    let filter = format!("dport = :{}", testbed::kube::API_PORT);
    let out = node
        .run(
            Duration::from_secs(10),
            "ss",
            ["-tinpH", "state", "established", filter.as_str()],
        )?
        .check()?;
    let owner = format!("pid={pid},");
    let mut total = 0;
    let mut mine = false;
    for line in out.stdout.lines() {
        if !line.starts_with(char::is_whitespace) {
            mine = line.contains(&owner);
        } else if mine {
            total += line
                .split_whitespace()
                .find_map(|t| t.strip_prefix("bytes_received:")?.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

#[allow(clippy::cast_precision_loss, reason = "tick counts")]
fn secs(ticks: u64) -> f64 {
    ticks as f64 / TICKS_PER_SEC
}

/// Waits until none of `pids` used more than 2 ticks (20 ms) of CPU in each of 3 half-second
/// samples in a row: the new objects are taken in.
fn settle(pids: &[u32]) -> Result<Duration> {
    let start = Instant::now();
    let mut quiet = 0;
    let mut last: Vec<u64> = pids
        .iter()
        .map(|p| cpu_ticks(&[*p]))
        .collect::<Result<_>>()?;
    while quiet < 3 {
        ensure!(
            start.elapsed() < SETTLE_TIMEOUT,
            "still busy after {SETTLE_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
        let now: Vec<u64> = pids
            .iter()
            .map(|p| cpu_ticks(&[*p]))
            .collect::<Result<_>>()?;
        quiet = if now.iter().zip(&last).all(|(n, l)| n - l <= 2) {
            quiet + 1
        } else {
            0
        };
        last = now;
    }
    Ok(start.elapsed().saturating_sub(Duration::from_millis(1500)))
}

fn unix_us_at(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The probe's line number `seq`: (ok, errno, unix µs).
fn probe_line(probe: &Proc, seq: u64) -> Result<(i64, i64)> {
    let line = probe.wait_for_line(CHANGE_TIMEOUT, |l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["seq"] == seq)
    })?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    Ok((
        v["errno"].as_i64().unwrap_or(0),
        v["unix_us"].as_i64().context("unix_us")?,
    ))
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "small counts"
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[allow(clippy::too_many_lines, reason = "one linear measurement script")]
pub fn scale(
    weft: &Path,
    workload: &Path,
    options: &Options,
    json: Option<&Path>,
    out_dir: &Path,
) -> Result<()> {
    let mut sizes = options.sizes.clone();
    sizes.sort_unstable();
    ensure!(
        sizes.last().is_some_and(|&n| n <= MAX_PODS),
        "sizes must be between 1 and {MAX_PODS} pods"
    );
    ensure!(options.changes >= 2, "--changes must be at least 2");
    let assets = crate::envtest::assets()?;
    // SAFETY: no other thread runs yet; the testbed's control plane reads it.
    unsafe { std::env::set_var("KUBEBUILDER_ASSETS", &assets) };
    testbed::use_binaries(weft, workload)?;
    step!(
        "bench scale: a real API server with {NODES} nodes, {SERVICES} Services, {POLICIES} \
         policies; pods {sizes:?}"
    );
    let tb = Testbed::new("bench-scale")?;
    let node = tb.node("n1")?;
    let cp = ControlPlane::start_with_weft_crds(&node)?;
    let (a, b) = (node.pod("a")?, node.pod("b")?);
    cp.apply(
        &[
            a.manifest(&[("app", "a")], "a"),
            b.manifest(&[("app", "b")], "b"),
        ]
        .join("\n---\n"),
    )?;
    let started = Instant::now();
    // In batches: the YAML parser's budget is per stream.
    for batch in background().chunks(100) {
        cp.apply(&batch.join("\n---\n"))?;
    }
    step!(
        "nodes, Services and policies written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let agent = Agent::start_kube(&node, &cp.kubeconfig_path()?, &Agent::PRODUCTION_INTERVALS)?;
    agent.wait_workloads(2)?;
    let controller = cp.spawn_controller(&[])?;
    let agent_pid = agent.pid().context("the agent runs")?;
    let pids = [agent_pid, controller.pid()];
    let probe_to = SocketAddr::from((b.ip(), PROBE_PORT));
    let probe = a.spawn(
        testbed::workload_bin(),
        [
            "verdict-watch",
            "--connect",
            &probe_to.to_string(),
            "--secs",
            "3600",
        ],
    )?;
    let (errno, _) = probe_line(&probe, 0)?;
    ensure!(
        errno == ECONNREFUSED,
        "a → b:{PROBE_PORT} should be refused by b before any change, got errno {errno}"
    );
    let mut seq = 1;
    let mut created = 0;
    let mut results = Vec::new();
    let mut progress = crate::progress::Steps::new("size", sizes.len());
    for &size in &sizes {
        progress.advance(&format!(
            "{size} pods, then {} policy changes",
            options.changes
        ));
        let cpu0 = [cpu_ticks(&pids[..1])?, cpu_ticks(&pids[1..])?];
        let t = Instant::now();
        create_pods(&cp, created..size.max(created))?;
        created = created.max(size);
        let create_secs = t.elapsed().as_secs_f64();
        let settle_secs = settle(&pids)?.as_secs_f64();
        let cpu1 = [cpu_ticks(&pids[..1])?, cpu_ticks(&pids[1..])?];
        let read0 = api_bytes_received(&node, agent_pid)?;
        step!(
            "{size} pods taken in ({create_secs:.1} s, settled in {settle_secs:.1} s); {} policy \
             changes",
            options.changes
        );
        let mut latencies = Vec::new();
        for change in 0..options.changes {
            let deny = change % 2 == 0;
            // From the moment the write leaves the client (its connection and discovery done).
            let sent = if deny {
                cp.apply_sent_at(PROBE_POLICY)?
            } else {
                cp.delete_sent_at(PROBE_POLICY)?
            };
            let t0 = unix_us_at(sent);
            let (errno, at) = probe_line(&probe, seq).with_context(|| {
                format!("change {change} at {size} pods never reached the kernel")
            })?;
            seq += 1;
            let want = if deny { EPERM } else { ECONNREFUSED };
            if errno != want {
                bail!("after change {change} the probe saw errno {errno}, expected {want}");
            }
            #[allow(clippy::cast_precision_loss, reason = "microseconds")]
            latencies.push((at - t0) as f64 / 1000.0);
            std::thread::sleep(Duration::from_millis(100));
        }
        let cpu2 = cpu_ticks(&[agent_pid])?;
        let read = api_bytes_received(&node, agent_pid)?.saturating_sub(read0);
        latencies.sort_by(f64::total_cmp);
        #[allow(clippy::cast_precision_loss, reason = "small counts")]
        let per_change = options.changes as f64;
        let s = Size {
            pods: size,
            changes: options.changes,
            policy_to_map_p50_ms: percentile(&latencies, 50.0),
            policy_to_map_p99_ms: percentile(&latencies, 99.0),
            policy_to_map_max_ms: latencies.last().copied().unwrap_or(0.0),
            create_secs,
            settle_secs,
            agent_rss_mb: mib(status_kb(agent_pid, "VmRSS")?),
            agent_cpu_secs_taking_in_pods: secs(cpu1[0] - cpu0[0]),
            agent_cpu_ms_per_change: secs(cpu2 - cpu1[0]) * 1000.0 / per_change,
            #[allow(clippy::cast_precision_loss, reason = "byte counts")]
            agent_read_kb_per_change: read as f64 / 1024.0 / per_change,
            controller_rss_mb: mib(status_kb(pids[1], "VmRSS")?),
            controller_cpu_secs_taking_in_pods: secs(cpu1[1] - cpu0[1]),
        };
        step!(
            "{size} pods: policy → kernel p50 {:.1} ms, p99 {:.1} ms; agent {:.1} MiB",
            s.policy_to_map_p50_ms,
            s.policy_to_map_p99_ms,
            s.agent_rss_mb
        );
        results.push(s);
    }
    progress.finish();
    let report = Report {
        nodes: NODES,
        services: SERVICES,
        policies: POLICIES,
        target_p99_ms: TARGET_P99_MS,
        flat: flat(&results),
        sizes: results,
    };
    print_table(&report);
    std::fs::create_dir_all(out_dir)?;
    let svg = out_dir.join("scale.svg");
    std::fs::write(&svg, chart(&report.sizes))
        .with_context(|| format!("writing {}", svg.display()))?;
    step!("wrote {}", svg.display());
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        step!("wrote {}", path.display());
    }
    drop(probe);
    drop(controller);
    drop(agent);
    drop(cp);
    let left = tb.teardown()?;
    ensure!(
        left.is_empty(),
        "the benchmark left something behind: {left:?}"
    );
    Ok(())
}

/// `1k` for 1000, `2500` otherwise.
fn size_key(pods: usize) -> String {
    if pods.is_multiple_of(1000) {
        format!("{}k", pods / 1000)
    } else {
        pods.to_string()
    }
}

fn flat(sizes: &[Size]) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    for s in sizes {
        let k = size_key(s.pods);
        for (name, v) in [
            ("scale_policy_to_map_p50_ms", s.policy_to_map_p50_ms),
            ("scale_policy_to_map_p99_ms", s.policy_to_map_p99_ms),
            ("scale_agent_rss_mb", s.agent_rss_mb),
            ("scale_agent_cpu_ms_per_change", s.agent_cpu_ms_per_change),
            ("scale_controller_rss_mb", s.controller_rss_mb),
            ("scale_agent_read_kb_per_change", s.agent_read_kb_per_change),
        ] {
            m.insert(format!("{name}_{k}"), serde_json::json!(v));
        }
    }
    m
}

fn print_table(r: &Report) {
    println!();
    println!(
        "{:>7} {:>10} {:>10} {:>10} {:>10} {:>12} {:>13} {:>10} {:>10}",
        "pods",
        "p50 ms",
        "p99 ms",
        "max ms",
        "agent MiB",
        "agent ms/chg",
        "agent KiB/chg",
        "ctrl MiB",
        "settle s"
    );
    for s in &r.sizes {
        println!(
            "{:>7} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>13.1} {:>10.1} {:>10.1}",
            s.pods,
            s.policy_to_map_p50_ms,
            s.policy_to_map_p99_ms,
            s.policy_to_map_max_ms,
            s.agent_rss_mb,
            s.agent_cpu_ms_per_change,
            s.agent_read_kb_per_change,
            s.controller_rss_mb,
            s.settle_secs
        );
    }
    if let Some(last) = r.sizes.last() {
        println!(
            "policy change → kernel, p99 at {} pods: {:.1} ms (target ≤ {TARGET_P99_MS} ms at \
             10k pods; with {} changes the p99 is the slowest but at most one)",
            last.pods, last.policy_to_map_p99_ms, last.changes
        );
    }
}

/// A chart panel: where, title, unit, and two series (name, colour, value of a size).
type Panel<'a, DB> = (
    &'a plotters::drawing::DrawingArea<DB, plotters::coord::Shift>,
    &'static str,
    &'static str,
    [(&'static str, plotters::style::RGBColor, fn(&Size) -> f64); 2],
);

/// Two panels: policy → kernel latency (p50, p99) and RSS (agent, controller) against pods.
fn chart(sizes: &[Size]) -> String {
    use plotters::prelude::*;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 400)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let (left, right) = root.split_horizontally(480);
        #[allow(clippy::cast_precision_loss, reason = "pod counts")]
        let x_max = sizes.iter().map(|s| s.pods).max().unwrap_or(1) as f64 * 1.05;
        let panels: [Panel<'_, _>; 2] = [
            (
                &left,
                "policy change → kernel",
                "ms",
                [
                    ("p50", BLUE, |s| s.policy_to_map_p50_ms),
                    ("p99", RED, |s| s.policy_to_map_p99_ms),
                ],
            ),
            (
                &right,
                "memory",
                "MiB",
                [
                    ("agent RSS", BLUE, |s| s.agent_rss_mb),
                    ("controller RSS", RED, |s| s.controller_rss_mb),
                ],
            ),
        ];
        for (area, title, unit, series) in panels {
            let y_max = sizes
                .iter()
                .flat_map(|s| series.iter().map(move |(_, _, f)| f(s)))
                .fold(1.0_f64, f64::max)
                * 1.15;
            let Ok(mut chart) = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(48)
                .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            else {
                continue;
            };
            let _ = chart
                .configure_mesh()
                .x_desc("pods in the cluster")
                .y_desc(unit)
                .draw();
            for (name, color, f) in series {
                #[allow(clippy::cast_precision_loss, reason = "pod counts")]
                let points: Vec<(f64, f64)> = sizes.iter().map(|s| (s.pods as f64, f(s))).collect();
                if let Ok(drawn) =
                    chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                {
                    drawn
                        .label(name)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
                }
                let _ = chart.draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 3, color.filled())),
                );
            }
            let _ = chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw();
        }
        let _ = root.present();
    }
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_the_benchmark_range() {
        assert_eq!(pod_ip(0), Ipv4Addr::new(198, 19, 128, 0));
        assert_eq!(pod_ip(MAX_PODS - 1), Ipv4Addr::new(198, 19, 191, 255));
        assert_eq!(node_name(51), "scale-node-01");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert!((percentile(&v, 50.0) - 10.0).abs() < f64::EPSILON);
        assert!((percentile(&v, 99.0) - 20.0).abs() < f64::EPSILON);
        assert!((percentile(&[], 99.0)).abs() < f64::EPSILON);
    }

    #[test]
    fn background_declares_every_object_once() {
        let y = background().join("\n---\n");
        assert_eq!(y.matches("kind: Node\n").count(), NODES);
        assert_eq!(y.matches("kind: Service\n").count(), SERVICES);
        assert_eq!(y.matches("kind: AuthorizationPolicy\n").count(), POLICIES);
        assert!(y.contains("name: allow-999,") && y.contains("serviceAccounts: [svc-0]"));
    }

    #[test]
    fn the_chart_draws_both_panels() {
        let s = |pods, p99| Size {
            pods,
            changes: 10,
            policy_to_map_p50_ms: p99 / 2.0,
            policy_to_map_p99_ms: p99,
            policy_to_map_max_ms: p99,
            create_secs: 1.0,
            settle_secs: 1.0,
            agent_rss_mb: 20.0,
            agent_cpu_secs_taking_in_pods: 1.0,
            agent_cpu_ms_per_change: 1.0,
            agent_read_kb_per_change: 1.0,
            controller_rss_mb: 30.0,
            controller_cpu_secs_taking_in_pods: 1.0,
        };
        let svg = chart(&[s(1000, 12.0), s(5000, 30.0)]);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("policy change → kernel") && svg.contains("controller RSS"));
        let flat = flat(&[s(1000, 12.0)]);
        assert_eq!(
            flat["scale_policy_to_map_p99_ms_1k"],
            serde_json::json!(12.0)
        );
    }
}
