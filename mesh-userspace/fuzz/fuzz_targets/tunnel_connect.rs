//! The tunnel port's HTTP/2 stream heads, from any peer that finished a TLS handshake: the bytes
//! after the handshake go through the tunnel's own HTTP/2 server settings to its CONNECT head
//! check. No input may panic or hang; a head the check accepts is a CONNECT to an IPv4 address and
//! port, and anything else is answered with the refusal's status (never a success).
#![no_main]

use std::cell::RefCell;
use std::convert::Infallible;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt as _;
use weft::proxy::tunnel::{connect_head, http2_server};

thread_local! {
    static RUNTIME: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"),
    );
}

fn answer(request: &Request<hyper::body::Incoming>) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    match connect_head(request) {
        Ok(head) => {
            assert_eq!(request.method(), Method::CONNECT);
            let authority = request.uri().authority().expect("an accepted head has a target");
            assert_eq!(authority.as_str().parse().ok(), Some(head.target));
        }
        Err(refusal) => {
            assert!(
                refusal.0.is_client_error(),
                "a malformed head is the client's error, got {}",
                refusal.0
            );
            *response.status_mut() = refusal.0;
        }
    }
    debug_assert_ne!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    response
}

fn run(data: &[u8]) {
    RUNTIME.with_borrow(|rt| {
        rt.block_on(async {
            // Room for every answer the server writes: the peer below never reads.
            let (mut peer, server) = tokio::io::duplex(1 << 20);
            let _ = peer.write_all(data).await;
            let _ = peer.shutdown().await;
            let service = hyper::service::service_fn(|request: Request<hyper::body::Incoming>| {
                let response = answer(&request);
                async move { Ok::<_, Infallible>(response) }
            });
            let served = http2_server().serve_connection(TokioIo::new(server), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), served)
                .await
                .expect("the server ends when its peer has closed");
        });
    });
}

fuzz_target!(|data: &[u8]| {
    // Most inputs are not even the connection preface: start from it so the frames get read.
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    if data.starts_with(PREFACE) {
        run(data);
    } else {
        let mut framed = PREFACE.to_vec();
        framed.extend_from_slice(data);
        run(&framed);
    }
});
