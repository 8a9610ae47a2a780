//! sk_msg: the socket fast path. Payload sent on a meshed socket whose peer socket is on this
//! node goes straight into the peer's receive queue, skipping TCP/IP, qdiscs, veths and the bridge.
//!
//! Correctness rules:
//! - Always return SK_PASS. If the redirect lookup misses, the kernel leaves `sk_redir` unset and
//!   SK_PASS sends the message through the normal stack; returning the helper's SK_DROP would
//!   lose data.
//! - The per-socket decision is sticky (see `mesh_common::fast_state`): a socket that sent a byte
//!   through the stack never switches to the fast path, because the receiver reads its
//!   redirected queue before its TCP queue and would reorder the stream.
//! - Flow control: the kernel's ingress redirect queues at the receiver without limit. When the
//!   agent sees the host's TCP memory run high it sets `SHED`, and sockets leave the fast path
//!   (sticky), so TCP's window makes fast senders wait for slow readers. Per socket, the engine
//!   moves both ends of a leg off the fast path when it sees a bulk transfer on it
//!   (`WEFT_SHEDFLOWS`): its legs carry whatever the far end of the tunnel can take.
use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use aya_log_ebpf::{info, warn};
use mesh_common::{FlowEntry, SockKey, event_kind, fast_state, global_counter, role, verdict};

use crate::{
    events,
    maps::{WEFT_FLOWS, WEFT_SHEDFLOWS, WEFT_SOCKS, fast_path_on, shedding},
    stats,
};

#[sk_msg]
pub fn weft_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx);
    SK_PASS
}

/// Whether the engine asked this socket (one end of one of its legs) to leave the fast path. The
/// request is consumed: the caller makes the decision sticky.
#[inline(always)]
fn engine_asked_to_shed(key: &SockKey) -> bool {
    // SAFETY: presence check only; the value is not read.
    if unsafe { WEFT_SHEDFLOWS.get(key) }.is_none() {
        return false;
    }
    let _ = WEFT_SHEDFLOWS.remove(key);
    true
}

/// A socket left the fast path for good; `why` is the global counter that counted it.
#[inline(always)]
fn shed_event(ctx: &SkMsgContext, key: &SockKey, flow: &FlowEntry, why: usize) {
    info!(
        ctx,
        "{:i}:{} to {:i}:{} leaves the fast path (counter {})",
        u32::from_be(key.local_ip_be),
        key.local_port_host,
        u32::from_be(key.remote_ip_be),
        key.remote_port_host,
        why
    );
    if events::watching() {
        let mut event = events::of_flow(event_kind::SHED, key, flow, 0);
        event.reason = why as u8;
        events::emit(&event);
    }
}

#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) {
    // SAFETY: plain field loads from the context.
    let key = unsafe {
        let m = &*ctx.msg;
        SockKey {
            local_ip_be: m.local_ip4,
            remote_ip_be: m.remote_ip4,
            local_port_host: m.local_port,
            remote_port_host: u32::from_be(m.remote_port),
        }
    };
    let size = u64::from(ctx.size());
    let Some(flow) = WEFT_FLOWS.get_ptr_mut(&key) else {
        // No flow state means no sticky decision: the normal stack is the only safe choice.
        stats::bump(global_counter::MSG_SLOW_STICKY);
        return;
    };
    // SAFETY: valid map value; sk_msg runs under the socket lock, so this socket's entry has no
    // concurrent writer.
    let flow = unsafe { &mut *flow };

    let enabled = fast_path_on();

    let mut fast = false;
    if flow.fast == fast_state::SLOW {
        stats::bump(global_counter::MSG_SLOW_STICKY);
    } else if !enabled {
        flow.fast = fast_state::SLOW;
        stats::bump(global_counter::MSG_SLOW_DISABLED);
    } else if shedding() {
        flow.fast = fast_state::SLOW;
        stats::bump(global_counter::BACKPRESSURE);
        shed_event(ctx, &key, flow, global_counter::BACKPRESSURE);
    } else if flow.verdict == verdict::L7 && engine_asked_to_shed(&key) {
        flow.fast = fast_state::SLOW;
        stats::bump(global_counter::FLOW_SHED);
        shed_event(ctx, &key, flow, global_counter::FLOW_SHED);
    } else {
        let mut peer = key.peer();
        if WEFT_SOCKS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
            if flow.fast == fast_state::UNDECIDED && flow.role == role::CLIENT {
                stats::pair(flow.local_workload, flow.remote_workload, |s| {
                    s.conns_fast += 1
                });
            }
            flow.fast = fast_state::FAST;
            fast = true;
            stats::bump(global_counter::MSG_FAST);
        } else {
            if flow.fast == fast_state::FAST {
                stats::bump(global_counter::REDIRECT_FAILED);
                warn!(
                    ctx,
                    "redirect from {:i}:{} failed (peer gone): the normal stack takes over",
                    u32::from_be(key.local_ip_be),
                    key.local_port_host
                );
            } else {
                stats::bump(global_counter::MSG_SLOW_NO_PEER);
            }
            flow.fast = fast_state::SLOW;
        }
    }

    flow.tx_bytes += size;
    flow.tx_msgs += 1;
    let fast_bytes = if fast { size } else { 0 };
    flow.tx_fast_bytes += fast_bytes;
    let is_client = flow.role == role::CLIENT;
    let (src, dst) = if is_client {
        (flow.local_workload, flow.remote_workload)
    } else {
        (flow.remote_workload, flow.local_workload)
    };
    stats::pair(src, dst, |s| {
        if is_client {
            s.bytes_to_dst += size;
        } else {
            s.bytes_to_src += size;
        }
        s.bytes_fast += fast_bytes;
    });
}
