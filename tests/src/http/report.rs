//! What the HTTP subcommands of `weft-workload` print: the binary serialises these types and the
//! testbed deserialises them. `http-server` first prints a [`crate::workload::report::Listening`]
//! line, like `server`.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Result of `http-server`, printed when it stops (SIGTERM, SIGINT or `--max-secs`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpServerReport {
    pub name: String,
    /// Connections accepted.
    pub connections: u64,
    /// Connections that ended with an error (protocol error, reset, header timeout…).
    pub conn_errors: u64,
    /// Requests answered (including failures injected with `--fail-percent`).
    pub requests: u64,
    /// Responses per status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests per HTTP version as hyper names it (`HTTP/1.1`, `HTTP/2.0`).
    pub by_version: BTreeMap<String, u64>,
    /// Requests per `traceparent` header value (those that carried one), failures included.
    #[serde(default)]
    pub traceparents: BTreeMap<String, u64>,
    /// Request body bytes read, over all requests.
    pub body_bytes: u64,
    /// Connections answered with junk bytes (`/garbage` or `--garbage`).
    pub garbage: u64,
    /// The first few connection errors.
    pub errors: Vec<String>,
}

/// The JSON body of an ordinary `http-server` response: what the server saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    pub server: String,
    pub method: String,
    pub path: String,
    /// The query string without `?` (empty when there is none).
    pub query: String,
    /// `HTTP/1.1` or `HTTP/2.0`: what reached the server (a proxy may change it).
    pub version: String,
    /// Request headers, lower-case names; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    pub body_bytes: u64,
    /// The TCP peer of the connection: the client pod, or the proxy that forwarded the request.
    pub peer: String,
}

/// One response kept by `http-get --show N`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShownResponse {
    pub status: u16,
    pub version: String,
    pub headers: BTreeMap<String, String>,
    /// The body as text (lossy UTF-8), at most 64 KiB of it.
    pub body: String,
}

impl ShownResponse {
    /// The body parsed as the server's [`Echo`] (fails for other bodies, e.g. a proxy's own
    /// error page).
    pub fn echo(&self) -> serde_json::Result<Echo> {
        serde_json::from_str(&self.body)
    }
}

/// Result of `http-get`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpGetReport {
    /// Requests asked for.
    pub count: u64,
    /// Requests with a complete response (any status).
    pub completed: u64,
    /// Requests that got no complete response (connect, protocol or timeout errors).
    pub errors: u64,
    /// The first few errors.
    pub error_samples: Vec<String>,
    /// Responses per status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Responses per `x-served-by` header (`-` when absent).
    pub by_server: BTreeMap<String, u64>,
    /// Response body bytes read.
    pub body_bytes: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub secs: f64,
    /// The overall `--timeout-secs` ended the run before every request was made.
    pub timed_out: bool,
    /// The first `--show` responses, in completion order.
    pub responses: Vec<ShownResponse>,
}

impl HttpGetReport {
    /// Responses with status `status`.
    #[must_use]
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Responses with a 2xx status.
    #[must_use]
    pub fn ok(&self) -> u64 {
        self.by_status
            .iter()
            .filter(|(code, _)| (200..300).contains(*code))
            .map(|(_, n)| n)
            .sum()
    }

    /// Every request got a 2xx response.
    #[must_use]
    pub fn all_ok(&self) -> bool {
        self.count > 0 && self.errors == 0 && self.ok() == self.count
    }
}

/// Result of `http-load`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpLoadReport {
    pub target_rps: f64,
    /// The scheduling window (`--secs`).
    pub secs: f64,
    pub connections: u32,
    /// Requests scheduled in the window (`⌈rate × secs⌉`).
    pub scheduled: u64,
    pub sent: u64,
    /// Requests with a complete response (any status).
    pub completed: u64,
    /// Scheduled requests never sent: the drain time after the window ran out.
    pub missed: u64,
    /// Completed requests per second, from the start to the last completion.
    pub achieved_rps: f64,
    pub elapsed_secs: f64,
    /// Latency from the intended send time (see `http::load`), in microseconds.
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Completed requests whose status was not 2xx.
    pub non_2xx: u64,
    pub by_status: BTreeMap<u16, u64>,
}

impl HttpLoadReport {
    /// Every scheduled request was sent and answered with a 2xx status.
    #[must_use]
    pub fn clean(&self) -> bool {
        self.errors == 0
            && self.non_2xx == 0
            && self.missed == 0
            && self.completed == self.scheduled
    }
}
