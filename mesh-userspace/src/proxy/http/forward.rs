//! Forwarding to an endpoint: pooled HTTP/1.1 and HTTP/2 clients, hop-by-hop headers,
//! protocol upgrades (WebSocket), mirrors.
use crate::state::WorkloadId;
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::{
    Request, Response, StatusCode, Version,
    body::Incoming,
    header::{self, HeaderMap, HeaderName},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::super::{ConnCtx, Engine, snapshot::Pool};

use super::*;

pub(super) fn spawn_mirror(
    ctx: &Arc<ConnCtx>,
    pool: &Arc<Pool>,
    parts: &hyper::http::request::Parts,
    body: Bytes,
) {
    let Some(pick) = pool.balancer.pick(None, |_| true) else {
        return;
    };
    let addr = pick.addr();
    let mut req = Request::new(full(body));
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    *req.version_mut() = parts.version;
    let Some(uri) = upstream_uri(addr, &parts.uri) else {
        return;
    };
    *req.uri_mut() = uri;
    let engine = ctx.engine.clone();
    let src = ctx.src_workload;
    tokio::spawn(async move {
        let res = tokio::time::timeout(Duration::from_secs(10), engine.send(src, req)).await;
        // Fire-and-forget: the mirror's answer is read and dropped.
        if let Ok(Ok(resp)) = res {
            let _ = resp.into_body().collect().await;
        }
        drop(pick);
    });
}

pub(super) fn upstream_uri(addr: SocketAddr, uri: &hyper::Uri) -> Option<hyper::Uri> {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("http://{addr}{pq}").parse().ok()
}

pub(super) fn is_upgrade(version: Version, method: &hyper::Method, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && (method == hyper::Method::CONNECT || headers.contains_key(header::UPGRADE))
}

/// Why a try got no answer.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: nothing was sent.
    Connect(BoxError),
    Timeout,
    /// The connection broke, or the answer was not HTTP.
    Other(BoxError),
}

impl super::retries::Upstream for Engine {
    type Body = Incoming;

    async fn forward(
        &self,
        src: WorkloadId,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        self.send(src, req).await
    }
}

impl Engine {
    /// Sends `req` for the source workload `src` on a pooled upstream connection (HTTP/2 when
    /// the request is HTTP/2); to a pod of another node through the tunnel, as `src`.
    pub async fn send(
        &self,
        src: WorkloadId,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        strip_hop_by_hop(req.headers_mut());
        let h2 = req.version() == Version::HTTP_2;
        if !h2 {
            *req.version_mut() = Version::HTTP_11;
        }
        let endpoint = req
            .uri()
            .host()
            .and_then(|h| h.parse::<std::net::Ipv4Addr>().ok());
        let remote = endpoint.is_some_and(|ip| {
            self.snapshot().mesh.remote(ip).is_some_and(|peer| {
                // A PERMISSIVE pod whose node's agent is down is reached directly.
                !self.tunnel.as_ref().is_some_and(|t| t.bypass(peer))
            })
        });
        let result = match (&self.tunnel, remote) {
            (Some(tunnel), true) => {
                let connector = || super::super::tunnel::TunnelConnector {
                    tunnel: tunnel.clone(),
                    snapshots: self.snapshot.clone(),
                    source: src,
                };
                self.upstreams
                    .tunneled(connector, src, h2)
                    .request(req)
                    .await
            }
            _ if h2 => self.upstreams.h2.request(req).await,
            _ => self.upstreams.h1.request(req).await,
        };
        result
            .map(|mut resp| {
                if let Some(ip) = endpoint {
                    resp.extensions_mut().insert(Endpoint(ip));
                }
                resp
            })
            .map_err(|e| {
                if e.is_connect() {
                    SendError::Connect(Box::new(e))
                } else {
                    SendError::Other(Box::new(e))
                }
            })
    }
}

/// The pod that answered a request (a response extension): its identity goes into the span.
#[derive(Debug, Clone, Copy)]
pub(super) struct Endpoint(pub std::net::Ipv4Addr);

/// Connection-specific headers are not forwarded (RFC 9110 §7.6.1); `te: trailers` is kept
/// for gRPC.
pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
    if h.get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.eq_ignore_ascii_case("trailers"))
    {
        h.remove(header::TE);
    }
}

/// WebSocket / `Upgrade` and `CONNECT`: a dedicated upstream connection, the request passed on
/// with its upgrade headers, and after `101` (or `2xx` to CONNECT) bytes copied both ways.
pub(super) async fn forward_upgrade(
    req: Request<Incoming>,
    ep: SocketAddr,
    ctx: &Arc<ConnCtx>,
) -> Response<Body> {
    let connect_error = || {
        local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            false,
            "upstream connect error",
        )
    };
    let snapshot = ctx.engine.snapshot();
    let remote = match ep {
        SocketAddr::V4(v4) => snapshot.mesh.remote(*v4.ip()).map(|peer| (v4, peer)),
        SocketAddr::V6(_) => None,
    };
    if let (Some((target, peer)), Some(tunnel)) = (remote, &ctx.engine.tunnel) {
        let Some(source) = snapshot.mesh.by_id(ctx.src_workload) else {
            return connect_error();
        };
        return match tunnel.open(source, peer, target).await {
            Ok(stream) => upgrade_over(req, stream).await,
            Err(_) => connect_error(),
        };
    }
    let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(ep)).await
    else {
        return connect_error();
    };
    let _ = stream.set_nodelay(true);
    upgrade_over(
        req,
        super::super::io::Leg::new(stream, &ctx.engine.fast_path),
    )
    .await
}

/// Passes an upgrade request on over `stream` and, once the upstream switched protocols,
/// copies bytes both ways.
pub(super) async fn upgrade_over(
    req: Request<Incoming>,
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let client_side = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let connect = parts.method == hyper::Method::CONNECT;
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream)).await
    else {
        return local_reply(StatusCode::BAD_GATEWAY, false, "upstream handshake failed");
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let up_req = Request::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
    let Ok(mut resp) = sender.send_request(up_req).await else {
        return local_reply(
            StatusCode::BAD_GATEWAY,
            false,
            "upstream closed during upgrade",
        );
    };
    let switching =
        resp.status() == StatusCode::SWITCHING_PROTOCOLS || (connect && resp.status().is_success());
    let (Some(client_side), true) = (client_side, switching) else {
        return resp.map(|b| b.map_err(BoxError::from).boxed_unsync());
    };
    let upstream_side = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (Ok(down), Ok(up)) = (client_side.await, upstream_side.await) else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(down), &mut TokioIo::new(up)).await;
    });
    let (head, _) = resp.into_parts();
    Response::from_parts(head, empty())
}

/// A connection whose service has no L7 policy any more: forwarded to one endpoint as is.
pub(super) async fn forward_plain(
    req: Request<Incoming>,
    ctx: &Arc<ConnCtx>,
    pool: &Arc<Pool>,
) -> (Response<Body>, Option<SocketAddr>) {
    let grpc = is_grpc(req.headers());
    let Some(pick) = pool.balancer.pick(None, |_| true) else {
        return (
            local_reply(StatusCode::SERVICE_UNAVAILABLE, grpc, "no endpoint"),
            None,
        );
    };
    let ep = pick.addr();
    let (parts, body) = req.into_parts();
    let Some(uri) = upstream_uri(ep, &parts.uri) else {
        return (
            local_reply(StatusCode::BAD_REQUEST, grpc, "bad request target"),
            None,
        );
    };
    let mut up = Request::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
    *up.uri_mut() = uri;
    match ctx.engine.send(ctx.src_workload, up).await {
        Ok(resp) => (
            resp.map(|b| b.map_err(BoxError::from).boxed_unsync()),
            Some(ep),
        ),
        Err(_) => (
            local_reply(StatusCode::BAD_GATEWAY, grpc, "upstream error"),
            Some(ep),
        ),
    }
}
