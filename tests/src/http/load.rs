//! `weft-workload http-load`: an open-loop, constant-rate load generator in the style of wrk2.
//!
//! Request i is scheduled at `start + i/rate`, for i while that is inside the `--secs` window;
//! connection k of C sends requests k, k+C, k+2C… one at a time, so each connection has its own
//! fixed schedule. Latency is measured from the *intended* send time whenever the connection was
//! still busy with earlier requests at that time: a slow response delays the requests queued
//! behind it, and their wait counts (no coordinated omission). When the connection was idle at
//! the scheduled time, latency is measured from the actual send instead: the only delay there is
//! the client's own timer wake-up (tokio's timer has millisecond granularity), which says nothing
//! about the server and would otherwise dominate sub-millisecond percentiles.
//!
//! After the window, connections finish the requests they are behind on for at most
//! `--drain-secs`; what is still unsent then is reported as `missed`.
#![forbid(unsafe_code)]

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    Request, Uri,
    client::conn::{http1, http2},
    header::HOST,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, time::Instant};

use super::{
    body::read_body,
    report::HttpLoadReport,
    tally::{Tally, error_chain},
};

/// `weft-workload http-load` options (also the builder for [`crate::Pod::http_load`]).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct HttpLoadArgs {
    /// `http://IP:PORT/path` (no name resolution inside pods).
    #[arg(long)]
    pub url: Uri,
    /// Requests per second, over all connections.
    #[arg(long)]
    pub rate: f64,
    /// Length of the scheduling window.
    #[arg(long)]
    pub secs: f64,
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connections: u32,
    /// HTTP/2 with prior knowledge instead of HTTP/1.1 (still one request at a time per
    /// connection).
    #[arg(long)]
    pub h2c: bool,
    /// How long connections may go on after the window to send what they are behind on.
    #[arg(long, default_value_t = 5.0)]
    pub drain_secs: f64,
    /// Time limit of one request (connect included).
    #[arg(long, default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Runtime worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// Run on this CPU only (benchmarks keep load generators off the CPUs under test).
    #[arg(long)]
    pub cpu: Option<usize>,
}

impl HttpLoadArgs {
    /// `rate` requests per second to `url` for `duration`, otherwise the command's defaults.
    #[must_use]
    pub fn new(url: Uri, rate: f64, duration: Duration) -> Self {
        Self {
            url,
            rate,
            secs: duration.as_secs_f64(),
            connections: 16,
            h2c: false,
            drain_secs: 5.0,
            request_timeout_ms: 10_000,
            threads: 1,
            cpu: None,
        }
    }

    #[must_use]
    pub fn cpu(mut self, cpu: Option<usize>) -> Self {
        self.cpu = cpu;
        self
    }

    #[must_use]
    pub fn connections(mut self, connections: u32) -> Self {
        self.connections = connections;
        self
    }

    #[must_use]
    pub fn h2c(mut self) -> Self {
        self.h2c = true;
        self
    }

    /// The longest the command runs: window, drain and one request timeout.
    #[must_use]
    pub fn max_duration(&self) -> Duration {
        Duration::from_secs_f64(self.secs.max(0.0) + self.drain_secs.max(0.0))
            + Duration::from_millis(self.request_timeout_ms)
    }

    /// The command line (after the subcommand) that parses back into `self`.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--url".to_owned(),
            self.url.to_string(),
            "--rate".to_owned(),
            self.rate.to_string(),
            "--secs".to_owned(),
            self.secs.to_string(),
            "--connections".to_owned(),
            self.connections.to_string(),
            "--drain-secs".to_owned(),
            self.drain_secs.to_string(),
            "--request-timeout-ms".to_owned(),
            self.request_timeout_ms.to_string(),
            "--threads".to_owned(),
            self.threads.to_string(),
        ];
        if self.h2c {
            args.push("--h2c".to_owned());
        }
        if let Some(cpu) = self.cpu {
            args.extend(["--cpu".to_owned(), cpu.to_string()]);
        }
        args
    }
}

/// Number of requests scheduled in the window: i with i/rate < secs.
#[must_use]
pub fn scheduled(rate: f64, secs: f64) -> u64 {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    // reason: validated positive and bounded by `run`
    let n = (rate * secs).ceil() as u64;
    n
}

/// Most requests one run may schedule (keeps the latency samples in memory bounded).
const MAX_SCHEDULED: f64 = 50_000_000.0;

/// What every connection task needs.
#[derive(Clone)]
struct Plan {
    addr: SocketAddr,
    url: Uri,
    authority: String,
    h2c: bool,
    rate: f64,
    connections: u64,
    start: Instant,
    scheduled: u64,
    hard_deadline: Instant,
    request_timeout: Duration,
}

impl Plan {
    fn scheduled_at(&self, index: u64) -> Instant {
        #[allow(clippy::cast_precision_loss)] // reason: indices far below 2^52
        let offset = Duration::from_secs_f64(index as f64 / self.rate);
        self.start + offset
    }
}

pub fn run(args: &HttpLoadArgs) -> Result<HttpLoadReport, String> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        return Err(format!("--rate {}: want a positive rate", args.rate));
    }
    if !(args.secs.is_finite() && args.secs > 0.0 && args.secs <= 86_400.0) {
        return Err(format!("--secs {}: want 0 < secs ≤ 86400", args.secs));
    }
    if !(args.drain_secs.is_finite() && (0.0..=3600.0).contains(&args.drain_secs)) {
        return Err(format!(
            "--drain-secs {}: want 0 ≤ secs ≤ 3600",
            args.drain_secs
        ));
    }
    if args.rate * args.secs > MAX_SCHEDULED {
        return Err(format!(
            "--rate × --secs is {}: at most {MAX_SCHEDULED} requests per run",
            args.rate * args.secs
        ));
    }
    let addr = socket_addr(&args.url)?;
    let authority = args
        .url
        .authority()
        .map(ToString::to_string)
        .unwrap_or_default();
    if let Some(cpu) = args.cpu {
        crate::pin::pin_self(cpu).map_err(|e| format!("--cpu {cpu}: {e:#}"))?;
    }
    let runtime = super::runtime(args.threads)?;
    runtime.block_on(async {
        let mut plan = Plan {
            addr,
            url: args.url.clone(),
            authority,
            h2c: args.h2c,
            rate: args.rate,
            connections: u64::from(args.connections),
            start: Instant::now(),
            scheduled: scheduled(args.rate, args.secs),
            hard_deadline: Instant::now(),
            request_timeout: Duration::from_millis(args.request_timeout_ms.max(1)),
        };
        // Connections are opened before the clock starts, as wrk does: the handshakes are not
        // part of any request's latency. One that fails is retried by its first request.
        let mut opened = Vec::new();
        for _ in 0..plan.connections {
            let open = tokio::time::timeout(plan.request_timeout, Sender::open(&plan)).await;
            opened.push(open.ok().and_then(Result::ok));
        }
        plan.start = Instant::now();
        plan.hard_deadline = plan.start
            + Duration::from_secs_f64(args.secs)
            + Duration::from_secs_f64(args.drain_secs);
        let start = plan.start;
        let tasks: Vec<_> = opened
            .into_iter()
            .zip(0..)
            .map(|(sender, k)| tokio::spawn(connection(plan.clone(), k, sender)))
            .collect();
        let mut tally = Tally::default();
        let mut last_done = start;
        for task in tasks {
            match task.await {
                Ok((part, done)) => {
                    tally.merge(part);
                    last_done = last_done.max(done);
                }
                Err(error) => tally.error(format!("connection task: {error}")),
            }
        }
        let elapsed = last_done.saturating_duration_since(start).as_secs_f64();
        let non_2xx = tally.non_2xx();
        let [p50, p90, p99, p99_9, max] = tally.latency_us([50.0, 90.0, 99.0, 99.9, 100.0]);
        #[allow(clippy::cast_precision_loss)] // reason: counts far below 2^52
        let achieved_rps = tally.completed as f64 / elapsed.max(f64::EPSILON);
        Ok(HttpLoadReport {
            target_rps: args.rate,
            secs: args.secs,
            connections: args.connections,
            scheduled: plan.scheduled,
            sent: tally.sent,
            completed: tally.completed,
            missed: plan.scheduled.saturating_sub(tally.sent),
            achieved_rps,
            elapsed_secs: elapsed,
            p50_us: p50,
            p90_us: p90,
            p99_us: p99,
            p999_us: p99_9,
            max_us: max,
            errors: tally.errors,
            error_samples: tally.error_samples,
            non_2xx,
            by_status: tally.by_status,
        })
    })
}

/// The URL's `IP:PORT` (port 80 by default).
fn socket_addr(url: &Uri) -> Result<SocketAddr, String> {
    if url.scheme_str() != Some("http") {
        return Err(format!("--url {url}: want http://IP:PORT/…"));
    }
    let host = url.host().unwrap_or_default();
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| format!("--url {url}: the host must be an IP address"))?;
    Ok(SocketAddr::new(ip, url.port_u16().unwrap_or(80)))
}

/// A connection's request sender, either protocol.
enum Sender {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn open(plan: &Plan) -> Result<Self, String> {
        let stream = TcpStream::connect(plan.addr)
            .await
            .map_err(|error| format!("connect {}: {error}", plan.addr))?;
        stream
            .set_nodelay(true)
            .map_err(|error| format!("TCP_NODELAY: {error}"))?;
        let io = TokioIo::new(stream);
        if plan.h2c {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|error| format!("h2 handshake: {}", error_chain(&error)))?;
            tokio::spawn(conn);
            Ok(Self::H2(sender))
        } else {
            let (sender, conn) = http1::handshake(io)
                .await
                .map_err(|error| format!("handshake: {}", error_chain(&error)))?;
            tokio::spawn(conn);
            Ok(Self::H1(sender))
        }
    }

    fn is_closed(&self) -> bool {
        match self {
            Self::H1(sender) => sender.is_closed(),
            Self::H2(sender) => sender.is_closed(),
        }
    }

    /// Sends one request and reads the whole response: (status, body bytes).
    async fn send(&mut self, plan: &Plan) -> Result<(u16, u64), String> {
        let response = match self {
            Self::H1(sender) => {
                sender.ready().await.map_err(|error| error_chain(&error))?;
                let path = plan
                    .url
                    .path_and_query()
                    .map_or("/", hyper::http::uri::PathAndQuery::as_str);
                let request = Request::get(path)
                    .header(HOST, &plan.authority)
                    .body(Empty::new())
                    .map_err(|error| error.to_string())?;
                sender.send_request(request).await
            }
            Self::H2(sender) => {
                sender.ready().await.map_err(|error| error_chain(&error))?;
                let request = Request::get(plan.url.clone())
                    .body(Empty::new())
                    .map_err(|error| error.to_string())?;
                sender.send_request(request).await
            }
        }
        .map_err(|error| error_chain(&error))?;
        let status = response.status().as_u16();
        let (len, _) = read_body(response.into_body(), 0)
            .await
            .map_err(|error| format!("response body: {}", error_chain(&error)))?;
        Ok((status, len))
    }
}

/// Connection `k` (`sender`, if it could be opened beforehand): requests k, k+C, k+2C… on their
/// schedule; returns its tally and when its last request completed.
async fn connection(plan: Plan, k: u64, mut sender: Option<Sender>) -> (Tally, Instant) {
    let mut tally = Tally::default();
    let mut prev_done = plan.start;
    let mut index = k;
    while index < plan.scheduled {
        let due = plan.scheduled_at(index);
        if Instant::now() >= plan.hard_deadline {
            break;
        }
        let idle_when_due = prev_done <= due;
        tokio::time::sleep_until(due).await;
        let send_at = Instant::now();
        let origin = if idle_when_due { send_at } else { due };
        tally.sent += 1;
        let timeout = plan
            .request_timeout
            .min(plan.hard_deadline.saturating_duration_since(send_at))
            .max(Duration::from_millis(1));
        let outcome = tokio::time::timeout(timeout, async {
            if sender.as_ref().is_none_or(Sender::is_closed) {
                sender = Some(Sender::open(&plan).await?);
            }
            match sender.as_mut() {
                Some(open) => open.send(&plan).await,
                None => Err("no connection".to_owned()),
            }
        })
        .await;
        let done = Instant::now();
        prev_done = done;
        match outcome {
            Ok(Ok((status, len))) => tally.response(status, None, len, done - origin),
            Ok(Err(error)) => {
                sender = None;
                tally.error(format!("request {index}: {error}"));
            }
            Err(_) => {
                sender = None;
                tally.error(format!("request {index}: no response within {timeout:?}"));
            }
        }
        index += plan.connections;
    }
    (tally, prev_done)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: HttpLoadArgs,
    }

    #[test]
    fn builder_arguments_parse_back() {
        let args = HttpLoadArgs::new(
            "http://198.19.0.20:80/".parse().unwrap(),
            1000.0,
            Duration::from_millis(2500),
        )
        .connections(4)
        .h2c();
        let line = std::iter::once("x".to_owned()).chain(args.to_args());
        assert_eq!(Wrapper::parse_from(line).args, args);
    }

    #[test]
    fn schedule_covers_the_window() {
        assert_eq!(scheduled(1000.0, 3.0), 3000);
        assert_eq!(scheduled(3.0, 0.5), 2); // i = 0 at 0 s, i = 1 at 0.33 s
        assert_eq!(scheduled(0.5, 1.0), 1);
    }

    #[test]
    fn urls_must_name_an_ip() {
        let addr = |u: &str| socket_addr(&u.parse().unwrap());
        assert_eq!(
            addr("http://1.2.3.4/x").unwrap(),
            "1.2.3.4:80".parse().unwrap()
        );
        assert_eq!(
            addr("http://1.2.3.4:81").unwrap(),
            "1.2.3.4:81".parse().unwrap()
        );
        assert!(addr("http://example:80/").is_err());
        assert!(addr("https://1.2.3.4/").is_err());
    }
}
