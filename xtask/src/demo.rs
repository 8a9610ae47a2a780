//! `cargo xtask demo`: a service mesh on one Linux box, explained as it runs.
use std::{
    net::SocketAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use testbed::{ServeMode, Testbed, agent::Agent};

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

fn explain(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

#[allow(
    clippy::too_many_lines,
    reason = "the demo is one linear, narrated script"
)]
pub fn run(weft: &Path, workload: &Path, secs: u64) -> Result<()> {
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
    let mut agent = Agent::start(&node, &[])?;
    println!("    programs pinned under {}", agent.bpffs_dir.display());

    step!("describing the mesh: pods, two services and one policy");
    let pods = [
        frontend.manifest(&[("app", "frontend")], "frontend"),
        catalog.manifest(&[("app", "catalog")], "catalog"),
        payments.manifest(&[("app", "payments")], "payments"),
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
        "FAST: allowed, and the bytes went socket-to-socket inside the kernel (FAST=yes).\n\
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
        "    bytes seen on the pods' veths   {:>12}  (legacy's traffic, plus handshakes)",
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

    step!("status (`weft status`)");
    print!("{}", cli(weft, &agent, &["status"])?);

    step!("cleaning up: uninstalling the datapath and removing the node");
    agent.uninstall(&node)?;
    drop((frontend, catalog, payments, intruder, legacy, node));
    let left = tb.teardown()?;
    ensure!(left.is_empty(), "the demo left something behind: {left:?}");
    println!("    nothing left: no programs, maps, pins, namespaces or cgroups");
    Ok(())
}

fn cli(weft: &Path, agent: &Agent, args: &[&str]) -> Result<String> {
    let out = Command::new(weft)
        .args(args)
        .args(["--admin-socket", &agent.socket.display().to_string()])
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
