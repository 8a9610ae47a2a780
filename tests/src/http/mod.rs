//! The HTTP workload: `weft-workload http-server`, `http-get` and `http-load` (hyper on tokio),
//! the reports they print, and [`Pod`] methods that run them and return typed results.
//!
//! ```text
//! http-server --listen ADDR --name NAME [--fail-percent P --fail-status S] [--delay-ms D] [--h2c] [--garbage]
//! http-get    --url URL [--count N] [--concurrency C] [--header 'K: V']... [--method M] [--body-bytes N] [--h2c] [--show N]
//! http-load   --url URL --rate R --secs S [--connections C] [--h2c]
//! ```
//!
//! The server's behaviour per request is described in [`server`]; the load generator's
//! latency accounting in [`load`].
#![forbid(unsafe_code)]

pub mod body;
pub mod get;
pub mod load;
pub mod report;
pub mod server;
pub mod tally;

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, Result};
pub use get::HttpGetArgs;
pub use load::HttpLoadArgs;
pub use report::{Echo, HttpGetReport, HttpLoadReport, HttpServerReport, ShownResponse};
pub use server::{HttpServerArgs, SERVED_BY};

use crate::{
    Pod,
    process::{Finished, Proc},
    workload::report::Listening,
    workload_bin,
};

/// How long a server gets to print that it listens.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on top of a client's own time limit before the testbed kills it.
const CLIENT_SLACK: Duration = Duration::from_secs(15);
/// How long a stopping server gets to print its report after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A tokio runtime for one subcommand: current-thread for 1, else multi-threaded.
pub(crate) fn runtime(threads: u16) -> Result<tokio::runtime::Runtime, String> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(usize::from(threads));
        builder
    };
    builder
        .enable_all()
        .build()
        .map_err(|error| format!("starting the tokio runtime: {error}"))
}

/// A `weft-workload http-server` running in a pod; killed when dropped.
#[derive(Debug)]
pub struct HttpServer {
    proc: Proc,
    addr: SocketAddr,
}

impl HttpServer {
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The pod IP and the port it listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<pod IP>:<port><path>`.
    #[must_use]
    pub fn url(&self, path: &str) -> hyper::Uri {
        url(self.addr, path)
    }

    #[must_use]
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Stops it (SIGTERM) and returns its report.
    pub fn finish(mut self) -> Result<HttpServerReport> {
        self.proc.terminate(STOP_GRACE)?.json_as()
    }
}

/// `http://<addr><path>` (`path` starts with `/`).
///
/// # Panics
/// If `path` is not a valid URI path.
#[must_use]
pub fn url(addr: SocketAddr, path: &str) -> hyper::Uri {
    format!("http://{addr}{path}")
        .parse()
        .unwrap_or_else(|error| panic!("bad path {path:?}: {error}"))
}

/// A running `weft-workload http-load`; see [`Pod::start_http_load`].
#[derive(Debug)]
pub struct HttpLoad {
    proc: Proc,
    limit: Duration,
}

impl HttpLoad {
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Waits for its report.
    pub fn finish(mut self) -> Result<HttpLoadReport> {
        let finished: Finished = self.proc.wait(self.limit)?;
        finished.json_as()
    }
}

/// Running the HTTP workload in a pod.
impl Pod {
    /// Starts `weft-workload http-server` and waits until it listens; [`HttpServer::addr`] is
    /// the pod's IP with the real port.
    pub fn serve_http(&self, args: &HttpServerArgs) -> Result<HttpServer> {
        let mut command_line = vec!["http-server".to_owned()];
        command_line.extend(args.to_args());
        let proc = self.spawn(workload_bin(), command_line)?;
        let line = proc.wait_for_json(LISTEN_TIMEOUT, "listening")?;
        let listening: Listening = serde_json::from_value(line)?;
        let bound: SocketAddr = listening
            .listening
            .parse()
            .context("http-server printed a bad address")?;
        Ok(HttpServer {
            proc,
            addr: SocketAddrV4::new(self.ip(), bound.port()).into(),
        })
    }

    /// Runs `weft-workload http-get`. Failed requests are in the report, not an error.
    pub fn http_get(&self, args: &HttpGetArgs) -> Result<HttpGetReport> {
        let mut command_line = vec!["http-get".to_owned()];
        command_line.extend(args.to_args());
        let limit = Duration::from_secs(args.timeout_secs)
            + Duration::from_millis(args.request_timeout_ms)
            + CLIENT_SLACK;
        self.run(limit, workload_bin(), command_line)?.json_as()
    }

    /// Runs `weft-workload http-load` to completion.
    pub fn http_load(&self, args: &HttpLoadArgs) -> Result<HttpLoadReport> {
        self.start_http_load(args)?.finish()
    }

    /// Starts `weft-workload http-load` (to watch something while it runs).
    pub fn start_http_load(&self, args: &HttpLoadArgs) -> Result<HttpLoad> {
        let mut command_line = vec!["http-load".to_owned()];
        command_line.extend(args.to_args());
        Ok(HttpLoad {
            proc: self.spawn(workload_bin(), command_line)?,
            limit: args.max_duration() + CLIENT_SLACK,
        })
    }
}
