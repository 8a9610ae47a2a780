//! The traffic policy's local answers, before any try: injected faults (a delay, an abort) and
//! the Service's rate limit; and the whole-request deadline around the tries.
use std::{future::Future, time::Duration};

use hyper::{
    Response, StatusCode,
    header::{self, HeaderValue},
};
use prometheus_client::metrics::{counter::Counter, family::Family};

use super::{Body, grpc_reply, local_reply, roll};
use crate::{
    proxy::{metrics::RouteLabels, snapshot::PolicyRuntime},
    state::policy::ServicePolicy,
};

/// Counters of what the local answers did, per route.
pub(super) struct Counts<'a> {
    pub(super) faults: &'a Family<RouteLabels, Counter>,
    pub(super) rate_limited: &'a Family<RouteLabels, Counter>,
    pub(super) route: &'a RouteLabels,
}

/// Applies the policy's delay (waits) and abort (answers); `Some` is the answer to send instead
/// of forwarding.
pub(super) async fn inject(
    settings: &ServicePolicy,
    counts: &Counts<'_>,
    grpc: bool,
) -> Option<Response<Body>> {
    if let Some(d) = &settings.delay
        && roll(d.percent)
    {
        counts.faults.get_or_create(counts.route).inc();
        tokio::time::sleep(d.fixed).await;
    }
    let a = settings.abort.as_ref().filter(|a| roll(a.percent))?;
    counts.faults.get_or_create(counts.route).inc();
    if grpc && let Some(code) = a.grpc_status {
        return Some(grpc_reply(code, "fault injected"));
    }
    let status = StatusCode::from_u16(a.http_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    Some(local_reply(status, grpc, "fault injected"))
}

/// 429 with `Retry-After` when the Service's token bucket is empty.
pub(super) fn rate_limit(
    policy: &PolicyRuntime,
    counts: &Counts<'_>,
    grpc: bool,
) -> Option<Response<Body>> {
    let wait = policy.bucket.as_ref()?.try_acquire().err()?;
    counts.rate_limited.get_or_create(counts.route).inc();
    let mut resp = local_reply(StatusCode::TOO_MANY_REQUESTS, grpc, "rate limited");
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    Some(resp)
}

/// The tries' answer, or 504 when `timeout` (the route's or the policy's) ends first.
pub(super) async fn within(
    timeout: Option<Duration>,
    grpc: bool,
    tries: impl Future<Output = Response<Body>>,
) -> Response<Body> {
    match timeout {
        Some(t) => tokio::time::timeout(t, tries)
            .await
            .unwrap_or_else(|_| local_reply(StatusCode::GATEWAY_TIMEOUT, grpc, "request timeout")),
        None => tries.await,
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;
    use crate::proxy::{http::empty, ratelimit::TokenBucket};

    fn route() -> RouteLabels {
        RouteLabels::client_to_web()
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_waits_exactly_and_an_abort_answers_with_its_status() {
        let (faults, limited, route) = (Family::default(), Family::default(), route());
        let counts = Counts {
            faults: &faults,
            rate_limited: &limited,
            route: &route,
        };
        let policy = ServicePolicy::from_yaml(
            "faults: {delay: {percent: 100, fixedDelay: 1500ms}, \
             abort: {percent: 100, httpStatus: 418, grpcStatus: 8}}",
        );
        let start = Instant::now();
        let resp = inject(&policy, &counts, false).await.expect("aborted");
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
        assert_eq!(resp.status(), StatusCode::IM_A_TEAPOT);
        let grpc = inject(&policy, &counts, true).await.expect("aborted");
        assert_eq!(grpc.headers()["grpc-status"], "8");
        assert_eq!(
            faults.get_or_create(&route).get(),
            4,
            "two delays, two aborts"
        );

        let none = ServicePolicy::from_yaml("faults: {abort: {percent: 0}}");
        assert!(inject(&none, &counts, false).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_bucket_answers_429_with_retry_after_and_refills_in_time() {
        let (faults, limited, route) = (Family::default(), Family::default(), route());
        let counts = Counts {
            faults: &faults,
            rate_limited: &limited,
            route: &route,
        };
        let policy = PolicyRuntime {
            settings: ServicePolicy::from_yaml("rateLimit: {requestsPerSecond: 0.5, burst: 2}"),
            budget: None,
            bucket: Some(TokenBucket::new(0.5, 2)),
        };
        assert!(rate_limit(&policy, &counts, false).is_none());
        assert!(rate_limit(&policy, &counts, false).is_none());
        let refused = rate_limit(&policy, &counts, false).expect("bucket empty");
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()[header::RETRY_AFTER], "2");
        assert_eq!(limited.get_or_create(&route).get(), 1);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            rate_limit(&policy, &counts, false).is_none(),
            "one token back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_answers_504_at_the_timeout_and_not_before() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Response::new(empty())
        };
        let start = Instant::now();
        let resp = within(Some(Duration::from_secs(2)), false, slow).await;
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        let fast = async { Response::new(empty()) };
        assert_eq!(
            within(Some(Duration::from_secs(2)), false, fast)
                .await
                .status(),
            200
        );
        let grpc = within(Some(Duration::ZERO), true, std::future::pending()).await;
        assert_eq!(grpc.headers()["grpc-status"], "4");
    }
}
