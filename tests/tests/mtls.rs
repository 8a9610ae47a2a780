//! Identity and the node-to-node mTLS tunnel, with two agents on two testbed nodes linked by the
//! fabric: meshed cross-node flows cross the link only as TLS, plaintext from other nodes is
//! refused in STRICT mode (also with the source's agent down: fail closed), and certificates
//! rotate under live connections without breaking them.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use testbed::{
    Node, Pod, Proc, ServeMode, Server, Testbed,
    agent::{self, Agent},
    eventually,
    http::{HttpGetArgs, HttpServer, HttpServerArgs},
};

const SERVER_VIP: &str = "198.19.0.40";
const MARKER: &str = "weft-plaintext-marker-7f3a";

/// Node `n1`: meshed `client` and unmeshed `plain`; node `n2`: meshed `server` running an HTTP
/// server on 8080 and an echo server on 7000; Service `server` (VIP port 80 → 8080). Both agents
/// have the run's CA.
struct TwoNodes {
    a1: Agent,
    a2: Agent,
    n1: Node,
    n2: Node,
    client: Pod,
    plain: Pod,
    server: Pod,
    _http: HttpServer,
    echo: Server,
    tb: Testbed,
}

impl TwoNodes {
    fn new(label: &str, agent_args: &[&str], server_mode: Option<&str>) -> Result<Self> {
        let args: Vec<String> = agent_args.iter().map(|a| (*a).to_owned()).collect();
        Self::with(
            label,
            &Setup {
                a1_args: args.clone(),
                a2_args: args,
                server_mode,
                ..Setup::default()
            },
        )
    }

    fn with(label: &str, setup: &Setup<'_>) -> Result<Self> {
        let tb = Testbed::new(label)?;
        let n1 = tb.node("n1")?;
        let n2 = tb.node("n2")?;
        let client = n1.pod("client")?;
        let plain = n1.pod("plain")?;
        let server = n2.pod("server")?;
        let annotations: Vec<(&str, &str)> = setup
            .server_mode
            .map(|mode| ("weft.dev/mtls-mode", mode))
            .into_iter()
            .collect();
        let objects = |client_sa: &str| {
            [
                n1.manifest(),
                n2.manifest(),
                client.manifest(&[("app", "client")], client_sa),
                plain.manifest_unmeshed(&[("app", "plain")], "plain"),
                server.manifest_annotated(&[("app", "server")], "server", &annotations),
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: server, namespace: default}}\n\
                     spec: {{clusterIP: {SERVER_VIP}, selector: {{app: server}}, \
                     ports: [{{port: 80, targetPort: 8080}}]}}\n"
                ),
            ]
            .join("\n---\n")
        };
        let run_ca = agent::identity_args(&n1)?;
        let mut args1 = setup.a1_identity.clone().unwrap_or_else(|| run_ca.clone());
        args1.extend(setup.a1_args.iter().cloned());
        let mut args2 = setup.a2_identity.clone().unwrap_or(run_ca);
        args2.extend(setup.a2_args.iter().cloned());
        let a1 = Agent::start(&n1, &args1.iter().map(String::as_str).collect::<Vec<_>>())?;
        let a2 = Agent::start(&n2, &args2.iter().map(String::as_str).collect::<Vec<_>>())?;
        a1.apply("objects.yaml", &objects("client"))?;
        a2.apply(
            "objects.yaml",
            &objects(setup.n2_client_sa.unwrap_or("client")),
        )?;
        if let Some(extra) = &setup.n2_extra {
            a2.apply("extra.yaml", extra)?;
        }
        for a in [&a1, &a2] {
            a.wait_workloads(3)?;
        }
        let http = server.serve_http(&HttpServerArgs::new("server", 8080))?;
        let echo = server.serve(ServeMode::Echo, 7000)?;
        Ok(Self {
            a1,
            a2,
            n1,
            n2,
            client,
            plain,
            server,
            _http: http,
            echo,
            tb,
        })
    }

    fn get(from: &Pod, url: &str, count: u64) -> Result<testbed::http::HttpGetReport> {
        let mut args = HttpGetArgs::new(url.parse()?);
        args.count = count;
        args.request_timeout_ms = 3000;
        args.timeout_secs = 20;
        from.http_get(&args)
    }

    fn diag(&self) -> String {
        format!(
            "n1 agent: {}\nn2 agent: {}",
            self.a1.stderr(),
            self.a2.stderr()
        )
    }
}

/// How [`TwoNodes::with`] differs from the plain setup.
#[derive(Default)]
struct Setup<'a> {
    a1_args: Vec<String>,
    a2_args: Vec<String>,
    /// Replaces the run CA flags of n1's agent (another CA, an expired intermediate).
    a1_identity: Option<Vec<String>>,
    /// Replaces the run CA flags of n2's agent.
    a2_identity: Option<Vec<String>>,
    /// `weft.dev/mtls-mode` of the server pod.
    server_mode: Option<&'a str>,
    /// The client's service account as n2's agent believes it.
    n2_client_sa: Option<&'a str>,
    /// Objects only n2's agent sees.
    n2_extra: Option<String>,
}

/// `tcpdump` on a node's uplink (the fabric link into it), writing a pcap.
struct Capture {
    proc: Proc,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(node: &Node, file: &Path) -> Result<Self> {
        let proc = node.spawn(
            "tcpdump",
            [
                "-i",
                "uplink",
                "-nn",
                "-U",
                "-s",
                "0",
                "-w",
                &file.display().to_string(),
                "tcp",
            ],
        )?;
        eventually(Duration::from_secs(10), || {
            if proc.stderr().contains("listening on") {
                Ok(())
            } else {
                bail!("tcpdump not ready: {}", proc.stderr())
            }
        })?;
        Ok(Self {
            proc,
            file: file.to_owned(),
        })
    }

    /// Stops the capture; returns the raw pcap and one text line per packet.
    fn finish(mut self) -> Result<(Vec<u8>, Vec<String>)> {
        std::thread::sleep(Duration::from_millis(300));
        self.proc.terminate(Duration::from_secs(5))?;
        let raw = std::fs::read(&self.file)?;
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .context("tcpdump -r")?;
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        Ok((raw, lines))
    }
}

/// The agent's tunnel, identity and datapath event lines, for failure messages.
fn tunnel_metrics(agent: &Agent) -> Result<String> {
    Ok(agent
        .metrics()?
        .lines()
        .filter(|l| l.contains("tunnel") || l.contains("identity") || l.contains("strict"))
        .collect::<Vec<_>>()
        .join("\n"))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn cross_node_flows_cross_the_link_only_inside_the_mtls_tunnel() -> Result<()> {
    let mesh = TwoNodes::new("mtls_tunnel", &[], None)?;
    let capture = Capture::start(&mesh.n2, &mesh.n2.run_dir().join("uplink.pcap"))?;

    let direct = format!("http://{}:8080/{MARKER}", mesh.server.ip());
    let report = TwoNodes::get(&mesh.client, &direct, 20)?;
    ensure!(
        report.by_status.get(&200) == Some(&20),
        "{report:?}\n{}",
        mesh.diag()
    );
    let via_service = format!("http://{SERVER_VIP}/{MARKER}");
    let report = TwoNodes::get(&mesh.client, &via_service, 5)?;
    ensure!(report.by_status.get(&200) == Some(&5), "{report:?}");
    let transfer = mesh.client.transfer(mesh.echo.addr(), 1 << 20, 4)?;
    ensure!(transfer.all_ok(), "{transfer:?}");
    ensure!(transfer.bytes_verified == 4 << 20);

    let (raw, packets) = capture.finish()?;
    ensure!(!packets.is_empty(), "nothing was captured");
    ensure!(
        !contains(&raw, MARKER.as_bytes()),
        "the request path crossed the link in plaintext"
    );
    let plaintext: Vec<&String> = packets.iter().filter(|p| !p.contains(".15008")).collect();
    ensure!(
        plaintext.is_empty(),
        "TCP outside the tunnel port crossed the link: {:?}",
        &plaintext[..plaintext.len().min(5)]
    );

    // Both agents counted the streams: one per connection.
    let out = mesh.a1.metric(
        "weft_tunnel_streams_total",
        &[("direction", "outbound"), ("result", "ok")],
    )?;
    let inbound = mesh.a2.metric(
        "weft_tunnel_streams_total",
        &[("direction", "inbound"), ("result", "ok")],
    )?;
    ensure!(
        out >= 6.0 && inbound >= 6.0,
        "streams out {out}, in {inbound}\n{}\n{}\n{}",
        tunnel_metrics(&mesh.a1)?,
        tunnel_metrics(&mesh.a2)?,
        mesh.diag()
    );
    // One TLS connection carries them (per source and destination identity).
    let conns = mesh.a1.metric(
        "weft_tunnel_connections_total",
        &[("direction", "outbound"), ("result", "ok")],
    )?;
    ensure!(
        conns <= 2.0,
        "{conns} tunnel connections for one identity pair"
    );
    Ok(())
}

/// The destination pod sees its client on the other node by the client's own address, not
/// by an agent's, so `getpeername()`, access logs and address allowlists stay true (as with
/// ztunnel). Plain Python sockets on both ends; the server pod is STRICT, so the agent's
/// connection from a foreign address must also pass the STRICT gate.
#[test]
fn a_pod_sees_its_client_on_another_node_by_the_clients_own_address() -> Result<()> {
    const PORT: u16 = 7071;
    const CONNECTIONS: u32 = 3;
    let mesh = TwoNodes::new("mtls_source", &[], None)?;
    let server = format!(
        "import socket\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {PORT}))\n\
         s.listen(8)\n\
         print('listening', flush=True)\n\
         for _ in range({CONNECTIONS}):\n\
         \x20   c, peer = s.accept()\n\
         \x20   line = c.makefile().readline().strip()\n\
         \x20   c.sendall(f'{{peer[0]}} {{line}}\\n'.encode())\n\
         \x20   c.close()\n"
    );
    let server = mesh.server.spawn("python3", ["-c", &server])?;
    server.wait_for_line(Duration::from_secs(10), |l| l == "listening")?;
    let client = format!(
        "import socket, sys\n\
         c = socket.create_connection(('{}', {PORT}), timeout=5)\n\
         c.sendall(sys.argv[1].encode() + b'\\n')\n\
         print(c.makefile().readline().strip())\n",
        mesh.server.ip()
    );
    for i in 0..CONNECTIONS {
        let said = format!("hello-{i}");
        let out = mesh
            .client
            .run(Duration::from_secs(15), "python3", ["-c", &client, &said])?;
        ensure!(out.success(), "{out:?}\n{}", mesh.diag());
        let expected = format!("{} {said}", mesh.client.ip());
        ensure!(
            out.stdout.trim() == expected,
            "the server saw {:?}, expected {expected:?} (the client pod's address)\n{}",
            out.stdout.trim(),
            mesh.diag()
        );
    }
    // Through the tunnel, not around it.
    let inbound = mesh.a2.metric(
        "weft_tunnel_streams_total",
        &[("direction", "inbound"), ("result", "ok")],
    )?;
    ensure!(
        inbound >= f64::from(CONNECTIONS),
        "{inbound} inbound streams\n{}",
        tunnel_metrics(&mesh.a2)?
    );
    Ok(())
}

#[test]
fn strict_refuses_plaintext_from_other_nodes_and_fails_closed() -> Result<()> {
    let mut mesh = TwoNodes::new("mtls_strict", &[], None)?;
    // An unmeshed pod of another node: its SYNs never reach the STRICT pod.
    let report = mesh
        .plain
        .try_connect(mesh.echo.addr(), Duration::from_secs(2))?;
    ensure!(!report.ok && report.timed_out, "{report:?}");
    let dropped = mesh.a2.metric(
        "weft_datapath_events_total",
        &[("event", "strict_inbound_drop")],
    )?;
    ensure!(dropped >= 1.0, "no SYN drop counted");
    // The meshed client's connection goes through the tunnel meanwhile.
    let ok = mesh
        .client
        .try_connect(mesh.echo.addr(), Duration::from_secs(2))?;
    ensure!(ok.ok, "{ok:?}\n{}", mesh.diag());

    // The client's agent dies: its heartbeat ages out and the kernel refuses the connection
    // rather than sending it in plaintext.
    mesh.a1.kill9();
    std::thread::sleep(Duration::from_millis(3500));
    let refused = mesh
        .client
        .try_connect(mesh.echo.addr(), Duration::from_secs(2))?;
    ensure!(
        refused.errno == Some(libc::EPERM),
        "a STRICT destination was reached without the tunnel: {refused:?}"
    );
    mesh.a1.restart(&mesh.n1)?;
    eventually(Duration::from_secs(10), || {
        let r = mesh
            .client
            .try_connect(mesh.echo.addr(), Duration::from_secs(2))?;
        ensure!(r.ok, "{r:?}");
        Ok(())
    })?;
    drop(mesh.tb);
    Ok(())
}

#[test]
fn permissive_accepts_plaintext_and_the_tunnel() -> Result<()> {
    let mesh = TwoNodes::new("mtls_permissive", &[], Some("PERMISSIVE"))?;
    let plain = mesh
        .plain
        .try_connect(mesh.echo.addr(), Duration::from_secs(2))?;
    ensure!(plain.ok, "{plain:?}");
    let transfer = mesh.client.transfer(mesh.echo.addr(), 1 << 16, 2)?;
    ensure!(transfer.all_ok(), "{transfer:?}");
    let out = mesh.a1.metric(
        "weft_tunnel_streams_total",
        &[("direction", "outbound"), ("result", "ok")],
    )?;
    ensure!(
        out >= 2.0,
        "meshed flows to a PERMISSIVE pod still use the tunnel ({out})"
    );
    let _ = (&mesh.n1, &mesh.n2);
    Ok(())
}

#[test]
fn certificates_rotate_under_100_live_connections_without_breaking_them() -> Result<()> {
    // 4 s certificates: replaced every 2 s, several times while the connections live.
    let mesh = TwoNodes::new("mtls_rotation", &["--svid-ttl-secs", "4"], None)?;
    let before = mesh
        .a2
        .metric("weft_identity_certificates_issued_total", &[])?;
    let hold = mesh.client.hold(
        mesh.echo.addr(),
        100,
        Duration::from_millis(500),
        Duration::from_secs(30),
    )?;
    std::thread::sleep(Duration::from_secs(9));
    // New connections after rotations are still accepted (new certificate, same CA).
    let fresh = mesh.client.transfer(mesh.echo.addr(), 1 << 16, 4)?;
    ensure!(fresh.all_ok(), "{fresh:?}");
    let report = hold.finish()?;
    ensure!(
        report.conns == 100 && report.broken == 0 && report.rounds >= 10,
        "{report:?}\n{}",
        mesh.diag()
    );
    let after = mesh
        .a2
        .metric("weft_identity_certificates_issued_total", &[])?;
    ensure!(
        after - before >= 3.0,
        "certificates issued before {before}, after {after}: no rotation happened"
    );
    Ok(())
}

#[test]
fn l7_routes_apply_first_then_the_tunnel_carries_the_requests() -> Result<()> {
    let mesh = TwoNodes::new("mtls_l7", &[], None)?;
    let route = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: server, namespace: default}}\n\
         spec:\n  parentRefs: [{{kind: Service, name: server, port: 80}}]\n  rules:\n  \
         - matches: [{{path: {{type: PathPrefix, value: /{MARKER}}}}}]\n    \
         backendRefs: [{{name: server, port: 80}}]\n"
    );
    mesh.a1.apply("route.yaml", &route)?;
    let matching = format!("http://{SERVER_VIP}/{MARKER}");
    let other = format!("http://{SERVER_VIP}/elsewhere");
    eventually(Duration::from_secs(10), || {
        let r = TwoNodes::get(&mesh.client, &other, 1)?;
        ensure!(
            r.by_status.get(&404) == Some(&1),
            "route not applied yet: {r:?}"
        );
        Ok(())
    })?;
    let capture = Capture::start(&mesh.n2, &mesh.n2.run_dir().join("l7.pcap"))?;
    let report = TwoNodes::get(&mesh.client, &matching, 10)?;
    ensure!(
        report.by_status.get(&200) == Some(&10),
        "{report:?}\n{}",
        mesh.diag()
    );
    let (raw, packets) = capture.finish()?;
    ensure!(!contains(&raw, MARKER.as_bytes()), "plaintext on the link");
    ensure!(
        packets.iter().all(|p| p.contains(".15008")),
        "TCP outside the tunnel port crossed the link"
    );
    let l7 = mesh.a1.metric(
        "weft_l7_requests_total",
        &[("destination_service", "server"), ("status_class", "2xx")],
    )?;
    ensure!(l7 >= 10.0, "the engine saw {l7} requests");
    let inbound = mesh.a2.metric(
        "weft_tunnel_streams_total",
        &[("direction", "inbound"), ("result", "ok")],
    )?;
    ensure!(inbound >= 1.0, "no stream reached the server's agent");
    Ok(())
}

/// Constant HTTP load through an L7 route whose backends run on both nodes (the far one
/// STRICT), while first the far node's agent, then the client node's own agent stop and come
/// back. Far agent away: requests on its tunnel streams that break are repeated (GET is
/// idempotent), new ones find its tunnel closed and go to the other backend. Own agent away:
/// the drained client reconnects around the engine, and the kernel's balancer picks the
/// backend it can reach without the tunnel. No request fails.
#[test]
fn either_agent_restarting_fails_no_request_through_an_l7_route() -> Result<()> {
    let mut mesh = TwoNodes::new("mtls_far_restart", &[], None)?;
    let local = mesh.n1.pod("server-local")?;
    let manifest = local.manifest(&[("app", "server")], "server");
    mesh.a1.apply("local.yaml", &manifest)?;
    mesh.a2.apply("local.yaml", &manifest)?;
    mesh.a1.wait_workloads(4)?;
    let _local_http = local.serve_http(&HttpServerArgs::new("server-local", 8080))?;
    let route = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server, namespace: default}
spec:
  parentRefs: [{kind: Service, name: server, port: 80}]
  rules:
  - backendRefs: [{name: server, port: 80}]
";
    mesh.a1.apply("route.yaml", route)?;
    let url = format!("http://{SERVER_VIP}/");
    eventually(Duration::from_secs(10), || {
        let r = TwoNodes::get(&mesh.client, &url, 40)?;
        ensure!(
            r.by_server.get("server").copied().unwrap_or(0) > 0
                && r.by_server.get("server-local").copied().unwrap_or(0) > 0
                && mesh.a1.metric(
                    "weft_l7_requests_total",
                    &[("destination_service", "server")]
                )? >= 40.0,
            "not through the engine to both nodes yet: {r:?} {}",
            mesh.a1
                .json("/config_dump")
                .map(|d| format!("{} {}", d["node"]["problems"], d["config_errors"]))
                .unwrap_or_default()
        );
        Ok(())
    })?;
    let args = testbed::http::HttpLoadArgs::new(url.parse()?, 300.0, Duration::from_secs(16))
        .connections(8);
    let load = mesh.client.start_http_load(&args)?;
    std::thread::sleep(Duration::from_secs(3));
    mesh.a2.stop()?;
    std::thread::sleep(Duration::from_secs(2));
    let n2 = mesh.n2.clone();
    mesh.a2.restart(&n2)?;
    std::thread::sleep(Duration::from_secs(2));
    let repeated =
        testbed::agent::sum_metric(&mesh.a1.metrics()?, "weft_l7_safe_retries_total", &[]);
    mesh.a1.stop()?;
    std::thread::sleep(Duration::from_secs(4));
    let n1 = mesh.n1.clone();
    mesh.a1.restart(&n1)?;
    let report = load.finish()?;
    ensure!(
        report.errors == 0 && report.non_2xx == 0 && report.completed == report.scheduled,
        "every request answered: {report:?}"
    );
    ensure!(
        repeated >= 1.0,
        "the far node's restart was felt and repaired: {repeated}"
    );
    Ok(())
}

/// The only backend runs on the far node: while that node's agent is away, its PERMISSIVE pod is
/// reached in plaintext (as the kernel does when the client's own engine is down) and no
/// request fails; a STRICT pod is never reached in plaintext: its requests fail until the agent
/// is back.
#[test]
fn a_far_node_agent_restart_keeps_permissive_pods_reachable_and_strict_ones_closed() -> Result<()> {
    for strict in [false, true] {
        let mut mesh = TwoNodes::new(
            if strict {
                "mtls_far_strict"
            } else {
                "mtls_far_perm"
            },
            &[],
            Some(if strict { "STRICT" } else { "PERMISSIVE" }),
        )?;
        let route = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: server, namespace: default}
spec:
  parentRefs: [{kind: Service, name: server, port: 80}]
  rules:
  - backendRefs: [{name: server, port: 80}]
";
        mesh.a1.apply("route.yaml", route)?;
        let url = format!("http://{SERVER_VIP}/");
        eventually(Duration::from_secs(10), || {
            TwoNodes::get(&mesh.client, &url, 2)?;
            ensure!(
                mesh.a1.metric(
                    "weft_l7_requests_total",
                    &[("destination_service", "server")]
                )? >= 2.0,
                "not through the engine yet"
            );
            Ok(())
        })?;
        let args = testbed::http::HttpLoadArgs::new(url.parse()?, 200.0, Duration::from_secs(8))
            .connections(4);
        let load = mesh.client.start_http_load(&args)?;
        std::thread::sleep(Duration::from_secs(2));
        mesh.a2.stop()?;
        std::thread::sleep(Duration::from_secs(2));
        let n2 = mesh.n2.clone();
        mesh.a2.restart(&n2)?;
        let report = load.finish()?;
        let plaintext = mesh.a1.metric(
            "weft_tunnel_connections_total",
            &[
                ("direction", "outbound"),
                ("result", "plaintext_while_peer_down"),
            ],
        )?;
        if strict {
            ensure!(
                report.non_2xx > 0 && plaintext == 0.0,
                "a STRICT pod is not reached in plaintext while its agent is away: {report:?}, {plaintext} plaintext"
            );
        } else {
            ensure!(
                report.errors == 0 && report.non_2xx == 0 && report.completed == report.scheduled,
                "every request answered: {report:?}"
            );
            ensure!(
                plaintext > 0.0,
                "the far agent's absence was bridged in plaintext"
            );
        }
    }
    Ok(())
}

/// JWT authentication and per-request authorization run in the client node's engine, before the
/// tunnel: a refused request never crosses the link, an allowed one crosses it encrypted. The
/// tokens come from `weft jwt keygen` / `weft jwt sign`.
#[test]
fn jwt_rules_apply_before_the_tunnel_for_a_service_on_another_node() -> Result<()> {
    let mesh = TwoNodes::new("mtls_jwt", &[], None)?;
    let dir = mesh.n1.run_dir().join("jwt");
    let weft = |args: &[&str]| -> Result<String> {
        let out = Command::new(testbed::weft_bin()).args(args).output()?;
        ensure!(
            out.status.success(),
            "weft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    };
    let dir_arg = dir.display().to_string();
    weft(&["jwt", "keygen", "--dir", &dir_arg])?;
    let key = dir.join("key.pem").display().to_string();
    let token = |role: &str| {
        weft(&[
            "jwt",
            "sign",
            "--key",
            &key,
            "--iss",
            "https://login.test",
            "--sub",
            "alice",
            "--claim",
            &format!("role={role}"),
        ])
    };
    let (admin, guest) = (token("admin")?, token("guest")?);
    let objects = format!(
        "apiVersion: weft.dev/v1alpha1\nkind: RequestAuthentication\n\
         metadata: {{name: server-jwt, namespace: default}}\nspec:\n  \
         targetRef: {{kind: Service, name: server}}\n  jwtRules:\n  - issuer: https://login.test\n    \
         jwksFile: {dir_arg}/jwks.json\n---\n\
         apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {{name: server-admins, namespace: default}}\nspec:\n  \
         targetRef: {{kind: Service, name: server}}\n  rules:\n  \
         - from: [{{source: {{requestPrincipals: ['https://login.test/*']}}}}]\n    \
         when: [{{key: 'request.auth.claims[role]', values: [admin]}}]\n"
    );
    mesh.a1.apply("jwt.yaml", &objects)?;
    let url = format!("http://{SERVER_VIP}/{MARKER}");
    let get = |token: Option<&str>| {
        let mut args = HttpGetArgs::new(url.parse()?);
        args.count = 5;
        args.request_timeout_ms = 3000;
        args.timeout_secs = 20;
        args.headers = token
            .map(|t| vec![format!("authorization: Bearer {t}")])
            .unwrap_or_default();
        mesh.client.http_get(&args)
    };
    eventually(Duration::from_secs(10), || {
        let r = get(None)?;
        ensure!(r.status(403) == 5, "not in effect yet: {r:?}");
        Ok(())
    })?;
    let streams = || {
        mesh.a2.metric(
            "weft_tunnel_streams_total",
            &[("direction", "inbound"), ("result", "ok")],
        )
    };
    let before = streams()?;
    let guest_report = get(Some(&guest))?;
    ensure!(guest_report.status(403) == 5, "{guest_report:?}");
    let forged = get(Some(&format!("{admin}x")))?;
    ensure!(forged.status(401) == 5, "{forged:?}");
    ensure!(
        streams()? <= before,
        "refused requests opened tunnel streams to the other node"
    );
    let capture = Capture::start(&mesh.n2, &mesh.n2.run_dir().join("jwt.pcap"))?;
    let allowed = get(Some(&admin))?;
    ensure!(allowed.status(200) == 5, "{allowed:?}\n{}", mesh.diag());
    let (raw, _) = capture.finish()?;
    ensure!(!contains(&raw, MARKER.as_bytes()), "plaintext on the link");
    ensure!(
        streams()? > before,
        "the allowed requests did not use the tunnel"
    );
    Ok(())
}

/// A connection from the client to the server's echo port is carried to the far agent, which
/// refuses it: the client sees its connection reset (no echo), and n2 counts the reason.
fn refused_by_the_far_agent(mesh: &TwoNodes, metric: &str, labels: &[(&str, &str)]) -> Result<()> {
    let transfer = mesh.client.transfer(mesh.echo.addr(), 1 << 10, 1)?;
    ensure!(
        !transfer.all_ok(),
        "the connection went through: {transfer:?}"
    );
    eventually(Duration::from_secs(5), || {
        let n = mesh.a2.metric(metric, labels)?;
        ensure!(
            n >= 1.0,
            "{metric} {labels:?} = {n}\n{}",
            tunnel_metrics(&mesh.a2)?
        );
        Ok(())
    })?;
    ensure!(
        mesh.a2.stderr().contains("tunnel"),
        "no log line on the server's agent: {}",
        mesh.a2.stderr()
    );
    Ok(())
}

/// Builds the two nodes as `setup` says and checks that the far agent refuses the client's
/// connection, counting it in `metric` (inbound) with `result`.
fn expect_refusal(label: &str, setup: &Setup<'_>, metric: &str, result: &str) -> Result<TwoNodes> {
    let mesh = TwoNodes::with(label, setup)?;
    refused_by_the_far_agent(
        &mesh,
        metric,
        &[("direction", "inbound"), ("result", result)],
    )?;
    Ok(mesh)
}

#[test]
fn the_receiving_agent_enforces_authorization_for_cross_node_flows() -> Result<()> {
    // Only n2 knows the policy: n1's kernel lets the connection out, n2's engine refuses it.
    let mesh = expect_refusal(
        "mtls_authz",
        &Setup {
            n2_extra: Some(
                "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                 metadata: {name: no-client, namespace: default}\n\
                 spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n  \
                 rules:\n  - from: [{source: {serviceAccounts: [client]}}]\n"
                    .to_owned(),
            ),
            ..Setup::default()
        },
        "weft_tunnel_streams_total",
        "denied",
    )?;
    // The refusal is in the receiving agent's flow table, with the check that refused.
    let flows = mesh.a2.flows()?;
    let denied = flows["l7"]["denied"].as_array().context("no l7.denied")?;
    ensure!(
        denied.iter().any(|d| d["rule"] == "tunnel: denied"
            && d["source"]
                .as_str()
                .is_some_and(|s| s.starts_with("default/client"))),
        "{denied:?}"
    );
    Ok(())
}

#[test]
fn a_source_presenting_another_identity_is_refused() -> Result<()> {
    // n2 believes the client pod runs as `impostor-check`; its certificate says `client`.
    expect_refusal(
        "mtls_identity",
        &Setup {
            n2_client_sa: Some("impostor-check"),
            ..Setup::default()
        },
        "weft_tunnel_streams_total",
        "identity_mismatch",
    )
    .map(drop)
}

#[test]
fn certificates_from_a_foreign_ca_are_rejected() -> Result<()> {
    let tb_probe = Testbed::new("mtls_foreign_ca_files")?;
    let probe = tb_probe.node("x")?;
    let foreign = agent::ca_args(&probe, "foreign")?;
    expect_refusal(
        "mtls_foreign_ca",
        &Setup {
            a1_identity: Some(foreign),
            ..Setup::default()
        },
        "weft_tunnel_connections_total",
        "handshake_failed",
    )?;
    drop(tb_probe);
    Ok(())
}

#[test]
fn an_expired_intermediate_is_rejected() -> Result<()> {
    let tb = Testbed::new("mtls_expired_files")?;
    let probe = tb.node("x")?;
    let root = agent::identity_args(&probe)?;
    let dir = probe.run_dir().join("expired");
    // Valid for 0 days: expired as soon as its one-minute backdate has passed.
    let done = Command::new(testbed::weft_bin())
        .args([
            "ca",
            "intermediate",
            "--root-cert",
            &root[1],
            "--root-key",
            &root[3],
        ])
        .arg("--dir")
        .arg(&dir)
        .args(["--valid-days", "0"])
        .output()?;
    ensure!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    std::thread::sleep(Duration::from_secs(2));
    // n1 signs with the expired intermediate; both agents trust the same root.
    let mut a1_identity = agent::ca_flags(&dir);
    a1_identity.extend(["--trust-bundle".to_owned(), root[1].clone()]);
    expect_refusal(
        "mtls_expired",
        &Setup {
            a1_identity: Some(a1_identity),
            ..Setup::default()
        },
        "weft_tunnel_connections_total",
        "handshake_failed",
    )
    .map(drop)
}

#[test]
fn a_new_root_is_trusted_once_the_bundle_file_lists_it_without_restarts() -> Result<()> {
    // n1 signs with root B, n2 with the run's root A. Each agent reads its trust bundle from a
    // file that lists only its own root at first: the handshake fails. Then both files list
    // A and B (the middle step of a root rotation): traffic flows, no agent restarted.
    let files = Testbed::new("mtls_bundle_files")?;
    let probe = files.node("x")?;
    let root_b = agent::ca_args(&probe, "root-b")?;
    let dir = probe.run_dir();
    let (bundle1, bundle2) = (dir.join("bundle-n1.pem"), dir.join("bundle-n2.pem"));
    let root_a = agent::identity_args(&probe)?;
    let pem_a = std::fs::read_to_string(&root_a[1])?;
    let pem_b = std::fs::read_to_string(&root_b[1])?;
    std::fs::write(&bundle1, &pem_b)?;
    std::fs::write(&bundle2, &pem_a)?;
    let bundle_flag = |p: &Path| vec!["--trust-bundle".to_owned(), p.display().to_string()];
    let mut a1_identity = root_b.clone();
    a1_identity.extend(bundle_flag(&bundle1));
    let mut a2_identity = root_a.clone();
    a2_identity.extend(bundle_flag(&bundle2));
    let mesh = expect_refusal(
        "mtls_bundle",
        &Setup {
            a1_identity: Some(a1_identity),
            a2_identity: Some(a2_identity),
            ..Setup::default()
        },
        "weft_tunnel_connections_total",
        "handshake_failed",
    )?;
    let both = format!("{pem_a}{pem_b}");
    for f in [&bundle1, &bundle2] {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, &both)?;
        std::fs::rename(&tmp, f)?;
    }
    eventually(Duration::from_secs(10), || {
        let t = mesh.client.transfer(mesh.echo.addr(), 1 << 12, 1)?;
        ensure!(t.all_ok(), "{t:?}");
        Ok(())
    })
    .with_context(|| mesh.diag())?;
    drop(files);
    Ok(())
}

#[test]
fn a_dry_run_policy_on_the_receiving_node_counts_but_does_not_refuse() -> Result<()> {
    let mesh = TwoNodes::with(
        "mtls_dry_run",
        &Setup {
            n2_extra: Some(
                "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
                 metadata: {name: audit-client, namespace: default}\n\
                 spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n  \
                 dryRun: true\n  rules:\n  - from: [{source: {serviceAccounts: [client]}}]\n"
                    .to_owned(),
            ),
            ..Setup::default()
        },
    )?;
    let t = mesh.client.transfer(mesh.echo.addr(), 1 << 12, 1)?;
    ensure!(t.all_ok(), "{t:?}");
    let audited = mesh.a2.metric("weft_tunnel_dry_run_denials_total", &[])?;
    ensure!(audited >= 1.0, "{}", tunnel_metrics(&mesh.a2)?);
    Ok(())
}

/// Abusive clients, each printing one line of what it saw. `argv`: kind, host, port, count, then
/// per kind: `slowloris` (N connections send half a request head and wait for the answer),
/// `tunnel_junk` (N connections to the tunnel port, half silent, half sending junk, wait until the
/// agent closes each), `tunnel_nocert` (N TLS handshakes one after another without a client
/// certificate, each then trying to send), `big_header` (one request with a 10 MB header),
/// `endless_body` (a chunked POST that streams for `count` seconds), `denied` (N connects a
/// policy refuses).
const ABUSE: &str = r#"
import errno, os, socket, ssl, sys, time
kind, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def conn(timeout=30):
    s = socket.create_connection((host, port), timeout=timeout)
    return s
def wait_closed(socks, limit):
    answers = {}
    deadline = time.time() + limit
    for s in socks:
        s.settimeout(max(0.1, deadline - time.time()))
        try:
            d = s.recv(64)
            key = d.split(b"\r\n")[0].decode(errors="replace") if d else "closed"
        except socket.timeout:
            key = "open"
        except OSError as e:
            key = "error %d" % e.errno
        answers[key] = answers.get(key, 0) + 1
        s.close()
    return answers
if kind == "slowloris":
    socks = []
    for _ in range(n):
        s = conn(); s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n"); socks.append(s)
    print(sorted(wait_closed(socks, 25).items()))
elif kind == "tunnel_junk":
    socks = []
    for i in range(n):
        s = conn()
        if i % 2: s.sendall(os.urandom(4096))
        socks.append(s)
    print(sorted(wait_closed(socks, 20).items()))
elif kind == "tunnel_nocert":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    results = {}
    for _ in range(n):
        try:
            with ctx.wrap_socket(conn(10)) as t:
                t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                key = "answered" if t.recv(64) else "closed"
        except (ssl.SSLError, OSError) as e:
            key = "refused"
        results[key] = results.get(key, 0) + 1
    print(sorted(results.items()))
elif kind == "big_header":
    s = conn()
    try:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (10 << 20) + b"\r\n\r\n")
    except OSError:
        pass
    print(sorted(wait_closed([s], 10).items()))
elif kind == "endless_body":
    s = conn()
    s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (65536, b"b" * 65536)
    sent, end = 0, time.time() + n
    try:
        while time.time() < end:
            s.sendall(chunk); sent += 65536
    except OSError as e:
        print("stopped after", sent, "bytes:", e.strerror); sys.exit(0)
    print("sent", sent, "bytes")
elif kind == "denied":
    refused = 0
    for _ in range(n):
        s = socket.socket()
        try:
            s.connect((host, port))
        except OSError as e:
            refused += e.errno == errno.EPERM
        s.close()
    print("refused", refused)
"#;

/// Resident memory (KiB) and open descriptors of a process.
fn rss_and_fds(pid: u32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (rss, fds)
}

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, told in order")]
fn abuse_of_the_engine_and_the_tunnel_stays_bounded_counted_and_spares_other_flows() -> Result<()> {
    const SLOW: u32 = 200;
    const JUNK: u32 = 200;
    const NOCERT: u32 = 300;
    const DENIED: u32 = 2000;
    let mesh = TwoNodes::new("abuse", &[], None)?;
    // The service is L7 on the client's node (its engine serves it, then the tunnel carries it);
    // the echo port of the server is refused to everyone.
    let objects = "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\n\
        metadata: {name: server, namespace: default}\n\
        spec: {targetRef: {kind: Service, name: server}, timeout: 30s}\n---\n\
        apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
        metadata: {name: no-echo, namespace: default}\n\
        spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n  \
        rules: [{to: [{operation: {ports: [7000]}}]}]\n";
    for a in [&mesh.a1, &mesh.a2] {
        a.apply("abuse.yaml", objects)?;
    }
    let url = format!("http://{SERVER_VIP}/");
    eventually(Duration::from_secs(10), || {
        let r = TwoNodes::get(&mesh.client, &url, 1)?;
        let l7 = mesh.a1.metric("weft_l7_connections_total", &[])?;
        ensure!(
            r.status(200) == 1 && l7 > 0.0,
            "not through the engine yet: {r:?}"
        );
        Ok(())
    })?;
    // The bystander: steady requests through the engine and the tunnel, before and during.
    let mut steady = HttpGetArgs::new(url.parse()?);
    steady.count = 600;
    steady.concurrency = 2;
    let baseline = mesh.client.http_get(&steady)?;
    ensure!(baseline.status(200) == 600, "baseline: {baseline:?}");
    let pids = [
        mesh.a1.pid().context("agent 1 pid")?,
        mesh.a2.pid().context("agent 2 pid")?,
    ];
    let before = pids.map(rss_and_fds);

    let vip_port = ["80"];
    let tunnel_host = mesh.n2.uplink_ip().to_string();
    let server_ip = mesh.server.ip().to_string();
    let abuse = |pod: &Pod, args: [&str; 4]| {
        let mut command = vec!["-c", ABUSE];
        command.extend_from_slice(&args);
        pod.spawn("python3", command)
    };
    let slow_n = SLOW.to_string();
    let junk_n = JUNK.to_string();
    let nocert_n = NOCERT.to_string();
    let denied_n = DENIED.to_string();
    let mut abusers = vec![
        (
            "slowloris",
            abuse(
                &mesh.client,
                ["slowloris", SERVER_VIP, vip_port[0], &slow_n],
            )?,
        ),
        (
            "tunnel_junk",
            abuse(&mesh.plain, ["tunnel_junk", &tunnel_host, "15008", &junk_n])?,
        ),
        (
            "tunnel_nocert",
            abuse(
                &mesh.plain,
                ["tunnel_nocert", &tunnel_host, "15008", &nocert_n],
            )?,
        ),
        (
            "big_header",
            abuse(&mesh.client, ["big_header", SERVER_VIP, "80", "1"])?,
        ),
        (
            "endless_body",
            abuse(&mesh.client, ["endless_body", SERVER_VIP, "80", "15"])?,
        ),
        (
            "denied",
            abuse(&mesh.client, ["denied", &server_ip, "7000", &denied_n])?,
        ),
    ];
    let sampling = std::sync::atomic::AtomicBool::new(true);
    let (during, peaks) = std::thread::scope(|s| -> Result<_> {
        let sampler = s.spawn(|| {
            let mut peak = before;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, pid) in pids.iter().enumerate() {
                    let (rss, fds) = rss_and_fds(*pid);
                    peak[i] = (peak[i].0.max(rss), peak[i].1.max(fds));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        });
        let during = mesh.client.http_get(&steady);
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        Ok((during?, sampler.join().expect("sampler")))
    })?;
    let mut seen = Vec::new();
    for (kind, p) in &mut abusers {
        let done = p.wait(Duration::from_mins(1))?;
        ensure!(done.success(), "{kind}: {}", done.stderr);
        seen.push(format!("{kind}: {}", done.stdout.trim()));
    }
    let after = eventually(Duration::from_secs(20), || {
        let now = pids.map(rss_and_fds);
        for i in 0..2 {
            ensure!(
                now[i].1 <= before[i].1 + 8,
                "agent {} holds {} fds (before the abuse {})",
                i + 1,
                now[i].1,
                before[i].1
            );
        }
        Ok(now)
    })?;
    eprintln!(
        "abuse: {}\n  bystander p50/p99 before {:.0}/{:.0} µs, during {:.0}/{:.0} µs\n  \
         agents RSS KiB before {:?} peak {:?} after {:?}; fds before {:?} peak {:?} after {:?}",
        seen.join("; "),
        baseline.p50_us,
        baseline.p99_us,
        during.p50_us,
        during.p99_us,
        before.map(|b| b.0),
        peaks.map(|p| p.0),
        after.map(|a| a.0),
        before.map(|b| b.1),
        peaks.map(|p| p.1),
        after.map(|a| a.1),
    );
    // Every abuse met its bound: slow heads got 408 at the header deadline, the tunnel closed
    // every silent or junk connection, the 10 MB head got 431, every denied connect EPERM.
    ensure!(
        seen[0] == format!("slowloris: [('HTTP/1.1 408 Request Timeout', {SLOW})]"),
        "{seen:?}"
    );
    ensure!(
        !seen[1].contains("'open'"),
        "tunnel connections left open: {seen:?}"
    );
    // A TLS client without a mesh certificate never gets a byte of HTTP/2 from the tunnel.
    ensure!(
        !seen[2].contains("answered"),
        "the tunnel answered a client without a certificate: {seen:?}"
    );
    ensure!(seen[3].contains("431"), "{seen:?}");
    ensure!(seen[5] == format!("denied: refused {DENIED}"), "{seen:?}");
    // Other flows kept working, every request answered; their latency is reported above and
    // bounded here only against a stall (the two cores are shared with the abusers and, in
    // `cargo xtask test`, with another test).
    ensure!(
        during.status(200) == 600 && during.errors == 0,
        "bystander failed during the abuse: {during:?}"
    );
    ensure!(
        during.p99_us <= 10.0 * baseline.p99_us + 50_000.0,
        "bystander p99 {:.0} µs during the abuse vs {:.0} µs before",
        during.p99_us,
        baseline.p99_us
    );
    // Memory and descriptors stayed under the documented caps (ARCHITECTURE.md, "Abuse").
    for i in 0..2 {
        ensure!(
            peaks[i].0 <= before[i].0 + 64 * 1024,
            "agent {} RSS peaked at {} KiB (before {})",
            i + 1,
            peaks[i].0,
            before[i].0
        );
    }
    // Each abuse is counted.
    let header_timeouts = mesh
        .a1
        .metric("weft_l7_errors_total", &[("kind", "header_timeout")])?;
    ensure!(
        header_timeouts >= f64::from(SLOW),
        "header timeouts counted: {header_timeouts}\n{}",
        mesh.a1
            .metrics()?
            .lines()
            .filter(|l| l.contains("error") || l.contains("l7_conn"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let refused_tls = mesh.a2.metric(
        "weft_tunnel_connections_total",
        &[("direction", "inbound"), ("result", "handshake_failed")],
    )? + mesh.a2.metric(
        "weft_tunnel_connections_total",
        &[("direction", "inbound"), ("result", "timeout")],
    )?;
    ensure!(
        refused_tls >= f64::from(JUNK + NOCERT),
        "refused tunnel connections counted: {refused_tls} (junk or silent {JUNK}, without a \
         certificate {NOCERT})"
    );
    let too_large = mesh
        .a1
        .metric("weft_l7_errors_total", &[("kind", "header_too_large")])?;
    ensure!(too_large >= 1.0, "the 10 MB head is not counted");
    let flows = mesh.a1.flows()?;
    let attempts: u64 = flows["denied"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["dst"]["port"] == 7000)
        .filter_map(|d| d["attempts"].as_u64())
        .sum();
    ensure!(
        attempts >= u64::from(DENIED),
        "denied connects counted: {attempts}"
    );
    Ok(())
}
