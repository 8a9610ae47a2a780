//! Weft's traffic policy kind (`weft.dev/v1alpha1` `TrafficPolicy`): timeouts, retries and their
//! budget, circuit breaking, outlier detection, faults, rate limits, load balancing, mirroring and
//! access logging for one Service. Attaching any of it makes the Service an L7 service: its
//! meshed clients are redirected to the engine. Shared by the object parser (`control`) and the
//! engine (`proxy`), which is why it is its own module.
use std::time::Duration;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::objects::ObjectStatus;

/// Gateway API's duration syntax (GEP-2257), checked by the API server too.
pub const DURATION_PATTERN: &str = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// The Service a policy applies to (in the policy's namespace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    /// The core group: empty (a 1.20 API server rejects an empty-string schema default, so
    /// none is declared).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    pub kind: String,
    pub name: String,
    /// Only this service port; absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

impl TargetRef {
    /// A core-group Service (the only kind a policy can target).
    #[must_use]
    pub fn is_service(&self) -> bool {
        super::is_core_service(Some(&self.group), Some(&self.kind))
    }
}

/// Order among policies that target the same Service port: oldest first, then by name.
#[must_use]
pub fn precedence(p: &TrafficPolicy) -> (Option<k8s_openapi::jiff::Timestamp>, String) {
    (
        p.metadata.creation_timestamp.as_ref().map(|t| t.0),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    status = "ObjectStatus",
    derive = "PartialEq",
    shortname = "wtp",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    doc = "Timeouts, retries, circuit breaking, outlier detection, faults, rate limits, load balancing and mirroring for one Service."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    pub target_ref: Option<TargetRef>,
    /// Whole-request deadline, retries included (e.g. "2s").
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", regex(pattern = DURATION_PATTERN))]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<Faults>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// One structured event per request (target `weft::access`).
    #[serde(default)]
    pub access_log: bool,
    /// What meshed clients get while their node's L7 engine is down (agent restart or
    /// upgrade). Default: `Closed` when an `AuthorizationPolicy` or `RequestAuthentication` targets
    /// the service, otherwise `Open`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
}

/// A service's behaviour while the L7 engine of the client's node is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FailureMode {
    /// Connections go straight to a backend the kernel picks: traffic keeps flowing, L7
    /// routing and policy are skipped.
    Open,
    /// Connections are refused (`connect()` fails with EPERM) until the engine is back.
    Closed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    /// Total tries including the first (like Linkerd's and Istio's "attempts" + 1 semantics
    /// are confusing: here 3 means one try and up to two retries).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>", regex(pattern = DURATION_PATTERN))]
    pub per_try_timeout: Option<Duration>,
    /// Conditions: `connect-failure`, `reset`, `5xx`, `gateway-error` (502/503/504),
    /// `retriable-status-codes` (see `statusCodes`), `retriable-grpc` (see `grpcStatusCodes`).
    #[serde(default = "default_retry_on")]
    pub on: Vec<String>,
    #[serde(default)]
    pub status_codes: Vec<u16>,
    /// gRPC status codes (numbers, e.g. 14 for UNAVAILABLE) in `grpc-status`.
    #[serde(default)]
    pub grpc_status_codes: Vec<u32>,
    #[serde(default)]
    pub budget: Budget,
    #[serde(default)]
    pub backoff: Backoff,
    /// Request bodies up to this size are kept so they can be sent again; a larger body makes
    /// the request non-retriable (it streams through).
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
}

const fn default_attempts() -> u32 {
    3
}
fn default_retry_on() -> Vec<String> {
    vec![
        "connect-failure".into(),
        "reset".into(),
        "gateway-error".into(),
    ]
}
const fn default_max_body() -> u64 {
    64 * 1024
}

/// Retries allowed = `minPerSecond` × window + `percent`% of the requests in the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Budget {
    #[serde(default = "default_budget_percent")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    #[serde(default = "default_min_per_second")]
    pub min_per_second: u32,
    #[serde(default = "default_budget_window", with = "duration")]
    #[schemars(with = "String", regex(pattern = DURATION_PATTERN))]
    pub window: Duration,
}
impl Default for Budget {
    fn default() -> Self {
        Self {
            percent: default_budget_percent(),
            min_per_second: default_min_per_second(),
            window: default_budget_window(),
        }
    }
}
const fn default_budget_percent() -> f64 {
    20.0
}
const fn default_min_per_second() -> u32 {
    10
}
const fn default_budget_window() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    #[serde(default = "default_backoff_base", with = "duration")]
    #[schemars(with = "String", regex(pattern = DURATION_PATTERN))]
    pub base: Duration,
    #[serde(default = "default_backoff_max", with = "duration")]
    #[schemars(with = "String", regex(pattern = DURATION_PATTERN))]
    pub max: Duration,
}
impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: default_backoff_base(),
            max: default_backoff_max(),
        }
    }
}
const fn default_backoff_base() -> Duration {
    Duration::from_millis(25)
}
const fn default_backoff_max() -> Duration {
    Duration::from_millis(250)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Faults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Abort {
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    /// HTTP status to answer with (default 503)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 200, max = 599))]
    pub http_status: Option<u16>,
    /// ...or, for gRPC requests, this `grpc-status` (HTTP 200 with trailers-only response).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16))]
    pub grpc_status: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delay {
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    #[serde(with = "duration")]
    #[schemars(with = "String", regex(pattern = DURATION_PATTERN))]
    pub fixed_delay: Duration,
}

/// Local token bucket for the whole destination service (per agent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    #[serde(default)]
    pub algorithm: Algorithm,
    /// For `RingHash`: what to hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<HashOn>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HashOn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

/// Copies of requests go to another Service; its answers are dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub name: String,
    pub port: u16,
    #[serde(default = "hundred")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
}
const fn hundred() -> f64 {
    100.0
}

/// How the engine picks an endpoint of a backend service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
pub enum Algorithm {
    /// Power of two choices over peak-EWMA latency (Finagle, linkerd).
    #[default]
    #[serde(rename = "P2CPeakEWMA")]
    P2cPeakEwma,
    RoundRobin,
    /// Power of two choices over in-flight requests (Envoy); a full scan for up to 8 endpoints.
    LeastRequest,
    /// Consistent hashing of a key from the request (`hashOn`) for session affinity.
    RingHash,
    Random,
}

/// Caps for one backend service. Every cap defaults to 4294967295 (in effect unlimited), as
/// Istio does: Envoy's own default of 1024 surprises busy services that never asked for a
/// limit. 0 means what it says: nothing is admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Limits {
    /// HTTP/1.1 upstream connections in use (each carries one request at a time). A request
    /// that finds them all busy waits, as a pending request.
    pub max_connections: u32,
    /// Requests waiting for a connection; one more is refused with 503.
    pub max_pending_requests: u32,
    /// Requests in flight, retries included.
    pub max_requests: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: u32::MAX,
            max_pending_requests: u32::MAX,
            max_requests: u32::MAX,
        }
    }
}

/// Istio's defaults, except where noted. A threshold of 0 disables that detector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive 5xx responses (gateway errors included) that eject: 5.
    pub consecutive_5xx: u32,
    /// Consecutive gateway errors (connect failure, reset, 502/503/504) that eject: 0 (off).
    pub consecutive_gateway_errors: u32,
    /// The first ejection lasts this long, the n-th n times as long: 30s.
    #[serde(with = "duration", rename = "baseEjectionTime")]
    #[schemars(with = "String", regex(pattern = DURATION_PATTERN))]
    pub base_ejection: Duration,
    /// Cap on one ejection (Envoy's `max_ejection_time`): 300s.
    #[serde(with = "duration", rename = "maxEjectionTime")]
    #[schemars(with = "String", regex(pattern = DURATION_PATTERN))]
    pub max_ejection: Duration,
    /// At most `max(1, floor(endpoints × percent / 100))` endpoints are ejected at once; 0 never
    /// ejects: 10. The "at least one" follows Envoy, so small services still shed a bad endpoint.
    #[schemars(range(max = 100))]
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 0,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_mins(5),
            max_ejection_percent: 10,
        }
    }
}

/// Durations as Gateway API writes them (GEP-2257: `1h`, `30s`, `250ms`, `1m30s`): the same
/// parser as the route timeouts, so one spelling is valid everywhere.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    super::parse_duration(text.trim())
        .map_err(|e| format!("{text:?} is not a duration like 250ms, 2s, 1m30s: {e}"))
}

#[must_use]
pub fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

pub mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    #[allow(clippy::ref_option, reason = "serde's `with` passes a reference")]
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format_duration(*d)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|t| super::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_hours(2)));
        for bad in ["", "5", "s", "1x", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn full_policy_parses_and_unknown_fields_are_errors() {
        let text = r"
metadata: {name: web, namespace: default}
spec:
  targetRef: {kind: Service, name: web}
  timeout: 2s
  retries: {attempts: 3, perTryTimeout: 500ms, on: [5xx, reset], budget: {percent: 20, minPerSecond: 5}}
  faults: {abort: {percent: 10, httpStatus: 503}, delay: {percent: 5, fixedDelay: 100ms}}
  rateLimit: {requestsPerSecond: 100, burst: 20}
  mirror: {name: shadow, port: 80}
  accessLog: true
";
        let p: TrafficPolicy = serde_saphyr::from_str(text).unwrap();
        assert_eq!(p.spec.timeout, Some(Duration::from_secs(2)));
        let r = p.spec.retries.unwrap();
        assert_eq!(r.per_try_timeout, Some(Duration::from_millis(500)));
        assert_eq!(r.budget.min_per_second, 5);
        assert!(
            serde_saphyr::from_str::<TrafficPolicy>("metadata: {}\nspec: {retrys: {}}").is_err()
        );
    }

    #[test]
    fn algorithm_names() {
        let names = [
            (Algorithm::P2cPeakEwma, "P2CPeakEWMA"),
            (Algorithm::RoundRobin, "RoundRobin"),
            (Algorithm::LeastRequest, "LeastRequest"),
            (Algorithm::RingHash, "RingHash"),
            (Algorithm::Random, "Random"),
        ];
        for (algorithm, name) in names {
            let json = format!("{name:?}");
            assert_eq!(serde_json::to_string(&algorithm).unwrap(), json);
            assert_eq!(serde_json::from_str::<Algorithm>(&json).unwrap(), algorithm);
        }
        assert_eq!(Algorithm::default(), Algorithm::P2cPeakEwma);
    }

    #[test]
    fn outlier_config_fills_defaults_and_round_trips() {
        let c: OutlierConfig =
            serde_saphyr::from_str("consecutive5xx: 3\nbaseEjectionTime: 10s").unwrap();
        assert_eq!(c.consecutive_5xx, 3);
        assert_eq!(c.base_ejection, Duration::from_secs(10));
        assert_eq!(c.max_ejection_percent, 10);
        assert!(serde_saphyr::from_str::<OutlierConfig>("interval: 10s").is_err());
        let back: OutlierConfig =
            serde_saphyr::from_str(&serde_saphyr::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
