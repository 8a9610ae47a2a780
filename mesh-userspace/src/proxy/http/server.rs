//! Serving client connections: HTTP/1.1 (with strict framing checks before hyper sees a
//! head) and HTTP/2, each request handed to the pipeline.
use std::{convert::Infallible, sync::Arc, time::Duration};

use hyper::{
    StatusCode,
    header::{self, HeaderValue},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::super::ConnCtx;

use super::*;

/// A request being answered, boxed (see [`serve_http1`]).
type InFlight =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// Serves an HTTP/1.1 connection. `raw` is a second handle on the same socket, used only to
/// answer 408 when the request head does not arrive in time (hyper closes silently then).
pub async fn serve_http1<I>(io: I, raw: Option<std::net::TcpStream>, ctx: Arc<ConnCtx>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let ctx = ctx.clone();
        // The request's future is boxed: hyper keeps a place for it beside every connection
        // for the connection's whole life, and unboxed that place (about 8 KiB) would be taken
        // by each idle keep-alive connection too.
        service_fn(move |req| {
            let ctx = ctx.clone();
            let answer: InFlight = Box::pin(async move {
                let mut resp = handle(req, ctx.clone()).await?;
                if ctx.engine.is_draining() {
                    // The client learns with this answer that the connection ends: its next
                    // request goes on a new connection, which the kernel no longer sends here.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            });
            answer
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = async {
            ctx.engine.drain_started().await;
            tokio::time::sleep(super::super::DRAIN_IDLE_GRACE).await;
        } => {
            // Still open after the grace: idle (it closes now) or busy (it closes after the
            // answer in flight).
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            ctx.engine.metrics.error("header_timeout");
            if let Some(mut raw) = raw {
                use std::io::Write as _;
                let _ = raw.write_all(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        } else if e.is_parse() || e.is_parse_too_large() {
            ctx.engine.metrics.error("bad_request");
            // hyper has answered 400/431 and let go of the socket with the rest of the
            // request unread: closing now would send a reset that can destroy that answer
            // before the client reads it. Close as nginx does: our side first, then read and
            // drop what the client still sends, for a bounded time.
            if let Some(raw) = raw {
                lingering_close(raw).await;
            }
        }
        tracing::debug!(error = %e, "HTTP/1 connection ended with an error");
    }
}

/// Answers a request head the engine refuses (see [`super::super::strict`]) with `status` and closes the
/// connection the lingering way.
pub async fn refuse_head(
    client: &mut (impl tokio::io::AsyncWrite + Unpin),
    raw: Option<std::net::TcpStream>,
    status: u16,
    problem: &str,
) {
    use tokio::io::AsyncWriteExt as _;
    let body = format!("{problem}\n");
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Bad Request");
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(head.as_bytes()).await;
    let _ = client.flush().await;
    if let Some(raw) = raw {
        lingering_close(raw).await;
    }
}

/// Shuts the socket's sending side, then discards what the peer still sends (at most 1 MiB,
/// for at most 2 s), so that the close does not reset the connection under the last answer.
pub(super) async fn lingering_close(raw: std::net::TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut socket) = raw
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(raw))
    else {
        return;
    };
    let _ = socket.shutdown().await;
    let mut buf = vec![0_u8; 16 * 1024];
    let mut left: usize = 1 << 20;
    let drain = async {
        while left > 0 {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

pub async fn serve_h2<I>(io: I, ctx: Arc<ConnCtx>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req| handle(req, ctx.clone()))
    };
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = ctx.engine.drain_started() => {
            // GOAWAY: streams in flight finish, new ones go on a new connection.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        ctx.engine.metrics.error("h2_connection");
        tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
    }
}
