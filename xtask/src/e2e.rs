//! `cargo xtask e2e`: Weft installed with Helm on a real two-node Kubernetes 1.20 cluster
//! (`testbed::cluster`), used with `kubectl` only, as an operator would; then uninstalled. Every
//! check is recorded in the JSON report; the run fails if any failed.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;
use serde_json::Value;
use testbed::cluster::{self, Cluster};

use crate::{cluster as xcluster, step};

/// The namespace of the meshed test workloads.
const NS: &str = "e2e";
/// Bytes each direction of the fast-path transfer.
const TRANSFER_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Default, Serialize)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "the report's fields the issue names"
)]
pub struct Report {
    pub nodes: usize,
    pub agents_ready: usize,
    pub fast_path_flows: usize,
    pub counter_bytes_match: bool,
    pub counter_bytes: u64,
    pub sent_bytes: u64,
    pub deny_enforced: bool,
    pub deny_v4_mapped_enforced: bool,
    pub policy_programmed: bool,
    pub policy_revert_secs: f64,
    pub split_percent_v2: f64,
    pub cross_node_plaintext_bytes: u64,
    pub cross_node_tunnel_streams: u64,
    pub spiffe_identity: Option<String>,
    pub unmeshed_namespace_works: bool,
    pub first_connection_meshed: bool,
    pub first_connection_runs: usize,
    pub upgrade_broken_connections: Option<u64>,
    pub upgrade_lost_bytes: Option<u64>,
    /// Requests through the `HTTPRoute` during each lifecycle step (500/s), and how many failed.
    pub lifecycle_requests: u64,
    pub upgrade_failed_requests: Option<u64>,
    pub agent_deletion_failed_requests: Option<u64>,
    pub rollback_failed_requests: Option<u64>,
    /// How each agent started after each step (`upgraded`, `adopted`).
    pub lifecycle_startups: Vec<String>,
    pub uninstall_broken_connections: u64,
    pub uninstall_residue: usize,
    pub uninstall_residue_detail: Vec<String>,
    pub image_bytes: u64,
    pub seconds: f64,
    /// The same cluster without kube-proxy: `ClusterIPs` served by Weft's connect-time balancer
    /// alone (its checks are also in `checks`, named `no_kube_proxy/…`).
    pub without_kube_proxy: Option<Box<Report>>,
    /// Prepended to each check's name.
    #[serde(skip)]
    prefix: &'static str,
    /// Every check, in order: name → passed, with what was seen.
    pub checks: Vec<Check>,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

impl Report {
    fn check(&mut self, name: &str, passed: bool, detail: impl Into<String>) {
        let detail = detail.into();
        let name = format!("{}{name}", self.prefix);
        step!(
            "e2e: {} {name}{}",
            if passed { "ok  " } else { "FAIL" },
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            }
        );
        self.checks.push(Check {
            name,
            passed,
            detail,
        });
    }
}

/// Tears the cluster down when the run ends, however it ends (unless kept for a look).
struct Down(String, bool);

impl Drop for Down {
    fn drop(&mut self) {
        if self.1 {
            eprintln!(
                "e2e: cluster {} kept; `cargo xtask cluster down` removes it",
                self.0
            );
            return;
        }
        if let Err(e) = cluster::down(&self.0) {
            eprintln!("e2e: tearing down cluster {}: {e:#}", self.0);
        }
    }
}

/// Polls `f` every `step` until it succeeds or `timeout` passes.
fn eventually<T>(timeout: Duration, step: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= timeout => {
                return Err(e.context(format!("still failing after {timeout:?}")));
            }
            Err(_) => std::thread::sleep(step),
        }
    }
}

/// The last line of `text` that is a JSON object (the workload's report).
fn last_json(text: &str) -> Result<Value> {
    text.lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<Value>(l.trim())
                .ok()
                .filter(Value::is_object)
        })
        .with_context(|| format!("no JSON report in {text:?}"))
}

struct E2e {
    cluster: Cluster,
    weft: PathBuf,
}

impl E2e {
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.cluster.kubectl(args)
    }

    /// Two connections from client (weft-n1) through the remote Service's `ClusterIP` to its
    /// pod on weft-n2, 1 MiB each way, checked; the workload's report.
    fn cross_node_transfer(&self) -> Result<Value> {
        let remote_vip = self.service_ip(NS, "remote")?;
        self.exec_json(
            "client",
            &[
                "weft-workload",
                "transfer",
                "--connect",
                &format!("{remote_vip}:80"),
                "--bytes",
                "1048576",
                "--conns",
                "2",
            ],
        )
    }

    /// Waits until the controller reports the test's `AuthorizationPolicy` `Programmed=True`.
    fn policy_programmed(&self) -> Result<()> {
        eventually(Duration::from_secs(30), Duration::from_millis(500), || {
            let s = self.kubectl(&[
                "get",
                "authorizationpolicy",
                "-n",
                NS,
                "echo-from-client",
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Programmed")].status}"#,
            ])?;
            ensure!(s.trim() == "True", "Programmed={s}");
            Ok(())
        })
    }

    /// Prints what an operator would look at first when a step fails.
    fn diagnose(&self) {
        for (i, node) in self.cluster.nodes.iter().enumerate() {
            eprintln!(
                "--- {} kubelet log tail:\n{}",
                node.name,
                cluster::log_tail(&self.cluster, i, "kubelet")
            );
        }
        if let Ok(pods) = self.kubectl(&["get", "pods", "-A", "-o", "wide"]) {
            eprintln!("--- pods:\n{pods}");
        }
        if let Ok(logs) = self.kubectl(&[
            "logs",
            "-n",
            "weft-system",
            "-l",
            "app.kubernetes.io/component=agent",
            "--tail=30",
        ]) {
            eprintln!("--- agent logs:\n{logs}");
        }
    }

    /// `kubectl exec` in a pod of [`NS`]; the workload's JSON report.
    fn exec_json(&self, pod: &str, cmd: &[&str]) -> Result<Value> {
        let mut args = vec!["exec", "-n", NS, pod, "--"];
        args.extend_from_slice(cmd);
        last_json(&self.kubectl(&args)?)
    }

    fn pod_ip(&self, ns: &str, pod: &str) -> Result<String> {
        Ok(self
            .kubectl(&[
                "get",
                "pod",
                "-n",
                ns,
                pod,
                "-o",
                "jsonpath={.status.podIP}",
            ])?
            .trim()
            .to_owned())
    }

    fn service_ip(&self, ns: &str, svc: &str) -> Result<String> {
        Ok(self
            .kubectl(&[
                "get",
                "svc",
                "-n",
                ns,
                svc,
                "-o",
                "jsonpath={.spec.clusterIP}",
            ])?
            .trim()
            .to_owned())
    }

    /// The first pod of `ns` matching `selector`.
    fn pod_of(&self, ns: &str, selector: &str) -> Result<String> {
        let name = self.kubectl(&[
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            selector,
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])?;
        ensure!(!name.trim().is_empty(), "no pod {selector} in {ns}");
        Ok(name.trim().to_owned())
    }

    /// The agent pod on node `index`.
    fn agent(&self, index: usize) -> Result<String> {
        let node = &self.cluster.nodes[index].name;
        let name = self.kubectl(&[
            "get",
            "pods",
            "-n",
            "weft-system",
            "-l",
            "app.kubernetes.io/component=agent",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ])?;
        ensure!(!name.trim().is_empty(), "no agent on {node}");
        Ok(name.trim().to_owned())
    }

    /// `kubectl exec` in a pod of [`NS`], running in the background.
    fn spawn_in_pod(&self, pod: &str, cmd: &[&str]) -> Result<std::process::Child> {
        let c = &self.cluster;
        Ok(c.node_command(0, &c.kubectl)
            .arg("--kubeconfig")
            .arg(c.kubeconfig())
            .args(["exec", "-n", NS, pod, "--"])
            .args(cmd)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?)
    }

    /// 200 connections from client to the echo Service at `echo_vip`, each sending a checked
    /// message every `interval_ms` until `stop_file` appears in the client pod (or `max_secs`).
    fn hold_echo(
        &self,
        echo_vip: &str,
        interval_ms: u32,
        stop_file: &str,
        max_secs: u32,
    ) -> Result<std::process::Child> {
        self.spawn_in_pod(
            "client",
            &[
                "weft-workload",
                "hold",
                "--connect",
                &format!("{echo_vip}:80"),
                "--conns",
                "200",
                "--interval-ms",
                &interval_ms.to_string(),
                "--until-file",
                stop_file,
                "--max-secs",
                &max_secs.to_string(),
            ],
        )
    }

    /// How the agent of each node started (`installed`, `adopted`, `upgraded`).
    fn startups(&self) -> Result<Vec<String>> {
        (0..self.cluster.nodes.len())
            .map(|i| {
                let s: Value =
                    serde_json::from_str(&self.weft_in_agent(i, &["status", "--json"])?)?;
                Ok(s["startup"].as_str().unwrap_or("?").to_owned())
            })
            .collect()
    }

    /// How many agents the `DaemonSet` reports ready.
    fn agents_ready(&self) -> Result<usize> {
        Ok(self
            .kubectl(&[
                "get",
                "ds",
                "-n",
                "weft-system",
                "weft-agent",
                "-o",
                "jsonpath={.status.numberReady}",
            ])?
            .trim()
            .parse()
            .unwrap_or(0))
    }

    /// Waits until the agent `DaemonSet` runs its current template on every node.
    fn agents_rolled_out(&self) -> Result<()> {
        self.kubectl(&[
            "rollout",
            "status",
            "daemonset/weft-agent",
            "-n",
            "weft-system",
            "--timeout=300s",
        ])?;
        Ok(())
    }

    /// `weft <args> --admin-socket …` inside the agent pod of node `index`.
    fn weft_in_agent(&self, index: usize, args: &[&str]) -> Result<String> {
        let agent = self.agent(index)?;
        let mut all = vec!["exec", "-n", "weft-system", &agent, "--", "weft"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--admin-socket", "/host/run/weft/admin.sock"]);
        self.kubectl(&all)
    }

    /// The controllers' metrics and cluster page, through their pods' `metrics` port: one
    /// leader, every agent reached (found by the agents' Endpoints, named by node), the
    /// workloads of both nodes on the merged graph.
    fn controller_page(&self) -> Result<String> {
        let ips = self.kubectl(&[
            "get",
            "pods",
            "-n",
            "weft-system",
            "-l",
            "app.kubernetes.io/component=controller",
            "-o",
            "jsonpath={.items[*].status.podIP}",
        ])?;
        let get = |ip: &str, path: &str| -> Result<String> {
            let out = self.cluster.node_run(
                0,
                "curl",
                [
                    "-sf",
                    "--max-time",
                    "10",
                    &format!("http://{ip}:15014{path}"),
                ],
            )?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let ips: Vec<&str> = ips.split_whitespace().collect();
        ensure!(!ips.is_empty(), "no controller pod has an address");
        eventually(Duration::from_secs(30), Duration::from_secs(1), || {
            let mut leaders = 0.0;
            for ip in &ips {
                leaders += metric_sum(&get(ip, "/metrics")?, "weft_controller_leader", &[]);
            }
            ensure!(
                (leaders - 1.0).abs() < 0.5,
                "{leaders} of {} controllers lead",
                ips.len()
            );
            let graph: Value = serde_json::from_str(&get(ips[0], "/graph")?)?;
            let mut agents: Vec<String> = graph["agents"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["up"] == true)
                .filter_map(|a| a["name"].as_str().map(str::to_owned))
                .collect();
            agents.sort();
            let nodes: Vec<String> = self.cluster.nodes.iter().map(|n| n.name.clone()).collect();
            ensure!(
                agents == nodes,
                "agents answering: {agents:?}; graph: {graph}"
            );
            let hosts: std::collections::BTreeSet<&str> = graph["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| n["kind"] == "workload")
                .filter_map(|n| n["host"].as_str())
                .collect();
            ensure!(
                nodes.iter().all(|n| hosts.contains(n.as_str())),
                "workloads' nodes on the merged graph: {hosts:?}"
            );
            Ok(format!(
                "1 leader of {}; agents {agents:?} answer; workloads on {hosts:?}",
                ips.len()
            ))
        })
    }

    /// Every agent's metrics, scraped as Prometheus would: through the chart's headless
    /// Service's endpoints.
    fn scrape_agents(&self) -> Result<Vec<String>> {
        let ips = self.kubectl(&[
            "get",
            "endpoints",
            "-n",
            "weft-system",
            "weft-agent-metrics",
            "-o",
            "jsonpath={.subsets[*].addresses[*].ip}",
        ])?;
        let mut out = Vec::new();
        for ip in ips.split_whitespace() {
            let body = self.cluster.node_run(
                0,
                "curl",
                [
                    "-sf",
                    "--max-time",
                    "5",
                    &format!("http://{ip}:9090/metrics"),
                ],
            )?;
            out.push(String::from_utf8_lossy(&body.stdout).into_owned());
        }
        ensure!(!out.is_empty(), "the metrics Service has no endpoints");
        Ok(out)
    }
}

/// Sum of the samples of `name` whose labels contain all of `labels`.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[allow(clippy::too_many_lines, reason = "one manifest")]
fn workloads_yaml() -> String {
    let fast = "weft.dev/socket-fast-path: enabled";
    let mut y = String::new();
    let _ = write!(
        y,
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: intruder, namespace: {NS}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: {NS}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}, annotations: {{{fast}}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: weft-n1}}
      terminationGracePeriodSeconds: 1
      containers:
      - name: echo
        image: weft-workload:{v}
        imagePullPolicy: Never
        args: [server, --listen, "0.0.0.0:7000", --mode, echo]
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {NS}}}
spec: {{selector: {{app: echo}}, ports: [{{port: 80, targetPort: 7000, protocol: TCP}}]}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: remote, namespace: {NS}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: remote}}}}
  template:
    metadata: {{labels: {{app: remote}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: weft-n2}}
      terminationGracePeriodSeconds: 1
      containers:
      - name: remote
        image: weft-workload:{v}
        imagePullPolicy: Never
        args: [server, --listen, "0.0.0.0:7000", --mode, echo]
---
apiVersion: v1
kind: Service
metadata: {{name: remote, namespace: {NS}}}
spec: {{selector: {{app: remote}}, ports: [{{port: 80, targetPort: 7000, protocol: TCP}}]}}
"#,
        v = xcluster::VERSION
    );
    for (name, sa, annotations) in [("client", "client", fast), ("intruder", "intruder", "")] {
        let _ = write!(
            y,
            r#"---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {NS}, labels: {{app: {name}}}, annotations: {{{annotations}}}}}
spec:
  serviceAccountName: {sa}
  nodeName: weft-n1
  terminationGracePeriodSeconds: 1
  containers:
  - name: {name}
    image: weft-workload:{v}
    imagePullPolicy: Never
    command: [sleep, "7200"]
"#,
            v = xcluster::VERSION
        );
    }
    // v2 runs on both nodes (as a highly available service would): while one node's agent
    // restarts, its STRICT pods are out of reach and the other replica answers.
    for (deployment, version, node) in [
        ("web-v1", "v1", "weft-n1"),
        ("web-v2", "v2", "weft-n2"),
        ("web-v2-n1", "v2", "weft-n1"),
    ] {
        let _ = write!(
            y,
            r#"---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {deployment}, namespace: {NS}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: web, version: {version}}}}}
  template:
    metadata: {{labels: {{app: web, version: {version}}}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: weft-workload:{v}
        imagePullPolicy: Never
        args: [http-server, --listen, "0.0.0.0:8080", --name, "{version}"]
"#,
            v = xcluster::VERSION
        );
    }
    for version in ["v1", "v2"] {
        let _ = write!(
            y,
            r"---
apiVersion: v1
kind: Service
metadata: {{name: web-{version}, namespace: {NS}}}
spec: {{selector: {{app: web, version: {version}}}, ports: [{{port: 80, targetPort: 8080, protocol: TCP}}]}}
"
        );
    }
    let _ = write!(
        y,
        r"---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {NS}}}
spec: {{selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080, protocol: TCP, appProtocol: http}}]}}
"
    );
    y
}

fn route_yaml() -> String {
    format!(
        r"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web-split, namespace: {NS}}}
spec:
  parentRefs: [{{group: '', kind: Service, name: web, port: 80}}]
  rules:
  - backendRefs:
    - {{name: web-v1, port: 80, weight: 90}}
    - {{name: web-v2, port: 80, weight: 10}}
"
    )
}

fn policy_yaml() -> String {
    format!(
        r"apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: echo-from-client, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{serviceAccounts: [client]}}}}]}}]
"
    )
}

/// `cargo xtask e2e`: up, install, check, uninstall, down. Returns the report (also written
/// to `json` when given); fails when a check failed.
#[allow(clippy::too_many_lines, reason = "one linear scenario, step by step")]
pub fn run(
    weft: &Path,
    images: &xcluster::Images,
    json: Option<&Path>,
    keep_on_failure: bool,
) -> Result<Report> {
    let started = Instant::now();
    let name = cluster::DEFAULT_NAME;
    let mut report = Report {
        image_bytes: std::fs::metadata(&images.weft).map_or(0, |m| m.len()),
        ..Report::default()
    };
    let mut down = on_cluster(name, images, true, weft, &mut report, scenario)?;
    if report.checks.iter().all(|c| c.passed) {
        drop(down);
        step!("e2e: the same without kube-proxy (Weft's connect-time service balancer alone)");
        let mut sub = Report {
            prefix: "no_kube_proxy/",
            ..Report::default()
        };
        match on_cluster(name, images, false, weft, &mut sub, without_kube_proxy) {
            Ok(guard) => down = guard,
            Err(err) => {
                sub.check("cluster_up", false, format!("{err:#}"));
                down = Down(name.to_owned(), false);
            }
        }
        report.checks.append(&mut sub.checks);
        report.without_kube_proxy = Some(Box::new(sub));
    }
    report.seconds = started.elapsed().as_secs_f64();
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        step!("e2e: wrote {}", path.display());
    }
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.as_str())
        .collect();
    down.1 = keep_on_failure && !failed.is_empty();
    drop(down);
    if !failed.is_empty() {
        bail!(
            "e2e: {} check(s) failed: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    step!("e2e: every check passed in {:.0}s", report.seconds);
    Ok(report)
}

/// Brings the cluster up (with or without kube-proxy) and runs `phase` on it; a phase that
/// stops with an error is a failed check, with the nodes' and agents' logs printed. The
/// returned guard tears the cluster down.
fn on_cluster(
    name: &str,
    images: &xcluster::Images,
    kube_proxy: bool,
    weft: &Path,
    report: &mut Report,
    phase: fn(&E2e, &mut Report) -> Result<()>,
) -> Result<Down> {
    let cluster = xcluster::up(name, images, kube_proxy)?;
    let down = Down(name.to_owned(), false);
    let e = E2e {
        cluster,
        weft: weft.to_owned(),
    };
    if let Err(err) = phase(&e, report) {
        report.check("scenario", false, format!("{err:#}"));
        e.diagnose();
    }
    Ok(down)
}

#[allow(clippy::too_many_lines, reason = "one linear scenario, step by step")]
fn scenario(e: &E2e, report: &mut Report) -> Result<()> {
    let c = &e.cluster;
    report.nodes = c
        .kubectl([
            "get",
            "nodes",
            "-o",
            r#"jsonpath={.items[*].status.conditions[?(@.type=="Ready")].status}"#,
        ])?
        .split_whitespace()
        .filter(|s| *s == "True")
        .count();
    report.check(
        "nodes_ready",
        report.nodes == 2,
        format!("{} of 2", report.nodes),
    );

    install(e, report, &[])?;
    let status = e.weft_in_agent(0, &["status", "--json"])?;
    let status: Value = serde_json::from_str(&status)?;
    let ifs = status["interfaces"].as_array().map_or(0, Vec::len);
    report.check(
        "agent_finds_pod_interfaces",
        ifs > 0,
        format!("{ifs} pod interfaces on weft-n1 (the CNI names them veth*)"),
    );

    deploy_workloads(e)?;

    let echo_pod = same_node_fast_path(e, report)?;
    let counted = eventually(Duration::from_secs(10), Duration::from_millis(500), || {
        let metrics = e.scrape_agents()?;
        let sum = |direction: &str| -> f64 {
            metrics
                .iter()
                .map(|m| {
                    metric_sum(
                        m,
                        "weft_tcp_sent_bytes_total",
                        &[
                            ("source_workload", "client"),
                            ("destination_workload", &echo_pod),
                            ("direction", direction),
                        ],
                    )
                })
                .sum()
        };
        let (to_dst, to_src) = (sum("to_destination"), sum("to_source"));
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "byte counters"
        )]
        let (to_dst, to_src) = (to_dst as u64, to_src as u64);
        ensure!(
            to_dst == 2 * TRANSFER_BYTES && to_src == 2 * TRANSFER_BYTES,
            "counted {to_dst} sent, {to_src} echoed"
        );
        Ok(to_dst + to_src)
    });
    report.counter_bytes_match = counted.is_ok();
    report.counter_bytes = *counted.as_ref().unwrap_or(&0);
    report.check(
        "kernel_counters_equal_bytes_sent",
        report.counter_bytes_match,
        counted.map_or_else(
            |e| format!("{e:#}"),
            |b| format!("{b} bytes counted, scraped through the metrics Service"),
        ),
    );

    // --- AuthorizationPolicy ------------------------------------------------------------------
    let echo_pod_ip = e.pod_ip(NS, &echo_pod)?;
    let connect = |pod: &str, addr: &str| -> Result<Value> {
        e.exec_json(
            pod,
            &[
                "weft-workload",
                "connect",
                "--connect",
                addr,
                "--timeout-ms",
                "3000",
            ],
        )
    };
    let plain = format!("{echo_pod_ip}:7000");
    let mapped = format!("[::ffff:{echo_pod_ip}]:7000");
    let before = connect("intruder", &plain)?;
    report.check(
        "intruder_connects_before_policy",
        before["ok"] == true,
        before.to_string(),
    );
    c.apply(&policy_yaml())?;
    let denied = eventually(Duration::from_secs(15), Duration::from_millis(500), || {
        let r = connect("intruder", &plain)?;
        ensure!(r["errno"] == 1, "{r}");
        Ok(r)
    });
    report.deny_enforced = denied.is_ok();
    report.check(
        "policy_refuses_intruder_with_eperm",
        report.deny_enforced,
        denied.map_or_else(|e| format!("{e:#}"), |r| r.to_string()),
    );
    let v6 = connect("intruder", &mapped)?;
    report.deny_v4_mapped_enforced = v6["errno"] == 1;
    report.check(
        "policy_refuses_v4_mapped_ipv6_socket",
        report.deny_v4_mapped_enforced,
        v6.to_string(),
    );
    let allowed = connect("client", &plain)?;
    report.check(
        "policy_lets_client_in",
        allowed["ok"] == true,
        allowed.to_string(),
    );
    let programmed = e.policy_programmed();
    report.policy_programmed = programmed.is_ok();
    report.check("policy_status_programmed", report.policy_programmed, "");
    let page = e.controller_page();
    report.check(
        "controller_page_merges_both_nodes",
        page.is_ok(),
        page.unwrap_or_else(|e| format!("{e:#}")),
    );
    e.kubectl(&[
        "delete",
        "authorizationpolicy",
        "-n",
        NS,
        "echo-from-client",
    ])?;
    let revert = Instant::now();
    let reverted = eventually(Duration::from_secs(15), Duration::from_millis(250), || {
        let r = connect("intruder", &plain)?;
        ensure!(r["ok"] == true, "{r}");
        Ok(())
    });
    report.policy_revert_secs = revert.elapsed().as_secs_f64();
    report.check(
        "policy_deletion_reverts",
        reverted.is_ok(),
        format!("{:.1}s after kubectl delete", report.policy_revert_secs),
    );

    route_split(e, report)?;

    // --- across nodes: only the tunnel on the wire ---------------------------------------------
    let capture = c.state.join("link0.pcap");
    let mut tcpdump = c
        .node_command(0, "tcpdump")
        .args(["-i", cluster::LINK, "-nn", "-s", "128", "-w"])
        .arg(&capture)
        .arg("tcp")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(1));
    let crossed = e.cross_node_transfer()?;
    std::thread::sleep(Duration::from_secs(1));
    // tcpdump writes its capture out on SIGINT.
    let _ = Command::new("kill")
        .args(["-INT", &tcpdump.id().to_string()])
        .status();
    let _ = tcpdump.wait();
    report.check(
        "cross_node_transfer_byte_exact",
        crossed["bytes_verified"] == 2 * 1_048_576,
        crossed.to_string(),
    );
    let (plaintext, tunnel_packets) = plaintext_between_pods(c, &capture)?;
    report.cross_node_plaintext_bytes = plaintext;
    report.check(
        "cross_node_only_tunnel_on_the_wire",
        plaintext == 0 && tunnel_packets > 0,
        format!("{plaintext} plaintext payload bytes between the pod networks; {tunnel_packets} packets on port 15008"),
    );
    let metrics = e.scrape_agents()?;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a counter"
    )]
    {
        report.cross_node_tunnel_streams = metrics
            .iter()
            .map(|m| {
                metric_sum(
                    m,
                    "weft_tunnel_streams_total",
                    &[("direction", "inbound"), ("result", "ok")],
                )
            })
            .sum::<f64>() as u64;
    }
    let status: Value = serde_json::from_str(&e.weft_in_agent(0, &["status", "--json"])?)?;
    let client_id = format!("spiffe://cluster.local/ns/{NS}/sa/client");
    let holds = status["identities"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|i| i[0] == client_id.as_str());
    report.spiffe_identity = holds.then_some(client_id);
    report.check(
        "workload_identity_from_certificate_service",
        holds && report.cross_node_tunnel_streams > 0,
        format!(
            "{} inbound tunnel streams; the client's SVID held: {holds} (issued by the controller after a TokenReview)",
            report.cross_node_tunnel_streams
        ),
    );

    // --- upgrade, agent deletion, rollback under traffic -----------------------------------------
    lifecycle(e, report)?;
    // --- unmeshed namespace ---------------------------------------------------------------------
    unmeshed(
        e,
        report,
        "unmeshed_namespace_across_nodes_through_kube_proxy",
    )?;
    // --- first connection -----------------------------------------------------------------------
    first_connection(e, report)?;
    // --- uninstall under live traffic -----------------------------------------------------------
    uninstall(e, report)?;
    Ok(())
}

/// The cluster without kube-proxy: nothing but Weft serves `ClusterIPs`. The agents and the
/// controller reach the API server at the address the chart is given (`apiServer.host`, as
/// Cilium's `k8sServiceHost`); every Service the pods use goes through Weft's connect-time
/// balancer: same node (fast path), across nodes (mTLS tunnel), through an `HTTPRoute` (L7
/// engine), and from an unmeshed namespace.
fn without_kube_proxy(e: &E2e, report: &mut Report) -> Result<()> {
    let c = &e.cluster;
    ensure!(
        !c.kube_proxy,
        "this phase needs a cluster without kube-proxy"
    );
    let api_host = format!("apiServer.host={}", c.nodes[0].ip);
    install(e, report, &[&api_host, "apiServer.port=6443"])?;
    deploy_workloads(e)?;
    same_node_fast_path(e, report)?;

    let crossed = e.cross_node_transfer()?;
    let streams: f64 = e
        .scrape_agents()?
        .iter()
        .map(|m| {
            metric_sum(
                m,
                "weft_tunnel_streams_total",
                &[("direction", "inbound"), ("result", "ok")],
            )
        })
        .sum();
    report.check(
        "cross_node_service_through_tunnel",
        crossed["bytes_verified"] == 2 * 1_048_576 && streams >= 2.0,
        format!("{crossed}; {streams} inbound tunnel streams"),
    );

    route_split(e, report)?;

    // The controller reached the API server: it wrote the policy's status.
    c.apply(&policy_yaml())?;
    let programmed = e.policy_programmed();
    report.check(
        "controller_writes_status",
        programmed.is_ok(),
        programmed
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default(),
    );
    unmeshed(e, report, "unmeshed_namespace_across_nodes")?;
    Ok(())
}

/// `helm install` of the chart (with `extra` `--set` values), then the `DaemonSet's` readiness.
fn install(e: &E2e, report: &mut Report, extra: &[&str]) -> Result<()> {
    let c = &e.cluster;
    // --- install -------------------------------------------------------------------------
    step!(
        "e2e: helm install (CRDs, agents on both nodes, two controllers, mTLS with the controller's certificate service)"
    );
    let ca_dir = c.state.join("ca");
    crate::run(
        Command::new(&e.weft)
            .args(["ca", "init", "--dir"])
            .arg(&ca_dir),
    )?;
    e.kubectl(&["create", "namespace", "weft-system"])?;
    e.kubectl(&[
        "create",
        "secret",
        "generic",
        "weft-ca",
        "-n",
        "weft-system",
        &format!("--from-file=ca.crt={}", ca_dir.join("ca.crt").display()),
        &format!("--from-file=ca.key={}", ca_dir.join("ca.key").display()),
    ])?;
    let chart = crate::workspace_root().join("deploy/helm/weft");
    let installed = Instant::now();
    let chart = chart.display().to_string();
    let mut args = vec![
        "install",
        "weft",
        &chart,
        "-n",
        "weft-system",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "mtls.caSecretName=weft-ca",
        "--set",
        "mtls.certificateService=true",
        "--wait",
        "--timeout",
        "180s",
    ];
    for value in extra {
        args.extend(["--set", value]);
    }
    c.helm(args)?;
    report.agents_ready = e.agents_ready()?;
    report.check(
        "agents_ready",
        report.agents_ready == 2,
        format!(
            "{} agents ready, helm install --wait took {:.1}s",
            report.agents_ready,
            installed.elapsed().as_secs_f64()
        ),
    );
    Ok(())
}

/// The meshed workloads of [`NS`] (and the Gateway API CRDs), ready.
fn deploy_workloads(e: &E2e) -> Result<()> {
    let c = &e.cluster;
    step!(
        "e2e: workloads (kubectl apply): echo and client on weft-n1, remote on weft-n2, web v1/v2"
    );
    let gateway = Command::new(&e.weft)
        .args(["crds", "--gateway-api"])
        .output()?;
    ensure!(gateway.status.success(), "weft crds --gateway-api");
    c.apply(&String::from_utf8_lossy(&gateway.stdout))?;
    c.apply(&workloads_yaml())?;
    e.kubectl(&[
        "wait",
        "--for=condition=Available",
        "deployment",
        "--all",
        "-n",
        NS,
        "--timeout=120s",
    ])?;
    e.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod",
        "--all",
        "-n",
        NS,
        "--timeout=120s",
    ])?;

    Ok(())
}

/// A byte-checked transfer from client to echo (same node) through the echo Service's
/// `ClusterIP`, seen on the socket fast path in the flow table; echo's pod name.
fn same_node_fast_path(e: &E2e, report: &mut Report) -> Result<String> {
    let echo_vip = e.service_ip(NS, "echo")?;
    let transfer = e.exec_json(
        "client",
        &[
            "weft-workload",
            "transfer",
            "--connect",
            &format!("{echo_vip}:80"),
            "--bytes",
            &TRANSFER_BYTES.to_string(),
            "--conns",
            "2",
        ],
    )?;
    let verified = transfer["bytes_verified"].as_u64().unwrap_or(0);
    report.sent_bytes = transfer["bytes_sent"].as_u64().unwrap_or(0);
    report.check(
        "fast_path_transfer_byte_exact",
        verified == 2 * TRANSFER_BYTES,
        format!(
            "{verified} of {} bytes echoed back intact",
            2 * TRANSFER_BYTES
        ),
    );
    let echo_pod = e.pod_of(NS, "app=echo")?;
    let flows: Value = eventually(Duration::from_secs(10), Duration::from_millis(500), || {
        let flows: Value = serde_json::from_str(&e.weft_in_agent(0, &["flows", "--json"])?)?;
        let fast = flows["recent"]
            .as_array()
            .into_iter()
            .chain(flows["live"].as_array())
            .flatten()
            .filter(|r| {
                r["src"]["workload"] == format!("{NS}/client")
                    && r["dst"]["workload"] == format!("{NS}/{echo_pod}")
                    && r["fast_path"] == true
            })
            .count();
        ensure!(fast >= 2, "{fast} fast-path client → echo flows");
        Ok(flows)
    })
    .unwrap_or(Value::Null);
    report.fast_path_flows = flows["recent"]
        .as_array()
        .into_iter()
        .chain(flows["live"].as_array())
        .flatten()
        .filter(|r| r["fast_path"] == true && r["src"]["workload"] == format!("{NS}/client"))
        .count();
    report.check(
        "same_node_service_fast_path",
        report.fast_path_flows >= 2,
        format!(
            "{} client → echo flows on the socket fast path (both pods opted in: weft.dev/socket-fast-path: enabled; this kernel fails the self-test, so the default is the normal TCP path)",
            report.fast_path_flows
        ),
    );
    Ok(echo_pod)
}

/// The `HTTPRoute`'s 90/10 split between web-v1 and web-v2, through the web Service's `ClusterIP`.
fn route_split(e: &E2e, report: &mut Report) -> Result<()> {
    let c = &e.cluster;
    c.apply(&route_yaml())?;
    let web_vip = e.service_ip(NS, "web")?;
    let url = format!("http://{web_vip}/");
    // The route is in effect once the engine serves it (the agent sees new kinds within 15 s).
    let in_effect = eventually(Duration::from_secs(45), Duration::from_secs(1), || {
        e.exec_json(
            "client",
            &["weft-workload", "http-get", "--url", &url, "--count", "5"],
        )?;
        let metrics = e.scrape_agents()?;
        let routed: f64 = metrics
            .iter()
            .map(|m| metric_sum(m, "weft_l7_requests_total", &[("route", "e2e/web-split#0")]))
            .sum();
        ensure!(routed > 0.0, "no request through the route yet");
        Ok(())
    });
    report.check(
        "httproute_in_effect",
        in_effect.is_ok(),
        in_effect
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default(),
    );
    let split = e.exec_json(
        "client",
        &[
            "weft-workload",
            "http-get",
            "--url",
            &url,
            "--count",
            "400",
            "--concurrency",
            "4",
        ],
    )?;
    let by_server: BTreeMap<String, u64> =
        serde_json::from_value(split["by_server"].clone()).unwrap_or_default();
    let total: u64 = by_server.values().sum();
    let v2 = by_server.get("v2").copied().unwrap_or(0);
    #[allow(clippy::cast_precision_loss, reason = "small counts")]
    {
        report.split_percent_v2 = if total == 0 {
            0.0
        } else {
            100.0 * v2 as f64 / total as f64
        };
    }
    report.check(
        "httproute_split_90_10",
        total == 400 && (4.0..=18.0).contains(&report.split_percent_v2),
        format!("{by_server:?}: {:.1}% to v2", report.split_percent_v2),
    );

    Ok(())
}

/// One lifecycle step: what it does to the installation.
type Step<'a> = Box<dyn Fn() -> Result<()> + 'a>;

/// How long each lifecycle step's HTTP load runs (the step itself starts 5 s in).
const LIFECYCLE_LOAD_SECS: u64 = 75;

/// `helm upgrade` to another map layout (the fast-path socket map's capacity), an agent pod
/// deleted, and `helm rollback`, each while 200 connections between real pods on weft-n1 pass
/// checked messages (an echo that differs or a connection error counts as broken) and a client
/// sends 500 requests/s through the `HTTPRoute` (backends on both nodes).
#[allow(clippy::too_many_lines, reason = "one linear scenario, step by step")]
fn lifecycle(e: &E2e, report: &mut Report) -> Result<()> {
    let chart = crate::workspace_root().join("deploy/helm/weft");
    let chart = chart.display().to_string();
    let echo_vip = e.service_ip(NS, "echo")?;
    let url = format!("http://{}/", e.service_ip(NS, "web")?);
    step!("e2e: lifecycle: 200 held connections client → echo, 500 requests/s through the route");
    let holder = e.hold_echo(&echo_vip, 100, "/tmp/stop-lifecycle", 900)?;
    std::thread::sleep(Duration::from_secs(3));
    let steps: [(&'static str, Step<'_>); 3] = [
        (
            "helm_upgrade_to_another_map_layout",
            Box::new(|| {
                e.cluster.helm([
                    "upgrade",
                    "weft",
                    &chart,
                    "-n",
                    "weft-system",
                    "--reuse-values",
                    "--set",
                    "agent.sockhashCapacity=32768",
                    "--wait",
                    "--timeout",
                    "300s",
                ])?;
                e.agents_rolled_out()
            }),
        ),
        (
            "agent_pod_deleted",
            Box::new(|| {
                let agent = e.agent(0)?;
                e.kubectl(&["delete", "pod", "-n", "weft-system", &agent, "--wait=true"])?;
                e.agents_rolled_out()?;
                eventually(Duration::from_mins(2), Duration::from_secs(1), || {
                    let ready = e.agents_ready()?;
                    ensure!(ready == 2, "{ready} agents ready");
                    Ok(())
                })
            }),
        ),
        (
            "helm_rollback",
            Box::new(|| {
                e.cluster.helm([
                    "rollback",
                    "weft",
                    "1",
                    "-n",
                    "weft-system",
                    "--wait",
                    "--timeout",
                    "300s",
                ])?;
                e.agents_rolled_out()
            }),
        ),
    ];
    for (index, (name, run_step)) in steps.iter().enumerate() {
        let load = e.spawn_in_pod(
            "client",
            &[
                "weft-workload",
                "http-load",
                "--url",
                &url,
                "--rate",
                "500",
                "--secs",
                &LIFECYCLE_LOAD_SECS.to_string(),
                "--connections",
                "16",
            ],
        )?;
        std::thread::sleep(Duration::from_secs(5));
        let started = Instant::now();
        let outcome = run_step();
        let took = started.elapsed().as_secs_f64();
        let out = load.wait_with_output()?;
        let r = last_json(&String::from_utf8_lossy(&out.stdout)).unwrap_or(Value::Null);
        let get = |k: &str| r[k].as_u64().unwrap_or(0);
        let failed = get("errors") + get("non_2xx") + get("missed");
        let complete = r.is_object() && get("completed") == get("scheduled") && failed == 0;
        report.lifecycle_requests += get("completed");
        let startups = e.startups().unwrap_or_default();
        report
            .lifecycle_startups
            .push(format!("{name}: {}", startups.join(",")));
        let expected = if index == 1 { "adopted" } else { "upgraded" };
        let started_as_expected = match index {
            // The deleted pod's node adopts its pins; the other agent did not restart.
            1 => startups.first().is_some_and(|s| s == expected),
            _ => startups.iter().all(|s| s == expected),
        };
        let failed_slot = match index {
            0 => &mut report.upgrade_failed_requests,
            1 => &mut report.agent_deletion_failed_requests,
            _ => &mut report.rollback_failed_requests,
        };
        *failed_slot = r.is_object().then_some(failed);
        report.check(
            name,
            outcome.is_ok() && complete && started_as_expected,
            format!(
                "{}step took {took:.1}s; {} of {} requests answered, {failed} failed (p99 {} µs, by status {}); agents started {startups:?} (expected {expected}){}",
                outcome
                    .as_ref()
                    .err()
                    .map(|e| format!("{e:#}; "))
                    .unwrap_or_default(),
                get("completed"),
                get("scheduled"),
                r["p99_us"],
                r["by_status"],
                r["error_samples"]
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .map(|a| format!("; errors {a:?}"))
                    .unwrap_or_default(),
            ),
        );
    }
    e.kubectl(&[
        "exec",
        "-n",
        NS,
        "client",
        "--",
        "touch",
        "/tmp/stop-lifecycle",
    ])?;
    let out = holder.wait_with_output()?;
    let held = last_json(&String::from_utf8_lossy(&out.stdout)).unwrap_or(Value::Null);
    let broken = held["broken"].as_u64();
    let rounds = held["rounds"].as_u64().unwrap_or(0);
    report.upgrade_broken_connections = broken;
    // Every message of every connection came back intact and in order, or the connection
    // counts as broken: with none broken, nothing was lost.
    report.upgrade_lost_bytes = (broken == Some(0) && rounds > 0).then_some(0);
    report.check(
        "lifecycle_breaks_no_connection",
        broken == Some(0) && held["conns"] == 200 && rounds > 100,
        held.to_string(),
    );
    Ok(())
}

/// Payload bytes of TCP between the two pod networks that are not the tunnel, and the number
/// of tunnel packets, in a capture of the inter-node link.
fn plaintext_between_pods(c: &Cluster, capture: &Path) -> Result<(u64, usize)> {
    let nets: Vec<String> = c
        .nodes
        .iter()
        .map(|n| format!("{}/{}", n.pod_cidr.0, n.pod_cidr.1))
        .collect();
    let filter = format!(
        "(src net {a} and dst net {b}) or (src net {b} and dst net {a})",
        a = nets[0],
        b = nets[1]
    );
    let read = c.node_run(
        0,
        "tcpdump",
        [
            "-r".as_ref(),
            capture.as_os_str(),
            "-nn".as_ref(),
            "-q".as_ref(),
            filter.as_ref(),
        ],
    )?;
    let mut plaintext = 0;
    for line in String::from_utf8_lossy(&read.stdout).lines() {
        // `… tcp 1448`: the payload length ends a quiet line.
        if let Some(n) = line.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok()) {
            plaintext += n;
        }
    }
    let tunnel = c.node_run(
        0,
        "tcpdump",
        [
            "-r".as_ref(),
            capture.as_os_str(),
            "-nn".as_ref(),
            "-q".as_ref(),
            "port 15008".as_ref(),
        ],
    )?;
    let tunnel_packets = String::from_utf8_lossy(&tunnel.stdout).lines().count();
    Ok((plaintext, tunnel_packets))
}

fn unmeshed(e: &E2e, report: &mut Report, check: &str) -> Result<()> {
    let v = xcluster::VERSION;
    e.cluster.apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: plain, labels: {{weft.dev/inject: disabled}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: plain, labels: {{app: server}}}}
spec:
  nodeName: weft-n2
  terminationGracePeriodSeconds: 1
  containers: [{{name: s, image: "weft-workload:{v}", imagePullPolicy: Never, args: [server, --listen, "0.0.0.0:7000", --mode, echo]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: plain}}
spec: {{selector: {{app: server}}, ports: [{{port: 80, targetPort: 7000, protocol: TCP}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: plain}}
spec:
  nodeName: weft-n1
  terminationGracePeriodSeconds: 1
  containers: [{{name: c, image: "weft-workload:{v}", imagePullPolicy: Never, command: [sleep, "3600"]}}]
"#
    ))?;
    e.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod",
        "--all",
        "-n",
        "plain",
        "--timeout=90s",
    ])?;
    let vip = e.service_ip("plain", "server")?;
    let r = eventually(Duration::from_secs(20), Duration::from_secs(1), || {
        let out = e.kubectl(&[
            "exec",
            "-n",
            "plain",
            "client",
            "--",
            "weft-workload",
            "transfer",
            "--connect",
            &format!("{vip}:80"),
            "--bytes",
            "65536",
        ])?;
        let r = last_json(&out)?;
        ensure!(r["bytes_verified"] == 65536, "{r}");
        Ok(r)
    });
    report.unmeshed_namespace_works = r.is_ok();
    report.check(
        check,
        report.unmeshed_namespace_works,
        r.map_or_else(|e| format!("{e:#}"), |_| String::new()),
    );
    Ok(())
}

/// Pods whose first instruction connects, in a default-deny namespace: the allowed one gets
/// through, the other is refused, every time.
fn first_connection(e: &E2e, report: &mut Report) -> Result<()> {
    let v = xcluster::VERSION;
    e.cluster.apply(&format!(
        r#"apiVersion: v1
kind: Namespace
metadata: {{name: first, labels: {{weft.dev/default-deny: "true"}}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: allowed, namespace: first}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: other, namespace: first}}
---
apiVersion: v1
kind: Pod
metadata: {{name: target, namespace: first, labels: {{app: target}}}}
spec:
  nodeName: weft-n1
  terminationGracePeriodSeconds: 1
  containers: [{{name: t, image: "weft-workload:{v}", imagePullPolicy: Never, args: [server, --listen, "0.0.0.0:7000", --mode, echo]}}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: target-from-allowed, namespace: first}}
spec:
  selector: {{matchLabels: {{app: target}}}}
  rules: [{{from: [{{source: {{serviceAccounts: [allowed]}}}}]}}]
"#
    ))?;
    e.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/target",
        "-n",
        "first",
        "--timeout=90s",
    ])?;
    let target = e.pod_ip("first", "target")?;
    std::thread::sleep(Duration::from_secs(2));
    let mut wrong = Vec::new();
    let runs = 4;
    for run in 0..runs {
        for (sa, expect_ok) in [("allowed", true), ("other", false)] {
            let name = format!("first-{sa}-{run}");
            e.cluster.apply(&format!(
                r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: first}}
spec:
  serviceAccountName: {sa}
  nodeName: weft-n1
  restartPolicy: Never
  containers: [{{name: c, image: "weft-workload:{v}", imagePullPolicy: Never, args: [connect, --connect, "{target}:7000", --timeout-ms, "3000"]}}]
"#
            ))?;
            let done = eventually(Duration::from_mins(1), Duration::from_millis(500), || {
                let phase = e.kubectl(&[
                    "get",
                    "pod",
                    "-n",
                    "first",
                    &name,
                    "-o",
                    "jsonpath={.status.phase}",
                ])?;
                ensure!(
                    phase.trim() == "Succeeded" || phase.trim() == "Failed",
                    "phase {phase}"
                );
                last_json(&e.kubectl(&["logs", "-n", "first", &name])?)
            })?;
            let ok = done["ok"] == true;
            let refused = done["errno"] == 1;
            if (expect_ok && !ok) || (!expect_ok && !refused) {
                wrong.push(format!("{name}: {done}"));
            }
        }
    }
    report.first_connection_runs = runs * 2;
    report.first_connection_meshed = wrong.is_empty();
    report.check(
        "first_connection_of_a_pod_is_meshed",
        report.first_connection_meshed,
        if wrong.is_empty() {
            format!(
                "{} pods, each one connect() as its first instruction",
                runs * 2
            )
        } else {
            wrong.join("; ")
        },
    );
    Ok(())
}

/// `helm uninstall` while connections between pods pass data: none breaks, and nothing of
/// Weft is left on either node.
fn uninstall(e: &E2e, report: &mut Report) -> Result<()> {
    let c = &e.cluster;
    let echo_vip = e.service_ip(NS, "echo")?;
    let holder = e.hold_echo(&echo_vip, 50, "/tmp/stop-hold", 120)?;
    std::thread::sleep(Duration::from_secs(2));
    c.helm([
        "uninstall",
        "weft",
        "-n",
        "weft-system",
        "--wait",
        "--timeout",
        "120s",
    ])?;
    // Helm is done when its objects are deleted; the agents remove the datapath as they stop
    // (after draining the L7 engine and the fast path), so the check waits for them to be gone.
    eventually(Duration::from_secs(90), Duration::from_millis(500), || {
        let left = e.kubectl(&[
            "get",
            "pods",
            "-n",
            "weft-system",
            "-l",
            "app.kubernetes.io/component=agent",
            "-o",
            "name",
        ])?;
        ensure!(left.trim().is_empty(), "agents still stopping: {left}");
        Ok(())
    })?;
    std::thread::sleep(Duration::from_secs(2));
    e.kubectl(&["exec", "-n", NS, "client", "--", "touch", "/tmp/stop-hold"])?;
    let out = holder.wait_with_output()?;
    let held = last_json(&String::from_utf8_lossy(&out.stdout)).unwrap_or(Value::Null);
    report.uninstall_broken_connections = held["broken"].as_u64().unwrap_or(u64::MAX);
    report.check(
        "uninstall_under_traffic_breaks_nothing",
        report.uninstall_broken_connections == 0 && held["rounds"].as_u64().unwrap_or(0) > 10,
        held.to_string(),
    );
    let mut residue = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let tree = c.node_run(
            i,
            "bpftool",
            [
                "cgroup".as_ref(),
                "tree".as_ref(),
                c.cgroup.join(&node.name).as_os_str(),
            ],
        )?;
        for line in String::from_utf8_lossy(&tree.stdout).lines() {
            if line.contains("weft_") {
                residue.push(format!("{}: attached {}", node.name, line.trim()));
            }
        }
        for path in ["/sys/fs/bpf/weft", "/run/weft", "/opt/cni/bin/weft-cni"] {
            if c.node_run(i, "test", ["-e", path]).is_ok() {
                residue.push(format!("{}: {path}", node.name));
            }
        }
        let conf = c.node_run(i, "sh", ["-c", "cat /etc/cni/net.d/* 2>/dev/null"])?;
        if String::from_utf8_lossy(&conf.stdout).contains("weft-cni") {
            residue.push(format!("{}: weft in the CNI configuration", node.name));
        }
    }
    report.uninstall_residue = residue.len();
    report.uninstall_residue_detail.clone_from(&residue);
    report.check(
        "uninstall_leaves_nothing",
        residue.is_empty(),
        if residue.is_empty() {
            "no program, link, pin, socket directory or CNI entry on either node".into()
        } else {
            residue.join("; ")
        },
    );
    Ok(())
}
