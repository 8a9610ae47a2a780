//! W3C trace context and span export over OTLP/HTTP (JSON encoding, `POST <endpoint>/v1/traces`).
//!
//! The engine continues the caller's trace (or starts one) and, when an OTLP endpoint is
//! configured, emits one server span per request. Spans go through a bounded queue to a batching
//! task: a slow or absent collector costs dropped spans (counted), never request latency.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{HeaderMap, Request, Uri, header::HeaderValue};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rand::Rng as _;
use serde_json::json;
use tokio::sync::mpsc;

/// The trace context of one request through the engine.
#[derive(Debug, Clone)]
pub struct Context {
    pub trace_id: String,
    /// The engine's span, sent upstream as the parent.
    pub span_id: String,
    /// The caller's span, when it sent one.
    pub parent_span_id: Option<String>,
    pub sampled: bool,
}

/// Continues the caller's trace with a new span id, or starts one, and sets `traceparent` for
/// the upstream request.
pub fn propagate(headers: &mut HeaderMap) -> Context {
    let mut rng = rand::rng();
    let span_id = format!("{:016x}", rng.random::<u64>().max(1));
    let incoming = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    let ctx = match incoming {
        Some((trace_id, parent, flags)) => Context {
            trace_id,
            span_id,
            parent_span_id: Some(parent),
            sampled: u8::from_str_radix(&flags, 16).is_ok_and(|f| f & 1 == 1),
        },
        None => Context {
            trace_id: format!("{:032x}", rng.random::<u128>().max(1)),
            span_id,
            parent_span_id: None,
            sampled: true,
        },
    };
    let value = format!(
        "00-{}-{}-{}",
        ctx.trace_id,
        ctx.span_id,
        if ctx.sampled { "01" } else { "00" }
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("traceparent", v);
    }
    ctx
}

/// `(trace id, parent span id, flags)` of a valid version-00 `traceparent`.
fn parse_traceparent(v: &str) -> Option<(String, String, String)> {
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() && version == "00" {
        return None;
    }
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    (hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && nonzero(trace)
        && hex(parent, 16)
        && nonzero(parent)
        && hex(flags, 2))
    .then(|| (trace.to_owned(), parent.to_owned(), flags.to_owned()))
}

/// One finished request, as a span.
#[derive(Debug, Clone)]
pub struct Span {
    pub ctx: Context,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, String)>,
    pub error: bool,
}

/// Queue of spans to the exporter task.
#[derive(Clone)]
pub struct Exporter {
    tx: mpsc::Sender<Span>,
    pub dropped: Arc<AtomicU64>,
}

const QUEUE: usize = 4096;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);

impl Exporter {
    /// Starts the batching task on the current runtime. `endpoint` is the collector's base URL
    /// (`http://host:4318`).
    #[must_use]
    pub fn spawn(endpoint: &Uri) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let url: Option<Uri> = format!("{}/v1/traces", endpoint.to_string().trim_end_matches('/'))
            .parse()
            .ok();
        let dropped = Arc::new(AtomicU64::new(0));
        if let Some(url) = url {
            tokio::spawn(run(rx, url, dropped.clone()));
        }
        Self { tx, dropped }
    }

    /// Never waits: a full queue drops the span.
    pub fn record(&self, span: Span) {
        if span.ctx.sampled && self.tx.try_send(span).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn run(mut rx: mpsc::Receiver<Span>, url: Uri, dropped: Arc<AtomicU64>) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => {
                        batch.push(s);
                        if batch.len() >= BATCH {
                            break;
                        }
                    }
                    None => return,
                },
                () = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let body = encode(&batch);
        let n = batch.len() as u64;
        batch.clear();
        let req = Request::post(url.clone())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)));
        let ok = match req {
            Ok(req) => matches!(
                tokio::time::timeout(Duration::from_secs(5), client.request(req)).await,
                Ok(Ok(resp)) if resp.status().is_success()
            ),
            Err(_) => false,
        };
        if !ok {
            dropped.fetch_add(n, Ordering::Relaxed);
            tracing::debug!(spans = n, "OTLP export failed; spans dropped");
        }
    }
}

fn unix_nanos(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
        .to_string()
}

/// OTLP/JSON `ExportTraceServiceRequest`.
fn encode(spans: &[Span]) -> Vec<u8> {
    let spans: Vec<_> = spans
        .iter()
        .map(|s| {
            json!({
                "traceId": s.ctx.trace_id,
                "spanId": s.ctx.span_id,
                "parentSpanId": s.ctx.parent_span_id.clone().unwrap_or_default(),
                "name": s.name,
                "kind": 2,
                "startTimeUnixNano": unix_nanos(s.start),
                "endTimeUnixNano": unix_nanos(s.end),
                "attributes": s.attributes.iter().map(|(k, v)| json!({"key": k, "value": {"stringValue": v}})).collect::<Vec<_>>(),
                "status": {"code": if s.error { 2 } else { 1 }},
            })
        })
        .collect();
    serde_json::to_vec(&json!({
        "resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "weft-l7-engine"}}]},
            "scopeSpans": [{"scope": {"name": "weft"}, "spans": spans}],
        }]
    }))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_trace_and_starts_one_otherwise() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let ctx = propagate(&mut h);
        assert_eq!(ctx.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent_span_id.as_deref(), Some("00f067aa0ba902b7"));
        let out = h["traceparent"].to_str().unwrap().to_owned();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(!out.contains("00f067aa0ba902b7"), "new span id upstream");

        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", HeaderValue::from_str(bad).unwrap());
            let ctx = propagate(&mut h);
            assert!(ctx.parent_span_id.is_none(), "{bad}");
            assert_ne!(ctx.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        }
    }

    #[test]
    fn otlp_json_shape() {
        let mut h = HeaderMap::new();
        let ctx = propagate(&mut h);
        let now = SystemTime::now();
        let body = encode(&[Span {
            ctx: ctx.clone(),
            name: "GET default/web".into(),
            start: now,
            end: now,
            attributes: vec![("http.response.status_code", "200".into())],
            error: false,
        }]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], ctx.trace_id);
        assert_eq!(span["attributes"][0]["value"]["stringValue"], "200");
    }
}
