//! Live flow events (`weft tap`, `weft top`): one [`FlowEvent`] per connection opened, closed,
//! refused or moved off the fast path, written into a ring buffer the agent reads. Only while
//! the agent asks (someone watches, [`config_flags::EVENTS`]): otherwise each hook pays one
//! array lookup it already made. A full buffer loses the event (counted), never traffic.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::RingBuf};
use mesh_common::{
    CONFIG_INDEX, Config, ConnectInfo, FlowEntry, FlowEvent, SockKey, capacity, config_flags,
    event_kind, global_counter, reason, role, verdict,
};

use crate::{maps::WEFT_CONFIG, stats};

#[map]
pub static WEFT_EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);

/// Whether someone watches live events.
#[inline(always)]
pub fn watching() -> bool {
    WEFT_CONFIG
        .get(CONFIG_INDEX)
        .is_some_and(|c: &Config| c.flags & config_flags::EVENTS != 0)
}

/// An event about the socket `key` from its flow entry (every field written: a struct built
/// field by field on the BPF stack needs no `memset`).
#[inline(always)]
pub fn of_flow(kind: u8, key: &SockKey, flow: &FlowEntry, rx_bytes: u64) -> FlowEvent {
    FlowEvent {
        // SAFETY: helper without arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        opened_ns: flow.opened_ns,
        tx_bytes: flow.tx_bytes,
        rx_bytes,
        fast_bytes: flow.tx_fast_bytes,
        key: *key,
        local_workload: flow.local_workload,
        remote_workload: flow.remote_workload,
        rule_id: flow.rule_id,
        service_id: flow.service_id,
        orig_dst_ip_be: flow.orig_dst_ip_be,
        orig_dst_port_be: flow.orig_dst_port_be,
        kind,
        verdict: flow.verdict,
        reason: flow.reason,
        role: flow.role,
        fast: flow.fast,
        _pad0: 0,
        _pad1: 0,
    }
}

/// Hands `event` to the agent, or counts it lost when the buffer is full.
#[inline(always)]
pub fn emit(event: &FlowEvent) {
    if WEFT_EVENTS.output::<FlowEvent>(event, 0).is_err() {
        stats::bump(global_counter::EVENTS_LOST);
    }
}

/// A refused `connect()` (or one a dry-run policy would refuse, `why` = `DRY_RUN`). Written in
/// place, field by field with volatile stores: a struct of this many zeros built any other way
/// lowers to a `memset` call, which BPF has not.
#[inline(always)]
pub fn emit_deny(now: u64, info: &ConnectInfo, key: SockKey, why: u8) {
    let Some(mut entry) = WEFT_EVENTS.reserve::<FlowEvent>(0) else {
        stats::bump(global_counter::EVENTS_LOST);
        return;
    };
    let e = entry.as_mut_ptr();
    macro_rules! put {
        ($($field:ident = $value:expr),* $(,)?) => {
            // SAFETY: `e` points at a reserved, writable entry of the ring buffer.
            $(unsafe { core::ptr::addr_of_mut!((*e).$field).write_volatile($value) };)*
        };
    }
    put!(
        ktime_ns = now,
        opened_ns = now,
        tx_bytes = 0,
        rx_bytes = 0,
        fast_bytes = 0,
        key = key,
        local_workload = info.src_workload,
        remote_workload = info.dst_workload,
        rule_id = info.rule_id,
        service_id = info.service_id,
        orig_dst_ip_be = info.orig_dst_ip_be,
        orig_dst_port_be = info.orig_dst_port_be,
        kind = event_kind::DENY,
        verdict = if why == reason::DRY_RUN {
            verdict::AUDIT
        } else {
            verdict::DENY
        },
        reason = why,
        role = role::CLIENT,
        fast = 0,
        _pad0 = 0,
        _pad1 = 0,
    );
    entry.submit(0);
}
