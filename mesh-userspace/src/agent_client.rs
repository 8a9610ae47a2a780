//! The client side of the agent's admin API: one HTTP/1.1 request over its Unix socket (the
//! CLI's GETs, the CNI plugin's enrolment POST).
use std::path::Path;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;

/// GET `path` over the agent's Unix socket.
pub async fn get(socket: &Path, path: &str) -> std::io::Result<(StatusCode, Bytes)> {
    request(socket, Method::GET, path, Vec::new()).await
}

/// One request over the agent's Unix socket.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> std::io::Result<(StatusCode, Bytes)> {
    use http_body_util::BodyExt as _;
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot reach the agent at {}: {e}; is `weft agent` running for this node?",
                socket.display()
            ),
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "weft-agent")
        .body(Full::new(Bytes::from(body)))
        .map_err(std::io::Error::other)?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, body))
}
