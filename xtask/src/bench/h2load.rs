//! Saturation throughput over HTTP/2 (cleartext, prior knowledge) with `h2load` (Debian's
//! `nghttp2-client`), run inside a client pod: the same shape as the `wrk` run, one thread and
//! [`CLIENTS`] connections with one stream in flight each.
use anyhow::{Context as _, Result, ensure};
use testbed::Pod;

pub const CLIENTS: u32 = 32;
/// Concurrent streams per connection (one request at a time, as wrk and http-load do).
pub const STREAMS: u32 = 1;

/// What one h2load run measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct H2load {
    pub rps: f64,
    pub requests: u64,
    pub succeeded: u64,
    /// failed + errored + timeout.
    pub failed: u64,
    pub non_2xx: u64,
}

/// `h2load -t1 -c32 -m1 -D <secs> <url>` from `client`, on CPU `cpu` only when given.
pub fn run(client: &Pod, url: &str, secs: u64, cpu: Option<usize>) -> Result<H2load> {
    let h2load_args = [
        "-t1".to_owned(),
        format!("-c{CLIENTS}"),
        format!("-m{STREAMS}"),
        "-D".to_owned(),
        secs.to_string(),
        url.to_owned(),
    ];
    let done = super::wrk::run_load(client, "h2load", &h2load_args, secs, cpu)?;
    let h2 = parse(&done.stdout).with_context(|| format!("h2load output: {}", done.stdout))?;
    ensure!(
        h2.succeeded > 0 && h2.failed == 0 && h2.non_2xx == 0,
        "h2load against {url}: {} requests, {} succeeded, {} failed, {} not 2xx",
        h2.requests,
        h2.succeeded,
        h2.failed,
        h2.non_2xx
    );
    Ok(h2)
}

/// Reads h2load's text report.
pub fn parse(text: &str) -> Result<H2load> {
    let mut h2 = H2load::default();
    let mut rps = None;
    // "N total, N started, N done, N succeeded, N failed, N errored, N timeout"
    let count = |rest: &str, what: &str| -> Option<u64> {
        rest.split(',')
            .map(str::trim)
            .find(|p| p.ends_with(what))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "2.00s, 2000.00 req/s, 132.94KB/s"
            let field = rest.split(',').nth(1).context("no req/s field")?;
            let number = field.trim().strip_suffix(" req/s").context("req/s")?;
            rps = Some(number.parse::<f64>().context("req/s")?);
        } else if let Some(rest) = line.strip_prefix("requests:") {
            h2.requests = count(rest, "total").context("requests total")?;
            h2.succeeded = count(rest, "succeeded").context("succeeded")?;
            h2.failed = ["failed", "errored", "timeout"]
                .iter()
                .map(|w| count(rest, w).unwrap_or(0))
                .sum();
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            h2.non_2xx = ["3xx", "4xx", "5xx"]
                .iter()
                .map(|w| count(rest, w).unwrap_or(0))
                .sum();
        }
    }
    h2.rps = rps.context("no `finished in` line")?;
    Ok(h2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// h2load 1.52 (Debian 12) against nginx, `-t1 -c4 -m1 -D 2`.
    const OUTPUT: &str = "starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration for measurements.
Warm-up phase is over for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 2.00s, 2000.00 req/s, 132.94KB/s
requests: 4000 total, 4000 started, 4000 done, 3990 succeeded, 6 failed, 3 errored, 1 timeout
status codes: 3990 2xx, 0 3xx, 2 4xx, 5 5xx
traffic: 265.88KB (272264) total, 187.50KB (192000) headers (space savings 51.02%), 7.81KB (8000) data
                     min         max         mean         sd        +/- sd
time for request:       53us      2.93ms       149us        69us    84.70%
";

    #[test]
    fn parses_h2load_output() {
        let h2 = parse(OUTPUT).unwrap();
        assert!((h2.rps - 2000.0).abs() < 1e-9);
        assert_eq!((h2.requests, h2.succeeded, h2.failed), (4000, 3990, 10));
        assert_eq!(h2.non_2xx, 7);
        assert!(parse("nothing").is_err());
    }
}
