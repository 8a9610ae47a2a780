//! The datapath: the only module that talks to aya.
//!
//! Layout of a node's bpffs directory:
//! ```text
//! <dir>/maps/<MAP>            every map, pinned by name (the object declares them pinned)
//! <dir>/progs/<program>       every program
//! <dir>/links/sock_ops        cgroup link of sock_ops on the node cgroup
//! <dir>/links/connect4        cgroup link of connect4 on the node cgroup
//! <dir>/links/connect6        the same decision for IPv6 sockets connecting to v4-mapped addresses
//! <dir>/links/getpeer4        cgroup link of getpeername4 (answers with the service VIP)
//! <dir>/links/getpeer6        the same for IPv6 sockets
//! <dir>/links/sock_ops_engine  sock_ops on the agent's own cgroup (local mode, opt-in): makes
//!                              the L7 engine's sockets fast-path eligible
//! <dir>/links/tc/<if>-from    tcx ingress link on a pod's host-side veth (traffic from the pod)
//! <dir>/links/tc/<if>-to      tcx egress link (traffic to the pod)
//! <dir>/generation            the build that wrote the pins (ABI version, object hash)
//! <dir>/retired/<n>/<MAP>     maps an upgrade replaced, until nothing needs them
//! ```
//! `sk_msg` is attached to the sockhash itself, so it lives as long as the pinned map does.
//! A restarted agent of the same build finds the links pinned and adopts everything without
//! touching the kernel's attachments; an agent of another build upgrades them in place
//! ([`generation`]). Either way established connections never notice the agent was gone.
pub mod desired;
pub mod events;
pub mod generation;
pub mod logs;
mod raw;
pub mod selftest;
mod sync;

use std::{
    collections::BTreeSet,
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuHashMap, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, SkMsg, SockOps, TcAttachType,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{
    Backend, BackendKey, CgroupIdentity, ClientAddr, Config, ConnectInfo, DenyKey, DenyValue,
    Endpoint, FlowEntry, GlobalStats, IfStats, PairKey, PairStats, PolicyKey, PolicyValue,
    ServiceKey, ServiceValue, SockKey, map_names, program_names,
};
pub use sync::{Desired, MapContents, SyncReport};

/// aya-log's level switch in the object (read-only data, patched at load).
const LOG_LEVEL_GLOBAL: &str = "AYA_LOG_LEVEL";

/// How much the programs log through aya-log (the numbers are aya-log's levels; a statement
/// logs when its level is at most this).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    #[default]
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

impl std::str::FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => Self::Off,
            "error" => Self::Error,
            "warn" => Self::Warn,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            other => {
                return Err(format!(
                    "{other:?}: one of off, error, warn, info, debug, trace"
                ));
            }
        })
    }
}

/// The scratch directory of the socket self-test, below a node's bpffs directory.
pub const SELFTEST_DIR: &str = "selftest";

/// The pinned cgroup links of a complete datapath, under `<dir>/links/`.
const CGROUP_LINKS: [&str; 5] = ["connect4", "connect6", "sock_ops", "getpeer4", "getpeer6"];

/// The eBPF object built by build.rs from mesh-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("loading the eBPF object failed: {0}; is this kernel ≥ 6.6 with BTF, and are we root?")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}; is {bpffs} on a bpffs mount?", bpffs = .path.display())]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
    #[error("cgroup {path}: {source}; the node cgroup must exist on the cgroup v2 mount")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("object has no program {0}: the embedded object and this binary disagree")]
    MissingProgram(&'static str),
}

type Result<T, E = EbpfError> = std::result::Result<T, E>;

/// What the agent did when it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Startup {
    /// Loaded and attached the programs.
    Installed,
    /// Found them pinned and attached (agent restart): nothing in the kernel changed.
    Adopted,
    /// Found the pins of another build (or other map sizes) and upgraded them in place: the
    /// new programs take over each link once the agent has written its configuration.
    Upgraded,
}

/// The link switch an upgrade leaves for after the first configuration pass.
struct PendingUpgrade {
    retired: Vec<generation::Retired>,
}

/// Typed handles on the pinned maps.
pub struct Maps {
    pub endpoints: HashMap<MapData, u32, Endpoint>,
    pub cgroups: HashMap<MapData, u64, CgroupIdentity>,
    pub netns: HashMap<MapData, u64, CgroupIdentity>,
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, BackendKey, Backend>,
    pub policy: HashMap<MapData, PolicyKey, PolicyValue>,
    pub config: Array<MapData, Config>,
    pub connects: HashMap<MapData, u64, ConnectInfo>,
    pub flows: HashMap<MapData, SockKey, FlowEntry>,
    pub denies: HashMap<MapData, DenyKey, DenyValue>,
    pub pairs: PerCpuHashMap<MapData, PairKey, PairStats>,
    pub ifs: PerCpuHashMap<MapData, u32, IfStats>,
    pub global: PerCpuArray<MapData, GlobalStats>,
    pub socks: SockHash<MapData, SockKey>,
}

pub struct Datapath {
    dir: PathBuf,
    pub maps: Maps,
    tc_from_pod: SchedClassifier,
    tc_to_pod: SchedClassifier,
    pub startup: Startup,
    /// What the last successful `apply` left in the agent-owned maps. `None` until the first
    /// pass (which reads the pinned maps back, to adopt whatever a previous agent wrote) and
    /// after a failed pass; otherwise passes diff against it and read nothing from the kernel.
    applied: Option<MapContents>,
    pending_upgrade: Option<PendingUpgrade>,
    /// The programs' log level (what this agent loads, and records in the generation).
    log: LogLevel,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EbpfError + '_ {
    move |source| EbpfError::Io {
        path: path.to_owned(),
        source,
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, source }
}

impl Datapath {
    /// Adopts the pinned datapath in `dir` if this build wrote it, upgrades it in place if
    /// another build did (or the map sizes differ), otherwise installs it on `cgroup`.
    pub fn open(
        dir: &Path,
        cgroup: &Path,
        sockhash_capacity: Option<u32>,
        log: LogLevel,
    ) -> Result<Self> {
        // Maps are not part of it: a map this build adds (or one removed by hand) is created
        // by the in-place upgrade below, which keeps every connection.
        let complete = CGROUP_LINKS
            .iter()
            .map(|l| dir.join("links").join(l))
            .chain(program_names::ALL.iter().map(|p| dir.join("progs").join(p)))
            .all(|p| p.exists());
        if !complete {
            // A partial state (crash during install, or pins removed by hand) is rebuilt whole,
            // but sockets an earlier upgrade retired stay where they are.
            remove_active_pins(dir)?;
        }
        for sub in ["maps", "progs", "links/tc"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io(dir))?;
        }
        let overrides: Vec<(&str, u32)> = sockhash_capacity
            .map(|c| (map_names::SOCKS, c))
            .into_iter()
            .collect();
        let wanted = generation::wanted_layouts(&overrides)?;
        let this_build = generation::fingerprint(log);
        let mut pending_upgrade = None;
        let startup = if complete {
            let recorded = generation::read(dir);
            let changed: Vec<&String> = wanted
                .iter()
                .filter(|(name, layout)| {
                    generation::pinned_layout(&dir.join("maps").join(name)) != Some(**layout)
                })
                .map(|(name, _)| name)
                .collect();
            if recorded == Some(this_build) && changed.is_empty() {
                tracing::info!(dir = %dir.display(), "adopting the pinned datapath");
                Startup::Adopted
            } else {
                // Pins from before generations were recorded follow ABI 1.
                let abi_changed =
                    recorded.is_some_and(|r| generation::abi_of(&r) != mesh_common::ABI_VERSION);
                tracing::info!(
                    dir = %dir.display(),
                    from = recorded.as_ref().map_or_else(|| "unrecorded".to_owned(), generation::describe),
                    to = %generation::describe(&this_build),
                    maps_changed = ?changed,
                    abi_changed,
                    "upgrading the pinned datapath in place"
                );
                let retired = generation::retire_changed(dir, &wanted, abi_changed)?;
                load(dir, None, sockhash_capacity, log)?;
                if !abi_changed {
                    generation::migrate_retired(dir, &retired, 0)?;
                }
                pending_upgrade = Some(PendingUpgrade { retired });
                Startup::Upgraded
            }
        } else {
            load(dir, Some(cgroup), sockhash_capacity, log)?;
            generation::write(dir, &this_build)?;
            tracing::info!(dir = %dir.display(), cgroup = %cgroup.display(), "installed the datapath");
            Startup::Installed
        };
        let progs = dir.join("progs");
        let tc_from_pod = SchedClassifier::from_pin(progs.join(program_names::TC_FROM_POD))
            .map_err(prog_err(program_names::TC_FROM_POD))?;
        let tc_to_pod = SchedClassifier::from_pin(progs.join(program_names::TC_TO_POD))
            .map_err(prog_err(program_names::TC_TO_POD))?;
        Ok(Self {
            maps: Maps::open(&dir.join("maps"))?,
            dir: dir.to_owned(),
            applied: None,
            pending_upgrade,
            tc_from_pod,
            tc_to_pod,
            startup,
            log,
        })
    }

    /// Finishes an upgrade once the new maps hold the configuration: every pinned link switches
    /// to its new program, entries the old programs wrote meanwhile are copied over, and the
    /// new generation is recorded. Nothing to do when the agent did not upgrade.
    fn finish_upgrade(&mut self) -> Result<()> {
        let Some(pending) = self.pending_upgrade.take() else {
            return Ok(());
        };
        let links = self.dir.join("links");
        let mut switches: Vec<(PathBuf, &'static str)> = CGROUP_LINKS
            .iter()
            .map(|l| (links.join(l), program_of_link(l)))
            .collect();
        switches.push((links.join("sock_ops_engine"), program_names::SOCK_OPS));
        if let Ok(entries) = std::fs::read_dir(links.join("tc")) {
            for e in entries.filter_map(Result::ok) {
                let name = e.file_name().to_string_lossy().into_owned();
                let prog = if name.ends_with("-from") {
                    program_names::TC_FROM_POD
                } else {
                    program_names::TC_TO_POD
                };
                switches.push((e.path(), prog));
            }
        }
        for (link_pin, prog) in switches {
            if !link_pin.exists() {
                continue;
            }
            let prog_pin = self.dir.join("progs").join(prog);
            let link = raw::obj_get(&link_pin).map_err(io(&link_pin))?;
            let prog_fd = raw::obj_get(&prog_pin).map_err(io(&prog_pin))?;
            raw::link_update(&link, &prog_fd).map_err(io(&link_pin))?;
        }
        // What the old programs recorded between the copy and the switch (connect verdicts,
        // original destinations of connections in flight); newer entries win.
        generation::migrate_retired(&self.dir, &pending.retired, raw::NOEXIST)?;
        generation::write(&self.dir, &generation::fingerprint(self.log))?;
        let held = generation::sweep_retired(&self.dir)?;
        tracing::info!(
            retired_sockets = held,
            "datapath upgraded: the new programs are attached"
        );
        Ok(())
    }

    /// Unpins retired maps nobody needs any more; returns the sockets retired sockhashes still
    /// hold (established connections of an older generation).
    pub fn sweep_retired(&self) -> Result<usize> {
        generation::sweep_retired(&self.dir)
    }

    /// This agent's datapath generation, as `weft status` shows it (see [`generation`]).
    #[must_use]
    pub fn generation(&self) -> String {
        generation::describe(&generation::fingerprint(self.log))
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Attaches the TC counters to every pod interface in `wanted` that has none yet, and
    /// forgets links of interfaces that are gone. Returns the interfaces now counted.
    pub fn sync_interfaces(&mut self, wanted: &BTreeSet<String>) -> Result<BTreeSet<String>> {
        let tc_dir = self.dir.join("links/tc");
        let mut have = BTreeSet::new();
        for entry in std::fs::read_dir(&tc_dir)
            .map_err(io(&tc_dir))?
            .filter_map(Result::ok)
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(ifname) = name
                .strip_suffix("-from")
                .or_else(|| name.strip_suffix("-to"))
            else {
                continue;
            };
            if wanted.contains(ifname) {
                have.insert(ifname.to_owned());
            } else {
                unpin_link(&entry.path())?;
            }
        }
        for ifname in wanted.difference(&have.clone()) {
            for (prog, kind, suffix) in [
                (&mut self.tc_from_pod, TcAttachType::Ingress, "from"),
                (&mut self.tc_to_pod, TcAttachType::Egress, "to"),
            ] {
                let id = prog
                    .attach(ifname, kind)
                    .map_err(prog_err(program_names::TC_FROM_POD))?;
                let link = prog
                    .take_link(id)
                    .map_err(prog_err(program_names::TC_FROM_POD))?;
                let link = FdLink::try_from(link).map_err(|source| EbpfError::Link {
                    path: tc_dir.clone(),
                    source,
                })?;
                let path = tc_dir.join(format!("{ifname}-{suffix}"));
                link.pin(&path)
                    .map_err(|source| EbpfError::Pin { path, source })?;
            }
            tracing::info!(interface = %ifname, "TC counters attached");
            have.insert(ifname.clone());
        }
        Ok(have)
    }
}

/// The pinned hash map `name` of the datapath in `dir`, opened on its own (the engine's maps).
fn open_pinned_hash<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>> {
    let data = MapData::from_pin(dir.join("maps").join(name))
        .map_err(|source| EbpfError::Map { name, source })?;
    Map::from_map_data(data)
        .and_then(TryInto::try_into)
        .map_err(|source| EbpfError::Map { name, source })
}

/// Read side of the `L7_ORIG` map for the engine: where a redirected client wanted to go.
pub struct OrigDstTable {
    map: HashMap<MapData, ClientAddr, ConnectInfo>,
}

impl OrigDstTable {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            map: open_pinned_hash(dir, map_names::L7_ORIG)?,
        })
    }

    /// One map lookup (a syscall of about a microsecond).
    #[must_use]
    pub fn lookup(&self, client: std::net::SocketAddrV4) -> Option<ConnectInfo> {
        let key = ClientAddr {
            ip_be: u32::from(*client.ip()).to_be(),
            port_host: u32::from(client.port()),
        };
        self.map.get(&key, 0).ok()
    }
}

/// Write side of the `SHED_FLOWS` map for the engine: sockets of its legs that must leave the
/// fast path.
pub struct ShedFlows {
    map: HashMap<MapData, SockKey, u32>,
}

impl ShedFlows {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            map: open_pinned_hash(dir, map_names::SHED_FLOWS)?,
        })
    }

    /// Asks the kernel to move both ends of the connection `client` ↔ `engine` to the normal
    /// stack at their next message (two map updates; a full LRU map evicts old requests).
    ///
    /// # Errors
    /// When the kernel refuses the update.
    pub fn shed(
        &mut self,
        client: std::net::SocketAddrV4,
        engine: std::net::SocketAddrV4,
    ) -> Result<()> {
        let key = SockKey {
            local_ip_be: u32::from(*client.ip()).to_be(),
            remote_ip_be: u32::from(*engine.ip()).to_be(),
            local_port_host: u32::from(client.port()),
            remote_port_host: u32::from(engine.port()),
        };
        let name = map_names::SHED_FLOWS;
        for k in [key, key.peer()] {
            self.map
                .insert(k, 1, 0)
                .map_err(|source| EbpfError::Map { name, source })?;
        }
        Ok(())
    }
}

impl Datapath {
    /// Attaches `sock_ops` to the agent's own cgroup as well, so the engine's sockets to local
    /// pods join the fast path. Idempotent (an existing pin is kept).
    pub fn attach_engine_sockops(&self, cgroup: &Path) -> Result<()> {
        let pin = self.dir.join("links/sock_ops_engine");
        if pin.exists() {
            return Ok(());
        }
        let name = program_names::SOCK_OPS;
        let mut prog =
            SockOps::from_pin(self.dir.join("progs").join(name)).map_err(prog_err(name))?;
        let fd = File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let id = prog
            .attach(&fd, CgroupAttachMode::Single)
            .map_err(prog_err(name))?;
        let link =
            FdLink::try_from(prog.take_link(id).map_err(prog_err(name))?).map_err(|source| {
                EbpfError::Link {
                    path: cgroup.to_owned(),
                    source,
                }
            })?;
        link.pin(&pin)
            .map(drop)
            .map_err(|source| EbpfError::Pin { path: pin, source })
    }
}

impl Maps {
    fn open(dir: &Path) -> Result<Self> {
        fn map(dir: &Path, name: &'static str) -> Result<Map> {
            let data = MapData::from_pin(dir.join(name))
                .map_err(|source| EbpfError::Map { name, source })?;
            Map::from_map_data(data).map_err(|source| EbpfError::Map { name, source })
        }
        macro_rules! typed {
            ($name:expr) => {
                map(dir, $name)?
                    .try_into()
                    .map_err(|source| EbpfError::Map {
                        name: $name,
                        source,
                    })?
            };
        }
        Ok(Self {
            endpoints: typed!(map_names::ENDPOINTS),
            cgroups: typed!(map_names::CGROUPS),
            netns: typed!(map_names::NETNS),
            services: typed!(map_names::SERVICES),
            backends: typed!(map_names::BACKENDS),
            policy: typed!(map_names::POLICY),
            config: typed!(map_names::CONFIG),
            connects: typed!(map_names::CONNECTS),
            flows: typed!(map_names::FLOWS),
            denies: typed!(map_names::DENIES),
            pairs: typed!(map_names::PAIR_STATS),
            ifs: typed!(map_names::IF_STATS),
            global: typed!(map_names::GLOBAL_STATS),
            socks: typed!(map_names::SOCKS),
        })
    }
}

/// The program behind the cgroup link pinned as `links/<link>`.
fn program_of_link(link: &str) -> &'static str {
    match link {
        "connect4" => program_names::CONNECT4,
        "connect6" => program_names::CONNECT6,
        "getpeer4" => program_names::GETPEERNAME4,
        "getpeer6" => program_names::GETPEERNAME6,
        _ => program_names::SOCK_OPS,
    }
}

/// Loads the object with its maps pinned in `<dir>/maps` (reusing every map pinned there),
/// attaches `sk_msg` to the sockhash and pins every program in `<dir>/progs`. With a cgroup
/// (a fresh install) the cgroup programs are attached to it and their links pinned; without
/// (an upgrade) the existing links are switched later, by `finish_upgrade`.
fn load(
    dir: &Path,
    cgroup: Option<&Path>,
    sockhash_capacity: Option<u32>,
    log: LogLevel,
) -> Result<()> {
    let maps_dir = dir.join("maps");
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&maps_dir);
    let level = log as u8;
    // Read-only data: the verifier knows the level and drops every disabled statement.
    loader.override_global(LOG_LEVEL_GLOBAL, &level, true);
    if let Some(cap) = sockhash_capacity {
        loader.map_max_entries(map_names::SOCKS, cap);
    }
    let mut ebpf = loader.load(OBJECT)?;
    let cgroup_fd = cgroup
        .map(|cgroup| {
            File::open(cgroup).map_err(|source| EbpfError::Cgroup {
                path: cgroup.to_owned(),
                source,
            })
        })
        .transpose()?;
    let pin_prog = |prog: &mut aya::programs::Program, name: &'static str| -> Result<()> {
        let path = dir.join("progs").join(name);
        // An upgrade replaces the old program's pin; its links keep it alive until switched.
        if path.exists() {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        prog.pin(&path)
            .map_err(|source| EbpfError::Pin { path, source })
    };
    let pin_link = |link: FdLink, name: &str| -> Result<()> {
        let path = dir.join("links").join(name);
        link.pin(&path)
            .map(drop)
            .map_err(|source| EbpfError::Pin { path, source })
    };

    // sk_msg on the sockhash.
    {
        let socks: SockHash<_, SockKey> = SockHash::try_from(
            ebpf.map(map_names::SOCKS)
                .ok_or(EbpfError::MissingProgram(map_names::SOCKS))?,
        )
        .map_err(|source| EbpfError::Map {
            name: map_names::SOCKS,
            source,
        })?;
        let socks_fd = socks.fd().try_clone().map_err(io(&maps_dir))?;
        let prog = ebpf
            .program_mut(program_names::SK_MSG)
            .ok_or(EbpfError::MissingProgram(program_names::SK_MSG))?;
        let sk_msg: &mut SkMsg = prog.try_into().map_err(prog_err(program_names::SK_MSG))?;
        sk_msg.load().map_err(prog_err(program_names::SK_MSG))?;
        let id = sk_msg
            .attach(&socks_fd)
            .map_err(prog_err(program_names::SK_MSG))?;
        // aya detaches a link when it is dropped. This attachment belongs to the pinned map and
        // must outlive the agent, so the handle is deliberately leaked (two fds, closed at exit).
        std::mem::forget(
            sk_msg
                .take_link(id)
                .map_err(prog_err(program_names::SK_MSG))?,
        );
        pin_prog(prog, program_names::SK_MSG)?;
    }
    // TC counters: loaded and pinned; attached per interface later.
    for name in [program_names::TC_FROM_POD, program_names::TC_TO_POD] {
        let prog = ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?;
        let tc: &mut SchedClassifier = prog.try_into().map_err(prog_err(name))?;
        tc.load().map_err(prog_err(name))?;
        pin_prog(prog, name)?;
    }
    // connect4 before sock_ops: a connection must never be recorded without its verdict.
    // (Cgroup bpf_links always coexist with other programs; their attach flags must be 0, which
    // is what `Single` passes.)
    // Both cgroup programs: load, attach with a bpf_link, pin link and program.
    macro_rules! attach_to_cgroup {
        ($ty:ty, $name:expr, $link:expr) => {{
            let name = $name;
            let prog = ebpf
                .program_mut(name)
                .ok_or(EbpfError::MissingProgram(name))?;
            let p: &mut $ty = prog.try_into().map_err(prog_err(name))?;
            p.load().map_err(prog_err(name))?;
            if let (Some(cgroup), Some(cgroup_fd)) = (cgroup, &cgroup_fd) {
                let id = p
                    .attach(cgroup_fd, CgroupAttachMode::Single)
                    .map_err(prog_err(name))?;
                let link = FdLink::try_from(p.take_link(id).map_err(prog_err(name))?).map_err(
                    |source| EbpfError::Link {
                        path: cgroup.to_owned(),
                        source,
                    },
                )?;
                pin_link(link, $link)?;
            }
            pin_prog(prog, name)?;
        }};
    }
    attach_to_cgroup!(CgroupSockAddr, program_names::CONNECT4, "connect4");
    attach_to_cgroup!(CgroupSockAddr, program_names::CONNECT6, "connect6");
    attach_to_cgroup!(SockOps, program_names::SOCK_OPS, "sock_ops");
    attach_to_cgroup!(CgroupSockAddr, program_names::GETPEERNAME4, "getpeer4");
    attach_to_cgroup!(CgroupSockAddr, program_names::GETPEERNAME6, "getpeer6");
    Ok(())
}

fn unpin_link(path: &Path) -> Result<()> {
    match PinnedLink::from_pin(path) {
        // Dropping the last reference detaches the link.
        Ok(link) => link.unpin().map(drop).map_err(io(path)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "not a link pin; removing the file");
            std::fs::remove_file(path).map_err(io(path))
        }
    }
}

/// Detaches and removes everything pinned under `dir`: links first (that detaches programs from
/// the cgroup and the interfaces), then programs and maps, retired ones included. The kernel
/// frees each object when its last reference goes.
pub fn remove_pins(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if dir.file_name().is_some_and(|n| n != SELFTEST_DIR) {
        // A self-test the agent did not finish (it crashed) left its scratch pins.
        remove_pins(&dir.join(SELFTEST_DIR))?;
    }
    remove_active_pins(dir)?;
    let retired = dir.join(generation::RETIRED_DIR);
    if let Ok(slots) = std::fs::read_dir(&retired) {
        for slot in slots.filter_map(Result::ok) {
            for e in std::fs::read_dir(slot.path())
                .map_err(io(&slot.path()))?
                .filter_map(Result::ok)
            {
                std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
            }
            std::fs::remove_dir(slot.path()).map_err(io(&slot.path()))?;
        }
        std::fs::remove_dir(&retired).map_err(io(&retired))?;
    }
    std::fs::remove_dir(dir).map_err(io(dir))
}

/// Removes the links, programs, maps and generation record under `dir`, leaving maps an
/// upgrade retired (their sockets' connections are still open).
fn remove_active_pins(dir: &Path) -> Result<()> {
    let links = dir.join("links");
    for sub in [links.join("tc"), links.clone()] {
        if let Ok(entries) = std::fs::read_dir(&sub) {
            for e in entries.filter_map(Result::ok) {
                if e.path().is_file() || e.file_type().is_ok_and(|t| !t.is_dir()) {
                    unpin_link(&e.path())?;
                }
            }
        }
    }
    for sub in ["progs", "maps"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
            for e in entries.filter_map(Result::ok) {
                std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
            }
        }
    }
    let record = dir.join(generation::GENERATION_PIN);
    if record.exists() {
        std::fs::remove_file(&record).map_err(io(&record))?;
    }
    for sub in ["links/tc", "links", "progs", "maps"] {
        let p = dir.join(sub);
        if p.exists() {
            std::fs::remove_dir(&p).map_err(io(&p))?;
        }
    }
    Ok(())
}

/// The operator's kill switch, written straight into the pinned config map: works whether or not
/// the agent runs, and the agent's config sync never overrides it.
pub fn set_fast_path_killed(dir: &Path, killed: bool) -> Result<()> {
    let path = dir.join("maps").join(map_names::CONFIG);
    let data = MapData::from_pin(&path).map_err(|source| EbpfError::Map {
        name: map_names::CONFIG,
        source,
    })?;
    let map = Map::from_map_data(data).map_err(|source| EbpfError::Map {
        name: map_names::CONFIG,
        source,
    })?;
    let mut config: Array<MapData, Config> = map.try_into().map_err(|source| EbpfError::Map {
        name: map_names::CONFIG,
        source,
    })?;
    let mut value = config
        .get(&mesh_common::CONFIG_INDEX, 0)
        .map_err(|source| EbpfError::Map {
            name: map_names::CONFIG,
            source,
        })?;
    value.fast_path_killed = u32::from(killed);
    config
        .set(mesh_common::CONFIG_INDEX, value, 0)
        .map_err(|source| EbpfError::Map {
            name: map_names::CONFIG,
            source,
        })
}
