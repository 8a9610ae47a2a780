//! Attempts: connect-failure and idempotent-request retries to other endpoints, the retry
//! policy and budget, per-try timeouts, the circuit breaker and outlier detection.
use crate::state::WorkloadId;
use std::time::Duration;

use http_body_util::BodyExt as _;
use hyper::{
    Request, Response, StatusCode, Version,
    header::{self, HeaderMap},
};
use tokio::time::Instant;

use super::super::{
    breaker::{ConnPermit, RequestPermit},
    budget::RetryBudget,
    metrics::{L7Metrics, RouteLabels, ServiceLabels},
    outlier::Outcome,
    snapshot::Pool,
};
use crate::state::policy::{HashKey, RetryPolicy};

use super::*;

/// Why an attempt failed, for retry decisions and outlier detection.
#[derive(Debug)]
pub(super) enum Failure {
    Connect,
    Reset,
    Timeout,
}

/// Where a try goes: the engine's pooled clients (direct or through the tunnel), or, in tests,
/// a script of answers.
pub(crate) trait Upstream: Sync {
    /// The answer's body (the engine's: hyper's own, streamed on without another box).
    type Body: hyper::body::Body<Data = bytes::Bytes, Error: Into<BoxError>>
        + Unpin
        + Send
        + 'static;

    /// Sends one try for source workload `src`.
    fn forward(
        &self,
        src: WorkloadId,
        req: Request<Body>,
    ) -> impl std::future::Future<Output = Result<Response<Self::Body>, SendError>> + Send;
}

/// One request's tries and what they share: the backend pool, the retry policy and budget,
/// the per-try timeout, and where to count what happened.
pub(super) struct Attempts<'a, U> {
    pub(super) upstream: &'a U,
    pub(super) metrics: &'a L7Metrics,
    /// The source workload.
    pub(super) src: WorkloadId,
    pub(super) pool: &'a Pool,
    pub(super) budget: Option<&'a RetryBudget>,
    /// Tries the route's policy allows (the first included).
    pub(super) allowed: u32,
    pub(super) retries: Option<&'a RetryPolicy>,
    pub(super) per_try: Option<Duration>,
    pub(super) route: &'a RouteLabels,
    pub(super) grpc: bool,
}

impl<U: Upstream> Attempts<'_, U> {
    /// Runs the tries: picks an endpoint (not ejected, not one that failed already when another
    /// exists), takes the breaker's slots, sends, records the outcome for the balancer and the
    /// outlier detector, and retries as the policy (or safety alone) allows.
    #[allow(
        clippy::too_many_lines,
        reason = "the retry loop keeps one request's whole decision in one place"
    )]
    pub(super) async fn run(
        &self,
        mut parts: hyper::http::request::Parts,
        body: ReqBody,
    ) -> Response<Body> {
        let Self {
            upstream,
            metrics: m,
            src,
            pool,
            budget,
            allowed: attempts,
            retries,
            per_try,
            route,
            grpc,
        } = *self;
        let svc_labels = ServiceLabels {
            destination_namespace: pool.service.namespace.clone(),
            destination_service: pool.service.name.clone(),
        };
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
            let send = upstream.forward(src, req);
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
                m.safe_retries.get_or_create(route).inc();
                tracing::debug!(endpoint = %ep, ?failure, "repeating the try on another connection");
                drop((resp, permit, conn));
                continue;
            }
            if retriable {
                if budget.is_none_or(super::super::budget::RetryBudget::withdraw) {
                    m.retries.get_or_create(route).inc();
                    // The failed try's response and its breaker slots are not held while waiting.
                    drop((resp, permit, conn));
                    if let Some(r) = retries {
                        let wait = super::super::budget::backoff(
                            attempt - 1,
                            r.backoff_base,
                            r.backoff_max,
                            &mut rand::rng(),
                        );
                        tokio::time::sleep(wait).await;
                    }
                    continue;
                }
                m.budget_exhausted.get_or_create(route).inc();
            }
            return match (resp, failure) {
                (Some(resp), _) => resp.map(|body| {
                    Held {
                        body,
                        _permits: (permit, conn),
                    }
                    .map_err(Into::into)
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

/// Tries [`Attempts::run`] repeats on its own (see there), at most, per request.
pub(super) const SAFE_RETRIES: u32 = 2;

pub(super) fn should_retry<B>(
    r: &RetryPolicy,
    resp: Option<&Response<B>>,
    failure: Option<&Failure>,
) -> bool {
    match (resp, failure) {
        (_, Some(Failure::Connect)) => r.on.connect_failure,
        (_, Some(Failure::Reset)) => r.on.reset,
        (_, Some(Failure::Timeout)) => r.on.timeout,
        (Some(resp), None) => {
            let grpc_status = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            r.on.response(resp.status().as_u16(), grpc_status)
        }
        (None, None) => false,
    }
}

pub(super) fn hash_key(h: &HashKey, headers: &HeaderMap) -> Option<u64> {
    match h {
        HashKey::Header(name) => headers
            .get(name.as_str())
            .map(|v| super::super::balance::hash_key(v.as_bytes())),
        HashKey::Cookie(cookie) => {
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
            None
        }
    }
}

#[cfg(test)]
mod tests {
    //! The retry loop against a scripted upstream, in tokio's paused time: every decision
    //! (retry, safe repeat, budget, per-try timeout, breaker, outlier) is deterministic.
    use std::{collections::VecDeque, net::SocketAddr, sync::Mutex, time::Duration};

    use bytes::Bytes;
    use http_body_util::BodyExt as _;
    use hyper::{Method, Request, Response, StatusCode};
    use prometheus_client::registry::Registry;

    use super::{Attempts, ReqBody, SendError, Upstream};
    use crate::{
        proxy::{
            budget::RetryBudget,
            http::{Body, full},
            metrics::{L7Metrics, RouteLabels},
            snapshot::Pool,
        },
        state::{ServiceRef, policy::ServicePolicy},
    };

    /// What the scripted upstream does with one try.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        Status(u16),
        Connect,
        Reset,
        /// Answers `status` after this long.
        Slow(Duration, u16),
    }

    /// Answers tries from a script, in order, and records which endpoint each went to.
    #[derive(Default)]
    struct Script {
        steps: Mutex<VecDeque<Step>>,
        tried: Mutex<Vec<SocketAddr>>,
    }

    impl Script {
        fn new(steps: &[Step]) -> Self {
            Self {
                steps: Mutex::new(steps.iter().copied().collect()),
                tried: Mutex::default(),
            }
        }

        fn tried(&self) -> Vec<SocketAddr> {
            self.tried.lock().unwrap().clone()
        }
    }

    impl Upstream for Script {
        type Body = Body;

        async fn forward(
            &self,
            _src: crate::state::WorkloadId,
            req: Request<Body>,
        ) -> Result<Response<Body>, SendError> {
            let authority = req.uri().authority().unwrap().as_str().to_owned();
            self.tried.lock().unwrap().push(authority.parse().unwrap());
            let step = self
                .steps
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Step::Status(200));
            let status = match step {
                Step::Status(s) => s,
                Step::Connect => return Err(SendError::Connect("refused".into())),
                Step::Reset => return Err(SendError::Other("reset".into())),
                Step::Slow(d, s) => {
                    tokio::time::sleep(d).await;
                    s
                }
            };
            let mut resp = Response::new(full(Bytes::from_static(b"answer")));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok(resp)
        }
    }

    fn endpoints(n: u16) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([198, 18, 9, u8::try_from(i).unwrap()], 8080)))
            .collect()
    }

    fn spec(yaml: &str) -> ServicePolicy {
        ServicePolicy::from_yaml(yaml)
    }

    fn pool(n: u16, spec: &ServicePolicy) -> Pool {
        let service = ServiceRef {
            namespace: "shop".into(),
            name: "web".into(),
        };
        Pool::new(service, 80, endpoints(n), Some(spec))
    }

    fn route() -> RouteLabels {
        RouteLabels::client_to_web()
    }

    struct Run {
        status: StatusCode,
        body: Bytes,
        metrics: L7Metrics,
    }

    async fn run(
        script: &Script,
        pool: &Pool,
        spec: &ServicePolicy,
        budget: Option<&RetryBudget>,
        method: Method,
    ) -> Run {
        let metrics = L7Metrics::register(&mut Registry::default());
        let retries = spec.retries.as_ref();
        let route = route();
        let tries = Attempts {
            upstream: script,
            metrics: &metrics,
            src: crate::state::WorkloadId(7),
            pool,
            budget,
            allowed: retries.map_or(1, |r| r.attempts),
            retries,
            per_try: retries.and_then(|r| r.per_try_timeout),
            route: &route,
            grpc: false,
        };
        let (parts, ()) = Request::builder()
            .method(method)
            .uri("/items")
            .body(())
            .unwrap()
            .into_parts();
        let resp = tries.run(parts, ReqBody::Kept(Bytes::new())).await;
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Run {
            status,
            body,
            metrics,
        }
    }

    fn count(
        family: &prometheus_client::metrics::family::Family<
            RouteLabels,
            prometheus_client::metrics::counter::Counter,
        >,
    ) -> u64 {
        family.get_or_create(&route()).get()
    }

    #[tokio::test(start_paused = true)]
    async fn a_5xx_is_retried_on_another_endpoint_as_the_policy_says() {
        let spec = spec("retries: {attempts: 3, on: [5xx]}");
        let pool = pool(2, &spec);
        let script = Script::new(&[Step::Status(503), Step::Status(200)]);
        let r = run(&script, &pool, &spec, None, Method::GET).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, "answer");
        let tried = script.tried();
        assert_eq!(tried.len(), 2);
        assert_ne!(
            tried[0], tried[1],
            "the retry avoids the endpoint that failed"
        );
        assert_eq!(count(&r.metrics.retries), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_policy_a_5xx_is_the_answer() {
        let spec = spec("{}");
        let pool = pool(2, &spec);
        let script = Script::new(&[Step::Status(503)]);
        let r = run(&script, &pool, &spec, None, Method::GET).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(script.tried().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_failure_is_repeated_whatever_the_policy_and_a_broken_post_is_not() {
        let spec = spec("{}");
        let pool = pool(2, &spec);
        let script = Script::new(&[Step::Connect, Step::Status(200)]);
        let r = run(&script, &pool, &spec, None, Method::POST).await;
        assert_eq!(r.status, StatusCode::OK, "nothing was sent: safe to repeat");
        assert_eq!(count(&r.metrics.safe_retries), 1);

        let script = Script::new(&[Step::Reset, Step::Status(200)]);
        let r = run(&script, &pool, &spec, None, Method::POST).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_GATEWAY,
            "a POST may have been applied"
        );
        assert_eq!(script.tried().len(), 1);

        let script = Script::new(&[Step::Reset, Step::Status(200)]);
        let r = run(&script, &pool, &spec, None, Method::GET).await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "an idempotent request may be repeated"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_try_times_out_and_the_next_one_answers() {
        let spec = spec("retries: {attempts: 2, perTryTimeout: 100ms, on: [5xx]}");
        let pool = pool(2, &spec);
        let script = Script::new(&[Step::Slow(Duration::from_secs(5), 200), Step::Status(200)]);
        let started = tokio::time::Instant::now();
        let r = run(&script, &pool, &spec, None, Method::GET).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(script.tried().len(), 2);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(1),
            "the first try was cut at its timeout: {took:?}"
        );

        let script = Script::new(&[
            Step::Slow(Duration::from_secs(5), 200),
            Step::Slow(Duration::from_secs(5), 200),
        ]);
        let r = run(&script, &pool, &spec, None, Method::GET).await;
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_budget_stops_retries() {
        let spec = spec("retries: {attempts: 3, on: [5xx]}");
        let pool = pool(2, &spec);
        // 0 % of requests and no floor: no retry may be withdrawn.
        let budget = RetryBudget::new(0.0, 0, Duration::from_secs(10));
        let script = Script::new(&[Step::Status(503), Step::Status(200)]);
        let r = run(&script, &pool, &spec, Some(&budget), Method::GET).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(script.tried().len(), 1);
        assert_eq!(count(&r.metrics.budget_exhausted), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_answers_503_without_a_try() {
        let spec = spec("circuitBreaker: {maxRequests: 0}");
        let pool = pool(1, &spec);
        let script = Script::new(&[]);
        let r = run(&script, &pool, &spec, None, Method::GET).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(script.tried().is_empty());
        assert!(String::from_utf8_lossy(&r.body).contains("circuit breaker open"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_endpoint_is_ejected_and_later_requests_avoid_it() {
        let spec = spec("outlierDetection: {consecutive5xx: 1, maxEjectionPercent: 50}");
        let pool = pool(2, &spec);
        let script = Script::new(&[Step::Status(500)]);
        let r = run(&script, &pool, &spec, None, Method::GET).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        let bad = script.tried()[0];
        let ejections = r
            .metrics
            .ejections
            .get_or_create(&crate::proxy::metrics::ServiceLabels {
                destination_namespace: "shop".into(),
                destination_service: "web".into(),
            })
            .get();
        assert_eq!(ejections, 1);
        for _ in 0..20 {
            let script = Script::new(&[Step::Status(200)]);
            run(&script, &pool, &spec, None, Method::GET).await;
            assert_ne!(
                script.tried()[0],
                bad,
                "an ejected endpoint gets no request"
            );
        }
    }
}
