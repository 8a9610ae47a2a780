//! `cargo xtask bench l7`: HTTP/1.1 between two pods of one node, four ways, measured side by
//! side in one run:
//!
//! | column | path |
//! | --- | --- |
//! | direct | client pod → upstream pod IP (no proxy, no mesh) |
//! | weft | client pod → Service VIP; the kernel redirects to Weft's L7 engine in the node, which proxies to the upstream pod (an `HTTPRoute` is attached) |
//! | nginx | client pod → nginx 1.22 in the node (bridge IP) → upstream pod |
//! | haproxy | client pod → haproxy 2.6 in the node (bridge IP) → upstream pod |
//!
//! direct, nginx and haproxy run on node `base`, which has no agent (no eBPF on its pods, so
//! "direct" is the plain kernel path); weft runs on node `mesh`, identical but with the agent.
//! Each node has its own `upstream` pod (`weft-workload http-server`, one thread) and `client` pod.
//!
//! For each column, every round: requests/s at saturation with `wrk -t1 -c32` (closed loop), then
//! p50/p99 at a fixed rate (default 1000 requests/s) with `weft-workload http-load` (open loop,
//! 16 keep-alive connections, latency from the intended send time). For weft, the agent's RSS is
//! sampled during the fixed-rate run. Columns rotate order each round so that drift on the
//! machine spreads over all of them; medians of the rounds are reported.
//!
//! Fairness: every proxy gets one worker — nginx one worker process, haproxy `nbthread 1`; the
//! engine runs on the agent's own data-plane runtime (what the agent ships with). On this
//! 2-core machine the load generator, the proxy and the upstream server share both cores in
//! every column.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;
use testbed::{
    Node, Pod, Testbed,
    agent::Agent,
    eventually,
    http::{HttpGetArgs, HttpLoadArgs, HttpLoadReport, HttpServer, HttpServerArgs},
};

use super::{
    h2load,
    proxies::{Kind, Proxy},
    wrk,
};
use crate::step;

/// The upstream server's port in its pod.
const UPSTREAM_PORT: u16 = 8080;
/// Where nginx and haproxy listen on the base node's bridge IP.
const NGINX_PORT: u16 = 8081;
const HAPROXY_PORT: u16 = 8082;
/// The Service the weft column goes through (the project's service range, 198.19.0.0/16).
const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
const SERVICE_PORT: u16 = 80;
/// Keep-alive connections of the fixed-rate client.
pub(super) const LOAD_CONNECTIONS: u32 = 16;
/// Idle keep-alive connections held through the engine for `weft_rss_10k_conns_mb`.
const IDLE_CONNECTIONS: u32 = 10_000;
/// Goals of issue 16: agent idle, and holding [`IDLE_CONNECTIONS`] idle connections (MiB).
const TARGET_IDLE_RSS_MB: f64 = 8.0;
const TARGET_10K_RSS_MB: f64 = 40.0;
/// Requests that must succeed through a column before it is measured.
const WARM_UP_REQUESTS: u64 = 200;
/// How often the agent's RSS is read during the fixed-rate run.
/// How long the agent gets to apply the Service and route and pass the warm-up.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(20);
/// Targets (see the report).
const TARGET_RATIO: f64 = 0.5;
const TARGET_RSS_MB: f64 = 12.0;

#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub secs: u64,
    pub rate: f64,
    pub repeats: usize,
    /// Pin load generators and systems under test to CPUs of their own (see [`Pinning`]).
    pub pin: bool,
}

/// Where the processes run: the load generators (wrk, http-load) on one CPU, every system under
/// test (agents, proxies) and the upstream servers on another. Without it, the scheduler moving
/// a proxy onto the load generator's CPU mid-run shows up as latency.
#[derive(Debug, Clone, Copy, Serialize)]
struct Pinning {
    load_cpu: usize,
    tested_cpu: usize,
}

impl Pinning {
    /// Two distinct CPUs this process may use, when asked for and there are.
    fn choose(wanted: bool) -> Option<Self> {
        let cpus = testbed::pin::allowed_cpus();
        match (wanted, cpus.first(), cpus.last()) {
            (true, Some(&load_cpu), Some(&tested_cpu)) if load_cpu != tested_cpu => Some(Self {
                load_cpu,
                tested_cpu,
            }),
            _ => None,
        }
    }
}

fn objects() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: upstream, namespace: default}}
spec:
  clusterIP: {SERVICE_VIP}
  selector: {{app: upstream}}
  ports: [{{name: http, port: {SERVICE_PORT}, targetPort: {UPSTREAM_PORT}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: upstream, namespace: default}}
spec:
  parentRefs: [{{group: "", kind: Service, name: upstream, port: {SERVICE_PORT}}}]
  rules:
  - backendRefs: [{{name: upstream, port: {SERVICE_PORT}}}]
"#
    )
}

// ---------------------------------------------------------------------------------------------
// Columns

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Direct,
    Weft,
    Nginx,
    Haproxy,
    /// Another weft build (`--baseline`), on a node of its own, in the same rounds.
    WeftBase,
}

const COLUMNS: [Column; 4] = [Column::Direct, Column::Weft, Column::Nginx, Column::Haproxy];

impl Column {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Weft => "weft",
            Self::Nginx => "nginx",
            Self::Haproxy => "haproxy",
            Self::WeftBase => "weft-base",
        }
    }
}

/// What was measured through one column (medians are taken at the end).
#[derive(Debug)]
struct Measured {
    column: Column,
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    rss_mb: Vec<f64>,
    h2_rps: Vec<f64>,
    h2_p50: Vec<f64>,
    h2_p99: Vec<f64>,
    /// Who the upstream saw as its peer in the warm-up (the client pod, or a proxy).
    upstream_peer: Option<String>,
    /// Why the column could not be set up or measured; it has no numbers then.
    error: Option<String>,
}

impl Measured {
    fn new(column: Column) -> Self {
        Self {
            column,
            rps: Vec::new(),
            p50: Vec::new(),
            p99: Vec::new(),
            rss_mb: Vec::new(),
            h2_rps: Vec::new(),
            h2_p50: Vec::new(),
            h2_p99: Vec::new(),
            upstream_peer: None,
            error: None,
        }
    }

    /// Median of `samples`, `None` if the column failed or has none.
    fn median(&self, samples: &[f64]) -> Option<f64> {
        if self.error.is_some() || samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(sorted[sorted.len() / 2])
    }
}

/// One column's way in (`None` once it failed), and what was measured through it.
struct Lane {
    target: Option<Target>,
    measured: Measured,
}

pub(super) struct Target {
    pub(super) client: Pod,
    pub(super) url: String,
    /// The same way in over HTTP/2 with prior knowledge (h2c).
    pub(super) h2_url: String,
    /// weft: the agent, for its RSS.
    pub(super) agent_pid: Option<u32>,
}

impl Lane {
    fn new(column: Column, target: Result<Target>) -> Self {
        let mut lane = Self {
            target: None,
            measured: Measured::new(column),
        };
        match target {
            Ok(target) => lane.target = Some(target),
            Err(error) => lane.fail("not measured", &error),
        }
        lane
    }

    fn fail(&mut self, what: &str, error: &anyhow::Error) {
        step!("{}: {what}: {error:#}", self.measured.column.name());
        self.target = None;
        self.measured.error = Some(format!("{error:#}"));
    }

    /// Checks the column end to end before it is measured: every request answered 200 by the
    /// upstream; records who the upstream saw as the peer.
    fn warm_up(&mut self) {
        let Some(target) = &self.target else { return };
        match warm_up(target) {
            Ok(peer) => self.measured.upstream_peer = Some(peer),
            Err(error) => self.fail("warm-up failed", &error),
        }
    }

    /// One round: saturation with wrk, then the fixed-rate run; the same over HTTP/2 (h2load,
    /// http-load --h2c). A failure marks the column failed instead of stopping the benchmark.
    fn measure(&mut self, options: &Options, pinning: Option<Pinning>) {
        let Some(target) = &self.target else { return };
        match measure(target, options, pinning) {
            Ok(sample) => {
                let m = &mut self.measured;
                m.rps.push(sample.rps);
                m.p50.push(sample.p50_us);
                m.p99.push(sample.p99_us);
                if let Some(rss) = sample.rss_mb {
                    m.rss_mb.push(rss);
                }
                m.h2_rps.push(sample.h2_rps);
                m.h2_p50.push(sample.h2_p50_us);
                m.h2_p99.push(sample.h2_p99_us);
            }
            Err(error) => self.fail("measurement failed", &error),
        }
    }
}

/// [`Lane::warm_up`]; returns the upstream's view of the peer.
fn warm_up(target: &Target) -> Result<String> {
    let report = target.client.http_get(
        &HttpGetArgs::new(target.url.parse()?)
            .count(WARM_UP_REQUESTS)
            .concurrency(4)
            .show(1),
    )?;
    ensure!(
        report.all_ok() && report.by_server.get("upstream") == Some(&WARM_UP_REQUESTS),
        "warm-up through {}: {} of {WARM_UP_REQUESTS} answered 2xx, statuses {:?}, servers {:?}, errors {:?}",
        target.url,
        report.ok(),
        report.by_status,
        report.by_server,
        report.error_samples
    );
    let echo = report
        .responses
        .first()
        .context("no response shown")?
        .echo()
        .context("the upstream's answer is not its JSON echo")?;
    Ok(echo.peer)
}

struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    rss_mb: Option<f64>,
    h2_rps: f64,
    h2_p50_us: f64,
    h2_p99_us: f64,
}

fn measure(target: &Target, options: &Options, pinning: Option<Pinning>) -> Result<Sample> {
    let load_cpu = pinning.map(|p| p.load_cpu);
    let saturated = wrk::run(&target.client, &target.url, options.secs, load_cpu)?;
    let load = HttpLoadArgs::new(
        target.url.parse()?,
        options.rate,
        Duration::from_secs(options.secs),
    )
    .connections(LOAD_CONNECTIONS)
    .cpu(load_cpu);
    if let Some(pid) = target.agent_pid {
        reset_peak_rss(pid)?;
    }
    let report = target.client.http_load(&load)?;
    let rss_kb = target
        .agent_pid
        .map(|pid| peak_rss_kb(pid).with_context(|| format!("agent (pid {pid}) RSS")))
        .transpose()?;
    clean(&report, options.rate, &target.url)?;
    let h2_saturated = h2load::run(&target.client, &target.h2_url, options.secs, load_cpu)?;
    let h2_load = HttpLoadArgs::new(
        target.h2_url.parse()?,
        options.rate,
        Duration::from_secs(options.secs),
    )
    .connections(LOAD_CONNECTIONS)
    .cpu(load_cpu)
    .h2c();
    let h2 = target.client.http_load(&h2_load)?;
    clean(&h2, options.rate, &format!("{} (h2c)", target.h2_url))?;
    Ok(Sample {
        rps: saturated.rps,
        p50_us: report.p50_us,
        p99_us: report.p99_us,
        rss_mb: rss_kb.map(mib),
        h2_rps: h2_saturated.rps,
        h2_p50_us: h2.p50_us,
        h2_p99_us: h2.p99_us,
    })
}

/// Every scheduled request of a fixed-rate run (at `rate`, through `what`) answered 2xx, or why
/// not.
pub(super) fn clean(report: &HttpLoadReport, rate: f64, what: &str) -> Result<()> {
    ensure!(
        report.clean(),
        "http-load at {rate} req/s through {what}: {} of {} scheduled answered, {} errors {:?}, {} not 2xx, {} never sent",
        report.completed,
        report.scheduled,
        report.errors,
        report.error_samples,
        report.non_2xx,
        report.missed
    );
    Ok(())
}

/// Functions listed by [`profile_engine`], hottest first.
const PROFILE_TOP: usize = 15;

/// `--profile DIR`: the agent sampled with `perf record` (DWARF call graphs) during one more
/// saturation run through the weft column; the samples folded (`weft-l7.folded`) and drawn
/// as a flame graph (`weft-l7.svg`, inferno), and the functions with the most samples of their
/// own printed.
fn profile_engine(
    target: &Target,
    options: &Options,
    pinning: Option<Pinning>,
    dir: &Path,
) -> Result<()> {
    use inferno::collapse::Collapse as _;
    let pid = target.agent_pid.context("the weft column has no agent")?;
    std::fs::create_dir_all(dir)?;
    let data = dir.join("weft-l7.perf.data");
    step!(
        "weft: profiling the agent (pid {pid}) with perf during {}s of wrk",
        options.secs
    );
    let perf = std::process::Command::new("perf")
        .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(&data)
        .args(["--", "sleep"])
        .arg((options.secs + 1).to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running perf (`cargo xtask setup` installs linux-perf)")?;
    std::thread::sleep(Duration::from_millis(500));
    let load = wrk::run(
        &target.client,
        &target.url,
        options.secs,
        pinning.map(|p| p.load_cpu),
    );
    let recorded = perf.wait_with_output()?;
    ensure!(
        recorded.status.success(),
        "perf record: {}",
        String::from_utf8_lossy(&recorded.stderr)
    );
    let load = load?;
    let script = std::process::Command::new("perf")
        .args(["script", "-i"])
        .arg(&data)
        .output()?;
    ensure!(
        script.status.success(),
        "perf script: {}",
        String::from_utf8_lossy(&script.stderr)
    );
    let mut folded = Vec::new();
    inferno::collapse::perf::Folder::default().collapse(&script.stdout[..], &mut folded)?;
    let folded = String::from_utf8_lossy(&folded).into_owned();
    std::fs::write(dir.join("weft-l7.folded"), &folded)?;
    let mut flame = inferno::flamegraph::Options::default();
    flame.title = format!(
        "weft agent, wrk -c32 through the L7 engine ({:.0} requests/s)",
        load.rps
    );
    let svg = dir.join("weft-l7.svg");
    inferno::flamegraph::from_lines(
        &mut flame,
        folded.lines(),
        std::io::BufWriter::new(std::fs::File::create(&svg)?),
    )?;
    let (total, top) = hottest(&folded, PROFILE_TOP);
    step!(
        "weft: profiled at {:.0} requests/s; flame graph {}; the functions with most CPU of their own:",
        load.rps,
        svg.display()
    );
    for (function, samples) in top {
        #[allow(clippy::cast_precision_loss, reason = "sample counts")]
        let share = 100.0 * samples as f64 / total.max(1) as f64;
        println!("  {share:5.1} %  {function}");
    }
    Ok(())
}

/// The weight of all samples (perf's folded counts: CPU cycles), and the `n` leaf functions
/// with the most of their own.
fn hottest(folded: &str, n: usize) -> (u64, Vec<(String, u64)>) {
    let mut own: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut total = 0;
    for line in folded.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        total += count;
        let leaf = stack.rsplit(';').next().unwrap_or(stack);
        *own.entry(leaf).or_default() += count;
    }
    let mut top: Vec<(String, u64)> = own.into_iter().map(|(f, c)| (f.to_owned(), c)).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(n);
    (total, top)
}

/// Starts a new peak-RSS window for `pid` (the kernel's `VmHWM` is reset to the current RSS):
/// the peak is then read once afterwards, with no sampling process competing for the CPUs
/// during the measurement.
pub(super) fn reset_peak_rss(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of pid {pid}"))
}

/// A client of the mesh side opens [`IDLE_CONNECTIONS`] keep-alive connections through the
/// engine (one request on each) and holds them: the agent's RSS meanwhile (MiB), and how many
/// were held.
fn hold_idle(client: &Pod, agent: u32) -> Result<(f64, u64)> {
    step!("weft: {IDLE_CONNECTIONS} idle keep-alive connections through the engine, held");
    let out = client
        .run(
            Duration::from_mins(5),
            "python3",
            [
                "-c",
                testbed::scripts::HOLD_CONNECTIONS,
                &SERVICE_VIP.to_string(),
                &SERVICE_PORT.to_string(),
                &IDLE_CONNECTIONS.to_string(),
                &agent.to_string(),
                "0",
            ],
        )?
        .check()?;
    let r: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .with_context(|| format!("hold-connections output: {}", out.stdout))?;
    let field = |k: &str| r[k].as_u64().with_context(|| format!("no {k} in {r}"));
    Ok((mib(field("rss_holding_kb")?), field("held")?))
}

/// Peak RSS (`VmHWM`) of `pid` since the last [`reset_peak_rss`], in KiB.
pub(super) fn peak_rss_kb(pid: u32) -> Result<u64> {
    status_kb(pid, "VmHWM")
}

/// A field of `/proc/<pid>/status` given in KiB (`VmHWM`, `VmRSS`, `RssAnon`…).
pub(super) fn status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} line in /proc/{pid}/status"))
}

/// `/proc/<pid>/stat` counts CPU time in `USER_HZ` ticks, 100 per second on Linux.
pub(super) const TICKS_PER_SEC: f64 = 100.0;

/// CPU ticks (user + system) the processes `pids` have used so far.
pub(super) fn cpu_ticks(pids: &[u32]) -> Result<u64> {
    pids.iter().try_fold(0, |sum, pid| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // After the parenthesised name: state is field 3, utime 14 and stime 15.
        let rest = &stat[stat.rfind(')').unwrap_or(0) + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let tick = |i: usize| -> Result<u64> {
            Ok(fields
                .get(i)
                .with_context(|| format!("/proc/{pid}/stat: short"))?
                .parse()?)
        };
        Ok(sum + tick(11)? + tick(12)?)
    })
}

/// KiB as MiB.
#[allow(
    clippy::cast_precision_loss,
    reason = "KiB of one process, far below 2^52"
)]
pub(super) fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// Setup of each side

/// A node's two pods and its upstream server.
pub(super) struct Side {
    client: Pod,
    upstream: Pod,
    server: HttpServer,
}

pub(super) fn side(node: &Node) -> Result<Side> {
    let client = node.pod("client")?;
    let upstream = node.pod("upstream")?;
    let server = upstream.serve_http(&HttpServerArgs::new("upstream", UPSTREAM_PORT))?;
    Ok(Side {
        client,
        upstream,
        server,
    })
}

/// The mesh node's agent with the Service and its `HTTPRoute` applied; the target goes through the
/// VIP once the warm-up passes through it.
pub(super) fn weft_target(
    node: &Node,
    side: &Side,
    bin: Option<&Path>,
    agent: &mut Option<Agent>,
) -> Result<Target> {
    let started = if let Some(bin) = bin {
        Agent::start_binary(node, bin, &Agent::PRODUCTION_INTERVALS)
    } else {
        // `hold_idle`'s single client holds the whole budget: its share (half by default) is
        // lifted; the budget clamps the share.
        let mut args = Agent::PRODUCTION_INTERVALS.to_vec();
        args.extend(["--max-connections-per-source", "1000000"]);
        Agent::start(node, &args)
    }
    .context("starting the agent")?;
    let agent = agent.insert(started);
    agent.apply(
        "pods.yaml",
        &[
            side.client.manifest(&[("app", "client")], "client"),
            side.upstream.manifest(&[("app", "upstream")], "upstream"),
        ]
        .join("\n---\n"),
    )?;
    agent.apply("l7.yaml", &objects())?;
    agent.wait_workloads(2)?;
    let url = format!("http://{SERVICE_VIP}:{SERVICE_PORT}/");
    // The engine may take a sync or two to take the route: wait for one good answer.
    eventually(ROUTE_TIMEOUT, || {
        let one = side
            .client
            .http_get(&HttpGetArgs::new(url.parse()?).request_timeout(Duration::from_secs(2)))?;
        ensure!(
            one.all_ok(),
            "GET {url}: statuses {:?}, errors {:?}",
            one.by_status,
            one.error_samples
        );
        Ok(())
    })
    .with_context(|| format!("no answer through the Service VIP {url} (is the L7 engine on?)"))?;
    let agent_pid = agent_pid(node)?;
    // The engine tells HTTP/2's preface from HTTP/1.1 on the same Service port.
    Ok(Target {
        client: side.client.clone(),
        h2_url: url.clone(),
        url,
        agent_pid: Some(agent_pid),
    })
}

/// The agent runs alone in the node's agent cgroup.
pub(super) fn agent_pid(node: &Node) -> Result<u32> {
    let procs = node.agent_cgroup().join("cgroup.procs");
    let text =
        std::fs::read_to_string(&procs).with_context(|| format!("reading {}", procs.display()))?;
    let pids: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    match pids.as_slice() {
        [pid] => Ok(*pid),
        other => bail!(
            "expected the agent alone in {}, found {other:?}",
            procs.display()
        ),
    }
}

fn proxy_target(
    node: &Node,
    side: &Side,
    kind: Kind,
    port: u16,
    proxies: &mut Vec<Proxy>,
) -> Result<Target> {
    let listen = SocketAddrV4::new(node.bridge_ip(), port);
    let proxy = Proxy::start(node, kind, listen, side.server.addr())?;
    let url = proxy.url("/");
    let h2_url = proxy
        .url_h2("/")
        .context("the proxy has an HTTP/2 listener")?;
    proxies.push(proxy);
    Ok(Target {
        client: side.client.clone(),
        url,
        h2_url,
        agent_pid: None,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

/// The median of per-round values with a distribution-free 95 % confidence interval of the
/// median (order statistics: ranks k and n−1−k with k = ⌊(n − 1.96·√n) / 2⌋; with 5 rounds or
/// fewer that is the whole range).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(super) struct Interval {
    median: f64,
    low: f64,
    high: f64,
    rounds: usize,
}

impl Interval {
    pub(super) fn of(mut values: Vec<f64>) -> Option<Self> {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a handful of rounds"
        )]
        let k = (((n as f64) - 1.96 * (n as f64).sqrt()) / 2.0)
            .floor()
            .max(0.0) as usize;
        Some(Self {
            median: values[n / 2],
            low: values[k.min(n - 1)],
            high: values[(n - 1).saturating_sub(k)],
            rounds: n,
        })
    }

    /// Whether the whole interval is on one side of `goal` (else the run cannot tell).
    pub(super) fn side_of(&self, goal: f64) -> &'static str {
        if self.high <= goal {
            "below"
        } else if self.low > goal {
            "above"
        } else {
            "straddles"
        }
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} (95 % interval {:.2}–{:.2}, {} rounds)",
            self.median, self.low, self.high, self.rounds
        )
    }
}

#[derive(Debug, Serialize)]
#[allow(clippy::struct_field_names, reason = "flat JSON for scripts")]
struct Report {
    tool: String,
    /// The CPUs of the load generators and of the systems under test; `null`: not pinned.
    pinning: Option<Pinning>,
    secs_per_run: u64,
    repeats: usize,
    fixed_rate_rps: f64,
    direct_p50_us: Option<f64>,
    direct_p99_us: Option<f64>,
    weft_p50_us: Option<f64>,
    weft_p99_us: Option<f64>,
    nginx_p50_us: Option<f64>,
    nginx_p99_us: Option<f64>,
    haproxy_p50_us: Option<f64>,
    haproxy_p99_us: Option<f64>,
    direct_rps: Option<f64>,
    weft_rps: Option<f64>,
    nginx_rps: Option<f64>,
    haproxy_rps: Option<f64>,
    /// Max `VmRSS` of the agent during the fixed-rate run (MiB), median over rounds.
    weft_rss_mb: Option<f64>,
    /// `VmRSS` of the agent with its objects loaded, before any request (MiB).
    weft_rss_idle_mb: Option<f64>,
    /// Of which anonymous memory (heap, stacks, maps' copies); the rest is mapped file pages,
    /// mostly the binary's own code, shared with the page cache.
    weft_rss_idle_anon_mb: Option<f64>,
    /// `VmRSS` of the agent while a client holds 10,000 idle keep-alive connections through
    /// its engine, each having made one request (MiB); how many it held.
    weft_rss_10k_conns_mb: Option<f64>,
    weft_10k_conns_held: Option<u64>,
    target_weft_rss_idle_mb: f64,
    target_weft_rss_10k_conns_mb: f64,
    /// p99 added over direct.
    weft_added_p99_us: Option<f64>,
    nginx_added_p99_us: Option<f64>,
    haproxy_added_p99_us: Option<f64>,
    /// `weft_added_p99 / min(nginx_added_p99, haproxy_added_p99)`; target ≤ 0.5.
    ratio_weft_added_p99_vs_best_proxy: Option<f64>,
    target_ratio: f64,
    target_weft_rss_mb: f64,
    /// Per round: weft's added p99 ÷ the best proxy's added p99 in that round (median and a
    /// 95 % interval of the median; with few rounds the interval is wide, and says so).
    ratio_weft_added_p99_vs_best_proxy_rounds: Option<Interval>,
    /// With `--baseline`: the other build, measured in the same rounds on a node of its own.
    weft_base_p50_us: Option<f64>,
    weft_base_p99_us: Option<f64>,
    weft_base_rps: Option<f64>,
    weft_base_rss_mb: Option<f64>,
    /// weft ÷ weft-base, round by round (below 1: this build is faster / smaller).
    ratio_weft_p50_vs_base: Option<Interval>,
    ratio_weft_p99_vs_base: Option<Interval>,
    ratio_weft_rps_vs_base: Option<Interval>,
    /// The same over HTTP/2 with prior knowledge (h2c): h2load for saturation, http-load
    /// `--h2c` at the fixed rate.
    #[serde(flatten)]
    h2: H2Report,
    /// Who the upstream saw connecting in each column's warm-up (a proxy's address, or the
    /// client pod's own for direct).
    upstream_peers: std::collections::BTreeMap<&'static str, Option<String>>,
    /// Why a column has no numbers.
    errors: std::collections::BTreeMap<&'static str, String>,
}

/// HTTP/2 figures of [`Report`] (flattened into it).
#[derive(Debug, Serialize)]
struct H2Report {
    direct_h2_rps: Option<f64>,
    weft_h2_rps: Option<f64>,
    nginx_h2_rps: Option<f64>,
    haproxy_h2_rps: Option<f64>,
    direct_h2_p50_us: Option<f64>,
    weft_h2_p50_us: Option<f64>,
    nginx_h2_p50_us: Option<f64>,
    haproxy_h2_p50_us: Option<f64>,
    direct_h2_p99_us: Option<f64>,
    weft_h2_p99_us: Option<f64>,
    nginx_h2_p99_us: Option<f64>,
    haproxy_h2_p99_us: Option<f64>,
    weft_added_h2_p99_us: Option<f64>,
    /// As `ratio_weft_added_p99_vs_best_proxy`, over HTTP/2; target ≤ 0.5.
    ratio_weft_added_h2_p99_vs_best_proxy: Option<f64>,
    ratio_weft_added_h2_p99_vs_best_proxy_rounds: Option<Interval>,
}

/// Weft's added p99 (over direct) ÷ the better proxy's, from the medians, and round by round
/// (median and interval), for the p99 samples `p99` picks.
fn versus_best_proxy(
    columns: &[Measured],
    p99: fn(&Measured) -> &Vec<f64>,
) -> (Option<f64>, Option<Interval>) {
    let lane = |c: Column| columns.iter().find(|m| m.column == c);
    let samples = |c: Column| lane(c).filter(|m| m.error.is_none()).map(p99);
    let best_of = |nginx: Option<f64>, haproxy: Option<f64>| match (nginx, haproxy) {
        (Some(n), Some(h)) => Some(n.min(h)),
        (one, other) => one.or(other),
    };
    let ratio = |weft: Option<f64>, best: Option<f64>| match (weft, best) {
        (Some(w), Some(b)) if b > 0.0 => Some(w / b),
        _ => None,
    };
    let rounds = samples(Column::Direct).map_or(0, Vec::len);
    let per_round: Vec<f64> = (0..rounds)
        .filter_map(|round| {
            let direct = *samples(Column::Direct)?.get(round)?;
            let added = |c| Some(samples(c)?.get(round)? - direct);
            ratio(
                added(Column::Weft),
                best_of(added(Column::Nginx), added(Column::Haproxy)),
            )
        })
        .collect();
    let median = |c| lane(c).and_then(|m| m.median(p99(m)));
    let added = |c| Some(median(c)? - median(Column::Direct)?);
    (
        ratio(
            added(Column::Weft),
            best_of(added(Column::Nginx), added(Column::Haproxy)),
        ),
        Interval::of(per_round),
    )
}

fn h2_report(columns: &[Measured]) -> H2Report {
    let value = |c: Column, f: fn(&Measured) -> &Vec<f64>| {
        columns
            .iter()
            .find(|m| m.column == c)
            .and_then(|m| m.median(f(m)))
    };
    let rps = |c| value(c, |m| &m.h2_rps);
    let p50 = |c| value(c, |m| &m.h2_p50);
    let p99 = |c| value(c, |m| &m.h2_p99);
    let (ratio, rounds) = versus_best_proxy(columns, |m| &m.h2_p99);
    H2Report {
        direct_h2_rps: rps(Column::Direct),
        weft_h2_rps: rps(Column::Weft),
        nginx_h2_rps: rps(Column::Nginx),
        haproxy_h2_rps: rps(Column::Haproxy),
        direct_h2_p50_us: p50(Column::Direct),
        weft_h2_p50_us: p50(Column::Weft),
        nginx_h2_p50_us: p50(Column::Nginx),
        haproxy_h2_p50_us: p50(Column::Haproxy),
        direct_h2_p99_us: p99(Column::Direct),
        weft_h2_p99_us: p99(Column::Weft),
        nginx_h2_p99_us: p99(Column::Nginx),
        haproxy_h2_p99_us: p99(Column::Haproxy),
        weft_added_h2_p99_us: p99(Column::Weft)
            .zip(p99(Column::Direct))
            .map(|(w, d)| w - d),
        ratio_weft_added_h2_p99_vs_best_proxy: ratio,
        ratio_weft_added_h2_p99_vs_best_proxy_rounds: rounds,
    }
}

#[allow(clippy::too_many_lines, reason = "one field per reported figure")]
fn report(columns: &[Measured], options: &Options) -> Report {
    let lane = |c: Column| {
        columns
            .iter()
            .find(|m| m.column == c)
            .expect("every column is measured")
    };
    let base = columns
        .iter()
        .find(|m| m.column == Column::WeftBase && m.error.is_none());
    let weft = Some(lane(Column::Weft)).filter(|m| m.error.is_none());
    let per_round = |a: &[f64], b: &[f64]| {
        Interval::of(
            a.iter()
                .zip(b)
                .filter(|(_, b)| **b > 0.0)
                .map(|(a, b)| a / b)
                .collect(),
        )
    };
    let vs_base = |f: fn(&Measured) -> &Vec<f64>| per_round(f(weft?), f(base?));
    let (ratio, rounds_ratio) = versus_best_proxy(columns, |m| &m.p99);
    let p50 = |c| lane(c).median(&lane(c).p50);
    let p99 = |c| lane(c).median(&lane(c).p99);
    let rps = |c| lane(c).median(&lane(c).rps);
    let added = |c| Some(p99(c)? - p99(Column::Direct)?);
    Report {
        pinning: None,
        tool: format!(
            "saturation: wrk -t{} -c{}, HTTP/2: h2load -t1 -c{} -m{}; fixed rate: weft-workload http-load ({LOAD_CONNECTIONS} connections, open loop; --h2c for HTTP/2)",
            wrk::THREADS,
            wrk::CONNECTIONS,
            h2load::CLIENTS,
            h2load::STREAMS
        ),
        secs_per_run: options.secs,
        repeats: options.repeats,
        fixed_rate_rps: options.rate,
        direct_p50_us: p50(Column::Direct),
        direct_p99_us: p99(Column::Direct),
        weft_p50_us: p50(Column::Weft),
        weft_p99_us: p99(Column::Weft),
        nginx_p50_us: p50(Column::Nginx),
        nginx_p99_us: p99(Column::Nginx),
        haproxy_p50_us: p50(Column::Haproxy),
        haproxy_p99_us: p99(Column::Haproxy),
        direct_rps: rps(Column::Direct),
        weft_rps: rps(Column::Weft),
        nginx_rps: rps(Column::Nginx),
        haproxy_rps: rps(Column::Haproxy),
        weft_rss_mb: lane(Column::Weft).median(&lane(Column::Weft).rss_mb),
        weft_rss_idle_mb: None,
        weft_rss_idle_anon_mb: None,
        weft_rss_10k_conns_mb: None,
        weft_10k_conns_held: None,
        target_weft_rss_idle_mb: TARGET_IDLE_RSS_MB,
        target_weft_rss_10k_conns_mb: TARGET_10K_RSS_MB,
        weft_added_p99_us: added(Column::Weft),
        nginx_added_p99_us: added(Column::Nginx),
        haproxy_added_p99_us: added(Column::Haproxy),
        ratio_weft_added_p99_vs_best_proxy: ratio,
        target_ratio: TARGET_RATIO,
        target_weft_rss_mb: TARGET_RSS_MB,
        ratio_weft_added_p99_vs_best_proxy_rounds: rounds_ratio,
        weft_base_p50_us: base.and_then(|m| m.median(&m.p50)),
        weft_base_p99_us: base.and_then(|m| m.median(&m.p99)),
        weft_base_rps: base.and_then(|m| m.median(&m.rps)),
        weft_base_rss_mb: base.and_then(|m| m.median(&m.rss_mb)),
        ratio_weft_p50_vs_base: vs_base(|m| &m.p50),
        ratio_weft_p99_vs_base: vs_base(|m| &m.p99),
        ratio_weft_rps_vs_base: vs_base(|m| &m.rps),
        h2: h2_report(columns),
        upstream_peers: columns
            .iter()
            .map(|m| (m.column.name(), m.upstream_peer.clone()))
            .collect(),
        errors: columns
            .iter()
            .filter_map(|m| Some((m.column.name(), m.error.clone()?)))
            .collect(),
    }
}

#[allow(clippy::too_many_lines, reason = "one row per reported figure")]
fn print_table(r: &Report) {
    let cell = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |v| format!("{v:.0}"));
    let mb = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |v| format!("{v:.1}"));
    let row = |name: &str, values: [Option<f64>; 4], target: &str| {
        let mut line = format!("{name:<34}");
        for v in values {
            let _ = write!(line, " {:>9}", cell(v));
        }
        println!("{line}  {target}");
    };
    println!();
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}  target",
        "HTTP/1.1, same node, pod → pod", "direct", "weft", "nginx", "haproxy"
    );
    row(
        &format!("requests/s (wrk -t{} -c{})", wrk::THREADS, wrk::CONNECTIONS),
        [r.direct_rps, r.weft_rps, r.nginx_rps, r.haproxy_rps],
        "",
    );
    row(
        &format!("p50 at {:.0} req/s (µs)", r.fixed_rate_rps),
        [
            r.direct_p50_us,
            r.weft_p50_us,
            r.nginx_p50_us,
            r.haproxy_p50_us,
        ],
        "",
    );
    row(
        &format!("p99 at {:.0} req/s (µs)", r.fixed_rate_rps),
        [
            r.direct_p99_us,
            r.weft_p99_us,
            r.nginx_p99_us,
            r.haproxy_p99_us,
        ],
        "",
    );
    row(
        "added p99 vs direct (µs)",
        [
            None,
            r.weft_added_p99_us,
            r.nginx_added_p99_us,
            r.haproxy_added_p99_us,
        ],
        "",
    );
    let h2 = &r.h2;
    row(
        &format!("HTTP/2 requests/s (h2load -c{})", h2load::CLIENTS),
        [
            h2.direct_h2_rps,
            h2.weft_h2_rps,
            h2.nginx_h2_rps,
            h2.haproxy_h2_rps,
        ],
        "",
    );
    row(
        &format!("HTTP/2 p50 at {:.0} req/s (µs)", r.fixed_rate_rps),
        [
            h2.direct_h2_p50_us,
            h2.weft_h2_p50_us,
            h2.nginx_h2_p50_us,
            h2.haproxy_h2_p50_us,
        ],
        "",
    );
    row(
        &format!("HTTP/2 p99 at {:.0} req/s (µs)", r.fixed_rate_rps),
        [
            h2.direct_h2_p99_us,
            h2.weft_h2_p99_us,
            h2.nginx_h2_p99_us,
            h2.haproxy_h2_p99_us,
        ],
        "",
    );
    println!(
        "{:<34} {:>9} {:>9}  ≤ {TARGET_RSS_MB:.0}",
        "agent RSS during the run (MiB)",
        "",
        mb(r.weft_rss_mb)
    );
    println!(
        "{:<34} {:>9} {:>9}  ≤ {TARGET_IDLE_RSS_MB:.0}",
        "agent RSS idle (MiB)",
        "",
        mb(r.weft_rss_idle_mb)
    );
    println!(
        "{:<34} {:>9} {:>9}",
        "  of which anonymous (MiB)",
        "",
        mb(r.weft_rss_idle_anon_mb)
    );
    println!(
        "{:<34} {:>9} {:>9}  ≤ {TARGET_10K_RSS_MB:.0}",
        format!(
            "agent RSS, {} idle conns (MiB)",
            r.weft_10k_conns_held.unwrap_or(0)
        ),
        "",
        mb(r.weft_rss_10k_conns_mb)
    );
    println!(
        "weft added p99 / best of nginx, haproxy: {}  (target ≤ {TARGET_RATIO})",
        r.ratio_weft_added_p99_vs_best_proxy
            .map_or_else(|| "—".to_owned(), |v| format!("{v:.2}"))
    );
    if let Some(i) = &r.ratio_weft_added_p99_vs_best_proxy_rounds {
        println!(
            "  round by round: {i} — {} the target",
            i.side_of(TARGET_RATIO)
        );
    }
    println!(
        "HTTP/2: weft added p99 / best of nginx, haproxy: {}  (target ≤ {TARGET_RATIO})",
        h2.ratio_weft_added_h2_p99_vs_best_proxy
            .map_or_else(|| "—".to_owned(), |v| format!("{v:.2}"))
    );
    if let Some(i) = &h2.ratio_weft_added_h2_p99_vs_best_proxy_rounds {
        println!(
            "  round by round: {i} — {} the target",
            i.side_of(TARGET_RATIO)
        );
    }
    if r.ratio_weft_p99_vs_base.is_some() {
        let cell = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |v| format!("{v:.0}"));
        println!(
            "weft-base (the --baseline build): p50 {} µs, p99 {} µs, {} requests/s, RSS {} MiB",
            cell(r.weft_base_p50_us),
            cell(r.weft_base_p99_us),
            cell(r.weft_base_rps),
            r.weft_base_rss_mb
                .map_or_else(|| "—".to_owned(), |v| format!("{v:.1}"))
        );
        for (what, i) in [
            ("p50", &r.ratio_weft_p50_vs_base),
            ("p99", &r.ratio_weft_p99_vs_base),
            ("requests/s", &r.ratio_weft_rps_vs_base),
        ] {
            if let Some(i) = i {
                println!("  weft ÷ weft-base, {what}: {i} — {} 1", i.side_of(1.0));
            }
        }
    }
    for (column, peer) in &r.upstream_peers {
        if let Some(peer) = peer {
            println!("  {column}: the upstream saw connections from {peer}");
        }
    }
    for (column, error) in &r.errors {
        println!("  {column}: NOT MEASURED: {error}");
    }
}

// ---------------------------------------------------------------------------------------------
// The run

#[allow(clippy::too_many_lines, reason = "one linear measurement script")]
pub fn l7(
    weft: &Path,
    workload: &Path,
    options: Options,
    baseline: Option<&Path>,
    profile: Option<&Path>,
    json: Option<&Path>,
) -> Result<()> {
    testbed::use_binaries(weft, workload)?;
    // h2load, for HTTP/2 saturation (only the benchmark needs it).
    crate::setup::ensure_packages(&["nghttp2-client"])?;
    let options = Options {
        repeats: options.repeats.max(1),
        secs: options.secs.max(1),
        ..options
    };
    ensure!(
        options.rate.is_finite() && options.rate > 0.0,
        "--rate must be positive"
    );
    step!(
        "bench l7: HTTP/1.1 pod → pod, direct vs Weft's L7 engine vs nginx vs haproxy ({}s per run, {} rounds, fixed rate {} req/s)",
        options.secs,
        options.repeats,
        options.rate
    );
    let tb = Testbed::new("bench-l7")?;
    let base_node = tb.node("base")?;
    let mesh_node = tb.node("mesh")?;
    let base = side(&base_node)?;
    let mesh = side(&mesh_node)?;

    step!("starting nginx and haproxy in node base (one worker each, upstream keep-alive)");
    let mut proxies = Vec::new();
    let nginx = proxy_target(&base_node, &base, Kind::Nginx, NGINX_PORT, &mut proxies);
    let haproxy = proxy_target(&base_node, &base, Kind::Haproxy, HAPROXY_PORT, &mut proxies);
    step!(
        "starting the Weft agent (L7 engine) in node mesh, with Service upstream and its HTTPRoute"
    );
    let mut agent = None;
    let weft = weft_target(&mesh_node, &mesh, None, &mut agent);
    // The upstream server speaks HTTP/1.1 and h2c on one port.
    let direct = Ok(Target {
        client: base.client.clone(),
        url: base.server.url("/").to_string(),
        h2_url: base.server.url("/").to_string(),
        agent_pid: None,
    });
    let mut lanes = vec![
        Lane::new(Column::Direct, direct),
        Lane::new(Column::Weft, weft),
        Lane::new(Column::Nginx, nginx),
        Lane::new(Column::Haproxy, haproxy),
    ];
    debug_assert!(lanes.iter().map(|l| l.measured.column).eq(COLUMNS));
    // The other build, if asked for: its own node, the same objects, the same rounds.
    let mut base_agent = None;
    let base_parts = match baseline {
        Some(bin) => {
            step!(
                "starting the baseline build {} in node meshb (column weft-base)",
                bin.display()
            );
            let node = tb.node("meshb")?;
            let side = side(&node)?;
            let target = weft_target(&node, &side, Some(bin), &mut base_agent);
            lanes.push(Lane::new(Column::WeftBase, target));
            Some((node, side))
        }
        None => None,
    };

    step!(
        "warm-up: {WARM_UP_REQUESTS} requests through each column, all must be answered 200 by the upstream"
    );
    let agent_pid = agent.as_ref().and_then(Agent::pid);
    let idle_mb = |field| {
        agent_pid
            .and_then(|pid| status_kb(pid, field).ok())
            .map(mib)
    };
    let (idle_rss_mb, idle_anon_mb) = (idle_mb("VmRSS"), idle_mb("RssAnon"));
    for lane in &mut lanes {
        lane.warm_up();
    }
    let pinning = Pinning::choose(options.pin);
    if let Some(p) = pinning {
        let mut tested: Vec<(String, u32)> = vec![
            ("upstream (base)".into(), base.server.pid()),
            ("upstream (mesh)".into(), mesh.server.pid()),
        ];
        tested.extend(
            agent
                .as_ref()
                .and_then(Agent::pid)
                .map(|pid| ("agent".into(), pid)),
        );
        tested.extend(
            base_agent
                .as_ref()
                .and_then(Agent::pid)
                .map(|pid| ("agent (weft-base)".into(), pid)),
        );
        if let Some((_, side)) = &base_parts {
            tested.push(("upstream (meshb)".into(), side.server.pid()));
        }
        tested.extend(
            proxies
                .iter()
                .map(|x| (x.kind().name().to_owned(), x.pid())),
        );
        for (what, pid) in &tested {
            testbed::pin::pin_tree(*pid, p.tested_cpu)
                .with_context(|| format!("pinning {what} (pid {pid})"))?;
        }
        step!(
            "pinned: wrk and http-load on CPU {}, {} on CPU {}",
            p.load_cpu,
            tested
                .iter()
                .map(|(what, _)| what.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            p.tested_cpu
        );
    } else {
        step!("not pinned: the scheduler places every process");
    }

    let started = Instant::now();
    let mut rounds = crate::progress::Steps::new("round", options.repeats);
    for round in 0..options.repeats {
        // Rotate the order each round: no column always runs first or last.
        let order: Vec<usize> = (0..lanes.len())
            .map(|i| (i + round) % lanes.len())
            .collect();
        let names: Vec<&str> = order
            .iter()
            .map(|&i| lanes[i].measured.column.name())
            .collect();
        rounds.advance(&format!(
            "{} (wrk {}s, then {} req/s for {}s, each)",
            names.join(", "),
            options.secs,
            options.rate,
            options.secs
        ));
        for i in order {
            lanes[i].measure(&options, pinning);
        }
    }
    rounds.finish();
    step!("measured in {:.0}s", started.elapsed().as_secs_f64());
    if let Some(dir) = profile {
        let weft_lane = lanes
            .iter()
            .find(|l| l.measured.column == Column::Weft)
            .and_then(|l| l.target.as_ref());
        match weft_lane.map(|t| profile_engine(t, &options, pinning, dir)) {
            Some(Ok(())) => {}
            Some(Err(e)) => step!("weft: profile: {e:#}"),
            None => step!("weft: not profiled (the column failed)"),
        }
    }

    let measured: Vec<Measured> = lanes.into_iter().map(|l| l.measured).collect();
    let held = agent_pid
        .filter(|_| {
            measured
                .iter()
                .any(|m| m.column == Column::Weft && !m.rps.is_empty())
        })
        .map(|pid| hold_idle(&mesh.client, pid))
        .transpose()
        .unwrap_or_else(|e| {
            step!("weft: {IDLE_CONNECTIONS} idle connections: {e:#}");
            None
        });
    let r = Report {
        pinning,
        weft_rss_idle_mb: idle_rss_mb,
        weft_rss_idle_anon_mb: idle_anon_mb,
        weft_rss_10k_conns_mb: held.map(|h| h.0),
        weft_10k_conns_held: held.map(|h| h.1),
        ..report(&measured, &options)
    };
    print_table(&r);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&r)?)?;
        step!("wrote {}", path.display());
    }

    step!("stopping the proxies, the servers and the agent; removing the testbed");
    for proxy in proxies {
        let name = proxy.kind().name();
        proxy.stop().with_context(|| format!("stopping {name}"))?;
    }
    let (base_node, base_side) = base_parts.unzip();
    for s in [Some(base), Some(mesh), base_side].into_iter().flatten() {
        if let Err(error) = s.server.finish() {
            eprintln!("[bench] upstream server: {error:#}");
        }
    }
    if let Some(mut agent) = agent {
        agent.uninstall(&mesh_node)?;
    }
    if let (Some(mut agent), Some(node)) = (base_agent, base_node) {
        agent.uninstall(&node)?;
    }
    let left = tb.teardown()?;
    ensure!(
        left.is_empty(),
        "the benchmark left something behind: {left:?}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hottest_counts_leaf_samples() {
        let (total, top) = hottest("a;b;c 5\nx;c 2\na;b 4\nbad line\n", 2);
        assert_eq!(total, 11);
        assert_eq!(top, vec![("c".to_owned(), 7), ("b".to_owned(), 4)]);
    }

    #[test]
    fn objects_name_the_service_and_route() {
        let yaml = objects();
        assert!(yaml.contains("clusterIP: 198.19.0.20"));
        assert!(yaml.contains("ports: [{name: http, port: 80, targetPort: 8080}]"));
        assert!(yaml.contains("kind: HTTPRoute"));
        assert!(
            yaml.contains("parentRefs: [{group: \"\", kind: Service, name: upstream, port: 80}]")
        );
    }

    #[test]
    #[allow(clippy::float_cmp, reason = "exact small values")]
    fn the_interval_of_the_median_widens_with_few_rounds() {
        let five = Interval::of(vec![5.0, 1.0, 4.0, 2.0, 3.0]).expect("values");
        assert_eq!((five.median, five.low, five.high), (3.0, 1.0, 5.0));
        // 20 rounds: k = ⌊(20 − 1.96·√20) / 2⌋ = 5, so ranks 5 and 14 (0-based).
        let twenty = Interval::of((1..=20).map(f64::from).collect()).expect("values");
        assert_eq!((twenty.low, twenty.median, twenty.high), (6.0, 11.0, 15.0));
        assert_eq!(twenty.side_of(16.0), "below");
        assert_eq!(twenty.side_of(10.0), "straddles");
        assert_eq!(twenty.side_of(5.0), "above");
        assert_eq!(Interval::of(vec![f64::NAN]), None);
    }

    #[test]
    #[allow(clippy::float_cmp, reason = "exact small values")]
    fn added_latency_and_ratio_use_the_better_proxy() {
        let column = |column, p99: f64| Measured {
            p99: vec![p99, p99 + 1000.0, p99 - 1.0],
            rps: vec![1.0],
            p50: vec![1.0],
            ..Measured::new(column)
        };
        let mut columns = vec![
            column(Column::Direct, 100.0),
            column(Column::Weft, 150.0),
            column(Column::Nginx, 300.0),
            column(Column::Haproxy, 200.0),
        ];
        let options = Options {
            secs: 1,
            rate: 1.0,
            repeats: 3,
            pin: false,
        };
        let r = report(&columns, &options);
        assert_eq!(r.weft_added_p99_us, Some(50.0));
        assert_eq!(r.haproxy_added_p99_us, Some(100.0));
        assert_eq!(r.ratio_weft_added_p99_vs_best_proxy, Some(0.5));
        // Round by round: 50/100, 50/100 (rounds 1 and 2 add 1000 and −1 to every column).
        let rounds = r
            .ratio_weft_added_p99_vs_best_proxy_rounds
            .expect("three rounds");
        assert_eq!((rounds.median, rounds.rounds), (0.5, 3));
        columns[1].error = Some("no engine".into());
        let r = report(&columns, &options);
        assert_eq!(
            (r.weft_p99_us, r.ratio_weft_added_p99_vs_best_proxy),
            (None, None)
        );
        assert_eq!(r.errors["weft"], "no engine");
        assert_eq!(r.nginx_added_p99_us, Some(200.0));
    }
}
