//! The node's view of the mesh: which workloads it hosts, which services exist, and the verdict
//! for every (source, destination, port) — computed from the objects, then written to the kernel
//! by `ebpf`. Pure functions: everything here is unit-testable without privileges.
//!
//! `validate` is where every object is judged; `build` applies only what it accepts.
pub mod access;
mod authz;
pub mod explain;
mod ids;
mod index;
mod l7;
pub mod policy;
pub mod routes;
mod services;
pub mod validate;
mod workloads;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use mesh_common::{PolicyKey, PolicyValue};
use serde::Serialize;

use crate::{
    api::{
        ObjectSet,
        objects::{
            DEFAULT_DENY_LABEL, INJECT_ANNOTATION, MTLS_MODE_KEY, MeshConfig, MtlsMode,
            SOCKET_FAST_PATH_KEY, SocketFastPath, same_objects,
        },
    },
    identity::{SpiffeId, TrustDomain},
};
pub use authz::policy_entries;
use authz::{l7_attribute_problems, policy_matrix};
pub use ids::{RuleId, ServiceId, WorkloadId};
use l7::l7_services;
use services::service_ports;
use workloads::{
    labelled_namespaces, mesh_settings, namespace_settings, nodes, pod_setting, workload_of,
};
pub use workloads::{pod_lacks_address, with_addresses};

/// A pod of the mesh. `id` is stable across agent restarts (derived from namespace/name), so
/// pinned counters keep their meaning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub id: WorkloadId,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// Its address; `None` until kubelet reports it (the pod is already a source: its cgroup
    /// carries its identity before its address is known).
    pub ip: Option<Ipv4Addr>,
    pub node: String,
    /// False when opted out (`weft.dev/inject: disabled` on the pod or its namespace).
    pub meshed: bool,
    /// Hosted by this agent's node.
    pub local: bool,
    /// Pod cgroup (local workloads only) in Weft's layout: `<node cgroup>/<namespace>_<name>`.
    pub cgroup: Option<PathBuf>,
    /// The pod's UID, which names its cgroup in kubelet's layouts.
    pub uid: Option<String>,
    /// How it accepts connections from other nodes.
    pub mtls: MtlsMode,
    /// Whether its same-node connections may use the socket-level redirect.
    pub socket_fast_path: SocketFastPath,
    /// Its SPIFFE ID (from its service account).
    pub identity: SpiffeId,
}

impl Workload {
    /// mTLS mode STRICT: reached from other nodes only through the tunnel.
    #[must_use]
    pub fn strict(&self) -> bool {
        self.mtls == MtlsMode::Strict
    }

    /// mTLS mode DISABLE: never reached through the tunnel.
    #[must_use]
    pub fn mtls_disabled(&self) -> bool {
        self.mtls == MtlsMode::Disable
    }

    /// Whether its sockets use the socket fast path on a kernel whose self-test passed
    /// (`kernel_ok`) or failed.
    #[must_use]
    pub fn socket_fast_path_allowed(&self, kernel_ok: bool) -> bool {
        self.socket_fast_path.allowed(kernel_ok)
    }

    #[must_use]
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the agent knows of a node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    /// Its `InternalIP`: where its agent's tunnel listens.
    pub address: Option<Ipv4Addr>,
    /// Its pod network, `spec.podCIDR` (IPv4): (network, prefix length).
    pub pod_cidr: Option<(Ipv4Addr, u8)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub id: ServiceId,
    pub namespace: String,
    pub name: String,
    pub port_name: Option<String>,
    pub vip: Ipv4Addr,
    pub port: u16,
    /// Ready backends: (workload id, address, target port).
    pub backends: Vec<(WorkloadId, Ipv4Addr, u16)>,
    /// The port's `appProtocol` (e.g. `http`, `kubernetes.io/h2c`, `grpc`, `tcp`): the engine
    /// skips protocol detection when it is set.
    pub app_protocol: Option<String>,
    /// Routes or a traffic policy are attached: meshed clients go through the L7 engine.
    pub l7: bool,
    /// While the engine is down, meshed clients are refused rather than sent straight to a
    /// backend (see [`crate::api::traffic::FailureMode`]).
    pub l7_fail_closed: bool,
}

/// A Service by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceRef {
    /// As [`crate::api::refs::attaches`] takes it.
    #[must_use]
    pub fn parts(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the L7 engine needs for one service port that has L7 policy: the routes and the
/// traffic policy compiled; the engine never reads the objects they came from.
#[derive(Debug, Clone, Serialize)]
pub struct L7Service {
    pub service_id: ServiceId,
    pub namespace: String,
    pub name: String,
    pub port: u16,
    pub app_protocol: Option<String>,
    /// The producer routes attached to this port (`/config_dump` shows their names).
    #[serde(serialize_with = "route_names")]
    pub routes: routes::RouteTable,
    /// The accepted `TrafficPolicy` that targets this port.
    #[serde(serialize_with = "policy_name")]
    pub policy: Option<policy::ServicePolicy>,
    /// Authorization policies whose `targetRef` is this service (checked per request).
    #[serde(serialize_with = "access_names")]
    pub authz: Vec<access::AccessPolicy>,
    /// The JWT rules of the request authentications whose `targetRef` is this service.
    #[serde(serialize_with = "issuer_names")]
    pub authn: Vec<access::JwtIssuer>,
    /// What compiling the routes reported (kept with them, for when they are reused).
    #[serde(skip)]
    pub route_problems: Vec<String>,
    /// A digest of every object that shaped this service: the engine keeps the service's
    /// runtime state (budgets, buckets, ejections) while it stays the same.
    #[serde(skip)]
    pub inputs: u64,
}

fn access_names<S: serde::Serializer>(p: &[access::AccessPolicy], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(p.iter().map(|p| &p.name))
}

fn issuer_names<S: serde::Serializer>(p: &[access::JwtIssuer], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(p.iter().map(|p| format!("{} {}", p.policy, p.issuer)))
}

fn route_names<S: serde::Serializer>(t: &routes::RouteTable, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(t.routes())
}

#[allow(
    clippy::ref_option,
    reason = "serde's serialize_with passes the field by reference"
)]
fn policy_name<S: serde::Serializer>(
    p: &Option<policy::ServicePolicy>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_some(&p.as_ref().map(|p| &p.name))
}

/// Why a policy entry exists; `/flows` shows it next to each verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleInfo {
    pub id: RuleId,
    pub policy: String,
    pub action: String,
    /// Index of the rule in the policy, `None` for "no ALLOW rule matched".
    pub rule: Option<usize>,
    pub description: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeState {
    pub node: String,
    pub fast_path: bool,
    pub trust_domain: TrustDomain,
    /// Nodes by name (from Node objects).
    pub nodes: BTreeMap<String, NodeInfo>,
    /// Shared with the next rebuild while the objects they come from are unchanged.
    pub workloads: Arc<[Workload]>,
    pub services: Vec<ServicePort>,
    pub l7: Vec<L7Service>,
    pub rules: Vec<RuleInfo>,
    #[serde(skip)]
    pub policy: Arc<BTreeMap<PolicyKey, PolicyValue>>,
    /// Verdicts for pods of other nodes connecting to this node's pods through the tunnel
    /// (checked by the engine; the kernel only sees this node's sources).
    #[serde(skip)]
    pub inbound_policy: Arc<BTreeMap<PolicyKey, PolicyValue>>,
    /// Network namespace cookies of this node's pods, by workload id, as the CNI plugin
    /// reported them (pods known by their namespace before their cgroup is).
    #[serde(skip)]
    pub netns: BTreeMap<WorkloadId, u64>,
    /// Objects that were understood but cannot be applied, with the reason.
    pub problems: Vec<String>,
    /// The verdict on every Weft object and route (`validate::findings`): only accepted ones
    /// apply.
    pub findings: Vec<validate::Finding>,
    /// What this state was computed from, for the next rebuild.
    #[serde(skip)]
    memo: Arc<Memo>,
}

impl NodeState {
    #[must_use]
    pub fn workload(&self, id: WorkloadId) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.id == id)
    }

    /// (namespace, name) of workload `id` for metric labels, also for the ids that name no
    /// pod: the L7 engine, 0 (an unmeshed peer) and ids not known (yet).
    #[must_use]
    pub fn display_name(&self, id: WorkloadId) -> (String, String) {
        match self.workload(id) {
            Some(w) => (w.namespace.clone(), w.name.clone()),
            None if id.get() == mesh_common::ENGINE_WORKLOAD => {
                ("weft-system".to_owned(), "l7-engine".to_owned())
            }
            None if id.get() == 0 => (String::new(), "unmeshed".to_owned()),
            None => (String::new(), format!("unknown-{id}")),
        }
    }

    #[must_use]
    pub fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Workload> {
        self.workloads.iter().find(|w| w.ip == Some(ip))
    }

    /// This node's pod network, when its Node object says.
    #[must_use]
    pub fn local_pod_cidr(&self) -> Option<(Ipv4Addr, u8)> {
        self.nodes.get(&self.node).and_then(|n| n.pod_cidr)
    }

    /// Where the agent of `node` listens for tunnels (its address, `port`).
    #[must_use]
    pub fn tunnel_addr(&self, node: &str, port: u16) -> Option<std::net::SocketAddrV4> {
        let address = self.nodes.get(node)?.address?;
        Some(std::net::SocketAddrV4::new(address, port))
    }

    #[must_use]
    pub fn rule(&self, id: RuleId) -> Option<&RuleInfo> {
        self.rules.iter().find(|r| r.id == id)
    }

    #[must_use]
    pub fn service(&self, id: ServiceId) -> Option<&ServicePort> {
        self.services.iter().find(|s| s.id == id)
    }
}

/// FNV-1a, folded to a non-zero u32 (0 means "unknown workload" in the kernel maps).
fn stable_id(s: &str, taken: &BTreeSet<u32>) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    loop {
        if h != 0 && h != mesh_common::ENGINE_WORKLOAD && !taken.contains(&h) {
            return h;
        }
        h = h.wrapping_add(1);
    }
}

#[must_use]
/// The state of node `node` for the objects in `yaml`, for tests of the layers above.
#[cfg(test)]
pub(crate) fn build_from_yaml(yaml: &str, node: &str) -> NodeState {
    let mut set = ObjectSet::default();
    set.add_yaml("test", yaml);
    assert!(set.errors.is_empty(), "{:?}", set.errors);
    build(&set, node, Path::new("/nonexistent"))
}

/// The state of node `node` for `objects`.
#[must_use]
pub fn build(objects: &ObjectSet, node: &str, node_cgroup: &Path) -> NodeState {
    build_after(objects, node, node_cgroup, None)
}

/// The state of node `node` for `objects`, reusing what is unchanged since `previous`: the
/// workloads while the pods, nodes, namespaces and mesh configuration are the same objects; the
/// services while their objects are too; each destination's row of verdicts while the policies
/// selecting it are; the compiled routes and policies of L7 services whose objects are the same.
/// A policy change then costs what it selects, not the size of the cluster.
#[must_use]
pub fn build_after(
    objects: &ObjectSet,
    node: &str,
    node_cgroup: &Path,
    previous: Option<&NodeState>,
) -> NodeState {
    let mut state = NodeState {
        node: node.to_owned(),
        fast_path: true,
        ..NodeState::default()
    };
    let mut memo = Memo {
        node_cgroup: node_cgroup.to_owned(),
        mesh_configs: objects.mesh_configs.clone(),
        namespaces: objects.namespaces.clone(),
        nodes: objects.nodes.clone(),
        pods: objects.pods.clone(),
        services_in: objects.services.clone(),
        ..Memo::default()
    };
    let previous = previous.filter(|p| p.node == node && p.memo.node_cgroup == node_cgroup);
    let workloads_kept = previous.filter(|p| p.memo.same_workload_inputs(&memo));
    match workloads_kept {
        Some(p) => {
            state.fast_path = p.fast_path;
            state.trust_domain = p.trust_domain.clone();
            state.nodes = p.nodes.clone();
            state.workloads = p.workloads.clone();
            memo.workload_problems.clone_from(&p.memo.workload_problems);
        }
        None => {
            state.workloads = workloads(
                objects,
                node,
                node_cgroup,
                &mut state,
                &mut memo.workload_problems,
            )
            .into();
        }
    }
    let mut problems = memo.workload_problems.clone();

    if let Some(p) = workloads_kept.filter(|p| same_objects(&p.memo.services_in, &memo.services_in))
    {
        memo.services.clone_from(&p.memo.services);
        memo.service_problems.clone_from(&p.memo.service_problems);
    } else {
        let mut svc_taken = BTreeSet::new();
        let pods = index::pods_by_key(&objects.pods);
        let by_labels = index::WorkloadIndex::new(&state.workloads);
        for svc in &objects.services {
            match service_ports(svc, &pods, &state.workloads, &by_labels, &mut svc_taken) {
                Ok(mut ports) => memo.services.append(&mut ports),
                Err(p) => memo.service_problems.push(p),
            }
        }
    }
    state.services.clone_from(&memo.services);
    problems.extend(memo.service_problems.iter().cloned());

    // Only what validation accepts applies: the controller reports the rest (Accepted=False),
    // the agent logs the same verdicts, and nothing is half-applied or clamped.
    state.findings = validate::findings(objects);
    let accepted = validate::accepted_traffic_policies(objects, &state.findings);
    state.l7 = l7_services(
        objects,
        &accepted,
        &mut state.services,
        previous.map_or(&[][..], |p| &p.l7),
        &mut problems,
    );

    let default_deny = labelled_namespaces(objects, DEFAULT_DENY_LABEL, "true");
    problems.extend(l7_attribute_problems(objects));
    // Rows are reused only for the same workloads: the sources of every row are the same then.
    let rows = |pick: fn(&Memo) -> &authz::Rows| workloads_kept.map(|p| pick(&p.memo));
    let rules = authz::Rules::new(&objects.authorization_policies, &default_deny);
    let kernel = policy_matrix(
        &state.workloads,
        &rules,
        authz::Sides::Kernel,
        rows(|m| &m.kernel_rows),
    );
    let inbound = policy_matrix(
        &state.workloads,
        &rules,
        authz::Sides::Inbound,
        rows(|m| &m.inbound_rows),
    );
    state.policy = Arc::new(kernel.entries);
    state.inbound_policy = Arc::new(inbound.entries);
    state.rules = rules.infos;
    memo.kernel_rows = kernel.rows;
    memo.inbound_rows = inbound.rows;
    state.problems = problems;
    state.memo = Arc::new(memo);
    state
}

/// The workloads (sorted by namespace and name, so that id collisions resolve the same way every
/// time) and, into `state`, the mesh-wide settings and the nodes.
fn workloads(
    objects: &ObjectSet,
    node: &str,
    node_cgroup: &Path,
    state: &mut NodeState,
    problems: &mut Vec<String>,
) -> Vec<Workload> {
    let (mtls_default, socket_default) = mesh_settings(objects, state, problems);
    state.nodes = nodes(objects, problems);

    let opted_out_ns = labelled_namespaces(objects, INJECT_ANNOTATION, "disabled");
    let ns_mtls = namespace_settings::<MtlsMode>(objects, MTLS_MODE_KEY, problems);
    let ns_socket = namespace_settings::<SocketFastPath>(objects, SOCKET_FAST_PATH_KEY, problems);

    let mut pods: Vec<&Pod> = objects.pods.iter().map(|p| &**p).collect();
    pods.sort_by(|a, b| pod_key(a).cmp(&pod_key(b)));
    let mut taken = BTreeSet::new();
    let mut seen_ips = BTreeMap::new();
    let mut out = Vec::with_capacity(pods.len());
    for pod in pods {
        // A host-network pod (a node agent, kube-proxy) has the node's address and runs in the
        // node's network namespace: it is part of the node, not a meshed pod.
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            continue;
        }
        match workload_of(pod, node, node_cgroup, &opted_out_ns, &mut taken) {
            Ok(mut w) => {
                w.identity =
                    SpiffeId::workload(&state.trust_domain, &w.namespace, &w.service_account);
                w.mtls = pod_setting(pod, &w, MTLS_MODE_KEY, &ns_mtls, mtls_default, problems);
                w.socket_fast_path = pod_setting(
                    pod,
                    &w,
                    SOCKET_FAST_PATH_KEY,
                    &ns_socket,
                    socket_default,
                    problems,
                );
                if let Some(other) = w.ip.and_then(|ip| seen_ips.insert(ip, w.key())) {
                    problems.push(format!(
                        "pod {} has the same IP {} as {other}: ignored",
                        w.key(),
                        w.ip.map_or_else(String::new, |ip| ip.to_string())
                    ));
                    continue;
                }
                out.push(w);
            }
            Err(p) => problems.push(p),
        }
    }
    out
}

fn pod_key(p: &Pod) -> (Option<&str>, Option<&str>) {
    (p.metadata.namespace.as_deref(), p.metadata.name.as_deref())
}

/// What a rebuild computed and from which objects, for the next rebuild to reuse.
#[derive(Clone, Default)]
struct Memo {
    node_cgroup: PathBuf,
    mesh_configs: Vec<Arc<MeshConfig>>,
    namespaces: Vec<Arc<Namespace>>,
    nodes: Vec<Arc<Node>>,
    pods: Vec<Arc<Pod>>,
    workload_problems: Vec<String>,
    services_in: Vec<Arc<Service>>,
    /// The service ports before the L7 flags are set.
    services: Vec<ServicePort>,
    service_problems: Vec<String>,
    kernel_rows: authz::Rows,
    inbound_rows: authz::Rows,
}

impl Memo {
    fn same_workload_inputs(&self, new: &Self) -> bool {
        same_objects(&self.mesh_configs, &new.mesh_configs)
            && same_objects(&self.namespaces, &new.namespaces)
            && same_objects(&self.nodes, &new.nodes)
            && same_objects(&self.pods, &new.pods)
    }
}

impl fmt::Debug for Memo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Memo")
            .field("pods", &self.pods.len())
            .field("kernel_rows", &self.kernel_rows.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_cover_pods_the_engine_unmeshed_and_unknown_ids() {
        let s = build_from_yaml(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\n\
             spec: {nodeName: n1}\nstatus: {podIP: 198.18.1.2}\n",
            "n1",
        );
        let web = s.workloads[0].id;
        assert_eq!(s.display_name(web), ("shop".to_owned(), "web".to_owned()));
        let engine = WorkloadId(mesh_common::ENGINE_WORKLOAD);
        assert_eq!(s.display_name(engine).1, "l7-engine");
        assert_eq!(s.display_name(WorkloadId(0)).1, "unmeshed");
        assert_eq!(s.display_name(WorkloadId(7)).1, "unknown-7");
    }
    #[allow(unused_imports, reason = "the tests reach into every part")]
    use super::{authz::*, l7::*, services::*, workloads::*};
    use crate::api::objects::{Action, AuthorizationPolicy, Source};
    use mesh_common::verdict;

    #[test]
    fn routes_and_traffic_policies_make_l7_services() {
        let yaml = format!(
            "{PODS}\n---\n{}",
            r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web, port: 80}]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: db, namespace: default}
spec:
  targetRef: {kind: Service, name: db}
  timeout: 1s
"
        );
        let set = objects(&yaml);
        assert_eq!(set.http_routes.len(), 1);
        let s = build(&set, "n1", Path::new("/cg/node"));
        let l7: Vec<_> = s
            .services
            .iter()
            .filter(|p| p.l7)
            .map(|p| p.name.as_str())
            .collect();
        assert!(l7.contains(&"web"), "{:?}", s.services);
        assert_eq!(s.l7.len(), l7.len());
    }

    #[test]
    fn a_rebuild_reuses_unchanged_l7_services_and_recompiles_changed_ones() {
        let route = |rule: &str| {
            format!(
                "{PODS}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                 metadata: {{name: {rule}, namespace: shop}}\nspec:\n  \
                 parentRefs: [{{group: '', kind: Service, name: web, port: 80}}]\n  rules:\n  \
                 - backendRefs: [{{name: web, port: 80}}]\n    \
                 timeouts: {{request: 1s, backendRequest: 2s}}\n"
            )
        };
        let first = build(&objects(&route("one")), "n1", Path::new("/cg/node"));
        assert_eq!(first.l7.len(), 1);
        assert!(
            first.problems.iter().any(|p| p.contains("never fires")),
            "{:?}",
            first.problems
        );
        // The same objects: the compiled service is reused, its problems still reported.
        let again = build_after(
            &objects(&route("one")),
            "n1",
            Path::new("/cg/node"),
            Some(&first),
        );
        assert_eq!(again.l7[0].inputs, first.l7[0].inputs);
        assert_eq!(again.l7[0].routes.routes(), ["HTTPRoute shop/one"]);
        assert_eq!(again.problems, first.problems);
        // A changed route is compiled again, never masked by what was there before.
        let changed = build_after(
            &objects(&route("two")),
            "n1",
            Path::new("/cg/node"),
            Some(&again),
        );
        assert_ne!(changed.l7[0].inputs, first.l7[0].inputs);
        assert_eq!(changed.l7[0].routes.routes(), ["HTTPRoute shop/two"]);
    }

    #[test]
    fn only_accepted_traffic_policies_apply_and_every_one_has_its_verdict() {
        let policy = |name: &str, attempts: u32| {
            format!(
                "apiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{targetRef: {{kind: Service, name: web}}, retries: {{attempts: {attempts}}}}}\n"
            )
        };
        let refused = objects(&format!("{PODS}\n---\n{}", policy("zero", 0)));
        let s = build(&refused, "n1", Path::new("/cg/node"));
        assert!(
            s.l7.is_empty(),
            "a refused policy makes nothing L7: {:?}",
            s.l7
        );
        assert_eq!(s.findings.len(), 1);
        assert_eq!(
            s.findings[0].verdict.rejected.as_ref().map(|r| r.0),
            Some("Invalid")
        );

        let accepted = objects(&format!("{PODS}\n---\n{}", policy("three", 3)));
        let s = build(&accepted, "n1", Path::new("/cg/node"));
        assert_eq!(s.l7.len(), 1);
        assert_eq!(
            s.l7[0].policy.as_ref().map(|p| p.name.as_str()),
            Some("shop/three")
        );
        assert!(s.findings[0].verdict.effective(), "{:?}", s.findings);
    }

    fn objects(yaml: &str) -> ObjectSet {
        let mut set = ObjectSet::default();
        set.add_yaml("test", yaml);
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        set
    }

    const PODS: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {serviceAccountName: web, nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 198.18.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {serviceAccountName: db, nodeName: n1, containers: [{name: c}]}
status: {podIP: 198.18.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: jobs, labels: {app: batch}}
spec: {serviceAccountName: batch, nodeName: n1, containers: [{name: c}]}
status: {podIP: 198.18.1.12}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: shop, labels: {app: web}, annotations: {weft.dev/inject: disabled}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 9090}]}]}
status: {podIP: 198.18.1.13}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 198.19.0.10, selector: {app: web}, ports: [{port: 80, targetPort: http}]}
";

    fn verdict_of(state: &NodeState, src: &str, dst: &str, port: u16) -> Option<u8> {
        let id = |n: &str| {
            state
                .workloads
                .iter()
                .find(|w| w.name == n)
                .unwrap()
                .id
                .get()
        };
        let key = |port| PolicyKey {
            src_workload: id(src),
            dst_workload: id(dst),
            dst_port_host: port,
            _pad: 0,
        };
        state
            .policy
            .get(&key(port))
            .or_else(|| state.policy.get(&key(0)))
            .map(|v| v.verdict)
    }

    #[test]
    fn default_deny_namespaces_and_dry_run_policies() {
        let yaml = format!(
            "{PODS}\n---\n{}",
            r"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/default-deny: 'true'}}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-from-batch, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {namespaces: [jobs]}}]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: audit-batch, namespace: jobs}
spec:
  action: DENY
  dryRun: true
  rules: [{from: [{source: {namespaces: [shop]}}]}]
"
        );
        let state = build(&objects(&yaml), "n1", Path::new("/cg"));
        // shop is default-deny: db (no ALLOW policy) is refused to everyone...
        assert_eq!(verdict_of(&state, "web", "db", 5432), Some(verdict::DENY));
        assert_eq!(verdict_of(&state, "batch", "db", 5432), Some(verdict::DENY));
        // ...web only to what its ALLOW policy lists.
        assert_eq!(
            verdict_of(&state, "batch", "web", 8080),
            Some(verdict::FAST)
        );
        assert_eq!(verdict_of(&state, "db", "web", 8080), Some(verdict::DENY));
        // A dry-run DENY is recorded, not enforced; jobs is not default-deny.
        assert_eq!(verdict_of(&state, "web", "batch", 80), Some(verdict::AUDIT));
        let audit = state
            .policy
            .values()
            .find(|v| v.verdict == verdict::AUDIT)
            .unwrap();
        assert!(
            state
                .rule(RuleId(audit.rule_id))
                .unwrap()
                .policy
                .ends_with("audit-batch")
        );
        let shop_rule = state
            .rules
            .iter()
            .find(|r| r.policy == "namespace shop")
            .unwrap();
        assert!(shop_rule.description.contains("default-deny"));
    }

    #[test]
    fn l7_attributes_fail_closed_at_connect_time_and_target_ref_policies_make_l7_services() {
        let yaml = format!(
            "{PODS}\n---\n{}",
            r"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-get-only, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-no-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules: [{from: [{source: {namespaces: [jobs]}}], to: [{operation: {paths: [/admin]}}]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-per-request, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  rules: [{to: [{operation: {methods: [GET]}}]}]
"
        );
        let state = build(&objects(&yaml), "n1", Path::new("/cg"));
        // ALLOW with L7 attributes never matches at connect(): everything to web is refused.
        assert_eq!(verdict_of(&state, "db", "web", 8080), Some(verdict::DENY));
        // DENY with L7 attributes matches on its L4 part: jobs is refused, shop is not.
        assert_eq!(verdict_of(&state, "batch", "db", 5432), Some(verdict::DENY));
        assert_eq!(verdict_of(&state, "web", "db", 5432), Some(verdict::FAST));
        assert_eq!(
            state
                .problems
                .iter()
                .filter(|p| p.contains("targetRef"))
                .count(),
            2,
            "{:?}",
            state.problems
        );
        // The targetRef policy makes web an L7 service and stays out of the kernel's matrix.
        let web = state.l7.iter().find(|l| l.name == "web").unwrap();
        assert_eq!(web.authz.len(), 1);
        assert!(state.services.iter().any(|s| s.name == "web" && s.l7));
    }

    #[test]
    fn workloads_services_and_named_target_ports() {
        let s = build(&objects(PODS), "n1", Path::new("/cg/node"));
        assert_eq!(s.workloads.len(), 4);
        let legacy = s.workloads.iter().find(|w| w.name == "legacy").unwrap();
        assert!(!legacy.meshed);
        assert_eq!(
            legacy.cgroup.as_deref(),
            Some(Path::new("/cg/node/shop_legacy"))
        );
        let svc = &s.services[0];
        assert_eq!((svc.vip, svc.port), (Ipv4Addr::new(198, 19, 0, 10), 80));
        let targets: Vec<_> = svc.backends.iter().map(|b| (b.1, b.2)).collect();
        assert!(targets.contains(&(Ipv4Addr::new(198, 18, 1, 10), 8080)));
        assert!(targets.contains(&(Ipv4Addr::new(198, 18, 1, 13), 9090)));
        assert!(
            s.policy.is_empty(),
            "no policy, no entries: the default applies"
        );
    }

    #[test]
    fn terminating_finished_and_unready_pods_are_no_endpoints_but_keep_their_identity() {
        let extra = r"
---
apiVersion: v1
kind: Pod
metadata: {name: going, namespace: shop, labels: {app: web}, deletionTimestamp: '2026-11-24T10:00:00Z'}
spec: {serviceAccountName: web, nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 198.18.1.20}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: shop, labels: {app: web}}
spec: {serviceAccountName: web, nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 198.18.1.21, phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: warming, namespace: shop, labels: {app: web}}
spec: {serviceAccountName: web, nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 198.18.1.22, phase: Running, conditions: [{type: Ready, status: 'False'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ready, namespace: shop, labels: {app: web}}
spec: {serviceAccountName: web, nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 198.18.1.23, phase: Running, conditions: [{type: Ready, status: 'True'}]}
";
        let s = build(&objects(&format!("{PODS}{extra}")), "n1", Path::new("/cg"));
        assert_eq!(s.workloads.len(), 8, "every pod keeps its identity");
        let mut ips: Vec<_> = s.services[0].backends.iter().map(|b| b.1).collect();
        ips.sort();
        assert_eq!(
            ips,
            [
                Ipv4Addr::new(198, 18, 1, 10),
                Ipv4Addr::new(198, 18, 1, 13),
                Ipv4Addr::new(198, 18, 1, 23)
            ]
        );
    }

    #[test]
    fn ids_are_stable_and_nonzero() {
        let a = build(&objects(PODS), "n1", Path::new("/x"));
        let b = build(&objects(PODS), "n1", Path::new("/x"));
        assert_eq!(a.workloads, b.workloads);
        assert!(a.workloads.iter().all(|w| w.id != WorkloadId(0)));
    }

    #[test]
    fn allow_policy_denies_everything_else_and_deny_wins() {
        let yaml = format!(
            "{PODS}---\n{}",
            r"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-allow-web, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from: [{source: {serviceAccounts: [web]}}]
    to: [{operation: {ports: [5432]}}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-batch, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [jobs]}}]
"
        );
        let s = build(&objects(&yaml), "n1", Path::new("/x"));
        assert_eq!(verdict_of(&s, "web", "db", 5432), Some(verdict::FAST));
        assert_eq!(
            verdict_of(&s, "web", "db", 22),
            Some(verdict::DENY),
            "port not allowed"
        );
        assert_eq!(verdict_of(&s, "batch", "db", 5432), Some(verdict::DENY));
        assert_eq!(
            verdict_of(&s, "batch", "web", 8080),
            Some(verdict::DENY),
            "DENY applies namespace-wide"
        );
        assert_eq!(verdict_of(&s, "db", "web", 8080), Some(verdict::FAST));
        // The reason is recorded.
        let key = PolicyKey {
            src_workload: s
                .workloads
                .iter()
                .find(|w| w.name == "web")
                .unwrap()
                .id
                .get(),
            dst_workload: s
                .workloads
                .iter()
                .find(|w| w.name == "db")
                .unwrap()
                .id
                .get(),
            dst_port_host: 0,
            _pad: 0,
        };
        let rule = s.rule(RuleId(s.policy[&key].rule_id)).unwrap();
        assert!(
            rule.description.contains("no ALLOW rule matched"),
            "{rule:?}"
        );
    }

    // --- property: the expanded kernel entries agree with a direct evaluation ----------------

    use proptest::prelude::*;

    use crate::api::objects::{AuthorizationPolicySpec, From, Operation, Rule, To};

    const PORTS: [u16; 3] = [80, 443, 8080];

    fn workloads_fixture() -> Vec<Workload> {
        let w = |id: u32, ns: &str, name: &str, app: &str, sa: &str| Workload {
            id: WorkloadId(id),
            namespace: ns.into(),
            name: name.into(),
            service_account: sa.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            ip: Some(Ipv4Addr::new(198, 18, 1, 10 + u8::try_from(id).unwrap())),
            node: "n1".into(),
            meshed: true,
            local: true,
            cgroup: None,
            uid: None,
            mtls: MtlsMode::Strict,
            socket_fast_path: SocketFastPath::Auto,
            identity: SpiffeId::workload(&TrustDomain::default(), ns, sa),
        };
        vec![
            w(1, "a", "p1", "x", "s1"),
            w(2, "a", "p2", "y", "s2"),
            w(3, "b", "p3", "x", "s1"),
            w(4, "b", "p4", "y", "s3"),
        ]
    }

    fn subset<T: Clone + std::fmt::Debug>(items: &'static [T]) -> impl Strategy<Value = Vec<T>> {
        proptest::sample::subsequence(items.to_vec(), 0..=items.len())
    }

    fn rule() -> impl Strategy<Value = Rule> {
        let source =
            (subset(&["s1", "s2", "a/s3", "b/s3"]), subset(&["a", "b"])).prop_map(|(sas, nss)| {
                From {
                    source: Source {
                        service_accounts: sas.into_iter().map(str::to_owned).collect(),
                        namespaces: nss.into_iter().map(str::to_owned).collect(),
                        pod_selector: None,
                        request_principals: Vec::new(),
                    },
                }
            });
        let op = subset(&PORTS).prop_map(|ports| To {
            operation: Operation {
                ports,
                ..Operation::default()
            },
        });
        (
            proptest::collection::vec(source, 0..3),
            proptest::collection::vec(op, 0..3),
        )
            .prop_map(|(from, to)| Rule {
                from,
                to,
                when: Vec::new(),
            })
    }

    fn policy() -> impl Strategy<Value = AuthorizationPolicy> {
        (
            prop_oneof![Just("a"), Just("b")],
            prop_oneof![Just(None), Just(Some("x")), Just(Some("y"))],
            any::<bool>(),
            proptest::collection::vec(rule(), 0..3),
            0u32..1000,
        )
            .prop_map(|(ns, app, deny, rules, n)| AuthorizationPolicy {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    name: Some(format!("p{n}")),
                    namespace: Some(ns.into()),
                    ..Default::default()
                },
                spec: AuthorizationPolicySpec {
                    selector: app.map(|a| {
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                            match_labels: Some([("app".to_owned(), a.to_owned())].into()),
                            ..Default::default()
                        }
                    }),
                    action: if deny { Action::Deny } else { Action::Allow },
                    rules,
                    dry_run: false,
                    target_ref: None,
                },
                status: None,
            })
    }

    /// Istio's semantics, evaluated for one connection without any expansion.
    fn naive(policies: &[AuthorizationPolicy], src: &Workload, dst: &Workload, port: u16) -> u8 {
        let rule_matches = |p: &AuthorizationPolicy, r: &Rule| {
            let ns = p.metadata.namespace.as_deref().unwrap();
            let from = r.from.is_empty()
                || r.from.iter().any(|f| {
                    let s = &f.source;
                    let sa = s.service_accounts.is_empty()
                        || s.service_accounts.iter().any(|x| {
                            x == &format!("{}/{}", src.namespace, src.service_account)
                                || (ns == src.namespace && x == &src.service_account)
                        });
                    let n = s.namespaces.is_empty() || s.namespaces.contains(&src.namespace);
                    sa && n
                });
            let to = r.to.is_empty()
                || r.to
                    .iter()
                    .any(|t| t.operation.ports.is_empty() || t.operation.ports.contains(&port));
            from && to
        };
        let applying: Vec<&AuthorizationPolicy> =
            policies.iter().filter(|p| selects(p, dst)).collect();
        if applying.iter().any(|p| {
            p.spec.action == Action::Deny && p.spec.rules.iter().any(|r| rule_matches(p, r))
        }) {
            return verdict::DENY;
        }
        let allows: Vec<_> = applying
            .iter()
            .filter(|p| p.spec.action == Action::Allow)
            .collect();
        if allows.is_empty()
            || allows
                .iter()
                .any(|p| p.spec.rules.iter().any(|r| rule_matches(p, r)))
        {
            verdict::FAST
        } else {
            verdict::DENY
        }
    }

    proptest! {
        #[test]
        fn kernel_lookup_agrees_with_direct_evaluation(policies in proptest::collection::vec(policy(), 0..4)) {
            let ws = workloads_fixture();
            let shared: Vec<_> = policies.iter().cloned().map(std::sync::Arc::new).collect();
            let (entries, _) = policy_entries(&ws, &shared, &BTreeSet::new());
            for src in &ws {
                for dst in &ws {
                    for port in [80, 443, 8080, 9999] {
                        let key = |p| PolicyKey { src_workload: src.id.get(), dst_workload: dst.id.get(), dst_port_host: p, _pad: 0 };
                        // The connect4 lookup: exact port, then "any other port", then the default.
                        let got = entries.get(&key(port)).or_else(|| entries.get(&key(0))).map_or(verdict::FAST, |v| v.verdict);
                        prop_assert_eq!(got, naive(&policies, src, dst, port), "{} -> {}:{}", src.name, dst.name, port);
                    }
                }
            }
        }
    }

    /// Pods like [`workloads_fixture`]'s, two of them on another node.
    const MATRIX_PODS: &str = "\
apiVersion: v1\nkind: Pod\nmetadata: {name: p1, namespace: a, labels: {app: x}}\n\
spec: {serviceAccountName: s1, nodeName: n1}\nstatus: {podIP: 198.18.1.11}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: p2, namespace: a, labels: {app: y}}\n\
spec: {serviceAccountName: s2, nodeName: n2}\nstatus: {podIP: 198.18.2.12}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: p3, namespace: b, labels: {app: x}}\n\
spec: {serviceAccountName: s1, nodeName: n1}\nstatus: {podIP: 198.18.1.13}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: p4, namespace: b, labels: {app: y}}\n\
spec: {serviceAccountName: s3, nodeName: n2}\nstatus: {podIP: 198.18.2.14}\n";

    fn matrix_objects(policies: Vec<Arc<AuthorizationPolicy>>) -> ObjectSet {
        let mut set = objects(MATRIX_PODS);
        set.authorization_policies = policies;
        set
    }

    proptest! {
        /// What a rebuild reuses (workloads, rows of verdicts) never makes it differ from a
        /// build from scratch, whichever policies come, stay or go.
        #[test]
        fn a_rebuild_after_policy_changes_equals_a_build_from_scratch(
            before in proptest::collection::vec(policy(), 0..5),
            keep in proptest::collection::vec(any::<bool>(), 5),
            added in proptest::collection::vec(policy(), 0..3),
        ) {
            let before: Vec<_> = before.into_iter().map(Arc::new).collect();
            let first = build(&matrix_objects(before.clone()), "n1", Path::new("/cg/node"));
            let after: Vec<_> = before
                .iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(p, _)| Arc::clone(p))
                .chain(added.into_iter().map(Arc::new))
                .collect();
            let set = matrix_objects(after);
            // The same pods, as a watch cache hands them out again.
            let mut set_shared = set.clone();
            set_shared.pods.clone_from(&first.memo.pods);
            let again = build_after(&set_shared, "n1", Path::new("/cg/node"), Some(&first));
            let fresh = build(&set, "n1", Path::new("/cg/node"));
            prop_assert!(Arc::ptr_eq(&again.workloads, &first.workloads));
            prop_assert_eq!(&again.policy, &fresh.policy);
            prop_assert_eq!(&again.inbound_policy, &fresh.inbound_policy);
            prop_assert_eq!(&again.rules, &fresh.rules);
            prop_assert_eq!(&again.workloads, &fresh.workloads);
            prop_assert_eq!(&again.services, &fresh.services);
            prop_assert_eq!(&again.problems, &fresh.problems);
        }
    }

    #[test]
    fn a_rule_keeps_its_id_when_other_policies_come_and_go() {
        let policy = |name: &str| {
            Arc::new(AuthorizationPolicy {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some("a".into()),
                    ..Default::default()
                },
                spec: AuthorizationPolicySpec {
                    selector: None,
                    action: Action::Deny,
                    rules: vec![Rule {
                        from: Vec::new(),
                        to: Vec::new(),
                        when: Vec::new(),
                    }],
                    dry_run: false,
                    target_ref: None,
                },
                status: None,
            })
        };
        let id_of = |s: &NodeState, policy: &str| {
            s.rules
                .iter()
                .find(|r| r.policy == policy)
                .map(|r| r.id)
                .unwrap()
        };
        let m = policy("m");
        let one = build(&matrix_objects(vec![m.clone()]), "n1", Path::new("/cg"));
        let two = build(
            &matrix_objects(vec![policy("a"), m.clone(), policy("z")]),
            "n1",
            Path::new("/cg"),
        );
        assert_eq!(id_of(&one, "a/m"), id_of(&two, "a/m"));
        // And the kernel entries naming it are the same, so the map is not rewritten.
        let named = |s: &NodeState| -> usize {
            let id = id_of(s, "a/m").0;
            s.policy.values().filter(|v| v.rule_id == id).count()
        };
        assert!(named(&one) > 0);
    }

    const VALID: &str = "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: n}\nspec:\n  selector: {matchLabels: {app: db}}\n  action: DENY\n  rules:\n  - from: [{source: {namespaces: [x], serviceAccounts: [a, b/c]}}]\n    to: [{operation: {ports: [80]}}]\n";

    proptest::proptest! {
        /// Untrusted text never panics the parser or the state builder; it becomes errors.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let mut set = crate::api::ObjectSet::default();
            set.add_yaml("fuzz", &text);
            let _ = build(&set, "n1", std::path::Path::new("/cg"));
        }

        /// A valid document with one byte changed: still no panic, and either parsed or reported.
        #[test]
        fn mutated_policy_never_panics(at in 0usize..VALID.len(), byte in proptest::num::u8::ANY) {
            let mut bytes = VALID.as_bytes().to_vec();
            bytes[at] = byte;
            let text = String::from_utf8_lossy(&bytes);
            let mut set = crate::api::ObjectSet::default();
            set.add_yaml("fuzz", &text);
            let parsed = set.authorization_policies.len() + set.errors.len();
            proptest::prop_assert!(parsed >= 1 || text.trim().is_empty() || !text.contains("kind"));
            let _ = build(&set, "n1", std::path::Path::new("/cg"));
        }
    }
}
