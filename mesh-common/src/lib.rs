//! The contract between Weft's eBPF programs and its userspace agent.
//!
//! Every type here crosses the kernel boundary as raw bytes, so each one is `#[repr(C)]`, `Copy`,
//! has explicit padding fields and a compile-time size assertion. No `bool`, `Option` or Rust enums
//! cross the boundary: verdicts and states are `u8` constants, decoded in userspace with `TryFrom`.
//!
//! Byte order is part of each field's name: `_be` is network order exactly as the kernel hands it
//! over, `_host` is host order.
#![no_std]
#![deny(unsafe_code)]
#![allow(
    clippy::pub_underscore_fields,
    reason = "explicit padding fields are part of the kernel contract"
)]

// --- names shared by both sides -------------------------------------------------------------

/// The version of this contract, recorded with a node's pinned datapath.
///
/// How the contract may evolve so that an agent of a new build can take over the pins of an old
/// one without losing state (see `ebpf::generation` in the agent):
/// - a map value may only grow by fields **appended** at its end whose zero value means "as
///   before": the new agent copies every entry, zero-extended, into a map of the new layout;
/// - a map whose key, type or flags change starts empty in the new agent (agent-owned maps are
///   refilled from the configuration before the new programs take over);
/// - any change the sizes do not show (a field reordered, a meaning changed): bump this number;
///   an agent that finds pins of another version starts every map empty;
/// - the sockhash can never be copied: when its layout changes, the old one stays pinned, with
///   its sockets and their `sk_msg` program, until the last of those connections has closed.
pub const ABI_VERSION: u32 = 1;

/// Map names (the symbol names in the eBPF object). At most 15 bytes: the kernel truncates longer
/// object names, and `bpftool map` should show exactly these.
pub mod map_names {
    pub const SOCKS: &str = "WEFT_SOCKS";
    pub const ENDPOINTS: &str = "WEFT_ENDPOINTS";
    pub const CGROUPS: &str = "WEFT_CGROUPS";
    pub const SERVICES: &str = "WEFT_SERVICES";
    pub const BACKENDS: &str = "WEFT_BACKENDS";
    pub const POLICY: &str = "WEFT_POLICY";
    pub const CONFIG: &str = "WEFT_CONFIG";
    pub const CONNECTS: &str = "WEFT_CONNECTS";
    pub const FLOWS: &str = "WEFT_FLOWS";
    pub const DENIES: &str = "WEFT_DENIES";
    pub const PAIR_STATS: &str = "WEFT_PAIRSTATS";
    pub const IF_STATS: &str = "WEFT_IFSTATS";
    pub const GLOBAL_STATS: &str = "WEFT_GLOBAL";
    pub const REVNAT: &str = "WEFT_REVNAT";
    pub const L7_ORIG: &str = "WEFT_L7ORIG";
    pub const SHED_FLOWS: &str = "WEFT_SHEDFLOWS";
    pub const NETNS: &str = "WEFT_NETNS";
    /// Ring buffer of [`crate::FlowEvent`]s, read by the agent while someone watches
    /// (`weft tap`, `weft top`).
    pub const EVENTS: &str = "WEFT_EVENTS";

    /// Every map, for tooling that walks them all (pin sweeps, the object layout test).
    pub const ALL: [&str; 18] = [
        SOCKS,
        ENDPOINTS,
        CGROUPS,
        SERVICES,
        BACKENDS,
        POLICY,
        CONFIG,
        CONNECTS,
        FLOWS,
        DENIES,
        PAIR_STATS,
        IF_STATS,
        GLOBAL_STATS,
        REVNAT,
        L7_ORIG,
        SHED_FLOWS,
        NETNS,
        EVENTS,
    ];
}

/// Program names (the function names in mesh-ebpf, also the kernel's program names).
pub mod program_names {
    pub const SOCK_OPS: &str = "weft_sock_ops";
    pub const SK_MSG: &str = "weft_sk_msg";
    pub const CONNECT4: &str = "weft_connect4";
    pub const TC_FROM_POD: &str = "weft_tc_pod_out";
    pub const TC_TO_POD: &str = "weft_tc_pod_in";
    pub const GETPEERNAME4: &str = "weft_getpeer4";
    pub const CONNECT6: &str = "weft_connect6";
    pub const GETPEERNAME6: &str = "weft_getpeer6";

    pub const ALL: [&str; 8] = [
        SOCK_OPS,
        SK_MSG,
        CONNECT4,
        TC_FROM_POD,
        TC_TO_POD,
        GETPEERNAME4,
        CONNECT6,
        GETPEERNAME6,
    ];
}

/// Default map capacities. Userspace may override them at load time (tests shrink `SOCKS` to
/// exercise the map-full fallback).
pub mod capacity {
    pub const SOCKS: u32 = 65_536;
    pub const ENDPOINTS: u32 = 16_384;
    pub const CGROUPS: u32 = 16_384;
    pub const SERVICES: u32 = 4_096;
    pub const BACKENDS: u32 = 65_536;
    pub const POLICY: u32 = 262_144;
    pub const CONNECTS: u32 = 65_536;
    pub const FLOWS: u32 = 131_072;
    pub const DENIES: u32 = 8_192;
    pub const PAIR_STATS: u32 = 65_536;
    pub const IF_STATS: u32 = 4_096;
    pub const REVNAT: u32 = 65_536;
    pub const L7_ORIG: u32 = 65_536;
    pub const SHED_FLOWS: u32 = 16_384;
    pub const NETNS: u32 = 16_384;
    /// Bytes of the events ring buffer (a power of two, whole pages): about 2,700 events.
    pub const EVENTS_BYTES: u32 = 256 * 1024;
}

/// Workload id of the node's L7 engine. Its listener address is registered as an endpoint with
/// this id, so the engine's legs to local pods are meshed sockets (fast-path eligible). The
/// agent never hands this id to a pod.
pub const ENGINE_WORKLOAD: u32 = u32::MAX;

// --- verdicts and states --------------------------------------------------------------------

/// What `connect4` decided for an outbound connection.
pub mod verdict {
    /// The source is not meshed (or the destination is outside the mesh): untouched.
    pub const PASS: u8 = 0;
    /// Allowed; eligible for the in-kernel socket fast path.
    pub const FAST: u8 = 1;
    /// Refused: `connect()` fails with `EPERM`.
    pub const DENY: u8 = 2;
    /// Redirected to the userspace L7 engine at `connect()` (the destination service has L7
    /// policy). The legs to and from the engine are fast-path eligible like `FAST`.
    pub const L7: u8 = 3;
    /// Only in the policy map: allowed (as `FAST`), but a dry-run policy would deny it; the
    /// attempt is recorded like a denial with reason `DRY_RUN`.
    pub const AUDIT: u8 = 4;
}

/// Why a verdict was reached, recorded with each flow.
pub mod reason {
    /// Source workload unknown to the agent (unmeshed pod).
    pub const UNMESHED_SOURCE: u8 = 0;
    /// Destination address is not a meshed workload on this node.
    pub const OUTSIDE_MESH: u8 = 1;
    /// A policy entry matched; `rule_id` says which.
    pub const POLICY: u8 = 2;
    /// No policy selected the destination: the mesh default applied.
    pub const DEFAULT: u8 = 3;
    /// The destination was a service address with no ready backend.
    pub const NO_BACKEND: u8 = 4;
    /// Inbound connection observed on the server side.
    pub const INBOUND: u8 = 5;
    /// The destination service has L7 policy: the connection was sent to the engine.
    pub const L7_SERVICE: u8 = 6;
    /// A connection the L7 engine opened to a local backend.
    pub const ENGINE: u8 = 7;
    /// The destination is a meshed pod on another node: the connection was sent to the engine,
    /// which carries it over the mutual-TLS tunnel.
    pub const TUNNEL: u8 = 8;
    /// The destination is a STRICT meshed pod on another node and the engine is not alive:
    /// refused rather than sent in plaintext (fail closed).
    pub const TUNNEL_DOWN: u8 = 9;
    /// Allowed, but a dry-run (audit) policy would have denied it.
    pub const DRY_RUN: u8 = 10;
    /// The destination service's L7 policy fails closed and the node's engine is not alive:
    /// refused rather than sent around the engine's authorization.
    pub const ENGINE_DOWN: u8 = 11;
}

/// Bits of [`Endpoint::flags`].
pub mod endpoint_flags {
    /// A meshed pod on another node: meshed clients reach it through the engine's tunnel.
    pub const REMOTE: u32 = 1 << 0;
    /// The pod accepts only mutual TLS from outside its node (mTLS mode STRICT): plaintext
    /// from a meshed client is refused at `connect()` when the tunnel is down, and new TCP
    /// connections from outside the node are dropped before they reach a local STRICT pod.
    pub const STRICT: u32 = 1 << 1;
    /// A pod of this node.
    pub const LOCAL: u32 = 1 << 2;
    /// The workload's sockets may use the socket-level fast path (sockhash + `sk_msg`). A
    /// connection joins it only when both ends carry this flag. The agent sets it per workload:
    /// on kernels whose socket redirect passed the agent's self-test, or where the operator
    /// opted the workload in (the redirect hides bytes from `splice()` readers and can give
    /// blocking readers spurious `EAGAIN` on kernels that fail it).
    pub const SOCKET_FAST: u32 = 1 << 3;
}

/// Bits of [`ServiceValue::flags`].
pub mod service_flags {
    /// The service has L7 policy (a route or a traffic policy): meshed clients are redirected
    /// to the node's L7 engine.
    pub const L7: u32 = 1 << 0;
    /// While the engine is down, meshed clients' connects to this service are refused instead
    /// of going straight to a backend (its L7 authorization or request authentication must not
    /// be bypassed).
    pub const L7_FAIL_CLOSED: u32 = 1 << 1;
}

/// Socket-level fast-path decision, sticky for the life of a socket: a socket that sent its first
/// byte through the normal stack never switches to the fast path (that could reorder bytes at the
/// receiver); a fast socket may fall back to the normal stack at any time (that is order-safe).
pub mod fast_state {
    pub const UNDECIDED: u8 = 0;
    pub const FAST: u8 = 1;
    pub const SLOW: u8 = 2;
}

pub mod role {
    pub const CLIENT: u8 = 1;
    pub const SERVER: u8 = 2;
}

pub mod flow_state {
    pub const OPEN: u8 = 1;
    pub const CLOSED: u8 = 2;
}

/// Bits of [`FlowEntry::fin`].
pub mod fin_flags {
    /// The socket sent its FIN (it went through `FIN_WAIT1` or `LAST_ACK`).
    pub const SENT: u8 = 1 << 0;
    /// The peer's FIN arrived (`CLOSE_WAIT`, `CLOSING`, or the close from `FIN_WAIT2` into
    /// `TIME_WAIT`).
    pub const RECEIVED: u8 = 1 << 1;
}

/// Bits of [`Config::flags`].
pub mod config_flags {
    /// The mesh configuration (`MeshConfig` `spec.fastPath`) enables the socket fast path.
    pub const FAST_PATH: u32 = 1 << 0;
    /// The host's TCP memory is running high: sockets move off the fast path (sticky, as with
    /// the kill switch) so that TCP's flow control makes senders wait. The kernel's ingress
    /// redirect has none of its own: a receiver that does not read lets redirected bytes pile
    /// up until TCP memory runs out and senders get ENOMEM. Set and cleared by the agent.
    pub const SHED: u32 = 1 << 1;
    /// Someone watches live events (`weft tap`/`top`): the programs write [`crate::FlowEvent`]s
    /// into the events ring buffer. Off, they write nothing (no cost when nobody watches).
    pub const EVENTS: u32 = 1 << 2;
}

/// Indices of [`GlobalStats::counters`].
/// Packet marks (`skb->mark`, `SO_MARK`) of the source-keeping connections: the agent connects to
/// a local pod from the address of the client on another node (the tunnel's far end), so the pod
/// sees its real peer. Values no other component here uses; the agent routes by the first.
pub mod marks {
    /// Set by the TC program on a packet leaving a pod that answers one of the agent's
    /// source-keeping sockets; a policy rule of the agent delivers such packets to the node
    /// itself instead of forwarding them to the client's node.
    pub const REPLY_TO_AGENT: u32 = 0x5746_0001;
    /// `SO_MARK` of the agent's source-keeping sockets: their SYN comes from an address of another
    /// node, and the STRICT gate lets it pass because the agent sends it after the mTLS checks.
    pub const AGENT_TRANSPARENT: u32 = 0x5746_0002;
    /// The routing table (and rule priority) of the reply route.
    pub const REPLY_TABLE: u32 = 0x5746;
}

pub mod global_counter {
    /// A message was redirected straight into the peer socket.
    pub const MSG_FAST: usize = 0;
    /// A message went through the normal stack because the peer socket is not local or not known.
    pub const MSG_SLOW_NO_PEER: usize = 1;
    /// A message went through the normal stack because the fast path is switched off.
    pub const MSG_SLOW_DISABLED: usize = 2;
    /// A message went through the normal stack because its socket started on the normal stack.
    pub const MSG_SLOW_STICKY: usize = 3;
    /// The sockhash refused a socket (full, or the socket is not eligible).
    pub const SOCKHASH_FULL: usize = 4;
    /// The flow table refused an entry.
    pub const FLOWS_FULL: usize = 5;
    /// A redirect was attempted and the kernel refused it (peer gone in between).
    pub const REDIRECT_FAILED: usize = 6;
    /// `connect()` to a service address that had no backend.
    pub const NO_BACKEND: usize = 7;
    /// A connection was redirected to the L7 engine.
    pub const L7_REDIRECT: usize = 8;
    /// A connection to an L7 service went straight to a backend because the engine was not
    /// alive (no heartbeat): L7 policy is skipped rather than the connection refused.
    pub const L7_ENGINE_DOWN: usize = 9;
    /// A connection to a meshed pod of another node was sent to the engine's tunnel.
    pub const TUNNEL_REDIRECT: usize = 10;
    /// A plaintext TCP connection from outside the node to a STRICT pod was dropped (its SYN).
    pub const STRICT_INBOUND_DROP: usize = 11;
    /// A connection a dry-run policy would have denied was allowed.
    pub const DRY_RUN_WOULD_DENY: usize = 12;
    /// A fast-path socket moved to the normal stack because the agent asked to shed (host TCP
    /// memory high, see [`crate::config_flags::SHED`]).
    pub const BACKPRESSURE: usize = 13;
    /// A fast-path socket moved to the normal stack because the engine asked it to (a bulk
    /// transfer on one of its legs, see [`crate::map_names::SHED_FLOWS`]).
    pub const FLOW_SHED: usize = 14;
    /// A flow event did not fit in the events ring buffer (the agent reads too slowly): lost.
    pub const EVENTS_LOST: usize = 15;
    pub const COUNT: usize = 16;
}

/// Index 0 of [`map_names::CONFIG`].
pub const CONFIG_INDEX: u32 = 0;

// --- map keys and values --------------------------------------------------------------------

/// One TCP socket, from its own point of view. Key of the sockhash and of the flow table.
/// The peer socket of a local connection is found by swapping local and remote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockKey {
    pub local_ip_be: u32,
    pub remote_ip_be: u32,
    pub local_port_host: u32,
    pub remote_port_host: u32,
}

impl SockKey {
    #[must_use]
    pub const fn peer(&self) -> Self {
        Self {
            local_ip_be: self.remote_ip_be,
            remote_ip_be: self.local_ip_be,
            local_port_host: self.remote_port_host,
            remote_port_host: self.local_port_host,
        }
    }
}

/// A meshed workload address (pod IP) on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub workload_id: u32,
    /// [`endpoint_flags`].
    pub flags: u32,
}

/// The identity of everything running in one pod cgroup (key: cgroup v2 id, the directory inode).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupIdentity {
    pub workload_id: u32,
    pub flags: u32,
}

/// A service virtual IP and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub vip_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub service_id: u32,
    /// Backends occupy slots `0..backend_count` in the backends map.
    pub backend_count: u32,
    /// [`service_flags`].
    pub flags: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    pub service_id: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub ip_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}

/// Policy lookup: exact port first, then `dst_port_host == 0` (any other port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub src_workload: u32,
    pub dst_workload: u32,
    pub dst_port_host: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub verdict: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    /// Userspace index of the rule that decided (see the agent's `/config_dump`).
    pub rule_id: u32,
}

/// Node-wide switches, index 0 of an array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// [`config_flags`], written by the agent from the mesh configuration.
    pub flags: u32,
    /// Operator kill switch: non-zero turns the fast path off whatever `flags` says. Written only
    /// by `weft fastpath`, never by the agent's config sync, so it works while the agent is down.
    pub fast_path_killed: u32,
    /// Verdict for meshed pairs with no policy entry.
    pub default_verdict: u8,
    pub _pad0: u8,
    /// The L7 engine's listener (node address); 0 when the engine is off.
    pub engine_port_be: u16,
    pub engine_ip_be: u32,
    /// `CLOCK_MONOTONIC` (`bpf_ktime_get_ns`) time of the engine's last heartbeat. Connections are
    /// redirected only while it is recent (see [`ENGINE_HEARTBEAT_MAX_AGE_NS`]).
    pub engine_seen_ns: u64,
    /// This node's pod network (`spec.podCIDR` of its Node), for "from outside the node";
    /// both 0 when unknown (then only this node's meshed pods and its own address are local).
    pub local_net_be: u32,
    pub local_mask_be: u32,
}

/// A redirect to the engine needs a heartbeat at most this old: when the agent is down, L7
/// services are reached directly (L7 policy skipped, traffic kept) instead of failing.
pub const ENGINE_HEARTBEAT_MAX_AGE_NS: u64 = 3_000_000_000;

impl Config {
    /// The fast path is on when the mesh configuration enables it and the operator's kill switch
    /// is off. One definition for the kernel and the agent.
    #[must_use]
    pub const fn fast_path_on(&self) -> bool {
        self.flags & config_flags::FAST_PATH != 0 && self.fast_path_killed == 0
    }

    /// The agent asks sockets to leave the fast path (host TCP memory high).
    #[must_use]
    pub const fn shedding(&self) -> bool {
        self.flags & config_flags::SHED != 0
    }
}

/// A client socket's own address (pod IP and ephemeral port): key of the L7 engine's lookup of
/// a redirected connection's original destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientAddr {
    pub ip_be: u32,
    pub port_host: u32,
}

/// Handed from `connect4` to `sock_ops` through the socket cookie; for connections redirected to
/// the engine also the value of the `L7_ORIG` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectInfo {
    pub src_workload: u32,
    pub dst_workload: u32,
    pub rule_id: u32,
    /// The address the application asked for (a service VIP if it was load-balanced).
    pub orig_dst_ip_be: u32,
    pub orig_dst_port_be: u16,
    pub verdict: u8,
    pub reason: u8,
    pub service_id: u32,
}

/// One socket of a meshed workload, live or recently closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub local_workload: u32,
    pub remote_workload: u32,
    pub rule_id: u32,
    pub service_id: u32,
    pub orig_dst_ip_be: u32,
    pub orig_dst_port_be: u16,
    pub verdict: u8,
    pub reason: u8,
    pub role: u8,
    pub state: u8,
    pub fast: u8,
    /// [`fin_flags`]: which FINs this socket sent and received (they take a sequence number
    /// each, which the stack's byte counters count; payload counts leave them out).
    pub fin: u8,
    pub _pad1: u32,
    pub opened_ns: u64,
    pub closed_ns: u64,
    /// Payload bytes this socket sent, all paths.
    pub tx_bytes: u64,
    /// Of those, bytes redirected straight into the peer socket.
    pub tx_fast_bytes: u64,
    pub tx_msgs: u64,
    /// Bytes the TCP stack delivered to this socket (excludes fast-path bytes), taken at close.
    pub rx_stack_bytes: u64,
}

/// What a [`FlowEvent`] reports.
pub mod event_kind {
    /// A meshed socket was established, with the verdict connect gave it.
    pub const OPEN: u8 = 1;
    /// A connection closed: bytes each way and how long it lived.
    pub const CLOSE: u8 = 2;
    /// `connect()` was refused (or a dry-run policy would have refused it).
    pub const DENY: u8 = 3;
    /// A fast-path socket moved to the normal stack ([`crate::global_counter::BACKPRESSURE`]
    /// or [`crate::global_counter::FLOW_SHED`] says which in `reason`).
    pub const SHED: u8 = 4;
}

/// One entry of the events ring buffer ([`map_names::EVENTS`]), written while
/// [`config_flags::EVENTS`] is set. Addresses are as in [`SockKey`]; for a `DENY` the local
/// port is 0 (connect runs before the socket has one) and `local_ip_be` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` when it happened.
    pub ktime_ns: u64,
    /// When the socket was established (`CLOSE`).
    pub opened_ns: u64,
    /// Payload bytes the socket sent (`CLOSE`) and received (stack and fast path).
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    /// Of those, either way, the bytes that went socket to socket in the kernel.
    pub fast_bytes: u64,
    pub key: SockKey,
    pub local_workload: u32,
    pub remote_workload: u32,
    pub rule_id: u32,
    pub service_id: u32,
    pub orig_dst_ip_be: u32,
    pub orig_dst_port_be: u16,
    /// [`event_kind`].
    pub kind: u8,
    pub verdict: u8,
    /// [`reason`] (for `SHED`: the global counter index that moved it).
    pub reason: u8,
    pub role: u8,
    pub fast: u8,
    pub _pad0: u8,
    pub _pad1: u32,
}

/// Attempted connections refused in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DenyKey {
    pub src_workload: u32,
    pub dst_workload: u32,
    pub dst_ip_be: u32,
    pub dst_port_be: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyValue {
    pub count: u64,
    pub last_ns: u64,
    pub rule_id: u32,
    pub reason: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// Per (source workload, destination workload); per-CPU, summed by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PairKey {
    pub src_workload: u32,
    pub dst_workload: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairStats {
    pub conns_opened: u64,
    pub conns_closed: u64,
    pub conns_denied: u64,
    /// Connections whose client socket sent on the fast path.
    pub conns_fast: u64,
    /// Payload bytes source → destination.
    pub bytes_to_dst: u64,
    /// Payload bytes destination → source.
    pub bytes_to_src: u64,
    /// Of both directions, bytes that took the fast path.
    pub bytes_fast: u64,
}

/// Packets and bytes on one host-side veth (key: ifindex in the node's namespace).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfStats {
    /// Source address of the last IPv4 packet from the pod: tells the agent which pod the
    /// interface serves without asking the pod's namespace.
    pub pod_ip_be: u32,
    pub _pad0: u32,
    pub from_pod_packets: u64,
    pub from_pod_bytes: u64,
    pub to_pod_packets: u64,
    pub to_pod_bytes: u64,
    /// Of the above, the IPv4 UDP datagrams (DNS and other datagrams pass untouched; they are
    /// only counted). Added in a later layout: the upgrade migrates older entries, zero-filled.
    pub from_pod_udp_packets: u64,
    pub from_pod_udp_bytes: u64,
    pub to_pod_udp_packets: u64,
    pub to_pod_udp_bytes: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalStats {
    pub counters: [u64; global_counter::COUNT],
}

// --- compile-time layout checks -------------------------------------------------------------

macro_rules! assert_size {
    ($($t:ty => $n:expr),* $(,)?) => { $(const _: () = assert!(core::mem::size_of::<$t>() == $n);)* };
}

assert_size! {
    SockKey => 16,
    Endpoint => 8,
    CgroupIdentity => 8,
    ServiceKey => 8,
    ServiceValue => 16,
    BackendKey => 8,
    Backend => 8,
    PolicyKey => 12,
    PolicyValue => 8,
    Config => 32,
    ClientAddr => 8,
    ConnectInfo => 24,
    FlowEntry => 80,
    DenyKey => 16,
    DenyValue => 24,
    PairKey => 8,
    PairStats => 56,
    IfStats => 72,
    GlobalStats => 128,
    FlowEvent => 88,
}

/// Key and value sizes of every map, as the object must declare them. The root-free layout test
/// compares these with the maps parsed from the embedded object.
pub const MAP_LAYOUT: [(&str, usize, usize); 18] = {
    use core::mem::size_of;
    [
        (map_names::SOCKS, size_of::<SockKey>(), size_of::<u32>()),
        (
            map_names::ENDPOINTS,
            size_of::<u32>(),
            size_of::<Endpoint>(),
        ),
        (
            map_names::CGROUPS,
            size_of::<u64>(),
            size_of::<CgroupIdentity>(),
        ),
        (
            map_names::SERVICES,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
        ),
        (
            map_names::BACKENDS,
            size_of::<BackendKey>(),
            size_of::<Backend>(),
        ),
        (
            map_names::POLICY,
            size_of::<PolicyKey>(),
            size_of::<PolicyValue>(),
        ),
        (map_names::CONFIG, size_of::<u32>(), size_of::<Config>()),
        (
            map_names::CONNECTS,
            size_of::<u64>(),
            size_of::<ConnectInfo>(),
        ),
        (
            map_names::FLOWS,
            size_of::<SockKey>(),
            size_of::<FlowEntry>(),
        ),
        (
            map_names::DENIES,
            size_of::<DenyKey>(),
            size_of::<DenyValue>(),
        ),
        (
            map_names::PAIR_STATS,
            size_of::<PairKey>(),
            size_of::<PairStats>(),
        ),
        (map_names::IF_STATS, size_of::<u32>(), size_of::<IfStats>()),
        (
            map_names::GLOBAL_STATS,
            size_of::<u32>(),
            size_of::<GlobalStats>(),
        ),
        (map_names::REVNAT, size_of::<u64>(), size_of::<Backend>()),
        (
            map_names::L7_ORIG,
            size_of::<ClientAddr>(),
            size_of::<ConnectInfo>(),
        ),
        (
            map_names::SHED_FLOWS,
            size_of::<SockKey>(),
            size_of::<u32>(),
        ),
        (
            map_names::NETNS,
            size_of::<u64>(),
            size_of::<CgroupIdentity>(),
        ),
        // A ring buffer has neither key nor value: its entries are `FlowEvent`s.
        (map_names::EVENTS, 0, 0),
    ]
};

#[cfg(feature = "user")]
mod pod {
    use super::{
        Backend, BackendKey, CgroupIdentity, ClientAddr, Config, ConnectInfo, DenyKey, DenyValue,
        Endpoint, FlowEntry, FlowEvent, GlobalStats, IfStats, PairKey, PairStats, PolicyKey,
        PolicyValue, ServiceKey, ServiceValue, SockKey,
    };
    macro_rules! pod {
        ($($t:ty),* $(,)?) => { $(
            // SAFETY: repr(C), Copy, every field an integer or integer array, padding explicit.
            #[allow(unsafe_code)]
            unsafe impl aya::Pod for $t {}
        )* };
    }
    pod!(
        SockKey,
        Endpoint,
        CgroupIdentity,
        ServiceKey,
        ServiceValue,
        BackendKey,
        Backend,
        PolicyKey,
        PolicyValue,
        Config,
        ConnectInfo,
        FlowEntry,
        FlowEvent,
        DenyKey,
        DenyValue,
        PairKey,
        PairStats,
        IfStats,
        GlobalStats,
        ClientAddr,
    );
}

// --- all-zero values ------------------------------------------------------------------------

/// All-zero values the eBPF side inserts by reference. Building a zeroed struct on the BPF stack
/// lowers to a `memset` call that the BPF backend rejects; a read-only global does not.
pub const ZERO_PAIR_STATS: PairStats = PairStats {
    conns_opened: 0,
    conns_closed: 0,
    conns_denied: 0,
    conns_fast: 0,
    bytes_to_dst: 0,
    bytes_to_src: 0,
    bytes_fast: 0,
};
pub const ZERO_IF_STATS: IfStats = IfStats {
    pod_ip_be: 0,
    _pad0: 0,
    from_pod_packets: 0,
    from_pod_bytes: 0,
    to_pod_packets: 0,
    to_pod_bytes: 0,
    from_pod_udp_packets: 0,
    from_pod_udp_bytes: 0,
    to_pod_udp_packets: 0,
    to_pod_udp_bytes: 0,
};
pub const ZERO_FLOW: FlowEntry = FlowEntry {
    local_workload: 0,
    remote_workload: 0,
    rule_id: 0,
    service_id: 0,
    orig_dst_ip_be: 0,
    orig_dst_port_be: 0,
    verdict: 0,
    reason: 0,
    role: 0,
    state: 0,
    fast: 0,
    fin: 0,
    _pad1: 0,
    opened_ns: 0,
    closed_ns: 0,
    tx_bytes: 0,
    tx_fast_bytes: 0,
    tx_msgs: 0,
    rx_stack_bytes: 0,
};
