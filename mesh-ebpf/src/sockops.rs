//! sock_ops: records established TCP sockets of meshed pods.
//!
//! On establishment a meshed socket gets a flow-table entry (verdict handed over from connect4
//! through the socket cookie) and, when both ends are meshed workloads of this node, a sockhash
//! entry that makes it eligible for the sk_msg fast path. On close the flow entry is finalised;
//! the kernel removes the socket from the sockhash by itself.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT,
        BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT1, BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use aya_log_ebpf::{debug, warn};
use mesh_common::{
    ClientAddr, ENGINE_WORKLOAD, FlowEntry, SockKey, ZERO_FLOW, endpoint_flags, event_kind,
    fast_state, fin_flags, flow_state, global_counter, reason, role, verdict,
};

use crate::{
    events,
    maps::{
        WEFT_CONNECTS, WEFT_ENDPOINTS, WEFT_FLOWS, WEFT_L7ORIG, WEFT_REVNAT, WEFT_SHEDFLOWS,
        WEFT_SOCKS, fast_path_on,
    },
    stats,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// The third word of a v4-mapped IPv6 address (`::ffff:0:0/96`), as stored.
const V4_MAPPED_BE: u32 = 0x0000_ffff_u32.to_be();

/// An IPv4 connection: an IPv4 socket, or an IPv6 socket whose peer is a v4-mapped address (a
/// dual-stack listener's accepted socket, a Go/Java/Node client). For the latter the kernel keeps
/// the IPv4 addresses in the same fields, so keys are the same either way.
#[inline(always)]
fn is_ipv4_connection(ctx: &SockOpsContext) -> bool {
    match ctx.family() {
        AF_INET => true,
        AF_INET6 => {
            let r = ctx.remote_ip6();
            r[0] == 0 && r[1] == 0 && r[2] == V4_MAPPED_BE
        }
        _ => false,
    }
}

static ZERO_FLOW_VALUE: FlowEntry = ZERO_FLOW;

#[sock_ops]
pub fn weft_sock_ops(ctx: SockOpsContext) -> u32 {
    let _ = try_sock_ops(&ctx);
    1
}

#[inline(always)]
fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
    if !is_ipv4_connection(ctx) {
        return Ok(());
    }
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(ctx, role::CLIENT),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => established(ctx, role::SERVER),
        BPF_SOCK_OPS_STATE_CB => match ctx.arg(1) {
            BPF_TCP_CLOSE => closed(ctx),
            BPF_TCP_FIN_WAIT1 | BPF_TCP_LAST_ACK => mark_fin(ctx, fin_flags::SENT),
            BPF_TCP_CLOSE_WAIT | BPF_TCP_CLOSING => mark_fin(ctx, fin_flags::RECEIVED),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

#[inline(always)]
pub fn sock_key(ctx: &SockOpsContext) -> SockKey {
    SockKey {
        local_ip_be: ctx.local_ip4(),
        remote_ip_be: ctx.remote_ip4(),
        local_port_host: ctx.local_port(),
        // remote_port holds the big-endian port in its upper half on little-endian hosts.
        remote_port_host: u32::from_be(ctx.remote_port()),
    }
}

#[inline(always)]
fn established(ctx: &SockOpsContext, my_role: u8) -> Result<(), ()> {
    let mut key = sock_key(ctx);
    // SAFETY: copied out of the map.
    let Some(local) = (unsafe { WEFT_ENDPOINTS.get(&key.local_ip_be) }).copied() else {
        return Ok(()); // not a meshed pod address
    };
    // SAFETY: copied out of the map.
    let remote = unsafe { WEFT_ENDPOINTS.get(&key.remote_ip_be) }.copied();

    // The entry is filled in place: a FlowEntry built on the BPF stack lowers to a `memset` call.
    if WEFT_FLOWS.insert(&key, &ZERO_FLOW_VALUE, 0).is_err() {
        stats::bump(global_counter::FLOWS_FULL);
    }
    let mut remote_workload = remote.map_or(0, |r| r.workload_id);
    let mut flow_verdict = verdict::PASS;
    if let Some(flow) = WEFT_FLOWS.get_ptr_mut(&key) {
        // SAFETY: valid map value of a socket that is being established: no concurrent writer.
        let flow = unsafe { &mut *flow };
        flow.local_workload = local.workload_id;
        flow.remote_workload = remote_workload;
        flow.role = my_role;
        flow.state = flow_state::OPEN;
        // SAFETY: helper without arguments.
        flow.opened_ns = unsafe { bpf_ktime_get_ns() };
        if my_role == role::CLIENT {
            // SAFETY: valid sock_ops context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: copied out of the map.
            if let Some(info) = unsafe { WEFT_CONNECTS.get(&cookie) }.copied() {
                flow.verdict = info.verdict;
                flow.reason = info.reason;
                flow.rule_id = info.rule_id;
                flow.service_id = info.service_id;
                flow.orig_dst_ip_be = info.orig_dst_ip_be;
                flow.orig_dst_port_be = info.orig_dst_port_be;
                if info.reason == reason::TUNNEL && info.dst_workload != 0 {
                    // Plain L4 to another node's pod, carried by the engine's tunnel: the
                    // socket's peer is the engine, its traffic is the pair's it was meant for.
                    remote_workload = info.dst_workload;
                    flow.remote_workload = remote_workload;
                }
                if info.verdict == verdict::L7 {
                    // Published before this socket's final ACK leaves, so before the engine
                    // can accept the connection.
                    let client = ClientAddr {
                        ip_be: key.local_ip_be,
                        port_host: key.local_port_host,
                    };
                    let _ = WEFT_L7ORIG.insert(&client, &info, 0);
                }
                let _ = WEFT_CONNECTS.remove(&cookie);
            } else if local.workload_id == ENGINE_WORKLOAD {
                flow.verdict = verdict::L7;
                flow.reason = reason::ENGINE;
            } else {
                flow.reason = reason::UNMESHED_SOURCE;
            }
        } else {
            // The client socket, if it is on this node, already carries the verdict.
            // SAFETY: copied out of the map.
            if let Some(client) = unsafe { WEFT_FLOWS.get(&key.peer()) } {
                flow.verdict = client.verdict;
                flow.rule_id = client.rule_id;
                flow.service_id = client.service_id;
                if local.workload_id == ENGINE_WORKLOAD && client.reason == reason::TUNNEL {
                    // The engine's end of a tunnelled client's socket: what it sends back is
                    // the remote pod's answer, counted for that pair.
                    flow.local_workload = client.remote_workload;
                }
            }
            flow.reason = reason::INBOUND;
        }
        flow_verdict = flow.verdict;
    }
    if my_role == role::CLIENT {
        stats::pair(local.workload_id, remote_workload, |s| s.conns_opened += 1);
    } else if remote.is_none() {
        stats::pair(0, local.workload_id, |s| s.conns_opened += 1);
    }
    // One event per connection: its client's socket, or the server's for a client from
    // outside the mesh.
    if (my_role == role::CLIENT || remote.is_none()) && events::watching() {
        // SAFETY: copied out of the map.
        if let Some(flow) = unsafe { WEFT_FLOWS.get(&key) } {
            events::emit(&events::of_flow(event_kind::OPEN, &key, flow, 0));
        }
    }
    // Ask for state callbacks so the close is seen.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);

    // Fast path eligibility: both ends meshed on this node, the verdict allows it, and the fast
    // path is on. A socket that will not use the fast path stays out of the sockhash entirely:
    // joining it gives the socket a psock and the tcp_bpf socket operations, which is only
    // worth it (and only exercised by our tests) when messages are redirected.
    // Legs to and from the engine (L7 and the tunnel's) are eligible too: the engine moves a leg
    // off the fast path when it sees a bulk transfer on it (sk_msg, `WEFT_SHEDFLOWS`), since a
    // redirect has no flow control and bulk senders into the tunnel outrun the engine's TLS.
    let allowed =
        flow_verdict == verdict::FAST || flow_verdict == verdict::L7 || my_role == role::SERVER;
    let enabled = fast_path_on();
    if !enabled {
        if let Some(flow) = WEFT_FLOWS.get_ptr_mut(&key) {
            // SAFETY: valid map value; see above.
            unsafe { (*flow).fast = fast_state::SLOW };
        }
    }
    // A pod of another node (reached through the tunnel, or in plaintext) is never a local peer.
    // Both workloads must be allowed on the socket fast path: joining the sockhash changes the
    // socket's receive side (see `endpoint_flags::SOCKET_FAST`).
    let remote_is_local = remote.is_some_and(|r| {
        r.flags & endpoint_flags::REMOTE == 0 && r.flags & endpoint_flags::SOCKET_FAST != 0
    });
    let local_socket_fast = local.flags & endpoint_flags::SOCKET_FAST != 0;
    if remote_is_local && local_socket_fast && allowed && enabled {
        // SAFETY: the context pointer is a valid bpf_sock_ops for the program's lifetime.
        let ops = unsafe { &mut *ctx.ops };
        if WEFT_SOCKS
            .update(&mut key, ops, u64::from(BPF_ANY))
            .is_err()
        {
            stats::bump(global_counter::SOCKHASH_FULL);
            warn!(
                ctx,
                "sockhash refused {:i}:{}: the socket stays on the normal stack",
                u32::from_be(key.local_ip_be),
                key.local_port_host
            );
            return Ok(());
        }
        debug!(
            ctx,
            "established {:i}:{} to {:i}:{}: role {}, verdict {}: joins the socket fast path",
            u32::from_be(key.local_ip_be),
            key.local_port_host,
            u32::from_be(key.remote_ip_be),
            key.remote_port_host,
            my_role,
            flow_verdict
        );
    }
    Ok(())
}

/// Notes a FIN sent or received on the socket's flow entry.
#[inline(always)]
fn mark_fin(ctx: &SockOpsContext, bit: u8) -> Result<(), ()> {
    let key = sock_key(ctx);
    if let Some(flow) = WEFT_FLOWS.get_ptr_mut(&key) {
        // SAFETY: valid map value; the socket is locked while its state changes.
        unsafe { (*flow).fin |= bit };
    }
    Ok(())
}

#[inline(always)]
fn closed(ctx: &SockOpsContext) -> Result<(), ()> {
    // SAFETY: valid sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = WEFT_REVNAT.remove(&cookie);
    let key = sock_key(ctx);
    let client = ClientAddr {
        ip_be: key.local_ip_be,
        port_host: key.local_port_host,
    };
    let _ = WEFT_L7ORIG.remove(&client);
    // An engine request this socket never acted on (it closed first) must not move a later
    // connection with the same addresses off the fast path.
    let _ = WEFT_SHEDFLOWS.remove(&key);
    let Some(flow) = WEFT_FLOWS.get_ptr_mut(&key) else {
        return Ok(());
    };
    // SAFETY: valid map value; the socket is locked while its state changes, so this socket's
    // entry has no concurrent writer.
    let flow = unsafe { &mut *flow };
    if flow.state == flow_state::CLOSED {
        return Ok(());
    }
    flow.state = flow_state::CLOSED;
    // SAFETY: helper without arguments.
    flow.closed_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: plain field loads from the context.
    let (received, acked, snd_una, snd_nxt) = unsafe {
        let ops = &*ctx.ops;
        (
            ops.bytes_received,
            ops.bytes_acked,
            ops.snd_una,
            ops.snd_nxt,
        )
    };
    // The stack's counters count sequence numbers: the client's SYN (acknowledged by the
    // SYN-ACK; a server's SYN-ACK is not counted), each FIN sent once acknowledged, the peer's
    // FIN once received. Payload leaves them out. A close from FIN_WAIT2 is the one into
    // TIME_WAIT after the peer's FIN (else a FIN_WAIT2 timeout or a reset: one byte too few).
    if ctx.arg(0) == BPF_TCP_FIN_WAIT2 {
        flow.fin |= fin_flags::RECEIVED;
    }
    let syn = u64::from(flow.role == role::CLIENT);
    let fin_acked = u64::from(flow.fin & fin_flags::SENT != 0 && snd_una == snd_nxt);
    let acked = acked.saturating_sub(syn + fin_acked);
    let received = received.saturating_sub(u64::from(flow.fin & fin_flags::RECEIVED != 0));
    flow.rx_stack_bytes = received;
    let (src, dst, is_client) = if flow.role == role::CLIENT {
        (flow.local_workload, flow.remote_workload, true)
    } else {
        (flow.remote_workload, flow.local_workload, false)
    };
    // A socket the sk_msg program never saw (sockhash full, peer off-node) is counted from the
    // TCP stack's own byte counters at close.
    let late_bytes = if flow.tx_msgs == 0 { acked } else { 0 };
    if late_bytes > 0 {
        flow.tx_bytes = late_bytes;
    }
    let count_conn = is_client || flow.remote_workload == 0;
    if count_conn && events::watching() {
        // What this socket received: through the stack, plus what its peer (a local socket)
        // redirected straight into it.
        // SAFETY: copied out of the map.
        let redirected_in = unsafe { WEFT_FLOWS.get(&key.peer()) }.map_or(0, |p| p.tx_fast_bytes);
        let mut event = events::of_flow(event_kind::CLOSE, &key, flow, received + redirected_in);
        event.fast_bytes += redirected_in;
        events::emit(&event);
    }
    stats::pair(src, dst, |s| {
        if count_conn {
            s.conns_closed += 1;
        }
        if is_client {
            s.bytes_to_dst += late_bytes;
        } else {
            s.bytes_to_src += late_bytes;
        }
    });
    Ok(())
}
