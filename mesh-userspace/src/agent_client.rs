//! The client side of the agent's admin API: one HTTP/1.1 request over its Unix socket (the
//! CLI's GETs, the CNI plugin's enrolment POST), or a streamed answer read line by line
//! (`weft tap`).
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
    let resp = send(socket, method, path, body).await?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, body))
}

/// GET `path` and hand each line of the streamed answer to `line` as it arrives, until `line`
/// returns false or the agent ends the stream. An answer other than 200 is an error that
/// carries the agent's message.
pub async fn stream_lines(
    socket: &Path,
    path: &str,
    mut line: impl FnMut(&[u8]) -> bool,
) -> std::io::Result<()> {
    use http_body_util::BodyExt as _;
    let resp = send(socket, Method::GET, path, Vec::new()).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = body
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        return Err(std::io::Error::other(format!(
            "the agent answered {status}: {}",
            String::from_utf8_lossy(&text).trim()
        )));
    }
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(std::io::Error::other)?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let after = pending.split_off(end + 1);
            if !line(&pending[..end]) {
                return Ok(());
            }
            pending = after;
        }
    }
    Ok(())
}

async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> std::io::Result<hyper::Response<hyper::body::Incoming>> {
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
    sender
        .send_request(req)
        .await
        .map_err(std::io::Error::other)
}
