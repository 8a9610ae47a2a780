//! HTTP/1.1 and HTTP/2 (gRPC included) through the engine: routes, traffic policy, golden
//! metrics. One hyper server connection per client connection; upstream requests go through
//! pooled hyper clients (HTTP/1.1 keep-alive, HTTP/2 multiplexed) straight to endpoints.
use crate::state::WorkloadId;
use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{
    Response, StatusCode,
    header::{self, HeaderMap, HeaderValue},
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};

use super::{FastPath, io::LegConnector};

mod body;
mod faults;
mod forward;
mod pipeline;
mod retries;
mod server;

use body::{ReqBody, buffer_body, roll};
pub use forward::SendError;
use forward::{forward_plain, forward_upgrade, is_upgrade, spawn_mirror, upstream_uri};
pub use pipeline::RouteObs;
use pipeline::handle;
use retries::Attempts;
pub use server::{refuse_head, serve_h2, serve_http1};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Longest time a client may take to send a request head (slow-loris protection): 408 after.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted: bigger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Pooled upstream clients: direct ones for this node's pods, and per source workload ones
/// through the tunnel for pods of other nodes.
pub struct Upstreams {
    h1: Client<LegConnector, Body>,
    h2: Client<LegConnector, Body>,
    /// (source workload, HTTP/2) → client over the tunnel.
    tunneled: std::sync::Mutex<
        std::collections::HashMap<(WorkloadId, bool), Client<super::tunnel::TunnelConnector, Body>>,
    >,
}

impl Upstreams {
    /// Clients whose connections to this node's pods leave the fast path through `fast_path`
    /// when they carry bulk.
    #[must_use]
    pub fn new(fast_path: Arc<dyn FastPath>) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        let connector = LegConnector::new(http, fast_path);
        let h1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_mins(1))
            .pool_max_idle_per_host(256)
            .set_host(false)
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_mins(1))
            .http2_only(true)
            .set_host(false)
            .build(connector);
        Self {
            h1,
            h2,
            tunneled: std::sync::Mutex::default(),
        }
    }

    /// The client that reaches pods of other nodes as `source` (created on first use).
    fn tunneled(
        &self,
        connector: impl FnOnce() -> super::tunnel::TunnelConnector,
        source: WorkloadId,
        h2: bool,
    ) -> Client<super::tunnel::TunnelConnector, Body> {
        let mut clients = self
            .tunneled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients
            .entry((source, h2))
            .or_insert_with(|| {
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(Duration::from_mins(1))
                    .set_host(false);
                if h2 {
                    builder.timer(TokioTimer::new()).http2_only(true);
                }
                builder.build(connector())
            })
            .clone()
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    full(Bytes::new())
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// A response the engine makes itself (errors, faults, limits). gRPC clients get a
/// trailers-only response with the matching `grpc-status`, as a gRPC server would send.
fn local_reply(status: StatusCode, grpc: bool, message: &str) -> Response<Body> {
    let mut resp = if grpc {
        let code = match status.as_u16() {
            429 | 503 => 14, // UNAVAILABLE
            504 => 4,        // DEADLINE_EXCEEDED
            401 => 16,       // UNAUTHENTICATED
            403 => 7,        // PERMISSION_DENIED
            404 => 12,       // UNIMPLEMENTED
            _ => 13,         // INTERNAL
        };
        grpc_reply(code, message)
    } else {
        let mut resp = Response::new(full(format!("{message}\n")));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        resp
    };
    resp.headers_mut()
        .insert("x-weft-local-reply", HeaderValue::from_static("1"));
    resp
}

/// A trailers-only gRPC response (HTTP 200, `grpc-status` in the headers).
fn grpc_reply(code: u32, message: &str) -> Response<Body> {
    let mut resp = Response::new(empty());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(message) {
        h.insert("grpc-message", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    use super::body::{ReqBody, buffer_body};

    /// A body whose first chunk arrives and whose end never does (a streaming request).
    fn endless()
    -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Unpin> {
        let first = futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(b"first")))]);
        StreamBody::new(futures_util::StreamExt::chain(
            first,
            futures_util::stream::pending(),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn streaming_request_is_forwarded_without_waiting_for_its_end() {
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            buffer_body(endless(), 1 << 20),
        )
        .await
        .expect("buffering gave up in time")
        .unwrap();
        assert!(matches!(out, ReqBody::Stream(_)), "streamed, not kept");
    }

    #[tokio::test(start_paused = true)]
    async fn complete_small_body_is_kept_and_large_one_streams() {
        let small = http_body_util::Full::new(Bytes::from_static(b"hello"));
        assert!(
            matches!(buffer_body(small, 1024).await.unwrap(), ReqBody::Kept(b) if b == "hello")
        );
        let large = http_body_util::Full::new(Bytes::from(vec![7u8; 4096]));
        assert!(matches!(
            buffer_body(large, 1024).await.unwrap(),
            ReqBody::Stream(_)
        ));
    }
}
