//! A trace receiver for the tests (`weft-workload otlp-receiver`): an OTLP/HTTP endpoint
//! (`POST /v1/traces`) that decodes each export into the OpenTelemetry protocol's own message
//! types (`opentelemetry-proto`: OTLP/JSON through their serde support, or protobuf) and prints
//! every span as one JSON line (`{"span": …}`). A body the types do not accept is answered 400
//! and reported (`{"rejected": …}`), so an exporter that drifts from the protocol fails a test.
use std::{collections::BTreeMap, io::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, any_value},
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::{Pod, Proc};

#[derive(Debug, Clone, clap::Args)]
pub struct OtlpReceiverArgs {
    #[arg(long, default_value = "0.0.0.0:4318")]
    pub listen: SocketAddr,
    /// Stop after this long whatever happens.
    #[arg(long, default_value_t = 300)]
    pub max_secs: u64,
}

/// One received span, flattened for assertions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedSpan {
    /// Hex, as in `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP `SpanKind` (2 server, 3 client).
    pub kind: i32,
    /// OTLP status code (1 ok, 2 error).
    pub status: i32,
    /// The resource's `service.name`.
    pub service: String,
    /// String values of the span's attributes (others as their debug form).
    pub attributes: BTreeMap<String, String>,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
}

#[derive(Serialize)]
struct Line<'a> {
    span: &'a ReceivedSpan,
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// The spans of one export request.
#[must_use]
pub fn spans(request: &ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(kv.value.as_ref()))
            .unwrap_or_default();
        for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
            out.push(ReceivedSpan {
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                name: span.name.clone(),
                kind: span.kind,
                status: span.status.as_ref().map_or(0, |s| s.code),
                service: service.clone(),
                attributes: span
                    .attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                    .collect(),
                start_unix_nano: span.start_time_unix_nano,
                end_unix_nano: span.end_time_unix_nano,
            });
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Decodes an export body by its content type: OTLP/JSON or OTLP/protobuf.
///
/// # Errors
/// When the body is not a valid `ExportTraceServiceRequest` in that encoding.
pub fn decode(content_type: &str, body: &[u8]) -> Result<ExportTraceServiceRequest, String> {
    if content_type.starts_with("application/json") {
        serde_json::from_slice(body).map_err(|e| format!("OTLP/JSON: {e}"))
    } else if content_type.starts_with("application/x-protobuf") {
        prost::Message::decode(body).map_err(|e| format!("OTLP/protobuf: {e}"))
    } else {
        Err(format!("unsupported content type {content_type:?}"))
    }
}

/// Serves until `max_secs`, SIGTERM or SIGINT; each span is printed as it arrives.
///
/// # Errors
/// When the listener cannot be bound.
pub fn run(args: &OtlpReceiverArgs, listening: impl FnOnce(SocketAddr)) -> Result<(), String> {
    let runtime = crate::http::runtime(1)?;
    runtime.block_on(async {
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("binding {}: {e}", args.listen))?;
        listening(listener.local_addr().map_err(|e| e.to_string())?);
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(|e| e.to_string())?;
        let deadline = tokio::time::sleep(Duration::from_secs(args.max_secs));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = terminate.recv() => return Ok(()),
                () = &mut deadline => return Ok(()),
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service_fn(export))
                            .await;
                    });
                }
            }
        }
    })
}

async fn export(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let reply = |status: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = status;
        r
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/traces" {
        return Ok(reply(StatusCode::NOT_FOUND, "not an OTLP trace endpoint"));
    }
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = req.into_body().collect().await?.to_bytes();
    match decode(&content_type, &body) {
        Ok(request) => {
            for span in spans(&request) {
                emit_line(&Line { span: &span });
            }
            Ok(reply(StatusCode::OK, "{}"))
        }
        Err(error) => {
            emit_line(&serde_json::json!({ "rejected": error }));
            Ok(reply(StatusCode::BAD_REQUEST, "not an OTLP export"))
        }
    }
}

/// One JSON line on stdout, flushed (the test reads lines while the receiver runs).
fn emit_line(value: &impl Serialize) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, value)
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush());
}

/// A receiver running in a pod.
pub struct OtlpReceiver {
    proc: Proc,
}

impl OtlpReceiver {
    /// Every span received so far.
    ///
    /// # Errors
    /// When the receiver rejected a body (the exporter does not speak OTLP).
    pub fn spans(&self) -> Result<Vec<ReceivedSpan>> {
        let out = self.proc.stdout();
        let mut spans = Vec::new();
        for line in out.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if let Some(rejected) = v.get("rejected") {
                anyhow::bail!("the receiver rejected an export: {rejected}");
            }
            if let Some(span) = v.get("span") {
                spans.push(serde_json::from_value(span.clone()).context("span line")?);
            }
        }
        Ok(spans)
    }
}

impl Pod {
    /// Starts `weft-workload otlp-receiver` on `port` and waits until it listens.
    pub fn serve_otlp(&self, port: u16) -> Result<OtlpReceiver> {
        let listen = format!("0.0.0.0:{port}");
        let proc = self.spawn(
            crate::workload_bin(),
            ["otlp-receiver", "--listen", &listen],
        )?;
        proc.wait_for_json(Duration::from_secs(10), "listening")?;
        Ok(OtlpReceiver { proc })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine's OTLP/JSON shape, as `proxy::trace` writes it, decodes into the protocol's
    /// types with ids, times, kind and attributes intact.
    #[test]
    fn decodes_otlp_json_as_the_specification_writes_it() {
        let body = br#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"weft-l7-engine"}}]},
            "scopeSpans":[{"scope":{"name":"weft"},"spans":[{"traceId":"0af7651916cd43dd8448eb211c80319c",
            "spanId":"b7ad6b7169203331","parentSpanId":"","name":"GET default/web","kind":2,
            "startTimeUnixNano":"1700000000000000000","endTimeUnixNano":"1700000000001000000",
            "attributes":[{"key":"source.workload","value":{"stringValue":"default/a"}}],"status":{"code":1}}]}]}]}"#;
        let request = decode("application/json", body).expect("valid OTLP/JSON");
        let s = &spans(&request)[0];
        assert_eq!(s.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(
            (s.span_id.as_str(), s.parent_span_id.as_str()),
            ("b7ad6b7169203331", "")
        );
        assert_eq!(
            (s.kind, s.status, s.service.as_str()),
            (2, 1, "weft-l7-engine")
        );
        assert_eq!(s.attributes["source.workload"], "default/a");
        assert_eq!(s.end_unix_nano - s.start_unix_nano, 1_000_000);
        assert!(
            decode(
                "application/json",
                br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"xyz"}]}]}]}"#
            )
            .is_err()
        );
        assert!(decode("text/plain", b"{}").is_err());
    }
}
