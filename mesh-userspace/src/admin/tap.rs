//! `/tap`: the live event stream (see [`crate::tap`]), and the task that turns the kernel's
//! flow events into it.
use std::{convert::Infallible, path::PathBuf, pin::Pin, sync::Arc, task::Poll, time::Duration};

use bytes::Bytes;
use http_body_util::Either;
use hyper::{
    Response, StatusCode,
    body::{Body, Frame},
    header,
};
use tokio::sync::{broadcast::error::RecvError, mpsc};

use super::SharedState;
use crate::{
    flows::Clock,
    tap::{Event, Filter, Hub, What, now_ms},
};

/// Reads the kernel's events ring buffer and publishes each event, named, on the hub; says
/// when the kernel lost some (its buffer was full). Runs for the agent's lifetime.
pub async fn read_kernel(bpffs_dir: PathBuf, shared: SharedState, hub: Arc<Hub>) {
    let mut reader = match crate::ebpf::events::EventReader::open(&bpffs_dir) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the kernel's flow events: `weft tap` shows the engine's requests only");
            return;
        }
    };
    let mut batch = Vec::new();
    let mut lost_seen = None;
    loop {
        batch.clear();
        if let Err(e) = reader.next_batch(&mut batch).await {
            tracing::warn!(error = %e, "reading the kernel's flow events stopped");
            return;
        }
        let clock = Clock::now();
        let s = shared
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let lost = s.metrics.get().global[mesh_common::global_counter::EVENTS_LOST];
        if let Some(before) = lost_seen
            && lost > before
        {
            hub.publish(Event {
                time_ms: now_ms(),
                src: crate::tap::Endpoint::default(),
                dst: crate::tap::Endpoint::default(),
                service: None,
                what: What::Lost {
                    events: lost - before,
                    reason: "the kernel's event buffer was full".into(),
                },
            });
        }
        lost_seen = Some(lost);
        if !hub.watching() {
            continue; // events still in the buffer from a watcher that left
        }
        for e in &batch {
            hub.publish(crate::flows::event_of(e, &s.node, clock));
        }
    }
}

/// A streamed response body: JSON lines as the subscription task sends them.
pub struct Stream(pub(super) mpsc::Receiver<Bytes>);

impl Body for Stream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

/// How long a new subscriber waits for the kernel to start writing events (the agent's next
/// sync pass sets the flag).
const KERNEL_START: Duration = Duration::from_secs(2);

/// Subscribes with `filter` and streams what passes, one JSON object per line. The first line
/// is `{"type":"watching",…}` once the kernel writes events for this subscriber, so a reader
/// knows that what it does from then on is seen.
#[must_use]
pub fn subscribe(
    hub: &Arc<Hub>,
    filter: Filter,
    sync_interval: std::time::Duration,
    seconds: Option<std::time::Duration>,
) -> Stream {
    let (tx, rx) = mpsc::channel(64);
    let mut events = hub.subscribe();
    let end = seconds.map(|s| tokio::time::Instant::now() + s);
    tokio::spawn(async move {
        // The sync pass after this subscription turns the kernel's events on.
        tokio::time::sleep((sync_interval * 2).min(KERNEL_START)).await;
        let hello = serde_json::json!({"type": "watching", "filter": filter});
        if tx.send(Bytes::from(format!("{hello}\n"))).await.is_err() {
            return;
        }
        loop {
            let received = tokio::select! {
                // The reader went away: the subscription ends (and with the last one, the
                // kernel's events).
                () = tx.closed() => return,
                () = async {
                    match end {
                        Some(end) => tokio::time::sleep_until(end).await,
                        None => std::future::pending().await,
                    }
                } => return,
                r = events.recv() => r,
            };
            let line = match received {
                Ok(e) if filter.keeps(&e) => serde_json::to_string(&*e),
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => serde_json::to_string(&Event {
                    time_ms: now_ms(),
                    src: crate::tap::Endpoint::default(),
                    dst: crate::tap::Endpoint::default(),
                    service: None,
                    what: What::Lost {
                        events: n,
                        reason: "this reader was too slow".into(),
                    },
                }),
                Err(RecvError::Closed) => return,
            };
            let Ok(mut line) = line else { continue };
            line.push('\n');
            // The reader went away: the subscription ends with this task.
            if tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
        }
    });
    Stream(rx)
}

/// `/tap?namespace=…&pod=…&service=…&verdict=…&status=…&type=…[&for=seconds][&batch=true]`:
/// live events as JSON lines (see [`crate::tap`]), until the reader leaves or `for` seconds have
/// passed. With `batch=true` (and `for`) the events of those seconds come as one answer at
/// their end — what a page that polls wants, and what a headless browser's virtual clock waits
/// for.
pub(super) async fn serve(shared: &SharedState, query: &str) -> Response<super::AdminBody> {
    let bad = |why: String| super::respond(StatusCode::BAD_REQUEST, "text/plain", why + "\n");
    let (filter, seconds, batch) = match parse_query(query) {
        Ok(parsed) => parsed,
        Err(why) => return bad(why),
    };
    let (hub, sync_interval) = {
        let s = shared
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (
            s.tap.clone(),
            s.config
                .as_ref()
                .map_or(Duration::from_millis(250), |c| c.sync_interval),
        )
    };
    let mut stream = subscribe(&hub, filter, sync_interval, seconds);
    if batch {
        let mut body = Vec::new();
        while let Some(line) = stream.0.recv().await {
            body.extend_from_slice(&line);
        }
        return super::respond(StatusCode::OK, NDJSON, body);
    }
    Response::builder()
        .header(header::CONTENT_TYPE, NDJSON)
        .body(Either::Right(stream))
        .unwrap_or_else(|_| super::respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", ""))
}

const NDJSON: &str = "application/x-ndjson";

/// `/tap`'s query: the filter, `for` and `batch`.
fn parse_query(query: &str) -> Result<(Filter, Option<Duration>, bool), String> {
    let (mut seconds, mut batch) = (None, false);
    let mut rest = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "for" => match v.parse::<u64>() {
                Ok(s) if (1..=86_400).contains(&s) => seconds = Some(Duration::from_secs(s)),
                _ => return Err(format!("for={v}: seconds, 1 to 86400")),
            },
            "batch" => batch = v == "true" || v == "1",
            _ => {
                rest.append_pair(&k, &v);
            }
        }
    }
    if batch && seconds.is_none() {
        return Err("batch=true needs for=<seconds>".into());
    }
    Ok((Filter::from_query(&rest.finish())?, seconds, batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_queries_split_into_filter_duration_and_batch() {
        let (f, secs, batch) = parse_query("pod=web&for=2&batch=true&status=5xx").unwrap();
        assert_eq!(
            (f.pod.as_deref(), f.status.as_deref()),
            (Some("web"), Some("5xx"))
        );
        assert_eq!((secs, batch), (Some(Duration::from_secs(2)), true));
        assert!(parse_query("batch=true").is_err(), "a batch needs an end");
        assert!(parse_query("for=0").is_err() && parse_query("for=x").is_err());
        assert!(parse_query("colour=red").is_err());
    }
}
