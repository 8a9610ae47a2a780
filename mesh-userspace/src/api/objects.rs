//! The objects that describe a mesh: Kubernetes Pods, Services and Namespaces, and Weft's own
//! kinds in group `weft.dev`. Parsing is per document: a bad document is reported with its file
//! and position and skipped; it never hides the good ones.
use std::{collections::BTreeMap, sync::Arc};

use gateway_api::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
use k8s_openapi::{
    api::core::v1::{Namespace, Pod, Service},
    apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector},
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::api::traffic::TrafficPolicy;

pub const WEFT_API_VERSION: &str = "weft.dev/v1alpha1";
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

/// Pod/namespace annotation or label that takes a workload out of the mesh.
pub const INJECT_ANNOTATION: &str = "weft.dev/inject";

/// Mesh-wide settings (cluster-scoped; the object named `default` wins, others are reported).
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "MeshConfig",
    status = "ObjectStatus",
    derive = "PartialEq",
    doc = "Mesh-wide settings. Cluster-scoped; only the object named `default` applies."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfigSpec {
    /// Socket-level fast path for same-node meshed connections (default on).
    #[serde(default = "yes")]
    pub fast_path: bool,
    /// SPIFFE trust domain of workload identities (default `cluster.local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9._-]{1,255}$"))]
    pub trust_domain: Option<String>,
    /// Mesh-wide mTLS mode of meshed pods (default STRICT). A namespace label or pod annotation
    /// `weft.dev/mtls-mode` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls_mode: Option<MtlsMode>,
    /// Which meshed pods' same-node connections use the socket-level redirect (default `Auto`:
    /// all of them, when this node's kernel passed the agent's socket self-test; otherwise
    /// none). A namespace label or pod annotation `weft.dev/socket-fast-path` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_fast_path: Option<SocketFastPath>,
}

impl Default for MeshConfigSpec {
    fn default() -> Self {
        Self {
            fast_path: true,
            trust_domain: None,
            mtls_mode: None,
            socket_fast_path: None,
        }
    }
}

/// Whether a workload's same-node connections use the socket-level redirect (sockhash + `sk_msg`:
/// bytes go socket to socket, skipping TCP/IP). On kernels whose `tcp_bpf` hides redirected
/// bytes from `splice()` readers and gives blocking readers spurious `EAGAIN` (the agent tests
/// this at start), only `Enabled` workloads use it; everyone else keeps the kernel's normal TCP
/// path, untouched, with policy, load balancing and counters all the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum SocketFastPath {
    /// When this node's kernel passed the socket self-test.
    #[default]
    Auto,
    /// Always: the operator knows the workload reads its sockets only in ways the redirect
    /// serves exactly (event loops; no `splice()`, no blocking reads) on kernels that failed
    /// the self-test.
    Enabled,
    /// Never.
    Disabled,
}

impl std::str::FromStr for SocketFastPath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "enabled" => Ok(Self::Enabled),
            "disabled" => Ok(Self::Disabled),
            _ => Err(format!(
                "socket fast path {s:?} is not Auto, Enabled or Disabled"
            )),
        }
    }
}

impl SocketFastPath {
    /// Whether the workload's sockets join the socket fast path on a kernel that did
    /// (`kernel_ok`) or did not pass the self-test.
    #[must_use]
    pub const fn allowed(self, kernel_ok: bool) -> bool {
        match self {
            Self::Auto => kernel_ok,
            Self::Enabled => true,
            Self::Disabled => false,
        }
    }
}

/// How a meshed pod accepts connections from outside its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Only through the mutual-TLS tunnel: plaintext from other nodes is refused.
    #[default]
    Strict,
    /// Tunnel or plaintext.
    Permissive,
    /// No tunnel: meshed clients connect in plaintext.
    Disable,
}

impl std::str::FromStr for MtlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "STRICT" => Ok(Self::Strict),
            "PERMISSIVE" => Ok(Self::Permissive),
            "DISABLE" => Ok(Self::Disable),
            other => Err(format!(
                "mTLS mode {other:?} is not STRICT, PERMISSIVE or DISABLE"
            )),
        }
    }
}

/// Namespace label: `"true"` makes the namespace default-deny: a destination no ALLOW policy
/// selects is refused to everyone (as if an ALLOW policy with no rules selected it).
pub const DEFAULT_DENY_LABEL: &str = "weft.dev/default-deny";

/// Namespace label or pod annotation choosing the mTLS mode (`STRICT`, `PERMISSIVE`, `DISABLE`).
pub const MTLS_MODE_KEY: &str = "weft.dev/mtls-mode";

/// Namespace label or pod annotation choosing the socket fast path (`auto`, `enabled`,
/// `disabled`; see [`SocketFastPath`]).
pub const SOCKET_FAST_PATH_KEY: &str = "weft.dev/socket-fast-path";

const fn yes() -> bool {
    true
}

/// Who may connect to which workloads, enforced at `connect()` time (same node: in the kernel).
/// Semantics follow Istio's `AuthorizationPolicy`: DENY rules win; if any ALLOW policy selects a
/// workload, a connection must match one of their rules; otherwise the mesh default applies.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "ObjectStatus",
    derive = "PartialEq",
    shortname = "wap",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    doc = "Who may connect to which workloads (Istio semantics: DENY wins, then ALLOW lists)."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Destination workloads in the policy's namespace; absent selects all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// A Service (in the policy's namespace) instead of a selector: the policy is enforced per
    /// request by the L7 engine for that Service (which becomes an L7 service), and may use L7
    /// attributes (`methods`, `paths`, `when`). Without it the policy is enforced at
    /// `connect()` in the kernel, where requests are not visible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<crate::api::traffic::TargetRef>,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Audit mode: the policy is evaluated as if it were enforced, and what it would deny is
    /// allowed but logged, counted and listed in the flow table (verdict AUDIT).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// Which JWTs the L7 engine accepts on requests to one Service (Istio's `RequestAuthentication`,
/// with a `targetRef`). A request carrying a token that fails validation (signature, issuer,
/// audience, expiry) is refused with 401; a request without a token passes unauthenticated,
/// so require one with an `AuthorizationPolicy` on `requestPrincipals`. A valid token's
/// principal and claims are what authorization rules can match.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "RequestAuthentication",
    namespaced,
    status = "ObjectStatus",
    derive = "PartialEq",
    shortname = "wra",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    doc = "Which JWTs (issuer, keys, audiences) requests to one Service may carry."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    /// The Service (in this namespace) whose requests are authenticated; it becomes an L7
    /// service.
    pub target_ref: crate::api::traffic::TargetRef,
    #[schemars(length(min = 1))]
    pub jwt_rules: Vec<JwtRule>,
}

/// One accepted token issuer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// The token's `iss` must equal this.
    #[schemars(length(min = 1))]
    pub issuer: String,
    /// When set, the token's `aud` must contain one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// The issuer's public keys, a JSON Web Key Set (RSA or EC keys; RS256/384/512, PS256/384/512,
    /// ES256/384), inline. Exactly one of `jwks` and `jwksFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// A file on the node holding the key set; re-read when it changes (key rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<String>,
    /// Where the token is; default `Authorization: Bearer <token>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Pass the token on to the service (default: the header is removed once validated).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_original_token: bool,
}

/// A request header that carries the token after `prefix` (e.g. `Bearer `).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    #[schemars(length(min = 1))]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// What the controller says about a Weft object: `Accepted`, `ResolvedRefs` and `Programmed`
/// conditions, each with the generation it describes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// A rule matches when one of `from` matches the source and one of `to` matches the
/// destination port; an empty list matches everything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    /// Request conditions (L7, `targetRef` policies): every condition must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<RequestCondition>,
}

impl Rule {
    /// Whether the rule looks at requests (methods, paths, conditions), which only the L7
    /// engine can see.
    #[must_use]
    pub fn has_l7_attributes(&self) -> bool {
        !self.when.is_empty()
            || self
                .from
                .iter()
                .any(|f| !f.source.request_principals.is_empty())
            || self
                .to
                .iter()
                .any(|t| !t.operation.methods.is_empty() || !t.operation.paths.is_empty())
    }
}

/// `key` is `request.headers[<name>]`, `request.auth.principal` (`<issuer>/<subject>` of the
/// request's validated JWT) or `request.auth.claims[<name>]` (nested: `[a][b]`; a list claim
/// matches when one of its entries does); the attribute must equal one of `values` (a value
/// may end or start with `*`: prefix or suffix match). Without a validated JWT, `request.auth`
/// conditions never hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestCondition {
    #[schemars(regex(
        pattern = r"^request\.(headers\[[^\]]+\]|auth\.principal|auth\.claims(\[[^\]]+\])+)$"
    ))]
    pub key: String,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

/// Every field that is set must match (AND); within a list, any entry may match (OR).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// `namespace/name`, or `name` for the policy's own namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// `<issuer>/<subject>` of the request's JWT, validated by a `RequestAuthentication` of the
    /// target Service (`*`, a prefix `iss/*` or a suffix match allowed). L7 only (`targetRef`
    /// policies); a request without a valid JWT never matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
}

impl Source {
    /// Whether a workload running as `service_account` in `namespace` with `labels` is this
    /// source by its identity fields (service accounts, namespaces, pod selector; a bare
    /// service-account name is in `policy_ns`). `requestPrincipals` are a request's, not a
    /// workload's: checked by the L7 engine.
    #[must_use]
    pub fn matches_workload(
        &self,
        policy_ns: &str,
        namespace: &str,
        service_account: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        let sa_ok = self.service_accounts.is_empty()
            || self
                .service_accounts
                .iter()
                .any(|want| match want.split_once('/') {
                    Some((want_ns, want_sa)) => want_ns == namespace && want_sa == service_account,
                    None => policy_ns == namespace && want == service_account,
                });
        let ns_ok = self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace);
        let pods_ok = self
            .pod_selector
            .as_ref()
            .is_none_or(|s| selector_matches(s, labels));
        sa_ok && ns_ok && pods_ok
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub ports: Vec<u16>,
    /// HTTP methods (L7, `targetRef` policies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Request paths: exact, `prefix*` or `*suffix` (L7, `targetRef` policies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// Everything the agent currently knows, plus what it could not accept. Objects are shared, not
/// owned: a new view of a cluster with 10,000 pods is 10,000 reference counts, not a deep copy of
/// every pod (in Kubernetes mode they are the watch caches' own objects).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ObjectSet {
    pub namespaces: Vec<Arc<Namespace>>,
    /// Nodes: their `InternalIP` is where their agent's tunnel listens, `spec.podCIDR` their
    /// pod network.
    pub nodes: Vec<Arc<k8s_openapi::api::core::v1::Node>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub request_authentications: Vec<Arc<RequestAuthentication>>,
    pub mesh_configs: Vec<Arc<MeshConfig>>,
    pub http_routes: Vec<Arc<HttpRoute>>,
    pub grpc_routes: Vec<Arc<GrpcRoute>>,
    pub traffic_policies: Vec<Arc<TrafficPolicy>>,
    pub errors: Vec<ParseError>,
}

/// Whether two lists hold the same objects: the same shared ones (a watch cache hands out the
/// same `Arc` while an object is unchanged), or equal ones (objects read again from files).
pub fn same_objects<T: PartialEq>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
}

/// Calls `$then!(namespaces, nodes, …)` with the field of every kind an [`ObjectSet`] holds: one
/// list for whatever goes over all of them (merging, comparing, one watch cache per kind).
macro_rules! object_kinds {
    ($then:ident) => {
        $then!(
            namespaces,
            nodes,
            pods,
            services,
            authorization_policies,
            request_authentications,
            mesh_configs,
            http_routes,
            grpc_routes,
            traffic_policies
        )
    };
}
pub(crate) use object_kinds;

// The list is complete: a field of `ObjectSet` missing from it does not compile.
const _: fn(ObjectSet) = |set| {
    macro_rules! every_field {
        ($($kind:ident),*) => {
            let ObjectSet { $($kind: _,)* errors: _ } = set;
        };
    }
    object_kinds!(every_field);
};

impl ObjectSet {
    /// Whether `other` holds the same objects (in the same order) and the same errors: a view
    /// that changes nothing needs no rebuild.
    #[must_use]
    pub fn same_as(&self, other: &Self) -> bool {
        macro_rules! same {
            ($($kind:ident),*) => {
                $(same_objects(&self.$kind, &other.$kind))&&*
            };
        }
        object_kinds!(same) && self.errors == other.errors
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{source_name} document {document}: {message}")]
pub struct ParseError {
    /// File (or other origin) of the document.
    pub source_name: String,
    /// 1-based position of the document in its source.
    pub document: usize,
    pub message: String,
}

impl ObjectSet {
    /// Adds every object (and error) of `other`.
    pub fn merge(&mut self, other: Self) {
        macro_rules! extend {
            ($($kind:ident),*) => {
                $(self.$kind.extend(other.$kind);)*
            };
        }
        object_kinds!(extend);
        self.errors.extend(other.errors);
    }

    /// Parses a multi-document YAML (or JSON) text. Bad documents are recorded in `errors`;
    /// documents are numbered from 1, empty ones not counted. Parsing is bounded (serde-saphyr's
    /// default budget: nesting depth, node count, alias expansion), so hostile input becomes an
    /// error, never a hang or an exhausted agent.
    pub fn add_yaml(&mut self, source_name: &str, text: &str) {
        let mut reader = text.as_bytes();
        // YAML 1.2 booleans (`yes` stays a string, as the type the field wants decides), and
        // one-line errors for the log.
        let options = serde_saphyr::options! { strict_booleans: true, with_snippet: false };
        let docs = serde_saphyr::read_with_options::<_, serde_json::Value>(&mut reader, options);
        for (i, doc) in docs.enumerate() {
            let error = |message: String| ParseError {
                source_name: source_name.to_owned(),
                document: i + 1,
                message,
            };
            let value = match doc {
                Ok(serde_json::Value::Null) => continue, // empty document
                Ok(v) => v,
                Err(e) => {
                    self.errors.push(error(format!("invalid YAML: {e}")));
                    // The YAML stream cannot be resynchronised after a syntax error.
                    break;
                }
            };
            if let Err(message) = self.add_value(value) {
                self.errors.push(error(message));
            }
        }
    }

    fn add_value(&mut self, value: serde_json::Value) -> Result<(), String> {
        let field = |name: &str| {
            value
                .get(name)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let api_version = field("apiVersion").ok_or("missing apiVersion")?;
        let kind = field("kind").ok_or("missing kind")?;
        let typed = |e: serde_json::Error| format!("{kind} ({api_version}): {e}");
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Pod") => self
                .pods
                .push(Arc::new(serde_json::from_value(value).map_err(typed)?)),
            ("v1", "Service") => self
                .services
                .push(Arc::new(serde_json::from_value(value).map_err(typed)?)),
            ("v1", "Namespace") => {
                self.namespaces
                    .push(Arc::new(serde_json::from_value(value).map_err(typed)?));
            }
            ("v1", "Node") => self
                .nodes
                .push(Arc::new(serde_json::from_value(value).map_err(typed)?)),
            ("v1", "List") => {
                let items = value
                    .get("items")
                    .and_then(serde_json::Value::as_array)
                    .cloned();
                for item in items.unwrap_or_default() {
                    self.add_value(item)?;
                }
            }
            (WEFT_API_VERSION, "AuthorizationPolicy") => {
                let p: AuthorizationPolicy = serde_json::from_value(value).map_err(typed)?;
                if p.metadata.name.is_none() {
                    return Err(format!("{kind}: metadata.name is required"));
                }
                self.authorization_policies.push(Arc::new(p));
            }
            (WEFT_API_VERSION, "RequestAuthentication") => {
                let p: RequestAuthentication = serde_json::from_value(value).map_err(typed)?;
                if p.metadata.name.is_none() {
                    return Err(format!("{kind}: metadata.name is required"));
                }
                self.request_authentications.push(Arc::new(p));
            }
            (WEFT_API_VERSION, "MeshConfig") => {
                self.mesh_configs
                    .push(Arc::new(serde_json::from_value(value).map_err(typed)?));
            }
            (GATEWAY_API_VERSION | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
                let r: HttpRoute = serde_json::from_value(value).map_err(typed)?;
                if r.metadata.name.is_none() {
                    return Err(format!("{kind}: metadata.name is required"));
                }
                self.http_routes.push(Arc::new(r));
            }
            (GATEWAY_API_VERSION, "GRPCRoute") => {
                let r: GrpcRoute = serde_json::from_value(value).map_err(typed)?;
                if r.metadata.name.is_none() {
                    return Err(format!("{kind}: metadata.name is required"));
                }
                self.grpc_routes.push(Arc::new(r));
            }
            (WEFT_API_VERSION, "TrafficPolicy") => {
                let p: TrafficPolicy = serde_json::from_value(value).map_err(typed)?;
                if p.metadata.name.is_none() {
                    return Err(format!("{kind}: metadata.name is required"));
                }
                self.traffic_policies.push(Arc::new(p));
            }
            (v, k) => {
                return Err(format!(
                    "unsupported kind {k} ({v}); expected v1 Pod/Service/Namespace/Node, \
                     {GATEWAY_API_VERSION} HTTPRoute/GRPCRoute or \
                     {WEFT_API_VERSION} AuthorizationPolicy/RequestAuthentication/MeshConfig/\
                     TrafficPolicy"
                ));
            }
        }
        Ok(())
    }
}

/// The `matchExpressions` operators [`selector_matches`] knows (any other never matches).
pub const SELECTOR_OPERATORS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];

/// `matchLabels` AND `matchExpressions` (In, `NotIn`, Exists, `DoesNotExist`), as Kubernetes defines.
#[must_use]
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_exprs = selector.match_expressions.iter().flatten().all(|e| {
        let have = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => have.is_some_and(|h| values.contains(h)),
            "NotIn" => have.is_none_or(|h| !values.contains(h)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false, // an unknown operator never matches: fail closed for selectors
        }
    });
    by_labels && by_exprs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mixed_documents_and_keeps_good_ones_after_a_bad_one() {
        let mut set = ObjectSet::default();
        set.add_yaml(
            "t.yaml",
            r"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: default, labels: {app: a}}
spec: {serviceAccountName: sa-a, nodeName: n1, containers: [{name: c}]}
status: {podIP: 198.18.1.10}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: p}
spec: {action: DENI}
---
apiVersion: v1
kind: Service
metadata: {name: s, namespace: default}
spec: {clusterIP: 198.19.0.1, selector: {app: a}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: weft.dev/v1alpha1
kind: Gadget
",
        );
        assert_eq!(set.pods.len(), 1);
        assert_eq!(set.services.len(), 1);
        assert_eq!(set.errors.len(), 2, "{:?}", set.errors);
        assert_eq!(set.errors[0].document, 2);
        assert!(set.errors[0].message.contains("DENI"), "{}", set.errors[0]);
        assert!(set.errors[1].message.contains("unsupported kind Gadget"));
    }

    #[test]
    fn syntax_error_is_reported_not_panicked() {
        let mut set = ObjectSet::default();
        set.add_yaml(
            "bad.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: [unclosed\n",
        );
        assert_eq!(set.errors.len(), 1);
        assert!(set.errors[0].message.starts_with("invalid YAML"));
    }

    #[test]
    fn selector_semantics() {
        let sel: LabelSelector = serde_saphyr::from_str(
            "{matchLabels: {app: db}, matchExpressions: [{key: tier, operator: NotIn, values: [test]}]}",
        )
        .unwrap();
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert!(selector_matches(&sel, &labels(&[("app", "db")])));
        assert!(selector_matches(
            &sel,
            &labels(&[("app", "db"), ("tier", "prod")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "db"), ("tier", "test")])
        ));
        assert!(!selector_matches(&sel, &labels(&[("app", "web")])));
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
    }
}
