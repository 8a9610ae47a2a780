//! The mesh on one node, end to end: a real agent, real eBPF programs, real servers and clients in
//! pods. Each test builds its own testbed run and asserts what a user would see: bytes arrive
//! intact, the kernel counters show the fast path, policies refuse connections with EPERM, and
//! nothing is left behind.
#![allow(
    clippy::cast_precision_loss,
    clippy::float_cmp,
    reason = "metric samples are exact small integers"
)]

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use testbed::{Node, Pod, ServeMode, Testbed, agent::Agent, eventually};

const MIB: u64 = 1024 * 1024;

/// A node with pods `a`, `b`, `c` (meshed, service accounts a/b/c) and `u` (unmeshed), an agent,
/// and a Service `b` (VIP 198.19.0.10:80 → b:7000).
struct Mesh {
    agent: Agent,
    pods: Vec<Pod>,
    node: Node,
    // Dropped last: tears everything down.
    tb: Testbed,
}

impl Mesh {
    /// The mesh with the socket fast path enabled for every pod (the tests of the fast path).
    fn new(label: &str, agent_args: &[&str]) -> Result<Self> {
        Self::build(label, agent_args, true)
    }

    /// The mesh as a user gets it: the socket fast path as this kernel's self-test decides.
    fn with_kernel_default(label: &str) -> Result<Self> {
        Self::build(label, &[], false)
    }

    fn build(label: &str, agent_args: &[&str], socket_fast_path: bool) -> Result<Self> {
        let tb = Testbed::new(label)?;
        let node = tb.node("n1")?;
        let mut pods = Vec::new();
        let mut manifests = Vec::new();
        for name in ["a", "b", "c"] {
            let pod = node.pod(name)?;
            manifests.push(pod.manifest(&[("app", name)], name));
            pods.push(pod);
        }
        let u = node.pod("u")?;
        manifests.push(u.manifest_unmeshed(&[("app", "u")], "u"));
        pods.push(u);
        let agent = Agent::start(&node, agent_args)?;
        if socket_fast_path {
            agent.enable_socket_fast_path()?;
        }
        agent.apply("pods.yaml", &manifests.join("\n---\n"))?;
        agent.apply(
            "services.yaml",
            r"
apiVersion: v1
kind: Service
metadata: {name: b, namespace: default}
spec: {clusterIP: 198.19.0.10, selector: {app: b}, ports: [{port: 80, targetPort: 7000}]}
",
        )?;
        agent.wait_workloads(4)?;
        // Pod cgroups exist before the agent maps them; wait until all are mapped.
        let mesh = Self {
            agent,
            pods,
            node,
            tb,
        };
        Ok(mesh)
    }

    fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name() == name)
            .expect("pod exists")
    }

    fn fast_path_bytes(&self, src: &str, dst: &str) -> Result<f64> {
        self.agent.metric(
            "weft_tcp_fast_path_bytes_total",
            &[("source_workload", src), ("destination_workload", dst)],
        )
    }

    /// `src` sends 1 MiB to the echo server at `to` (pod `dst`), intact, socket to socket.
    fn transfer_on_the_fast_path(&self, src: &str, dst: &str, to: SocketAddr) -> Result<()> {
        let t = self.pod(src).transfer(to, MIB, 1)?;
        ensure!(t.all_ok(), "{src} → {dst}: {t:?}");
        eventually(Duration::from_secs(5), || {
            ensure!(
                self.fast_path_bytes(src, dst)? >= MIB as f64,
                "{src} → {dst} did not take the socket fast path"
            );
            Ok(())
        })
    }

    /// Waits until the agent has published two fresh snapshots of the kernel counters, so that
    /// a following read reflects everything that happened before this call.
    fn settle(&self) -> Result<()> {
        let syncs = || {
            self.agent
                .metric("weft_config_syncs_total", &[("result", "ok")])
        };
        let start = syncs()?;
        eventually(Duration::from_secs(5), || {
            let now = syncs()?;
            ensure!(now >= start + 2.0, "agent syncs {start} → {now}");
            Ok(())
        })
    }

    fn event(&self, event: &str) -> Result<f64> {
        self.agent
            .metric("weft_datapath_events_total", &[("event", event)])
    }

    /// All flows (live and recent) from `src` to `dst` workload.
    fn flows(&self, src: &str, dst: &str) -> Result<Vec<Value>> {
        let f = self.agent.flows()?;
        let rows = f["live"]
            .as_array()
            .into_iter()
            .chain(f["recent"].as_array())
            .flatten();
        Ok(rows
            .filter(|r| {
                r["src"]["workload"] == format!("default/{src}")
                    && r["dst"]["workload"] == format!("default/{dst}")
            })
            .cloned()
            .collect())
    }
}

fn port(addr: SocketAddr) -> u16 {
    addr.port()
}

#[test]
fn fast_path_moves_small_and_large_transfers_byte_exact_both_ways() -> Result<()> {
    let m = Mesh::new("fastpath-bytes", &[])?;
    let server = m.pod("b").serve(ServeMode::Echo, 7000)?;

    let small = m.pod("a").transfer(server.addr(), 1024, 1)?;
    ensure!(small.all_ok(), "small transfer: {small:?}");
    let large = m.pod("a").transfer(server.addr(), 100 * MIB, 1)?;
    ensure!(large.all_ok(), "100 MiB transfer: {large:?}");
    ensure!(
        large.bytes_verified == 100 * MIB,
        "echo verified {} bytes",
        large.bytes_verified
    );

    // Kernel evidence: the payload went socket to socket, both directions, and did not cross
    // the veths (TC saw only handshakes and ACK-free control packets, far below the payload).
    eventually(Duration::from_secs(5), || {
        let fast = m.fast_path_bytes("a", "b")?;
        ensure!(
            fast >= 2.0 * (100 * MIB + 1024) as f64,
            "fast-path bytes {fast}"
        );
        Ok(())
    })?;
    let veth_bytes = m.agent.metric(
        "weft_interface_bytes_total",
        &[("interface", m.pod("b").host_veth())],
    )?;
    ensure!(
        veth_bytes < (MIB as f64),
        "payload crossed the veth: {veth_bytes} bytes seen by TC"
    );
    // The TC counters know which pod each veth serves (from the pod's source address).
    let labelled = m.agent.metric(
        "weft_interface_packets_total",
        &[("interface", m.pod("b").host_veth()), ("pod", "default/b")],
    )?;
    ensure!(labelled > 0.0, "the veth of b is not labelled with its pod");
    let flows = eventually(Duration::from_secs(5), || {
        let f = m.flows("a", "b")?;
        ensure!(f.len() >= 2, "flows a→b: {f:?}");
        Ok(f)
    })?;
    for f in &flows {
        ensure!(
            f["verdict"] == "FAST" && f["fast_path"] == true,
            "flow not fast: {f}"
        );
    }
    let big = flows
        .iter()
        .find(|f| f["bytes_to_dst"] == 100 * MIB)
        .expect("the 100 MiB flow is listed");
    ensure!(big["bytes_to_src"] == 100 * MIB, "bytes back: {big}");
    Ok(())
}

#[test]
fn many_concurrent_connections_half_close_and_reset() -> Result<()> {
    let m = Mesh::new("fastpath-many", &[])?;
    let mut server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    // The echo server half-closes after the client's EOF: every connection exercises half-close.
    let many = m.pod("a").transfer(server.addr(), 2 * MIB, 64)?;
    ensure!(many.all_ok(), "64 concurrent connections: {many:?}");
    let reset = m.pod("a").reset(server.addr())?;
    ensure!(reset.ok, "reset client: {reset:?}");
    ensure!(server.is_running(), "server died after a reset");
    let after = m.pod("c").transfer(server.addr(), MIB, 4)?;
    ensure!(after.all_ok(), "transfers after a reset: {after:?}");
    ensure!(
        m.event("msg_fast_path")? > 0.0,
        "no message took the fast path"
    );
    Ok(())
}

#[test]
fn service_vip_is_load_balanced_at_connect_time() -> Result<()> {
    let m = Mesh::new("service-lb", &[])?;
    let _b = m.pod("b").serve(ServeMode::Echo, 7000)?;
    let _c = m.pod("c").serve(ServeMode::Echo, 7000)?;
    // Make c a second backend of service b.
    let manifests: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            m.pod(n)
                .manifest(&[("app", if *n == "c" { "b" } else { n })], n)
        })
        .chain([m.pod("u").manifest_unmeshed(&[("app", "u")], "u")])
        .collect();
    m.agent.apply("pods.yaml", &manifests.join("\n---\n"))?;
    eventually(Duration::from_secs(5), || {
        let dump = m.agent.json("/config_dump")?;
        let backends = dump["node"]["services"][0]["backends"]
            .as_array()
            .map_or(0, Vec::len);
        ensure!(backends == 2, "backends: {backends}");
        Ok(())
    })?;
    let vip: SocketAddr = "198.19.0.10:80".parse()?;
    // The application sees the address it asked for: getpeername() answers with the VIP.
    let c = m.pod("a").try_connect(vip, Duration::from_secs(2))?;
    ensure!(
        c.ok && c.peer.as_deref() == Some("198.19.0.10:80"),
        "getpeername after a VIP connect: {c:?}"
    );
    for _ in 0..30 {
        let r = m.pod("a").transfer(vip, 1024, 1)?;
        ensure!(r.all_ok(), "via the VIP: {r:?}");
    }
    let opened = |dst| {
        m.agent.metric(
            "weft_tcp_connections_opened_total",
            &[("source_workload", "a"), ("destination_workload", dst)],
        )
    };
    let (to_b, to_c) = eventually(Duration::from_secs(5), || {
        let (b, c) = (opened("b")?, opened("c")?);
        ensure!(b + c >= 30.0, "connections opened a→b {b}, a→c {c}");
        Ok((b, c))
    })?;
    // 30 uniform picks: each backend gets at least 3 with probability > 0.9999.
    ensure!(to_b >= 3.0 && to_c >= 3.0, "unbalanced: b={to_b} c={to_c}");
    let via = m.flows("a", "b")?;
    ensure!(
        via[0]["service"] == "default/b:80",
        "service recorded: {}",
        via[0]
    );
    Ok(())
}

#[test]
fn deny_policy_fails_connect_with_eperm_and_is_reverted_live() -> Result<()> {
    let m = Mesh::new("policy-deny", &[])?;
    let server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    m.agent.apply(
        "policy.yaml",
        r"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: b-from-a-only, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  action: ALLOW
  rules:
  - from: [{source: {serviceAccounts: [a]}}]
",
    )?;
    eventually(Duration::from_secs(5), || {
        let r = m
            .pod("c")
            .try_connect(server.addr(), Duration::from_secs(2))?;
        ensure!(
            !r.ok && r.errno == Some(libc::EPERM),
            "c→b should fail with EPERM: {r:?}"
        );
        Ok(())
    })?;
    let allowed = m.pod("a").transfer(server.addr(), MIB, 2)?;
    ensure!(allowed.all_ok(), "a→b is allowed: {allowed:?}");
    // The denial is visible: counted per workload pair and listed with the rule.
    eventually(Duration::from_secs(5), || {
        let denied = m.agent.metric(
            "weft_tcp_connections_denied_total",
            &[("source_workload", "c"), ("destination_workload", "b")],
        )?;
        ensure!(denied >= 1.0, "denied counter {denied}");
        let flows = m.agent.flows()?;
        let row = flows["denied"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["src"]["workload"] == "default/c");
        let row = row.ok_or_else(|| anyhow::anyhow!("no denied row: {flows}"))?;
        ensure!(
            row["reason"]
                .as_str()
                .unwrap_or("")
                .contains("default/b-from-a-only"),
            "reason: {row}"
        );
        // The agent logs it as a structured event too.
        ensure!(
            m.agent.stderr().contains("connection denied"),
            "no denial event in the agent log"
        );
        Ok(())
    })?;
    // A process in a container cgroup below pod c's (as a container runtime places it) is c,
    // from its very first connection: a container cgroup made just now, which no agent pass
    // has seen, is identified through its pod's cgroup in the kernel.
    for n in 0..5 {
        let r = m.pod("c").try_connect_from(
            &format!("new-{n}"),
            server.addr(),
            Duration::from_secs(2),
        )?;
        ensure!(
            !r.ok && r.errno == Some(libc::EPERM),
            "the first connection of a new container of c → b should fail with EPERM: {r:?}"
        );
    }
    let r = m
        .pod("a")
        .try_connect_from("app", server.addr(), Duration::from_secs(2))?;
    ensure!(r.ok, "a container of a → b is allowed: {r:?}");
    // Deleting the policy reverts live.
    m.agent.delete("policy.yaml")?;
    eventually(Duration::from_secs(5), || {
        let r = m
            .pod("c")
            .try_connect(server.addr(), Duration::from_secs(2))?;
        ensure!(r.ok, "c→b after the policy is gone: {r:?}");
        Ok(())
    })?;
    Ok(())
}

#[test]
fn unmeshed_pod_and_node_processes_are_untouched() -> Result<()> {
    let m = Mesh::new("unmeshed", &[])?;
    let server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    let from_u = m.pod("u").transfer(server.addr(), 4 * MIB, 2)?;
    ensure!(from_u.all_ok(), "unmeshed client: {from_u:?}");
    // Service addresses work for every pod, as kube-proxy's do; only the mesh verdicts and the
    // fast path are reserved for meshed pods.
    let via_vip = m.pod("u").transfer("198.19.0.10:80".parse()?, MIB, 1)?;
    ensure!(
        via_vip.all_ok(),
        "unmeshed client through the service VIP: {via_vip:?}"
    );
    // Traffic from the node's own namespace (not in any pod cgroup) is not seen at all.
    let from_node = m.node.run(
        Duration::from_mins(1),
        testbed::workload_bin(),
        [
            "transfer",
            "--connect",
            &server.addr().to_string(),
            "--bytes",
            "1048576",
            "--conns",
            "1",
        ],
    )?;
    ensure!(from_node.success(), "node process: {}", from_node.stderr);
    m.settle()?;
    let f = m.agent.flows()?;
    for row in f["live"]
        .as_array()
        .into_iter()
        .chain(f["recent"].as_array())
        .flatten()
    {
        ensure!(
            row["fast_path"] != true || row["src"]["workload"] != "default/u",
            "unmeshed flow fast-pathed: {row}"
        );
    }
    ensure!(
        m.fast_path_bytes("unmeshed", "b")? == 0.0,
        "fast path used from outside the mesh"
    );
    // No stray entries: the unmeshed pod's flows are inbound PASS rows for b at most.
    ensure!(
        m.flows("u", "b")?.iter().all(|r| r["verdict"] == "PASS"),
        "unmeshed flow with a mesh verdict"
    );
    let _ = port(server.addr());
    Ok(())
}

#[test]
fn kill_switch_turns_the_fast_path_off_live_without_breaking_connections() -> Result<()> {
    let m = Mesh::new("kill-switch", &[])?;
    let server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    let hold = m.pod("a").hold(
        server.addr(),
        16,
        Duration::from_millis(20),
        Duration::from_mins(1),
    )?;
    eventually(Duration::from_secs(5), || {
        ensure!(
            m.event("msg_fast_path")? > 0.0,
            "held connections not on the fast path yet"
        );
        Ok(())
    })?;
    let kill = |state: &str| -> Result<()> {
        let out = std::process::Command::new(testbed::weft_bin())
            .args([
                "fastpath",
                state,
                "--bpffs-dir",
                &m.agent.bpffs_dir.display().to_string(),
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "weft fastpath {state}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    kill("off")?;
    eventually(Duration::from_secs(5), || {
        ensure!(
            m.event("msg_stack_fast_path_off")? > 0.0,
            "no message saw the kill switch"
        );
        Ok(())
    })?;
    m.settle()?;
    let fast_before = m.event("msg_fast_path")?;
    std::thread::sleep(Duration::from_millis(500));
    let fresh = m.pod("c").transfer(server.addr(), 2 * MIB, 2)?;
    ensure!(
        fresh.all_ok(),
        "new connections with the fast path off: {fresh:?}"
    );
    m.settle()?;
    ensure!(
        m.event("msg_fast_path")? == fast_before,
        "messages still redirected with the kill switch on"
    );
    let status = m.agent.status()?;
    ensure!(status["fast_path_killed"] == true, "status: {status}");
    kill("on")?;
    let report = hold.finish()?;
    ensure!(
        report.broken == 0 && report.rounds > 10,
        "held connections: {report:?}"
    );
    // Released: new connections use the fast path again.
    let again = m.pod("c").transfer(server.addr(), MIB, 1)?;
    ensure!(again.all_ok(), "{again:?}");
    eventually(Duration::from_secs(5), || {
        ensure!(
            m.event("msg_fast_path")? > fast_before,
            "fast path not back after release"
        );
        Ok(())
    })?;
    Ok(())
}

#[test]
fn full_sockhash_falls_back_to_the_normal_stack() -> Result<()> {
    let m = Mesh::new("map-full", &["--sockhash-capacity", "4"])?;
    let server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    let r = m.pod("a").transfer(server.addr(), 2 * MIB, 16)?;
    ensure!(r.all_ok(), "with a full sockhash: {r:?}");
    m.settle()?;
    ensure!(
        m.event("sockhash_insert_failed")? > 0.0,
        "the map never filled up"
    );
    Ok(())
}

/// The agent killed with SIGKILL and restarted ten times in a row while 220 fast-path
/// connections exchange checked messages: none breaks or loses a byte, connections made while
/// no agent runs work, every restart adopts the pinned datapath, the counters continue.
#[test]
fn agent_kill_9_and_restart_ten_times_breaks_no_connection_and_counters_continue() -> Result<()> {
    let mut m = Mesh::new("agent-restart", &[])?;
    let server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    let hold = m.pod("a").hold(
        server.addr(),
        220,
        Duration::from_millis(50),
        Duration::from_mins(2),
    )?;
    let opened_before = eventually(Duration::from_secs(10), || {
        let n = m.agent.metric(
            "weft_tcp_connections_opened_total",
            &[("source_workload", "a"), ("destination_workload", "b")],
        )?;
        ensure!(n >= 220.0, "opened {n}");
        Ok(n)
    })?;
    let bytes_before = m.fast_path_bytes("a", "b")?;
    for round in 1..=10 {
        m.agent.kill9();
        // Connections keep working with no agent at all.
        std::thread::sleep(Duration::from_millis(300));
        let during = m.pod("c").transfer(server.addr(), MIB, 2)?;
        ensure!(
            during.all_ok(),
            "round {round}: new connections while the agent is down: {during:?}"
        );
        let node = &m.node;
        m.agent.restart(node)?;
        let status = m.agent.status()?;
        ensure!(
            status["startup"] == "adopted",
            "round {round}: a restart must adopt the pinned datapath: {status}"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let report = hold.finish()?;
    ensure!(
        report.conns == 220 && report.broken == 0,
        "held connections across ten kill -9: {report:?}"
    );
    m.settle()?;
    let bytes_after = m.fast_path_bytes("a", "b")?;
    ensure!(
        bytes_after > bytes_before,
        "counters did not continue: {bytes_before} → {bytes_after}"
    );
    let opened_after = m.agent.metric(
        "weft_tcp_connections_opened_total",
        &[("source_workload", "a"), ("destination_workload", "b")],
    )?;
    ensure!(opened_after >= opened_before, "opened went backwards");
    Ok(())
}

/// The generation record of the pinned datapath in `dir`.
fn pinned_generation(dir: &std::path::Path) -> Result<[u8; 40]> {
    let data = aya::maps::MapData::from_pin(dir.join("generation"))?;
    let map: aya::maps::Array<_, [u8; 40]> = aya::maps::Map::from_map_data(data)?.try_into()?;
    Ok(map.get(&0, 0)?)
}

fn set_pinned_generation(dir: &std::path::Path, value: [u8; 40]) -> Result<()> {
    let data = aya::maps::MapData::from_pin(dir.join("generation"))?;
    let mut map: aya::maps::Array<_, [u8; 40]> = aya::maps::Map::from_map_data(data)?.try_into()?;
    Ok(map.set(0, value, 0)?)
}

/// An agent of another build (its programs changed), then one with another map layout (a
/// sockhash of another capacity), each take over the pins of the one before while 100 fast-path
/// connections exchange checked messages: none breaks, new connections take the new fast path,
/// the old sockhash stays pinned exactly as long as its connections live.
#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, step by step")]
fn upgrades_to_another_build_and_map_layout_break_no_connection() -> Result<()> {
    let mut m = Mesh::new("agent-upgrade", &[])?;
    let dir = m.agent.bpffs_dir.clone();
    let server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    let hold = m.pod("a").hold(
        server.addr(),
        100,
        Duration::from_millis(50),
        Duration::from_mins(2),
    )?;
    eventually(Duration::from_secs(10), || {
        let n = m.agent.metric(
            "weft_tcp_connections_opened_total",
            &[("source_workload", "a"), ("destination_workload", "b")],
        )?;
        ensure!(n >= 100.0, "opened {n}");
        Ok(())
    })?;
    let this_build = pinned_generation(&dir)?;
    let bytes_before = m.fast_path_bytes("a", "b")?;

    // 1. The pins say another build wrote them: every program is replaced behind the same links.
    m.agent.kill9();
    let mut older = this_build;
    older[8..].fill(0xab);
    set_pinned_generation(&dir, older)?;
    let (progs_before, links_before) = (pinned_program_ids(&dir)?, pinned_link_ids(&dir)?);
    let node = &m.node;
    m.agent.restart(node)?;
    ensure!(
        m.agent.status()?["startup"] == "upgraded",
        "another build's pins must be upgraded: {}",
        m.agent.status()?
    );
    eventually(Duration::from_secs(5), || {
        ensure!(
            pinned_generation(&dir)? == this_build,
            "generation not recorded yet"
        );
        Ok(())
    })?;
    let (progs_after, links_after) = (pinned_program_ids(&dir)?, pinned_link_ids(&dir)?);
    ensure!(
        progs_after.iter().all(|id| !progs_before.contains(id)),
        "every program must be new: {progs_before:?} → {progs_after:?}"
    );
    ensure!(
        links_after == links_before,
        "the links stay, switched: {links_before:?} → {links_after:?}"
    );
    for (link, prog) in pinned_link_programs(&dir)? {
        ensure!(
            progs_after.contains(&prog),
            "link {link} still runs the old program {prog}"
        );
    }
    let new_conn = m.pod("c").transfer(server.addr(), MIB, 2)?;
    ensure!(new_conn.all_ok(), "after the upgrade: {new_conn:?}");

    // 2. Another sockhash capacity: the old sockhash is retired with its 100 sockets.
    m.agent
        .restart_with(node, &["--sockhash-capacity", "8192"])?;
    let status = m.agent.status()?;
    ensure!(status["startup"] == "upgraded", "{status}");
    eventually(Duration::from_secs(5), || {
        let s = m.agent.status()?;
        ensure!(
            s["retired_sockets"].as_u64() >= Some(100),
            "the retired sockhash keeps the held connections: {s}"
        );
        Ok(())
    })?;
    let seen: Vec<Value> = m
        .flows("c", "b")?
        .iter()
        .map(|f| f["src"]["port"].clone())
        .collect();
    let after = m.pod("c").transfer(server.addr(), MIB, 2)?;
    ensure!(after.all_ok(), "after the layout change: {after:?}");
    m.settle()?;
    let new_flows: Vec<Value> = m
        .flows("c", "b")?
        .into_iter()
        .filter(|f| !seen.contains(&f["src"]["port"]))
        .collect();
    ensure!(
        new_flows.len() == 2
            && new_flows
                .iter()
                .all(|f| f["fast_bytes"].as_u64() == Some(2 * MIB)),
        "new connections take the new fast path: {new_flows:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let report = hold.finish()?;
    ensure!(
        report.conns == 100 && report.broken == 0 && report.rounds > 20,
        "held connections across both upgrades: {report:?}"
    );
    eventually(Duration::from_secs(10), || {
        ensure!(
            !dir.join("retired").exists(),
            "the retired sockhash is unpinned once its connections closed"
        );
        Ok(())
    })?;
    m.settle()?;
    let bytes_after = m.fast_path_bytes("a", "b")?;
    ensure!(
        bytes_after > bytes_before,
        "counters continue across upgrades: {bytes_before} → {bytes_after}"
    );
    Ok(())
}

/// Program ids of everything pinned under the node's bpffs directory.
fn pinned_program_ids(dir: &std::path::Path) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir.join("progs"))? {
        let info = aya::programs::ProgramInfo::from_pin(e?.path())?;
        ids.push(info.id());
    }
    Ok(ids)
}

/// Link ids (cgroup and tcx attachments) of everything pinned under `dir/links`.
fn pinned_link_ids(dir: &std::path::Path) -> Result<Vec<u32>> {
    Ok(pinned_link_programs(dir)?
        .into_iter()
        .map(|(link, _)| link)
        .collect())
}

/// (link id, id of the program it runs) of everything pinned under `dir/links`.
fn pinned_link_programs(dir: &std::path::Path) -> Result<Vec<(u32, u32)>> {
    let mut ids = Vec::new();
    for sub in ["links", "links/tc"] {
        for e in std::fs::read_dir(dir.join(sub))? {
            let path = e?.path();
            if path.is_dir() {
                continue;
            }
            let link: aya::programs::links::FdLink =
                aya::programs::links::PinnedLink::from_pin(&path)?.into();
            let info = link.info()?;
            ids.push((info.id(), info.program_id()));
        }
    }
    Ok(ids)
}

#[test]
fn uninstall_leaves_no_program_link_map_pin_or_namespace() -> Result<()> {
    let mut m = Mesh::new("uninstall", &[])?;
    let server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    ensure!(m.pod("a").transfer(server.addr(), MIB, 2)?.all_ok());
    let dir = m.agent.bpffs_dir.clone();
    let ids = pinned_program_ids(&dir)?;
    let link_ids = pinned_link_ids(&dir)?;
    // sock_ops, connect4/6 and getpeername4/6 on the node cgroup, sock_ops on the agent's
    // cgroup (the L7 engine's legs), and two TC links per pod veth.
    ensure!(
        link_ids.len() == 6 + 2 * m.pods.len(),
        "pinned links: {link_ids:?}"
    );
    ensure!(
        ids.len() == mesh_common::program_names::ALL.len(),
        "pinned programs: {ids:?}"
    );
    let node = &m.node;
    m.agent.uninstall(node)?;
    ensure!(!dir.exists(), "{} still exists", dir.display());
    eventually(Duration::from_secs(10), || {
        let loaded: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .collect();
        let left: Vec<&u32> = ids.iter().filter(|id| loaded.contains(id)).collect();
        ensure!(
            left.is_empty(),
            "programs still loaded after uninstall: {left:?}"
        );
        let links: Vec<u32> = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .map(|l| l.id())
            .collect();
        let left: Vec<&u32> = link_ids.iter().filter(|id| links.contains(id)).collect();
        ensure!(
            left.is_empty(),
            "links (cgroup or TC attachments) still present: {left:?}"
        );
        Ok(())
    })?;
    // Nothing attached to the node cgroup any more: traffic still flows, unmeshed.
    let after = m.pod("a").transfer(server.addr(), MIB, 1)?;
    ensure!(after.all_ok(), "traffic after uninstall: {after:?}");
    drop(server);
    let Mesh {
        agent,
        pods,
        node,
        tb,
    } = m;
    drop((agent, pods, node));
    let left = tb.teardown()?;
    if !left.is_empty() {
        bail!("left behind: {left:?}");
    }
    Ok(())
}

#[test]
fn metrics_are_scraped_over_tcp_from_a_pod_like_prometheus() -> Result<()> {
    // The node's bridge address is reachable from its pods, as a node IP is in a cluster.
    let tb = Testbed::new("metrics-tcp")?;
    let node = tb.node("n1")?;
    let scraper = node.pod("prometheus")?;
    let addr = format!("{}:9090", node.bridge_ip());
    let agent = Agent::start(&node, &["--metrics-addr", &addr])?;
    agent.apply(
        "pods.yaml",
        &scraper.manifest_unmeshed(&[("app", "prometheus")], "prometheus"),
    )?;
    agent.wait_workloads(1)?;
    let url = format!("http://{addr}/metrics");
    let out = scraper.run(
        Duration::from_secs(20),
        "curl",
        ["-sS", "--max-time", "5", "-D", "-", url.as_str()],
    )?;
    ensure!(out.success(), "curl: {}", out.stderr);
    ensure!(
        out.stdout.starts_with("HTTP/1.1 200"),
        "status: {}",
        out.stdout.lines().next().unwrap_or("")
    );
    ensure!(
        out.stdout
            .contains("# TYPE weft_tcp_connections_opened counter"),
        "no weft metrics: {}",
        out.stdout
    );
    ensure!(
        out.stdout.contains("weft_workloads 1"),
        "workload gauge missing"
    );
    ensure!(
        out.stdout.trim_end().ends_with("# EOF"),
        "not OpenMetrics text"
    );
    Ok(())
}

#[test]
fn default_deny_namespaces_and_dry_run_policies_in_the_kernel() -> Result<()> {
    let m = Mesh::new("default_deny_dry_run", &[])?;
    let server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    let connect = |from: &str| {
        m.pod(from)
            .try_connect(server.addr(), Duration::from_secs(2))
    };
    ensure!(connect("a")?.ok, "allowed before any policy");

    // The namespace becomes default-deny: b is refused to everyone, at connect().
    m.agent.apply(
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {weft.dev/default-deny: 'true'}}\n",
    )?;
    eventually(Duration::from_secs(5), || {
        let r = connect("a")?;
        ensure!(r.errno == Some(libc::EPERM), "{r:?}");
        Ok(())
    })?;
    // An ALLOW policy opens b to a only.
    m.agent.apply(
        "allow.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {name: b-from-a, namespace: default}\n\
         spec:\n  selector: {matchLabels: {app: b}}\n  rules: [{from: [{source: {serviceAccounts: [a]}}]}]\n",
    )?;
    eventually(Duration::from_secs(5), || {
        ensure!(connect("a")?.ok, "a is allowed");
        Ok(())
    })?;
    ensure!(
        connect("c")?.errno == Some(libc::EPERM),
        "c is still refused"
    );

    // A dry-run DENY of a: a still connects; the would-be denial is counted and listed.
    m.agent.apply(
        "audit.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {name: audit-a, namespace: default}\n\
         spec:\n  selector: {matchLabels: {app: b}}\n  action: DENY\n  dryRun: true\n  \
         rules: [{from: [{source: {serviceAccounts: [a]}}]}]\n",
    )?;
    eventually(Duration::from_secs(5), || {
        ensure!(connect("a")?.ok, "a is allowed under a dry-run policy");
        ensure!(
            m.event("dry_run_would_deny")? >= 1.0,
            "no would-deny counted"
        );
        Ok(())
    })?;
    eventually(Duration::from_secs(5), || {
        let flows = m.agent.flows()?;
        let audit = flows["denied"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["verdict"] == "AUDIT");
        let Some(audit) = audit else {
            bail!("no AUDIT row in {}", flows["denied"]);
        };
        ensure!(
            audit["reason"]
                .as_str()
                .is_some_and(|r| r.contains("audit-a") && r.contains("dry run")),
            "{audit}"
        );
        Ok(())
    })?;
    drop(m.tb);
    Ok(())
}

/// Runs a Python script inside `pod` (`CPython` from the machine: a program nobody here wrote).
fn python(pod: &Pod, script: &str, args: &[&str]) -> Result<testbed::Finished> {
    let mut command = vec!["-c", script];
    command.extend_from_slice(args);
    pod.run(Duration::from_secs(20), "python3", command)
}

/// An `AF_INET6` client connecting to `::ffff:<ip>`: prints `OK <getpeername>` after an echo of
/// 1 MiB came back intact, or `ERRNO <n>`.
const V6_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(("::ffff:" + sys.argv[1], int(sys.argv[2])))
except OSError as e:
    print("ERRNO", e.errno); sys.exit(0)
peer = s.getpeername()
data = bytes(range(256)) * 4096
s.sendall(data); s.shutdown(socket.SHUT_WR)
got = b""
while True:
    d = s.recv(65536)
    if not d: break
    got += d
print("OK" if got == data else "BAD %d" % len(got), peer[0], peer[1])
"#;

/// An echo server on `[::]` (dual stack, `AF_INET6`: the default of many servers), for one
/// connection.
const V6_ECHO_SERVER: &str = r#"
import socket, sys
l = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("::", int(sys.argv[1]))); l.listen(8)
print("listening", flush=True)
c, _ = l.accept()
while True:
    d = c.recv(65536)
    if not d: break
    c.sendall(d)
c.close()
"#;

/// A UDP echo server (a DNS server's shape: one datagram in, one out), forever.
const UDP_ECHO_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    d, peer = s.recvfrom(65535)
    s.sendto(d, peer)
"#;

/// Sends `n` datagrams of 512 random bytes one at a time; prints `OK <answered> <lost>`, where
/// answered counts the replies that came back byte for byte from the address asked.
const UDP_CLIENT: &str = r#"
import os, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
answered = lost = 0
for _ in range(n):
    d = os.urandom(512)
    s.sendto(d, (host, port))
    try:
        got, peer = s.recvfrom(65535)
    except socket.timeout:
        lost += 1
        continue
    if got == d and peer == (host, port):
        answered += 1
print("OK", answered, lost)
"#;

#[test]
fn udp_between_meshed_pods_passes_untouched_and_is_counted() -> Result<()> {
    const DATAGRAMS: u32 = 300;
    let m = Mesh::new("udp", &[])?;
    let server = m
        .pod("b")
        .spawn("python3", ["-c", UDP_ECHO_SERVER, "5353"])?;
    server.wait_for_line(Duration::from_secs(10), |l| l == "listening")?;
    let b_ip = m.pod("b").ip().to_string();
    let done = python(
        m.pod("a"),
        UDP_CLIENT,
        &[&b_ip, "5353", &DATAGRAMS.to_string()],
    )?;
    ensure!(done.status.success(), "python: {}", done.stderr);
    ensure!(
        done.stdout.trim() == format!("OK {DATAGRAMS} 0"),
        "datagrams a → b → a: {} (want every one answered intact)",
        done.stdout.trim()
    );
    // Counted by the TC programs on both veths, exactly: each datagram left a and entered b (and
    // back), with its 8-byte UDP, 20-byte IPv4 and 14-byte Ethernet headers; nothing else in
    // these namespaces sends IPv4 UDP.
    let wire = f64::from(DATAGRAMS) * f64::from(512 + 8 + 20 + 14);
    eventually(Duration::from_secs(5), || {
        for (pod, direction) in [
            ("a", "from_pod"),
            ("b", "to_pod"),
            ("b", "from_pod"),
            ("a", "to_pod"),
        ] {
            let labels = [
                ("interface", m.pod(pod).host_veth()),
                ("direction", direction),
            ];
            let packets = m
                .agent
                .metric("weft_interface_udp_packets_total", &labels)?;
            let bytes = m.agent.metric("weft_interface_udp_bytes_total", &labels)?;
            ensure!(
                packets == f64::from(DATAGRAMS) && bytes == wire,
                "UDP on the veth of {pod}, {direction}: {packets} packets, {bytes} bytes"
            );
        }
        Ok(())
    })?;
    // UDP is never a TCP flow: nothing in the flow table, nothing denied.
    ensure!(
        m.flows("a", "b")?.is_empty(),
        "flows a → b: {:?}",
        m.flows("a", "b")?
    );
    Ok(())
}

/// Reads a connection to its end and prints how many bytes came, then closes.
const SINK_SERVER: &str = r#"
import socket, sys
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", int(sys.argv[1]))); l.listen(8)
print("listening", flush=True)
c, _ = l.accept()
n = 0
while True:
    d = c.recv(65536)
    if not d: break
    n += len(d)
c.close()
print("got", n, flush=True)
"#;

/// Sends `argv[3]` bytes, half-closes and waits for the server's close.
const SEND_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"x" * int(sys.argv[3])); s.shutdown(socket.SHUT_WR)
while s.recv(65536): pass
s.close()
print("sent", sys.argv[3])
"#;

#[test]
fn off_the_fast_path_the_flow_table_counts_payload_bytes_exactly() -> Result<()> {
    // The mesh as users get it here: the socket fast path off (the kernel's self-test), so the
    // counts come from the TCP stack's counters at close, which also count SYN and FINs.
    let m = Mesh::with_kernel_default("exact-bytes")?;
    let server = m.pod("b").spawn("python3", ["-c", SINK_SERVER, "7300"])?;
    server.wait_for_line(Duration::from_secs(10), |l| l == "listening")?;
    let b_ip = m.pod("b").ip().to_string();
    let sent = python(m.pod("a"), SEND_CLIENT, &[&b_ip, "7300", &MIB.to_string()])?;
    ensure!(sent.status.success(), "client: {}", sent.stderr);
    server.wait_for_line(Duration::from_secs(10), |l| l == format!("got {MIB}"))?;
    eventually(Duration::from_secs(5), || {
        let rows = m.flows("a", "b")?;
        let row = rows
            .iter()
            .find(|r| r["dst"]["port"] == 7300 && r["state"] == "closed")
            .cloned()
            .with_context(|| format!("no closed a → b:7300 flow: {rows:?}"))?;
        ensure!(row["fast_bytes"] == 0, "took the fast path: {row}");
        ensure!(
            row["bytes_to_dst"] == MIB && row["bytes_to_src"] == 0,
            "payload a → b is {MIB} bytes and b sent none: {row}"
        );
        let metric = m.agent.metric(
            "weft_tcp_sent_bytes_total",
            &[
                ("source_workload", "a"),
                ("destination_workload", "b"),
                ("direction", "to_destination"),
            ],
        )?;
        ensure!(metric == MIB as f64, "tcp_sent_bytes to b: {metric}");
        Ok(())
    })?;
    Ok(())
}

/// `weft explain` as a user runs it, against the test's agent.
fn weft_explain(m: &Mesh, src: &str, dst: &str, json: bool) -> Result<String> {
    let mut command = std::process::Command::new(testbed::weft_bin());
    command
        .args(["explain", src, dst, "--admin-socket"])
        .arg(&m.agent.socket);
    if json {
        command.arg("--json");
    }
    let out = command.output()?;
    ensure!(
        out.status.success(),
        "weft explain {src} {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn explain_predicts_what_the_kernel_does_with_a_connection() -> Result<()> {
    let m = Mesh::new("explain", &[])?;
    let server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    m.agent.apply(
        "policy.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {name: b-from-c, namespace: default}\n\
         spec:\n  selector: {matchLabels: {app: b}}\n  rules: [{from: [{source: {serviceAccounts: [c]}}]}]\n",
    )?;
    // What explain says, through the service and by pod address, for a refused and an
    // allowed client; then what the kernel does with the same connections.
    let verdict = |src: &str, dst: &str| -> Result<Value> {
        let v: Value = serde_json::from_str(&weft_explain(&m, src, dst, true)?)?;
        Ok(v["paths"][0].clone())
    };
    eventually(Duration::from_secs(5), || {
        let denied = verdict("default/a", "default/b:80")?;
        ensure!(
            denied["verdict"] == "DENY"
                && denied["decided_by"]
                    .as_str()
                    .is_some_and(|d| d.contains("b-from-c")),
            "a → b: {denied}"
        );
        Ok(())
    })?;
    let allowed = verdict("default/c", &server.addr().to_string())?;
    ensure!(
        allowed["verdict"] == "FAST"
            && allowed["path"]
                .as_str()
                .is_some_and(|p| p.contains("socket fast path")),
        "c → b: {allowed}"
    );
    let refused = m.pod("a").transfer(server.addr(), 1024, 1)?;
    ensure!(refused.ok == 0, "a reached b: {refused:?}");
    m.transfer_on_the_fast_path("c", "b", server.addr())?;
    // The text a user reads names the policy, and a mistyped name gets a clear answer.
    let text = weft_explain(&m, "default/a", "b.default", false)?;
    ensure!(
        text.contains("verdict  DENY") && text.contains("b-from-c") && text.contains("EPERM"),
        "weft explain: {text}"
    );
    let wrong = std::process::Command::new(testbed::weft_bin())
        .args(["explain", "default/a", "default/nope:80", "--admin-socket"])
        .arg(&m.agent.socket)
        .output()?;
    ensure!(
        !wrong.status.success()
            && String::from_utf8_lossy(&wrong.stderr).contains("no service or pod default/nope"),
        "unknown destination: {}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    Ok(())
}

#[test]
fn ipv6_sockets_to_v4_mapped_addresses_get_the_same_verdict_and_service_routing() -> Result<()> {
    let m = Mesh::with_kernel_default("v4-mapped")?;
    let _server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    let (b_ip, vip) = (m.pod("b").ip().to_string(), "198.19.0.10");
    // b accepts only service account c.
    m.agent.apply(
        "policy.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {name: b-from-c, namespace: default}\n\
         spec:\n  selector: {matchLabels: {app: b}}\n  rules: [{from: [{source: {serviceAccounts: [c]}}]}]\n",
    )?;
    let v6 = |pod: &str, ip: &str, port: &str| -> Result<String> {
        let done = python(m.pod(pod), V6_CLIENT, &[ip, port])?;
        ensure!(done.status.success(), "python: {}", done.stderr);
        Ok(done.stdout.trim().to_owned())
    };
    eventually(Duration::from_secs(5), || {
        let out = v6("a", &b_ip, "7000")?;
        ensure!(
            out == format!("ERRNO {}", libc::EPERM),
            "a → b over IPv6: {out}"
        );
        Ok(())
    })?;
    // Through the service address too: load-balanced, then refused.
    let out = v6("a", vip, "80")?;
    ensure!(
        out == format!("ERRNO {}", libc::EPERM),
        "a → VIP over IPv6: {out}"
    );
    // The allowed client connects, through the VIP, and getpeername() shows the VIP.
    let out = v6("c", vip, "80")?;
    ensure!(
        out == format!("OK ::ffff:{vip} 80"),
        "c → VIP over IPv6: {out}"
    );
    let out = v6("c", &b_ip, "7000")?;
    ensure!(out.starts_with("OK "), "c → b over IPv6: {out}");
    // Both refusals are in the flow table; the allowed connections too, with their verdict.
    eventually(Duration::from_secs(5), || {
        let f = m.agent.flows()?;
        let denied = f["denied"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["src"]["workload"] == "default/a" && d["dst"]["workload"] == "default/b")
            .cloned()
            .unwrap_or_default();
        ensure!(
            denied["attempts"].as_u64() >= Some(2),
            "denied: {}",
            f["denied"]
        );
        let allowed = m.flows("c", "b")?;
        ensure!(
            allowed.iter().filter(|r| r["verdict"] == "FAST").count() >= 2,
            "c → b flows: {allowed:?}"
        );
        Ok(())
    })?;
    Ok(())
}

#[test]
fn a_dual_stack_listener_and_an_ipv6_client_use_the_socket_fast_path() -> Result<()> {
    let m = Mesh::new("v6-listener", &[])?;
    let server = m
        .pod("b")
        .spawn("python3", ["-c", V6_ECHO_SERVER, "7100"])?;
    server.wait_for_line(Duration::from_secs(10), |l| l == "listening")?;
    let b_ip = m.pod("b").ip().to_string();
    let mut out = String::new();
    eventually(Duration::from_secs(10), || {
        let done = python(m.pod("a"), V6_CLIENT, &[&b_ip, "7100"])?;
        out = done.stdout.trim().to_owned();
        ensure!(
            out.starts_with("OK "),
            "a → [::]:7100: {out} {}; server: {}",
            done.stderr,
            server.stderr()
        );
        Ok(())
    })?;
    drop(server);
    eventually(Duration::from_secs(5), || {
        let rows = m.flows("a", "b")?;
        let row = rows
            .iter()
            .find(|r| r["dst"]["port"] == 7100)
            .cloned()
            .unwrap_or_default();
        ensure!(
            row["fast_path"] == true,
            "a → b:7100 not on the fast path: {rows:?}"
        );
        ensure!(
            m.fast_path_bytes("a", "b")? >= 2.0 * MIB as f64,
            "fast-path bytes"
        );
        Ok(())
    })?;
    Ok(())
}

#[test]
fn pods_use_the_socket_fast_path_only_where_the_kernel_self_test_allows() -> Result<()> {
    let m = Mesh::with_kernel_default("selftest-default")?;
    let status = m.agent.status()?;
    let test = &status["socket_self_test"];
    let passed = test["passed"]
        .as_bool()
        .with_context(|| format!("status has no self-test verdict: {status}"))?;
    let cases: Vec<&str> = test["cases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    ensure!(
        cases == ["redirect", "splice_reader", "blocking_wakeup", "rcvlowat"],
        "self-test cases: {test}"
    );
    ensure!(
        test["cases"][0]["passed"] == true,
        "the redirect itself must work for the test to mean anything: {test}"
    );
    let server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    let t = m.pod("a").transfer(server.addr(), MIB, 2)?;
    ensure!(t.all_ok(), "{t:?}");
    m.settle()?;
    let fast = m.fast_path_bytes("a", "b")?;
    println!("socket self-test: {test}; fast-path bytes a → b: {fast}");
    if passed {
        ensure!(fast >= 2.0 * MIB as f64, "kernel passed, yet no fast path");
    } else {
        ensure!(
            fast == 0.0 && m.agent.status()?["sockhash_entries"] == 0,
            "kernel failed the self-test, yet pods joined the socket fast path"
        );
        // An operator who enables it for a pair gets it.
        m.agent.enable_socket_fast_path()?;
        m.settle()?;
        m.transfer_on_the_fast_path("a", "b", server.addr())?;
    }
    Ok(())
}

/// `--ebpf-log`: off by default (the programs are loaded without their log statements, so the
/// agent's log has none), `debug` forwards each connect verdict, refusal and fast-path join into
/// the agent's log; switching the level upgrades the programs in place under live connections.
#[test]
fn ebpf_log_forwards_the_programs_decisions_and_off_has_none() -> Result<()> {
    let mut m = Mesh::new("ebpf-log", &[])?;
    let server = m.pod("b").serve(ServeMode::Echo, 7000)?;
    m.agent.apply(
        "policy.yaml",
        r"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: b-from-a-only, namespace: default}
spec:
  selector: {matchLabels: {app: b}}
  rules: [{from: [{source: {serviceAccounts: [a]}}]}]
",
    )?;
    let traffic = |m: &Mesh| -> Result<()> {
        eventually(Duration::from_secs(5), || {
            let r = m
                .pod("c")
                .try_connect(server.addr(), Duration::from_secs(2))?;
            ensure!(r.errno == Some(libc::EPERM), "c→b must be refused: {r:?}");
            Ok(())
        })?;
        let t = m.pod("a").transfer(server.addr(), MIB, 2)?;
        ensure!(t.all_ok(), "a→b: {t:?}");
        Ok(())
    };
    traffic(&m)?;
    std::thread::sleep(Duration::from_millis(500));
    let log = m.agent.stderr();
    ensure!(
        !log.contains("weft::kernel"),
        "--ebpf-log off, yet program logs: {log}"
    );

    // Held connections across the switch to debug: the programs are replaced, none breaks.
    let hold = m.pod("a").hold(
        server.addr(),
        20,
        Duration::from_millis(50),
        Duration::from_mins(2),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let node = &m.node;
    m.agent.restart_with(node, &["--ebpf-log", "debug"])?;
    let status = m.agent.status()?;
    ensure!(
        status["startup"] == "upgraded"
            && status["datapath_generation"]
                .as_str()
                .is_some_and(|g| g.ends_with("-log4")),
        "another log level is another generation, upgraded in place: {status}"
    );
    traffic(&m)?;
    let b = m.pod("b").ip();
    let c_refused = format!("to {b}:7000, reason");
    eventually(Duration::from_secs(5), || {
        let log = m.agent.stderr();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("weft::kernel")).collect();
        ensure!(
            lines
                .iter()
                .any(|l| l.contains("connect refused") && l.contains(&c_refused)),
            "no refusal logged: {lines:#?}"
        );
        ensure!(
            lines.iter().any(|l| l.contains("connect: workload")
                && l.contains(&format!("to {b}:7000"))
                && l.contains("verdict 1")),
            "no FAST connect verdict logged: {lines:#?}"
        );
        ensure!(
            lines
                .iter()
                .any(|l| l.contains("joins the socket fast path")),
            "no fast-path join logged: {lines:#?}"
        );
        Ok(())
    })?;
    let report = hold.finish()?;
    ensure!(
        report.broken == 0 && report.rounds > 0,
        "held connections across the switch: {report:?}"
    );
    Ok(())
}
