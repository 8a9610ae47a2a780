//! `weft-workload http-server`: an HTTP/1.1 (keep-alive) and HTTP/2 prior-knowledge (h2c) server
//! on hyper whose behaviour is chosen by each request, so one server serves many tests.
//!
//! Every response carries `x-served-by: <name>`. Unless the path asks otherwise, the body is the
//! JSON [`Echo`] of what the server saw. The path is read as `keyword/number` pairs anywhere in
//! it (`/api/delay/50/status/503` works):
//!
//! | path | answer |
//! | --- | --- |
//! | `/status/CODE` | status CODE (200–599), JSON body |
//! | `/delay/MS` | waits MS milliseconds (at most 60 s) first |
//! | `/read-delay/MS` | leaves the request body unread for MS milliseconds (at most 60 s) |
//! | `/bytes/N` | N bytes of the workload's pattern, chunked (at most 1 GiB) |
//! | `/garbage` | junk bytes instead of a response, then the connection is closed |
//!
//! Request bodies are read in full and counted. `--fail-percent P` answers `--fail-status` to
//! exactly P% of the requests, deterministically: request n (counted from 1 over the whole
//! server) fails when ⌊n·P/100⌋ > ⌊(n−1)·P/100⌋, so P=50 fails every 2nd request, P=25 every 4th,
//! P=10 every 10th, P=100 all. With concurrent clients *which* requests fail depends on arrival
//! order; how many does not.
//!
//! `/garbage` is meant for HTTP/1.1: the junk replaces the bytes of the response on the raw
//! connection (see [`GarbageIo`]); on an HTTP/2 connection it breaks the whole connection.
//! `--garbage` does it for every request.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::Incoming,
    header::{CONTENT_TYPE, HeaderValue},
    rt::{Read, ReadBufCursor, Write},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    time::Instant,
};

use super::{
    body::{PatternBody, read_body},
    report::{Echo, HttpServerReport},
    tally::{MAX_ERROR_SAMPLES, error_chain},
};

/// The response header naming the server that answered.
pub const SERVED_BY: &str = "x-served-by";
/// Longest `/delay/MS` honoured.
const MAX_DELAY: Duration = Duration::from_mins(1);
/// Largest `/bytes/N` honoured.
const MAX_BYTES: u64 = 1 << 30;
/// What `/garbage` writes: not an HTTP status line, so every parser fails at once.
pub const JUNK: &[u8] = b"\x00\x01\x02 this is not HTTP \xff\xfe\r\n\r\n";

/// `weft-workload http-server` options (also the builder for [`crate::Pod::serve_http`]).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct HttpServerArgs {
    /// Address to listen on (port 0: any free port; the first line says which).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Name in `x-served-by` and in the JSON bodies.
    #[arg(long)]
    pub name: String,
    /// Answer `--fail-status` to this percentage of requests (every k-th, deterministic).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub fail_percent: u8,
    #[arg(long, default_value_t = 503, value_parser = clap::value_parser!(u16).range(200..=599))]
    pub fail_status: u16,
    /// Wait this long before every response (on top of `/delay/MS`).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Speak HTTP/2 only (prior knowledge); without it both HTTP/1.1 and h2c are accepted.
    #[arg(long)]
    pub h2c: bool,
    /// Answer every request with junk bytes and close (as `/garbage`).
    #[arg(long)]
    pub garbage: bool,
    /// Runtime worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
    /// Stop (and print the report) after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub max_secs: u64,
}

impl HttpServerArgs {
    /// A server named `name` on `0.0.0.0:port`, otherwise the command's defaults.
    #[must_use]
    pub fn new(name: &str, port: u16) -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], port)),
            name: name.to_owned(),
            fail_percent: 0,
            fail_status: 503,
            delay_ms: 0,
            h2c: false,
            garbage: false,
            threads: 1,
            max_secs: 3600,
        }
    }

    #[must_use]
    pub fn fail_percent(mut self, percent: u8, status: u16) -> Self {
        self.fail_percent = percent;
        self.fail_status = status;
        self
    }

    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self
    }

    #[must_use]
    pub fn h2c(mut self) -> Self {
        self.h2c = true;
        self
    }

    #[must_use]
    pub fn garbage(mut self) -> Self {
        self.garbage = true;
        self
    }

    #[must_use]
    pub fn threads(mut self, threads: u16) -> Self {
        self.threads = threads;
        self
    }

    /// The command line (after the subcommand) that parses back into `self`.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--listen".to_owned(),
            self.listen.to_string(),
            "--name".to_owned(),
            self.name.clone(),
            "--fail-percent".to_owned(),
            self.fail_percent.to_string(),
            "--fail-status".to_owned(),
            self.fail_status.to_string(),
            "--delay-ms".to_owned(),
            self.delay_ms.to_string(),
            "--threads".to_owned(),
            self.threads.to_string(),
            "--max-secs".to_owned(),
            self.max_secs.to_string(),
        ];
        if self.h2c {
            args.push("--h2c".to_owned());
        }
        if self.garbage {
            args.push("--garbage".to_owned());
        }
        args
    }
}

/// Whether request `n` (from 1) is one of the `percent`% that fail (see the module docs).
#[must_use]
pub fn fails(n: u64, percent: u8) -> bool {
    let p = u128::from(percent.min(100));
    let n = u128::from(n);
    n > 0 && n * p / 100 > (n - 1) * p / 100
}

/// What a request path asks for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    status: Option<StatusCode>,
    delay: Duration,
    /// How long to leave the request body unread (a slow reader).
    read_delay: Duration,
    bytes: Option<u64>,
    garbage: bool,
}

impl Plan {
    fn from_path(path: &str) -> Self {
        let mut plan = Self::default();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        for (i, segment) in segments.iter().enumerate() {
            let number = segments.get(i + 1).and_then(|n| n.parse::<u64>().ok());
            match (*segment, number) {
                ("status", Some(code)) => {
                    plan.status = u16::try_from(code)
                        .ok()
                        .filter(|code| (200..=599).contains(code))
                        .and_then(|code| StatusCode::from_u16(code).ok());
                }
                ("delay", Some(ms)) => plan.delay = Duration::from_millis(ms).min(MAX_DELAY),
                ("read-delay", Some(ms)) => {
                    plan.read_delay = Duration::from_millis(ms).min(MAX_DELAY);
                }
                ("bytes", Some(n)) => plan.bytes = Some(n.min(MAX_BYTES)),
                ("garbage", _) => plan.garbage = true,
                _ => {}
            }
        }
        plan
    }
}

// ---------------------------------------------------------------------------------------------
// Counters

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    conn_errors: AtomicU64,
    requests: AtomicU64,
    body_bytes: AtomicU64,
    garbage: AtomicU64,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    by_status: BTreeMap<u16, u64>,
    by_version: BTreeMap<String, u64>,
    traceparents: BTreeMap<String, u64>,
    errors: Vec<String>,
}

impl Stats {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn conn_error(&self, error: String) {
        self.conn_errors.fetch_add(1, Ordering::Relaxed);
        let mut counts = self.counts();
        if counts.errors.len() < MAX_ERROR_SAMPLES {
            counts.errors.push(error);
        }
    }

    fn report(&self, name: &str) -> HttpServerReport {
        let counts = self.counts();
        HttpServerReport {
            name: name.to_owned(),
            connections: self.connections.load(Ordering::Relaxed),
            conn_errors: self.conn_errors.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            by_status: counts.by_status.clone(),
            by_version: counts.by_version.clone(),
            traceparents: counts.traceparents.clone(),
            body_bytes: self.body_bytes.load(Ordering::Relaxed),
            garbage: self.garbage.load(Ordering::Relaxed),
            errors: counts.errors.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Serving

/// Runs the server until SIGTERM, SIGINT or `--max-secs`; `listening` is called with the bound
/// address once it accepts connections.
pub fn run(
    args: &HttpServerArgs,
    listening: impl FnOnce(SocketAddr),
) -> Result<HttpServerReport, String> {
    let runtime = super::runtime(args.threads)?;
    runtime.block_on(serve(args, listening))
}

async fn serve(
    args: &HttpServerArgs,
    listening: impl FnOnce(SocketAddr),
) -> Result<HttpServerReport, String> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|error| format!("binding {}: {error}", args.listen))?;
    let local = listener
        .local_addr()
        .map_err(|error| format!("local address: {error}"))?;
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|error| format!("SIGTERM handler: {error}"))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|error| format!("SIGINT handler: {error}"))?;
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(true).timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    if args.h2c {
        builder = builder.http2_only();
    }
    let builder = Arc::new(builder);
    let stats = Arc::new(Stats::default());
    let config = Arc::new(args.clone());
    listening(local);

    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            () = tokio::time::sleep_until(deadline) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(connection(
                        stream,
                        peer,
                        Arc::clone(&builder),
                        Arc::clone(&config),
                        Arc::clone(&stats),
                    ));
                }
                Err(error) => {
                    stats.conn_error(format!("accept: {error}"));
                    // E.g. EMFILE: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    Ok(stats.report(&args.name))
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    builder: Arc<auto::Builder<TokioExecutor>>,
    config: Arc<HttpServerArgs>,
    stats: Arc<Stats>,
) {
    if let Err(error) = stream.set_nodelay(true) {
        stats.conn_error(format!("{peer}: TCP_NODELAY: {error}"));
    }
    let garbage = Arc::new(AtomicBool::new(false));
    let io = GarbageIo::new(TokioIo::new(stream), Arc::clone(&garbage));
    let service = {
        let garbage = Arc::clone(&garbage);
        let stats = Arc::clone(&stats);
        service_fn(move |request| {
            respond(
                request,
                peer,
                Arc::clone(&config),
                Arc::clone(&stats),
                Arc::clone(&garbage),
            )
        })
    };
    if let Err(error) = builder.serve_connection_with_upgrades(io, service).await
        && !garbage.load(Ordering::Relaxed)
    {
        stats.conn_error(format!("{peer}: {}", error_chain(&*error)));
    }
}

type ResponseBody = BoxBody<Bytes, Infallible>;

async fn respond(
    request: Request<Incoming>,
    peer: SocketAddr,
    config: Arc<HttpServerArgs>,
    stats: Arc<Stats>,
    garbage: Arc<AtomicBool>,
) -> Result<Response<ResponseBody>, Infallible> {
    let n = stats.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let mut request = request;
    if request.method() == hyper::Method::CONNECT
        || (request.uri().path() == "/upgrade"
            && request.headers().contains_key(hyper::header::UPGRADE))
    {
        return Ok(count(&stats, upgrade_echo(&mut request, &config.name)));
    }
    let (parts, body) = request.into_parts();
    let version = format!("{:?}", parts.version);
    {
        let mut counts = stats.counts();
        *counts.by_version.entry(version.clone()).or_default() += 1;
        if let Some(tp) = parts
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
        {
            *counts.traceparents.entry(tp.to_owned()).or_default() += 1;
        }
    }
    let plan = Plan::from_path(parts.uri.path());
    if !plan.read_delay.is_zero() {
        tokio::time::sleep(plan.read_delay).await;
    }
    let body_bytes = match read_body(body, 0).await {
        Ok((len, _)) => len,
        Err(error) => {
            stats.conn_error(format!("{peer}: request body: {}", error_chain(&error)));
            return Ok(count(&stats, plain(StatusCode::BAD_REQUEST, &config.name)));
        }
    };
    stats.body_bytes.fetch_add(body_bytes, Ordering::Relaxed);

    if config.garbage || plan.garbage {
        stats.garbage.fetch_add(1, Ordering::Relaxed);
        // The connection's writer sends junk instead of this response.
        garbage.store(true, Ordering::Relaxed);
        return Ok(plain(StatusCode::OK, &config.name));
    }
    let delay = Duration::from_millis(config.delay_ms).min(MAX_DELAY) + plan.delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let failed = fails(n, config.fail_percent);
    let answer = if failed {
        StatusCode::from_u16(config.fail_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
    } else {
        plan.status.unwrap_or(StatusCode::OK)
    };
    let mut response = match plan.bytes {
        Some(len) if !failed => {
            let mut response = Response::new(PatternBody::new(len).boxed());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        _ => {
            let echo = Echo {
                server: config.name.clone(),
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or_default().to_owned(),
                version,
                headers: header_map(&parts.headers),
                body_bytes,
                peer: peer.to_string(),
            };
            let json = serde_json::to_vec(&echo).unwrap_or_default();
            let mut response = Response::new(Full::new(Bytes::from(json)).boxed());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
    };
    *response.status_mut() = answer;
    served_by(&mut response, &config.name);
    Ok(count(&stats, response))
}

/// `GET /upgrade` with `Upgrade: <protocol>`: 101, then every byte on the upgraded connection is
/// echoed (WebSocket, or any protocol switched to with HTTP/1.1 Upgrade, at the byte level).
/// `CONNECT <authority>`: 200, then the tunnel echoes the same way (the server plays the proxy
/// and the far end at once).
fn upgrade_echo(request: &mut Request<Incoming>, name: &str) -> Response<ResponseBody> {
    let protocol = request.headers().get(hyper::header::UPGRADE).cloned();
    let on_upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
            let _ =
                tokio::time::timeout(Duration::from_mins(1), tokio::io::copy(&mut r, &mut w)).await;
        }
    });
    let Some(protocol) = protocol else {
        let mut response = plain(StatusCode::OK, name);
        *response.body_mut() = http_body_util::Empty::new().boxed();
        return response;
    };
    let mut response = plain(StatusCode::SWITCHING_PROTOCOLS, name);
    *response.body_mut() = http_body_util::Empty::new().boxed();
    let h = response.headers_mut();
    h.insert(hyper::header::UPGRADE, protocol);
    h.insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    h.remove(hyper::header::CONTENT_TYPE);
    response
}

fn plain(status: StatusCode, name: &str) -> Response<ResponseBody> {
    let mut response = Response::new(Full::new(Bytes::new()).boxed());
    *response.status_mut() = status;
    served_by(&mut response, name);
    response
}

fn served_by(response: &mut Response<ResponseBody>, name: &str) {
    if let Ok(value) = HeaderValue::from_str(name) {
        response.headers_mut().insert(SERVED_BY, value);
    }
}

fn count(stats: &Stats, response: Response<ResponseBody>) -> Response<ResponseBody> {
    *stats
        .counts()
        .by_status
        .entry(response.status().as_u16())
        .or_default() += 1;
    response
}

/// Headers as a map of lower-case names; repeated headers joined with `, `.
#[must_use]
pub fn header_map(headers: &hyper::HeaderMap) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    map
}

// ---------------------------------------------------------------------------------------------
// Raw junk on demand

/// The connection's IO, with a switch: once `trigger` is set (by the handler of a `/garbage`
/// request), the next write sends [`JUNK`] instead of what hyper wanted to write, shuts the
/// socket down and fails, which makes hyper drop the connection. This is how a server that
/// speaks broken HTTP is simulated without leaving hyper.
struct GarbageIo<T> {
    inner: T,
    trigger: Arc<AtomicBool>,
    junk_written: usize,
}

impl<T> GarbageIo<T> {
    fn new(inner: T, trigger: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            trigger,
            junk_written: 0,
        }
    }
}

impl<T: Write + Unpin> GarbageIo<T> {
    /// Writes the junk, then FIN, then reports the write as failed.
    fn poll_junk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while self.junk_written < JUNK.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &JUNK[self.junk_written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.junk_written += n;
        }
        ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "answered with junk on purpose",
        )))
    }
}

impl<T: Read + Unpin> Read for GarbageIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for GarbageIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.trigger.load(Ordering::Relaxed) {
            return self.poll_junk(cx);
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.trigger.load(Ordering::Relaxed) {
            return self.poll_junk(cx);
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn fail_percent_is_exact_and_evenly_spread() {
        let failing = |p| (1..=100).filter(|&n| fails(n, p)).collect::<Vec<u64>>();
        assert!(failing(0).is_empty());
        assert_eq!(failing(100).len(), 100);
        assert_eq!(failing(50), (1..=50).map(|k| 2 * k).collect::<Vec<_>>());
        assert_eq!(
            failing(25),
            vec![
                4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 84,
                88, 92, 96, 100
            ]
        );
        assert_eq!(failing(10), (1..=10).map(|k| 10 * k).collect::<Vec<_>>());
        for p in 0..=100 {
            assert_eq!(failing(p).len(), usize::from(p), "{p}%");
        }
        assert!(!fails(0, 100));
    }

    #[test]
    fn paths_pick_behaviours() {
        assert_eq!(Plan::from_path("/"), Plan::default());
        assert_eq!(
            Plan::from_path("/status/503").status,
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        let plan = Plan::from_path("/api/delay/50/status/201");
        assert_eq!(plan.delay, Duration::from_millis(50));
        assert_eq!(plan.status, Some(StatusCode::CREATED));
        assert_eq!(Plan::from_path("/bytes/100").bytes, Some(100));
        assert_eq!(Plan::from_path("/bytes/99999999999").bytes, Some(MAX_BYTES));
        assert_eq!(Plan::from_path("/delay/999999999").delay, MAX_DELAY);
        assert!(Plan::from_path("/garbage").garbage);
        assert_eq!(
            Plan::from_path("/read-delay/3000").read_delay,
            Duration::from_secs(3)
        );
        // Not numbers, or not a final status: ignored.
        assert_eq!(Plan::from_path("/status/abc"), Plan::default());
        assert_eq!(Plan::from_path("/status/101"), Plan::default());
        assert_eq!(Plan::from_path("/status/700"), Plan::default());
    }

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: HttpServerArgs,
    }

    #[test]
    fn builder_arguments_parse_back() {
        let args = HttpServerArgs::new("up", 8080)
            .fail_percent(20, 500)
            .delay(Duration::from_millis(3))
            .h2c()
            .threads(2);
        let line = std::iter::once("x".to_owned()).chain(args.to_args());
        assert_eq!(Wrapper::parse_from(line).args, args);
        let plain = HttpServerArgs::new("up", 0).garbage();
        let line = std::iter::once("x".to_owned()).chain(plain.to_args());
        assert_eq!(Wrapper::parse_from(line).args, plain);
    }

    #[test]
    fn headers_join_repeats() {
        let mut headers = hyper::HeaderMap::new();
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.append("host", HeaderValue::from_static("h"));
        let map = header_map(&headers);
        assert_eq!(map["x-a"], "1, 2");
        assert_eq!(map["host"], "h");
    }
}
