//! The flow table users see (`/flows`, `weft flows`): kernel flow entries joined into
//! connections (client and server sockets of one connection become one row), named with the
//! node's state, plus a ring of recently closed flows and the recent denials.
use std::{
    collections::{BTreeMap, VecDeque},
    net::Ipv4Addr,
};

use mesh_common::{
    DenyKey, DenyValue, FlowEntry, SockKey, fast_state, flow_state, reason, role, verdict,
};
use serde::{Deserialize, Serialize};

use crate::state::{NodeState, RuleId, ServiceId, WorkloadId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// `namespace/name` of the workload, if the address is one.
    pub workload: Option<String>,
    pub ip: Ipv4Addr,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    pub src: Peer,
    pub dst: Peer,
    /// `namespace/name:port` when the client connected to a service address.
    pub service: Option<String>,
    /// PASS, FAST, DENY or L7.
    pub verdict: String,
    /// Why: the policy rule, the mesh default, or why the flow is outside the mesh.
    pub reason: String,
    /// The way its bytes went: `fast` (socket to socket in the kernel), `kernel` (meshed, the
    /// normal stack), `l7` (through the engine), `tunnel` (to another node, mTLS), `denied`,
    /// `audit` (a dry-run policy would deny), `passthrough` (outside the mesh).
    #[serde(default)]
    pub path: String,
    /// open, closed or denied.
    pub state: String,
    /// Whether payload went socket-to-socket in the kernel (`None`: nothing sent yet).
    pub fast_path: Option<bool>,
    pub bytes_to_dst: u64,
    pub bytes_to_src: u64,
    pub fast_bytes: u64,
    /// Denied attempts folded into this row.
    pub attempts: u64,
    /// Milliseconds since the Unix epoch.
    pub opened_ms: u64,
    pub closed_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FlowSnapshot {
    pub live: Vec<FlowView>,
    pub recent: Vec<FlowView>,
    pub denied: Vec<FlowView>,
}

/// Converts the kernel's monotonic timestamps to wall-clock milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    offset_ns: i128,
}

impl Clock {
    #[must_use]
    pub fn now() -> Self {
        use nix::time::{ClockId, clock_gettime};
        let ns = |c| {
            clock_gettime(c).map_or(0, |t| {
                i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
            })
        };
        Self {
            offset_ns: ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_MONOTONIC),
        }
    }

    #[must_use]
    pub fn wall_ms(self, ktime_ns: u64) -> u64 {
        u64::try_from((i128::from(ktime_ns) + self.offset_ns) / 1_000_000).unwrap_or(0)
    }
}

#[must_use]
pub fn verdict_name(v: u8) -> &'static str {
    match v {
        verdict::FAST => "FAST",
        verdict::DENY => "DENY",
        verdict::L7 => "L7",
        _ => "PASS",
    }
}

fn reason_text(state: &NodeState, reason_code: u8, rule_id: u32) -> String {
    match reason_code {
        reason::UNMESHED_SOURCE => "source is not meshed".into(),
        reason::OUTSIDE_MESH => "destination is outside the mesh".into(),
        reason::POLICY => state.rule(RuleId(rule_id)).map_or_else(
            || format!("policy rule #{rule_id}"),
            |r| r.description.clone(),
        ),
        reason::DEFAULT => "no policy selects the destination: mesh default (allow)".into(),
        reason::NO_BACKEND => "service has no ready backend".into(),
        reason::INBOUND => "inbound from outside the mesh".into(),
        reason::L7_SERVICE => "destination service has L7 policy: sent to the L7 engine".into(),
        reason::ENGINE => "L7 engine to a backend".into(),
        reason::TUNNEL => "to another node's pod, through the mTLS tunnel".into(),
        reason::TUNNEL_DOWN => "STRICT pod on another node, tunnel down: refused".into(),
        reason::ENGINE_DOWN => {
            "L7 engine down and the service's L7 policy fails closed: refused".into()
        }
        reason::DRY_RUN => state.rule(RuleId(rule_id)).map_or_else(
            || format!("dry-run policy rule #{rule_id}"),
            |r| format!("{} (dry run: not enforced)", r.description),
        ),
        other => format!("reason {other}"),
    }
}

/// How a flow's bytes went (see [`FlowView::path`]).
#[must_use]
pub fn path_name(verdict_code: u8, reason_code: u8, fast: u8) -> &'static str {
    match (verdict_code, reason_code) {
        (verdict::DENY, _) => "denied",
        (_, reason::TUNNEL) => "tunnel",
        (verdict::L7, _) | (_, reason::ENGINE) => "l7",
        (_, reason::DRY_RUN) => "audit",
        (verdict::FAST, _) if fast == fast_state::FAST => "fast",
        (verdict::FAST, _) => "kernel",
        _ => "passthrough",
    }
}

fn ip(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(be))
}

fn peer(state: &NodeState, ip_be: u32, port: u16) -> Peer {
    let addr = ip(ip_be);
    Peer {
        workload: state.workload_by_ip(addr).map(crate::state::Workload::key),
        ip: addr,
        port,
    }
}

/// For a client socket the kernel redirected to the engine: the destination its application
/// asked for (a service address, or the remote pod the tunnel carries it to), as address
/// (big-endian) and port; the socket's own peer is the engine.
fn asked_for(
    is_client: bool,
    verdict_code: u8,
    (ip_be, port_be): (u32, u16),
) -> Option<(u32, u16)> {
    (is_client && verdict_code == verdict::L7 && ip_be != 0).then(|| (ip_be, u16::from_be(port_be)))
}

fn service_name(state: &NodeState, id: u32) -> Option<String> {
    state
        .service(ServiceId(id))
        .map(|s| format!("{}/{}:{}", s.namespace, s.name, s.port))
}

/// Keeps the recent (closed) flows between polls.
#[derive(Debug)]
pub struct FlowTable {
    recent: VecDeque<(SockKey, FlowView)>,
    capacity: usize,
    clock: Clock,
}

impl FlowTable {
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            recent: VecDeque::new(),
            capacity,
            clock: Clock::now(),
        }
    }

    /// Folds one poll of the kernel's flow map into the table and returns the current view.
    pub fn update(
        &mut self,
        entries: &[(SockKey, FlowEntry)],
        denies: &[(DenyKey, DenyValue)],
        state: &NodeState,
    ) -> FlowSnapshot {
        let by_key: BTreeMap<SockKey, &FlowEntry> = entries.iter().map(|(k, f)| (*k, f)).collect();
        let mut live = Vec::new();
        for (key, f) in entries {
            if f.role == role::SERVER {
                if by_key
                    .get(&key.peer())
                    .is_some_and(|c| c.role == role::CLIENT)
                {
                    continue; // shown with its client socket
                }
                // Server socket whose client closed earlier: complete that recent row.
                if let Some((_, row)) = self.recent.iter_mut().find(|(k, _)| *k == key.peer()) {
                    row.bytes_to_src = f.tx_bytes;
                    continue;
                }
            }
            let server = by_key.get(&key.peer()).copied();
            let view = self.view(state, key, f, server);
            if f.state == flow_state::CLOSED {
                self.remember(*key, view);
            } else {
                live.push(view);
            }
        }
        let mut denied_rows: Vec<FlowView> = denies
            .iter()
            .map(|(k, v)| FlowView {
                src: Peer {
                    workload: state
                        .workload(WorkloadId(k.src_workload))
                        .map(crate::state::Workload::key),
                    ip: state
                        .workload(WorkloadId(k.src_workload))
                        .and_then(|w| w.ip)
                        .unwrap_or(Ipv4Addr::UNSPECIFIED),
                    port: 0,
                },
                dst: peer(state, k.dst_ip_be, u16::from_be(k.dst_port_be)),
                service: None,
                verdict: if v.reason == reason::DRY_RUN {
                    "AUDIT".into()
                } else {
                    "DENY".into()
                },
                reason: reason_text(state, v.reason, v.rule_id),
                path: if v.reason == reason::DRY_RUN {
                    "audit"
                } else {
                    "denied"
                }
                .into(),
                state: if v.reason == reason::DRY_RUN {
                    "would be denied (dry run): allowed".into()
                } else {
                    "denied".into()
                },
                fast_path: None,
                bytes_to_dst: 0,
                bytes_to_src: 0,
                fast_bytes: 0,
                attempts: v.count,
                opened_ms: self.clock.wall_ms(v.last_ns),
                closed_ms: None,
            })
            .collect();
        denied_rows.sort_by_key(|d| std::cmp::Reverse(d.opened_ms));
        live.sort_by_key(|f| f.opened_ms);
        FlowSnapshot {
            live,
            recent: self.recent.iter().map(|(_, v)| v.clone()).collect(),
            denied: denied_rows,
        }
    }

    fn remember(&mut self, key: SockKey, view: FlowView) {
        if self.recent.len() == self.capacity {
            self.recent.pop_front();
        }
        self.recent.push_back((key, view));
    }

    fn view(
        &self,
        state: &NodeState,
        key: &SockKey,
        f: &FlowEntry,
        server: Option<&FlowEntry>,
    ) -> FlowView {
        let local = peer(state, key.local_ip_be, key.local_port_host as u16);
        let is_client = f.role == role::CLIENT;
        let (remote_ip_be, remote_port) =
            asked_for(is_client, f.verdict, (f.orig_dst_ip_be, f.orig_dst_port_be))
                .unwrap_or((key.remote_ip_be, key.remote_port_host as u16));
        let remote = peer(state, remote_ip_be, remote_port);
        let (src, dst) = if is_client {
            (local, remote)
        } else {
            (remote, local)
        };
        let (to_dst, to_src) = if is_client {
            (f.tx_bytes, server.map_or(f.rx_stack_bytes, |s| s.tx_bytes))
        } else {
            (f.rx_stack_bytes, f.tx_bytes)
        };
        let fast_bytes = f.tx_fast_bytes + server.map_or(0, |s| s.tx_fast_bytes);
        FlowView {
            src,
            dst,
            service: (f.service_id != 0)
                .then(|| service_name(state, f.service_id))
                .flatten(),
            verdict: verdict_name(f.verdict).into(),
            reason: reason_text(state, f.reason, f.rule_id),
            path: path_name(f.verdict, f.reason, f.fast).into(),
            state: if f.state == flow_state::CLOSED {
                "closed"
            } else {
                "open"
            }
            .into(),
            fast_path: match f.fast {
                fast_state::FAST => Some(true),
                fast_state::SLOW => Some(false),
                _ => None,
            },
            bytes_to_dst: to_dst,
            bytes_to_src: to_src,
            fast_bytes,
            attempts: 1,
            opened_ms: self.clock.wall_ms(f.opened_ns),
            closed_ms: (f.closed_ns != 0).then(|| self.clock.wall_ms(f.closed_ns)),
        }
    }
}

/// The live event (`weft tap`) for one of the kernel's flow events, named with the node's state.
#[must_use]
pub fn event_of(e: &mesh_common::FlowEvent, state: &NodeState, clock: Clock) -> crate::tap::Event {
    use mesh_common::event_kind;

    use crate::tap::{Endpoint, Event, What};
    let end = |ip_be: u32, port: u32| {
        let p = peer(state, ip_be, u16::try_from(port).unwrap_or(0));
        Endpoint {
            workload: p.workload,
            ip: (ip_be != 0).then_some(p.ip),
            port: p.port,
        }
    };
    let local = end(e.key.local_ip_be, e.key.local_port_host);
    let is_client = e.role != role::SERVER;
    let remote = match asked_for(is_client, e.verdict, (e.orig_dst_ip_be, e.orig_dst_port_be)) {
        Some((ip_be, port)) => end(ip_be, u32::from(port)),
        None => end(e.key.remote_ip_be, e.key.remote_port_host),
    };
    let (mut src, dst) = if is_client {
        (local, remote)
    } else {
        (remote, local)
    };
    if src.workload.is_none() && e.kind == event_kind::DENY {
        // connect() was refused before the socket had an address: its workload is known.
        let w = state.workload(WorkloadId(e.local_workload));
        src.workload = w.map(crate::state::Workload::key);
        src.ip = w.and_then(|w| w.ip);
    }
    let verdict = if e.kind == event_kind::DENY && e.reason == reason::DRY_RUN {
        "AUDIT".to_owned()
    } else {
        verdict_name(e.verdict).to_owned()
    };
    let path = path_name(e.verdict, e.reason, e.fast).to_owned();
    let what = match e.kind {
        event_kind::OPEN => What::Open {
            verdict,
            reason: reason_text(state, e.reason, e.rule_id),
            path,
        },
        event_kind::CLOSE => {
            let (to_dst, to_src) = if is_client {
                (e.tx_bytes, e.rx_bytes)
            } else {
                (e.rx_bytes, e.tx_bytes)
            };
            What::Close {
                verdict,
                path,
                bytes_to_dst: to_dst,
                bytes_to_src: to_src,
                fast_bytes: e.fast_bytes,
                #[allow(clippy::cast_precision_loss, reason = "a duration in ms")]
                duration_ms: e.ktime_ns.saturating_sub(e.opened_ns) as f64 / 1e6,
            }
        }
        event_kind::DENY => What::Deny {
            verdict,
            reason: reason_text(state, e.reason, e.rule_id),
        },
        _ => What::Shed {
            reason: if usize::from(e.reason) == mesh_common::global_counter::BACKPRESSURE {
                "host TCP memory high: the socket moved to the normal stack".into()
            } else {
                "bulk transfer on an engine leg: the socket moved to the normal stack".into()
            },
        },
    };
    Event {
        time_ms: clock.wall_ms(e.ktime_ns),
        src,
        dst,
        service: (e.service_id != 0)
            .then(|| service_name(state, e.service_id))
            .flatten(),
        what,
    }
}
