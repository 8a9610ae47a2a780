//! Services: their ports and the backends (pod addresses and target ports) behind each.
use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ServiceId, ServicePort, Workload, index::WorkloadIndex, stable_id};

/// Whether a pod is a Service endpoint, as Kubernetes' endpoints controller decides: not while
/// it terminates (`deletionTimestamp`), not once it has finished, not while its `Ready`
/// condition is False. A pod without conditions (local-mode files) is ready.
pub(super) fn serves_traffic(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    let finished = status
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| matches!(p, "Succeeded" | "Failed"));
    let not_ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "False"));
    pod.metadata.deletion_timestamp.is_none() && !finished && !not_ready
}

pub(super) fn service_ports(
    svc: &Service,
    pods: &HashMap<(&str, &str), &Pod>,
    workloads: &[Workload],
    index: &WorkloadIndex,
    taken: &mut BTreeSet<u32>,
) -> Result<Vec<ServicePort>, String> {
    let name = svc
        .metadata
        .name
        .clone()
        .ok_or("a Service without metadata.name was ignored")?;
    let namespace = svc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let spec = svc
        .spec
        .as_ref()
        .ok_or_else(|| format!("service {namespace}/{name}: no spec"))?;
    let Some(vip_text) = spec.cluster_ip.clone().filter(|ip| ip != "None") else {
        // Headless services are resolved by name, not a VIP: nothing to program.
        return Ok(Vec::new());
    };
    let vip: Ipv4Addr = vip_text.parse().map_err(|_| {
        format!("service {namespace}/{name}: spec.clusterIP {vip_text:?} is not an IPv4 address")
    })?;
    let Some(selector) = spec.selector.as_ref() else {
        return Ok(Vec::new()); // endpoints managed elsewhere; none in local mode
    };
    let first = selector
        .iter()
        .next()
        .map(|(k, v)| (k.as_str(), v.as_str()));
    let members: Vec<(&Workload, &Pod)> = index
        .candidates(&namespace, first)
        .iter()
        .map(|&i| &workloads[i])
        .filter(|w| selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        .filter_map(|w| {
            let pod = pods.get(&(w.namespace.as_str(), w.name.as_str()))?;
            Some((w, *pod))
        })
        .filter(|(_, pod)| serves_traffic(pod))
        .collect();
    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let svc_port = u16::try_from(port.port).map_err(|_| {
            format!(
                "service {namespace}/{name}: port {} out of range",
                port.port
            )
        })?;
        let mut backends = Vec::new();
        for (w, pod) in &members {
            if let (Some(ip), Some(target)) =
                (w.ip, target_port(port.target_port.as_ref(), svc_port, pod))
            {
                backends.push((w.id, ip, target));
            }
        }
        backends.sort();
        let key = format!("{namespace}/{name}:{svc_port}");
        let id = stable_id(&key, taken);
        taken.insert(id);
        out.push(ServicePort {
            id: ServiceId(id),
            namespace: namespace.clone(),
            name: name.clone(),
            port_name: port.name.clone(),
            vip,
            port: svc_port,
            backends,
            app_protocol: port.app_protocol.clone(),
            l7: false,
            l7_fail_closed: false,
        });
    }
    Ok(out)
}

/// targetPort: a number, a container port name, or (absent) the service port.
pub(super) fn target_port(target: Option<&IntOrString>, svc_port: u16, pod: &Pod) -> Option<u16> {
    match target {
        None => Some(svc_port),
        Some(IntOrString::Int(p)) => u16::try_from(*p).ok(),
        Some(IntOrString::String(named)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(named.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}
