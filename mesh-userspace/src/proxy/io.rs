//! Stream adapters of the engine: [`Prefixed`] puts bytes already read (the detection prefix)
//! back in front; [`Leg`] takes a socket off the kernel fast path at its first bulk read or
//! write.
use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{Buf as _, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::FastPath;

pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // An empty `Bytes` still holds its allocation: a long-lived idle connection
                // would keep the detection buffer for nothing.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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

/// A single read or write at least this large marks a bulk transfer: request/response traffic
/// moves smaller messages, while a copy loop moves up to its whole buffer at once when data
/// waits for it.
pub const BULK_BYTES: usize = 32 * 1024;

/// One of the engine's sockets to a pod of this node (a client leg, or an upstream one). Such a
/// leg may use the kernel's socket fast path, whose in-kernel redirect has no flow control;
/// at its first read or write of [`BULK_BYTES`] or more, the leg asks the kernel to move both
/// of its ends to the normal stack, where TCP's window makes a fast sender wait for a slow
/// reader.
pub struct Leg<S> {
    inner: S,
    shed: Option<(Arc<dyn FastPath>, SocketAddrV4, SocketAddrV4)>,
}

impl Leg<TcpStream> {
    pub fn new(stream: TcpStream, fast_path: &Arc<dyn FastPath>) -> Self {
        let ends = match (stream.local_addr(), stream.peer_addr()) {
            (Ok(SocketAddr::V4(local)), Ok(SocketAddr::V4(peer))) => Some((local, peer)),
            _ => None,
        };
        Self {
            inner: stream,
            shed: ends.map(|(local, peer)| (fast_path.clone(), local, peer)),
        }
    }
}

impl<S> Leg<S> {
    /// A leg between `local` and `peer` over any stream (tests).
    #[cfg(test)]
    pub fn with(
        inner: S,
        fast_path: Arc<dyn FastPath>,
        local: SocketAddrV4,
        peer: SocketAddrV4,
    ) -> Self {
        Self {
            inner,
            shed: Some((fast_path, local, peer)),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn moved(&mut self, bytes: usize) {
        if bytes >= BULK_BYTES
            && let Some((fast_path, local, peer)) = self.shed.take()
        {
            fast_path.leave(local, peer);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Leg<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = buf.filled().len() - before;
            self.moved(read);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Leg<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.moved(n);
        }
        polled
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.moved(n);
        }
        polled
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

/// A connection of the engine's HTTP clients (a tunnel stream, a [`Leg`] to a local pod).
pub struct UpstreamConn<T>(pub T);

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for UpstreamConn<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for UpstreamConn<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<T> hyper_util::client::legacy::connect::Connection for UpstreamConn<T> {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        hyper_util::client::legacy::connect::Connected::new()
    }
}

/// Connects the engine's HTTP clients to this node's pods: each connection is a [`Leg`].
#[derive(Clone)]
pub struct LegConnector {
    inner: hyper_util::client::legacy::connect::HttpConnector,
    fast_path: Arc<dyn FastPath>,
}

impl LegConnector {
    pub fn new(
        inner: hyper_util::client::legacy::connect::HttpConnector,
        fast_path: Arc<dyn FastPath>,
    ) -> Self {
        Self { inner, fast_path }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<hyper::Uri> for LegConnector {
    type Response = UpstreamConn<hyper_util::rt::TokioIo<Leg<TcpStream>>>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let fast_path = self.fast_path.clone();
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
            Ok(UpstreamConn(hyper_util::rt::TokioIo::new(Leg::new(
                tcp, &fast_path,
            ))))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddrV4,
        sync::{Arc, Mutex},
    };

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::{BULK_BYTES, Leg};
    use crate::proxy::FastPath;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<(SocketAddrV4, SocketAddrV4)>>);

    impl FastPath for Recorded {
        fn leave(&self, one: SocketAddrV4, other: SocketAddrV4) {
            self.0.lock().unwrap().push((one, other));
        }
    }

    fn leg(
        near: tokio::io::DuplexStream,
    ) -> (
        Arc<Recorded>,
        Leg<tokio::io::DuplexStream>,
        SocketAddrV4,
        SocketAddrV4,
    ) {
        let recorded = Arc::new(Recorded::default());
        let (a, b) = (
            "10.0.0.1:15001".parse().unwrap(),
            "10.0.0.2:40000".parse().unwrap(),
        );
        (recorded.clone(), Leg::with(near, recorded, a, b), a, b)
    }

    #[tokio::test]
    async fn requests_and_responses_keep_the_fast_path_and_the_first_bulk_read_leaves_it_once() {
        let (near, mut far) = tokio::io::duplex(4 * BULK_BYTES);
        let (recorded, mut leg, a, b) = leg(near);
        let mut buf = vec![0u8; 2 * BULK_BYTES];
        for _ in 0..100 {
            far.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let n = leg.read(&mut buf).await.unwrap();
            leg.write_all(&buf[..n]).await.unwrap();
            far.read_exact(&mut buf[..n]).await.unwrap();
        }
        assert!(recorded.0.lock().unwrap().is_empty());
        far.write_all(&vec![7u8; BULK_BYTES]).await.unwrap();
        let mut got = 0;
        while got < BULK_BYTES {
            got += leg.read(&mut buf[got..]).await.unwrap();
        }
        leg.write_all(&vec![7u8; BULK_BYTES]).await.unwrap();
        assert_eq!(*recorded.0.lock().unwrap(), vec![(a, b)]);
    }

    #[tokio::test]
    async fn a_bulk_write_alone_leaves_the_fast_path() {
        let (near, mut far) = tokio::io::duplex(4 * BULK_BYTES);
        let (recorded, mut leg, a, b) = leg(near);
        leg.write_all(&vec![1u8; BULK_BYTES]).await.unwrap();
        let mut sink = vec![0u8; BULK_BYTES];
        far.read_exact(&mut sink).await.unwrap();
        assert_eq!(*recorded.0.lock().unwrap(), vec![(a, b)]);
    }
}
