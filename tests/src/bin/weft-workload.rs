//! `weft-workload`: the servers and clients that run inside testbed pods. Real TCP sockets, one
//! thread per connection (the `http-*` subcommands: hyper on tokio, see `testbed::http`); every
//! loop is bounded in iterations and in time. Each subcommand
//! prints one JSON object as its last stdout line (types in `testbed::workload::report`);
//! setup failures print `{"error": "..."}` and exit 2.
#![forbid(unsafe_code)]

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use clap::{Args, Parser, Subcommand};
use nix::sys::socket::{setsockopt, sockopt};
use serde::Serialize;
use testbed::http::{self, HttpGetArgs, HttpLoadArgs, HttpServerArgs};
use testbed::workload::{
    ServeMode,
    pattern::Pattern,
    report::{
        ConnectReport, HoldReport, Listening, Ready, ResetReport, RrReport, ServerReport,
        StreamReport, TransferReport,
    },
    stats::percentile,
};

/// Errors kept in a report; the rest are only counted.
const MAX_ERRORS: usize = 8;
/// Upper bound on iterations of byte-moving loops (far above what their time limit allows).
const MAX_IO_ITERATIONS: u64 = 1 << 40;
/// Size of each connection's IO buffer in the server.
const SERVER_BUFFER: usize = 64 * 1024;

#[derive(Parser)]
#[command(
    name = "weft-workload",
    about = "Test servers and clients for the Weft netns testbed"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accept connections and echo, sink or source data, one thread per connection.
    Server(ServerArgs),
    /// Concurrent connections each send a verified byte pattern through an echo server.
    Transfer(TransferArgs),
    /// Connect, send a little, abort with an RST (`SO_LINGER` 0).
    Reset(ResetArgs),
    /// Keep connections open, checking each with a small echo every interval.
    Hold(HoldArgs),
    /// One connection attempt; reports the errno (exits 0 either way).
    Connect(ConnectArgs),
    /// Connection attempts every interval; prints a JSON line each time the outcome changes
    /// (connected, or which errno), with the wall-clock time: how long a policy change takes to
    /// reach the kernel.
    VerdictWatch(VerdictWatchArgs),
    /// Request/response latency on one connection to an echo server.
    Rr(RrArgs),
    /// Throughput to a sink server.
    Stream(StreamArgs),
    /// HTTP/1.1 and h2c server whose answers the request path chooses (see `testbed::http::server`).
    HttpServer(HttpServerArgs),
    /// HTTP requests over keep-alive connections: counts per status and backend, latency.
    HttpGet(HttpGetArgs),
    /// Open-loop constant-rate HTTP load (wrk2-style latency from the intended send time).
    HttpLoad(HttpLoadArgs),
    /// gRPC server (tonic): unary `weft.test.Echo/Say`, optionally failing every N-th call.
    GrpcServer(testbed::grpc::GrpcServerArgs),
    /// Sequential unary gRPC calls over one HTTP/2 connection.
    GrpcCall(testbed::grpc::GrpcCallArgs),
    /// OTLP/HTTP trace receiver: decodes exports with the protocol's types, prints each span.
    OtlpReceiver(testbed::OtlpReceiverArgs),
}

#[derive(Args)]
struct ServerArgs {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long, value_enum)]
    mode: ServeMode,
    /// Exit after this many seconds (tests normally kill it earlier).
    #[arg(long, default_value_t = 3600)]
    max_secs: u64,
    /// Exit after accepting this many connections.
    #[arg(long, default_value_t = 1_000_000)]
    max_conns: u64,
    /// Drop a connection that stays silent (or does not drain) for this many seconds.
    #[arg(long, default_value_t = 300)]
    idle_secs: u64,
    /// Read nothing from a new connection for this long (a reader that falls behind).
    #[arg(long, default_value_t = 0)]
    read_delay_ms: u64,
}

#[derive(Args)]
struct TransferArgs {
    #[arg(long)]
    connect: SocketAddr,
    /// Bytes each connection sends.
    #[arg(long)]
    bytes: u64,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    conns: u32,
    /// Size of each write.
    #[arg(long, default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1..=(16 << 20)))]
    chunk: u32,
    /// Give up on connections not done after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

#[derive(Args)]
struct ResetArgs {
    #[arg(long)]
    connect: SocketAddr,
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(..=(16 << 20)))]
    bytes: u32,
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

#[derive(Args)]
struct HoldArgs {
    #[arg(long)]
    connect: SocketAddr,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    conns: u32,
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Stop once this file exists.
    #[arg(long)]
    until_file: PathBuf,
    /// Stop after this many seconds in any case.
    #[arg(long)]
    max_secs: u64,
    /// Time limit of one connect or one echo.
    #[arg(long, default_value_t = 5000)]
    io_timeout_ms: u64,
}

#[derive(Args)]
struct ConnectArgs {
    #[arg(long)]
    connect: SocketAddr,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

#[derive(Args)]
struct VerdictWatchArgs {
    #[arg(long)]
    connect: SocketAddr,
    /// Pause between attempts.
    #[arg(long, default_value_t = 1)]
    interval_ms: u64,
    /// Stops after this long.
    #[arg(long)]
    secs: f64,
}

#[derive(Args)]
struct RrArgs {
    #[arg(long)]
    connect: SocketAddr,
    /// Bytes per request (and response).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=(16 << 20)))]
    size: u32,
    #[arg(long)]
    secs: f64,
    #[arg(long, default_value_t = 2_000_000)]
    max_iters: u64,
    /// Time limit of one round trip.
    #[arg(long, default_value_t = 5000)]
    io_timeout_ms: u64,
}

#[derive(Args)]
struct StreamArgs {
    #[arg(long)]
    connect: SocketAddr,
    #[arg(long)]
    secs: f64,
    #[arg(long, default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(1..=(16 << 20)))]
    chunk: u32,
    /// Time limit of one write, and of waiting for the server's count.
    #[arg(long, default_value_t = 30_000)]
    io_timeout_ms: u64,
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().command {
        Command::Server(args) => server(&args).map(|report| emit_result(&report, true)),
        Command::Transfer(args) => Ok({
            let report = transfer(&args);
            emit_result(&report, report.all_ok())
        }),
        Command::Reset(args) => Ok({
            let report = reset(&args);
            emit_result(&report, report.ok)
        }),
        Command::Hold(args) => Ok({
            let report = hold(&args);
            emit_result(&report, report.broken == 0)
        }),
        Command::Connect(args) => Ok(emit_result(&connect_once(&args), true)),
        Command::VerdictWatch(args) => {
            duration_from_secs(args.secs).map(|secs| verdict_watch(&args, secs))
        }
        Command::Rr(args) => duration_from_secs(args.secs).map(|secs| {
            let report = rr(&args, secs);
            emit_result(&report, report.error.is_none())
        }),
        Command::Stream(args) => duration_from_secs(args.secs).map(|secs| {
            let report = stream(&args, secs);
            emit_result(&report, report.ok)
        }),
        Command::HttpServer(args) => http::server::run(&args, |local| {
            emit(&Listening {
                listening: local.to_string(),
            });
        })
        .map(|report| emit_result(&report, true)),
        // Failed requests are results (tests provoke them), so these exit 0 once they ran.
        Command::HttpGet(args) => http::get::run(&args).map(|report| emit_result(&report, true)),
        Command::HttpLoad(args) => http::load::run(&args).map(|report| emit_result(&report, true)),
        Command::GrpcServer(args) => testbed::grpc::serve(&args, |local| {
            emit(&Listening {
                listening: local.to_string(),
            });
        })
        .map(|report| emit_result(&report, true)),
        Command::GrpcCall(args) => {
            testbed::grpc::call(&args).map(|report| emit_result(&report, true))
        }
        Command::OtlpReceiver(args) => testbed::otlp_receiver(&args, |local| {
            emit(&Listening {
                listening: local.to_string(),
            });
        })
        .map(|()| ExitCode::SUCCESS),
    };
    outcome.unwrap_or_else(|error| {
        emit(&serde_json::json!({ "error": error }));
        ExitCode::from(2)
    })
}

/// Prints one JSON line and flushes (callers wait for lines while the process runs).
fn emit(value: &impl Serialize) {
    let mut out = io::stdout().lock();
    // Nothing sensible to do if stdout is gone.
    let _ = serde_json::to_writer(&mut out, value)
        .map_err(io::Error::from)
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush());
}

fn emit_result(report: &impl Serialize, ok: bool) -> ExitCode {
    emit(report);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn duration_from_secs(secs: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs).map_err(|error| format!("--secs {secs}: {error}"))
}

// ---------------------------------------------------------------------------------------------
// Bounds

/// A loop's limits: at most `left` more iterations, none after `deadline`.
struct Budget {
    what: &'static str,
    deadline: Instant,
    left: u64,
}

impl Budget {
    fn new(what: &'static str, limit: Duration, max_iterations: u64) -> Self {
        Self {
            what,
            deadline: deadline_after(limit),
            left: max_iterations,
        }
    }

    fn until(what: &'static str, deadline: Instant, max_iterations: u64) -> Self {
        Self {
            what,
            deadline,
            left: max_iterations,
        }
    }

    /// Accounts for one more iteration, failing once a limit is reached.
    fn tick(&mut self) -> io::Result<()> {
        if self.left == 0 {
            return Err(io::Error::other(format!(
                "{}: iteration limit reached",
                self.what
            )));
        }
        if Instant::now() >= self.deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{}: time limit reached", self.what),
            ));
        }
        self.left -= 1;
        Ok(())
    }
}

/// `now + limit`, saturating far in the future instead of overflowing.
fn deadline_after(limit: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(limit)
        .unwrap_or_else(|| now + Duration::from_hours(100 * 365 * 24))
}

/// Time left until `deadline`, at least 1 ms (socket timeouts reject zero).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout.max(Duration::from_millis(1)))?;
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    Ok(stream)
}

fn push_error(errors: &mut Vec<String>, error: String) {
    if errors.len() < MAX_ERRORS {
        errors.push(error);
    }
}

// ---------------------------------------------------------------------------------------------
// server

#[derive(Default)]
struct ServerStats {
    accepted: AtomicU64,
    accept_errors: AtomicU64,
    conn_errors: AtomicU64,
    bytes: AtomicU64,
}

impl ServerStats {
    fn report(&self) -> ServerReport {
        ServerReport {
            accepted: self.accepted.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
            conn_errors: self.conn_errors.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

fn server(args: &ServerArgs) -> Result<ServerReport, String> {
    let listener = TcpListener::bind(args.listen)
        .map_err(|error| format!("binding {}: {error}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|error| format!("local address: {error}"))?;
    emit(&Listening {
        listening: local.to_string(),
    });

    let limit = Duration::from_secs(args.max_secs);
    let deadline = deadline_after(limit);
    let stats = Arc::new(ServerStats::default());
    // accept() blocks: the time limit is enforced from outside.
    let watchdog_stats = Arc::clone(&stats);
    thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            thread::sleep(limit);
            emit(&watchdog_stats.report());
            std::process::exit(0);
        })
        .map_err(|error| format!("starting the watchdog: {error}"))?;

    let idle = Duration::from_secs(args.idle_secs.max(1));
    let mut accepts = Budget::until("accept loop", deadline, args.max_conns);
    while accepts.tick().is_ok() {
        match listener.accept() {
            Ok((stream, peer)) => {
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                let conn_stats = Arc::clone(&stats);
                let mode = args.mode;
                let read_delay = Duration::from_millis(args.read_delay_ms);
                let spawned =
                    thread::Builder::new()
                        .name(format!("conn {peer}"))
                        .spawn(move || {
                            thread::sleep(read_delay);
                            if let Err(error) = handle(&stream, mode, idle, deadline, &conn_stats) {
                                conn_stats.conn_errors.fetch_add(1, Ordering::Relaxed);
                                eprintln!("{peer}: {error}");
                            }
                        });
                if let Err(error) = spawned {
                    stats.conn_errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("{peer}: no thread for the connection: {error}");
                }
            }
            Err(error) => {
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("accept: {error}");
                // E.g. EMFILE: do not spin.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
    Ok(stats.report())
}

/// Reads the way event-loop programs (tokio, Go, Java NIO, nginx) do: wait with `poll()` until
/// the socket is readable, then a non-blocking `recv()`; a readiness report without data means
/// "poll again", as `poll()` allows. Writes stay blocking. Blocking `recv()` on a socket in the
/// sockhash can fail with a spurious `EAGAIN` on kernels that fail the agent's socket
/// self-test (see ARCHITECTURE.md, "The socket fast path"); this tool never hides that from a
/// blocking reader, it is simply not one. The socket's read timeout bounds each read.
struct Polled<'a> {
    stream: &'a TcpStream,
    timeout: Option<Duration>,
}

impl<'a> Polled<'a> {
    fn new(stream: &'a TcpStream) -> io::Result<Self> {
        Ok(Self {
            stream,
            timeout: stream.read_timeout()?,
        })
    }
}

impl Read for Polled<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::{
            errno::Errno,
            poll::{PollFd, PollFlags, PollTimeout, poll},
            sys::socket::{MsgFlags, recv},
        };
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let deadline = self.timeout.map(|t| Instant::now() + t);
        loop {
            let wait = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(io::ErrorKind::WouldBlock, "read timed out"));
                    }
                    PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, wait) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
            match recv(self.stream.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                other => return other.map_err(Into::into),
            }
        }
    }
}

fn handle(
    stream: &TcpStream,
    mode: ServeMode,
    idle: Duration,
    deadline: Instant,
    stats: &ServerStats,
) -> io::Result<()> {
    stream.set_read_timeout(Some(idle))?;
    stream.set_write_timeout(Some(idle))?;
    stream.set_nodelay(true)?;
    let mut budget = Budget::until("connection", deadline, MAX_IO_ITERATIONS);
    let mut buf = vec![0; SERVER_BUFFER];
    let mut stream = stream;
    let mut reader = Polled::new(stream)?;
    match mode {
        ServeMode::Echo => loop {
            budget.tick()?;
            let n = reader.read(&mut buf)?;
            if n == 0 {
                // Everything read has been written back: half-close to pass the EOF on.
                return stream.shutdown(Shutdown::Write);
            }
            stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
            stream.write_all(&buf[..n])?;
        },
        ServeMode::Sink => {
            let mut count: u64 = 0;
            loop {
                budget.tick()?;
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                count += n as u64;
                stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            stream.write_all(&count.to_be_bytes())?;
            stream.shutdown(Shutdown::Write)
        }
        ServeMode::Source => {
            let mut pattern = Pattern::new(0);
            loop {
                budget.tick()?;
                pattern.fill(&mut buf);
                match stream.write_all(&buf) {
                    Ok(()) => {}
                    // The client went away: that is how a source connection ends.
                    Err(error)
                        if matches!(
                            error.kind(),
                            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                        ) =>
                    {
                        return Ok(());
                    }
                    Err(error) => return Err(error),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// transfer

/// What one transfer connection achieved.
#[derive(Default)]
struct Outcome {
    sent: u64,
    verified: u64,
    error: Option<String>,
}

fn transfer(args: &TransferArgs) -> TransferReport {
    let deadline = deadline_after(Duration::from_secs(args.timeout_secs));
    let chunk = args.chunk as usize;
    let workers: Vec<_> = (0..args.conns)
        .map(|index| {
            let (addr, bytes) = (args.connect, args.bytes);
            thread::Builder::new()
                .name(format!("transfer {index}"))
                .spawn(move || transfer_one(addr, u64::from(index), bytes, chunk, deadline))
        })
        .collect();
    let mut report = TransferReport {
        conns: args.conns,
        ..TransferReport::default()
    };
    for (index, worker) in workers.into_iter().enumerate() {
        let outcome = match worker {
            Ok(handle) => handle.join().unwrap_or_else(|_| Outcome {
                error: Some("worker panicked".into()),
                ..Outcome::default()
            }),
            Err(error) => Outcome {
                error: Some(format!("no thread: {error}")),
                ..Outcome::default()
            },
        };
        report.bytes_sent += outcome.sent;
        report.bytes_verified += outcome.verified;
        match outcome.error {
            None => report.ok += 1,
            Some(error) => {
                report.failed += 1;
                push_error(&mut report.errors, format!("conn {index}: {error}"));
            }
        }
    }
    report
}

/// Sends `bytes` of pattern `seed` while a second thread reads and checks the echo.
fn transfer_one(
    addr: SocketAddr,
    seed: u64,
    bytes: u64,
    chunk: usize,
    deadline: Instant,
) -> Outcome {
    let stream = match connect(addr, remaining(deadline)) {
        Ok(stream) => stream,
        Err(error) => {
            return Outcome {
                error: Some(format!("connect: {error}")),
                ..Outcome::default()
            };
        }
    };
    let reader = match stream.try_clone() {
        Ok(reader) => reader,
        Err(error) => {
            return Outcome {
                error: Some(format!("dup: {error}")),
                ..Outcome::default()
            };
        }
    };
    let verify_thread = match thread::Builder::new()
        .spawn(move || verify_echo(&reader, seed, bytes, chunk, deadline))
    {
        Ok(handle) => handle,
        Err(error) => {
            return Outcome {
                error: Some(format!("no reader thread: {error}")),
                ..Outcome::default()
            };
        }
    };
    let (sent, send_result) = send_pattern(&stream, seed, bytes, chunk, deadline);
    let send_error = match send_result.and_then(|()| stream.shutdown(Shutdown::Write)) {
        Ok(()) => None,
        Err(error) => {
            // Unblock the reader: nothing more will be echoed.
            let _ = stream.shutdown(Shutdown::Both);
            Some(format!("send after {sent} bytes: {error}"))
        }
    };
    let (verified, verify_error) = verify_thread
        .join()
        .unwrap_or_else(|_| (0, Some("reader panicked".into())));
    Outcome {
        sent,
        verified,
        error: send_error.or(verify_error),
    }
}

fn send_pattern(
    mut stream: &TcpStream,
    seed: u64,
    bytes: u64,
    chunk: usize,
    deadline: Instant,
) -> (u64, io::Result<()>) {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0; chunk];
    let mut sent = 0;
    let mut budget = Budget::until("send", deadline, MAX_IO_ITERATIONS);
    while sent < bytes {
        if let Err(error) = budget.tick() {
            return (sent, Err(error));
        }
        let len = usize::try_from(bytes - sent).map_or(chunk, |left| left.min(chunk));
        pattern.fill(&mut buf[..len]);
        if let Err(error) = stream.write_all(&buf[..len]) {
            return (sent, Err(error));
        }
        sent += len as u64;
    }
    (sent, Ok(()))
}

/// Reads the echo until EOF, comparing it with the pattern; returns the bytes that matched and
/// the first problem. On a problem it shuts the socket down so that the sender stops too.
fn verify_echo(
    stream: &TcpStream,
    seed: u64,
    bytes: u64,
    chunk: usize,
    deadline: Instant,
) -> (u64, Option<String>) {
    let mut expected = Pattern::new(seed);
    let mut buf = vec![0; chunk.max(SERVER_BUFFER)];
    let mut want = vec![0; buf.len()];
    let mut verified: u64 = 0;
    let mut budget = Budget::until("verify", deadline, MAX_IO_ITERATIONS);
    let mut reader = match Polled::new(stream) {
        Ok(r) => r,
        Err(error) => return (0, Some(format!("read timeout: {error}"))),
    };
    let problem = loop {
        if let Err(error) = budget.tick() {
            break format!("echo after {verified} bytes: {error}");
        }
        let n = match reader.read(&mut buf) {
            Ok(0) if verified == bytes => return (verified, None),
            Ok(0) => break format!("echo ended after {verified} of {bytes} bytes"),
            Ok(n) => n,
            Err(error) => break format!("echo after {verified} bytes: {error}"),
        };
        if verified + n as u64 > bytes {
            break format!("echo longer than the {bytes} bytes sent");
        }
        expected.fill(&mut want[..n]);
        if let Some(offset) = buf[..n]
            .iter()
            .zip(&want[..n])
            .position(|(got, want)| got != want)
        {
            break format!("echo differs at byte {}", verified + offset as u64);
        }
        verified += n as u64;
    };
    let _ = stream.shutdown(Shutdown::Both);
    (verified, Some(problem))
}

// ---------------------------------------------------------------------------------------------
// reset, connect

fn reset(args: &ResetArgs) -> ResetReport {
    let mut report = ResetReport::default();
    let result = (|| -> io::Result<()> {
        let mut stream = connect(args.connect, Duration::from_millis(args.timeout_ms))?;
        let mut data = vec![0; args.bytes as usize];
        Pattern::new(0).fill(&mut data);
        stream.write_all(&data)?;
        report.sent = data.len() as u64;
        // Linger on, zero seconds: close() sends an RST instead of a FIN.
        setsockopt(
            &stream,
            sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .map_err(io::Error::from)?;
        drop(stream);
        Ok(())
    })();
    match result {
        Ok(()) => report.ok = true,
        Err(error) => report.error = Some(error.to_string()),
    }
    report
}

/// One line per change of outcome: `{"seq":N,"ok":bool,"errno":E,"unix_us":T}`. An allowed
/// attempt at a port nobody listens on is refused by the peer (`ECONNREFUSED`), a denied one by
/// the kernel before any packet (`EPERM`): neither leaves a connection behind, so attempts can be
/// frequent for minutes without filling the port range.
fn verdict_watch(args: &VerdictWatchArgs, secs: Duration) -> ExitCode {
    let end = Instant::now() + secs;
    let mut last: Option<(bool, Option<i32>)> = None;
    let mut seq = 0u64;
    while Instant::now() < end {
        let outcome = match TcpStream::connect_timeout(&args.connect, Duration::from_millis(500)) {
            Ok(_) => (true, None),
            Err(error) => (false, error.raw_os_error()),
        };
        if last != Some(outcome) {
            let unix_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            emit(&serde_json::json!({
                "seq": seq, "ok": outcome.0, "errno": outcome.1, "unix_us": unix_us,
            }));
            seq += 1;
            last = Some(outcome);
        }
        thread::sleep(Duration::from_millis(args.interval_ms));
    }
    ExitCode::SUCCESS
}

fn connect_once(args: &ConnectArgs) -> ConnectReport {
    let start = Instant::now();
    let result =
        TcpStream::connect_timeout(&args.connect, Duration::from_millis(args.timeout_ms.max(1)));
    let elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    match result {
        Ok(stream) => ConnectReport {
            ok: true,
            peer: stream.peer_addr().ok().map(|a| a.to_string()),
            elapsed_us,
            ..ConnectReport::default()
        },
        Err(error) => ConnectReport {
            ok: false,
            errno: error.raw_os_error(),
            timed_out: error.kind() == io::ErrorKind::TimedOut,
            error: Some(error.to_string()),
            peer: None,
            elapsed_us,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// hold

/// Upper bound on `hold` rounds (its time limit normally ends it first).
const MAX_HOLD_ROUNDS: u64 = 10_000_000;

fn hold(args: &HoldArgs) -> HoldReport {
    let io_timeout = Duration::from_millis(args.io_timeout_ms.max(1));
    let mut report = HoldReport {
        conns: args.conns,
        ..HoldReport::default()
    };
    let mut budget = Budget::new("hold", Duration::from_secs(args.max_secs), MAX_HOLD_ROUNDS);
    let mut conns = Vec::new();
    for index in 0..args.conns {
        match connect(args.connect, io_timeout.min(remaining(budget.deadline))) {
            Ok(stream) => conns.push(Some(stream)),
            Err(error) => {
                report.broken += 1;
                push_error(
                    &mut report.errors,
                    format!("conn {index}: connect: {error}"),
                );
            }
        }
    }
    if report.broken > 0 {
        return report;
    }
    emit(&Ready { ready: args.conns });
    let interval = Duration::from_millis(args.interval_ms);
    while !args.until_file.exists() && conns.iter().any(Option::is_some) && budget.tick().is_ok() {
        report.rounds += 1;
        for (index, slot) in conns.iter_mut().enumerate() {
            let Some(stream) = slot else { continue };
            if let Err(error) = ping(stream, report.rounds, index) {
                report.broken += 1;
                push_error(
                    &mut report.errors,
                    format!("conn {index} round {}: {error}", report.rounds),
                );
                *slot = None;
            }
        }
        thread::sleep(interval.min(remaining(budget.deadline)));
    }
    report
}

/// Sends a message naming the round and connection and checks that it comes back unchanged.
fn ping(mut stream: &TcpStream, round: u64, index: usize) -> io::Result<()> {
    let message = format!("{round:010} {index:06}\n");
    stream.write_all(message.as_bytes())?;
    let mut echo = vec![0; message.len()];
    Polled::new(stream)?.read_exact(&mut echo)?;
    if echo != message.as_bytes() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "sent {message:?}, echo {:?}",
                String::from_utf8_lossy(&echo)
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// rr, stream

fn rr(args: &RrArgs, duration: Duration) -> RrReport {
    let size = args.size as usize;
    let mut report = RrReport {
        size,
        ..RrReport::default()
    };
    let mut latencies_ns: Vec<u64> =
        Vec::with_capacity(usize::try_from(args.max_iters.min(1 << 16)).unwrap_or(0));
    let start = Instant::now();
    let result = (|| -> io::Result<()> {
        let stream = connect(args.connect, Duration::from_millis(args.io_timeout_ms))?;
        stream.set_nodelay(true)?;
        let mut reader = Polled::new(&stream)?;
        let mut writer = &stream;
        let mut request = vec![0; size];
        Pattern::new(0).fill(&mut request);
        let mut response = vec![0; size];
        let mut budget = Budget::new("rr", duration, args.max_iters);
        while budget.tick().is_ok() {
            let sent = Instant::now();
            writer.write_all(&request)?;
            reader.read_exact(&mut response)?;
            latencies_ns.push(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX));
            if response != request {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "echo differs from the request",
                ));
            }
        }
        Ok(())
    })();
    report.error = result.err().map(|error| error.to_string());
    report.secs = start.elapsed().as_secs_f64();
    report.transactions = latencies_ns.len() as u64;
    #[allow(clippy::cast_precision_loss)] // reason: counts and nanoseconds far below 2^52
    {
        report.tps = report.transactions as f64 / report.secs.max(f64::EPSILON);
        latencies_ns.sort_unstable();
        let micros = |pct: f64| percentile(&latencies_ns, pct).map_or(0.0, |ns| ns as f64 / 1000.0);
        report.p50_us = micros(50.0);
        report.p90_us = micros(90.0);
        report.p99_us = micros(99.0);
        report.max_us = micros(100.0);
    }
    report
}

fn stream(args: &StreamArgs, duration: Duration) -> StreamReport {
    let mut report = StreamReport::default();
    let start = Instant::now();
    let result = (|| -> io::Result<()> {
        let mut stream = connect(args.connect, Duration::from_millis(args.io_timeout_ms))?;
        let mut data = vec![0; args.chunk as usize];
        Pattern::new(0).fill(&mut data);
        let mut budget = Budget::new("stream", duration, MAX_IO_ITERATIONS);
        while budget.tick().is_ok() {
            stream.write_all(&data)?;
            report.bytes += data.len() as u64;
        }
        stream.shutdown(Shutdown::Write)?;
        let mut count = [0; 8];
        Polled::new(&stream)?.read_exact(&mut count)?;
        report.server_bytes = Some(u64::from_be_bytes(count));
        Ok(())
    })();
    report.secs = start.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)] // reason: byte counts far below 2^52
    {
        report.gbps = report.bytes as f64 * 8.0 / report.secs.max(f64::EPSILON) / 1e9;
    }
    match result {
        Ok(()) if report.server_bytes == Some(report.bytes) => report.ok = true,
        Ok(()) => {
            report.error = Some(format!(
                "sent {} bytes, the server counted {:?}",
                report.bytes, report.server_bytes
            ));
        }
        Err(error) => report.error = Some(error.to_string()),
    }
    report
}
