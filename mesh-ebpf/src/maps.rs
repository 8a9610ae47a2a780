//! Every map of the datapath. Names are the static names (they must equal `mesh_common::map_names`,
//! checked by the agent's object layout test); all are pinned by name in the node's bpffs directory
//! so an agent restart adopts them and traffic never notices.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap, SockHash},
};
use mesh_common::{
    Backend, BackendKey, CgroupIdentity, ClientAddr, Config, ConnectInfo, DenyKey, DenyValue,
    Endpoint, FlowEntry, GlobalStats, IfStats, PairKey, PairStats, PolicyKey, PolicyValue,
    ServiceKey, ServiceValue, SockKey, capacity,
};

#[map]
pub static WEFT_SOCKS: SockHash<SockKey> = SockHash::pinned(capacity::SOCKS, 0);
#[map]
pub static WEFT_ENDPOINTS: HashMap<u32, Endpoint> = HashMap::pinned(capacity::ENDPOINTS, 0);
#[map]
pub static WEFT_CGROUPS: HashMap<u64, CgroupIdentity> = HashMap::pinned(capacity::CGROUPS, 0);
#[map]
pub static WEFT_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(capacity::SERVICES, 0);
#[map]
pub static WEFT_BACKENDS: HashMap<BackendKey, Backend> = HashMap::pinned(capacity::BACKENDS, 0);
#[map]
pub static WEFT_POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(capacity::POLICY, 0);
#[map]
pub static WEFT_CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
pub static WEFT_CONNECTS: LruHashMap<u64, ConnectInfo> = LruHashMap::pinned(capacity::CONNECTS, 0);
#[map]
pub static WEFT_FLOWS: LruHashMap<SockKey, FlowEntry> = LruHashMap::pinned(capacity::FLOWS, 0);
#[map]
pub static WEFT_DENIES: LruHashMap<DenyKey, DenyValue> = LruHashMap::pinned(capacity::DENIES, 0);
#[map]
pub static WEFT_PAIRSTATS: LruPerCpuHashMap<PairKey, PairStats> =
    LruPerCpuHashMap::pinned(capacity::PAIR_STATS, 0);
#[map]
pub static WEFT_IFSTATS: PerCpuHashMap<u32, IfStats> = PerCpuHashMap::pinned(capacity::IF_STATS, 0);
#[map]
pub static WEFT_GLOBAL: PerCpuArray<GlobalStats> = PerCpuArray::pinned(1, 0);
/// Socket cookie → the service address the application connected to, so getpeername() shows
/// the VIP rather than the backend (the application never learns about the rewrite).
#[map]
pub static WEFT_REVNAT: LruHashMap<u64, Backend> = LruHashMap::pinned(capacity::REVNAT, 0);

/// Whether the agent asks sockets to leave the fast path (host TCP memory high).
#[inline(always)]
pub fn shedding() -> bool {
    WEFT_CONFIG
        .get(mesh_common::CONFIG_INDEX)
        .is_some_and(Config::shedding)
}

/// Whether the fast path is on right now (mesh config and kill switch, see `Config`).
#[inline(always)]
pub fn fast_path_on() -> bool {
    WEFT_CONFIG
        .get(mesh_common::CONFIG_INDEX)
        .is_some_and(Config::fast_path_on)
}
/// Client address of a connection redirected to the L7 engine → what the client asked for
/// (original destination, source workload, service). Written by sock_ops when the client's
/// socket is established, before the engine can accept it; read by the engine; removed when the
/// client socket closes.
#[map]
pub static WEFT_L7ORIG: LruHashMap<ClientAddr, ConnectInfo> =
    LruHashMap::pinned(capacity::L7_ORIG, 0);

/// Network namespace cookie → the identity of the pod that owns it, for pods the CNI plugin
/// enrolled: a pod's processes are known by their namespace before their cgroup is (on hybrid
/// cgroup hosts the pod's cgroup v2 directory appears only with its first container).
#[map]
pub static WEFT_NETNS: HashMap<u64, CgroupIdentity> = HashMap::pinned(capacity::NETNS, 0);

/// Sockets of the engine's legs that must leave the fast path, written by the engine (it saw a
/// bulk transfer on the leg: the ingress redirect has no flow control, TCP's window has). The
/// socket's next message moves it to the normal stack for good and removes its entry (so does
/// the socket's close, when it comes first).
#[map]
pub static WEFT_SHEDFLOWS: LruHashMap<SockKey, u32> = LruHashMap::pinned(capacity::SHED_FLOWS, 0);
