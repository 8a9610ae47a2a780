//! The fast path's safety valve. The kernel's ingress redirect has no flow control: a sender
//! faster than its reader piles redirected bytes into the reader's socket until the host's TCP
//! memory (`net.ipv4.tcp_mem`) runs out, and then every TCP sender on the host gets ENOMEM.
//! The agent watches the host's TCP memory; above half of the kernel's pressure threshold
//! (`tcp_mem[0]`) it sets `SHED`, and sockets leave the fast path (each for good: the order
//! rule), so TCP's window makes fast senders wait. Below a quarter it clears `SHED`; new
//! connections use the fast path again.
use std::path::Path;

/// Whether to shed, with hysteresis.
#[derive(Debug, Default)]
pub struct TcpMemory {
    shedding: bool,
}

impl TcpMemory {
    /// Reads the host's TCP memory now; `true` while the fast path should be shed. When the
    /// kernel's files cannot be read, never sheds.
    pub fn update(&mut self) -> bool {
        let reading = read_pages(Path::new("/proc/net/sockstat")).zip(pressure_threshold());
        let Some((pages, pressure)) = reading else {
            return false;
        };
        let now = decide(self.shedding, pages, pressure);
        if now != self.shedding {
            if now {
                tracing::warn!(
                    tcp_memory_mib = pages * 4 / 1024,
                    pressure_mib = pressure * 4 / 1024,
                    "host TCP memory high: sockets leave the fast path so slow readers slow their senders"
                );
            } else {
                tracing::info!(
                    tcp_memory_mib = pages * 4 / 1024,
                    "host TCP memory back to normal: new connections use the fast path again"
                );
            }
            self.shedding = now;
        }
        now
    }
}

/// Shed above half of the pressure threshold; stop below a quarter.
#[must_use]
pub fn decide(shedding: bool, pages: u64, pressure: u64) -> bool {
    if shedding {
        pages > pressure / 4
    } else {
        pages > pressure / 2
    }
}

/// Pages of TCP memory in use on the host: `TCP: … mem N` of `/proc/net/sockstat`.
fn read_pages(path: &Path) -> Option<u64> {
    parse_sockstat(&std::fs::read_to_string(path).ok()?)
}

fn parse_sockstat(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// The kernel's TCP memory-pressure threshold in pages: `tcp_mem[0]`, or, where that sysctl is
/// not visible (it belongs to the host's network namespace; an agent in another one does not
/// see it), the kernel's own default for it: 3/64 of the machine's memory. The sysctl is read
/// every time (an operator may change it); the memory size once.
fn pressure_threshold() -> Option<u64> {
    static BOOT_DEFAULT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    read_pressure(Path::new("/proc/sys/net/ipv4/tcp_mem")).or_else(|| {
        *BOOT_DEFAULT
            .get_or_init(|| default_pressure(&std::fs::read_to_string("/proc/meminfo").ok()?))
    })
}

/// `tcp_mem[0]` as the kernel sets it at boot, from `/proc/meminfo`'s `MemTotal` (kB).
fn default_pressure(meminfo: &str) -> Option<u64> {
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((kb / 4 * 3 / 64).max(96))
}

/// `tcp_mem[0]`, the kernel's memory-pressure threshold, in pages.
fn read_pressure(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
        .filter(|&p| p > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_files_and_sheds_with_hysteresis() {
        let sockstat =
            "sockets: used 215\nTCP: inuse 7 orphan 0 tw 2 alloc 9 mem 1234\nUDP: inuse 1 mem 2\n";
        assert_eq!(parse_sockstat(sockstat), Some(1234));
        assert_eq!(parse_sockstat("UDP: inuse 1 mem 2\n"), None);
        assert_eq!(parse_sockstat("TCP: inuse 7 mem\n"), None);
        assert!(!decide(false, 500, 1000));
        assert!(decide(false, 501, 1000));
        assert!(decide(true, 251, 1000), "keeps shedding until well below");
        assert!(!decide(true, 250, 1000));
        // The kernel's boot-time default from MemTotal (24 GB: about 289k pages).
        assert_eq!(
            default_pressure("MemTotal:       24684084 kB\n"),
            Some(289_266)
        );
        assert_eq!(default_pressure("nothing"), None);
        // This machine's files parse (the agent runs on Linux).
        assert!(read_pages(Path::new("/proc/net/sockstat")).is_some());
        assert!(pressure_threshold().is_some());
    }
}
