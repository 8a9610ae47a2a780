//! Packet and byte counters on the host-side end of each pod's veth. The program never changes a
//! packet's fate: it returns TCX_NEXT / TC_ACT_UNSPEC so later programs (or the default) decide.
use aya_ebpf::{macros::classifier, programs::TcContext};
use mesh_common::{IfStats, ZERO_IF_STATS};

static ZERO: IfStats = ZERO_IF_STATS;

use crate::maps::WEFT_IFSTATS;

const TC_ACT_UNSPEC: i32 = -1;
const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800_u16.to_be();
/// Offset of the source address in an IPv4 header.
const IPV4_SRC: usize = 12;

/// The IPv4 source address of an Ethernet frame, as stored (network order), if it is IPv4.
#[inline(always)]
fn ipv4_source(ctx: &TcContext) -> Option<u32> {
    let proto: u16 = ctx.load(12).ok()?;
    if proto != ETH_P_IP_BE {
        return None;
    }
    ctx.load::<u32>(ETH_HLEN + IPV4_SRC).ok()
}

/// Host-side ingress = traffic leaving the pod.
#[classifier]
pub fn weft_tc_pod_out(ctx: TcContext) -> i32 {
    count(&ctx, true);
    TC_ACT_UNSPEC
}

/// Host-side egress = traffic entering the pod.
#[classifier]
pub fn weft_tc_pod_in(ctx: TcContext) -> i32 {
    count(&ctx, false);
    TC_ACT_UNSPEC
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
    if from_pod {
        stats.from_pod_packets += 1;
        stats.from_pod_bytes += len;
        if let Some(src) = ipv4_source(ctx) {
            stats.pod_ip_be = src;
        }
    } else {
        stats.to_pod_packets += 1;
        stats.to_pod_bytes += len;
    }
}
