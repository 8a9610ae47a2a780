//! Saturation throughput with `wrk` (Debian's package), run inside a client pod.
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use testbed::{Finished, Pod};

/// Threads and connections of every wrk run: one client thread, enough connections to keep a
/// single-worker proxy saturated.
pub const THREADS: u32 = 1;
pub const CONNECTIONS: u32 = 32;

/// What one wrk run measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Wrk {
    pub rps: f64,
    pub requests: u64,
    /// Latency under saturation (closed loop: mostly queueing, not comparable with
    /// `http-load`'s fixed-rate numbers).
    pub p50_us: f64,
    pub p99_us: f64,
    pub non_2xx: u64,
    /// connect + read + write + timeout errors.
    pub socket_errors: u64,
}

/// Runs the load generator `program` with `args` in `client` for about `secs`, on CPU `cpu` only
/// when given (through `taskset`); fails unless it exits successfully.
pub fn run_load(
    client: &Pod,
    program: &str,
    args: &[String],
    secs: u64,
    cpu: Option<usize>,
) -> Result<Finished> {
    let pinned = cpu.map(|cpu| ["-c".to_owned(), cpu.to_string(), program.to_owned()]);
    let run_as = if pinned.is_some() { "taskset" } else { program };
    let all: Vec<String> = pinned
        .into_iter()
        .flatten()
        .chain(args.iter().cloned())
        .collect();
    client
        .run(Duration::from_secs(secs + 30), run_as, &all)?
        .check()
}

/// `wrk -t1 -c32 -d<secs>s --latency <url>` from `client`, on CPU `cpu` only when given.
pub fn run(client: &Pod, url: &str, secs: u64, cpu: Option<usize>) -> Result<Wrk> {
    let wrk_args = [
        format!("-t{THREADS}"),
        format!("-c{CONNECTIONS}"),
        format!("-d{secs}s"),
        "--latency".to_owned(),
        url.to_owned(),
    ];
    let done = run_load(client, "wrk", &wrk_args, secs, cpu)?;
    let wrk = parse(&done.stdout).with_context(|| format!("wrk output: {}", done.stdout))?;
    ensure!(
        wrk.requests > 0 && wrk.non_2xx == 0,
        "wrk against {url}: {} requests, {} not 2xx, {} socket errors",
        wrk.requests,
        wrk.non_2xx,
        wrk.socket_errors
    );
    Ok(wrk)
}

/// Reads wrk's text report.
pub fn parse(text: &str) -> Result<Wrk> {
    let mut wrk = Wrk::default();
    let mut rps = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            rps = Some(rest.trim().parse::<f64>().context("Requests/sec")?);
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            wrk.non_2xx = rest.trim().parse().context("Non-2xx")?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            wrk.socket_errors = rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
        } else if let Some(rest) = line.strip_prefix("50%") {
            wrk.p50_us = duration_us(rest.trim())?;
        } else if let Some(rest) = line.strip_prefix("99%") {
            wrk.p99_us = duration_us(rest.trim())?;
        } else if line.contains(" requests in ") {
            wrk.requests = line
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .context("request count")?;
        }
    }
    wrk.rps = rps.context("no Requests/sec line")?;
    Ok(wrk)
}

/// wrk's durations: `453.00us`, `1.52ms`, `2.01s`, `3.00m`.
fn duration_us(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .with_context(|| format!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().with_context(|| format!("{text:?}"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        other => anyhow::bail!("unknown unit {other:?} in {text:?}"),
    };
    Ok(value * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "Running 2s test @ http://127.0.0.1:18080/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   461.85us  285.77us   4.91ms   83.26%
    Req/Sec    61.89k    14.52k   80.24k    75.00%
  Latency Distribution
     50%  453.00us
     75%  584.00us
     90%  685.00us
     99%    1.52ms
  122968 requests in 2.00s, 32.37MB read
  Non-2xx or 3xx responses: 7
  Socket errors: connect 0, read 2, write 1, timeout 0
Requests/sec:  61454.44
Transfer/sec:     16.18MB
";

    #[test]
    fn parses_wrk_output() {
        let wrk = parse(OUTPUT).unwrap();
        assert!((wrk.rps - 61454.44).abs() < 1e-6);
        assert_eq!(wrk.requests, 122_968);
        assert!((wrk.p50_us - 453.0).abs() < 1e-9);
        assert!((wrk.p99_us - 1520.0).abs() < 1e-9);
        assert_eq!((wrk.non_2xx, wrk.socket_errors), (7, 3));
    }

    #[test]
    fn units() {
        assert!((duration_us("2.5s").unwrap() - 2.5e6).abs() < 1e-6);
        assert!(duration_us("12").is_err());
        assert!(duration_us("1.0ns").is_err());
        assert!(parse("nothing").is_err());
    }
}
