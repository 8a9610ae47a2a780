//! What operators look at, against a live agent with traffic (pods making L7 requests, some
//! failing; fast-path TCP transfers; connections a policy refuses):
//! - the Grafana dashboards in `deploy/helm/weft/dashboards`, with Debian's `prometheus`
//!   scraping the agent and `weft controller` (against a real API server holding the same
//!   objects): every panel's `PromQL` is evaluated with the variables a user would
//!   set, and each must return data for that traffic (a renamed metric, a missing label or an
//!   expression that does not parse fails here);
//! - the service graph page (`/ui`), loaded in a real headless browser (Debian's `chromium`):
//!   its DOM must show the workloads, the service, the edges with their paths and numbers, and
//!   the policy behind a denied edge, and the live events of traffic made while it is open; a
//!   screenshot is saved as an artifact;
//! - `weft tap` and `weft top`: the live events of that traffic (every request, each
//!   connection's exact bytes, the refusals), a filtered stream, the per-workload table; and
//!   `weft ui`, the page forwarded to this host's loopback.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use testbed::{
    Node, Pod, ServeMode, Testbed,
    agent::Agent,
    browser::{chromium, elements, screenshot},
    eventually,
    http::{HttpGetArgs, HttpServerArgs},
    kube::ControlPlane,
};

const WEB_VIP: &str = "198.19.0.20";
/// Inside the node's network namespace: the agent's metrics and Prometheus, on loopback.
const METRICS_ADDR: &str = "127.0.0.1:19464";
const PROMETHEUS_ADDR: &str = "127.0.0.1:19465";
/// `weft controller`'s metrics and page, in the node too.
const CONTROLLER_ADDR: &str = "127.0.0.1:19466";

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

/// One node: `client` calls the L7 service `web` (10 % answered 500) and sends fast-path
/// transfers to `web`'s echo port; `other` is refused by policy when it connects to `db`.
struct Scene {
    agent: Agent,
    client: Pod,
    other: Pod,
    db: Pod,
    echo: testbed::Server,
    _web: testbed::http::HttpServer,
    node: Node,
    _tb: Testbed,
}

impl Scene {
    fn new(label: &str) -> Result<Self> {
        let tb = Testbed::new(label)?;
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
        let web_server = web.serve_http(&server)?;
        let echo = web.serve(ServeMode::Echo, 9000)?;
        agent.apply("objects.yaml", OBJECTS)?;
        Ok(Self {
            agent,
            client,
            other,
            db,
            echo,
            _web: web_server,
            node,
            _tb: tb,
        })
    }

    /// Three rounds of: 400 requests through the engine, a 4 MiB echo transfer on two
    /// fast-path connections, one connection refused by policy.
    fn traffic(&self) -> Result<()> {
        let Self {
            agent,
            client,
            other,
            db,
            echo,
            ..
        } = self;
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
        Ok(())
    }
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
    let scene = Scene::new("dashboards")?;
    let node = &scene.node;
    // The control plane: an API server with the policy, and `weft controller` judging it and
    // asking the agent (its metrics are on the mesh dashboard).
    let cp = ControlPlane::start_with_weft_crds(node)?;
    // The policy (this API server has no Gateway API CRDs, and its Service range is not
    // the testbed's).
    for policy in OBJECTS
        .split("\n---\n")
        .filter(|d| d.contains("kind: AuthorizationPolicy"))
    {
        cp.apply(policy)?;
    }
    let agent_url = format!("http://{METRICS_ADDR}");
    let mut controller = cp.spawn_controller(&[
        "--listen",
        CONTROLLER_ADDR,
        "--agent",
        &agent_url,
        "--agents-service",
        "",
    ])?;
    let config = node.run_dir().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n\
             - job_name: weft-agent\n  static_configs: [{{targets: ['{METRICS_ADDR}']}}]\n\
             - job_name: weft-controller\n  static_configs: [{{targets: ['{CONTROLLER_ADDR}']}}]\n"
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
        let up = query(node, "up == 1")?;
        ensure!(
            up.len() == 2,
            "the agent and the controller are not both scraped yet: {up:?}"
        );
        Ok(())
    })?;

    // The metrics listener is reachable from the network: it only reads (enrolling a pod is
    // for the CNI plugin, on the agent's Unix socket).
    let post = node
        .run(
            Duration::from_secs(10),
            "curl",
            [
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "--data",
                "{}",
                &format!("http://{METRICS_ADDR}/cni/add"),
            ],
        )?
        .check()?;
    ensure!(
        post.stdout.trim() == "405",
        "POST /cni/add on the metrics port answered {}",
        post.stdout
    );

    scene.traffic()?;
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
            match query(node, &expr) {
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
    let _ = controller.terminate(Duration::from_secs(5));
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
    let leaders = panel("Weft / Mesh / Controller leader")?;
    ensure!(
        leaders.len() == 1 && (value(&leaders[0]) - 1.0).abs() < 0.5,
        "one controller leads: {leaders:?}"
    );
    let agents = panel("Weft / Mesh / Agents reached")?;
    ensure!(
        agents
            .iter()
            .any(|s| s["metric"]["state"] == "up" && (value(s) - 1.0).abs() < 0.5),
        "the controller reaches the agent: {agents:?}"
    );
    let objects = panel("Weft / Mesh / Objects by verdict")?;
    ensure!(
        objects
            .iter()
            .any(|s| s["metric"]["kind"] == "AuthorizationPolicy"
                && s["metric"]["state"] == "programmed"
                && (value(s) - 1.0).abs() < 0.5),
        "the controller judged db-from-web-only programmed: {objects:?}"
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

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, told in order")]
fn the_service_graph_page_shows_the_traffic_in_a_real_browser() -> Result<()> {
    let scene = Scene::new("graph-ui")?;
    scene.traffic()?;
    let node = &scene.node;
    // The page opened with the denied edge selected, as a link can: its policies show too.
    let url = format!("http://{METRICS_ADDR}/ui#select=default/other|default/db|denied");
    // While the page is open, a little more traffic for its live events: refused connects and
    // small fast-path echoes (the L7 numbers checked below stay those of `traffic`).
    let done = std::sync::atomic::AtomicBool::new(false);
    let dom = std::thread::scope(|s| {
        let background = s.spawn(|| -> Result<()> {
            let db = std::net::SocketAddr::from((scene.db.ip(), 5432));
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                scene.other.try_connect(db, Duration::from_secs(2))?;
                ensure!(
                    scene
                        .client
                        .transfer(scene.echo.addr(), 64 << 10, 1)?
                        .all_ok(),
                    "background echo"
                );
                std::thread::sleep(Duration::from_millis(300));
            }
            Ok(())
        });
        let dom = chromium(
            node,
            &[
                "--virtual-time-budget=6000".to_owned(),
                "--dump-dom".to_owned(),
                url.clone(),
            ],
        );
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let traffic = background
            .join()
            .map_err(|_| anyhow::anyhow!("background traffic panicked"))?;
        traffic.and(dom)
    })?;
    ensure!(
        dom.contains("data-loaded=\"true\""),
        "the page did not load its data: {}",
        &dom[..dom.len().min(2000)]
    );
    let nodes: Vec<String> = elements(&dom, "node")
        .into_iter()
        .filter_map(|a| a.get("data-id").cloned())
        .collect();
    ensure!(
        !elements(&dom, "node external").iter().any(|_| true),
        "every node of this traffic is a meshed workload or the service: {nodes:?}"
    );
    for id in [
        "default/client",
        "svc:default/web",
        "default/web",
        "default/other",
        "default/db",
    ] {
        ensure!(nodes.iter().any(|n| n == id), "no node {id} in {nodes:?}");
    }
    let edges = elements(&dom, "edge");
    let find = |src: &str, dst: &str, path: &str| {
        edges.iter().find(|e| {
            e.get("data-source").map(String::as_str) == Some(src)
                && e.get("data-target").map(String::as_str) == Some(dst)
                && e.get("data-path").map(String::as_str) == Some(path)
        })
    };
    let num = |e: &BTreeMap<String, String>, k: &str| -> u64 {
        e.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    let l7 = find("default/client", "svc:default/web", "l7")
        .with_context(|| format!("no L7 edge client → web: {edges:?}"))?;
    let (requests, errors) = (num(l7, "data-requests"), num(l7, "data-errors"));
    ensure!(
        (1200..1300).contains(&requests) && (90..=170).contains(&errors),
        "1200 requests (and the warm-up), 10 % answered 500: {l7:?}"
    );
    ensure!(
        find("svc:default/web", "default/web", "l7").is_some(),
        "the service's edge to its backend: {edges:?}"
    );
    let fast = find("default/client", "default/web", "fast")
        .with_context(|| format!("no fast-path edge client → web: {edges:?}"))?;
    ensure!(
        num(fast, "data-bytes") >= 3 * 2 * 2 * (4 << 20)
            && num(fast, "data-fast-bytes") >= 3 * 2 * 2 * (4 << 20),
        "three rounds of 2 × 4 MiB echoed, socket to socket: {fast:?}"
    );
    let denied = find("default/other", "default/db", "denied")
        .with_context(|| format!("no denied edge other → db: {edges:?}"))?;
    ensure!(
        num(denied, "data-denied") >= 3,
        "three refused connects: {denied:?}"
    );
    ensure!(
        dom.contains("% ok") && dom.contains("p99 "),
        "golden numbers on the L7 edge's label"
    );
    ensure!(
        dom.contains("db-from-web-only"),
        "the selected denied edge names the policy that refuses it: {}",
        dom.split("id=\"detail\"")
            .nth(1)
            .unwrap_or_default()
            .chars()
            .take(1500)
            .collect::<String>()
    );
    ensure!(
        dom.contains(
            "data-object=\"AuthorizationPolicy default/db-from-web-only\" data-state=\"Programmed\""
        ),
        "the policy's status shows beside it"
    );
    ensure!(
        dom.contains("data-path=\"l7\"") && dom.contains("<tr data-path"),
        "the live flow table lists flows"
    );
    // The live events streamed from /tap while the page was open.
    ensure!(
        dom.contains("data-tap=\"watching\"")
            && dom.contains("<tr data-type=\"deny\"")
            && dom.contains("<tr data-type=\"close\""),
        "the live events table: {}",
        dom.split("Live events")
            .nth(1)
            .unwrap_or_default()
            .chars()
            .take(1500)
            .collect::<String>()
    );

    // A screenshot, kept as an artifact of the run.
    screenshot(node, &url, 6000, "service-graph.png")?;
    Ok(())
}

/// A `weft` command streaming from the scene's agent, its stdout collected by a thread.
struct Streaming {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::process::ChildStderr,
}

impl Streaming {
    /// Starts `weft <args> --admin-socket …`; its stdout lines arrive as they are printed.
    fn spawn(agent: &Agent, args: &[&str]) -> Result<Self> {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(testbed::weft_bin())
            .args(args)
            .arg("--admin-socket")
            .arg(&agent.socket)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            stderr,
        })
    }

    /// Starts `weft <args> --admin-socket …` and waits until it says it is watching.
    fn start(agent: &Agent, args: &[&str]) -> Result<Self> {
        use std::io::BufRead as _;
        let mut s = Self::spawn(agent, args)?;
        let mut first = String::new();
        std::io::BufReader::new(&mut s.stderr).read_line(&mut first)?;
        ensure!(first.contains("watching"), "weft {args:?} said: {first:?}");
        Ok(s)
    }

    /// Its first line on stdout, within 10 s.
    fn first_line(&self) -> Result<String> {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .context("nothing printed within 10 s")
    }

    /// Stops it (it runs until stopped) and returns what it printed.
    fn stop(mut self) -> Result<Vec<String>> {
        self.child.kill()?;
        self.child.wait()?;
        // The reader thread ends with the pipe: everything printed is in the channel.
        Ok(self.lines.iter().collect())
    }
}

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, told in order")]
fn weft_tap_and_top_show_the_traffic_live() -> Result<()> {
    let scene = Scene::new("tap")?;
    let agent = &scene.agent;
    let socket = agent.socket.display().to_string();
    // A filter that can never match is refused up front, with the reason.
    let bad = std::process::Command::new(testbed::weft_bin())
        .args(["tap", "--status", "7xx", "--admin-socket", &socket])
        .output()?;
    ensure!(
        !bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("status"),
        "weft tap --status 7xx: {bad:?}"
    );

    let all = Streaming::start(agent, &["tap", "-o", "json"])?;
    let denials = Streaming::start(agent, &["tap", "--pod", "other", "--type", "deny"])?;
    let top = std::thread::spawn(move || {
        std::process::Command::new(testbed::weft_bin())
            .args([
                "top",
                "--once",
                "--window",
                "30",
                "-o",
                "json",
                "--admin-socket",
                &socket,
            ])
            .output()
    });
    std::thread::sleep(Duration::from_secs(2));
    let started = std::time::Instant::now();
    scene.traffic()?;
    ensure!(
        started.elapsed() < Duration::from_secs(26),
        "the traffic took {:?}: longer than top's window",
        started.elapsed()
    );
    // Let the last closes reach the stream.
    std::thread::sleep(Duration::from_secs(1));
    let lines = all.stop()?;
    let denied = denials.stop()?;

    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect::<Result<_>>()?;
    let of = |kind: &'static str| events.iter().filter(move |e| e["type"] == kind);
    // Every request the engine answered, with its status: 10 % of them 500.
    let requests: Vec<&Value> = of("request")
        .filter(|e| e["service"] == "default/web:80" && e["src"]["workload"] == "default/client")
        .collect();
    ensure!(requests.len() >= 1200, "{} request events", requests.len());
    let failed = requests.iter().filter(|e| e["status"] == 500).count();
    ensure!(
        (requests.len() / 20..requests.len() / 6).contains(&failed),
        "{failed} of {} requests answered 500 (10 % expected)",
        requests.len()
    );
    ensure!(
        requests
            .iter()
            .all(|e| e["dst"]["workload"] == "default/web"),
        "a request not answered by default/web: {:?}",
        requests
            .iter()
            .find(|e| e["dst"]["workload"] != "default/web")
    );
    // The six echo transfers: opened with the verdict, closed with exactly the bytes the
    // applications sent each way, all of them socket to socket.
    let to_echo = |e: &&Value| {
        e["src"]["workload"] == "default/client"
            && e["dst"]["workload"] == "default/web"
            && e["dst"]["port"] == 9000
    };
    let opens = of("open").filter(to_echo).count();
    ensure!(
        opens == 6,
        "{opens} open events to the echo port (6 expected)"
    );
    let closes: Vec<&Value> = of("close").filter(to_echo).collect();
    ensure!(
        closes.len() == 6,
        "{} close events: {closes:?}",
        closes.len()
    );
    for c in &closes {
        ensure!(
            c["bytes_to_dst"] == 4 << 20 && c["bytes_to_src"] == 4 << 20,
            "bytes of an echo transfer: {c}"
        );
        ensure!(
            c["fast_bytes"] == 8 << 20 && c["path"] == "fast" && c["verdict"] == "FAST",
            "not all socket to socket: {c}"
        );
    }
    // The refused connects, with the policy that refused them.
    let refusals: Vec<&Value> = of("deny")
        .filter(|e| e["src"]["workload"] == "default/other")
        .collect();
    ensure!(
        refusals.len() == 3,
        "{} deny events: {refusals:?}",
        refusals.len()
    );
    ensure!(
        refusals.iter().all(|d| d["verdict"] == "DENY"
            && d["dst"]["workload"] == "default/db"
            && d["dst"]["port"] == 5432
            && d["reason"]
                .as_str()
                .is_some_and(|r| r.contains("db-from-web-only"))),
        "{refusals:?}"
    );
    ensure!(of("lost").count() == 0, "events were lost");
    // The filtered stream has those three and nothing else.
    ensure!(
        denied.len() == 3
            && denied.iter().all(|l| l.contains(" DENY ")
                && l.contains("default/other")
                && l.contains("default/db:5432")),
        "weft tap --pod other --type deny printed: {denied:#?}"
    );

    // weft top, over the same traffic.
    let top = top.join().map_err(|_| anyhow::anyhow!("top panicked"))??;
    ensure!(top.status.success(), "weft top: {top:?}");
    let rows: Vec<Value> = serde_json::from_slice(&top.stdout)?;
    let row = |w: &str| rows.iter().find(|r| r["workload"] == w);
    let web = row("default/web").with_context(|| format!("no web row: {rows:?}"))?;
    let success = web["success_rate"].as_f64().unwrap_or(0.0);
    ensure!(
        (0.8..0.97).contains(&success),
        "web success rate {success}: {web}"
    );
    ensure!(
        web["requests_per_s"].as_f64().unwrap_or(0.0) >= 1200.0 / 30.0 * 0.99
            && web["p99_ms"].as_f64() >= web["p50_ms"].as_f64()
            && web["p50_ms"].as_f64().is_some_and(|p| p > 0.0),
        "{web}"
    );
    ensure!(
        web["connections"].as_u64().unwrap_or(0) >= 6
            && web["bytes"].as_u64().unwrap_or(0) >= 6 * (8 << 20)
            && web["fast_path_share"].as_f64().unwrap_or(0.0) > 0.9,
        "web's connections: {web}"
    );
    let db = row("default/db").with_context(|| format!("no db row: {rows:?}"))?;
    ensure!(db["denied"] == 3, "{db}");
    // Nothing lost in the kernel either.
    ensure!(
        agent.metric(
            "weft_datapath_events_total",
            &[("event", "flow_event_lost")]
        )? == 0.0,
        "the kernel lost events"
    );

    // `weft ui`: the same agent's page and graph on this host's loopback.
    let ui = Streaming::spawn(agent, &["ui", "--listen", "127.0.0.1:0"])?;
    let url = ui.first_line()?;
    let addr = url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/ui"))
        .with_context(|| format!("weft ui printed {url:?}"))?
        .to_owned();
    let fetch = |path: &str| -> Result<String> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(&addr)?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        ensure!(text.starts_with("HTTP/1.1 200"), "{path}: {text:.200}");
        Ok(text)
    };
    ensure!(fetch("/ui")?.contains("<html"), "/ui is not the page");
    let graph = fetch("/graph")?;
    ensure!(
        graph.contains("default/web") && graph.contains("default/db"),
        "/graph through weft ui: {graph:.400}"
    );
    ui.stop()?;
    Ok(())
}
