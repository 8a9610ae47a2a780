//! The L7 engine: receives the flows the kernel redirects (verdict L7), detects their protocol and
//! applies routes and traffic policy. Reads `state` (through [`snapshot::Snapshot`]); never
//! imports `control` or aya: the original destination comes through the [`OrigDst`] trait.
//!
//! One listener on the node address; per connection: original destination lookup, protocol
//! detection (or the port's `appProtocol`), then HTTP/1.1, HTTP/2 (gRPC) or an opaque byte pipe.
pub mod admission;
pub mod authn;
pub mod authz;
pub mod balance;
pub mod breaker;
pub mod budget;
pub mod detect;
pub mod http;
pub mod io;
pub mod metrics;
pub mod outlier;
pub mod ratelimit;
pub mod snapshot;
pub mod strict;
pub mod trace;
pub mod transparent;
pub mod tunnel;

use crate::state::WorkloadId;
use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::BytesMut;
use serde::Serialize;
use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream},
    sync::watch,
};

use self::{
    detect::{Detection, Protocol},
    metrics::{L7Metrics, ProtocolLabels, ProtocolValue},
    snapshot::Snapshot,
};

/// How long the engine waits for a client's first bytes before treating the connection as
/// opaque TCP (server-first protocols send nothing).
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(300);

/// After draining starts, how long the listener still accepts: connections the kernel
/// redirected just before the engine was marked down are already in its queue.
pub const ACCEPT_GRACE: Duration = Duration::from_millis(500);

/// While draining, how long an idle HTTP/1 keep-alive connection is left open for its client's
/// next request (answered with `connection: close`) before the engine closes it: closing an
/// idle connection races with a request the client may be sending, answering one does not.
pub const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(2);

/// What the kernel recorded about a redirected connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirected {
    /// The address the application connected to (a service VIP and port).
    pub orig_dst: SocketAddrV4,
    pub src_workload: WorkloadId,
}

/// Where the engine learns a redirected connection's original destination.
pub trait OrigDst: Send + Sync {
    fn lookup(&self, client: SocketAddrV4) -> Option<Redirected>;
}

/// Where the engine asks the kernel to take one of its legs off the socket fast path.
pub trait FastPath: Send + Sync {
    /// Moves both ends of the connection `one` ↔ `other` to the normal stack for good (at their
    /// next message). Best effort: a failure is logged and the leg stays fast (the host-wide
    /// TCP-memory valve still applies).
    fn leave(&self, one: SocketAddrV4, other: SocketAddrV4);
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field(
                "connections",
                &self.connections.total.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

/// Shared by every connection of the engine.
pub struct Engine {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    upstreams: http::Upstreams,
    pub metrics: L7Metrics,
    pub connections: Connections,
    orig: Box<dyn OrigDst>,
    /// Bulk legs leave the socket fast path through this (see [`io::Leg`]).
    pub fast_path: Arc<dyn FastPath>,
    /// OTLP span export, when an endpoint is configured (set once the runtime runs).
    pub tracer: Option<trace::Exporter>,
    /// The node-to-node tunnel, when the agent has an identity (a CA).
    pub tunnel: Option<Arc<tunnel::Tunnel>>,
    /// The connections the engine (and the tunnel) may hold at once; past it new ones are reset.
    pub limit: Arc<admission::ConnectionLimit>,
    /// `Some(deadline)` once the engine drains (the agent is stopping): see [`Engine::drain`].
    draining: watch::Sender<Option<tokio::time::Instant>>,
    /// Live events: each answered request, while someone watches (`weft tap`).
    pub tap: Arc<crate::tap::Hub>,
}

impl Engine {
    #[must_use]
    pub fn new(
        snapshot: watch::Receiver<Arc<Snapshot>>,
        metrics: L7Metrics,
        orig: Box<dyn OrigDst>,
        fast_path: Arc<dyn FastPath>,
    ) -> Self {
        Self {
            snapshot,
            upstreams: http::Upstreams::new(fast_path.clone()),
            metrics,
            connections: Connections::default(),
            orig,
            fast_path,
            tracer: None,
            tunnel: None,
            limit: admission::ConnectionLimit::unlimited(),
            draining: watch::channel(None).0,
            tap: Arc::default(),
        }
    }

    /// Starts draining, to end by `deadline`: the listener takes what is already queued and
    /// closes; HTTP/1 answers carry `connection: close` and idle keep-alive connections close
    /// after [`DRAIN_IDLE_GRACE`]; HTTP/2 connections get GOAWAY; opaque and tunnelled
    /// connections run on until they end or the deadline passes. [`Engine::serve`] returns once
    /// no connection is left. The kernel must already send new connections elsewhere (the
    /// agent marks the engine down first).
    pub fn drain(&self, deadline: tokio::time::Instant) {
        self.draining.send_replace(Some(deadline));
    }

    #[must_use]
    pub fn is_draining(&self) -> bool {
        self.draining.borrow().is_some()
    }

    /// Resolves once draining has started.
    pub async fn drain_started(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }

    #[must_use]
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }

    /// Accepts connections until the engine drains; returns once the last one has ended (or
    /// the drain deadline has passed).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let mut draining = self.draining.subscribe();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = draining.wait_for(Option::is_some) => break,
            };
            match accepted {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; other flows go on.
                    tracing::warn!(error = %e, "engine accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let deadline = (*self.draining.borrow()).unwrap_or_else(tokio::time::Instant::now);
        let accept_until = (tokio::time::Instant::now() + ACCEPT_GRACE).min(deadline);
        while let Ok(Ok((stream, peer))) =
            tokio::time::timeout_at(accept_until, listener.accept()).await
        {
            self.admit(stream, peer);
        }
        drop(listener);
        tracing::info!(
            connections = self.connections.live(),
            "L7 engine draining: listener closed"
        );
        while self.connections.live() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.connections.live();
        if left > 0 {
            tracing::warn!(
                connections = left,
                "drain deadline passed: closing what is left"
            );
        } else {
            tracing::info!("L7 engine drained");
        }
        Ok(())
    }

    /// Serves an accepted connection when the budget has a place for it; resets it otherwise.
    fn admit(self: &Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let place = match self.limit.try_admit(admission::Source::Addr(peer.ip())) {
            Ok(place) => place,
            Err(refused) => {
                self.metrics.error(refused.label());
                tracing::debug!(
                    client = %peer,
                    max = self.limit.max(),
                    per_source = self.limit.per_source(),
                    reason = refused.label(),
                    "over the connection limit: reset"
                );
                let _ = stream.set_zero_linger();
                return;
            }
        };
        let engine = self.clone();
        // One span per connection; the handlers' events carry the client address.
        let span = tracing::debug_span!("l7_conn", client = %peer);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                engine.connection(stream, peer).await;
                drop(place);
            },
            span,
        ));
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let SocketAddr::V4(client) = peer else {
            return;
        };
        let Some(redirected) = self.orig.lookup(client) else {
            // Not redirected by our kernel programs (or already closed): nothing to proxy to.
            self.metrics.error("no_original_destination");
            tracing::debug!(%client, "connection without an original destination; closed");
            return;
        };
        let _ = stream.set_nodelay(true);
        // The client's leg uses the socket fast path until it carries a bulk transfer.
        let mut stream = io::Leg::new(stream, &self.fast_path);
        let snapshot = self.snapshot();
        let src = snapshot
            .workloads
            .get(&redirected.src_workload)
            .cloned()
            .unwrap_or_else(|| (String::new(), "unknown".to_owned()));
        let target = snapshot.targets.get(&redirected.orig_dst).cloned();

        let id = self.connections.open(client, redirected.orig_dst, &src);
        if target.is_none()
            && let Some(peer) = snapshot.mesh.remote(*redirected.orig_dst.ip())
        {
            // Plain L4 to a pod of another node: straight into the tunnel, nothing parsed.
            self.connections.set_protocol(id, &Protocol::Opaque);
            // Boxed, as in `serve_as`.
            if !Box::pin(self.tunnel_to(
                &snapshot,
                redirected.src_workload,
                peer,
                redirected.orig_dst,
                &mut stream,
            ))
            .await
            {
                let _ = stream.get_ref().set_zero_linger();
            }
            self.connections.close(id);
            return;
        }
        let ctx = Arc::new(ConnCtx {
            engine: self.clone(),
            client,
            orig_dst: redirected.orig_dst,
            src,
            src_workload: redirected.src_workload,
            id,
            obs: Mutex::new(Vec::new()),
        });

        // Protocol: the port's appProtocol, else the first bytes.
        let mut buf = BytesMut::with_capacity(1024);
        let protocol = match target.as_ref().and_then(|t| t.protocol.clone()) {
            Some(p) => p,
            None => detect_protocol(&mut stream, &mut buf).await,
        };
        self.connections.set_protocol(id, &protocol);
        self.metrics
            .connections
            .get_or_create(&ProtocolLabels {
                protocol: match protocol {
                    Protocol::Http1 => ProtocolValue::http1,
                    Protocol::H2 => ProtocolValue::h2,
                    Protocol::Tls { .. } => ProtocolValue::tls,
                    Protocol::Opaque => ProtocolValue::opaque,
                },
            })
            .inc();
        if protocol == Protocol::Http1 {
            let refusal = match read_first_head(&mut stream, &mut buf).await {
                FirstHead::Complete => match strict::head_end(&buf) {
                    Some(end) if end > http::MAX_HEADER_BYTES => {
                        Some((431, "request header fields too large"))
                    }
                    Some(end) => strict::head_problem(&buf[..end]).map(|p| (400, p)),
                    None => None,
                },
                FirstHead::TooLarge => Some((431, "request header fields too large")),
                FirstHead::TimedOut => Some((408, "request header not received in time")),
                // Nothing to answer: the client is gone or sent a partial head and half-closed;
                // hyper reports that as it would for any connection.
                FirstHead::Closed => None,
            };
            if let Some((status, problem)) = refusal {
                self.metrics.error(refusal_kind(status));
                tracing::debug!(%client, problem, "request refused");
                let raw = stream.get_ref().as_ref_std_clone();
                http::refuse_head(&mut stream, raw, status, problem).await;
                self.connections.close(id);
                return;
            }
        }
        serve_as(&protocol, buf.freeze(), stream, &ctx).await;
        self.connections.close(id);
    }
}

impl Engine {
    /// Carries `client` to `target` (a pod of `peer`'s node) through the tunnel, as the source
    /// workload `src`. False when no stream could be opened (the caller resets the client).
    async fn tunnel_to(
        &self,
        snapshot: &Snapshot,
        src: WorkloadId,
        peer: &snapshot::MeshPeer,
        target: SocketAddrV4,
        client: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    ) -> bool {
        let (Some(tunnel), Some(source)) = (&self.tunnel, snapshot.mesh.by_id(src)) else {
            self.metrics.error("no_tunnel");
            tracing::warn!(%target, "no tunnel for a connection to another node; reset");
            return false;
        };
        if !tunnel.bypass(peer) {
            let result = tunnel::outbound(tunnel, client, source, peer, target).await;
            // Refused before a byte moved: a PERMISSIVE pod is reached directly instead.
            if result.is_ok() || !tunnel.bypass(peer) {
                return self.tunnel_result(result, source, peer);
            }
        }
        match TcpStream::connect(target).await {
            Ok(mut upstream) => {
                let _ = tokio::io::copy_bidirectional(client, &mut upstream).await;
                true
            }
            Err(e) => {
                tracing::debug!(%target, error = %e, "direct connection to a pod whose agent is down failed");
                false
            }
        }
    }

    fn tunnel_result(
        &self,
        result: Result<(), tunnel::TunnelError>,
        source: &snapshot::MeshPeer,
        peer: &snapshot::MeshPeer,
    ) -> bool {
        match result {
            Ok(()) => true,
            Err(e) => {
                self.metrics.error("tunnel");
                tracing::warn!(
                    target: "weft::tunnel",
                    source = %source.key,
                    destination = %peer.key,
                    error = %e,
                    "tunnel stream failed; connection reset"
                );
                false
            }
        }
    }
}

/// Serves a connection in the protocol found, `prefix` being the bytes read to find it. The
/// futures of the tunnel, HTTP/2 and opaque paths are boxed (they are several KiB): unboxed,
/// every connection's task would carry that much, idle HTTP/1.1 keep-alive connections too.
async fn serve_as(
    protocol: &Protocol,
    prefix: bytes::Bytes,
    stream: io::Leg<TcpStream>,
    ctx: &Arc<ConnCtx>,
) {
    match protocol {
        Protocol::Http1 => {
            let raw = stream.get_ref().as_ref_std_clone();
            http::serve_http1(io::Prefixed::new(prefix, stream), raw, ctx.clone()).await;
        }
        Protocol::H2 => {
            Box::pin(http::serve_h2(
                io::Prefixed::new(prefix, stream),
                ctx.clone(),
            ))
            .await;
        }
        Protocol::Tls { .. } | Protocol::Opaque => {
            Box::pin(opaque(io::Prefixed::new(prefix, stream), ctx)).await;
        }
    }
}

/// A second handle on the socket (dup), for writing a last word after hyper gave up on it.
trait StdClone {
    fn as_ref_std_clone(&self) -> Option<std::net::TcpStream>;
}

impl StdClone for TcpStream {
    fn as_ref_std_clone(&self) -> Option<std::net::TcpStream> {
        use std::os::fd::AsFd as _;
        let fd = self.as_fd().try_clone_to_owned().ok()?;
        Some(std::net::TcpStream::from(fd))
    }
}

/// The `l7_errors_total` kind of a first head refused with `status`.
fn refusal_kind(status: u16) -> &'static str {
    match status {
        408 => "header_timeout",
        431 => "header_too_large",
        _ => "bad_request",
    }
}

async fn detect_protocol(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> Protocol {
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Err(_) | Ok(Ok(0) | Err(_)) => return detect::on_timeout(buf),
            Ok(Ok(_)) => {
                if let Detection::Done(p) = detect::detect(buf) {
                    return p;
                }
                if buf.len() >= detect::MAX_DETECT_BYTES {
                    return detect::on_timeout(buf);
                }
                buf.reserve(4096);
            }
        }
    }
}

/// How reading the connection's first request head ended.
enum FirstHead {
    /// `buf` holds a whole head (and maybe more).
    Complete,
    /// No head end within [`http::MAX_HEADER_BYTES`].
    TooLarge,
    /// The client stopped sending before the head ended (slow-loris).
    TimedOut,
    /// The client closed (or the read failed) before the head ended.
    Closed,
}

/// Reads until `buf` holds the connection's first request head, it grows too long, the client
/// is too slow or the connection ends.
async fn read_first_head(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut BytesMut,
) -> FirstHead {
    let deadline = tokio::time::Instant::now() + http::HEADER_READ_TIMEOUT;
    loop {
        if strict::head_end(buf).is_some() {
            return FirstHead::Complete;
        }
        if buf.len() >= http::MAX_HEADER_BYTES {
            return FirstHead::TooLarge;
        }
        buf.reserve(4096);
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return FirstHead::Closed,
            Err(_) => return FirstHead::TimedOut,
        }
    }
}

/// Opaque TCP (and TLS, passed through): one endpoint of the service, bytes copied both ways.
async fn opaque(mut client: io::Prefixed<io::Leg<TcpStream>>, ctx: &Arc<ConnCtx>) {
    let snapshot = ctx.engine.snapshot();
    let pool = snapshot
        .targets
        .get(&ctx.orig_dst)
        .and_then(|t| t.pool(&t.default_backend).cloned())
        .or_else(|| snapshot.plain.get(&ctx.orig_dst).cloned());
    let Some(pool) = pool else {
        ctx.engine.metrics.error("no_endpoint");
        let _ = client.get_ref().get_ref().set_zero_linger();
        return;
    };
    let Some(pick) = pool.balancer.pick(None, |ep| {
        !pool.outlier.as_ref().is_some_and(|o| o.is_ejected(ep))
    }) else {
        ctx.engine.metrics.error("no_endpoint");
        let _ = client.get_ref().get_ref().set_zero_linger();
        return;
    };
    let started = tokio::time::Instant::now();
    if let SocketAddr::V4(addr) = pick.addr()
        && let Some(peer) = snapshot.mesh.remote(*addr.ip())
    {
        let src = ctx.src_workload;
        let ok = ctx
            .engine
            .tunnel_to(&snapshot, src, peer, addr, &mut client)
            .await;
        pick.record(started.elapsed(), ok);
        if !ok {
            let _ = client.get_ref().get_ref().set_zero_linger();
        }
        return;
    }
    if let Ok(Ok(upstream)) =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(pick.addr())).await
    {
        let _ = upstream.set_nodelay(true);
        let mut upstream = io::Leg::new(upstream, &ctx.engine.fast_path);
        pick.record(started.elapsed(), true);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    } else {
        // The client's connect() already succeeded (to the engine); the closest thing to the
        // refusal it would have seen going direct is a reset.
        pick.record(started.elapsed(), false);
        ctx.engine.metrics.error("upstream_connect");
        let _ = client.get_ref().get_ref().set_zero_linger();
    }
}

/// Per-connection context of the request handlers.
pub struct ConnCtx {
    pub engine: Arc<Engine>,
    pub client: SocketAddrV4,
    pub orig_dst: SocketAddrV4,
    /// Source workload (namespace, name).
    pub src: (String, String),
    /// Source workload id (the kernel's).
    pub src_workload: WorkloadId,
    id: u64,
    /// Metric handles per route used on this connection (keyed by target and rule identity;
    /// the `Arc<Target>` keeps the key's addresses valid).
    #[allow(clippy::type_complexity, reason = "a small private cache")]
    obs: Mutex<Vec<(usize, Arc<snapshot::Target>, Arc<http::RouteObs>)>>,
}

impl ConnCtx {
    fn note_route(&self, route: &str) {
        self.engine.connections.note_request(self.id, route);
    }

    /// Cached metric handles for `action` of `target` (a handful of routes per connection).
    fn route_obs(
        &self,
        target: &Arc<snapshot::Target>,
        action: Option<&crate::state::routes::RuleAction>,
        make: impl FnOnce() -> http::RouteObs,
    ) -> Arc<http::RouteObs> {
        const MAX_CACHED: usize = 16;
        let key = action.map_or(0, |a| std::ptr::from_ref(a) as usize);
        let mut cache = self
            .obs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, _, obs)) = cache
            .iter()
            .find(|(k, t, _)| *k == key && Arc::ptr_eq(t, target))
        {
            return obs.clone();
        }
        let obs = Arc::new(make());
        if cache.len() >= MAX_CACHED {
            cache.remove(0);
        }
        cache.push((key, target.clone(), obs.clone()));
        obs
    }
}

// --- the engine's part of the flow table ------------------------------------------------------

/// One live connection through the engine, as `/flows` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct L7Flow {
    pub client: SocketAddrV4,
    pub source: String,
    pub destination: SocketAddrV4,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    pub requests: u64,
    /// Routes used so far and how often.
    pub routes: BTreeMap<String, u64>,
    pub opened_unix_ms: u64,
}

/// Closed connections `/flows` keeps.
const RECENT_L7_FLOWS: usize = 256;

/// The engine's connections, live and recently closed, and what it refused.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct L7Flows {
    pub live: Vec<L7Flow>,
    pub recent: Vec<L7Flow>,
    /// Requests and tunnel streams refused by the engine (authorization, identity checks),
    /// and those a dry-run policy would refuse.
    #[serde(default)]
    pub denied: Vec<L7Denial>,
}

/// Refusals of one kind between one source and one destination.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct L7Denial {
    pub source: String,
    pub destination: String,
    /// The policy and rule, or the check, that refused.
    pub rule: String,
    /// `enforced` or `dry_run`.
    pub mode: String,
    pub count: u64,
    pub last_unix_ms: u64,
}

/// Distinct (source, destination, rule, mode) refusals the engine keeps for `/flows`.
const DENIALS_KEPT: usize = 256;

/// The engine's refusals, shared by the HTTP handlers and the tunnel server.
#[derive(Default)]
pub struct Denials(Mutex<BTreeMap<(String, String, String, String), L7Denial>>);

impl Denials {
    /// Counts one refusal (when the table is full, a new kind replaces the oldest).
    pub fn record(&self, source: &str, destination: &str, rule: &str, mode: &str) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut t = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (
            source.to_owned(),
            destination.to_owned(),
            rule.to_owned(),
            mode.to_owned(),
        );
        if let Some(d) = t.get_mut(&key) {
            d.count += 1;
            d.last_unix_ms = now;
            return;
        }
        if t.len() >= DENIALS_KEPT
            && let Some(oldest) = t
                .iter()
                .min_by_key(|(_, d)| d.last_unix_ms)
                .map(|(k, _)| k.clone())
        {
            t.remove(&oldest);
        }
        t.insert(
            key,
            L7Denial {
                source: source.to_owned(),
                destination: destination.to_owned(),
                rule: rule.to_owned(),
                mode: mode.to_owned(),
                count: 1,
                last_unix_ms: now,
            },
        );
    }

    fn list(&self) -> Vec<L7Denial> {
        let mut v: Vec<L7Denial> = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|d| std::cmp::Reverse(d.last_unix_ms));
        v
    }
}

#[derive(Default)]
struct Table {
    live: BTreeMap<u64, L7Flow>,
    recent: std::collections::VecDeque<L7Flow>,
}

#[derive(Default)]
pub struct Connections {
    next: AtomicU64,
    live: Mutex<Table>,
    /// Connections accepted since start.
    pub total: AtomicU64,
    /// What the engine refused (shared with the tunnel server).
    pub denials: Arc<Denials>,
}

impl Connections {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<u64, L7Flow>) -> R) -> R {
        f(&mut self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .live)
    }

    /// Connections open now.
    #[must_use]
    pub fn live(&self) -> usize {
        self.with(|live| live.len())
    }

    fn open(&self, client: SocketAddrV4, destination: SocketAddrV4, src: &(String, String)) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        let opened_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let flow = L7Flow {
            client,
            source: format!("{}/{}", src.0, src.1),
            destination,
            protocol: "detecting".into(),
            sni: None,
            requests: 0,
            routes: BTreeMap::new(),
            opened_unix_ms,
        };
        self.with(|m| m.insert(id, flow));
        id
    }

    fn set_protocol(&self, id: u64, p: &Protocol) {
        self.with(|m| {
            if let Some(f) = m.get_mut(&id) {
                p.name().clone_into(&mut f.protocol);
                if let Protocol::Tls { sni } = p {
                    f.sni.clone_from(sni);
                }
            }
        });
    }

    fn note_request(&self, id: u64, route: &str) {
        self.with(|m| {
            if let Some(f) = m.get_mut(&id) {
                f.requests += 1;
                if let Some(n) = f.routes.get_mut(route) {
                    *n += 1;
                } else if f.routes.len() < 16 {
                    f.routes.insert(route.to_owned(), 1);
                }
            }
        });
    }

    fn close(&self, id: u64) {
        let mut t = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(f) = t.live.remove(&id) {
            if t.recent.len() == RECENT_L7_FLOWS {
                t.recent.pop_front();
            }
            t.recent.push_back(f);
        }
    }

    #[must_use]
    pub fn snapshot(&self) -> L7Flows {
        let t = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        L7Flows {
            live: t.live.values().cloned().collect(),
            recent: t.recent.iter().cloned().collect(),
            denied: self.denials.list(),
        }
    }
}
