//! The test workload (`weft-workload`, see `src/bin/weft-workload.rs`): what it prints, the byte
//! pattern it checks, and [`Pod`] methods that run it and return typed results.
#![forbid(unsafe_code)]

pub mod pattern;
pub mod report;
pub mod stats;

use std::{
    fs,
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{
    Pod,
    process::{Finished, Proc},
    teardown, workload_bin,
};
pub use report::{
    ConnectReport, HoldReport, ResetReport, RrReport, ServerReport, StreamReport, TransferReport,
};

/// How long a server gets to print that it listens.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack on top of a client's own time limit before the testbed kills it.
const CLIENT_SLACK: Duration = Duration::from_secs(15);
/// The `transfer` client's own time limit.
const TRANSFER_TIMEOUT: Duration = Duration::from_mins(1);

/// What a `weft-workload server` does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeMode {
    /// Writes back everything; half-closes after the client's EOF.
    Echo,
    /// Reads until EOF, then answers the byte count (8 bytes, big-endian).
    Sink,
    /// Writes the pattern until the client goes away.
    Source,
}

impl ServeMode {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::Sink => "sink",
            Self::Source => "source",
        }
    }
}

/// A `weft-workload server` running in a pod; killed when dropped.
#[derive(Debug)]
pub struct Server {
    proc: Proc,
    addr: SocketAddr,
}

impl Server {
    /// The pod IP and the port it listens on.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[must_use]
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Kills it and returns its output.
    pub fn stop(mut self) -> Result<Finished> {
        self.proc.kill()
    }
}

/// A `weft-workload hold` client keeping connections open and checked; see [`Pod::hold`].
#[derive(Debug)]
pub struct Hold {
    proc: Proc,
    stop_file: PathBuf,
    interval: Duration,
}

impl Hold {
    #[must_use]
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Asks the client to stop after its current round and returns its result.
    pub fn finish(mut self) -> Result<HoldReport> {
        fs::write(&self.stop_file, b"")
            .with_context(|| format!("creating {}", self.stop_file.display()))?;
        let finished = self.proc.wait(self.interval + CLIENT_SLACK);
        if let Err(error) = teardown::ignore_not_found(fs::remove_file(&self.stop_file)) {
            eprintln!("[testbed] removing {}: {error}", self.stop_file.display());
        }
        finished?.json_as()
    }
}

/// Running the workload in a pod.
impl Pod {
    /// Starts `weft-workload server` on `0.0.0.0:<port>` (0: any free port) and waits until it
    /// listens; [`Server::addr`] is the pod's IP with the real port.
    pub fn serve(&self, mode: ServeMode, port: u16) -> Result<Server> {
        self.serve_with(mode, port, &[])
    }

    /// [`Pod::serve`] with more `server` flags (e.g. `--read-delay-ms`).
    pub fn serve_with(&self, mode: ServeMode, port: u16, extra: &[&str]) -> Result<Server> {
        let listen = format!("0.0.0.0:{port}");
        let mut args = vec!["server", "--listen", &listen, "--mode", mode.as_str()];
        args.extend_from_slice(extra);
        let proc = self.spawn(workload_bin(), args)?;
        let line = proc.wait_for_json(LISTEN_TIMEOUT, "listening")?;
        let listening: report::Listening = serde_json::from_value(line)?;
        let bound: SocketAddr = listening
            .listening
            .parse()
            .context("server printed a bad address")?;
        Ok(Server {
            proc,
            addr: SocketAddrV4::new(self.ip(), bound.port()).into(),
        })
    }

    /// `transfer`: `conns` concurrent connections each send `bytes` of the pattern to the echo
    /// server at `to` and verify the echo. Failed connections are in the report, not an error.
    pub fn transfer(&self, to: SocketAddr, bytes: u64, conns: u32) -> Result<TransferReport> {
        self.transfer_within(to, bytes, conns, TRANSFER_TIMEOUT)
    }

    /// [`Pod::transfer`] with a time limit of the caller's (for transfers of gigabytes).
    pub fn transfer_within(
        &self,
        to: SocketAddr,
        bytes: u64,
        conns: u32,
        limit: Duration,
    ) -> Result<TransferReport> {
        let args = [
            "transfer".to_owned(),
            "--connect".to_owned(),
            to.to_string(),
            "--bytes".to_owned(),
            bytes.to_string(),
            "--conns".to_owned(),
            conns.to_string(),
            "--timeout-secs".to_owned(),
            limit.as_secs().max(1).to_string(),
        ];
        self.run(limit + CLIENT_SLACK, workload_bin(), args)?
            .json_as()
    }

    /// `connect`: one connection attempt to `to`; the report says whether and how it failed.
    pub fn try_connect(&self, to: SocketAddr, timeout: Duration) -> Result<ConnectReport> {
        let args = [
            "connect".to_owned(),
            "--connect".to_owned(),
            to.to_string(),
            "--timeout-ms".to_owned(),
            millis(timeout),
        ];
        self.run(timeout + CLIENT_SLACK, workload_bin(), args)?
            .json_as()
    }

    /// [`Pod::try_connect`] from a process in one of the pod's containers (a cgroup below the
    /// pod's, see [`Pod::command_in_container`]).
    pub fn try_connect_from(
        &self,
        container: &str,
        to: SocketAddr,
        timeout: Duration,
    ) -> Result<ConnectReport> {
        let mut command = self.command_in_container(container, workload_bin())?;
        command.args([
            "connect",
            "--connect",
            &to.to_string(),
            "--timeout-ms",
            &millis(timeout),
        ]);
        crate::Proc::spawn(
            format!("{}/{container}: connect", self.name()),
            &mut command,
        )?
        .wait(timeout + CLIENT_SLACK)?
        .json_as()
    }

    /// `reset`: connects to `to`, sends a little and aborts the connection with an RST.
    pub fn reset(&self, to: SocketAddr) -> Result<ResetReport> {
        self.run(
            CLIENT_SLACK,
            workload_bin(),
            ["reset", "--connect", &to.to_string()],
        )?
        .json_as()
    }

    /// `rr`: request/response of `size` bytes on one connection to the echo server at `to`
    /// for `duration`, with latency percentiles.
    pub fn rr(&self, to: SocketAddr, size: usize, duration: Duration) -> Result<RrReport> {
        let args = [
            "rr".to_owned(),
            "--connect".to_owned(),
            to.to_string(),
            "--size".to_owned(),
            size.to_string(),
            "--secs".to_owned(),
            duration.as_secs_f64().to_string(),
        ];
        self.run(duration + CLIENT_SLACK, workload_bin(), args)?
            .json_as()
    }

    /// `stream`: sends to the sink server at `to` for `duration`; throughput and the server's
    /// count.
    pub fn stream(&self, to: SocketAddr, duration: Duration) -> Result<StreamReport> {
        let args = [
            "stream".to_owned(),
            "--connect".to_owned(),
            to.to_string(),
            "--secs".to_owned(),
            duration.as_secs_f64().to_string(),
        ];
        self.run(duration + CLIENT_SLACK, workload_bin(), args)?
            .json_as()
    }

    /// `hold`: opens `conns` connections to the echo server at `to` and checks each with a small
    /// message every `interval` until [`Hold::finish`] (or `max` has passed). Returns once all
    /// connections are open.
    pub fn hold(
        &self,
        to: SocketAddr,
        conns: u32,
        interval: Duration,
        max: Duration,
    ) -> Result<Hold> {
        let run = &self.node().run;
        let stop_file = run
            .state_dir()
            .join(format!("hold-{}.stop", run.next_serial()));
        let args = [
            "hold".to_owned(),
            "--connect".to_owned(),
            to.to_string(),
            "--conns".to_owned(),
            conns.to_string(),
            "--interval-ms".to_owned(),
            millis(interval),
            "--until-file".to_owned(),
            stop_file.display().to_string(),
            "--max-secs".to_owned(),
            max.as_secs().max(1).to_string(),
        ];
        let proc = self.spawn(workload_bin(), args)?;
        proc.wait_for_json(CLIENT_SLACK, "ready")?;
        Ok(Hold {
            proc,
            stop_file,
            interval,
        })
    }
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}
