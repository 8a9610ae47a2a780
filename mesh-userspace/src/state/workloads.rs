//! Workloads: meshed pods with their identity, settings (namespace labels, pod annotations,
//! `MeshConfig` defaults) and nodes.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Pod;

use super::{NodeInfo, NodeState, Workload, WorkloadId, stable_id};
use crate::{
    api::{
        ObjectSet,
        objects::{INJECT_ANNOTATION, MtlsMode, SocketFastPath},
    },
    identity::{SpiffeId, TrustDomain},
};

/// Namespace labels `key` parsed as a setting, by namespace name; a bad value is a problem.
pub(super) fn namespace_settings<T: std::str::FromStr<Err = String>>(
    objects: &ObjectSet,
    key: &str,
    problems: &mut Vec<String>,
) -> BTreeMap<String, T> {
    let mut settings = BTreeMap::new();
    for n in &objects.namespaces {
        let (Some(name), Some(value)) = (
            n.metadata.name.as_deref(),
            n.metadata.labels.as_ref().and_then(|l| l.get(key)),
        ) else {
            continue;
        };
        match value.parse::<T>() {
            Ok(v) => {
                settings.insert(name.to_owned(), v);
            }
            Err(e) => problems.push(format!("namespace {name}: label {key}: {e}")),
        }
    }
    settings
}

/// A per-workload setting: the pod's annotation `key`, else its namespace's label, else the
/// mesh-wide `default`. A bad annotation is a problem and falls back to the namespace's value.
pub(super) fn pod_setting<T: std::str::FromStr<Err = String> + Copy>(
    pod: &Pod,
    w: &Workload,
    key: &str,
    namespaces: &BTreeMap<String, T>,
    default: T,
    problems: &mut Vec<String>,
) -> T {
    let inherited = namespaces.get(&w.namespace).copied().unwrap_or(default);
    let Some(value) = pod.metadata.annotations.as_ref().and_then(|a| a.get(key)) else {
        return inherited;
    };
    value.parse().unwrap_or_else(|e| {
        problems.push(format!("pod {}: annotation {key}: {e}", w.key()));
        inherited
    })
}

/// Applies the mesh configuration (the object named "default", or the only one) to `state`;
/// returns the mesh-wide mTLS mode and socket fast path setting.
pub(super) fn mesh_settings(
    objects: &ObjectSet,
    state: &mut NodeState,
    problems: &mut Vec<String>,
) -> (MtlsMode, SocketFastPath) {
    // Mesh config: the object named "default" (or the only one).
    let mesh = match objects.mesh_configs.as_slice() {
        [] => None,
        [one] => Some(&one.spec),
        many => {
            let chosen = many
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some("default"));
            if chosen.is_none() {
                problems.push(
                    "several MeshConfig objects and none named \"default\": using defaults".into(),
                );
            }
            chosen.map(|c| &c.spec)
        }
    };
    let mut mtls_default = MtlsMode::default();
    let mut socket_default = SocketFastPath::default();
    if let Some(spec) = mesh {
        state.fast_path = spec.fast_path;
        mtls_default = spec.mtls_mode.unwrap_or_default();
        socket_default = spec.socket_fast_path.unwrap_or_default();
        if let Some(td) = &spec.trust_domain {
            match TrustDomain::new(td) {
                Ok(td) => state.trust_domain = td,
                Err(e) => problems.push(format!("MeshConfig: {e}; using cluster.local")),
            }
        }
    }
    (mtls_default, socket_default)
}

pub(super) fn workload_of(
    pod: &Pod,
    node: &str,
    node_cgroup: &Path,
    opted_out_ns: &BTreeSet<String>,
    taken: &mut BTreeSet<u32>,
) -> Result<Workload, String> {
    let name = pod
        .metadata
        .name
        .clone()
        .ok_or("a Pod without metadata.name was ignored")?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let key = format!("{namespace}/{name}");
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| format!("pod {key}: no spec"))?;
    // Without an address yet (kubelet reports it after the sandbox is up) the pod is a source
    // already; it becomes a destination once its address is known.
    let ip = match pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()) {
        None => None,
        Some(text) => Some(text.parse::<Ipv4Addr>().map_err(|_| {
            format!(
                "pod {key}: status.podIP {text:?} is not an IPv4 address (IPv6 is not supported yet)"
            )
        })?),
    };
    let pod_node = spec.node_name.clone().unwrap_or_default();
    let local = pod_node == node;
    let disabled = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECT_ANNOTATION))
        .is_some_and(|v| v == "disabled");
    let id = stable_id(&key, taken);
    taken.insert(id);
    Ok(Workload {
        id: WorkloadId(id),
        cgroup: local.then(|| node_cgroup.join(format!("{namespace}_{name}"))),
        uid: pod.metadata.uid.clone(),
        meshed: !disabled && !opted_out_ns.contains(&namespace),
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        mtls: MtlsMode::default(),
        socket_fast_path: SocketFastPath::default(),
        identity: SpiffeId::workload(&TrustDomain::default(), &namespace, "default"),
        namespace,
        name,
        ip,
        node: pod_node,
        local,
    })
}

/// Names of the namespaces whose label `key` is `value`.
pub(super) fn labelled_namespaces(objects: &ObjectSet, key: &str, value: &str) -> BTreeSet<String> {
    objects
        .namespaces
        .iter()
        .filter(|n| {
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(key))
                .is_some_and(|v| v == value)
        })
        .filter_map(|n| n.metadata.name.clone())
        .collect()
}

/// Nodes by name: `InternalIP` and IPv4 `spec.podCIDR`.
pub(super) fn nodes(objects: &ObjectSet, problems: &mut Vec<String>) -> BTreeMap<String, NodeInfo> {
    let mut out = BTreeMap::new();
    for n in &objects.nodes {
        let Some(name) = n.metadata.name.clone() else {
            continue;
        };
        let address = n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
            .and_then(|a| a.address.parse().ok());
        let pod_cidr = n
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.as_deref())
            .and_then(|c| {
                let parsed = parse_cidr(c);
                if parsed.is_none() {
                    problems.push(format!(
                        "node {name}: spec.podCIDR {c:?} is not an IPv4 CIDR; STRICT inbound is \
                         not enforced on it"
                    ));
                }
                parsed
            });
        out.insert(name, NodeInfo { address, pod_cidr });
    }
    out
}

pub(super) fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = text.split_once('/')?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
    Some((ip.parse().ok()?, len))
}
/// Whether pod `namespace/name` is known and has no address yet.
#[must_use]
pub fn pod_lacks_address(objects: &ObjectSet, namespace: &str, name: &str) -> bool {
    objects.pods.iter().any(|p| {
        p.metadata.namespace.as_deref().unwrap_or("default") == namespace
            && p.metadata.name.as_deref() == Some(name)
            && p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_none()
    })
}

/// `objects` with the addresses the CNI plugin reported filled into pods that lack one.
#[must_use]
pub fn with_addresses<'a>(
    objects: &'a ObjectSet,
    addresses: &BTreeMap<(String, String), std::net::Ipv4Addr>,
) -> std::borrow::Cow<'a, ObjectSet> {
    if addresses.is_empty() {
        return std::borrow::Cow::Borrowed(objects);
    }
    let mut out = objects.clone();
    for shared in &mut out.pods {
        let pod = &*shared;
        let key = (
            pod.metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        let lacks_ip = pod.status.as_ref().is_none_or(|s| s.pod_ip.is_none());
        if let Some(ip) = addresses.get(&key).filter(|_| lacks_ip) {
            // Only the pods given an address are copied; the rest stay shared.
            let status = Arc::make_mut(shared)
                .status
                .get_or_insert_with(Default::default);
            status.pod_ip = Some(ip.to_string());
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_addresses_fill_only_pods_without_one() {
        let mut set = ObjectSet::default();
        set.add_yaml(
            "test",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: new, namespace: shop}\nspec: {nodeName: n1}\n\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {name: old, namespace: shop}\nspec: {nodeName: n1}\n\
             status: {podIP: 198.18.1.2}\n",
        );
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        assert!(pod_lacks_address(&set, "shop", "new"));
        assert!(!pod_lacks_address(&set, "shop", "old"));
        assert!(!pod_lacks_address(&set, "shop", "unknown"));
        let reported: BTreeMap<_, _> = [
            (
                ("shop".to_owned(), "new".to_owned()),
                Ipv4Addr::new(198, 18, 1, 3),
            ),
            (
                ("shop".to_owned(), "old".to_owned()),
                Ipv4Addr::new(198, 18, 1, 9),
            ),
        ]
        .into();
        let filled = with_addresses(&set, &reported);
        let ip = |name: &str| {
            filled
                .pods
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(name))
                .and_then(|p| p.status.as_ref()?.pod_ip.clone())
        };
        assert_eq!(ip("new").as_deref(), Some("198.18.1.3"));
        assert_eq!(
            ip("old").as_deref(),
            Some("198.18.1.2"),
            "kubelet's address wins"
        );
    }
}
