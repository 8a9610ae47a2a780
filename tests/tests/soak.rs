//! Soak: pods come and go, policies change, L4 (fast path) and L7 traffic flows, and the agent's
//! memory, file descriptors and map entries must not grow. `WEFT_SOAK_SECS` sets the length
//! (default 90 s in `cargo xtask test`; the notes report 30-minute runs); the samples and slopes
//! are printed, and written as JSON to `$WEFT_SOAK_JSON` when set.
#![allow(
    clippy::cast_precision_loss,
    clippy::float_cmp,
    reason = "samples are small integers (exact in f64); slopes are reported, not compared exactly"
)]

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use testbed::{
    ServeMode, Testbed,
    agent::Agent,
    eventually,
    http::{HttpGetArgs, HttpServerArgs},
};

const VIP: &str = "198.19.0.30";

/// What is sampled after each round.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Sample {
    secs: f64,
    rss_kib: u64,
    fds: u64,
    sockhash_entries: f64,
    workloads: f64,
}

fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn open_fds(pid: u32) -> Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// Least-squares slope of `y` over `x`, per minute of `x` seconds.
fn slope_per_minute(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let var: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if var == 0.0 {
        return 0.0;
    }
    let cov: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    cov / var * 60.0
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
    spec: {clusterIP: 198.19.0.30, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n\
    ---\napiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: web, namespace: default}\n\
    spec:\n  targetRef: {kind: Service, name: web}\n  retries: {attempts: 2, on: [connect-failure]}\n";

fn policy(round: usize) -> String {
    format!(
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: echo-{round}, namespace: default}}\n\
         spec:\n  selector: {{matchLabels: {{app: echo}}}}\n  \
         rules: [{{from: [{{source: {{serviceAccounts: [client, churn]}}}}]}}]\n"
    )
}

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, told in order")]
fn pod_and_policy_churn_under_traffic_grows_no_memory_fds_or_map_entries() -> Result<()> {
    let secs: u64 = std::env::var("WEFT_SOAK_SECS")
        .ok()
        .map(|s| s.parse())
        .transpose()
        .context("WEFT_SOAK_SECS")?
        .unwrap_or(90);
    let tb = Testbed::new("soak")?;
    let node = tb.node("n1")?;
    let client = node.pod("client")?;
    let echo = node.pod("echo")?;
    let web = node.pod("web")?;
    let stable = [
        client.manifest(&[("app", "client")], "client"),
        echo.manifest(&[("app", "echo")], "echo"),
        web.manifest(&[("app", "web")], "web"),
    ]
    .join("\n---\n");
    let agent = Agent::start(&node, &Agent::PRODUCTION_INTERVALS)?;
    agent.enable_socket_fast_path()?;
    agent.apply("pods.yaml", &stable)?;
    agent.apply("web.yaml", SERVICE)?;
    agent.wait_workloads(3)?;
    let pid = agent.pid().context("agent pid")?;
    let server = echo.serve(ServeMode::Echo, 7000)?;
    let _http = web.serve_http(&HttpServerArgs::new("web", 8080))?;
    let mut get = HttpGetArgs::new(format!("http://{VIP}/").parse()?);
    get.count = 400;
    get.concurrency = 8;

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut round = 0;
    // What the agent said last, for a failure's report.
    let agent_tail = || {
        let log = agent.stderr();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    while started.elapsed() < Duration::from_secs(secs) {
        // A pod arrives, talks, and leaves; a policy replaces the last one.
        let churn = node.pod("churn")?;
        agent.apply(
            "pods.yaml",
            &format!(
                "{stable}\n---\n{}",
                churn.manifest(&[("app", "churn")], "churn")
            ),
        )?;
        agent.apply("policy.yaml", &policy(round))?;
        agent.wait_workloads(4)?;
        let from_churn = churn.transfer(server.addr(), 256 * 1024, 4)?;
        ensure!(
            from_churn.all_ok(),
            "round {round}, churn → echo: {from_churn:?}"
        );
        let fast = client.transfer(server.addr(), 1024 * 1024, 16)?;
        ensure!(fast.all_ok(), "round {round}, client → echo: {fast:?}");
        let l7 = client.http_get(&get)?;
        ensure!(
            l7.status(200) == get.count,
            "round {round}, client → web (L7): {l7:?}\nflows: {}\nagent: {}",
            agent.flows().map(|f| f.to_string()).unwrap_or_default(),
            agent_tail()
        );
        agent.apply("pods.yaml", &stable)?;
        churn.delete()?;
        agent.wait_workloads(3)?;
        // Every connection of the round is closed but the engine's idle keep-alive connections
        // to web (about one per concurrent request, both ends in the sockhash; hyper's pool may
        // keep a couple more): nothing else may stay.
        let open_bound = f64::from(2 * get.concurrency + 4);
        let sockhash = eventually(Duration::from_secs(10), || {
            let n = agent.metric("weft_sockhash_entries", &[])?;
            ensure!(
                n <= open_bound,
                "sockhash entries after round {round}: {n} (at most {open_bound} open)"
            );
            Ok(n)
        })?;
        samples.push(Sample {
            secs: started.elapsed().as_secs_f64(),
            rss_kib: proc_status_kib(pid, "VmRSS:")?,
            fds: open_fds(pid)?,
            sockhash_entries: sockhash,
            workloads: agent.metric("weft_workloads", &[])?,
        });
        round += 1;
    }
    ensure!(
        samples.len() >= 4,
        "only {} rounds in {secs} s",
        samples.len()
    );
    // The first quarter warms up (allocator arenas, pools, the first snapshots).
    let steady = &samples[samples.len() / 4..];
    let series = |f: fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        steady.iter().map(|s| (s.secs, f(s))).collect()
    };
    let rss_slope = slope_per_minute(&series(|s| s.rss_kib as f64));
    let fd_slope = slope_per_minute(&series(|s| s.fds as f64));
    let sockhash_slope = slope_per_minute(&series(|s| s.sockhash_entries));
    let summary = serde_json::json!({
        "seconds": started.elapsed().as_secs(),
        "rounds": round,
        "rss_kib_per_minute": rss_slope,
        "fds_per_minute": fd_slope,
        "sockhash_entries_per_minute": sockhash_slope,
        "rss_kib_first_last": [steady[0].rss_kib, samples[samples.len() - 1].rss_kib],
        "fds_first_last": [steady[0].fds, samples[samples.len() - 1].fds],
        "samples": samples,
    });
    eprintln!(
        "soak: {round} rounds in {} s; RSS {} → {} KiB ({rss_slope:+.1} KiB/min), fds {} → {} ({fd_slope:+.2}/min), sockhash entries {sockhash_slope:+.2}/min",
        started.elapsed().as_secs(),
        steady[0].rss_kib,
        samples[samples.len() - 1].rss_kib,
        steady[0].fds,
        samples[samples.len() - 1].fds,
    );
    if let Some(path) = std::env::var_os("WEFT_SOAK_JSON") {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)?;
    }
    let last = samples[samples.len() - 1];
    // No descriptor leaks: the same open files at the end as after warm-up (a few of slack for
    // connections of the admin API in flight).
    ensure!(
        last.fds <= steady[0].fds + 4,
        "fds grew {} → {}: {summary}",
        steady[0].fds,
        last.fds
    );
    ensure!(
        last.workloads == 3.0,
        "workloads at the end: {}",
        last.workloads
    );
    // Map entries: at the end no more than the most seen in the first half.
    let early_sockhash = samples[..samples.len() / 2]
        .iter()
        .map(|s| s.sockhash_entries)
        .fold(0.0, f64::max);
    ensure!(
        last.sockhash_entries <= early_sockhash,
        "sockhash entries grew to {} (at most {early_sockhash} in the first half): {summary}",
        last.sockhash_entries
    );
    // Memory: what one round allocates must come back. The allocator keeps some; more than
    // 4 MiB above the steady state's start is growth.
    ensure!(
        last.rss_kib <= steady[0].rss_kib + 4096,
        "RSS grew {} → {} KiB ({rss_slope:+.0} KiB/min): {summary}",
        steady[0].rss_kib,
        last.rss_kib
    );
    Ok(())
}
