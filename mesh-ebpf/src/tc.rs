//! Packet and byte counters on the host-side end of each pod's veth, the STRICT mTLS gate for
//! new inbound connections, and the mark that brings a pod's answers to the agent's
//! source-keeping sockets back to the agent. Apart from that gate the programs never change a
//! packet's fate: they return TC_ACT_UNSPEC so later programs (or the default) decide.
use aya_ebpf::{macros::classifier, programs::TcContext};
use mesh_common::{IfStats, ZERO_IF_STATS};

static ZERO: IfStats = ZERO_IF_STATS;

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::generated::{bpf_sk_lookup_tcp, bpf_sk_release},
};
use mesh_common::{CONFIG_INDEX, endpoint_flags, global_counter, marks};

use crate::{
    maps::{WEFT_CONFIG, WEFT_ENDPOINTS, WEFT_IFSTATS},
    stats,
};

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800_u16.to_be();
/// Offsets in an IPv4 header.
const IPV4_PROTO: usize = 9;
const IPV4_SRC: usize = 12;
const IPV4_DST: usize = 16;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Offset of the flags byte in a TCP header, and two of its bits.
const TCP_FLAGS: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// The IPv4 source address (as stored, network order) and protocol of an Ethernet frame, if it
/// is IPv4.
#[inline(always)]
fn ipv4_source_and_protocol(ctx: &TcContext) -> Option<(u32, u8)> {
    let proto: u16 = ctx.load(12).ok()?;
    if proto != ETH_P_IP_BE {
        return None;
    }
    Some((
        ctx.load::<u32>(ETH_HLEN + IPV4_SRC).ok()?,
        ctx.load::<u8>(ETH_HLEN + IPV4_PROTO).ok()?,
    ))
}

/// For an IPv4 TCP segment: its IP header length, source and destination (as stored, network
/// order).
#[inline(always)]
fn ipv4_tcp(ctx: &TcContext) -> Option<(usize, u32, u32)> {
    if ctx.load::<u16>(12).ok()? != ETH_P_IP_BE {
        return None;
    }
    let ver_ihl = ctx.load::<u8>(ETH_HLEN).ok()?;
    if ctx.load::<u8>(ETH_HLEN + IPV4_PROTO).ok()? != IPPROTO_TCP {
        return None;
    }
    Some((
        usize::from(ver_ihl & 0x0f) * 4,
        ctx.load::<u32>(ETH_HLEN + IPV4_SRC).ok()?,
        ctx.load::<u32>(ETH_HLEN + IPV4_DST).ok()?,
    ))
}

/// Host-side ingress = traffic leaving the pod.
#[classifier]
pub fn weft_tc_pod_out(ctx: TcContext) -> i32 {
    count(&ctx, true);
    mark_reply_to_agent(&ctx);
    TC_ACT_UNSPEC
}

/// A TCP segment from a pod to a pod of another node that belongs to a connection the agent
/// opened from that pod's address (a tunnel stream keeping its client's address: its socket in
/// this namespace carries [`marks::AGENT_TRANSPARENT`]) is marked [`marks::REPLY_TO_AGENT`], so
/// the agent's policy rule delivers it here instead of routing it to the other node. Anything
/// else is left alone; a failed lookup leaves the packet unmarked (routed as without Weft).
#[inline(always)]
fn mark_reply_to_agent(ctx: &TcContext) {
    let Some((ihl, src, dst)) = ipv4_tcp(ctx) else {
        return;
    };
    // Only towards pods of other nodes: the peers of source-keeping sockets.
    // SAFETY: copied out of the map.
    if !unsafe { WEFT_ENDPOINTS.get(&dst) }.is_some_and(|e| e.flags & endpoint_flags::REMOTE != 0) {
        return;
    }
    let (Ok(sport), Ok(dport)) = (
        ctx.load::<u16>(ETH_HLEN + ihl),
        ctx.load::<u16>(ETH_HLEN + ihl + 2),
    ) else {
        return;
    };
    // Only the IPv4 part is given to the helper (its size below).
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: src,
                daddr: dst,
                sport,
                dport,
            },
        },
    };
    // SAFETY: the helper takes the context and a stack tuple of the size given; a socket it
    // returns is released below before anything else happens.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.skb.skb.cast(),
            &mut tuple,
            core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32,
            u64::from(BPF_F_CURRENT_NETNS as u32),
            0,
        )
    };
    if sk.is_null() {
        return;
    }
    // SAFETY: a socket the lookup returned, read before it is released.
    let mark = unsafe { (*sk).mark };
    // SAFETY: releases the reference the lookup took.
    unsafe { bpf_sk_release(sk.cast()) };
    if mark == marks::AGENT_TRANSPARENT {
        ctx.set_mark(marks::REPLY_TO_AGENT);
    }
}

/// Host-side egress = traffic entering the pod. Also the STRICT mTLS gate: a new TCP
/// connection (SYN without ACK) from outside the node to a STRICT pod is dropped, so plaintext
/// from other nodes never reaches it, whether or not the agent is running. Connections the pod
/// opened itself (SYN-ACK) and everything from this node pass.
#[classifier]
pub fn weft_tc_pod_in(ctx: TcContext) -> i32 {
    count(&ctx, false);
    if strict_refuses(&ctx) {
        stats::bump(global_counter::STRICT_INBOUND_DROP);
        return TC_ACT_SHOT;
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn strict_refuses(ctx: &TcContext) -> bool {
    let Some((ihl, src, dst)) = ipv4_tcp(ctx) else {
        return false;
    };
    let Ok(tcp_flags) = ctx.load::<u8>(ETH_HLEN + ihl + TCP_FLAGS) else {
        return false;
    };
    if tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return false;
    }
    // The agent's own source-keeping connection (sent after the tunnel's mTLS and policy checks,
    // from the client's address on another node).
    // SAFETY: the context pointer is valid for the program's lifetime.
    if unsafe { (*ctx.skb.skb).mark } == marks::AGENT_TRANSPARENT {
        return false;
    }
    // SAFETY: copied out of the map.
    let Some(to) = (unsafe { WEFT_ENDPOINTS.get(&dst) }).copied() else {
        return false;
    };
    if to.flags & endpoint_flags::STRICT == 0 {
        return false;
    }
    // From this node: a meshed pod of it, its own address (the engine, the tunnel's far end),
    // or its pod network.
    // SAFETY: copied out of the map.
    if unsafe { WEFT_ENDPOINTS.get(&src) }.is_some_and(|e| e.flags & endpoint_flags::LOCAL != 0) {
        return false;
    }
    let Some(cfg) = WEFT_CONFIG.get(CONFIG_INDEX) else {
        return false;
    };
    let local_net = cfg.local_mask_be != 0 && src & cfg.local_mask_be == cfg.local_net_be;
    src != cfg.engine_ip_be && !local_net
}

#[inline(always)]
fn count(ctx: &TcContext, from_pod: bool) {
    // SAFETY: the context pointer is valid for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let len = u64::from(ctx.len());
    let mut ptr = WEFT_IFSTATS.get_ptr_mut(&ifindex);
    if ptr.is_none() {
        let _ = WEFT_IFSTATS.insert(&ifindex, &ZERO, 1);
        ptr = WEFT_IFSTATS.get_ptr_mut(&ifindex);
    }
    let Some(stats) = ptr else { return };
    // SAFETY: per-CPU value owned by this CPU.
    let stats = unsafe { &mut *stats };
    let ipv4 = ipv4_source_and_protocol(ctx);
    let udp = matches!(ipv4, Some((_, IPPROTO_UDP)));
    if from_pod {
        stats.from_pod_packets += 1;
        stats.from_pod_bytes += len;
        if udp {
            stats.from_pod_udp_packets += 1;
            stats.from_pod_udp_bytes += len;
        }
        if let Some((src, _)) = ipv4 {
            stats.pod_ip_be = src;
        }
    } else {
        stats.to_pod_packets += 1;
        stats.to_pod_bytes += len;
        if udp {
            stats.to_pod_udp_packets += 1;
            stats.to_pod_udp_bytes += len;
        }
    }
}
