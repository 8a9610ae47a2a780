//! `cargo xtask demo`: a service mesh on one Linux box, explained as it runs.
use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use testbed::{
    ServeMode, Testbed,
    agent::Agent,
    http::{HttpGetArgs, HttpServerArgs},
};

use crate::step;

const OBJECTS: &str = r"# The mesh, described with Kubernetes-shaped objects (the same YAML a cluster would hold).
apiVersion: v1
kind: Service
metadata: {name: catalog, namespace: default}
spec:
  clusterIP: 198.19.0.10          # a virtual address: clients connect here, Weft picks a pod
  selector: {app: catalog}
  ports: [{port: 80, targetPort: 7000}]
---
apiVersion: v1
kind: Service
metadata: {name: payments, namespace: default}
spec:
  clusterIP: 198.19.0.20
  selector: {app: payments}
  ports: [{port: 80, targetPort: 7000}]
---
# Only the frontend may reach payments. Everyone else is refused at connect(), in the kernel.
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: payments-from-frontend-only, namespace: default}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
  - from: [{source: {serviceAccounts: [frontend]}}]
";

const L7_OBJECTS: &str = r"# Only this service gets L7 treatment: its clients are sent to the agent's L7 engine.
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 198.19.0.30, selector: {app: reviews}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: default}
spec: {clusterIP: 198.19.0.31, selector: {app: reviews, version: v1}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: default}
spec: {clusterIP: 198.19.0.32, selector: {app: reviews, version: v2}, ports: [{port: 80, targetPort: 8080}]}
---
# A canary: 90% to v1, 10% to v2 (Gateway API HTTPRoute with the Service as parent).
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-canary, namespace: default}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 80}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 80, weight: 90}, {name: reviews-v2, port: 80, weight: 10}]
---
# v2 is flaky: retry 5xx up to twice, within a budget.
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: reviews, namespace: default}
spec:
  targetRef: {kind: Service, name: reviews}
  timeout: 2s
  retries: {attempts: 3, on: [5xx], budget: {percent: 50}}
";

fn explain(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

const AUTH_OBJECTS: &str = r"# Tokens from this issuer are checked on every request to reviews (bad ones: 401).
apiVersion: weft.dev/v1alpha1
kind: RequestAuthentication
metadata: {name: reviews-jwt, namespace: default}
spec:
  targetRef: {kind: Service, name: reviews}
  jwtRules:
  - issuer: https://login.demo
    audiences: [reviews]
    jwksFile: JWKS_DIR/jwks.json
---
# Anyone may read; only an authenticated admin may delete.
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: reviews-access, namespace: default}
spec:
  targetRef: {kind: Service, name: reviews}
  rules:
  - to: [{operation: {methods: [GET]}}]
  - from: [{source: {requestPrincipals: ['https://login.demo/*']}}]
    to: [{operation: {methods: [DELETE]}}]
    when: [{key: 'request.auth.claims[role]', values: [admin]}]
";

#[allow(
    clippy::too_many_lines,
    reason = "the demo is one linear, narrated script"
)]
pub fn run(weft: &Path, workload: &Path, secs: u64, screenshot: Option<&Path>) -> Result<()> {
    testbed::use_binaries(weft, workload)?;
    step!("demo: a service mesh on one Linux box");
    explain(
        "A \"node\" is a network namespace with a bridge; each \"pod\" is its own network namespace\n\
         plugged into that bridge, with its own cgroup. Nothing touches this machine's own network.",
    );
    let tb = Testbed::new("demo")?;
    let node = tb.node("demo")?;
    let frontend = node.pod("frontend")?;
    let catalog = node.pod("catalog")?;
    let payments = node.pod("payments")?;
    let intruder = node.pod("intruder")?;
    let legacy = node.pod("legacy")?;
    for p in [&frontend, &catalog, &payments, &intruder, &legacy] {
        println!("    pod {:<9} {}", p.name(), p.ip());
    }

    step!("starting the Weft node agent (loads the eBPF programs into the kernel)");
    // The mesh's CA (`weft ca init`): the agent issues its pods' certificates from it.
    let mut args = testbed::agent::identity_args(&node)?;
    args.extend(Agent::PRODUCTION_INTERVALS.map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&node, &args)?;
    println!("    programs pinned under {}", agent.bpffs_dir.display());
    let status = agent.status()?;
    let test = &status["socket_self_test"];
    let kernel_ok = test["passed"] == true;
    if kernel_ok {
        println!("    socket self-test: passed — every meshed pod may use the socket fast path");
    } else {
        let failed: Vec<String> = test["cases"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["passed"] != true)
            .map(|c| {
                format!(
                    "{}: {}",
                    c["name"].as_str().unwrap_or("?"),
                    c["detail"].as_str().unwrap_or("")
                )
            })
            .collect();
        println!(
            "    socket self-test: this kernel's socket redirect is not exact for every application:"
        );
        for f in &failed {
            println!("      {f}");
        }
    }
    explain(
        "The socket fast path moves bytes socket to socket inside the kernel. On a kernel that fails\n\
         the self-test, pods keep the normal TCP path unless their operator enables it for them\n\
         (annotation weft.dev/socket-fast-path: enabled). The demo's servers and clients read with\n\
         an event loop (poll + non-blocking recv), which the redirect serves exactly: they opt in.",
    );

    step!("describing the mesh: pods, two services and one policy");
    let fast = [("weft.dev/socket-fast-path", "enabled")];
    let pods = [
        node.manifest(),
        frontend.manifest_annotated(&[("app", "frontend")], "frontend", &fast),
        catalog.manifest_annotated(&[("app", "catalog")], "catalog", &fast),
        payments.manifest_annotated(&[("app", "payments")], "payments", &fast),
        intruder.manifest(&[("app", "batch")], "batch"),
        legacy.manifest_unmeshed(&[("app", "legacy")], "legacy"),
    ];
    agent.apply("pods.yaml", &pods.join("\n---\n"))?;
    agent.apply("mesh.yaml", OBJECTS)?;
    explain(OBJECTS);
    explain(
        "(pod \"legacy\" carries the annotation weft.dev/inject: disabled: it is outside the mesh)",
    );
    agent.wait_workloads(5)?;

    step!("starting servers in catalog and payments, then driving traffic for {secs}s");
    let _catalog_srv = catalog.serve(ServeMode::Echo, 7000)?;
    let _payments_srv = payments.serve(ServeMode::Echo, 7000)?;
    let catalog_vip: SocketAddr = "198.19.0.10:80".parse()?;
    let payments_vip: SocketAddr = "198.19.0.20:80".parse()?;
    let deadline = Instant::now() + Duration::from_secs(secs.max(1));
    let (mut rounds, mut failures) = (0u32, 0u32);
    let mut denied = None;
    while Instant::now() < deadline && rounds < 1000 {
        for (client, to) in [
            (&frontend, catalog_vip),
            (&frontend, payments_vip),
            (&intruder, catalog_vip),
            (&legacy, catalog_vip),
        ] {
            let r = client.transfer(to, 1024 * 1024, 4)?;
            if !r.all_ok() {
                failures += 1;
            }
        }
        let attempt = intruder.try_connect(payments_vip, Duration::from_secs(2))?;
        denied = Some(attempt);
        rounds += 1;
    }
    println!(
        "    {rounds} rounds of 1 MiB echoes over 4 connections per client, {failures} failed"
    );
    if let Some(d) = &denied {
        println!(
            "    intruder → payments: connect() {} (errno {:?}: EPERM, refused by policy)",
            if d.ok {
                "SUCCEEDED (unexpected!)"
            } else {
                "failed"
            },
            d.errno
        );
    }

    step!("the flow table (`weft flows`): who talked to whom, the verdict, and why");
    std::thread::sleep(Duration::from_millis(400));
    let flows = cli(weft, &agent, &["flows"])?;
    let mut lines = flows.lines();
    if let Some(header) = lines.next() {
        println!("{header}");
    }
    // One row per kind of flow keeps the table readable: the demo made hundreds.
    let mut shown = std::collections::BTreeSet::new();
    for l in lines {
        let cols: Vec<&str> = l.split_whitespace().collect();
        let key = (
            cols.get(1).copied().unwrap_or(""),
            cols.get(3).map(|s| s.split(':').next().unwrap_or("")),
            cols.get(4).map(|s| s.split(':').next().unwrap_or("")),
        );
        if shown.insert((
            key.0.to_owned(),
            key.1.map(str::to_owned),
            key.2.map(str::to_owned),
        )) {
            println!("{l}");
        }
    }
    explain(
        "FAST: allowed; FAST=yes: the bytes went socket-to-socket inside the kernel\n\
         (FAST=- : allowed, on the normal TCP path, e.g. the intruder, which did not opt in).\n\
         DENY: refused at connect() by the policy; the application saw EPERM.\n\
         PASS: not meshed (legacy) — Weft leaves it alone, it uses the normal network stack.",
    );

    step!("kernel counters (`curl --unix-socket … /metrics`), summed");
    let m = agent.metrics()?;
    let sum = |name: &str, labels: &[(&str, &str)]| testbed::agent::sum_metric(&m, name, labels);
    let fast = sum("weft_tcp_fast_path_bytes_total", &[]);
    let sent = sum("weft_tcp_sent_bytes_total", &[]);
    let veth = sum("weft_interface_bytes_total", &[]);
    println!(
        "    payload between meshed pods     {:>12}  (both directions)",
        human(sent)
    );
    println!("      of which on the fast path     {:>12}", human(fast));
    println!(
        "    bytes seen on the pods' veths   {:>12}  (flows off the fast path, plus handshakes)",
        human(veth)
    );
    println!(
        "    connections opened              {:>12}",
        sum("weft_tcp_connections_opened_total", &[])
    );
    println!(
        "    connections denied              {:>12}",
        sum("weft_tcp_connections_denied_total", &[])
    );

    step!("L7: a canary split and retries, only for the service that asks for them");
    let reviews_v1 = node.pod("reviews-v1")?;
    let reviews_v2 = node.pod("reviews-v2")?;
    agent.apply(
        "reviews-pods.yaml",
        &[
            reviews_v1.manifest(&[("app", "reviews"), ("version", "v1")], "reviews"),
            reviews_v2.manifest(&[("app", "reviews"), ("version", "v2")], "reviews"),
        ]
        .join("\n---\n"),
    )?;
    agent.apply("reviews.yaml", L7_OBJECTS)?;
    explain(L7_OBJECTS);
    agent.wait_workloads(7)?;
    let _v1 = reviews_v1.serve_http(&HttpServerArgs::new("reviews-v1", 8080))?;
    let mut flaky = HttpServerArgs::new("reviews-v2", 8080);
    flaky.fail_percent = 30;
    let _v2 = reviews_v2.serve_http(&flaky)?;
    std::thread::sleep(Duration::from_millis(500));
    let mut get = HttpGetArgs::new("http://198.19.0.30/reviews".parse()?);
    get.count = 1000;
    get.concurrency = 4;
    let report = frontend.http_get(&get)?;
    println!(
        "    frontend → reviews: {} requests, {} answered 200; served by {:?}",
        report.count,
        report.status(200),
        report.by_server
    );
    let m = agent.metrics()?;
    let sum = |name: &str, labels: &[(&str, &str)]| testbed::agent::sum_metric(&m, name, labels);
    println!(
        "    engine: {} requests, {} retries of v2's 503s ({} requests still failed after 3 tries); \
         p50 latency {:.0} µs",
        sum("weft_l7_requests_total", &[]),
        sum("weft_l7_retries_total", &[]),
        report.count - report.status(200),
        report.p50_us
    );
    explain(
        "catalog and payments never touched the engine: no L7 policy, so they stay kernel-only.",
    );

    jwt(weft, &agent, &frontend)?;

    let (mut remote_agent, remote) = second_node(&tb, &agent, &frontend, &legacy)?;

    step!("status (`weft status`)");
    print!("{}", cli(weft, &agent, &["status"])?);

    live_events(weft, &agent, &frontend, &intruder)?;
    service_graph(weft, &agent, &node.run_dir(), screenshot)?;

    step!("cleaning up: uninstalling the datapath and removing the nodes");
    remote_agent.uninstall(&remote)?;
    agent.uninstall(&node)?;
    drop((
        frontend, catalog, payments, intruder, legacy, reviews_v1, reviews_v2, node,
    ));
    let left = tb.teardown()?;
    ensure!(left.is_empty(), "the demo left something behind: {left:?}");
    println!("    nothing left: no programs, maps, pins, namespaces or cgroups");
    Ok(())
}

/// A second node with its own agent and a pod `inventory`: the frontend reaches it through the
/// agents' mutual-TLS tunnel; a capture of the link between the nodes sees only TLS; the
/// unmeshed legacy pod is refused (STRICT).
fn second_node(
    tb: &Testbed,
    agent: &Agent,
    frontend: &testbed::Pod,
    legacy: &testbed::Pod,
) -> Result<(Agent, testbed::Node)> {
    step!("a second node: cross-node traffic is encrypted and authenticated (mTLS)");
    let remote = tb.node("remote")?;
    let inventory = remote.pod("inventory")?;
    println!(
        "    node remote, link address {}; pod inventory {}",
        remote.uplink_ip(),
        inventory.ip()
    );
    let mut args = testbed::agent::identity_args(&remote)?;
    args.extend(Agent::PRODUCTION_INTERVALS.map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let remote_agent = Agent::start(&remote, &args)?;
    // Both agents see every node and pod; each programs its own.
    let shared = [
        remote.manifest(),
        inventory.manifest(&[("app", "inventory")], "inventory"),
    ]
    .join("\n---\n");
    agent.apply("remote.yaml", &shared)?;
    for file in [
        "pods.yaml",
        "mesh.yaml",
        "reviews-pods.yaml",
        "reviews.yaml",
    ] {
        let text = std::fs::read_to_string(agent.objects_dir.join(file))?;
        remote_agent.apply(file, &text)?;
    }
    remote_agent.apply("remote.yaml", &shared)?;
    agent.wait_workloads(8)?;
    remote_agent.wait_workloads(8)?;
    let server = inventory.serve(ServeMode::Echo, 7000)?;
    let capture_file = remote.run_dir().join("link.pcap");
    let capture = remote.spawn(
        "tcpdump",
        [
            "-i",
            "uplink",
            "-nn",
            "-U",
            "-w",
            &capture_file.display().to_string(),
            "tcp",
        ],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let report = frontend.transfer(server.addr(), 1024 * 1024, 4)?;
    println!(
        "    frontend → inventory (other node): 4 × 1 MiB echoed, {} ok",
        if report.all_ok() { "all" } else { "NOT all" }
    );
    let plain = legacy.try_connect(server.addr(), Duration::from_secs(2))?;
    println!(
        "    legacy (unmeshed) → inventory: {}",
        if plain.ok {
            "connected (unexpected!)"
        } else {
            "no answer: plaintext from another node is dropped before it reaches a STRICT pod"
        }
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut capture = capture;
    capture.terminate(Duration::from_secs(5))?;
    let out = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&capture_file)
        .output()
        .context("tcpdump -r")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let packets = text.lines().count();
    let tunnel = text.lines().filter(|l| l.contains(".15008")).count();
    println!(
        "    tcpdump on the link: {packets} TCP packets, {tunnel} of them the agents' TLS tunnel \
         (port 15008); the rest: legacy's refused attempts"
    );
    let streams = remote_agent.metric(
        "weft_tunnel_streams_total",
        &[("direction", "inbound"), ("result", "ok")],
    )?;
    println!("    the remote agent accepted {streams} tunnel streams, each checked against the");
    println!("    client certificate's SPIFFE ID (spiffe://cluster.local/ns/default/sa/frontend)");
    drop(server);
    Ok((remote_agent, remote))
}

/// Request authentication on `reviews`: reading stays open, deleting needs a JWT with an admin
/// claim; a bad token is refused before any rule is looked at.
fn jwt(weft: &Path, agent: &Agent, frontend: &testbed::Pod) -> Result<()> {
    step!("L7: request authentication (JWT) and per-request authorization");
    let dir = frontend.node().run_dir().join("jwt");
    let run = |args: &[&str]| -> Result<String> { Ok(weft_run(weft, args)?.trim().to_owned()) };
    let dir_arg = dir.display().to_string();
    run(&["jwt", "keygen", "--dir", &dir_arg])?;
    println!(
        "    `weft jwt keygen` made a signing key and its public JWKS (an identity provider's part)"
    );
    let objects = AUTH_OBJECTS.replace("JWKS_DIR", &dir_arg);
    agent.apply("reviews-auth.yaml", &objects)?;
    explain(&objects);
    let key = dir.join("key.pem").display().to_string();
    let token = |sub: &str, role: &str, ttl: &str| {
        run(&[
            "jwt",
            "sign",
            "--key",
            &key,
            "--iss",
            "https://login.demo",
            "--sub",
            sub,
            "--aud",
            "reviews",
            "--ttl-secs",
            ttl,
            "--claim",
            &format!("role={role}"),
        ])
    };
    let admin = token("alice", "admin", "600")?;
    let reader = token("bob", "reader", "600")?;
    let send = |method: &str, token: Option<&str>| -> Result<String> {
        let mut get = HttpGetArgs::new("http://198.19.0.30/reviews/1".parse()?);
        get.method = method.into();
        get.count = 10;
        get.headers = token
            .map(|t| vec![format!("authorization: Bearer {t}")])
            .unwrap_or_default();
        let r = frontend.http_get(&get)?;
        Ok(format!("{:?}", r.by_status))
    };
    // The engine re-reads the objects within a moment: wait until DELETE is refused.
    testbed::eventually(Duration::from_secs(10), || {
        let r = send("DELETE", None)?;
        ensure!(r.contains("403"), "not in effect yet: {r}");
        Ok(())
    })?;
    println!("    responses by status, 10 requests each:");
    println!(
        "      GET    without a token          {}",
        send("GET", None)?
    );
    println!(
        "      DELETE without a token          {}",
        send("DELETE", None)?
    );
    println!(
        "      DELETE as bob (role reader)     {}",
        send("DELETE", Some(&reader))?
    );
    println!(
        "      DELETE as alice (role admin)    {}",
        send("DELETE", Some(&admin))?
    );
    println!(
        "      GET    with a tampered token    {}",
        send("GET", Some(&format!("{admin}x")))?
    );
    explain(
        "403 comes from the authorization policy, 401 from token validation (signature, issuer,\n\
         audience, expiry); a 503 is the flaky v2 once its retries ran out. Refusals are counted\n\
         (weft_l7_authz_denials_total, weft_l7_authn_failures_total) and listed by `weft flows`.",
    );
    Ok(())
}

/// `weft <args> --admin-socket …` started in the background, its output read by threads.
struct Background {
    child: std::process::Child,
    stdout: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Background {
    fn start(weft: &Path, agent: &Agent, args: &[&str]) -> Result<Self> {
        use std::io::BufRead as _;
        let mut child = Command::new(weft)
            .args(args)
            .arg("--admin-socket")
            .arg(&agent.socket)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running weft")?;
        let lines = |from: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().context("stdout")?));
        let stderr = lines(Box::new(child.stderr.take().context("stderr")?));
        Ok(Self {
            child,
            stdout,
            stderr,
        })
    }

    /// Its next line on `stream`, within 10 s.
    fn line(stream: &std::sync::mpsc::Receiver<String>, what: &str) -> Result<String> {
        stream
            .recv_timeout(Duration::from_secs(10))
            .with_context(|| format!("no {what} from weft within 10 s"))
    }

    /// Stops it (by its pid: this demo started it).
    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `weft tap` while the pods make a little traffic: each connection and request as it happens.
fn live_events(
    weft: &Path,
    agent: &Agent,
    frontend: &testbed::Pod,
    intruder: &testbed::Pod,
) -> Result<()> {
    step!("live events (`weft tap`): the kernel's connections and the engine's requests");
    let tap = Background::start(weft, agent, &["tap", "--duration", "20"])?;
    let watching = Background::line(&tap.stderr, "\"watching\"")?;
    ensure!(watching.contains("watching"), "weft tap said: {watching}");
    let catalog: SocketAddr = "198.19.0.10:80".parse()?;
    let payments: SocketAddr = "198.19.0.20:80".parse()?;
    ensure!(
        frontend.transfer(catalog, 256 * 1024, 1)?.all_ok(),
        "frontend → catalog"
    );
    let refused = intruder.try_connect(payments, Duration::from_secs(2))?;
    ensure!(!refused.ok, "intruder → payments was not refused");
    let mut get = HttpGetArgs::new("http://198.19.0.30/reviews".parse()?);
    get.count = 3;
    frontend.http_get(&get)?;
    std::thread::sleep(Duration::from_millis(500));
    let lines: Vec<String> = tap.stdout.try_iter().collect();
    tap.stop();
    for l in &lines {
        println!("    {l}");
    }
    ensure!(!lines.is_empty(), "weft tap showed nothing");
    explain(
        "OPEN/CLOSE come from the kernel's programs (one event per connection, through a ring buffer\n\
         the agent reads only while someone watches); REQUEST from the L7 engine. Filters:\n\
         --namespace, --pod, --service, --verdict, --status 5xx, --type; -o json for programs.\n\
         `weft top` shows the same events as a live table per workload.",
    );
    Ok(())
}

/// `weft ui`: the agent's page on this host's loopback; with `--screenshot`, a picture of it.
fn service_graph(
    weft: &Path,
    agent: &Agent,
    run_dir: &Path,
    screenshot: Option<&Path>,
) -> Result<()> {
    use std::io::IsTerminal as _;
    step!("the service graph page (`weft ui`)");
    let ui = Background::start(weft, agent, &["ui", "--listen", "127.0.0.1:0"])?;
    let url = Background::line(&ui.stdout, "address")?;
    ensure!(url.starts_with("http://127.0.0.1:"), "weft ui said: {url}");
    println!("    the page: {url}  (served by `weft ui`, forwarded to the agent's admin socket)");
    if let Some(file) = screenshot {
        let file = std::path::absolute(file)?;
        // Inside the run's own directory: the testbed removes it, also after a crash.
        let profile = run_dir.join("chromium-profile");
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1400,900",
                "--virtual-time-budget=4000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--screenshot={}", file.display()))
            .arg(&url)
            .output()
            .context("running chromium (`cargo xtask setup` installs it)");
        let _ = std::fs::remove_dir_all(&profile);
        let out = out?;
        ensure!(
            out.status.success() && file.exists(),
            "chromium could not take the screenshot: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("    screenshot saved to {}", file.display());
    }
    if std::io::stdin().is_terminal() {
        println!(
            "    open it in a browser on this machine; press Enter to clean up and end the demo"
        );
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    } else {
        explain(
            "Run the demo from a terminal to keep the mesh up while you look at the page; or, with\n\
             an agent running, `weft ui --node <node>` serves it on http://127.0.0.1:15500/ui.",
        );
    }
    ui.stop();
    Ok(())
}

fn cli(weft: &Path, agent: &Agent, args: &[&str]) -> Result<String> {
    let socket = agent.socket.display().to_string();
    weft_run(weft, &[args, &["--admin-socket", &socket]].concat())
}

/// `weft <args>`: its standard output, or an error with its standard error.
fn weft_run(weft: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(weft)
        .args(args)
        .output()
        .context("running weft")?;
    ensure!(
        out.status.success(),
        "weft {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[allow(clippy::cast_precision_loss, reason = "display only")]
fn human(bytes: f64) -> String {
    let mib = bytes / (1024.0 * 1024.0);
    if mib >= 1.0 {
        format!("{mib:.1} MiB")
    } else {
        format!("{:.1} KiB", bytes / 1024.0)
    }
}
