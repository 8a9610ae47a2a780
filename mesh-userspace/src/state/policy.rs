//! A Service's accepted `TrafficPolicy`, compiled into what the engine applies: Weft's own types,
//! parsed once (retry conditions become flags, a ring hash carries its key, defaults are filled
//! in), so the engine never reads the wire format and never meets a value validation refused.
use std::time::Duration;

use super::ServiceRef;
use crate::api::traffic::{self as wire, TrafficPolicySpec};

/// What the engine does for requests to one Service port.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePolicy {
    /// `namespace/name` of the `TrafficPolicy`.
    pub name: String,
    /// Whole-request deadline, retries included.
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
    pub breaker: Option<Limits>,
    pub outlier: Option<Ejection>,
    pub delay: Option<Delay>,
    pub abort: Option<Abort>,
    pub rate_limit: Option<RateLimit>,
    pub balancing: Balancing,
    pub mirror: Option<MirrorTo>,
    pub access_log: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Tries including the first: at least 1.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    pub budget: BudgetRule,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A request body up to this size is kept for another try; a larger one makes the request
    /// single-try.
    pub max_body_bytes: u64,
}

/// Which failures a retry follows, resolved from the condition names: `5xx` covers gateway
/// errors, and both cover connect failures, resets and per-try timeouts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent answers, each read on its own failure kind"
)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub reset: bool,
    pub timeout: bool,
    /// Any response status of 500 and above.
    pub server_error: bool,
    /// 502, 503 and 504.
    pub gateway_error: bool,
    pub status_codes: Vec<u16>,
    pub grpc_status_codes: Vec<u32>,
}

/// The condition names `spec.retries.on` accepts.
pub const RETRY_CONDITIONS: &[&str] = &[
    "connect-failure",
    "reset",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
    "retriable-grpc",
];

impl RetryOn {
    /// The conditions of `r`, or the names that are not conditions.
    ///
    /// # Errors
    /// Every name not in [`RETRY_CONDITIONS`] (compared without case).
    pub fn parse(r: &wire::Retries) -> Result<Self, Vec<String>> {
        let unknown: Vec<String> =
            r.on.iter()
                .filter(|o| !RETRY_CONDITIONS.iter().any(|c| c.eq_ignore_ascii_case(o)))
                .cloned()
                .collect();
        if !unknown.is_empty() {
            return Err(unknown);
        }
        let on = |c: &str| r.on.iter().any(|o| o.eq_ignore_ascii_case(c));
        let (server_error, gateway_error) = (on("5xx"), on("gateway-error"));
        let any_5xx = server_error || gateway_error;
        Ok(Self {
            connect_failure: on("connect-failure") || any_5xx,
            reset: on("reset") || any_5xx,
            timeout: on("reset") || any_5xx,
            server_error,
            gateway_error,
            status_codes: r.status_codes.clone(),
            grpc_status_codes: r.grpc_status_codes.clone(),
        })
    }

    /// Whether a response with this HTTP status (and `grpc-status`, if any) is retried.
    #[must_use]
    pub fn response(&self, status: u16, grpc_status: Option<u32>) -> bool {
        (status >= 500 && self.server_error)
            || (matches!(status, 502..=504) && self.gateway_error)
            || self.status_codes.contains(&status)
            || grpc_status.is_some_and(|g| self.grpc_status_codes.contains(&g))
    }
}

/// Retries allowed = `min_per_second` × window + `ratio` × the requests in the window.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetRule {
    pub ratio: f64,
    pub min_per_second: u32,
    pub window: Duration,
}

/// Caps for one backend service (the `TrafficPolicy` field `circuitBreaker`); `None` is no cap
/// (the policy spells it 4294967295, its default), `Some(0)` admits nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// HTTP/1.1 upstream connections in use.
    pub connections: Option<u32>,
    /// Requests waiting for a connection.
    pub pending_requests: Option<u32>,
    /// Requests in flight, retries included.
    pub requests: Option<u32>,
}

impl From<wire::Limits> for Limits {
    fn from(l: wire::Limits) -> Self {
        let cap = |v: u32| (v != u32::MAX).then_some(v);
        Self {
            connections: cap(l.max_connections),
            pending_requests: cap(l.max_pending_requests),
            requests: cap(l.max_requests),
        }
    }
}

/// Outlier detection: when an endpoint is ejected, and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejection {
    /// 0 turns the detector off.
    pub consecutive_5xx: u32,
    /// 0 turns the detector off.
    pub consecutive_gateway_errors: u32,
    pub base: Duration,
    pub max: Duration,
    pub max_percent: u32,
}

impl Default for Ejection {
    fn default() -> Self {
        Self::from(&wire::OutlierConfig::default())
    }
}

impl From<&wire::OutlierConfig> for Ejection {
    fn from(o: &wire::OutlierConfig) -> Self {
        Self {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway_errors: o.consecutive_gateway_errors,
            base: o.base_ejection,
            max: o.max_ejection,
            max_percent: o.max_ejection_percent,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delay {
    pub percent: f64,
    pub fixed: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Abort {
    pub percent: f64,
    /// The HTTP status answered (503 unless the policy names one).
    pub http_status: u16,
    /// For gRPC requests, this `grpc-status` instead (HTTP 200, trailers only).
    pub grpc_status: Option<u32>,
}

/// A token bucket for the whole Service (per agent).
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub requests_per_second: f64,
    /// One second's worth unless the policy says otherwise.
    pub burst: u32,
}

/// How the engine picks an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency (Finagle, linkerd).
    #[default]
    P2cPeakEwma,
    RoundRobin,
    /// Power of two choices over in-flight requests (Envoy).
    LeastRequest,
    /// Consistent hashing of [`Balancing::hash`] (session affinity).
    RingHash,
    Random,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Balancing {
    pub algorithm: Algorithm,
    /// What a ring hash hashes; validation makes sure `RingHash` has one.
    pub hash: Option<HashKey>,
}

/// The request value a ring hash hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(String),
    Cookie(String),
}

/// Copies of requests go to this Service port; its answers are dropped.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorTo {
    pub service: ServiceRef,
    pub port: u16,
    pub percent: f64,
}

impl ServicePolicy {
    /// The policy `namespace/name` with `spec`, which validation accepted.
    #[must_use]
    pub fn compile(namespace: &str, name: &str, spec: &TrafficPolicySpec) -> Self {
        let faults = spec.faults.clone().unwrap_or_default();
        Self {
            name: format!("{namespace}/{name}"),
            timeout: spec.timeout,
            retries: spec.retries.as_ref().map(|r| RetryPolicy {
                attempts: r.attempts.max(1),
                per_try_timeout: r.per_try_timeout,
                // Validation refuses unknown names, so an accepted policy always parses.
                on: RetryOn::parse(r).unwrap_or_default(),
                budget: BudgetRule {
                    ratio: r.budget.percent / 100.0,
                    min_per_second: r.budget.min_per_second,
                    window: r.budget.window,
                },
                backoff_base: r.backoff.base,
                backoff_max: r.backoff.max,
                max_body_bytes: r.max_body_bytes,
            }),
            breaker: spec.circuit_breaker.map(Limits::from),
            outlier: spec.outlier_detection.as_ref().map(Ejection::from),
            delay: faults.delay.as_ref().map(|d| Delay {
                percent: d.percent,
                fixed: d.fixed_delay,
            }),
            abort: faults.abort.as_ref().map(|a| Abort {
                percent: a.percent,
                http_status: a.http_status.unwrap_or(503),
                grpc_status: a.grpc_status,
            }),
            rate_limit: spec.rate_limit.as_ref().map(|rl| RateLimit {
                requests_per_second: rl.requests_per_second,
                burst: rl.burst.unwrap_or_else(|| {
                    #[allow(clippy::cast_sign_loss, reason = "clamped to 1..=u32::MAX first")]
                    let burst = rl
                        .requests_per_second
                        .ceil()
                        .clamp(1.0, f64::from(u32::MAX)) as u32;
                    burst
                }),
            }),
            balancing: spec
                .load_balancer
                .as_ref()
                .map(balancing)
                .unwrap_or_default(),
            mirror: spec.mirror.as_ref().map(|m| MirrorTo {
                service: ServiceRef {
                    namespace: namespace.to_owned(),
                    name: m.name.clone(),
                },
                port: m.port,
                percent: m.percent,
            }),
            access_log: spec.access_log,
        }
    }
}

#[cfg(test)]
impl ServicePolicy {
    /// The policy `shop/test` with the spec in `yaml`, for tests of the engine.
    pub(crate) fn from_yaml(yaml: &str) -> Self {
        let spec: TrafficPolicySpec = serde_saphyr::from_str(yaml).unwrap();
        Self::compile("shop", "test", &spec)
    }
}

fn balancing(lb: &wire::LoadBalancer) -> Balancing {
    let algorithm = match lb.algorithm {
        wire::Algorithm::P2cPeakEwma => Algorithm::P2cPeakEwma,
        wire::Algorithm::RoundRobin => Algorithm::RoundRobin,
        wire::Algorithm::LeastRequest => Algorithm::LeastRequest,
        wire::Algorithm::RingHash => Algorithm::RingHash,
        wire::Algorithm::Random => Algorithm::Random,
    };
    let hash = lb.hash.as_ref().and_then(|h| {
        h.header
            .clone()
            .map(HashKey::Header)
            .or_else(|| h.cookie.clone().map(HashKey::Cookie))
    });
    Balancing { algorithm, hash }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retries(yaml: &str) -> wire::Retries {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn retry_conditions_resolve_once_and_unknown_names_are_listed() {
        let r = RetryOn::parse(&retries("on: [gateway-error]")).unwrap();
        assert!(r.connect_failure && r.reset && r.timeout && r.gateway_error);
        assert!(!r.server_error);
        assert!(r.response(503, None) && !r.response(500, None));
        let r = RetryOn::parse(&retries("on: [Connect-Failure]")).unwrap();
        assert!(r.connect_failure && !r.reset && !r.timeout);
        assert!(!r.response(503, None));
        let r = RetryOn::parse(&retries(
            "{on: [retriable-status-codes], statusCodes: [409], grpcStatusCodes: [14]}",
        ))
        .unwrap();
        assert!(r.response(409, None) && r.response(200, Some(14)) && !r.response(200, Some(2)));
        assert_eq!(
            RetryOn::parse(&retries("on: [5xx, 5XX, timeout, retry-on-anything]")),
            Err(vec!["timeout".to_owned(), "retry-on-anything".to_owned()])
        );
    }

    #[test]
    fn defaults_are_filled_in_and_a_ring_hash_carries_its_key() {
        let spec: TrafficPolicySpec = serde_saphyr::from_str(
            "{targetRef: {kind: Service, name: web}, rateLimit: {requestsPerSecond: 2.5}, \
             faults: {abort: {percent: 10}}, mirror: {name: shadow, port: 80}, \
             loadBalancer: {algorithm: RingHash, hash: {cookie: session}}}",
        )
        .unwrap();
        let p = ServicePolicy::compile("shop", "web", &spec);
        assert_eq!(p.name, "shop/web");
        assert_eq!(p.rate_limit.unwrap().burst, 3);
        assert_eq!(p.abort.unwrap().http_status, 503);
        let m = p.mirror.unwrap();
        assert_eq!(
            (m.service.to_string(), m.port, m.percent),
            ("shop/shadow".to_owned(), 80, 100.0)
        );
        assert_eq!(
            p.balancing,
            Balancing {
                algorithm: Algorithm::RingHash,
                hash: Some(HashKey::Cookie("session".to_owned()))
            }
        );
        assert!(p.retries.is_none() && p.breaker.is_none() && p.outlier.is_none());
    }

    #[test]
    fn circuit_breaker_limits_fill_defaults_and_unknown_fields_are_refused() {
        let spec = |yaml: &str| {
            serde_saphyr::from_str::<TrafficPolicySpec>(&format!(
                "{{targetRef: {{kind: Service, name: web}}, circuitBreaker: {yaml}}}"
            ))
        };
        let p = ServicePolicy::compile("shop", "web", &spec("{maxRequests: 5}").unwrap());
        let l = p.breaker.unwrap();
        assert_eq!((l.requests, l.connections), (Some(5), None));
        assert!(spec("{maxRetries: 5}").is_err());
    }
}
