//! Prometheus metrics. Kernel counters are read by the sync loop into a [`KernelSnapshot`]; the
//! collector encodes the latest snapshot at scrape time, so a scrape never touches a map.
//! Names carry the `weft_` prefix (from the sub-registry) and base units.
use std::sync::{Arc, Mutex};

use mesh_common::{IfStats, PairStats, global_counter};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

/// A pair of workloads as metric labels (names, not ids: ids are internal).
#[derive(Debug, Clone, Default)]
pub struct PairLabels {
    pub src_namespace: String,
    pub src_workload: String,
    pub dst_namespace: String,
    pub dst_workload: String,
}

impl PairLabels {
    fn labels(&self) -> Vec<(&'static str, String)> {
        vec![
            ("source_namespace", self.src_namespace.clone()),
            ("source_workload", self.src_workload.clone()),
            ("destination_namespace", self.dst_namespace.clone()),
            ("destination_workload", self.dst_workload.clone()),
        ]
    }
}

#[derive(Debug, Clone, Default)]
pub struct KernelSnapshot {
    pub pairs: Vec<(PairLabels, PairStats)>,
    /// (interface, pod `namespace/name` or empty, counters)
    pub interfaces: Vec<(String, String, IfStats)>,
    pub global: [u64; global_counter::COUNT],
    pub fast_path_enabled: bool,
    pub fast_path_killed: bool,
    pub sockhash_entries: usize,
    pub sockhash_capacity: u32,
    /// Program attachments pinned: (cgroup hooks, TC hooks on pod interfaces).
    pub links_attached: (usize, usize),
    /// Sockets still in the sockhash of an older datapath generation (connections made before
    /// an upgrade that changed its layout).
    pub retired_sockets: usize,
    pub workloads: usize,
    pub config_errors: usize,
    pub syncs: u64,
    pub sync_failures: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    snapshot: Arc<Mutex<KernelSnapshot>>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry
            .sub_registry_with_prefix("weft")
            .register_collector(Box::new(Collector_(metrics.snapshot.clone())));
        metrics
    }

    pub fn set(&self, snapshot: KernelSnapshot) {
        *self
            .snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = snapshot;
    }

    pub fn get(&self) -> KernelSnapshot {
        self.snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[derive(Debug)]
struct Collector_(Arc<Mutex<KernelSnapshot>>);

const EVENTS: [(usize, &str); global_counter::COUNT] = [
    (global_counter::MSG_FAST, "msg_fast_path"),
    (global_counter::MSG_SLOW_NO_PEER, "msg_stack_no_local_peer"),
    (global_counter::MSG_SLOW_DISABLED, "msg_stack_fast_path_off"),
    (global_counter::MSG_SLOW_STICKY, "msg_stack_sticky"),
    (global_counter::SOCKHASH_FULL, "sockhash_insert_failed"),
    (global_counter::FLOWS_FULL, "flow_table_insert_failed"),
    (global_counter::REDIRECT_FAILED, "redirect_failed"),
    (global_counter::NO_BACKEND, "service_without_backend"),
    (global_counter::L7_REDIRECT, "l7_redirect"),
    (global_counter::L7_ENGINE_DOWN, "l7_engine_down"),
    (global_counter::TUNNEL_REDIRECT, "tunnel_redirect"),
    (global_counter::STRICT_INBOUND_DROP, "strict_inbound_drop"),
    (global_counter::DRY_RUN_WOULD_DENY, "dry_run_would_deny"),
    (global_counter::BACKPRESSURE, "fast_path_shed"),
    (global_counter::FLOW_SHED, "fast_path_flow_shed"),
    (global_counter::EVENTS_LOST, "flow_event_lost"),
];

fn counter_family<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    for (labels, value) in rows {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Collector_ {
    #[allow(clippy::too_many_lines, reason = "one flat list of metric families")]
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let pair_rows =
            |f: fn(&PairStats) -> u64| s.pairs.iter().map(move |(l, p)| (l.labels(), f(p)));
        counter_family(
            &mut e,
            "tcp_connections_opened",
            "Meshed TCP connections established.",
            pair_rows(|p| p.conns_opened),
        )?;
        counter_family(
            &mut e,
            "tcp_connections_closed",
            "Meshed TCP connections closed.",
            pair_rows(|p| p.conns_closed),
        )?;
        counter_family(
            &mut e,
            "tcp_connections_denied",
            "connect() calls refused in the kernel by policy.",
            pair_rows(|p| p.conns_denied),
        )?;
        counter_family(
            &mut e,
            "tcp_connections_fast_path",
            "Connections whose client sent on the socket fast path.",
            pair_rows(|p| p.conns_fast),
        )?;
        counter_family(
            &mut e,
            "tcp_sent_bytes",
            "Payload bytes between meshed workloads, by direction.",
            s.pairs.iter().flat_map(|(l, p)| {
                let mut to_dst = l.labels();
                to_dst.push(("direction", "to_destination".into()));
                let mut to_src = l.labels();
                to_src.push(("direction", "to_source".into()));
                [(to_dst, p.bytes_to_dst), (to_src, p.bytes_to_src)]
            }),
        )?;
        counter_family(
            &mut e,
            "tcp_fast_path_bytes",
            "Payload bytes redirected socket-to-socket in the kernel.",
            pair_rows(|p| p.bytes_fast),
        )?;
        let if_rows = |from_pod: bool, udp: bool, bytes: bool| {
            s.interfaces.iter().map(move |(ifname, pod, st)| {
                let labels = vec![
                    ("interface", ifname.clone()),
                    ("pod", pod.clone()),
                    (
                        "direction",
                        if from_pod { "from_pod" } else { "to_pod" }.to_owned(),
                    ),
                ];
                let v = match (from_pod, udp, bytes) {
                    (true, false, true) => st.from_pod_bytes,
                    (true, false, false) => st.from_pod_packets,
                    (false, false, true) => st.to_pod_bytes,
                    (false, false, false) => st.to_pod_packets,
                    (true, true, true) => st.from_pod_udp_bytes,
                    (true, true, false) => st.from_pod_udp_packets,
                    (false, true, true) => st.to_pod_udp_bytes,
                    (false, true, false) => st.to_pod_udp_packets,
                };
                (labels, v)
            })
        };
        let both =
            |udp: bool, bytes: bool| if_rows(true, udp, bytes).chain(if_rows(false, udp, bytes));
        counter_family(
            &mut e,
            "interface_packets",
            "Packets on pod veths (host side), from TC.",
            both(false, false),
        )?;
        counter_family(
            &mut e,
            "interface_bytes",
            "Bytes on pod veths (host side), from TC.",
            both(false, true),
        )?;
        counter_family(
            &mut e,
            "interface_udp_packets",
            "IPv4 UDP datagrams on pod veths (host side), from TC: passed untouched, counted.",
            both(true, false),
        )?;
        counter_family(
            &mut e,
            "interface_udp_bytes",
            "Bytes of IPv4 UDP datagrams on pod veths (host side), from TC, with their headers.",
            both(true, true),
        )?;
        counter_family(
            &mut e,
            "datapath_events",
            "Datapath decisions and fallbacks counted in the kernel.",
            EVENTS
                .iter()
                .map(|(i, name)| (vec![("event", (*name).to_owned())], s.global[*i])),
        )?;
        gauge(
            &mut e,
            "fast_path_enabled",
            "1 when the mesh config enables the fast path.",
            i64::from(s.fast_path_enabled),
        )?;
        gauge(
            &mut e,
            "fast_path_killed",
            "1 when the operator kill switch is on.",
            i64::from(s.fast_path_killed),
        )?;
        gauge(
            &mut e,
            "sockhash_entries",
            "Sockets eligible for the fast path.",
            i64::try_from(s.sockhash_entries).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut e,
            "sockhash_capacity",
            "Sockets the fast path's sockhash can hold (past it, new sockets use the normal stack).",
            i64::from(s.sockhash_capacity),
        )?;
        {
            let mut family = e.encode_descriptor(
                "datapath_links",
                "eBPF program attachments in place: cgroup hooks (connect, sock_ops, getpeername) and TC on pod interfaces.",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (hook, n) in [("cgroup", s.links_attached.0), ("tc", s.links_attached.1)] {
                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&vec![("hook", hook.to_owned())])?)?;
            }
        }
        gauge(
            &mut e,
            "datapath_retired_sockets",
            "Fast-path sockets still in the sockhash of an older datapath generation.",
            i64::try_from(s.retired_sockets).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut e,
            "workloads",
            "Workloads known to this agent.",
            i64::try_from(s.workloads).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut e,
            "config_errors",
            "Objects rejected at the last read.",
            i64::try_from(s.config_errors).unwrap_or(i64::MAX),
        )?;
        counter_family(
            &mut e,
            "config_syncs",
            "Reconciliations of the maps.",
            [
                (vec![("result", "ok".to_owned())], s.syncs),
                (vec![("result", "error".to_owned())], s.sync_failures),
            ],
        )?;
        Ok(())
    }
}
