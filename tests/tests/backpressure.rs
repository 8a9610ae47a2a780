//! The fast path's safety valve, alone in its test binary: it fills the host's TCP memory on
//! purpose, and every agent on the host (the other tests' too) would shed while it does.
//!
//! A same-node meshed sender writes faster than its peer reads (the peer reads nothing for a
//! few seconds). The kernel's ingress redirect has no flow control; the agent sees the host's
//! TCP memory rise, sets SHED, and the sender moves to the normal stack, where TCP's window
//! makes it wait. The stream arrives whole and in order, and TCP memory stays below the
//! kernel's pressure threshold.
#![allow(
    clippy::cast_precision_loss,
    reason = "metric samples are exact small integers"
)]

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use testbed::{ServeMode, Testbed, agent::Agent, tcp_memory};

#[test]
fn a_reader_that_falls_behind_slows_its_sender_instead_of_exhausting_tcp_memory() -> Result<()> {
    let pressure: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem")?
        .split_whitespace()
        .next()
        .context("tcp_mem")?
        .parse()?;
    let tb = Testbed::new("backpressure")?;
    let node = tb.node("n1")?;
    let (a, b) = (node.pod("a")?, node.pod("b")?);
    let agent = Agent::start(&node, &[])?;
    agent.enable_socket_fast_path()?;
    agent.apply(
        "pods.yaml",
        &[
            a.manifest(&[("app", "a")], "a"),
            b.manifest(&[("app", "b")], "b"),
        ]
        .join("\n---\n"),
    )?;
    agent.wait_workloads(2)?;
    // An echo server that reads nothing for 4 s after accepting.
    let server = b.serve_with(ServeMode::Echo, 7000, &["--read-delay-ms", "4000"])?;
    // One and a half times the kernel's pressure threshold: without the valve all of it would
    // sit in b's queue (the kernel would be under memory pressure, close to ENOMEM).
    let bytes = pressure * tcp_memory::PAGE * 3 / 2;
    let watch = tcp_memory::PeakWatch::start()?;
    // Gigabytes through the (debug-built) verifying echo: a minute was not always enough on a
    // loaded 2-core machine (a CI run's transfer hit its deadline at 1.5 of 1.8 GB).
    let transfer = a.transfer_within(server.addr(), bytes, 1, Duration::from_mins(4));
    let rise = watch.stop();
    let transfer = transfer?;
    ensure!(
        transfer.all_ok(),
        "the stream must arrive whole and in order: {transfer:?}"
    );
    ensure!(
        rise < pressure,
        "TCP memory rose by {} MiB, over the pressure threshold ({} MiB)",
        rise * 4 / 1024,
        pressure * 4 / 1024
    );
    // The kernel counters reach the metrics at the agent's next stats pass.
    let (mut shed, mut fast) = (0.0, 0.0);
    testbed::eventually(Duration::from_secs(5), || {
        shed = agent.metric("weft_datapath_events_total", &[("event", "fast_path_shed")])?;
        fast = agent.metric(
            "weft_tcp_fast_path_bytes_total",
            &[("source_workload", "a"), ("destination_workload", "b")],
        )?;
        ensure!(shed >= 1.0, "the agent never shed the fast path");
        ensure!(
            fast > 0.0,
            "the stream started on the fast path (else this shows nothing)"
        );
        Ok(())
    })?;
    println!(
        "sent {} MiB; TCP memory peak +{} MiB (pressure threshold {} MiB); fast-path bytes {:.0} MiB; shed {shed} messages",
        bytes >> 20,
        rise * 4 / 1024,
        pressure * 4 / 1024,
        fast / f64::from(1 << 20)
    );
    Ok(())
}
