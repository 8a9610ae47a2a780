//! What the HTTP clients count while they run: statuses, serving backends, errors, latencies.
#![forbid(unsafe_code)]

use std::{collections::BTreeMap, error::Error, time::Duration};

use crate::workload::stats::percentile;

/// Errors kept as text in a report; the rest are only counted.
pub const MAX_ERROR_SAMPLES: usize = 8;

/// Counts of one client task, merged into the report at the end.
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: u64,
    pub completed: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub by_status: BTreeMap<u16, u64>,
    pub by_server: BTreeMap<String, u64>,
    pub body_bytes: u64,
    pub latencies_ns: Vec<u64>,
}

impl Tally {
    pub fn error(&mut self, error: String) {
        self.errors += 1;
        if self.error_samples.len() < MAX_ERROR_SAMPLES {
            self.error_samples.push(error);
        }
    }

    /// A complete response: its status, serving backend (if the caller tracks it), body size
    /// and latency.
    pub fn response(&mut self, status: u16, server: Option<String>, body: u64, latency: Duration) {
        self.completed += 1;
        *self.by_status.entry(status).or_default() += 1;
        if let Some(server) = server {
            *self.by_server.entry(server).or_default() += 1;
        }
        self.body_bytes += body;
        self.latencies_ns
            .push(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: Self) {
        self.sent += other.sent;
        self.completed += other.completed;
        self.errors += other.errors;
        for error in other.error_samples {
            if self.error_samples.len() < MAX_ERROR_SAMPLES {
                self.error_samples.push(error);
            }
        }
        for (status, n) in other.by_status {
            *self.by_status.entry(status).or_default() += n;
        }
        for (server, n) in other.by_server {
            *self.by_server.entry(server).or_default() += n;
        }
        self.body_bytes += other.body_bytes;
        self.latencies_ns.extend(other.latencies_ns);
    }

    /// Completed responses whose status is not 2xx.
    #[must_use]
    pub fn non_2xx(&self) -> u64 {
        self.by_status
            .iter()
            .filter(|(status, _)| !(200..300).contains(*status))
            .map(|(_, n)| n)
            .sum()
    }

    /// Latency percentiles `pcts` (0..=100) in microseconds (0 when there are none).
    pub fn latency_us<const N: usize>(&mut self, pcts: [f64; N]) -> [f64; N] {
        self.latencies_ns.sort_unstable();
        #[allow(clippy::cast_precision_loss)] // reason: nanoseconds far below 2^52
        pcts.map(|pct| percentile(&self.latencies_ns, pct).map_or(0.0, |ns| ns as f64 / 1000.0))
    }
}

/// An error with its sources, `outer: inner: innermost` (hyper's errors say little on their own).
#[must_use]
pub fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let more = inner.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::float_cmp, reason = "exact microsecond values")]
    fn merges_and_summarises() {
        let mut a = Tally::default();
        a.response(200, Some("x".into()), 10, Duration::from_micros(100));
        a.response(503, Some("y".into()), 5, Duration::from_micros(300));
        let mut b = Tally::default();
        b.response(200, Some("x".into()), 10, Duration::from_micros(200));
        for i in 0..10 {
            b.error(format!("e{i}"));
        }
        a.merge(b);
        assert_eq!(a.completed, 3);
        assert_eq!(a.errors, 10);
        assert_eq!(a.error_samples.len(), MAX_ERROR_SAMPLES);
        assert_eq!(a.by_status[&200], 2);
        assert_eq!(a.by_server["x"], 2);
        assert_eq!(a.non_2xx(), 1);
        assert_eq!(a.body_bytes, 25);
        assert_eq!(a.latency_us([50.0, 100.0]), [200.0, 300.0]);
    }

    #[test]
    fn error_chains_name_every_source() {
        let inner = std::io::Error::other("connection reset");
        let outer = std::io::Error::other(Wrapper(inner));
        assert_eq!(error_chain(&outer), "wrapper: connection reset");
    }

    #[derive(Debug)]
    struct Wrapper(std::io::Error);
    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapper")
        }
    }
    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }
}
