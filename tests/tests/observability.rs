//! The Grafana dashboards in `deploy/helm/weft/dashboards` against a real Prometheus: Debian's
//! `prometheus` scrapes a live agent while pods make L7 requests (some failing), fast-path TCP
//! transfers and connections a policy refuses; then every panel's `PromQL` is evaluated, with the
//! dashboard variables set as a user would set them, and each must return data for that
//! traffic. A panel whose metric was renamed, whose labels do not exist or whose expression
//! does not parse fails here.
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use testbed::{
    Node, ServeMode, Testbed,
    agent::Agent,
    eventually,
    http::{HttpGetArgs, HttpServerArgs},
};

const WEB_VIP: &str = "198.19.0.20";
/// Inside the node's network namespace: the agent's metrics and Prometheus, on loopback.
const METRICS_ADDR: &str = "127.0.0.1:19464";
const PROMETHEUS_ADDR: &str = "127.0.0.1:19465";

const OBJECTS: &str = r"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 198.19.0.20, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web, port: 80}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-from-web-only, namespace: default}
spec:
  selector: {matchLabels: {app: db}}
  rules: [{from: [{source: {serviceAccounts: [web]}}]}]
";

fn dashboards() -> Result<Vec<(String, Value)>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/weft/dashboards");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)?;
            let json: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            let name: String = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into();
            out.push((name, json));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Every (panel title, expression) of a dashboard, rows' panels included.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            if let Some(inner) = p["panels"].as_array() {
                walk(inner, out);
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((
                        p["title"].as_str().unwrap_or("?").to_owned(),
                        expr.to_owned(),
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(
        dashboard["panels"].as_array().map_or(&[], Vec::as_slice),
        &mut out,
    );
    out
}

/// The variables as a user sets them for this traffic: the namespace, both workloads selected
/// (Grafana joins a multi-value selection into a regex), this node's scrape target.
fn with_variables(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$namespace", "default")
        .replace("$workload", "client|web")
        .replace("$instance", METRICS_ADDR)
}

fn query(node: &Node, expr: &str) -> Result<Vec<Value>> {
    let out = node
        .run(
            Duration::from_secs(20),
            "curl",
            [
                "-sS",
                "--fail-with-body",
                "-G",
                &format!("http://{PROMETHEUS_ADDR}/api/v1/query"),
                "--data-urlencode",
                &format!("query={expr}"),
            ],
        )?
        .check()?;
    let v: Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("Prometheus answered: {}", out.stdout))?;
    ensure!(v["status"] == "success", "{expr}: {v}");
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, told in order")]
fn every_dashboard_panel_returns_data_from_a_real_prometheus() -> Result<()> {
    let boards = dashboards()?;
    ensure!(
        boards.len() >= 3,
        "mesh, workload and datapath dashboards expected: {:?}",
        boards.iter().map(|b| &b.0).collect::<Vec<_>>()
    );
    let tb = Testbed::new("dashboards")?;
    let node = tb.node("n1")?;
    let (client, web, db, other) = (
        node.pod("client")?,
        node.pod("web")?,
        node.pod("db")?,
        node.pod("other")?,
    );
    let agent = Agent::start(&node, &["--metrics-addr", METRICS_ADDR])?;
    agent.enable_socket_fast_path()?;
    agent.apply(
        "pods.yaml",
        &[
            client.manifest(&[("app", "client")], "client"),
            web.manifest(&[("app", "web")], "web"),
            db.manifest(&[("app", "db")], "db"),
            other.manifest(&[("app", "other")], "other"),
        ]
        .join("\n---\n"),
    )?;
    agent.wait_workloads(4)?;
    let mut server = HttpServerArgs::new("web", 8080);
    server.fail_percent = 10;
    server.fail_status = 500;
    let _web_server = web.serve_http(&server)?;
    let echo = web.serve(ServeMode::Echo, 9000)?;
    agent.apply("objects.yaml", OBJECTS)?;

    let config = node.run_dir().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n\
             - job_name: weft-agent\n  static_configs: [{{targets: ['{METRICS_ADDR}']}}]\n"
        ),
    )?;
    let storage = node.run_dir().join("prometheus-data");
    let mut prometheus = node.spawn(
        "prometheus",
        [
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", storage.display()),
            format!("--web.listen-address={PROMETHEUS_ADDR}"),
        ],
    )?;
    eventually(Duration::from_secs(20), || {
        let up = query(&node, "up{job=\"weft-agent\"} == 1")?;
        ensure!(!up.is_empty(), "the agent is not scraped yet");
        Ok(())
    })?;

    // Traffic: L7 requests through the engine (10 % answered 500), a fast-path TCP transfer
    // pod to pod, and connections the policy refuses in the kernel.
    eventually(Duration::from_secs(10), || {
        let text = agent.metrics()?;
        ensure!(
            testbed::agent::sum_metric(&text, "weft_l7_requests_total", &[]) > 0.0 || {
                let mut one = HttpGetArgs::new(format!("http://{WEB_VIP}/").parse()?);
                one.count = 1;
                client.http_get(&one)?;
                false
            },
            "web is not L7 yet"
        );
        Ok(())
    })?;
    let mut get = HttpGetArgs::new(format!("http://{WEB_VIP}/").parse()?);
    get.count = 400;
    get.concurrency = 2;
    let db_addr = std::net::SocketAddr::from((db.ip(), 5432));
    for _ in 0..3 {
        let r = client.http_get(&get)?;
        ensure!(r.completed == 400, "{r:?}");
        let t = client.transfer(echo.addr(), 4 << 20, 2)?;
        ensure!(t.all_ok(), "{t:?}");
        let refused = other.try_connect(db_addr, Duration::from_secs(2))?;
        ensure!(refused.errno == Some(libc::EPERM), "{refused:?}");
        std::thread::sleep(Duration::from_secs(1));
    }
    // Two more scrapes after the last traffic.
    std::thread::sleep(Duration::from_secs(3));

    let mut failures = Vec::new();
    let mut evaluated = 0;
    let mut results: Vec<(String, Vec<Value>)> = Vec::new();
    for (file, board) in &boards {
        let title = board["title"].as_str().unwrap_or("?");
        for (panel, expr) in queries(board) {
            let expr = with_variables(&expr);
            evaluated += 1;
            match query(&node, &expr) {
                Ok(result) => {
                    let numbers: Vec<f64> = result
                        .iter()
                        .filter_map(|s| s["value"][1].as_str()?.parse().ok())
                        .filter(|v: &f64| v.is_finite())
                        .collect();
                    eprintln!("{file} / {panel}: {} series {numbers:?}", result.len());
                    if numbers.is_empty() {
                        failures.push(format!("{title} / {panel}: no data for `{expr}`"));
                    }
                    results.push((format!("{title} / {panel}"), result));
                }
                Err(e) => failures.push(format!("{title} / {panel}: {e:#}")),
            }
        }
    }
    let _ = prometheus.terminate(Duration::from_secs(5));
    ensure!(
        evaluated >= 15,
        "only {evaluated} panel queries in the dashboards"
    );
    if !failures.is_empty() {
        bail!(
            "{} of {evaluated} panel queries failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    // What the panels show is what the traffic was.
    let panel = |name: &str| -> Result<&Vec<Value>> {
        results
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r)
            .with_context(|| format!("no panel {name}"))
    };
    let value = |s: &Value| -> f64 {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let success = panel("Weft / Mesh / Success rate")?;
    ensure!(
        success.len() == 1
            && success[0]["metric"]["destination_service"] == "web"
            && (0.8..0.97).contains(&value(&success[0])),
        "web answers 10 % of requests with 500: {success:?}"
    );
    let codes: Vec<&str> = panel("Weft / Mesh / Responses by code")?
        .iter()
        .filter_map(|s| s["metric"]["response_code"].as_str())
        .collect();
    ensure!(
        codes.contains(&"200") && codes.contains(&"500"),
        "{codes:?}"
    );
    let denied = panel("Weft / Mesh / Connections denied")?;
    ensure!(
        denied
            .iter()
            .any(|s| s["metric"]["source_workload"] == "other"
                && s["metric"]["destination_workload"] == "db"
                && value(s) > 0.0),
        "other → db was refused three times: {denied:?}"
    );
    let links = panel("Weft / Node datapath / Programs attached")?;
    ensure!(
        links
            .iter()
            .any(|s| s["metric"]["hook"] == "cgroup" && value(s) >= 5.0)
            && links
                .iter()
                .any(|s| s["metric"]["hook"] == "tc" && value(s) >= 8.0),
        "cgroup hooks and two TC programs on each of the four pods' interfaces: {links:?}"
    );
    Ok(())
}
