//! The node-to-node tunnel: mutual TLS 1.3 between agents, HTTP/2 CONNECT streams inside (one
//! TLS connection per source identity, destination identity and node, many streams, as HBONE).
//!
//! Outbound, a meshed pod's connection to a meshed pod of another node reaches the engine (the
//! kernel redirects it); the engine opens a CONNECT stream for `<pod ip>:<port>` with the source
//! workload's SVID as client certificate, expecting the destination workload's identity from the
//! server. Inbound, the receiving agent checks that the stream's claimed source workload
//! (`weft-source`) has exactly the client certificate's SPIFFE ID, that the destination is one of
//! its pods with the identity it presented, and the authorization policy; then it connects to
//! the pod and copies bytes both ways. Plain L4: no HTTP is parsed inside the stream.
use crate::state::WorkloadId;
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, client::conn::http2::SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use super::admission::{Refused, Source};
use super::snapshot::{MeshPeer, Snapshot};
use crate::identity::{self, Identities, SpiffeId, tls};

/// The tunnel's port on every node (HBONE's).
pub const DEFAULT_PORT: u16 = 15008;
/// Header naming the source workload (`namespace/name`) of a stream.
pub const SOURCE_HEADER: &str = "weft-source";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// After a node's tunnel port refused a connection (its agent stopped: a restart or an
/// upgrade), how long its PERMISSIVE pods are reached in plaintext instead, as the kernel does
/// for flows whose own engine is down.
const UNREACHABLE_FOR: Duration = Duration::from_secs(2);
/// Buffer of each copy direction between a socket and a stream: bulk transfers move in large
/// HTTP/2 DATA frames instead of 8 KiB ones.
const COPY_BUFFER: usize = 64 * 1024;
/// HTTP/2 settings of both ends: frames up to 64 KiB, windows large enough that one stream can
/// fill a fast link without waiting for `WINDOW_UPDATE` frames.
const MAX_FRAME: u32 = 64 * 1024;
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to the tunnel of {node}: {source}")]
    Connect {
        node: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("TLS with {node} failed: {source}")]
    Handshake {
        node: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("HTTP/2 with {node}: {source}")]
    Http2 {
        node: SocketAddrV4,
        source: hyper::Error,
    },
    #[error("{node} refused the stream to {target}: {status}")]
    Refused {
        node: SocketAddrV4,
        target: SocketAddrV4,
        status: StatusCode,
    },
    #[error("timed out reaching {node}")]
    Timeout { node: SocketAddrV4 },
    #[error("TLS configuration: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("building the CONNECT request: {0}")]
    Request(String),
    #[error("the node of {0} has no known address (Node InternalIP)")]
    NoNodeAddress(std::net::Ipv4Addr),
    #[error("{0} has no server name (not a workload identity)")]
    NoServerName(SpiffeId),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StreamLabels {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// `ok`, or why the stream was refused or failed.
    pub result: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct TunnelMetrics {
    pub streams: Family<StreamLabels, Counter>,
    pub connections: Family<StreamLabels, Counter>,
    /// Workload certificates issued (first issues and rotations).
    pub certificates_issued: Counter,
    /// Streams allowed that a dry-run policy would have denied.
    pub dry_run_denials: Counter,
}

impl TunnelMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let registry = registry.sub_registry_with_prefix("weft");
        registry.register(
            "tunnel_streams",
            "Tunnel streams (one per proxied connection) by direction and result",
            m.streams.clone(),
        );
        registry.register(
            "tunnel_connections",
            "Tunnel TLS connections by direction and result (handshake failures included)",
            m.connections.clone(),
        );
        registry.register(
            "tunnel_dry_run_denials",
            "Tunnel streams allowed that a dry-run authorization policy would deny",
            m.dry_run_denials.clone(),
        );
        registry.register(
            "identity_certificates_issued",
            "Workload certificates (X.509 SVIDs) issued by this agent, rotations included",
            m.certificates_issued.clone(),
        );
        m
    }

    fn stream(&self, direction: &'static str, result: &'static str) {
        self.streams
            .get_or_create(&StreamLabels { direction, result })
            .inc();
    }

    fn connection(&self, direction: &'static str, result: &'static str) {
        self.connections
            .get_or_create(&StreamLabels { direction, result })
            .inc();
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    destination: SpiffeId,
    node: SocketAddrV4,
}

/// The tunnel's state in the engine.
pub struct Tunnel {
    pub ids: Arc<Identities>,
    pub port: u16,
    server_configs: tls::ServerConfigs,
    pool: Mutex<HashMap<PoolKey, SendRequest<Empty<Bytes>>>>,
    /// Nodes whose tunnel port refused us lately, and when.
    unreachable: Mutex<HashMap<Ipv4Addr, Instant>>,
    pub metrics: TunnelMetrics,
    /// Refused streams go to the engine's table of refusals (`/flows`).
    denials: Arc<super::Denials>,
    /// Connections to local pods leave the socket fast path when they carry bulk.
    fast_path: Arc<dyn super::FastPath>,
    /// Shared with the engine: inbound connections and their streams' sockets take places.
    pub limit: Arc<super::admission::ConnectionLimit>,
    /// Inbound streams connect to their pod from the client's address (the node routes the
    /// answers back: [`super::transparent`]).
    pub keep_source: bool,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Tunnel {
    #[must_use]
    pub fn new(
        ids: Arc<Identities>,
        port: u16,
        metrics: TunnelMetrics,
        denials: Arc<super::Denials>,
        fast_path: Arc<dyn super::FastPath>,
        limit: Arc<super::admission::ConnectionLimit>,
    ) -> Self {
        Self {
            ids,
            port,
            server_configs: tls::ServerConfigs::default(),
            pool: Mutex::default(),
            unreachable: Mutex::default(),
            metrics,
            denials,
            fast_path,
            limit,
            keep_source: false,
        }
    }

    /// Whether `peer` must be reached in plaintext for now: its node's tunnel port refused a
    /// connection within [`UNREACHABLE_FOR`] (nobody listens: that node's agent is stopping
    /// or starting), and the pod is not STRICT (a STRICT pod is never reached in plaintext).
    #[must_use]
    pub fn bypass(&self, peer: &MeshPeer) -> bool {
        if peer.strict {
            return false;
        }
        let Some(node) = peer.node_addr else {
            return false;
        };
        let bypass = self
            .unreachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&node)
            .is_some_and(|at| at.elapsed() < UNREACHABLE_FOR);
        if bypass {
            self.metrics
                .connection("outbound", "plaintext_while_peer_down");
        }
        bypass
    }

    fn mark_unreachable(&self, node: SocketAddrV4, unreachable: bool) {
        let mut map = self
            .unreachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if unreachable {
            map.insert(*node.ip(), Instant::now());
        } else {
            map.remove(node.ip());
        }
    }

    /// A stream to `target` (a pod of `peer`'s node) as `source`.
    ///
    /// # Errors
    /// When the tunnel connection cannot be made or the far agent refuses the stream.
    pub async fn open(
        &self,
        source: &MeshPeer,
        peer: &MeshPeer,
        target: SocketAddrV4,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, TunnelError> {
        self.open_raw(source, peer, target).await.map(TokioIo::new)
    }

    /// [`Tunnel::open`] as hyper IO (for the engine's HTTP clients).
    ///
    /// # Errors
    /// As [`Tunnel::open`].
    pub async fn open_raw(
        &self,
        source: &MeshPeer,
        peer: &MeshPeer,
        target: SocketAddrV4,
    ) -> Result<hyper::upgrade::Upgraded, TunnelError> {
        let node = SocketAddrV4::new(
            peer.node_addr
                .ok_or(TunnelError::NoNodeAddress(*target.ip()))?,
            self.port,
        );
        let key = PoolKey {
            source: source.identity.clone(),
            destination: peer.identity.clone(),
            node,
        };
        let mut sender = self.sender(&key).await?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(SOURCE_HEADER, source.key.as_str())
            .body(Empty::new())
            .map_err(|e| TunnelError::Request(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| TunnelError::Http2 { node, source })?;
        if response.status() != StatusCode::OK {
            return Err(TunnelError::Refused {
                node,
                target,
                status: response.status(),
            });
        }
        hyper::upgrade::on(response)
            .await
            .map_err(|source| TunnelError::Http2 { node, source })
    }

    /// The pooled HTTP/2 connection for `key`, made (TLS handshake included) when there is none
    /// or the old one closed.
    async fn sender(&self, key: &PoolKey) -> Result<SendRequest<Empty<Bytes>>, TunnelError> {
        let pooled = self
            .pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .filter(|s| !s.is_closed())
            .cloned();
        if let Some(mut s) = pooled
            && s.ready().await.is_ok()
        {
            return Ok(s);
        }
        let node = key.node;
        let made = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(key)).await;
        let sender = match made {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics.connection("outbound", "failed");
                // Refused (no listener): the node's agent is not there. A failed handshake
                // means something answered, and is never a reason to bypass the tunnel.
                if matches!(&e, TunnelError::Connect { source, .. }
                    if source.kind() == std::io::ErrorKind::ConnectionRefused)
                {
                    self.mark_unreachable(node, true);
                }
                return Err(e);
            }
            Err(_) => {
                self.metrics.connection("outbound", "timeout");
                return Err(TunnelError::Timeout { node });
            }
        };
        self.metrics.connection("outbound", "ok");
        self.mark_unreachable(node, false);
        self.pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.clone(), sender.clone());
        Ok(sender)
    }

    async fn connect(&self, key: &PoolKey) -> Result<SendRequest<Empty<Bytes>>, TunnelError> {
        let node = key.node;
        let config = tls::client_config(&self.ids, &key.source, &key.destination)?;
        let sni = identity::server_name_for(&key.destination)
            .ok_or_else(|| TunnelError::NoServerName(key.destination.clone()))?;
        let server_name = ServerName::try_from(sni)
            .map_err(|_| TunnelError::NoServerName(key.destination.clone()))?;
        let tcp = TcpStream::connect(node)
            .await
            .map_err(|source| TunnelError::Connect { node, source })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(|source| TunnelError::Handshake { node, source })?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .max_frame_size(MAX_FRAME)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| TunnelError::Http2 { node, source })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%node, error = %e, "tunnel connection ended");
            }
        });
        Ok(sender)
    }
}

/// Connects the engine's HTTP clients to pods of other nodes through the tunnel, as one source
/// workload (hyper's pool is per client, so each source workload has its own client and its
/// upstream connections carry its identity).
#[derive(Clone)]
pub struct TunnelConnector {
    pub tunnel: Arc<Tunnel>,
    pub snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    pub source: WorkloadId,
}

/// A tunnel stream as an HTTP client connection.
pub type TunnelConn = super::io::UpstreamConn<hyper::upgrade::Upgraded>;

impl tower_service::Service<hyper::Uri> for TunnelConnector {
    type Response = TunnelConn;
    type Error = TunnelError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<TunnelConn, TunnelError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), TunnelError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let target: SocketAddrV4 = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| TunnelError::Request(format!("{uri} names no IPv4 endpoint")))?;
            let snapshot = this.snapshots.borrow().clone();
            let (Some(source), Some(peer)) = (
                snapshot.mesh.by_id(this.source),
                snapshot.mesh.remote(*target.ip()),
            ) else {
                return Err(TunnelError::Request(format!(
                    "{target} is no meshed pod of another node (or the source is unknown)"
                )));
            };
            let stream = this.tunnel.open_raw(source, peer, target).await;
            this.tunnel
                .metrics
                .stream("outbound", if stream.is_ok() { "ok" } else { "failed" });
            stream.map(super::io::UpstreamConn)
        })
    }
}

/// Copies a redirected client connection into a tunnel stream to `target`.
pub async fn outbound(
    tunnel: &Tunnel,
    client: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    source: &MeshPeer,
    peer: &MeshPeer,
    target: SocketAddrV4,
) -> Result<(), TunnelError> {
    match tunnel.open(source, peer, target).await {
        Ok(mut stream) => {
            tunnel.metrics.stream("outbound", "ok");
            let _ = tokio::io::copy_bidirectional_with_sizes(
                client,
                &mut stream,
                COPY_BUFFER,
                COPY_BUFFER,
            )
            .await;
            Ok(())
        }
        Err(e) => {
            tunnel.metrics.stream(
                "outbound",
                if matches!(e, TunnelError::Refused { .. }) {
                    "refused"
                } else {
                    "failed"
                },
            );
            Err(e)
        }
    }
}

/// Accepts tunnel connections until the listener fails.
pub async fn serve(
    tunnel: Arc<Tunnel>,
    snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    listener: TcpListener,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let place = match tunnel.limit.try_admit(Source::Addr(peer.ip())) {
            Ok(place) => place,
            Err(refused) => {
                tunnel.metrics.connection("inbound", refused.label());
                tracing::debug!(
                    %peer,
                    max = tunnel.limit.max(),
                    reason = refused.label(),
                    "over the connection limit: reset"
                );
                let _ = tcp.set_zero_linger();
                continue;
            }
        };
        let (tunnel, snapshots) = (tunnel.clone(), snapshots.clone());
        tokio::spawn(async move {
            let _place = place;
            if let Err(reason) = inbound_connection(&tunnel, snapshots, tcp).await {
                tunnel.metrics.connection("inbound", reason.label());
                tracing::warn!(
                    target: "weft::tunnel",
                    %peer,
                    reason = reason.label(),
                    "tunnel connection refused: {reason}"
                );
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum InboundError {
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("TLS handshake timed out")]
    Timeout,
    #[error("{0}")]
    Identity(tls::TlsError),
    #[error("client identity {0} is outside trust domain {1}")]
    ForeignDomain(SpiffeId, String),
    #[error("server configuration: {0}")]
    Config(tls::TlsError),
}

impl InboundError {
    fn label(&self) -> &'static str {
        match self {
            Self::Handshake(_) => "handshake_failed",
            Self::Timeout => "timeout",
            Self::Identity(_) => "no_identity",
            Self::ForeignDomain(..) => "foreign_trust_domain",
            Self::Config(_) => "config",
        }
    }
}

async fn inbound_connection(
    tunnel: &Arc<Tunnel>,
    snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    tcp: TcpStream,
) -> Result<(), InboundError> {
    let _ = tcp.set_nodelay(true);
    let config = tunnel
        .server_configs
        .get(&tunnel.ids)
        .map_err(InboundError::Config)?;
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(config).accept(tcp),
    )
    .await
    .map_err(|_| InboundError::Timeout)?
    .map_err(InboundError::Handshake)?;
    let (_, conn) = tls.get_ref();
    let client_id = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(InboundError::Identity(tls::TlsError::NoCertificate))
        .and_then(|c| tls::spiffe_id_of(c).map_err(InboundError::Identity))?;
    let trust_domain = tunnel.ids.trust_domain();
    if client_id.trust_domain() != trust_domain.as_str() {
        return Err(InboundError::ForeignDomain(
            client_id,
            trust_domain.as_str().to_owned(),
        ));
    }
    let served = conn
        .server_name()
        .and_then(|n| identity::identity_for_server_name(&trust_domain, n));
    tunnel.metrics.connection("inbound", "ok");
    let tunnel = tunnel.clone();
    let service = hyper::service::service_fn(move |request| {
        let (tunnel, client_id, served) = (tunnel.clone(), client_id.clone(), served.clone());
        let snapshot = snapshots.borrow().clone();
        async move {
            Ok::<_, std::convert::Infallible>(
                stream(&tunnel, &snapshot, &client_id, served.as_ref(), request).await,
            )
        }
    });
    if let Err(e) = http2_server()
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(error = %e, "tunnel connection ended");
    }
    Ok(())
}

/// Why an inbound stream was refused: the status the client gets, the metric label, a log line.
#[derive(Debug)]
pub struct Refusal(pub StatusCode, pub &'static str, pub String);

/// What an inbound stream's request head asks for.
#[derive(Debug)]
pub struct ConnectHead<'r> {
    /// The pod address and port to connect to.
    pub target: SocketAddrV4,
    /// The source pod the client claims to speak for (checked against its certificate later).
    pub claimed: &'r str,
}

/// Reads an inbound stream's request head: a CONNECT to an IPv4 address and port, with the
/// claimed source. Nothing here trusts the head: the caller checks the target and the source
/// against the mesh and the client's certificate.
///
/// # Errors
/// The refusal (status, metric label, reason) when the head is not such a CONNECT.
pub fn connect_head<B>(request: &Request<B>) -> Result<ConnectHead<'_>, Refusal> {
    if request.method() != Method::CONNECT {
        return Err(Refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            "bad_request",
            format!("method {} (only CONNECT)", request.method()),
        ));
    }
    let target = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddrV4>().ok())
        .ok_or_else(|| {
            Refusal(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("target {} is not an IPv4 address and port", request.uri()),
            )
        })?;
    let claimed = request
        .headers()
        .get(SOURCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    Ok(ConnectHead { target, claimed })
}

/// The HTTP/2 server of the tunnel port, with its frame and window sizes.
#[must_use]
pub fn http2_server() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .max_frame_size(MAX_FRAME)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    builder
}

/// The checks of one inbound stream: a CONNECT to a meshed pod of this node whose identity the
/// connection was opened for, from a claimed source whose identity is the client certificate's,
/// allowed by authorization policy. Returns the target.
fn check_stream(
    tunnel: &Tunnel,
    snapshot: &Snapshot,
    client_id: &SpiffeId,
    served: Option<&SpiffeId>,
    request: &Request<hyper::body::Incoming>,
) -> Result<(SocketAddrV4, Option<Ipv4Addr>), Refusal> {
    let ConnectHead { target, claimed } = connect_head(request)?;
    let dst = snapshot.mesh.local(*target.ip()).ok_or_else(|| {
        Refusal(
            StatusCode::NOT_FOUND,
            "unknown_destination",
            format!("{target} is no meshed pod of this node"),
        )
    })?;
    if served != Some(&dst.identity) {
        return Err(Refusal(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong_destination_identity",
            format!(
                "{target} is {}, but the connection was opened for {}",
                dst.identity,
                served.map_or_else(|| "no identity".to_owned(), ToString::to_string)
            ),
        ));
    }
    let src = snapshot.mesh.by_key(claimed).ok_or_else(|| {
        Refusal(
            StatusCode::FORBIDDEN,
            "unknown_source",
            format!("claimed source {claimed:?} is no meshed pod"),
        )
    })?;
    if src.identity != *client_id {
        return Err(Refusal(
            StatusCode::FORBIDDEN,
            "identity_mismatch",
            format!(
                "claimed source {claimed} runs as {}, but the client certificate is {client_id}",
                src.identity
            ),
        ));
    }
    match snapshot
        .mesh
        .verdict(src.workload, dst.workload, target.port())
    {
        mesh_common::verdict::DENY => {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "denied",
                format!("authorization policy denies {claimed} -> {target}"),
            ));
        }
        mesh_common::verdict::AUDIT => {
            tunnel.metrics.dry_run_denials.inc();
            tunnel.denials.record(
                claimed,
                &format!("{}:{}", dst.key, target.port()),
                "authorization policy (tunnel, dry run)",
                "dry_run",
            );
            tracing::info!(
                target: "weft::deny",
                source = %claimed,
                destination = %target,
                "tunnel stream allowed that a dry-run policy would deny"
            );
        }
        _ => {}
    }
    // The client's address, when it is a pod of another node (the only kind a tunnel brings).
    let source = snapshot
        .mesh
        .ip_of(claimed)
        .filter(|_| !src.local && tunnel.keep_source);
    Ok((target, source))
}

/// Connects to the local pod `target`, from `source` (the client's address) when given. A
/// source-keeping connect that fails before the pod answered (the address is taken, no
/// privilege) is made again from this node's address: the stream is not lost for it.
async fn connect_upstream(
    source: Option<Ipv4Addr>,
    target: SocketAddrV4,
) -> std::io::Result<TcpStream> {
    if let Some(source) = source {
        match super::transparent::connect_from(source, target).await {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(e),
            Err(e) => {
                tracing::debug!(%source, %target, error = %e, "source-keeping connect failed; connecting from the node");
            }
        }
    }
    TcpStream::connect(target).await
}

/// One inbound stream: checks, then the connection to the local pod.
async fn stream(
    tunnel: &Arc<Tunnel>,
    snapshot: &Snapshot,
    client_id: &SpiffeId,
    served: Option<&SpiffeId>,
    mut request: Request<hyper::body::Incoming>,
) -> Response<Empty<Bytes>> {
    let checked = check_stream(tunnel, snapshot, client_id, served, &request).and_then(|dst| {
        let place = tunnel
            .limit
            .try_admit(Source::Identity(client_id.to_string()))
            .map_err(|refused| {
                let why = match refused {
                    Refused::Full => format!(
                        "the agent holds its maximum of {} connections",
                        tunnel.limit.max()
                    ),
                    Refused::SourceShare => format!(
                        "{client_id} holds its share of {} connections",
                        tunnel.limit.per_source()
                    ),
                };
                Refusal(StatusCode::SERVICE_UNAVAILABLE, refused.label(), why)
            })?;
        Ok((dst, place))
    });
    let connected = match checked {
        Ok(((target, source), place)) => {
            match tokio::time::timeout(Duration::from_secs(2), connect_upstream(source, target))
                .await
            {
                Ok(Ok(s)) => Ok((s, place)),
                _ => Err(Refusal(
                    StatusCode::BAD_GATEWAY,
                    "upstream_connect",
                    format!("{target} did not accept the connection"),
                )),
            }
        }
        Err(refusal) => Err(refusal),
    };
    let (upstream, place) = match connected {
        Ok(connected) => connected,
        Err(Refusal(status, result, why)) => {
            tunnel.metrics.stream("inbound", result);
            let claimed = request
                .headers()
                .get(SOURCE_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?");
            tunnel.denials.record(
                &format!("{claimed} ({client_id})"),
                &request.uri().to_string(),
                &format!("tunnel: {result}"),
                "enforced",
            );
            tracing::warn!(
                target: "weft::tunnel",
                client = %client_id,
                result,
                "tunnel stream refused: {why}"
            );
            let mut response = Response::new(Empty::new());
            *response.status_mut() = status;
            return response;
        }
    };
    let _ = upstream.set_nodelay(true);
    tunnel.metrics.stream("inbound", "ok");
    let on_upgrade = hyper::upgrade::on(&mut request);
    let mut upstream = super::io::Leg::new(upstream, &tunnel.fast_path);
    tokio::spawn(async move {
        let _place = place;
        match on_upgrade.await {
            Ok(upgraded) => {
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut TokioIo::new(upgraded),
                    &mut upstream,
                    COPY_BUFFER,
                    COPY_BUFFER,
                )
                .await;
            }
            Err(e) => tracing::debug!(error = %e, "tunnel stream upgrade failed"),
        }
    });
    Response::new(Empty::new())
}
