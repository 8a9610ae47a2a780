//! Reconciling maps with the desired node state, and reading what the kernel counted.
use std::{collections::BTreeMap, hash::Hash};

use aya::{
    Pod,
    maps::{HashMap, MapData, MapError},
};
use mesh_common::{
    Backend, BackendKey, CONFIG_INDEX, CgroupIdentity, Config, DenyKey, DenyValue, Endpoint,
    FlowEntry, GlobalStats, IfStats, PairKey, PairStats, PolicyKey, PolicyValue, ServiceKey,
    ServiceValue, SockKey, config_flags, flow_state, global_counter, verdict,
};

use super::{Datapath, EbpfError};

/// Exact contents the agent wants in its maps.
#[derive(Debug, Default, Clone)]
pub struct Desired {
    pub maps: MapContents,
    pub fast_path: bool,
    /// The L7 engine's listener, when it runs.
    pub engine: Option<std::net::SocketAddrV4>,
    /// This node's pod network (network, prefix length), for the STRICT inbound gate.
    pub local_net: Option<(std::net::Ipv4Addr, u8)>,
    /// Ask sockets to leave the fast path (host TCP memory high).
    pub shed: bool,
    /// Someone watches live events: the programs write them ([`config_flags::EVENTS`]).
    pub events: bool,
}

/// The contents of the agent-owned hash maps: what the agent wants, and (as the datapath's
/// shadow) what it last wrote.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MapContents {
    pub endpoints: BTreeMap<u32, Endpoint>,
    pub cgroups: BTreeMap<u64, CgroupIdentity>,
    /// Network namespace cookie → identity, for pods the CNI plugin enrolled.
    pub netns: BTreeMap<u64, CgroupIdentity>,
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<BackendKey, Backend>,
    /// Shared with the node state it was computed from.
    pub policy: std::sync::Arc<BTreeMap<PolicyKey, PolicyValue>>,
}

#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct SyncReport {
    pub inserted: usize,
    pub removed: usize,
}

impl std::ops::AddAssign for SyncReport {
    fn add_assign(&mut self, o: Self) {
        self.inserted += o.inserted;
        self.removed += o.removed;
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

/// Makes a hash map that holds `have` hold exactly `want`: stale keys removed, new or changed
/// values written.
fn reconcile<K, V>(
    map: &mut HashMap<MapData, K, V>,
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<SyncReport, EbpfError>
where
    K: Pod + Ord + Hash,
    V: Pod + PartialEq,
{
    let mut report = SyncReport::default();
    for k in have.keys().filter(|k| !want.contains_key(k)) {
        match map.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => report.removed += 1,
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    for (k, v) in want {
        if have.get(k) != Some(v) {
            map.insert(k, v, 0).map_err(map_err(name))?;
            report.inserted += 1;
        }
    }
    Ok(report)
}

/// Everything in a hash map, read from the kernel. Iterating walks every bucket of the map
/// (its capacity, not its length), so this is done once, when the agent adopts the maps.
fn read_all<K: Pod + Ord, V: Pod>(map: &HashMap<MapData, K, V>) -> BTreeMap<K, V> {
    map.iter().filter_map(Result::ok).collect()
}

impl Datapath {
    /// Writes `want` into the maps. Order matters for connections being made meanwhile:
    /// identities and backends first, then services that point at them, then policy, and
    /// removals of backends last.
    pub fn apply(&mut self, want: &Desired) -> Result<SyncReport, EbpfError> {
        let mut report = SyncReport::default();
        if self.applied.as_ref() != Some(&want.maps) {
            // Forget the shadow first: if a write fails half-way, the next pass reads back.
            let have = match self.applied.take() {
                Some(applied) => applied,
                None => MapContents {
                    endpoints: read_all(&self.maps.endpoints),
                    cgroups: read_all(&self.maps.cgroups),
                    netns: read_all(&self.maps.netns),
                    services: read_all(&self.maps.services),
                    backends: read_all(&self.maps.backends),
                    policy: std::sync::Arc::new(read_all(&self.maps.policy)),
                },
            };
            report += self.write_maps(&have, &want.maps)?;
            self.applied = Some(want.maps.clone());
        }
        report += self.write_config(want)?;
        // After an upgrade the new programs take over only now, with the configuration in place.
        self.finish_upgrade()?;
        Ok(report)
    }

    fn write_maps(
        &mut self,
        have: &MapContents,
        want: &MapContents,
    ) -> Result<SyncReport, EbpfError> {
        use mesh_common::map_names as n;
        let m = &mut self.maps;
        let mut report = reconcile(
            &mut m.endpoints,
            &have.endpoints,
            &want.endpoints,
            n::ENDPOINTS,
        )?;
        report += reconcile(&mut m.cgroups, &have.cgroups, &want.cgroups, n::CGROUPS)?;
        report += reconcile(&mut m.netns, &have.netns, &want.netns, n::NETNS)?;
        // Add new backend slots before services grow into them...
        let mut grown = want.backends.clone();
        for (k, v) in &have.backends {
            grown.entry(*k).or_insert(*v);
        }
        report += reconcile(&mut m.backends, &have.backends, &grown, n::BACKENDS)?;
        report += reconcile(&mut m.services, &have.services, &want.services, n::SERVICES)?;
        // ...and drop stale slots only after services shrank.
        report += reconcile(&mut m.backends, &grown, &want.backends, n::BACKENDS)?;
        report += reconcile(&mut m.policy, &have.policy, &want.policy, n::POLICY)?;
        Ok(report)
    }

    /// The config entry; written on every pass, as the engine heartbeat.
    fn write_config(&mut self, want: &Desired) -> Result<SyncReport, EbpfError> {
        use mesh_common::map_names as n;
        let m = &mut self.maps;
        let mut report = SyncReport::default();
        let mut cfg = m.config.get(&CONFIG_INDEX, 0).map_err(map_err(n::CONFIG))?;
        let wanted = Config {
            flags: if want.fast_path {
                config_flags::FAST_PATH
            } else {
                0
            } | if want.shed { config_flags::SHED } else { 0 }
                | if want.events { config_flags::EVENTS } else { 0 },
            fast_path_killed: cfg.fast_path_killed, // operator-owned: preserved
            default_verdict: verdict::FAST,
            _pad0: 0,
            engine_port_be: want.engine.map_or(0, |a| a.port().to_be()),
            engine_ip_be: want.engine.map_or(0, |a| u32::from(*a.ip()).to_be()),
            local_net_be: want
                .local_net
                .map_or(0, |(net, len)| (u32::from(net) & prefix_mask(len)).to_be()),
            local_mask_be: want
                .local_net
                .map_or(0, |(_, len)| prefix_mask(len).to_be()),
            // Every reconcile pass is a heartbeat: the kernel redirects to the engine only
            // while this is recent.
            engine_seen_ns: if want.engine.is_some() {
                monotonic_ns()
            } else {
                0
            },
        };
        if cfg != wanted {
            // A heartbeat alone is not a configuration change worth reporting.
            let changed = Config {
                engine_seen_ns: cfg.engine_seen_ns,
                ..wanted
            } != cfg;
            cfg = wanted;
            m.config
                .set(CONFIG_INDEX, cfg, 0)
                .map_err(map_err(n::CONFIG))?;
            report.inserted += usize::from(changed);
        }
        Ok(report)
    }

    /// Tells the kernel the engine is gone (its heartbeat set to "never"): new connections to
    /// L7 services go around it or are refused, each service as its failure mode says.
    pub fn mark_engine_down(&mut self) -> Result<(), EbpfError> {
        use mesh_common::map_names as n;
        let mut cfg = self
            .maps
            .config
            .get(&CONFIG_INDEX, 0)
            .map_err(map_err(n::CONFIG))?;
        cfg.engine_seen_ns = 0;
        self.maps
            .config
            .set(CONFIG_INDEX, cfg, 0)
            .map_err(map_err(n::CONFIG))
    }

    pub fn config(&self) -> Result<Config, EbpfError> {
        self.maps
            .config
            .get(&CONFIG_INDEX, 0)
            .map_err(map_err(mesh_common::map_names::CONFIG))
    }

    /// Live and closed flow entries. Closed ones are removed from the map once read (the agent
    /// keeps them in its recent-flows ring), so the LRU map holds live sockets.
    pub fn take_flows(&mut self) -> Vec<(SockKey, FlowEntry)> {
        let all: Vec<(SockKey, FlowEntry)> =
            self.maps.flows.iter().filter_map(Result::ok).collect();
        for (k, f) in &all {
            if f.state == flow_state::CLOSED {
                let _ = self.maps.flows.remove(k);
            }
        }
        all
    }

    pub fn denies(&self) -> Vec<(DenyKey, DenyValue)> {
        self.maps.denies.iter().filter_map(Result::ok).collect()
    }

    pub fn pair_stats(&self) -> Vec<(PairKey, PairStats)> {
        self.maps
            .pairs
            .iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| {
                let mut sum = PairStats::default();
                for s in per_cpu.iter() {
                    sum.conns_opened += s.conns_opened;
                    sum.conns_closed += s.conns_closed;
                    sum.conns_denied += s.conns_denied;
                    sum.conns_fast += s.conns_fast;
                    sum.bytes_to_dst += s.bytes_to_dst;
                    sum.bytes_to_src += s.bytes_to_src;
                    sum.bytes_fast += s.bytes_fast;
                }
                (k, sum)
            })
            .collect()
    }

    pub fn if_stats(&self) -> Vec<(u32, IfStats)> {
        self.maps
            .ifs
            .iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| {
                let mut sum = IfStats::default();
                for s in per_cpu.iter() {
                    if s.pod_ip_be != 0 {
                        sum.pod_ip_be = s.pod_ip_be;
                    }
                    sum.from_pod_packets += s.from_pod_packets;
                    sum.from_pod_bytes += s.from_pod_bytes;
                    sum.to_pod_packets += s.to_pod_packets;
                    sum.to_pod_bytes += s.to_pod_bytes;
                    sum.from_pod_udp_packets += s.from_pod_udp_packets;
                    sum.from_pod_udp_bytes += s.from_pod_udp_bytes;
                    sum.to_pod_udp_packets += s.to_pod_udp_packets;
                    sum.to_pod_udp_bytes += s.to_pod_udp_bytes;
                }
                (k, sum)
            })
            .collect()
    }

    #[must_use]
    pub fn global_stats(&self) -> [u64; global_counter::COUNT] {
        let mut out = [0; global_counter::COUNT];
        if let Ok(per_cpu) = self.maps.global.get(&0, 0) {
            for s in per_cpu.iter() {
                let s: &GlobalStats = s;
                for (o, c) in out.iter_mut().zip(s.counters) {
                    *o += c;
                }
            }
        }
        out
    }

    /// Sockets currently eligible for the fast path.
    #[must_use]
    pub fn sockhash_len(&self) -> usize {
        self.maps.socks.keys().flatten().count()
    }

    /// How many sockets the sockhash can hold (0 when the kernel does not say).
    #[must_use]
    pub fn sockhash_capacity(&self) -> u32 {
        use aya::maps::IterableMap as _;
        self.maps
            .socks
            .map()
            .info()
            .map_or(0, |info| info.max_entries())
    }

    /// Program attachments pinned now: (cgroup hooks, TC hooks on pod interfaces).
    #[must_use]
    pub fn links_attached(&self) -> (usize, usize) {
        let links = self.dir.join("links");
        let cgroup = super::CGROUP_LINKS
            .iter()
            .chain(&["sock_ops_engine"])
            .filter(|l| links.join(l).exists())
            .count();
        let tc = std::fs::read_dir(links.join("tc")).map_or(0, Iterator::count);
        (cgroup, tc)
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// The netmask of a prefix length, in host order.
fn prefix_mask(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}
