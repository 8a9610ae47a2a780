//! The engine's view of the node, rebuilt from `state` whenever the objects change. Stateful
//! parts (endpoint latency, ejections, budgets, token buckets) survive a rebuild when the
//! service's own configuration and endpoints did not change.
use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
};

use super::{
    balance::Balancer, breaker::Breaker, budget::RetryBudget, detect::Protocol, outlier::Detector,
    ratelimit::TokenBucket,
};
use mesh_common::{PolicyKey, PolicyValue};

use crate::{
    identity::SpiffeId,
    state::{
        L7Service, NodeState, ServiceRef, WorkloadId,
        policy::{HashKey, ServicePolicy},
        routes::{BackendTarget, RouteTable},
    },
};

/// Endpoints of one backend service port, with the state of its load balancer.
pub struct Pool {
    pub service: ServiceRef,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
    pub balancer: Balancer,
    pub outlier: Option<Detector>,
    pub breaker: Option<Breaker>,
    pub hash_on: Option<HashKey>,
}

impl Pool {
    /// A pool of `endpoints` for `service` port `port`, with the balancer, outlier detector and
    /// circuit breaker of the service's `TrafficPolicy`.
    pub(crate) fn new(
        service: ServiceRef,
        port: u16,
        endpoints: Vec<SocketAddr>,
        policy: Option<&ServicePolicy>,
    ) -> Self {
        let lb = policy.map(|p| p.balancing.clone()).unwrap_or_default();
        Self {
            balancer: Balancer::new(endpoints.clone(), lb.algorithm),
            outlier: policy.and_then(|p| p.outlier.clone()).map(|c| {
                let d = Detector::new(c);
                d.update(&endpoints);
                d
            }),
            breaker: policy.and_then(|p| p.breaker).map(Breaker::new),
            hash_on: lb.hash,
            service,
            port,
            endpoints,
        }
    }
}

/// What the engine does for one service port with L7 policy.
pub struct Target {
    pub service: ServiceRef,
    pub port: u16,
    /// `appProtocol` of the port, when it names a protocol: detection is skipped.
    pub protocol: Option<Protocol>,
    pub routes: RouteTable,
    /// Where requests go when no route matches (or none is attached): the service itself.
    pub default_backend: BackendTarget,
    pub policy: Option<PolicyRuntime>,
    /// Backend pools by (service, service port): every backendRef of the routes, the mirror,
    /// and the service itself.
    pub pools: HashMap<(ServiceRef, u16), Arc<Pool>>,
    /// The JWTs requests may carry (`RequestAuthentication`s of the service).
    pub authn: super::authn::Authenticator,
    /// What was wrong with the service's routes and policies when this was built.
    problems: Vec<String>,
    source: L7Service,
}

/// A service's traffic policy with the state it keeps between requests.
pub struct PolicyRuntime {
    pub settings: ServicePolicy,
    pub budget: Option<RetryBudget>,
    pub bucket: Option<TokenBucket>,
}

impl Target {
    /// The authorization policies that target this service (checked per request).
    #[must_use]
    pub fn authz(&self) -> &[crate::state::access::AccessPolicy] {
        &self.source.authz
    }

    #[must_use]
    pub fn pool(&self, backend: &BackendTarget) -> Option<&Arc<Pool>> {
        let port = backend.port.unwrap_or(self.port);
        self.pools.get(&(backend.service.clone(), port))
    }
}

/// The engine's whole configuration at one moment.
#[derive(Default)]
pub struct Snapshot {
    /// L7 services by the address clients connect to (VIP and port).
    pub targets: HashMap<SocketAddrV4, Arc<Target>>,
    /// Every service by VIP and port, for connections whose service lost its L7 policy.
    pub plain: HashMap<SocketAddrV4, Arc<Pool>>,
    /// Workload id → (namespace, name), for metric labels.
    pub workloads: Arc<HashMap<WorkloadId, (String, String)>>,
    /// Meshed pods and the authorization matrix, for the tunnel.
    pub mesh: MeshView,
    pub trust_domain: crate::identity::TrustDomain,
    pub problems: Vec<String>,
    /// Ready endpoints of every Service port by `name.namespace:port`: the agent reaches
    /// cluster services (the controller's certificate service) without cluster DNS, which a
    /// host-network agent may not have (or not yet).
    pub service_endpoints: HashMap<String, Vec<SocketAddrV4>>,
}

impl Snapshot {
    /// The endpoints of `host:port` when `host` names a Service (`name.namespace.svc`, with or
    /// without the cluster suffix, or `name.namespace`); empty otherwise.
    #[must_use]
    pub fn resolve_service(&self, addr: &str) -> Vec<SocketAddrV4> {
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Vec::new();
        };
        let host = host.strip_suffix(".cluster.local").unwrap_or(host);
        let host = host.strip_suffix(".svc").unwrap_or(host);
        self.service_endpoints
            .get(&format!("{host}:{port}"))
            .cloned()
            .unwrap_or_default()
    }
}

/// A meshed pod as the tunnel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPeer {
    pub workload: WorkloadId,
    /// `namespace/name`.
    pub key: String,
    pub identity: SpiffeId,
    /// On this node.
    pub local: bool,
    /// The address of its node (where that node's tunnel listens), for remote pods.
    pub node_addr: Option<Ipv4Addr>,
    /// mTLS mode STRICT: reached only through the tunnel, never in plaintext.
    pub strict: bool,
    /// Pod labels (authorization rules may select sources by them).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Meshed pods by address, id and name, and the policy matrix the kernel also has.
#[derive(Debug, Default)]
pub struct MeshView {
    peers: Arc<Peers>,
    /// This node's sources (as the kernel's map) and other nodes' sources to this node's pods.
    policy: Arc<BTreeMap<PolicyKey, PolicyValue>>,
    inbound: Arc<BTreeMap<PolicyKey, PolicyValue>>,
}

/// The meshed pods, from one list of workloads and the node addresses: kept by the next
/// snapshot while those are the same.
#[derive(Debug, Default)]
struct Peers {
    from: Arc<[crate::state::Workload]>,
    nodes: BTreeMap<String, crate::state::NodeInfo>,
    by_ip: HashMap<Ipv4Addr, MeshPeer>,
    by_key: HashMap<String, Ipv4Addr>,
    by_id: HashMap<WorkloadId, Ipv4Addr>,
    /// Every workload's (namespace, name), for metric labels.
    names: Arc<HashMap<WorkloadId, (String, String)>>,
}

impl Peers {
    fn build(node: &NodeState) -> Self {
        let mut peers = Self {
            from: Arc::clone(&node.workloads),
            nodes: node.nodes.clone(),
            names: Arc::new(
                node.workloads
                    .iter()
                    .map(|w| (w.id, (w.namespace.clone(), w.name.clone())))
                    .collect(),
            ),
            ..Self::default()
        };
        for w in node.workloads.iter().filter(|w| w.meshed) {
            let peer = MeshPeer {
                workload: w.id,
                key: w.key(),
                identity: w.identity.clone(),
                local: w.local,
                node_addr: node.nodes.get(&w.node).and_then(|n| n.address),
                strict: w.strict(),
                labels: w.labels.clone(),
            };
            let Some(ip) = w.ip else { continue };
            peers.by_key.insert(peer.key.clone(), ip);
            peers.by_id.insert(w.id, ip);
            peers.by_ip.insert(ip, peer);
        }
        peers
    }
}

impl MeshView {
    /// The view of `node`, taking the pods from `previous` when they are the same.
    fn build(node: &NodeState, previous: Option<&Self>) -> Self {
        let peers = match previous.map(|p| &p.peers) {
            Some(p) if Arc::ptr_eq(&p.from, &node.workloads) && p.nodes == node.nodes => {
                Arc::clone(p)
            }
            _ => Arc::new(Peers::build(node)),
        };
        Self {
            peers,
            policy: Arc::clone(&node.policy),
            inbound: Arc::clone(&node.inbound_policy),
        }
    }

    /// A meshed pod of this node.
    #[must_use]
    pub fn local(&self, ip: Ipv4Addr) -> Option<&MeshPeer> {
        self.peers.by_ip.get(&ip).filter(|p| p.local)
    }

    /// The identities of this node's meshed pods (the SVIDs the agent must hold).
    #[must_use]
    pub fn local_identities(&self) -> std::collections::HashSet<SpiffeId> {
        self.peers
            .by_ip
            .values()
            .filter(|p| p.local)
            .map(|p| p.identity.clone())
            .collect()
    }

    /// A meshed pod of another node.
    #[must_use]
    pub fn remote(&self, ip: Ipv4Addr) -> Option<&MeshPeer> {
        self.peers.by_ip.get(&ip).filter(|p| !p.local)
    }

    /// The address of the meshed pod `namespace/name`.
    #[must_use]
    pub fn ip_of(&self, key: &str) -> Option<Ipv4Addr> {
        self.peers.by_key.get(key).copied()
    }

    #[must_use]
    pub fn by_key(&self, key: &str) -> Option<&MeshPeer> {
        self.peers.by_ip.get(self.peers.by_key.get(key)?)
    }

    /// The meshed pod at `ip`, on this node or another.
    #[must_use]
    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<&MeshPeer> {
        self.peers.by_ip.get(&ip)
    }

    #[must_use]
    pub fn by_id(&self, id: WorkloadId) -> Option<&MeshPeer> {
        self.peers.by_ip.get(self.peers.by_id.get(&id)?)
    }

    /// The kernel's decision for (source, destination, port), evaluated the same way: exact
    /// port, then any port, then the mesh default (allow): `FAST`, `DENY` or `AUDIT` (allowed;
    /// a dry-run policy would deny).
    #[must_use]
    pub fn verdict(&self, src: WorkloadId, dst: WorkloadId, port: u16) -> u8 {
        let key = |port| PolicyKey {
            src_workload: src.get(),
            dst_workload: dst.get(),
            dst_port_host: port,
            _pad: 0,
        };
        let get = |k| self.policy.get(&k).or_else(|| self.inbound.get(&k));
        get(key(port))
            .or_else(|| get(key(0)))
            .map_or(mesh_common::verdict::FAST, |p| p.verdict)
    }
}

impl Snapshot {
    /// Builds the snapshot for `node`, reusing what `previous` already has when unchanged.
    #[must_use]
    pub fn build(node: &NodeState, previous: Option<&Self>) -> Self {
        let mut endpoints: HashMap<(ServiceRef, u16), (Ipv4Addr, Vec<SocketAddr>)> = HashMap::new();
        for s in &node.services {
            let eps = s
                .backends
                .iter()
                .map(|(_, ip, port)| SocketAddr::from((*ip, *port)))
                .collect();
            endpoints.insert(
                (
                    ServiceRef {
                        namespace: s.namespace.clone(),
                        name: s.name.clone(),
                    },
                    s.port,
                ),
                (s.vip, eps),
            );
        }
        let mesh = MeshView::build(node, previous.map(|p| &p.mesh));
        let mut snap = Self {
            workloads: Arc::clone(&mesh.peers.names),
            mesh,
            trust_domain: node.trust_domain.clone(),
            service_endpoints: node
                .services
                .iter()
                .map(|s| {
                    (
                        format!("{}.{}:{}", s.name, s.namespace, s.port),
                        s.backends
                            .iter()
                            .map(|(_, ip, port)| SocketAddrV4::new(*ip, *port))
                            .collect(),
                    )
                })
                .collect(),
            ..Self::default()
        };
        for ((sref, port), (vip, eps)) in &endpoints {
            let key = SocketAddrV4::new(*vip, *port);
            let reuse = previous
                .and_then(|p| p.plain.get(&key))
                .filter(|p| p.endpoints == *eps && p.service == *sref)
                .cloned();
            snap.plain.insert(
                key,
                reuse
                    .unwrap_or_else(|| Arc::new(Pool::new(sref.clone(), *port, eps.clone(), None))),
            );
        }
        for l7 in &node.l7 {
            let Some(svc) = node.services.iter().find(|s| s.id == l7.service_id) else {
                continue;
            };
            let key = SocketAddrV4::new(svc.vip, svc.port);
            let old = previous.and_then(|p| p.targets.get(&key));
            let target = match old {
                Some(t) if same_inputs(&t.source, l7) && pools_current(t, &endpoints) => t.clone(),
                _ => Arc::new(build_target(l7, &endpoints)),
            };
            snap.problems.extend(target.problems.iter().cloned());
            snap.targets.insert(key, target);
        }
        snap
    }
}

fn same_inputs(a: &L7Service, b: &L7Service) -> bool {
    a.inputs == b.inputs
}

fn pools_current(
    t: &Target,
    endpoints: &HashMap<(ServiceRef, u16), (Ipv4Addr, Vec<SocketAddr>)>,
) -> bool {
    t.pools.iter().all(|(k, pool)| {
        endpoints
            .get(k)
            .is_some_and(|(_, eps)| *eps == pool.endpoints)
    })
}

fn build_target(
    l7: &L7Service,
    endpoints: &HashMap<(ServiceRef, u16), (Ipv4Addr, Vec<SocketAddr>)>,
) -> Target {
    let service = ServiceRef {
        namespace: l7.namespace.clone(),
        name: l7.name.clone(),
    };
    let mut problems = Vec::new();
    let policy = l7.policy.as_ref();
    let default_backend = BackendTarget {
        service: service.clone(),
        port: Some(l7.port),
        weight: 1,
    };
    let mut wanted: Vec<BackendTarget> = vec![default_backend.clone()];
    wanted.extend(l7.routes.backends().cloned());
    if let Some(m) = policy.and_then(|p| p.mirror.as_ref()) {
        wanted.push(BackendTarget {
            service: m.service.clone(),
            port: Some(m.port),
            weight: 1,
        });
    }
    let mut pools = HashMap::new();
    for b in wanted {
        let port = b.port.unwrap_or(l7.port);
        let key = (b.service.clone(), port);
        if pools.contains_key(&key) {
            continue;
        }
        let eps = if let Some((_, eps)) = endpoints.get(&key) {
            eps.clone()
        } else {
            problems.push(format!(
                "service {}/{}:{}: backend {}/{}:{port} does not exist; requests routed to it get 500",
                l7.namespace, l7.name, l7.port, b.service.namespace, b.service.name
            ));
            continue;
        };
        pools.insert(
            key,
            Arc::new(Pool::new(b.service.clone(), port, eps, policy)),
        );
    }
    let policy = policy.map(|p| PolicyRuntime {
        budget: p
            .retries
            .as_ref()
            .map(|r| RetryBudget::new(r.budget.ratio, r.budget.min_per_second, r.budget.window)),
        bucket: p
            .rate_limit
            .as_ref()
            .map(|rl| TokenBucket::new(rl.requests_per_second, rl.burst)),
        settings: p.clone(),
    });
    let protocol = l7
        .app_protocol
        .as_deref()
        .and_then(Protocol::from_app_protocol);
    let (authn, mut authn_problems) = super::authn::Authenticator::new(&l7.authn);
    problems.append(&mut authn_problems);
    Target {
        service,
        port: l7.port,
        protocol,
        routes: l7.routes.clone(),
        default_backend,
        policy,
        pools,
        authn,
        problems,
        source: l7.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_resolve_by_name_with_or_without_the_cluster_suffix() {
        let pods = vec![
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 5), 15012),
            SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, 5), 15012),
        ];
        let snap = Snapshot {
            service_endpoints: [("weft-controller.weft-system:15012".to_owned(), pods.clone())]
                .into(),
            ..Snapshot::default()
        };
        for addr in [
            "weft-controller.weft-system.svc:15012",
            "weft-controller.weft-system.svc.cluster.local:15012",
            "weft-controller.weft-system:15012",
        ] {
            assert_eq!(snap.resolve_service(addr), pods, "{addr}");
        }
        for other in [
            "weft-controller.weft-system.svc:443",
            "198.18.1.5:15012",
            "no-port",
        ] {
            assert!(snap.resolve_service(other).is_empty(), "{other}");
        }
    }
}
