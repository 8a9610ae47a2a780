//! Per-leg flow control of the engine's sockets, in its own test binary: the tests measure the
//! host's TCP memory, which other tests running at the same time would move (and they run one
//! at a time here).
//!
//! The engine's legs to local pods (a client's leg, L7 or into the tunnel; an upstream leg) use
//! the kernel's socket fast path, whose
//! ingress redirect has no flow control. Bulk to a pod that reads nothing for a few seconds: the
//! engine sees the bulk on its legs and moves them to the normal stack, so TCP's window (and
//! HTTP/2's inside the tunnel) hold the sender back. Without that, the whole transfer would
//! wait in the destination pod's queue. The host-wide TCP-memory valve must not be what saved
//! the day.
#![allow(
    clippy::cast_precision_loss,
    reason = "metric samples are exact small integers"
)]

use std::{sync::Mutex, time::Duration};

use anyhow::{Context as _, Result, ensure};
use testbed::{
    ServeMode, Testbed,
    agent::{self, Agent},
    http::{HttpGetArgs, HttpServerArgs},
    tcp_memory,
};

/// One measurement of the host's TCP memory at a time.
static MEASURING: Mutex<()> = Mutex::new(());

/// Both ends of each leg that carried bulk left the fast path, and the host valve never fired.
fn legs_left_the_fast_path(agent: &Agent, node: &str, at_least: f64) -> Result<f64> {
    let mut moved = 0.0;
    // The kernel counters reach the metrics at the agent's next stats pass.
    testbed::eventually(Duration::from_secs(5), || {
        moved = agent.metric(
            "weft_datapath_events_total",
            &[("event", "fast_path_flow_shed")],
        )?;
        let valve = agent.metric("weft_datapath_events_total", &[("event", "fast_path_shed")])?;
        ensure!(
            moved >= at_least,
            "{node}: {moved} sockets left the fast path, want at least {at_least}"
        );
        ensure!(valve == 0.0, "{node}: the host-wide valve fired ({valve})");
        Ok(())
    })?;
    Ok(moved)
}

const MIB: u64 = 1 << 20;
const SENT: u64 = 512 * MIB;
/// What may wait in socket buffers (a few windows of a few MiB each, both directions of the
/// echo), far below what is sent.
const MAX_QUEUED: u64 = 128 * MIB;

#[test]
fn a_bulk_transfer_through_the_tunnel_to_a_slow_reader_waits_instead_of_queueing() -> Result<()> {
    let tb = Testbed::new("leg-flow")?;
    let n1 = tb.node("n1")?;
    let n2 = tb.node("n2")?;
    let client = n1.pod("client")?;
    let server = n2.pod("server")?;
    let objects = [
        n1.manifest(),
        n2.manifest(),
        client.manifest(&[("app", "client")], "client"),
        server.manifest(&[("app", "server")], "server"),
    ]
    .join("\n---\n");
    let _one = MEASURING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ca = agent::identity_args(&n1)?;
    let args: Vec<&str> = ca.iter().map(String::as_str).collect();
    let a1 = Agent::start(&n1, &args)?;
    let a2 = Agent::start(&n2, &args)?;
    for a in [&a1, &a2] {
        a.enable_socket_fast_path()?;
        a.apply("objects.yaml", &objects)?;
        a.wait_workloads(2)?;
    }
    // An echo server that reads nothing for 3 s after accepting.
    let echo = server.serve_with(ServeMode::Echo, 7000, &["--read-delay-ms", "3000"])?;
    let watch = tcp_memory::PeakWatch::start()?;
    let transfer = client.transfer(echo.addr(), SENT, 1);
    let queued = watch.stop() * tcp_memory::PAGE;
    let transfer = transfer?;
    let diag = || format!("n1 agent: {}\nn2 agent: {}", a1.stderr(), a2.stderr());
    ensure!(
        transfer.all_ok() && transfer.bytes_verified == SENT,
        "the stream must arrive whole and in order: {transfer:?}\n{}",
        diag()
    );
    ensure!(
        queued < MAX_QUEUED,
        "TCP memory rose by {} MiB while {} MiB went to a reader asleep (at most {} MiB may wait)",
        queued / MIB,
        SENT / MIB,
        MAX_QUEUED / MIB
    );
    // On n1 both ends of the engine's leg send (the server echoes): both leave. On n2 the
    // receiving agent's leg to the pod keeps the client's address (the pod's peer is the client
    // pod, not an engine address), so it never joins the fast path: TCP's own window holds it.
    let moved = [
        legs_left_the_fast_path(&a1, "n1", 2.0)?,
        legs_left_the_fast_path(&a2, "n2", 0.0)?,
    ];
    println!(
        "sent {} MiB through the tunnel to a reader asleep for 3 s; TCP memory peak +{} MiB; \
         sockets moved off the fast path: n1 {}, n2 {}",
        SENT / MIB,
        queued / MIB,
        moved[0],
        moved[1]
    );
    Ok(())
}

#[test]
fn a_bulk_upload_through_the_l7_engine_to_a_slow_reader_waits_instead_of_queueing() -> Result<()> {
    let tb = Testbed::new("leg-flow-l7")?;
    let node = tb.node("n1")?;
    let client = node.pod("client")?;
    let web = node.pod("web")?;
    let objects = [
        client.manifest(&[("app", "client")], "client"),
        web.manifest(&[("app", "web")], "web"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec: {clusterIP: 198.19.0.60, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}"
            .to_owned(),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {name: web, namespace: default}\n\
         spec:\n  parentRefs: [{kind: Service, name: web, port: 80}]\n  rules:\n  \
         - backendRefs: [{name: web, port: 80}]"
            .to_owned(),
    ]
    .join("\n---\n");
    let _one = MEASURING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let agent = Agent::start(&node, &[])?;
    agent.enable_socket_fast_path()?;
    agent.apply("objects.yaml", &objects)?;
    agent.wait_workloads(2)?;
    let _server = web.serve_http(&HttpServerArgs::new("web", 8080))?;
    testbed::eventually(Duration::from_secs(10), || {
        let r = client.http_get(&HttpGetArgs::new("http://198.19.0.60/".parse()?))?;
        ensure!(r.status(200) == 1, "{r:?}");
        Ok(())
    })?;
    // The server leaves the body unread for 3 s.
    let mut upload =
        HttpGetArgs::new("http://198.19.0.60/read-delay/3000".parse()?).body_bytes(SENT);
    upload.method = "POST".into();
    upload.show = 1;
    upload.request_timeout_ms = 60_000;
    upload.timeout_secs = 90;
    let watch = tcp_memory::PeakWatch::start()?;
    let posted = client.http_get(&upload);
    let queued = watch.stop() * tcp_memory::PAGE;
    let posted = posted?;
    ensure!(
        posted.status(200) == 1,
        "{posted:?}\nagent: {}",
        agent.stderr()
    );
    let echo = posted.responses[0].echo().context("echo")?;
    ensure!(
        echo.body_bytes == SENT,
        "the server read {} of {SENT} body bytes",
        echo.body_bytes
    );
    ensure!(
        queued < MAX_QUEUED,
        "TCP memory rose by {} MiB while a {} MiB body went to a reader asleep (at most {} MiB \
         may wait)",
        queued / MIB,
        SENT / MIB,
        MAX_QUEUED / MIB
    );
    // The client's leg and the upstream leg: both ends of each send (request, response).
    let moved = legs_left_the_fast_path(&agent, "n1", 4.0)?;
    println!(
        "posted {} MiB through the L7 engine to a reader asleep for 3 s; TCP memory peak +{} MiB; \
         sockets moved off the fast path: {moved}",
        SENT / MIB,
        queued / MIB
    );
    Ok(())
}
