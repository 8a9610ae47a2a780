//! Attempts: connect-failure and idempotent-request retries to other endpoints, the retry
//! policy and budget, per-try timeouts, the circuit breaker and outlier detection.
use std::{sync::Arc, time::Duration};

use http_body_util::BodyExt as _;
use hyper::{
    Request, Response, StatusCode, Version,
    body::Incoming,
    header::{self, HeaderMap},
};
use tokio::time::Instant;

use super::super::{
    ConnCtx,
    breaker::{ConnPermit, RequestPermit},
    metrics::ServiceLabels,
    outlier::Outcome,
    snapshot::{Pool, Target},
};
use crate::api::traffic::Retries;

use super::*;

/// Why an attempt failed, for retry decisions and outlier detection.
#[derive(Debug)]
pub(super) enum Failure {
    Connect,
    Reset,
    Timeout,
}

#[allow(
    clippy::too_many_arguments,
    clippy::too_many_lines,
    reason = "the retry loop keeps one request's whole context in one place"
)]
pub(super) async fn attempt_loop(
    ctx: &Arc<ConnCtx>,
    target: &Arc<Target>,
    pool: &Arc<Pool>,
    mut parts: hyper::http::request::Parts,
    body: ReqBody,
    attempts: u32,
    retries: Option<&Retries>,
    per_try: Option<Duration>,
    labels: &Labels,
    grpc: bool,
) -> Response<Body> {
    let m = &ctx.engine.metrics;
    let svc_labels = ServiceLabels {
        destination_namespace: pool.service.namespace.clone(),
        destination_service: pool.service.name.clone(),
    };
    let budget = target.policy.as_ref().and_then(|p| p.budget.as_ref());
    if let Some(b) = budget {
        b.deposit();
    }
    let hash = pool
        .hash_on
        .as_ref()
        .and_then(|h| hash_key(h, &parts.headers));
    let (kept, mut stream) = match body {
        ReqBody::Kept(b) => (Some(b), None),
        ReqBody::Stream(s) => (None, Some(s)),
    };
    let mut tried = Vec::new();
    let mut attempt = 0;
    let mut safe_used = 0;
    loop {
        attempt += 1;
        let body = match (&kept, stream.take()) {
            (Some(b), _) => full(b.clone()),
            (None, Some(s)) => s,
            (None, None) => empty(),
        };
        let replayable = kept.is_some();
        // Endpoint: not ejected, and (on retries) not one that already failed if another exists.
        let Some(pick) = pool
            .balancer
            .pick(hash, |ep| {
                !pool.outlier.as_ref().is_some_and(|o| o.is_ejected(ep))
                    && (tried.len() >= pool.endpoints.len() || !tried.contains(&ep))
            })
            .or_else(|| pool.balancer.pick(hash, |_| true))
        else {
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, grpc, "no healthy endpoint");
        };
        let ep = pick.addr();
        tried.push(ep);
        let permit = match pool.breaker.as_ref() {
            Some(b) => {
                if let Some(p) = b.try_request() {
                    Some(p)
                } else {
                    m.circuit_open.get_or_create(&svc_labels).inc();
                    return local_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        grpc,
                        "circuit breaker open: too many concurrent requests",
                    );
                }
            }
            None => None,
        };
        // HTTP/1.1 upstreams: one connection per request in flight, at most maxConnections;
        // a request that finds none free waits (pending) within its per-try timeout.
        let conn = match pool.breaker.as_ref() {
            Some(b) if parts.version != Version::HTTP_2 => {
                let waited = match per_try {
                    Some(t) => tokio::time::timeout(t, b.connection()).await.ok(),
                    None => Some(b.connection().await),
                };
                match waited {
                    Some(Some(c)) => Some(c),
                    Some(None) => {
                        m.circuit_open.get_or_create(&svc_labels).inc();
                        return local_reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            grpc,
                            "circuit breaker open: too many pending requests",
                        );
                    }
                    None => {
                        return local_reply(
                            StatusCode::GATEWAY_TIMEOUT,
                            grpc,
                            "upstream per-try timeout waiting for a connection",
                        );
                    }
                }
            }
            _ => None,
        };
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        // A try that cannot be repeated takes the headers instead of copying them.
        *req.headers_mut() =
            if !replayable || (attempt - safe_used >= attempts && safe_used >= SAFE_RETRIES) {
                std::mem::take(&mut parts.headers)
            } else {
                parts.headers.clone()
            };
        let Some(uri) = upstream_uri(ep, &parts.uri) else {
            return local_reply(StatusCode::BAD_REQUEST, grpc, "bad request target");
        };
        *req.uri_mut() = uri;
        *req.version_mut() = parts.version;

        let started = Instant::now();
        let send = ctx.engine.send(ctx.src_workload, req);
        let result = match per_try {
            Some(t) => tokio::time::timeout(t, send)
                .await
                .unwrap_or(Err(SendError::Timeout)),
            None => send.await,
        };
        let latency = started.elapsed();
        let (outcome, failure, resp) = match result {
            Ok(resp) => {
                let s = resp.status().as_u16();
                let outcome = if matches!(s, 502..=504) {
                    Outcome::GatewayError
                } else if s >= 500 {
                    Outcome::Status5xx(s)
                } else {
                    Outcome::Success
                };
                (outcome, None, Some(resp))
            }
            Err(SendError::Connect(_)) => (Outcome::GatewayError, Some(Failure::Connect), None),
            Err(SendError::Timeout) => (Outcome::GatewayError, Some(Failure::Timeout), None),
            Err(SendError::Other(_)) => (Outcome::GatewayError, Some(Failure::Reset), None),
        };
        pick.record(latency, matches!(outcome, Outcome::Success));
        if let Some(o) = &pool.outlier
            && o.record(ep, outcome)
        {
            m.ejections.get_or_create(&svc_labels).inc();
            tracing::info!(target: "weft::outlier", endpoint = %ep, service = %format!("{}/{}", pool.service.namespace, pool.service.name), "endpoint ejected");
        }
        let retriable = replayable
            && attempt - safe_used < attempts
            && retries.is_some_and(|r| should_retry(r, resp.as_ref(), failure.as_ref()));
        // Whatever the route's policy: a try whose connection could not be made sent nothing,
        // so any request may go to another endpoint; an idempotent request whose connection
        // broke before an answer may be repeated (RFC 9110 §9.2.2). That is what keeps
        // requests whole while an endpoint, or the agent of its node, goes away.
        let safe = !retriable
            && replayable
            && safe_used < SAFE_RETRIES
            && match failure {
                Some(Failure::Connect) => true,
                Some(Failure::Reset) => parts.method.is_idempotent(),
                _ => false,
            };
        if safe {
            safe_used += 1;
            m.safe_retries.get_or_create(&labels.route).inc();
            tracing::debug!(endpoint = %ep, ?failure, "repeating the try on another connection");
            drop((resp, permit, conn));
            continue;
        }
        if retriable {
            if budget.is_none_or(super::super::budget::RetryBudget::withdraw) {
                m.retries.get_or_create(&labels.route).inc();
                // The failed try's response and its breaker slots are not held while waiting.
                drop((resp, permit, conn));
                if let Some(r) = retries {
                    let wait = super::super::budget::backoff(
                        attempt - 1,
                        r.backoff.base,
                        r.backoff.max,
                        &mut rand::rng(),
                    );
                    tokio::time::sleep(wait).await;
                }
                continue;
            }
            m.budget_exhausted.get_or_create(&labels.route).inc();
        }
        return match (resp, failure) {
            (Some(resp), _) => resp.map(|body| {
                Held {
                    body,
                    _permits: (permit, conn),
                }
                .map_err(BoxError::from)
                .boxed_unsync()
            }),
            (None, Some(Failure::Connect)) => local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                grpc,
                "upstream connect error",
            ),
            (None, Some(Failure::Timeout)) => local_reply(
                StatusCode::GATEWAY_TIMEOUT,
                grpc,
                "upstream per-try timeout",
            ),
            (None, _) => {
                m.error("upstream_protocol");
                local_reply(
                    StatusCode::BAD_GATEWAY,
                    grpc,
                    "upstream connection reset or sent an invalid response",
                )
            }
        };
    }
}

/// A response body that keeps the request's circuit-breaker slots until it is done (dropped
/// by hyper once sent, or on error): an HTTP/1.1 connection is busy until its body is read.
pub(super) struct Held<B> {
    body: B,
    _permits: (Option<RequestPermit>, Option<ConnPermit>),
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Tries [`attempt_loop`] repeats on its own (see there), at most, per request.
pub(super) const SAFE_RETRIES: u32 = 2;

pub(super) fn should_retry(
    r: &Retries,
    resp: Option<&Response<Incoming>>,
    failure: Option<&Failure>,
) -> bool {
    let on = |c: &str| r.on.iter().any(|o| o.eq_ignore_ascii_case(c));
    match (resp, failure) {
        (_, Some(Failure::Connect)) => on("connect-failure") || on("gateway-error") || on("5xx"),
        (_, Some(Failure::Reset)) => on("reset") || on("gateway-error") || on("5xx"),
        (_, Some(Failure::Timeout)) => on("5xx") || on("gateway-error") || on("reset"),
        (Some(resp), None) => {
            let s = resp.status().as_u16();
            let grpc_status = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            (s >= 500 && on("5xx"))
                || (matches!(s, 502..=504) && on("gateway-error"))
                || (r.status_codes.contains(&s)
                    && (on("retriable-status-codes") || !r.status_codes.is_empty()))
                || grpc_status.is_some_and(|g| r.grpc_status_codes.contains(&g))
        }
        (None, None) => false,
    }
}

pub(super) fn hash_key(h: &crate::api::traffic::HashOn, headers: &HeaderMap) -> Option<u64> {
    if let Some(name) = &h.header {
        return headers
            .get(name.as_str())
            .map(|v| super::super::balance::hash_key(v.as_bytes()));
    }
    if let Some(cookie) = &h.cookie {
        for v in headers.get_all(header::COOKIE) {
            let Ok(text) = v.to_str() else { continue };
            for kv in text.split(';') {
                if let Some((k, val)) = kv.trim().split_once('=')
                    && k == cookie
                {
                    return Some(super::super::balance::hash_key(val.as_bytes()));
                }
            }
        }
    }
    None
}
