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

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use testbed::{ServeMode, Testbed, agent::Agent};

/// Pages of TCP memory in use on the host (`/proc/net/sockstat`).
fn tcp_pages() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .context("no TCP line")?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "mem").context("no mem")?;
    Ok(words.get(i + 1).context("no mem value")?.parse()?)
}

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
    let bytes = pressure * 4096 * 3 / 2;
    let start = tcp_pages()?;
    let peak = Arc::new(AtomicU64::new(start));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            // Bounded: the transfer's own timeout ends it within minutes.
            for _ in 0..30_000 {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(p) = tcp_pages() {
                    peak.fetch_max(p, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let transfer = a.transfer(server.addr(), bytes, 1);
    done.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let transfer = transfer?;
    ensure!(
        transfer.all_ok(),
        "the stream must arrive whole and in order: {transfer:?}"
    );
    let peak = peak.load(Ordering::Relaxed);
    ensure!(
        peak.saturating_sub(start) < pressure,
        "TCP memory rose by {} MiB, over the pressure threshold ({} MiB)",
        peak.saturating_sub(start) * 4 / 1024,
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
        peak.saturating_sub(start) * 4 / 1024,
        pressure * 4 / 1024,
        fast / f64::from(1 << 20)
    );
    Ok(())
}
