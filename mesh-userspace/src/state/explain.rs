//! `weft explain`: what the mesh does with a connection from a pod to a service or pod, decided
//! the way the kernel programs and the engine decide it (connect-time verdict, redirect, socket
//! fast path, tunnel), from the node's model and the datapath's live facts.
use std::net::Ipv4Addr;

use mesh_common::verdict;
use serde::{Deserialize, Serialize};

use super::{NodeState, PolicyKey, ServicePort, Workload, WorkloadId};

/// What the datapath is doing now, beside the model (the agent knows; a test states it).
#[derive(Debug, Clone, Copy)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "four independent facts of the running datapath"
)]
pub struct Facts {
    /// The socket fast path is on (mesh configuration, kill switch, host memory valve).
    pub fast_path: bool,
    /// The kernel passed the socket self-test (workloads on `Auto` use the socket fast path).
    pub socket_redirect_exact: bool,
    /// The L7 engine is up (its heartbeat is fresh).
    pub engine: bool,
    /// The mTLS tunnel is on (the agent has a CA and a tunnel port).
    pub tunnel: bool,
}

/// The answer for one connection: where it goes and what decides each step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explanation {
    pub source: String,
    pub source_identity: Option<String>,
    /// What the application connects to, as given.
    pub destination: String,
    pub service: Option<ServiceFacts>,
    /// One entry per backend the kernel may pick (one for a pod address).
    pub paths: Vec<PathVerdict>,
    /// The Weft objects and routes named above (the service's and the deciding rules'), with
    /// the status the controller gives them.
    #[serde(default)]
    pub objects: Vec<ObjectState>,
}

/// An object's verdict, as its status conditions say it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectState {
    /// `Kind namespace/name`.
    pub object: String,
    /// For a route: the Service parent it was judged at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// `Programmed` (in effect), `Unresolved` (accepted, a reference does not resolve) or
    /// `NotAccepted`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ObjectState {
    #[must_use]
    pub fn of(f: &super::validate::Finding) -> Self {
        Self {
            object: f.object(),
            parent: f.parent.clone(),
            state: f.verdict.state().name().into(),
            reason: f.verdict.problem().map(|(r, m)| format!("{r}: {m}")),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceFacts {
    pub name: String,
    pub address: String,
    /// L7 policy: connections go to the engine.
    pub l7: bool,
    /// While the engine is down: refused (`closed`) or straight to a backend (`open`).
    pub failure_mode: String,
    pub routes: Vec<String>,
    pub traffic_policy: Option<String>,
    pub authorization: Vec<String>,
    pub authentication: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathVerdict {
    /// `namespace/pod ip:port`, or the address when it is no meshed pod.
    pub backend: String,
    pub node: Option<String>,
    /// `FAST`, `DENY`, `L7`, `TUNNEL` or `PASS`, as the flow table would show it.
    pub verdict: String,
    /// The policy rule or default that decided the connect-time verdict.
    pub decided_by: String,
    /// How the bytes travel.
    pub path: String,
    /// Encryption on the way.
    pub mtls: String,
}

/// Explains a connection from pod `source` (`namespace/name`) to `destination`
/// (`namespace/service:port`, `service.namespace:port`, `namespace/pod:port` or `ip:port`; the
/// port may be left out for a service with one port).
///
/// # Errors
/// A message naming what was not found.
pub fn explain(
    node: &NodeState,
    source: &str,
    destination: &str,
    facts: Facts,
) -> Result<Explanation, String> {
    let src = node
        .workloads
        .iter()
        .find(|w| w.key() == source)
        .ok_or_else(|| format!("no pod {source} (give namespace/name)"))?;
    let (service, targets) = resolve(node, destination)?;
    let l7 = service.and_then(|s| node.l7.iter().find(|l| l.service_id == s.id));
    let service_facts = service.map(|s| ServiceFacts {
        name: format!("{}/{}", s.namespace, s.name),
        address: format!("{}:{}", s.vip, s.port),
        l7: s.l7,
        failure_mode: if s.l7_fail_closed { "closed" } else { "open" }.into(),
        routes: l7.map(|l| l.routes.routes().to_vec()).unwrap_or_default(),
        traffic_policy: l7.and_then(|l| l.policy.as_ref()).map(|p| p.name.clone()),
        authorization: l7
            .map(|l| l.authz.iter().map(|a| a.name.clone()).collect())
            .unwrap_or_default(),
        authentication: l7
            .map(|l| {
                l.authn
                    .iter()
                    .map(|j| format!("{} {}", j.policy, j.issuer))
                    .collect()
            })
            .unwrap_or_default(),
    });
    if targets.is_empty() {
        return Err(format!(
            "{destination} has no backend: connect() fails as without the mesh (ENETUNREACH)"
        ));
    }
    let paths: Vec<PathVerdict> = targets
        .iter()
        .map(|(ip, port)| path(node, src, service, *ip, *port, facts))
        .collect();
    let objects = objects(node, service_facts.as_ref(), &paths);
    Ok(Explanation {
        source: src.key(),
        source_identity: src.meshed.then(|| src.identity.to_string()),
        destination: destination.to_owned(),
        service: service_facts,
        paths,
        objects,
    })
}

/// The status of every object the explanation names: the service's traffic policy,
/// authorization and authentication, the routes whose parent is the service, and the policies
/// named as deciding a connect verdict.
fn objects(
    node: &NodeState,
    service: Option<&ServiceFacts>,
    paths: &[PathVerdict],
) -> Vec<ObjectState> {
    let mut named: Vec<String> = Vec::new();
    if let Some(s) = service {
        named.extend(
            s.traffic_policy
                .iter()
                .map(|p| format!("TrafficPolicy {p}")),
        );
        named.extend(
            s.authorization
                .iter()
                .map(|p| format!("AuthorizationPolicy {p}")),
        );
        named.extend(s.authentication.iter().filter_map(|a| {
            let policy = a.split_whitespace().next()?;
            Some(format!("RequestAuthentication {policy}"))
        }));
    }
    // Rule texts name their policy `namespace/name`: a whole name, not a prefix of a longer one.
    let in_rule = |name: &str| {
        paths.iter().any(|p| {
            p.decided_by.match_indices(name).any(|(at, _)| {
                let before = p.decided_by[..at].chars().next_back();
                let after = p.decided_by[at + name.len()..].chars().next();
                let part = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '/');
                !before.is_some_and(part) && !after.is_some_and(part)
            })
        })
    };
    let mentioned = |f: &super::validate::Finding| {
        named.contains(&f.object())
            || (f.kind == "AuthorizationPolicy"
                && f.namespace
                    .as_ref()
                    .is_some_and(|ns| in_rule(&format!("{ns}/{}", f.name))))
    };
    let is_route_of_service = |f: &super::validate::Finding| {
        service.is_some_and(|s| {
            f.parent.as_deref().is_some_and(|p| {
                p == s.name
                    || p.strip_prefix(s.name.as_str())
                        .is_some_and(|r| r.starts_with(':'))
            })
        })
    };
    let mut out: Vec<ObjectState> = node
        .findings
        .iter()
        .filter(|f| is_route_of_service(f) || (f.parent.is_none() && mentioned(f)))
        .map(ObjectState::of)
        .collect();
    out.dedup();
    out
}

/// The service (if any) and the pod addresses a destination reaches.
type Resolved<'n> = (Option<&'n ServicePort>, Vec<(Ipv4Addr, u16)>);

/// [`Resolved`] for `destination`.
fn resolve<'n>(node: &'n NodeState, destination: &str) -> Result<Resolved<'n>, String> {
    let (name, port) = match destination.rsplit_once(':') {
        Some((name, port)) => (
            name,
            Some(
                port.parse::<u16>()
                    .map_err(|_| format!("{destination}: {port:?} is not a port"))?,
            ),
        ),
        None => (destination, None),
    };
    let service_ports: Vec<&ServicePort> = if let Ok(ip) = name.parse::<Ipv4Addr>() {
        node.services.iter().filter(|s| s.vip == ip).collect()
    } else {
        let (ns, svc) = match name.split_once('/') {
            Some((ns, svc)) => (ns, svc),
            None => match name.split_once('.') {
                Some((svc, ns)) => (ns, svc),
                None => ("default", name),
            },
        };
        node.services
            .iter()
            .filter(|s| s.namespace == ns && s.name == svc)
            .collect()
    };
    let chosen: Vec<&ServicePort> = service_ports
        .iter()
        .copied()
        .filter(|s| port.is_none_or(|p| p == s.port))
        .collect();
    if let [one] = chosen.as_slice() {
        return Ok((
            Some(*one),
            one.backends.iter().map(|(_, ip, p)| (*ip, *p)).collect(),
        ));
    }
    if chosen.len() > 1 {
        return Err(format!("{name} has several ports: give one"));
    }
    // A pod, by address or by name.
    let pod_port = port.filter(|_| {
        name.parse::<Ipv4Addr>().is_ok() || node.workloads.iter().any(|w| w.key() == name)
    });
    match pod_port {
        Some(port) => {
            if let Ok(ip) = name.parse::<Ipv4Addr>() {
                return Ok((None, vec![(ip, port)]));
            }
            let pod = node
                .workloads
                .iter()
                .find(|w| w.key() == name)
                .ok_or_else(|| format!("no service or pod {name}"))?;
            let ip = pod
                .ip
                .ok_or_else(|| format!("pod {name} has no address yet"))?;
            Ok((None, vec![(ip, port)]))
        }
        None if !service_ports.is_empty() => Err(format!(
            "{name} has no port {}: it has {}",
            port.map_or_else(String::new, |p| p.to_string()),
            service_ports
                .iter()
                .map(|s| s.port.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None if port.is_none() => Err(format!("{destination}: give a port")),
        None => Err(format!("no service or pod {name}")),
    }
}

/// One backend: the connect-time verdict, then the path (in the order `connect4` decides).
fn path(
    node: &NodeState,
    src: &Workload,
    service: Option<&ServicePort>,
    ip: Ipv4Addr,
    port: u16,
    facts: Facts,
) -> PathVerdict {
    let dst = node.workload_by_ip(ip);
    let backend = dst.map_or_else(
        || format!("{ip}:{port}"),
        |w| format!("{} {ip}:{port}", w.key()),
    );
    let answer = |verdict: &str, decided_by: String, path: &str, mtls: &str| PathVerdict {
        backend: backend.clone(),
        node: dst.map(|w| w.node.clone()),
        verdict: verdict.to_owned(),
        decided_by,
        path: path.to_owned(),
        mtls: mtls.to_owned(),
    };
    if !(src.meshed && src.local) {
        return answer(
            "PASS",
            "the source is not a meshed pod of this node".into(),
            "the kernel's TCP path, untouched",
            "none",
        );
    }
    // Which destinations the kernel knows (see `ebpf::desired`): this node's meshed pods, and
    // with the tunnel other nodes' meshed pods it can reach that do not disable mTLS.
    let remote = dst.filter(|w| {
        w.meshed
            && !w.local
            && facts.tunnel
            && node.nodes.get(&w.node).and_then(|n| n.address).is_some()
            && !w.mtls_disabled()
    });
    let local = dst.filter(|w| w.meshed && w.local);
    let Some(dst) = local.or(remote) else {
        return answer(
            "PASS",
            "the destination is outside the mesh".into(),
            "the kernel's TCP path (no policy applies)",
            "none",
        );
    };
    let (connect_verdict, decided_by) = decide(node, src.id, dst.id, port);
    if connect_verdict == verdict::DENY {
        return answer("DENY", decided_by, "refused at connect(): EPERM", "none");
    }
    let decided_by = if connect_verdict == verdict::AUDIT {
        format!("{decided_by}; allowed: the policy is a dry run (the attempt is recorded)")
    } else {
        decided_by
    };
    let is_remote = !dst.local;
    if let Some((verdict, by, path, mtls)) = engine_leg(dst, service, facts) {
        return answer(verdict, by.unwrap_or(decided_by), &path, mtls);
    }
    let socket_fast = facts.fast_path
        && !is_remote
        && src.socket_fast_path_allowed(facts.socket_redirect_exact)
        && dst.socket_fast_path_allowed(facts.socket_redirect_exact);
    let path = if is_remote {
        "the kernel's TCP path, in plaintext (the engine is down; the destination is PERMISSIVE)"
    } else if socket_fast {
        "the socket fast path: socket to socket in the kernel (sk_msg redirect)"
    } else {
        "the kernel's TCP path (the socket fast path is off for this pair)"
    };
    let mtls = if is_remote {
        "none: plaintext to another node"
    } else {
        "none (same node)"
    };
    answer("FAST", decided_by, path, mtls)
}

/// Where a connection the kernel sends to the engine (an L7 service, another node's pod) goes:
/// the engine, or while it is down its failure mode. `None`: the kernel keeps it (FAST).
/// Returns the verdict, what decided it when not the policy, the path and the encryption.
fn engine_leg(
    dst: &Workload,
    service: Option<&ServicePort>,
    facts: Facts,
) -> Option<(&'static str, Option<String>, String, &'static str)> {
    let is_remote = !dst.local;
    let l7 = service.is_some_and(|s| s.l7);
    if !(l7 || is_remote) {
        return None;
    }
    let tunnel_mtls = if dst.strict() {
        "mTLS through the tunnel (the destination is STRICT)"
    } else {
        "mTLS through the tunnel (the destination is PERMISSIVE)"
    };
    if facts.engine {
        let mtls = if is_remote {
            tunnel_mtls
        } else {
            "none (same node)"
        };
        return Some(if l7 {
            (
                "L7",
                None,
                format!(
                    "to the node's L7 engine (routes, retries, authorization), then{} to {}",
                    if is_remote { " through the tunnel" } else { "" },
                    dst.key()
                ),
                mtls,
            )
        } else {
            (
                "TUNNEL",
                None,
                format!("to the node's engine, through the tunnel to {}", dst.node),
                mtls,
            )
        });
    }
    let refused = "refused at connect(): EPERM".to_owned();
    if l7 && service.is_some_and(|s| s.l7_fail_closed) {
        return Some((
            "DENY",
            Some("the L7 engine is down and the service's L7 policy fails closed".into()),
            refused,
            "none",
        ));
    }
    if is_remote && dst.strict() {
        return Some((
            "DENY",
            Some("the engine is down and the destination is a STRICT pod of another node".into()),
            refused,
            "none",
        ));
    }
    None
}

/// The connect-time policy verdict and what decided it: exact port, any port, the default.
fn decide(node: &NodeState, src: WorkloadId, dst: WorkloadId, port: u16) -> (u8, String) {
    let key = |port| PolicyKey {
        src_workload: src.get(),
        dst_workload: dst.get(),
        dst_port_host: port,
        _pad: 0,
    };
    match node
        .policy
        .get(&key(port))
        .or_else(|| node.policy.get(&key(0)))
    {
        Some(p) => (
            p.verdict,
            node.rule(super::RuleId(p.rule_id)).map_or_else(
                || format!("policy rule #{}", p.rule_id),
                |r| r.description.clone(),
            ),
        ),
        None => (
            verdict::FAST,
            "no policy selects the destination: mesh default (allow)".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::build_from_yaml;

    const OBJECTS: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop, labels: {app: a}}
spec: {nodeName: n1, serviceAccountName: a}
status: {podIP: 198.18.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: shop, labels: {app: b}}
spec: {nodeName: n1, serviceAccountName: b}
status: {podIP: 198.18.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: shop, labels: {app: c}}
spec: {nodeName: n1, serviceAccountName: c}
status: {podIP: 198.18.1.12}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: shop}
spec: {clusterIP: 198.19.0.11, selector: {app: b}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 198.19.0.12, selector: {app: b}, ports: [{port: 9090}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: b-from-a, namespace: shop}
spec:
  selector: {matchLabels: {app: b}}
  rules: [{from: [{source: {serviceAccounts: [a]}}]}]
";

    const UP: Facts = Facts {
        fast_path: true,
        socket_redirect_exact: true,
        engine: true,
        tunnel: false,
    };

    #[test]
    fn the_verdict_names_the_policy_that_decides_it() {
        let node = build_from_yaml(OBJECTS, "n1");
        let allowed = explain(&node, "shop/a", "shop/b:80", UP).expect("explained");
        let path = &allowed.paths[0];
        assert_eq!(path.backend, "shop/b 198.18.1.11:8080");
        assert_eq!(path.verdict, "FAST");
        assert!(path.decided_by.contains("b-from-a"), "{path:?}");
        assert!(path.path.contains("socket fast path"), "{path:?}");
        let refused = explain(&node, "shop/c", "b.shop", UP).expect("explained");
        assert_eq!(refused.paths[0].verdict, "DENY");
        assert!(
            refused.paths[0].decided_by.contains("b-from-a"),
            "{refused:?}"
        );
        // The deciding policy, with its status.
        assert_eq!(
            refused.objects,
            [ObjectState {
                object: "AuthorizationPolicy shop/b-from-a".into(),
                parent: None,
                state: "Programmed".into(),
                reason: None,
            }],
            "{refused:?}"
        );
        // By pod name or address: the same verdict.
        let by_pod = explain(&node, "shop/c", "shop/b:8080", UP).expect("explained");
        assert_eq!(by_pod.paths[0].verdict, "DENY");
        assert!(by_pod.service.is_none());
        let by_ip = explain(&node, "shop/a", "198.18.1.11:8080", UP).expect("explained");
        assert_eq!(by_ip.paths[0].verdict, "FAST");
        // The socket fast path off: still allowed, on the kernel's TCP path.
        let off = Facts {
            fast_path: false,
            ..UP
        };
        let slow = explain(&node, "shop/a", "shop/b", off).expect("explained");
        assert!(slow.paths[0].path.contains("kernel's TCP path"), "{slow:?}");
    }

    #[test]
    fn an_l7_service_goes_to_the_engine_or_fails_closed_without_it() {
        let yaml = format!(
            "{OBJECTS}---\napiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: b-get, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: b}}\n  \
             rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]\n"
        );
        let node = build_from_yaml(&yaml, "n1");
        let up = explain(&node, "shop/a", "shop/b:80", UP).expect("explained");
        let service = up.service.as_ref().expect("a service");
        assert!(
            service.l7 && service.failure_mode == "closed",
            "{service:?}"
        );
        assert_eq!(service.authorization, ["shop/b-get"]);
        assert_eq!(up.paths[0].verdict, "L7");
        let down = Facts {
            engine: false,
            ..UP
        };
        let refused = explain(&node, "shop/a", "shop/b:80", down).expect("explained");
        assert_eq!(refused.paths[0].verdict, "DENY");
        assert!(refused.paths[0].decided_by.contains("fails closed"));
    }

    #[test]
    fn unknown_names_get_a_clear_answer() {
        let node = build_from_yaml(OBJECTS, "n1");
        let err = explain(&node, "shop/x", "shop/b", UP).expect_err("no such pod");
        assert!(err.contains("no pod shop/x"), "{err}");
        let err = explain(&node, "shop/a", "shop/api:81", UP).expect_err("no such port");
        assert!(err.contains("has no port 81"), "{err}");
        let err = explain(&node, "shop/a", "shop/nope:1", UP).expect_err("no such name");
        assert!(err.contains("no service or pod shop/nope"), "{err}");
        let outside = explain(&node, "shop/a", "198.18.200.1:443", UP).expect("explained");
        assert_eq!(outside.paths[0].verdict, "PASS");
    }
}
