//! Packet and byte counters on the host-side end of each pod's veth, and the STRICT mTLS gate for
//! new inbound connections. Apart from that gate the programs never change a packet's fate: they
//! return TC_ACT_UNSPEC so later programs (or the default) decide.
use aya_ebpf::{macros::classifier, programs::TcContext};
use mesh_common::{IfStats, ZERO_IF_STATS};

static ZERO: IfStats = ZERO_IF_STATS;

use mesh_common::{CONFIG_INDEX, endpoint_flags, global_counter};

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

/// Host-side ingress = traffic leaving the pod.
#[classifier]
pub fn weft_tc_pod_out(ctx: TcContext) -> i32 {
    count(&ctx, true);
    TC_ACT_UNSPEC
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
    let Ok(proto) = ctx.load::<u16>(12) else {
        return false;
    };
    if proto != ETH_P_IP_BE {
        return false;
    }
    let (Ok(ver_ihl), Ok(l4), Ok(src), Ok(dst)) = (
        ctx.load::<u8>(ETH_HLEN),
        ctx.load::<u8>(ETH_HLEN + IPV4_PROTO),
        ctx.load::<u32>(ETH_HLEN + IPV4_SRC),
        ctx.load::<u32>(ETH_HLEN + IPV4_DST),
    ) else {
        return false;
    };
    if l4 != IPPROTO_TCP {
        return false;
    }
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    let Ok(tcp_flags) = ctx.load::<u8>(ETH_HLEN + ihl + TCP_FLAGS) else {
        return false;
    };
    if tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
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
