//! cgroup/connect4 and cgroup/connect6: the per-flow verdict at connect() time, and service load
//! balancing.
//!
//! Runs for every TCP connect() in the node's cgroup subtree: IPv4 sockets, and IPv6 sockets
//! connecting to a v4-mapped address (`::ffff:a.b.c.d`, what Go, Java and Node clients do by
//! default on a dual-stack socket) — the same decision, so a policy cannot be bypassed by the
//! address family. The source workload is the pod cgroup of the calling task; a service VIP is
//! rewritten to one backend here, once, so packets carry the backend address and need no
//! per-packet NAT. Returning 0 makes connect() fail with EPERM (that is the DENY verdict); every
//! internal error returns 1 (leave the connect alone).
use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::{debug, info};
use mesh_common::{
    Backend, BackendKey, CONFIG_INDEX, ConnectInfo, DenyKey, DenyValue,
    ENGINE_HEARTBEAT_MAX_AGE_NS, PolicyKey, ServiceKey, SockKey, endpoint_flags, global_counter,
    reason, service_flags, verdict,
};

use crate::{
    events,
    maps::{
        WEFT_BACKENDS, WEFT_CGROUPS, WEFT_CONFIG, WEFT_CONNECTS, WEFT_DENIES, WEFT_ENDPOINTS,
        WEFT_NETNS, WEFT_POLICY, WEFT_REVNAT, WEFT_SERVICES,
    },
    stats,
};

const IPPROTO_TCP: u32 = 6;
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
/// The third word of a v4-mapped IPv6 address (`::ffff:0:0/96`), as stored.
const V4_MAPPED_BE: u32 = 0x0000_ffff_u32.to_be();

/// The IPv4 destination of a sock_addr context: `user_ip4`, or for an IPv6 socket the IPv4
/// address inside a v4-mapped `user_ip6` (`None` for any other IPv6 address: not the mesh's).
#[inline(always)]
fn user_ipv4<const V6: bool>(ctx: &SockAddrContext) -> Option<u32> {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's lifetime; fields are plain loads
    // (word by word for the IPv6 address, as the verifier requires).
    unsafe {
        if V6 {
            let w = &(*sa).user_ip6;
            (w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_BE).then_some(w[3])
        } else {
            Some((*sa).user_ip4)
        }
    }
}

/// Rewrites the destination of a sock_addr context to an IPv4 address (v4-mapped on an IPv6
/// socket; the mapping prefix is already there, see [`user_ipv4`]).
#[inline(always)]
fn set_user_ipv4<const V6: bool>(ctx: &SockAddrContext, ip_be: u32, port_be: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_ip6 and user_port are writable in connect and getpeername programs.
    unsafe {
        if V6 {
            (*sa).user_ip6[3] = ip_be;
        } else {
            (*sa).user_ip4 = ip_be;
        }
        (*sa).user_port = u32::from(port_be);
    }
}

#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    try_connect::<false>(&ctx).unwrap_or(ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    try_connect::<true>(&ctx).unwrap_or(ALLOW)
}

#[inline(always)]
fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> Result<i32, ()> {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's lifetime; fields are plain loads.
    if unsafe { (*sa).protocol } != IPPROTO_TCP {
        return Ok(ALLOW);
    }
    let Some(orig_ip_be) = user_ipv4::<V6>(ctx) else {
        return Ok(ALLOW); // a native IPv6 destination: no meshed pod has one
    };
    // SAFETY: see above.
    let orig_port_be = unsafe { (*sa).user_port } as u16;
    let (mut dst_ip_be, mut dst_port_be) = (orig_ip_be, orig_port_be);

    // Service VIP → one backend, chosen uniformly at random. This is service routing (what
    // kube-proxy does), so it applies to every pod of the node, meshed or not.
    let svc_key = ServiceKey {
        vip_be: orig_ip_be,
        port_be: orig_port_be,
        _pad: 0,
    };
    let mut service_id = 0;
    let mut l7_service = false;
    let mut l7_fail_closed = false;
    let src = source_identity(ctx);
    // SAFETY: copied out of the map.
    if let Some(svc) = unsafe { WEFT_SERVICES.get(&svc_key) }.copied() {
        service_id = svc.service_id;
        l7_service = svc.flags & service_flags::L7 != 0;
        l7_fail_closed = svc.flags & service_flags::L7_FAIL_CLOSED != 0;
        if svc.backend_count == 0 {
            stats::bump(global_counter::NO_BACKEND);
            // Left as is: the VIP is not routable from a pod, so connect() fails with
            // ENETUNREACH, much like kube-proxy's reject for a service without endpoints.
            return Ok(ALLOW);
        }
        // A STRICT pod of another node is reachable only through this node's engine: while
        // the engine is down (an agent restart) or for a client outside the mesh, prefer a
        // backend the connection can reach. Up to PROBES slots after a random one.
        let tunnel_ok = src.is_some() && engine_alive();
        // SAFETY: helper without arguments.
        let first = unsafe { bpf_get_prandom_u32() } % svc.backend_count;
        let mut chosen = None;
        for i in 0..PROBES {
            if i >= svc.backend_count {
                break;
            }
            let bkey = BackendKey {
                service_id: svc.service_id,
                slot: (first + i) % svc.backend_count,
            };
            // SAFETY: copied out of the map.
            let Some(b) = (unsafe { WEFT_BACKENDS.get(&bkey) }).copied() else {
                break;
            };
            if chosen.is_none() {
                chosen = Some(b);
            }
            if tunnel_ok || reachable_without_tunnel(b.ip_be) {
                chosen = Some(b);
                break;
            }
        }
        let Some(backend) = chosen else {
            stats::bump(global_counter::NO_BACKEND);
            return Ok(ALLOW);
        };
        dst_ip_be = backend.ip_be;
        dst_port_be = backend.port_be;
        set_user_ipv4::<V6>(ctx, dst_ip_be, dst_port_be);
        // SAFETY: the context is a valid sock_addr context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let vip = Backend {
            ip_be: orig_ip_be,
            port_be: orig_port_be,
            _pad: 0,
        };
        let _ = WEFT_REVNAT.insert(&cookie, &vip, 0);
    }

    let Some(src) = src else {
        return Ok(ALLOW); // unmeshed pod: PASS
    };
    let mut info = ConnectInfo {
        src_workload: src.workload_id,
        dst_workload: 0,
        rule_id: 0,
        orig_dst_ip_be: orig_ip_be,
        orig_dst_port_be: orig_port_be,
        verdict: verdict::PASS,
        reason: reason::OUTSIDE_MESH,
        service_id,
    };

    // SAFETY: copied out of the map.
    let dst = unsafe { WEFT_ENDPOINTS.get(&dst_ip_be) }.copied();
    let mut dst_flags = 0;
    match dst {
        None => {
            info.verdict = verdict::PASS;
            info.reason = reason::OUTSIDE_MESH;
        }
        Some(dst) => {
            info.dst_workload = dst.workload_id;
            dst_flags = dst.flags;
            decide(&mut info, dst_port_be);
        }
    }

    if info.verdict == verdict::DENY {
        record_deny(ctx, &info, dst_ip_be, dst_port_be, info.reason);
        return Ok(REFUSE);
    }
    if info.verdict == verdict::AUDIT {
        // A dry-run policy would deny this: recorded like a denial, then allowed.
        record_deny(ctx, &info, dst_ip_be, dst_port_be, reason::DRY_RUN);
        stats::bump(global_counter::DRY_RUN_WOULD_DENY);
        info.verdict = verdict::FAST;
    }
    let remote = dst_flags & endpoint_flags::REMOTE != 0;
    if l7_service || remote {
        if redirect_to_engine::<V6>(ctx, &mut info) {
            if !l7_service {
                // Plain L4 to another node's pod: the engine tunnels to the backend the kernel
                // chose (no second load-balancing decision, no HTTP parsing).
                info.orig_dst_ip_be = dst_ip_be;
                info.orig_dst_port_be = dst_port_be;
                info.reason = reason::TUNNEL;
                stats::bump(global_counter::TUNNEL_REDIRECT);
            }
        } else if l7_service && l7_fail_closed {
            // Fail closed: the service's L7 authorization is not skipped while the engine is down.
            info.verdict = verdict::DENY;
            info.reason = reason::ENGINE_DOWN;
            record_deny(ctx, &info, dst_ip_be, dst_port_be, reason::ENGINE_DOWN);
            return Ok(REFUSE);
        } else if remote && dst_flags & endpoint_flags::STRICT != 0 {
            // Fail closed: a meshed flow never leaves the node in plaintext towards a STRICT pod.
            info.verdict = verdict::DENY;
            info.reason = reason::TUNNEL_DOWN;
            record_deny(ctx, &info, dst_ip_be, dst_port_be, reason::TUNNEL_DOWN);
            return Ok(REFUSE);
        }
    }
    // SAFETY: the context is a valid sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = WEFT_CONNECTS.insert(&cookie, &info, 0);
    debug!(
        ctx,
        "connect: workload {} to {:i}:{} (service {}): verdict {}, reason {}, rule {}",
        info.src_workload,
        u32::from_be(dst_ip_be),
        u16::from_be(dst_port_be),
        info.service_id,
        info.verdict,
        info.reason,
        info.rule_id
    );
    Ok(ALLOW)
}

/// Deepest cgroup level whose ancestors are searched for a pod's identity.
const MAX_CGROUP_LEVEL: i32 = 12;

/// The workload of the calling task: its own cgroup's identity, else the nearest ancestor's. The
/// agent maps pod cgroups (and the containers it has seen below them); a container started since
/// its last pass is still found through its pod's cgroup, so a pod's first connection carries
/// its identity.
#[inline(always)]
fn source_identity(ctx: &SockAddrContext) -> Option<mesh_common::CgroupIdentity> {
    // SAFETY: helper without arguments.
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: map values are read-only here and copied out.
    if let Some(id) = unsafe { WEFT_CGROUPS.get(&leaf) }.copied() {
        return Some(id);
    }
    let mut level = MAX_CGROUP_LEVEL;
    while level > 0 {
        // SAFETY: helper with a plain integer argument; 0 means "no ancestor at that level".
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor != 0 && ancestor != leaf {
            // SAFETY: as above.
            if let Some(id) = unsafe { WEFT_CGROUPS.get(&ancestor) }.copied() {
                return Some(id);
            }
        }
        level -= 1;
    }
    // A pod the CNI plugin enrolled is known by its network namespace from the start.
    // SAFETY: the context is a valid sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: as above.
    unsafe { WEFT_NETNS.get(&netns) }.copied()
}

/// Backend slots looked at per connect when the first is not reachable (see `try_connect`).
const PROBES: u32 = 8;

/// Whether the node's engine heartbeat is recent (connections may be sent to it).
#[inline(always)]
fn engine_alive() -> bool {
    let Some(cfg) = WEFT_CONFIG.get(CONFIG_INDEX) else {
        return false;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    cfg.engine_ip_be != 0 && now.saturating_sub(cfg.engine_seen_ns) <= ENGINE_HEARTBEAT_MAX_AGE_NS
}

/// Whether a connection can reach `ip_be` without this node's tunnel: anything but a STRICT
/// meshed pod of another node.
#[inline(always)]
fn reachable_without_tunnel(ip_be: u32) -> bool {
    const REMOTE_STRICT: u32 = endpoint_flags::REMOTE | endpoint_flags::STRICT;
    // SAFETY: copied out of the map.
    unsafe { WEFT_ENDPOINTS.get(&ip_be) }.is_none_or(|e| e.flags & REMOTE_STRICT != REMOTE_STRICT)
}

/// A meshed client's connection to a service with L7 policy goes to the node's engine instead;
/// sock_ops publishes the original destination for the engine once the client's port is known.
/// Without a live engine (no recent heartbeat) the connection goes to the backend chosen above
/// and this returns false.
#[inline(always)]
fn redirect_to_engine<const V6: bool>(ctx: &SockAddrContext, info: &mut ConnectInfo) -> bool {
    let Some(cfg) = WEFT_CONFIG.get(CONFIG_INDEX) else {
        return false;
    };
    if cfg.engine_ip_be == 0 {
        return false;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(cfg.engine_seen_ns) > ENGINE_HEARTBEAT_MAX_AGE_NS {
        stats::bump(global_counter::L7_ENGINE_DOWN);
        return false;
    }
    set_user_ipv4::<V6>(ctx, cfg.engine_ip_be, cfg.engine_port_be);
    info.verdict = verdict::L7;
    info.reason = reason::L7_SERVICE;
    stats::bump(global_counter::L7_REDIRECT);
    true
}

/// Policy lookup: exact port, then any port, then the node default.
#[inline(always)]
fn decide(info: &mut ConnectInfo, dst_port_be: u16) {
    let mut key = PolicyKey {
        src_workload: info.src_workload,
        dst_workload: info.dst_workload,
        dst_port_host: u16::from_be(dst_port_be),
        _pad: 0,
    };
    // SAFETY: copied out of the map.
    let mut hit = unsafe { WEFT_POLICY.get(&key) }.copied();
    if hit.is_none() {
        key.dst_port_host = 0;
        // SAFETY: copied out of the map.
        hit = unsafe { WEFT_POLICY.get(&key) }.copied();
    }
    if let Some(p) = hit {
        info.verdict = p.verdict;
        info.rule_id = p.rule_id;
        info.reason = reason::POLICY;
    } else {
        info.verdict = WEFT_CONFIG
            .get(CONFIG_INDEX)
            .map_or(verdict::FAST, |c| c.default_verdict);
        info.reason = reason::DEFAULT;
    }
}

/// Records a refused attempt (or, with reason `DRY_RUN`, one a dry-run policy would refuse:
/// listed, but not counted as denied).
#[inline(always)]
fn record_deny(
    ctx: &SockAddrContext,
    info: &ConnectInfo,
    dst_ip_be: u32,
    dst_port_be: u16,
    why: u8,
) {
    info!(
        ctx,
        "connect refused: workload {} to {:i}:{}, reason {}, rule {}",
        info.src_workload,
        u32::from_be(dst_ip_be),
        u16::from_be(dst_port_be),
        why,
        info.rule_id
    );
    if why != reason::DRY_RUN {
        stats::pair(info.src_workload, info.dst_workload, |s| {
            s.conns_denied += 1
        });
    }
    let key = DenyKey {
        src_workload: info.src_workload,
        dst_workload: info.dst_workload,
        dst_ip_be,
        dst_port_be,
        _pad: 0,
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if events::watching() {
        events::emit_deny(
            now,
            info,
            SockKey {
                local_ip_be: 0,
                remote_ip_be: dst_ip_be,
                local_port_host: 0,
                remote_port_host: u32::from(u16::from_be(dst_port_be)),
            },
            why,
        );
    }
    if let Some(v) = WEFT_DENIES.get_ptr_mut(&key) {
        // SAFETY: valid map value; a lost increment under a cross-CPU race only undercounts
        // the recent-denials table (the per-CPU pair counter above is exact).
        unsafe {
            (*v).count += 1;
            (*v).last_ns = now;
            (*v).rule_id = info.rule_id;
            (*v).reason = why;
        }
    } else {
        let v = DenyValue {
            count: 1,
            last_ns: now,
            rule_id: info.rule_id,
            reason: why,
            _pad0: 0,
            _pad1: 0,
        };
        let _ = WEFT_DENIES.insert(&key, &v, 0);
    }
}

/// getpeername() on a socket whose connect() was load-balanced answers with the service address
/// the application asked for.
#[cgroup_sock_addr(getpeername4)]
pub fn weft_getpeer4(ctx: SockAddrContext) -> i32 {
    reverse_nat::<false>(&ctx);
    1
}

/// The same for an IPv6 socket that connected to a v4-mapped service address.
#[cgroup_sock_addr(getpeername6)]
pub fn weft_getpeer6(ctx: SockAddrContext) -> i32 {
    reverse_nat::<true>(&ctx);
    1
}

#[inline(always)]
fn reverse_nat<const V6: bool>(ctx: &SockAddrContext) {
    // SAFETY: the context is a valid sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out of the map.
    if let Some(vip) = unsafe { WEFT_REVNAT.get(&cookie) }.copied() {
        // Only a socket connect rewrote has an entry, so the peer is v4-mapped on IPv6.
        set_user_ipv4::<V6>(ctx, vip.ip_be, vip.port_be);
    }
}
