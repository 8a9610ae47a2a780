//! What Weft says about each of its objects and routes: the checks the API server's schema
//! cannot make (references, conflicts, cross-field rules). The one place validation lives: the
//! controller writes these verdicts as Gateway API style conditions, the agent applies only
//! accepted objects and reports the same verdicts (log, `/status`), and `weft check` prints them
//! for files, offline.
use std::sync::Arc;
use std::{collections::BTreeMap, fmt::Write as _};

use k8s_openapi::api::core::v1::Service;
use serde::Serialize;

use crate::api::{
    ObjectSet, is_core_service,
    objects::{AuthorizationPolicy, MeshConfig, RequestAuthentication, SELECTOR_OPERATORS},
    refs::{AsRefParts, RefParts},
    traffic::{TrafficPolicy, precedence},
};

/// The outcome for one object; the controller turns it into `Accepted`, `ResolvedRefs` and
/// `Programmed` conditions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// `None`: accepted; else (reason, message) of the refusal.
    pub rejected: Option<(&'static str, String)>,
    /// `None`: every reference resolves; else (reason, message).
    pub unresolved: Option<(&'static str, String)>,
}

impl Verdict {
    const OK: Self = Self {
        rejected: None,
        unresolved: None,
    };

    fn rejected(reason: &'static str, message: String) -> Self {
        Self {
            rejected: Some((reason, message)),
            unresolved: None,
        }
    }

    /// In effect: accepted with every reference resolved.
    #[must_use]
    pub fn effective(&self) -> bool {
        self.rejected.is_none() && self.unresolved.is_none()
    }

    /// Where this verdict leaves its object.
    #[must_use]
    pub const fn state(&self) -> State {
        match (&self.rejected, &self.unresolved) {
            (Some(_), _) => State::NotAccepted,
            (None, Some(_)) => State::Unresolved,
            (None, None) => State::Programmed,
        }
    }

    /// The (reason, message) that keeps the object from being programmed.
    #[must_use]
    pub fn problem(&self) -> Option<&(&'static str, String)> {
        self.rejected.as_ref().or(self.unresolved.as_ref())
    }
}

/// An object's state after its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Accepted, every reference resolved: in effect.
    Programmed,
    /// Accepted, but a reference does not resolve.
    Unresolved,
    NotAccepted,
}

impl State {
    /// As `weft explain` and the page name it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Programmed => "Programmed",
            Self::Unresolved => "Unresolved",
            Self::NotAccepted => "NotAccepted",
        }
    }

    /// As a metric label.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Programmed => "programmed",
            Self::Unresolved => "unresolved",
            Self::NotAccepted => "not_accepted",
        }
    }
}

/// What Weft says about one object (for a route: about it at one Service parent). The same
/// verdict, with the same reason and message, wherever it is asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: &'static str,
    /// Absent for cluster-scoped kinds (`MeshConfig`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// For a route: the Service parent (`namespace/name`, `:port` when the parentRef has one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub verdict: Verdict,
}

impl Finding {
    fn new(
        kind: &'static str,
        meta: &kube::api::ObjectMeta,
        namespaced: bool,
        verdict: Verdict,
    ) -> Self {
        Self {
            kind,
            namespace: namespaced
                .then(|| meta.namespace.clone().unwrap_or_else(|| "default".into())),
            name: meta.name.clone().unwrap_or_default(),
            parent: None,
            verdict,
        }
    }

    /// `Kind namespace/name`, as users write it in `kubectl get`.
    #[must_use]
    pub fn object(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.object())?;
        if let Some(p) = &self.parent {
            write!(f, " (parent Service {p})")?;
        }
        match (&self.verdict.rejected, &self.verdict.unresolved) {
            (Some((reason, message)), _) => write!(f, ": not accepted, {reason}: {message}"),
            (None, Some((reason, message))) => {
                write!(
                    f,
                    ": accepted, a reference does not resolve, {reason}: {message}"
                )
            }
            (None, None) => write!(f, ": accepted"),
        }
    }
}

/// Every verdict about the Weft objects and routes of `set`, in a stable order: by kind, and
/// within a kind one per object (per Service parent for routes) in the order of `set`.
#[must_use]
pub fn findings(set: &ObjectSet) -> Vec<Finding> {
    let services = services(&set.services);
    let mut out = Vec::new();
    for c in &set.mesh_configs {
        out.push(Finding::new(
            "MeshConfig",
            &c.metadata,
            false,
            mesh_config(c),
        ));
    }
    for p in &set.traffic_policies {
        let verdict = traffic_policy(p, &set.traffic_policies, &services);
        out.push(Finding::new("TrafficPolicy", &p.metadata, true, verdict));
    }
    for p in &set.authorization_policies {
        let verdict = authorization_policy(p, &services);
        out.push(Finding::new(
            "AuthorizationPolicy",
            &p.metadata,
            true,
            verdict,
        ));
    }
    for p in &set.request_authentications {
        let verdict = request_authentication(p, &services);
        out.push(Finding::new(
            "RequestAuthentication",
            &p.metadata,
            true,
            verdict,
        ));
    }
    let route =
        |kind, meta: &kube::api::ObjectMeta, parents: Vec<RouteParent>, out: &mut Vec<_>| {
            for p in parents {
                let mut f = Finding::new(kind, meta, true, p.verdict);
                let r = &p.parent_ref;
                let ns = r["namespace"]
                    .as_str()
                    .map_or_else(|| f.namespace.clone().unwrap_or_default(), str::to_owned);
                let mut at = format!("{ns}/{}", r["name"].as_str().unwrap_or_default());
                if let Some(port) = r["port"].as_i64() {
                    let _ = write!(at, ":{port}");
                }
                f.parent = Some(at);
                out.push(f);
            }
        };
    for r in &set.http_routes {
        route("HTTPRoute", &r.metadata, http_route(r, &services), &mut out);
    }
    for r in &set.grpc_routes {
        route("GRPCRoute", &r.metadata, grpc_route(r, &services), &mut out);
    }
    out
}

/// The `TrafficPolicy` objects of `set` that `findings` (of the same `set`) accepts.
#[must_use]
pub fn accepted_traffic_policies<'a>(
    set: &'a ObjectSet,
    findings: &[Finding],
) -> Vec<&'a TrafficPolicy> {
    let verdicts = findings.iter().filter(|f| f.kind == "TrafficPolicy");
    set.traffic_policies
        .iter()
        .zip(verdicts)
        .filter(|(_, f)| f.verdict.rejected.is_none())
        .map(|(p, _)| &**p)
        .collect()
}

/// `namespace/name` → Service.
pub type Services<'a> = BTreeMap<(String, String), &'a Service>;

#[must_use]
pub fn services(list: &[Arc<Service>]) -> Services<'_> {
    list.iter()
        .map(|s| {
            (
                (
                    s.metadata.namespace.clone().unwrap_or_default(),
                    s.metadata.name.clone().unwrap_or_default(),
                ),
                &**s,
            )
        })
        .collect()
}

/// Why `ns/name` (with `port`, when given) is not a Service, or `None` when it is one.
fn missing_service(services: &Services, ns: &str, name: &str, port: Option<i64>) -> Option<String> {
    let Some(svc) = services.get(&(ns.to_owned(), name.to_owned())) else {
        return Some(format!("Service {ns}/{name} does not exist"));
    };
    let spec = svc.spec.as_ref();
    // An absent clusterIP is allocated by the API server; `None` is a headless Service.
    let headless = spec.is_some_and(|s| {
        s.cluster_ip.as_deref() == Some("None") || s.type_.as_deref() == Some("ExternalName")
    });
    if headless {
        return Some(format!(
            "Service {ns}/{name} has no cluster IP (headless or ExternalName): the mesh routes and \
             applies policy at a Service's cluster IP, so nothing reaches it this way"
        ));
    }
    let ports: Vec<i32> = spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| p.port)
        .collect();
    port.filter(|&p| !ports.iter().any(|&have| i64::from(have) == p))
        .map(|p| format!("Service {ns}/{name} has no port {p} (it has {ports:?})"))
}

/// Checks one policy against the Services and the other policies.
#[must_use]
pub fn traffic_policy(
    p: &TrafficPolicy,
    all: &[Arc<TrafficPolicy>],
    services: &Services,
) -> Verdict {
    let ns = p.metadata.namespace.clone().unwrap_or_default();
    let Some(target) = &p.spec.target_ref else {
        return Verdict::rejected(
            "Invalid",
            "spec.targetRef is required: name a Service".into(),
        );
    };
    if !target.is_service() {
        return Verdict::rejected(
            "Invalid",
            format!(
                "spec.targetRef must be a core Service (group \"\", kind Service), not {}/{}",
                target.group, target.kind
            ),
        );
    }
    let invalid = spec_problems(&p.spec);
    if !invalid.is_empty() {
        return Verdict::rejected("Invalid", invalid.join("; "));
    }
    // Conflicts: another policy on the same Service (and port, or either without one) that
    // takes precedence.
    let overlaps = |other: &TrafficPolicy| {
        other.metadata.namespace.as_deref().unwrap_or_default() == ns
            && other.spec.target_ref.as_ref().is_some_and(|t| {
                t.is_service()
                    && t.name == target.name
                    && (t.port.is_none() || target.port.is_none() || t.port == target.port)
            })
    };
    if let Some(winner) = all
        .iter()
        .filter(|o| overlaps(o) && precedence(o) < precedence(p))
        .min_by_key(|o| precedence(o))
    {
        return Verdict::rejected(
            "Conflicted",
            format!(
                "TrafficPolicy {ns}/{} targets the same Service port and is older; only it applies \
                 (merge the two, or target different ports)",
                winner.metadata.name.as_deref().unwrap_or_default()
            ),
        );
    }
    references(&ns, target, p.spec.mirror.as_ref(), services)
}

/// The policy's target Service (and port) and its mirror Service must exist.
fn references(
    ns: &str,
    target: &crate::api::traffic::TargetRef,
    mirror: Option<&crate::api::traffic::Mirror>,
    services: &Services,
) -> Verdict {
    let target = missing_service(services, ns, &target.name, target.port.map(i64::from));
    let mirror = mirror.and_then(|m| {
        missing_service(services, ns, &m.name, Some(i64::from(m.port)))
            .map(|e| format!("mirror {e}"))
    });
    Verdict {
        rejected: None,
        unresolved: target
            .or(mirror)
            .map(|message| ("BackendNotFound", message)),
    }
}

/// Cross-field rules the schema cannot express.
fn spec_problems(s: &crate::api::traffic::TrafficPolicySpec) -> Vec<String> {
    let mut invalid = Vec::new();
    if let Some(r) = &s.retries {
        if r.attempts == 0 {
            invalid.push("spec.retries.attempts must be at least 1 (the first try)".to_owned());
        }
        if let Err(unknown) = super::policy::RetryOn::parse(r) {
            invalid.push(format!(
                "spec.retries.on: {} not a retry condition (known: {})",
                unknown.join(", "),
                super::policy::RETRY_CONDITIONS.join(", ")
            ));
        }
        if r.backoff.base > r.backoff.max {
            invalid.push("spec.retries.backoff.base is larger than backoff.max".to_owned());
        }
        if let (Some(per_try), Some(total)) = (r.per_try_timeout, s.timeout)
            && per_try > total
        {
            invalid.push("spec.retries.perTryTimeout is longer than spec.timeout".to_owned());
        }
    }
    if let Some(rl) = &s.rate_limit
        && !(rl.requests_per_second.is_finite() && rl.requests_per_second > 0.0)
    {
        invalid.push("spec.rateLimit.requestsPerSecond must be a positive number".to_owned());
    }
    if let Some(lb) = &s.load_balancer
        && lb.algorithm == crate::api::traffic::Algorithm::RingHash
        && lb
            .hash
            .as_ref()
            .is_none_or(|h| h.header.is_none() && h.cookie.is_none())
    {
        invalid.push(
            "spec.loadBalancer.algorithm RingHash needs hash.header or hash.cookie".to_owned(),
        );
    }
    if let Some(o) = &s.outlier_detection
        && o.base_ejection > o.max_ejection
    {
        invalid.push(
            "spec.outlierDetection.baseEjectionTime is longer than maxEjectionTime".to_owned(),
        );
    }
    invalid
}

/// One Service parent of an `HTTPRoute` and what Weft says about the route there (GAMMA: the
/// mesh reports on the Service parents it implements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteParent {
    /// The parentRef as written (`kind`, `name`, and `namespace`/`port` when set).
    pub parent_ref: serde_json::Value,
    pub verdict: Verdict,
}

/// [`route_parents`] of a route of either kind.
macro_rules! route_parents_of {
    ($route:expr, $services:expr) => {{
        let parents = $route
            .spec
            .parent_refs
            .iter()
            .flatten()
            .map(AsRefParts::ref_parts);
        let backends = $route
            .spec
            .rules
            .iter()
            .flatten()
            .flat_map(|r| r.backend_refs.iter().flatten())
            .map(AsRefParts::ref_parts);
        route_parents(
            $route.metadata.namespace.as_deref(),
            parents,
            backends,
            $services,
        )
    }};
}

/// The route's Service parents: `Accepted` when the Service (and port) exists, `ResolvedRefs`
/// when every Service backendRef exists in the route's namespace (cross-namespace backends
/// would need a `ReferenceGrant`, which Weft does not read: `RefNotPermitted`).
#[must_use]
pub fn http_route(
    route: &gateway_api::httproutes::HttpRoute,
    services: &Services,
) -> Vec<RouteParent> {
    route_parents_of!(route, services)
}

/// [`http_route`] for a `GRPCRoute`.
#[must_use]
pub fn grpc_route(
    route: &gateway_api::grpcroutes::GrpcRoute,
    services: &Services,
) -> Vec<RouteParent> {
    route_parents_of!(route, services)
}

fn route_parents<'a>(
    ns: Option<&str>,
    parent_refs: impl Iterator<Item = RefParts<'a>>,
    backend_refs: impl Iterator<Item = RefParts<'a>>,
    services: &Services,
) -> Vec<RouteParent> {
    let ns = ns.unwrap_or_default().to_owned();
    let mut unresolved = None;
    for RefParts {
        group,
        kind,
        name,
        namespace,
        ..
    } in backend_refs
    {
        if !is_core_service(group, kind.or(Some("Service"))) {
            unresolved = Some((
                "InvalidKind",
                format!("backendRef {name}: only Services are supported"),
            ));
            break;
        }
        if namespace.is_some_and(|n| n != ns) {
            unresolved = Some((
                "RefNotPermitted",
                format!(
                    "backendRef {}/{name}: another namespace needs a ReferenceGrant, which Weft does not support",
                    namespace.unwrap_or_default(),
                ),
            ));
            break;
        }
        if let Some(message) = missing_service(services, &ns, name, None) {
            unresolved = Some(("BackendNotFound", format!("backendRef: {message}")));
            break;
        }
    }
    let mut parents = Vec::new();
    for RefParts {
        group,
        kind,
        name,
        namespace,
        port,
    } in parent_refs
    {
        if !is_core_service(group, kind) {
            continue; // a Gateway's parent: another controller's to report on
        }
        let parent_ns = namespace.map_or_else(|| ns.clone(), str::to_owned);
        let mut parent_ref = serde_json::json!({"kind": "Service", "name": name});
        if let Some(n) = namespace {
            parent_ref["namespace"] = n.into();
        }
        if let Some(port) = port {
            parent_ref["port"] = port.into();
        }
        let rejected = missing_service(services, &parent_ns, name, port.map(i64::from))
            .map(|message| ("NoMatchingParent", message));
        parents.push(RouteParent {
            parent_ref,
            verdict: Verdict {
                rejected,
                unresolved: unresolved.clone(),
            },
        });
    }
    parents
}

#[must_use]
pub fn authorization_policy(p: &AuthorizationPolicy, services: &Services) -> Verdict {
    let mut invalid = Vec::new();
    if let Some(t) = &p.spec.target_ref {
        if p.spec.selector.is_some() {
            invalid.push(
                "spec.selector and spec.targetRef: use one (a selector is enforced at connect(), \
                 a targetRef per request by the L7 engine)"
                    .to_owned(),
            );
        }
        invalid.extend(target_kind_problem(t));
    }
    let mut selectors = Vec::new();
    selectors.extend(
        p.spec
            .selector
            .as_ref()
            .map(|s| ("spec.selector".to_owned(), s)),
    );
    for (i, rule) in p.spec.rules.iter().enumerate() {
        for (j, from) in rule.from.iter().enumerate() {
            let at = format!("spec.rules[{i}].from[{j}].source");
            if let Some(s) = &from.source.pod_selector {
                selectors.push((format!("{at}.podSelector"), s));
            }
            for sa in &from.source.service_accounts {
                let parts: Vec<&str> = sa.split('/').collect();
                if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
                    invalid.push(format!(
                        "{at}.serviceAccounts: {sa:?} is not <name> or <namespace>/<name>"
                    ));
                }
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            if to.operation.ports.contains(&0) {
                invalid.push(format!(
                    "spec.rules[{i}].to[{j}].operation.ports: 0 is not a port"
                ));
            }
        }
    }
    for (at, s) in selectors {
        for e in s.match_expressions.iter().flatten() {
            if !SELECTOR_OPERATORS.contains(&e.operator.as_str()) {
                invalid.push(format!(
                    "{at}: operator {:?} is not one of {}",
                    e.operator,
                    SELECTOR_OPERATORS.join(", ")
                ));
            }
        }
    }
    targeted_verdict(&invalid, &p.metadata, p.spec.target_ref.as_ref(), services)
}

/// A policy `targetRef`'s kind, when it is not a core Service.
fn target_kind_problem(t: &crate::api::traffic::TargetRef) -> Option<String> {
    (!t.is_service()).then(|| format!("spec.targetRef: kind {:?} is not a core Service", t.kind))
}

/// The verdict of a policy with the problems `invalid`: rejected with them, else unresolved
/// while its `target` Service (and port) does not exist.
fn targeted_verdict(
    invalid: &[String],
    meta: &kube::api::ObjectMeta,
    target: Option<&crate::api::traffic::TargetRef>,
    services: &Services,
) -> Verdict {
    if !invalid.is_empty() {
        return Verdict::rejected("Invalid", invalid.join("; "));
    }
    let ns = meta.namespace.as_deref().unwrap_or("default");
    Verdict {
        rejected: None,
        unresolved: target
            .and_then(|t| missing_service(services, ns, &t.name, t.port.map(i64::from)))
            .map(|message| ("BackendNotFound", format!("targetRef: {message}"))),
    }
}

/// Checks a `RequestAuthentication`: a Service target, one key source per rule, inline key sets
/// that parse, header names. (A `jwksFile` lives on the nodes: each agent reports its own.)
#[must_use]
pub fn request_authentication(p: &RequestAuthentication, services: &Services) -> Verdict {
    let mut invalid = Vec::new();
    invalid.extend(target_kind_problem(&p.spec.target_ref));
    if p.spec.jwt_rules.is_empty() {
        invalid.push("spec.jwtRules: at least one rule is needed".to_owned());
    }
    let mut issuers = std::collections::BTreeSet::new();
    for (i, rule) in p.spec.jwt_rules.iter().enumerate() {
        let at = format!("spec.jwtRules[{i}]");
        if rule.issuer.is_empty() {
            invalid.push(format!("{at}.issuer: empty"));
        } else if !issuers.insert(rule.issuer.as_str()) {
            invalid.push(format!(
                "{at}.issuer: {:?} has an earlier rule; one rule per issuer",
                rule.issuer
            ));
        }
        match (&rule.jwks, &rule.jwks_file) {
            (Some(inline), None) => {
                if let Err(e) = crate::identity::parse_jwks(inline) {
                    invalid.push(format!("{at}.jwks: {e}"));
                }
            }
            (None, Some(_)) => {}
            _ => invalid.push(format!("{at}: set exactly one of jwks and jwksFile")),
        }
        for (j, h) in rule.from_headers.iter().enumerate() {
            if hyper::header::HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                invalid.push(format!(
                    "{at}.fromHeaders[{j}].name: {:?} is not a header name",
                    h.name
                ));
            }
        }
    }
    targeted_verdict(&invalid, &p.metadata, Some(&p.spec.target_ref), services)
}

#[must_use]
pub fn mesh_config(c: &MeshConfig) -> Verdict {
    match c.metadata.name.as_deref() {
        Some("default") => Verdict::OK,
        other => Verdict::rejected(
            "Ignored",
            format!(
                "only the MeshConfig named \"default\" applies; {:?} is ignored (rename it to default)",
                other.unwrap_or_default()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(name: &str, created: i64, spec: &str) -> TrafficPolicy {
        let mut p: TrafficPolicy = serde_saphyr::from_str(&format!(
            "metadata: {{name: {name}, namespace: default}}\nspec: {spec}"
        ))
        .unwrap();
        p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
        ));
        p
    }

    fn svc(name: &str, port: i32) -> Service {
        serde_saphyr::from_str(&format!(
            "metadata: {{name: {name}, namespace: default}}\n\
             spec: {{ports: [{{port: {port}}}]}}"
        ))
        .unwrap()
    }

    #[test]
    fn references_resolve_or_say_what_is_missing() {
        let list = [Arc::new(svc("web", 80))];
        let services = services(&list);
        let good = tp("a", 1, "{targetRef: {kind: Service, name: web}}");
        assert!(traffic_policy(&good, &[], &services).effective());
        let missing = tp("b", 1, "{targetRef: {kind: Service, name: nope}}");
        let v = traffic_policy(&missing, &[], &services);
        assert!(v.rejected.is_none());
        assert_eq!(
            v.unresolved,
            Some((
                "BackendNotFound",
                "Service default/nope does not exist".into()
            ))
        );
        let headless: Service = serde_saphyr::from_str(
            "metadata: {name: db, namespace: default}\nspec: {clusterIP: None, ports: [{port: 5432}]}",
        )
        .unwrap();
        let with_headless = [Arc::new(svc("web", 80)), Arc::new(headless)];
        let v = traffic_policy(
            &tp("h", 1, "{targetRef: {kind: Service, name: db}}"),
            &[],
            &super::services(&with_headless),
        );
        assert!(v.unresolved.unwrap().1.contains("has no cluster IP"));
        let port = tp("c", 1, "{targetRef: {kind: Service, name: web, port: 81}}");
        let v = traffic_policy(&port, &[], &services);
        assert!(v.unresolved.unwrap().1.contains("no port 81"));
        let mirror = tp(
            "d",
            1,
            "{targetRef: {kind: Service, name: web}, mirror: {name: shadow, port: 80}}",
        );
        assert!(
            traffic_policy(&mirror, &[], &services)
                .unresolved
                .unwrap()
                .1
                .contains("mirror Service default/shadow")
        );
    }

    #[test]
    fn cross_field_rules_reject_with_every_problem_named() {
        let p = tp(
            "a",
            1,
            "{targetRef: {kind: Service, name: web}, timeout: 1s, \
             retries: {attempts: 0, perTryTimeout: 2s, on: [5xx, sometimes]}, \
             loadBalancer: {algorithm: RingHash}}",
        );
        let (reason, message) = traffic_policy(&p, &[], &BTreeMap::new()).rejected.unwrap();
        assert_eq!(reason, "Invalid");
        for part in [
            "attempts",
            "perTryTimeout",
            "RingHash",
            "sometimes not a retry condition",
        ] {
            assert!(message.contains(part), "{message}");
        }
        let wrong_kind = tp("b", 1, "{targetRef: {kind: Deployment, name: web}}");
        assert!(
            traffic_policy(&wrong_kind, &[], &BTreeMap::new())
                .rejected
                .unwrap()
                .1
                .contains("core Service")
        );
    }

    #[test]
    fn of_two_policies_on_one_port_the_older_wins() {
        let list = [Arc::new(svc("web", 80))];
        let services = services(&list);
        let old = tp("zeta", 1, "{targetRef: {kind: Service, name: web}}");
        let new = tp(
            "alpha",
            2,
            "{targetRef: {kind: Service, name: web, port: 80}}",
        );
        let other_port = tp(
            "beta",
            3,
            "{targetRef: {kind: Service, name: web, port: 81}}",
        );
        let all = [
            Arc::new(old.clone()),
            Arc::new(new.clone()),
            Arc::new(other_port.clone()),
        ];
        assert!(traffic_policy(&old, &all, &services).rejected.is_none());
        let (reason, message) = traffic_policy(&new, &all, &services).rejected.unwrap();
        assert_eq!(reason, "Conflicted");
        assert!(message.contains("default/zeta"), "{message}");
        // A policy for another port conflicts only with the port-less one.
        assert_eq!(
            traffic_policy(&other_port, &all, &services)
                .rejected
                .unwrap()
                .0,
            "Conflicted"
        );
    }

    #[test]
    fn route_parents_and_backends() {
        let list = [Arc::new(svc("web", 80)), Arc::new(svc("web-v2", 80))];
        let services = services(&list);
        let route = |spec: &str| -> gateway_api::httproutes::HttpRoute {
            serde_saphyr::from_str(&format!(
                "metadata: {{name: r, namespace: default}}\nspec: {spec}"
            ))
            .unwrap()
        };
        let good = route(
            "{parentRefs: [{kind: Service, name: web, port: 80}, {name: gw}], rules: [{backendRefs: [{name: web-v2, port: 80}]}]}",
        );
        let parents = http_route(&good, &services);
        assert_eq!(parents.len(), 1, "a Gateway parent is not ours to report");
        assert!(parents[0].verdict.effective());
        assert_eq!(parents[0].parent_ref["port"], 80);
        let bad = route(
            "{parentRefs: [{kind: Service, name: web, port: 81}, {kind: Service, name: api}], rules: [{backendRefs: [{name: web-v3, port: 80}]}]}",
        );
        let parents = http_route(&bad, &services);
        assert!(
            parents[0]
                .verdict
                .rejected
                .as_ref()
                .unwrap()
                .1
                .contains("no port 81")
        );
        assert!(
            parents[1]
                .verdict
                .rejected
                .as_ref()
                .unwrap()
                .1
                .contains("default/api does not exist")
        );
        assert_eq!(
            parents[0].verdict.unresolved.as_ref().unwrap().0,
            "BackendNotFound"
        );
    }

    #[test]
    fn authorization_policies_and_mesh_configs() {
        let p: AuthorizationPolicy = serde_saphyr::from_str(
            "metadata: {name: p, namespace: default}\nspec:\n  selector: {matchExpressions: [{key: app, operator: Equals}]}\n  rules: [{from: [{source: {serviceAccounts: [a/b/c]}}], to: [{operation: {ports: [0]}}]}]",
        )
        .unwrap();
        let none = services(&[]);
        let (_, message) = authorization_policy(&p, &none).rejected.unwrap();
        for part in ["Equals", "a/b/c", "0 is not a port"] {
            assert!(message.contains(part), "{message}");
        }
        let per_request: AuthorizationPolicy = serde_saphyr::from_str(
            "metadata: {name: p, namespace: default}\nspec:\n  targetRef: {kind: Service, name: web}",
        )
        .unwrap();
        let v = authorization_policy(&per_request, &none);
        assert!(v.rejected.is_none());
        assert_eq!(
            v.unresolved.unwrap().1,
            "targetRef: Service default/web does not exist"
        );
        let mc: MeshConfig = serde_saphyr::from_str("metadata: {name: other}\nspec: {}").unwrap();
        assert_eq!(mesh_config(&mc).rejected.unwrap().0, "Ignored");
    }

    #[test]
    fn request_authentications() {
        let ra = |spec: &str| -> RequestAuthentication {
            serde_saphyr::from_str(&format!(
                "metadata: {{name: j, namespace: default}}\nspec:\n{spec}"
            ))
            .unwrap()
        };
        let web = svc("web", 80);
        let list = [Arc::new(web)];
        let services = services(&list);
        let bad = ra(
            "  targetRef: {kind: Pod, name: web}\n  jwtRules:\n  - {issuer: a, jwks: '{}'}\n  - {issuer: a, jwks: x, jwksFile: /f}\n  - {issuer: '', jwksFile: /f, fromHeaders: [{name: 'bad header'}]}",
        );
        let (reason, message) = request_authentication(&bad, &services).rejected.unwrap();
        assert_eq!(reason, "Invalid");
        for part in [
            "kind \"Pod\"",
            "jwtRules[0].jwks: not a JWKS",
            "jwtRules[1].issuer: \"a\" has an earlier rule",
            "jwtRules[1]: set exactly one",
            "jwtRules[2].issuer: empty",
            "\"bad header\" is not a header name",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
        let good =
            ra("  targetRef: {kind: Service, name: web}\n  jwtRules: [{issuer: a, jwksFile: /f}]");
        assert!(request_authentication(&good, &services).effective());
        let elsewhere =
            ra("  targetRef: {kind: Service, name: api}\n  jwtRules: [{issuer: a, jwksFile: /f}]");
        assert_eq!(
            request_authentication(&elsewhere, &services)
                .unresolved
                .unwrap()
                .0,
            "BackendNotFound"
        );
    }
}
