//! Per-leg flow control of the engine's sockets, alone in its test binary: it measures the
//! host's TCP memory, which other tests running at the same time would move.
//!
//! The engine's legs to local pods (a client's leg into the tunnel, the receiving agent's leg
//! to the destination pod) use the kernel's socket fast path, whose ingress redirect has no
//! flow control. A bulk transfer through the tunnel to a pod that reads nothing for a few
//! seconds: each engine sees the bulk on its leg and moves that leg to the normal stack, so
//! TCP's window (and HTTP/2's inside the tunnel) hold the sender back. Without that, the whole
//! transfer would wait in the destination pod's queue. The host-wide TCP-memory valve must not
//! be what saved the day.
#![allow(
    clippy::cast_precision_loss,
    reason = "metric samples are exact small integers"
)]

use std::time::Duration;

use anyhow::{Result, ensure};
use testbed::{
    ServeMode, Testbed,
    agent::{self, Agent},
    tcp_memory,
};

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
    let ca = agent::identity_args(&n1)?;
    let args: Vec<&str> = ca.iter().map(String::as_str).collect();
    let a1 = Agent::start(&n1, &args)?;
    let a2 = Agent::start(&n2, &args)?;
    for a in [&a1, &a2] {
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
    // Both engines moved their leg off the fast path; the host-wide valve never fired. The
    // kernel counters reach the metrics at the agents' next stats pass.
    let mut moved_by_node = [0.0; 2];
    testbed::eventually(Duration::from_secs(5), || {
        for (i, (node, a)) in [("n1", &a1), ("n2", &a2)].into_iter().enumerate() {
            let moved = a.metric(
                "weft_datapath_events_total",
                &[("event", "fast_path_flow_shed")],
            )?;
            let valve = a.metric("weft_datapath_events_total", &[("event", "fast_path_shed")])?;
            // Both ends of the leg send (the server echoes): both leave the fast path.
            ensure!(
                moved >= 2.0,
                "{node}: {moved} sockets left the fast path, want both ends of the leg"
            );
            ensure!(valve == 0.0, "{node}: the host-wide valve fired ({valve})");
            moved_by_node[i] = moved;
        }
        Ok(())
    })?;
    println!(
        "sent {} MiB through the tunnel to a reader asleep for 3 s; TCP memory peak +{} MiB; \
         sockets moved off the fast path: n1 {}, n2 {}",
        SENT / MIB,
        queued / MIB,
        moved_by_node[0],
        moved_by_node[1]
    );
    Ok(())
}
