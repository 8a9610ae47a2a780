//! The agent's typed configuration, built from flags (see `app`), served at `/config_dump`.
use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct AgentConfig {
    /// Node name; pods whose `spec.nodeName` equals it are this agent's.
    pub node_name: String,
    /// The node's cgroup v2 directory; the cgroup programs attach here and pod cgroups live
    /// below it as `<namespace>_<pod>`.
    pub cgroup_path: PathBuf,
    /// Per-node bpffs directory holding the pinned programs, links and maps.
    pub bpffs_dir: PathBuf,
    /// YAML objects: one file or a directory of `*.yaml`/`*.yml`/`*.json` files. Unused in
    /// Kubernetes mode.
    pub objects_path: PathBuf,
    /// Kubernetes mode: objects from an API server instead of `objects_path`.
    pub kube: Option<KubeMode>,
    /// Where pod cgroups are below `cgroup_path`.
    pub pod_cgroups: crate::cgroups::PodCgroups,
    /// Unix socket of the admin API (the CLI talks to it).
    pub admin_socket: PathBuf,
    /// Optional TCP listener for Prometheus scrapes (same endpoints as the socket).
    pub metrics_addr: Option<SocketAddr>,
    /// The chained CNI plugin that enrols pods before their containers run (Kubernetes mode).
    pub cni: Option<crate::cni::CniInstall>,
    /// Host-side pod interfaces get the TC programs; how they are recognised.
    pub pod_interfaces: crate::interfaces::PodInterfaces,
    /// How often the objects are re-read and the maps reconciled.
    #[serde(with = "millis")]
    pub sync_interval: Duration,
    /// How often the flows and counters are read from the kernel.
    #[serde(with = "millis")]
    pub stats_interval: Duration,
    /// On SIGTERM, how long the L7 engine may take to finish its connections (see
    /// `proxy::Engine::drain`). Below the pod's termination grace period.
    #[serde(with = "millis")]
    pub drain_timeout: Duration,
    /// Overrides the sockhash capacity (tests shrink it to exercise the map-full fallback).
    pub sockhash_capacity: Option<u32>,
    /// How much the eBPF programs log (fixed at load; see `ebpf::LogLevel`).
    #[serde(default)]
    pub ebpf_log: crate::ebpf::LogLevel,
    /// Connections the engine and the tunnel hold at once (before the file descriptor limit
    /// lowers it: see `proxy::admission`).
    pub max_connections: usize,
    /// The most one source (a client pod, a peer node, a tunnel client identity) may hold of
    /// that budget; `None`: half of it.
    pub max_connections_per_source: Option<usize>,
    /// How many closed flows `/flows` remembers.
    pub recent_flows: usize,
    /// The L7 engine's listener (an address of this node that pods can reach). Without it the
    /// engine is off and L7 services are reached directly.
    pub engine_addr: Option<SocketAddrV4>,
    /// Local mode: the agent's own cgroup, where `sock_ops` is attached too so the engine's
    /// connections to local pods take the fast path. Must be a cgroup this deployment owns.
    pub engine_sockops_cgroup: Option<PathBuf>,
    /// OTLP/HTTP collector (`http://host:4318`): the engine sends one span per request.
    #[serde(with = "opt_uri")]
    pub otlp_endpoint: Option<hyper::Uri>,
    /// Workload identity and the node-to-node tunnel; off without a CA.
    pub identity: Option<IdentityConfig>,
}

/// The agent's CA, trust bundle and tunnel listener.
#[derive(Debug, Clone, Serialize)]
pub struct IdentityConfig {
    pub issuer: IssuerConfig,
    /// PEM roots, re-read on change; default: the root of the CA's chain.
    pub trust_bundle: Option<PathBuf>,
    #[serde(with = "millis")]
    pub svid_ttl: Duration,
    pub tunnel_listen: std::net::SocketAddrV4,
}

/// Who signs the node's workload certificates.
#[derive(Debug, Clone, Serialize)]
pub enum IssuerConfig {
    /// A CA the agent holds.
    Local(crate::identity::CaFiles),
    /// The controller's certificate service.
    Remote(crate::identity::RemoteCa),
}

/// How the agent reaches the API server.
#[derive(Debug, Clone, Serialize)]
pub struct KubeMode {
    /// A kubeconfig file; without it the configuration is inferred (in-cluster service account,
    /// then `$KUBECONFIG` or `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// The agent's own pod (namespace, name): its `DaemonSet`'s deletion means "uninstall".
    pub own_pod: Option<(String, String)>,
}

mod opt_uri {
    use serde::Serializer;

    #[allow(clippy::ref_option, reason = "serde's `with` passes a reference")]
    pub fn serialize<S: Serializer>(u: &Option<hyper::Uri>, s: S) -> Result<S::Ok, S::Error> {
        match u {
            Some(u) => s.serialize_str(&u.to_string()),
            None => s.serialize_none(),
        }
    }
}

mod millis {
    use std::time::Duration;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}
