//! What the kernel maps should hold for a node: a pure function of the node's model and a few
//! facts about the agent, so every entry is unit-testable without privileges. The syncer
//! ([`super::Datapath::apply`]) then writes only the difference.
use std::net::{Ipv4Addr, SocketAddrV4};

use mesh_common::{
    Backend, BackendKey, CgroupIdentity, ENGINE_WORKLOAD, Endpoint, ServiceKey, ServiceValue,
    endpoint_flags, service_flags,
};

use super::Desired;
use crate::state::{NodeState, Workload};

/// What the maps depend on besides the objects.
#[derive(Debug, Clone, Copy, Default)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent facts about the agent and its kernel"
)]
pub struct Facts {
    /// The L7 engine's listener, when it runs.
    pub engine: Option<SocketAddrV4>,
    /// The engine's own sockets are meshed (`sock_ops` on its cgroup).
    pub engine_meshed: bool,
    /// The mTLS tunnel runs (an identity and the engine): pods of other nodes are reachable.
    pub tunnel: bool,
    /// The socket self-test passed: workloads on `Auto` use the socket fast path.
    pub socket_redirect_exact: bool,
    /// Ask sockets to leave the fast path (host TCP memory high).
    pub shed: bool,
    /// Someone watches live events: the programs write them.
    pub events: bool,
}

/// The maps for `node`. `cgroup_ids` lists the cgroups of a local meshed pod (its own and its
/// containers'); a pod whose cgroup is not there yet has none and joins on a later pass.
#[must_use]
pub fn desired(
    node: &NodeState,
    facts: Facts,
    cgroup_ids: impl Fn(&Workload) -> Vec<u64>,
) -> Desired {
    let local_net = node.local_pod_cidr().filter(|_| facts.tunnel);
    let mut want = Desired {
        fast_path: node.fast_path,
        engine: facts.engine,
        local_net,
        shed: facts.shed,
        events: facts.events,
        ..Desired::default()
    };
    let maps = &mut want.maps;
    // With sock_ops on its cgroup, the engine is a meshed endpoint: its legs to local pods are
    // fast-path eligible like any pod-to-pod connection.
    if let (Some(addr), true) = (facts.engine, facts.engine_meshed) {
        maps.endpoints.insert(
            be(*addr.ip()),
            Endpoint {
                workload_id: ENGINE_WORKLOAD,
                // The engine's own sockets read only through its event loop.
                flags: endpoint_flags::LOCAL | endpoint_flags::SOCKET_FAST,
            },
        );
    }
    // With the tunnel on, meshed pods of other nodes are endpoints too: meshed clients reach
    // them through the engine (REMOTE), and never in plaintext when they are STRICT.
    for w in node.workloads.iter().filter(|w| w.meshed && !w.local) {
        let reachable = node.nodes.get(&w.node).and_then(|n| n.address).is_some();
        let Some(ip) = w.ip else { continue };
        if !facts.tunnel || !reachable || w.mtls_disabled() {
            continue;
        }
        let strict = if w.strict() {
            endpoint_flags::STRICT
        } else {
            0
        };
        maps.endpoints.insert(
            be(ip),
            Endpoint {
                workload_id: w.id.get(),
                flags: endpoint_flags::REMOTE | strict,
            },
        );
    }
    for w in node.workloads.iter().filter(|w| w.meshed && w.local) {
        // STRICT inbound needs the node's pod network, to tell this node's clients from others.
        // A pod whose address is not known yet is already a source: its cgroup has its
        // identity, so its first connections get its verdict.
        if let Some(ip) = w.ip {
            let strict = if w.strict() && local_net.is_some() {
                endpoint_flags::STRICT
            } else {
                0
            };
            let socket_fast = if w.socket_fast_path_allowed(facts.socket_redirect_exact) {
                endpoint_flags::SOCKET_FAST
            } else {
                0
            };
            maps.endpoints.insert(
                be(ip),
                Endpoint {
                    workload_id: w.id.get(),
                    flags: endpoint_flags::LOCAL | strict | socket_fast,
                },
            );
        }
        let identity = CgroupIdentity {
            workload_id: w.id.get(),
            flags: 0,
        };
        if let Some(cookie) = node.netns.get(&w.id) {
            maps.netns.insert(*cookie, identity);
        }
        for id in cgroup_ids(w) {
            maps.cgroups.insert(id, identity);
        }
    }
    services(maps, node, facts.engine.is_some());
    maps.policy = std::sync::Arc::clone(&node.policy);
    want
}

/// Service VIPs and their backends; L7 flags only when an engine runs to take the traffic.
fn services(maps: &mut super::MapContents, node: &NodeState, engine: bool) {
    for s in &node.services {
        let key = ServiceKey {
            vip_be: be(s.vip),
            port_be: s.port.to_be(),
            _pad: 0,
        };
        let flags = match (s.l7 && engine, s.l7_fail_closed) {
            (false, _) => 0,
            (true, false) => service_flags::L7,
            (true, true) => service_flags::L7 | service_flags::L7_FAIL_CLOSED,
        };
        maps.services.insert(
            key,
            ServiceValue {
                service_id: s.id.get(),
                backend_count: u32::try_from(s.backends.len()).unwrap_or(0),
                flags,
                _pad: 0,
            },
        );
        for (slot, (_, ip, port)) in s.backends.iter().enumerate() {
            maps.backends.insert(
                BackendKey {
                    service_id: s.id.get(),
                    slot: u32::try_from(slot).unwrap_or(u32::MAX),
                },
                Backend {
                    ip_be: be(*ip),
                    port_be: port.to_be(),
                    _pad: 0,
                },
            );
        }
    }
}

fn be(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBJECTS: &str = r"
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 198.18.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web}
status: {podIP: 198.18.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}, annotations: {weft.dev/mtls-mode: STRICT}}
spec: {nodeName: n2, serviceAccountName: db}
status: {podIP: 198.18.2.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 198.19.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-read, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  rules: [{to: [{operation: {methods: [GET]}}]}]
";

    fn node() -> NodeState {
        crate::state::build_from_yaml(OBJECTS, "n1")
    }

    fn endpoint(want: &Desired, ip: [u8; 4]) -> Option<Endpoint> {
        want.maps.endpoints.get(&be(Ipv4Addr::from(ip))).copied()
    }

    #[test]
    fn local_pods_remote_pods_and_the_engine_become_endpoints() {
        let node = node();
        let engine = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 15001);
        let facts = Facts {
            engine: Some(engine),
            engine_meshed: true,
            tunnel: true,
            socket_redirect_exact: true,
            shed: false,
            events: false,
        };
        let want = desired(&node, facts, |w| {
            if w.name == "web" { vec![7, 8] } else { vec![] }
        });
        let web = endpoint(&want, [198, 18, 1, 10]).expect("local pod");
        assert_eq!(
            web.flags,
            endpoint_flags::LOCAL | endpoint_flags::SOCKET_FAST
        );
        let db = endpoint(&want, [198, 18, 2, 10]).expect("remote pod with the tunnel on");
        assert_eq!(db.flags, endpoint_flags::REMOTE | endpoint_flags::STRICT);
        assert_eq!(
            endpoint(&want, [198, 18, 0, 1]).unwrap().workload_id,
            ENGINE_WORKLOAD
        );
        // Both cgroups of the pod carry its identity.
        let ids: Vec<u64> = want.maps.cgroups.keys().copied().collect();
        assert_eq!(ids, [7, 8]);
        assert!(
            want.maps
                .cgroups
                .values()
                .all(|c| c.workload_id == web.workload_id)
        );

        // Without the tunnel other nodes' pods are not endpoints; a failed socket self-test
        // keeps `Auto` pods off the socket fast path.
        let facts = Facts {
            tunnel: false,
            socket_redirect_exact: false,
            ..facts
        };
        let want = desired(&node, facts, |_| vec![]);
        assert_eq!(endpoint(&want, [198, 18, 2, 10]), None);
        assert_eq!(
            endpoint(&want, [198, 18, 1, 10]).unwrap().flags,
            endpoint_flags::LOCAL
        );
    }

    #[test]
    fn services_carry_their_backends_and_l7_flags_only_with_an_engine() {
        let node = node();
        let key = ServiceKey {
            vip_be: be(Ipv4Addr::new(198, 19, 0, 10)),
            port_be: 80u16.to_be(),
            _pad: 0,
        };
        let without = desired(&node, Facts::default(), |_| vec![]);
        let svc = without.maps.services[&key];
        assert_eq!((svc.flags, svc.backend_count), (0, 1));
        let backend = without.maps.backends[&BackendKey {
            service_id: svc.service_id,
            slot: 0,
        }];
        assert_eq!(
            (backend.ip_be, u16::from_be(backend.port_be)),
            (be(Ipv4Addr::new(198, 18, 1, 10)), 8080)
        );
        let facts = Facts {
            engine: Some(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 15001)),
            ..Facts::default()
        };
        let with = desired(&node, facts, |_| vec![]);
        // An L7 authorization policy: the service is L7 and fails closed while the engine is down.
        assert_eq!(
            with.maps.services[&key].flags,
            service_flags::L7 | service_flags::L7_FAIL_CLOSED
        );
    }
}
