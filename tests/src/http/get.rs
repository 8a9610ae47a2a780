//! `weft-workload http-get`: `--count` requests over keep-alive connections (hyper's pooled
//! client), `--concurrency` at a time, with counts per status and per serving backend
//! (`x-served-by`), errors, latency percentiles and optionally the first responses themselves.
//! Bounded by `--count` and by `--timeout-secs` over the whole run.
#![forbid(unsafe_code)]

use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Uri,
    header::{HeaderName, HeaderValue},
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use tokio::time::Instant;

use super::{
    body::{pattern_bytes, read_body},
    report::{HttpGetReport, ShownResponse},
    server::{SERVED_BY, header_map},
    tally::{Tally, error_chain},
};

/// How much of each shown body is kept.
const SHOW_BODY_LIMIT: usize = 64 * 1024;

/// `weft-workload http-get` options (also the builder for [`crate::Pod::http_get`]).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct HttpGetArgs {
    /// `http://IP:PORT/path?query` (no name resolution inside pods).
    #[arg(long)]
    pub url: Uri,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub count: u64,
    /// Requests in flight at once (and so at most this many connections).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// Extra request header `Name: value` (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Send a body of this many bytes of the workload's pattern.
    #[arg(long, default_value_t = 0)]
    pub body_bytes: u64,
    /// HTTP/2 with prior knowledge instead of HTTP/1.1.
    #[arg(long)]
    pub h2c: bool,
    /// Keep the first N responses (status, headers, body) in the report.
    #[arg(long, default_value_t = 0)]
    pub show: u32,
    /// Time limit of each request (connect included).
    #[arg(long, default_value_t = 10_000)]
    pub request_timeout_ms: u64,
    /// Time limit of the whole run: no request starts after it.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

impl HttpGetArgs {
    /// One GET of `url`, otherwise the command's defaults.
    #[must_use]
    pub fn new(url: Uri) -> Self {
        Self {
            url,
            count: 1,
            concurrency: 1,
            headers: Vec::new(),
            method: "GET".to_owned(),
            body_bytes: 0,
            h2c: false,
            show: 0,
            request_timeout_ms: 10_000,
            timeout_secs: 60,
        }
    }

    #[must_use]
    pub fn count(mut self, count: u64) -> Self {
        self.count = count;
        self
    }

    #[must_use]
    pub fn concurrency(mut self, concurrency: u32) -> Self {
        self.concurrency = concurrency;
        self
    }

    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push(format!("{name}: {value}"));
        self
    }

    #[must_use]
    pub fn method(mut self, method: &str) -> Self {
        method.clone_into(&mut self.method);
        self
    }

    #[must_use]
    pub fn body_bytes(mut self, len: u64) -> Self {
        self.body_bytes = len;
        self
    }

    #[must_use]
    pub fn h2c(mut self) -> Self {
        self.h2c = true;
        self
    }

    #[must_use]
    pub fn show(mut self, responses: u32) -> Self {
        self.show = responses;
        self
    }

    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }

    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout_secs = timeout.as_secs().max(1);
        self
    }

    /// The command line (after the subcommand) that parses back into `self`.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--url".to_owned(),
            self.url.to_string(),
            "--count".to_owned(),
            self.count.to_string(),
            "--concurrency".to_owned(),
            self.concurrency.to_string(),
            "--method".to_owned(),
            self.method.clone(),
            "--body-bytes".to_owned(),
            self.body_bytes.to_string(),
            "--show".to_owned(),
            self.show.to_string(),
            "--request-timeout-ms".to_owned(),
            self.request_timeout_ms.to_string(),
            "--timeout-secs".to_owned(),
            self.timeout_secs.to_string(),
        ];
        for header in &self.headers {
            args.push("--header".to_owned());
            args.push(header.clone());
        }
        if self.h2c {
            args.push("--h2c".to_owned());
        }
        args
    }
}

/// Parses `Name: value` (or `Name:value`).
pub fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("header {text:?} is not `Name: value`"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|error| format!("header name in {text:?}: {error}"))?;
    let value = HeaderValue::from_str(value.trim())
        .map_err(|error| format!("header value in {text:?}: {error}"))?;
    Ok((name, value))
}

/// What every worker needs.
struct Plan {
    client: Client<HttpConnector, Full<Bytes>>,
    url: Uri,
    method: Method,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
    request_timeout: Duration,
    deadline: Instant,
    /// Requests handed out so far (a worker takes the next index until `count`).
    next: AtomicU64,
    count: u64,
    show: usize,
    shown: Mutex<Vec<ShownResponse>>,
}

pub fn run(args: &HttpGetArgs) -> Result<HttpGetReport, String> {
    let method = Method::from_bytes(args.method.as_bytes())
        .map_err(|error| format!("--method {}: {error}", args.method))?;
    let headers = args
        .headers
        .iter()
        .map(|h| parse_header(h))
        .collect::<Result<Vec<_>, _>>()?;
    if args.url.scheme_str() != Some("http") || args.url.authority().is_none() {
        return Err(format!("--url {}: want http://HOST:PORT/…", args.url));
    }
    let body_len = usize::try_from(args.body_bytes)
        .ok()
        .filter(|len| *len <= 1 << 30)
        .ok_or_else(|| format!("--body-bytes {} is more than 1 GiB", args.body_bytes))?;
    let runtime = super::runtime(1)?;
    runtime.block_on(async {
        let start = Instant::now();
        let plan = Arc::new(Plan {
            client: client(args),
            url: args.url.clone(),
            method,
            headers,
            body: pattern_bytes(body_len),
            request_timeout: Duration::from_millis(args.request_timeout_ms.max(1)),
            deadline: start + Duration::from_secs(args.timeout_secs),
            next: AtomicU64::new(0),
            count: args.count,
            show: args.show as usize,
            shown: Mutex::default(),
        });
        let workers: Vec<_> = (0..args
            .concurrency
            .min(u32::try_from(args.count).unwrap_or(u32::MAX)))
            .map(|_| tokio::spawn(worker(Arc::clone(&plan))))
            .collect();
        let mut tally = Tally::default();
        for worker in workers {
            match worker.await {
                Ok(part) => tally.merge(part),
                Err(error) => tally.error(format!("worker: {error}")),
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let [p50_us, p99_us, max_us] = tally.latency_us([50.0, 99.0, 100.0]);
        let shown = std::mem::take(&mut *plan.shown.lock().unwrap_or_else(PoisonError::into_inner));
        Ok(HttpGetReport {
            count: args.count,
            completed: tally.completed,
            errors: tally.errors,
            timed_out: tally.sent < args.count,
            error_samples: tally.error_samples,
            by_status: tally.by_status,
            by_server: tally.by_server,
            body_bytes: tally.body_bytes,
            p50_us,
            p99_us,
            max_us,
            secs,
            responses: shown,
        })
    })
}

fn client(args: &HttpGetArgs) -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_millis(args.request_timeout_ms.max(1))));
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .pool_max_idle_per_host(args.concurrency as usize)
        .http2_only(args.h2c)
        .build(connector)
}

async fn worker(plan: Arc<Plan>) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < plan.deadline {
        let index = plan.next.fetch_add(1, Ordering::Relaxed);
        if index >= plan.count {
            break;
        }
        tally.sent += 1;
        let timeout = plan
            .request_timeout
            .min(plan.deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(timeout, one(&plan)).await {
            Ok(Ok((response, latency))) => {
                let server = response
                    .headers
                    .get(SERVED_BY)
                    .cloned()
                    .unwrap_or_else(|| "-".to_owned());
                tally.response(response.status, Some(server), response.body_len, latency);
                let mut shown = plan.shown.lock().unwrap_or_else(PoisonError::into_inner);
                if shown.len() < plan.show {
                    shown.push(response.shown);
                }
            }
            Ok(Err(error)) => tally.error(format!("request {index}: {error}")),
            Err(_) => tally.error(format!("request {index}: no response within {timeout:?}")),
        }
    }
    tally
}

struct Answer {
    status: u16,
    headers: std::collections::BTreeMap<String, String>,
    body_len: u64,
    shown: ShownResponse,
}

async fn one(plan: &Plan) -> Result<(Answer, Duration), String> {
    let mut request = Request::builder()
        .method(plan.method.clone())
        .uri(plan.url.clone());
    for (name, value) in &plan.headers {
        request = request.header(name, value);
    }
    let request = request
        .body(Full::new(plan.body.clone()))
        .map_err(|error| error.to_string())?;
    let sent = Instant::now();
    let response = plan
        .client
        .request(request)
        .await
        .map_err(|error| error_chain(&error))?;
    let (parts, body) = response.into_parts();
    let keep = if plan.show > 0 { SHOW_BODY_LIMIT } else { 0 };
    let (body_len, kept) = read_body(body, keep)
        .await
        .map_err(|error| format!("response body: {}", error_chain(&error)))?;
    let latency = sent.elapsed();
    let headers = header_map(&parts.headers);
    let status = parts.status.as_u16();
    Ok((
        Answer {
            status,
            shown: ShownResponse {
                status,
                version: format!("{:?}", parts.version),
                headers: headers.clone(),
                body: String::from_utf8_lossy(&kept).into_owned(),
            },
            headers,
            body_len,
        },
        latency,
    ))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: HttpGetArgs,
    }

    #[test]
    fn builder_arguments_parse_back() {
        let args = HttpGetArgs::new("http://198.18.1.10:8080/a?b=c".parse().unwrap())
            .count(10)
            .concurrency(3)
            .header("x-a", "1")
            .header("host", "svc")
            .method("POST")
            .body_bytes(100)
            .h2c()
            .show(2)
            .request_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30));
        let line = std::iter::once("x".to_owned()).chain(args.to_args());
        assert_eq!(Wrapper::parse_from(line).args, args);
    }

    #[test]
    fn headers_parse() {
        let (name, value) = parse_header("X-Test: a b").unwrap();
        assert_eq!((name.as_str(), value.to_str().unwrap()), ("x-test", "a b"));
        assert!(parse_header("nocolon").is_err());
        assert!(parse_header("bad name: x").is_err());
    }
}
