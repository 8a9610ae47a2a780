//! Golden metrics of the L7 engine, per source workload, destination service and route.
//! Registered under the `weft_` prefix next to the kernel metrics; base units (seconds).
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabels {
    pub source_namespace: String,
    pub source_workload: String,
    pub destination_namespace: String,
    pub destination_service: String,
    /// `namespace/name#rule` of the HTTPRoute/GRPCRoute rule, or `default`.
    pub route: String,
}

#[cfg(test)]
impl RouteLabels {
    /// `shop/client` to `shop/web`, default route: the engine's tests' one route.
    pub(crate) fn client_to_web() -> Self {
        Self {
            source_namespace: "shop".into(),
            source_workload: "client".into(),
            destination_namespace: "shop".into(),
            destination_service: "web".into(),
            route: "default".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub route: RouteLabels,
    /// `1xx`..`5xx` (for gRPC, `5xx` when `grpc-status` is not 0).
    pub status_class: &'static str,
    /// The HTTP status sent to the client (Istio's `response_code`).
    pub response_code: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_namespace: String,
    pub destination_service: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types, reason = "label values as users see them")]
pub enum ProtocolValue {
    http1,
    h2,
    tls,
    opaque,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: ProtocolValue,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `no_original_destination`, `bad_request`, `header_timeout`, `header_too_large`,
    /// `upstream_protocol`, ...
    pub kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AuthzLabels {
    pub destination_namespace: String,
    pub destination_service: String,
    /// The policy (and rule) that decided.
    pub policy: String,
    /// `enforced` (answered 403) or `dry_run` (allowed, reported).
    pub mode: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AuthnLabels {
    pub destination_namespace: String,
    pub destination_service: String,
    /// The `RequestAuthentication` whose rule refused the token (the service, when no rule
    /// knows its issuer).
    pub policy: String,
    /// `malformed`, `unknown_issuer`, `unknown_key`, `bad_signature`, `expired`, `audience`, ...
    pub reason: &'static str,
}

#[derive(Debug, Clone)]
pub struct L7Metrics {
    pub authz_denials: Family<AuthzLabels, Counter>,
    pub authn_failures: Family<AuthnLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RouteLabels, Histogram>,
    pub in_flight: Family<RouteLabels, Gauge>,
    pub retries: Family<RouteLabels, Counter>,
    pub safe_retries: Family<RouteLabels, Counter>,
    pub budget_exhausted: Family<RouteLabels, Counter>,
    pub rate_limited: Family<RouteLabels, Counter>,
    pub faults: Family<RouteLabels, Counter>,
    pub mirrored: Family<RouteLabels, Counter>,
    pub ejections: Family<ServiceLabels, Counter>,
    pub circuit_open: Family<ServiceLabels, Counter>,
    pub connections: Family<ProtocolLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
}

impl L7Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            authz_denials: Family::default(),
            authn_failures: Family::default(),
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                // 1 ms .. ~16 s
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.000_5, 2.0, 16,
                ))
            }),
            in_flight: Family::default(),
            retries: Family::default(),
            safe_retries: Family::default(),
            budget_exhausted: Family::default(),
            rate_limited: Family::default(),
            faults: Family::default(),
            mirrored: Family::default(),
            ejections: Family::default(),
            circuit_open: Family::default(),
            connections: Family::default(),
            errors: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("weft_l7");
        r.register(
            "requests",
            "Requests handled by the L7 engine",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from request to response headers",
            m.duration.clone(),
        );
        r.register(
            "requests_in_flight",
            "Requests in progress",
            m.in_flight.clone(),
        );
        r.register("retries", "Retries sent", m.retries.clone());
        r.register(
            "safe_retries",
            "Tries repeated whatever the route's retry policy: the connection could not be made (nothing was sent), or it broke before any answer to an idempotent request",
            m.safe_retries.clone(),
        );
        r.register(
            "retry_budget_exhausted",
            "Retries not sent because the retry budget was used up",
            m.budget_exhausted.clone(),
        );
        r.register(
            "rate_limited",
            "Requests answered 429 by the local rate limit",
            m.rate_limited.clone(),
        );
        r.register(
            "faults",
            "Injected faults (aborts and delays)",
            m.faults.clone(),
        );
        r.register(
            "mirrored",
            "Requests copied to a mirror backend",
            m.mirrored.clone(),
        );
        r.register(
            "ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        r.register(
            "circuit_open",
            "Requests refused by circuit-breaking limits",
            m.circuit_open.clone(),
        );
        r.register(
            "connections",
            "Connections accepted by the engine, by detected protocol",
            m.connections.clone(),
        );
        r.register(
            "authz_denials",
            "Requests refused by an authorization policy (or, dry run, that one would refuse)",
            m.authz_denials.clone(),
        );
        r.register(
            "authn_failures",
            "Requests refused (401) because their JWT failed validation",
            m.authn_failures.clone(),
        );
        r.register(
            "errors",
            "Connections or requests the engine could not serve",
            m.errors.clone(),
        );
        m
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&ErrorLabels { kind }).inc();
    }
}

#[must_use]
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
