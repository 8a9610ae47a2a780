//! Request bodies: buffered up to a cap so that a request can be retried or mirrored, streamed
//! past it; fault rolls.
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use rand::Rng as _;
use tokio::time::Instant;

use super::*;

pub(super) fn roll(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rand::rng().random::<f64>() * 100.0 < percent)
}

pub(super) enum ReqBody {
    /// Whole body in memory (replayable).
    Kept(Bytes),
    /// Streams through once.
    Stream(Body),
}

pub(super) async fn buffer_body<B>(mut body: B, cap: u64) -> Result<ReqBody, BoxError>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return Ok(ReqBody::Kept(Bytes::new()));
    }
    let fits = body.size_hint().upper().is_some_and(|u| u <= cap);
    if cap == 0 || (!fits && body.size_hint().lower() > cap) {
        return Ok(ReqBody::Stream(body.map_err(Into::into).boxed_unsync()));
    }
    // Read frames until the body ends, passes the cap, or stops arriving for a moment: a
    // streaming request (gRPC client or bidi streaming, long uploads) must not wait for its own
    // end before it is forwarded; it then streams through as one try.
    let deadline = Instant::now() + BUFFER_WAIT;
    let mut kept: Vec<Bytes> = Vec::new();
    let mut size = 0u64;
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, body.frame()).await else {
            return Ok(ReqBody::Stream(chain_prefix(kept, body)));
        };
        match next {
            None => {
                let mut all = bytes::BytesMut::with_capacity(usize::try_from(size).unwrap_or(0));
                for c in kept {
                    all.extend_from_slice(&c);
                }
                return Ok(ReqBody::Kept(all.freeze()));
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    size += data.len() as u64;
                    kept.push(data);
                }
                // Request trailers are dropped when a body is kept (gRPC clients do not send
                // them); documented in ARCHITECTURE.md.
                if size > cap {
                    return Ok(ReqBody::Stream(chain_prefix(kept, body)));
                }
            }
        }
    }
}

/// How long a request body may take to arrive completely and still be kept for retries.
pub(super) const BUFFER_WAIT: Duration = Duration::from_millis(100);

/// The chunks already read, then the rest of the body.
pub(super) fn chain_prefix<B>(kept: Vec<Bytes>, rest: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let prefix = futures_util::stream::iter(
        kept.into_iter()
            .map(|b| Ok::<_, BoxError>(hyper::body::Frame::data(b))),
    );
    let rest = http_body_util::BodyStream::new(rest.map_err(Into::into));
    http_body_util::StreamBody::new(futures_util::StreamExt::chain(prefix, rest)).boxed_unsync()
}
