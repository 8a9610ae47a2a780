//! The host's TCP memory (`/proc/net/sockstat`), for the tests of the fast path's flow control:
//! what waits in socket queues, the kernel's ingress redirects included.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};

/// Bytes of a TCP memory page.
pub const PAGE: u64 = 4096;

/// Pages of TCP memory in use on the host.
pub fn pages() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .context("no TCP line in /proc/net/sockstat")?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "mem").context("no mem")?;
    Ok(words.get(i + 1).context("no mem value")?.parse()?)
}

/// Samples the host's TCP memory every 10 ms (for at most 5 minutes) until stopped.
pub struct PeakWatch {
    start: u64,
    peak: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    sampler: JoinHandle<()>,
}

impl PeakWatch {
    /// # Errors
    /// When `/proc/net/sockstat` cannot be read.
    pub fn start() -> Result<Self> {
        let start = pages()?;
        let peak = Arc::new(AtomicU64::new(start));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (peak.clone(), done.clone());
            std::thread::spawn(move || {
                for _ in 0..30_000 {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Ok(p) = pages() {
                        peak.fetch_max(p, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Ok(Self {
            start,
            peak,
            done,
            sampler,
        })
    }

    /// Pages of the highest sample above the first.
    #[must_use]
    pub fn stop(self) -> u64 {
        self.done.store(true, Ordering::Relaxed);
        let _ = self.sampler.join();
        self.peak.load(Ordering::Relaxed).saturating_sub(self.start)
    }
}
