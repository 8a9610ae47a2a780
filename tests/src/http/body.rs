//! Bodies the HTTP workload sends and reads: the byte pattern as a streamed body, and bounded
//! reading of incoming bodies.
#![forbid(unsafe_code)]

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper::body::{Body, Frame};

use crate::workload::pattern::Pattern;

/// Size of each frame of a [`PatternBody`].
const CHUNK: usize = 16 * 1024;

/// `len` bytes of [`Pattern`] seed 0, produced frame by frame (never buffered whole). Its size
/// is not announced, so HTTP/1.1 sends it chunked.
#[derive(Debug)]
pub struct PatternBody {
    left: u64,
    pattern: Pattern,
}

impl PatternBody {
    #[must_use]
    pub fn new(len: u64) -> Self {
        Self {
            left: len,
            pattern: Pattern::new(0),
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let len = usize::try_from(self.left).map_or(CHUNK, |left| left.min(CHUNK));
        let mut chunk = BytesMut::zeroed(len);
        self.pattern.fill(&mut chunk);
        self.left -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk.freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }
}

/// `len` bytes of the pattern in one buffer (request bodies of the clients, sent with a length).
#[must_use]
pub fn pattern_bytes(len: usize) -> Bytes {
    let mut buf = BytesMut::zeroed(len);
    Pattern::new(0).fill(&mut buf);
    buf.freeze()
}

/// Reads `body` to its end; returns how many data bytes it had and the first `keep` of them.
pub async fn read_body<B>(mut body: B, keep: usize) -> Result<(u64, Vec<u8>), B::Error>
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut total: u64 = 0;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            total += data.len() as u64;
            if kept.len() < keep {
                let take = (keep - kept.len()).min(data.len());
                kept.extend_from_slice(&data[..take]);
            }
        }
    }
    Ok((total, kept))
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt as _, Full};

    use super::*;

    #[tokio::test]
    async fn pattern_body_streams_the_pattern_in_frames() {
        let len = 3 * CHUNK + 5;
        let mut body = PatternBody::new(len as u64);
        let mut frames = 0;
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
            frames += 1;
        }
        assert_eq!(frames, 4);
        assert_eq!(got, pattern_bytes(len));
        assert!(body.is_end_stream());
        assert!(PatternBody::new(0).is_end_stream());
    }

    #[tokio::test]
    async fn read_body_counts_everything_and_keeps_a_prefix() {
        let body = Full::new(Bytes::from_static(b"hello world"));
        let (total, kept) = read_body(body, 5).await.unwrap();
        assert_eq!((total, kept.as_slice()), (11, &b"hello"[..]));
    }
}
