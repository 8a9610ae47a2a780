//! A testbed run: its unique prefix, its registry of nodes and pods, and its teardown.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::{self, File},
    io::Read,
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard},
};

use anyhow::{Context, Result, bail, ensure};
use nix::{
    errno::Errno,
    fcntl::{AT_FDCWD, RenameFlags, renameat2},
};

use crate::{
    host::HostPaths,
    node::Node,
    sweep::{self, NEW_DIR_PREFIX, OWNER_FILE, Owner},
    teardown::{self, Leftovers},
};

/// cgroup (below the run's) of processes started with `Node::command`: outside every node
/// cgroup, so the node's eBPF programs never see them, but inside the run, so teardown and the
/// sweep kill them.
pub(crate) const HOST_CGROUP: &str = "_host";
/// Nodes are numbered 1..=254: node N owns 198.18.N.0/24.
const MAX_NODES: u8 = 254;
/// Attempts at a fresh prefix before giving up (collisions need another live run with it).
const PREFIX_ATTEMPTS: u32 = 16;

/// One testbed run. Dropping it kills every process it started and removes every namespace,
/// cgroup, bpffs pin and state file it created (see the crate docs for the names).
///
/// [`Node`]s and [`crate::Pod`]s are cheap handles onto the run; they do not keep it alive, and
/// using one after the testbed is gone fails.
pub struct Testbed {
    run: Arc<Run>,
}

/// State shared by the testbed and its node and pod handles.
pub(crate) struct Run {
    pub(crate) prefix: String,
    pub(crate) label: String,
    pub(crate) paths: HostPaths,
    /// `true` until teardown starts. Creating a node or pod holds a read guard throughout, so
    /// teardown (which takes the write guard) never races a half-built namespace.
    alive: RwLock<bool>,
    registry: Mutex<Registry>,
    /// Source of unique names for files in the run's state directory.
    serial: AtomicU64,
    /// Held while a node joins the fabric (creating it for the first node).
    fabric: Mutex<()>,
}

/// Who exists in the run, and the next free addresses.
#[derive(Default)]
pub(crate) struct Registry {
    pub(crate) nodes: BTreeMap<String, NodeEntry>,
    next_node: u8,
}

pub(crate) struct NodeEntry {
    /// Where the search for the next pod slot starts. Slots go round, as host-local IPAM
    /// hands out addresses: a deleted pod's address and veth name come back only after every
    /// other slot was used once (runs with pod churn — soaks — go on for ever).
    pub(crate) next_pod: u8,
    /// `(namespace, name)` of its live pods, with their slots.
    pub(crate) pods: BTreeMap<(String, String), u8>,
    /// N in `198.18.<N>.0/24`.
    pub(crate) index: u8,
}

impl Testbed {
    /// Starts a run: checks the host (root, cgroup v2, bpffs), removes what crashed runs left
    /// behind, then claims a fresh prefix. `label` (e.g. the test's name) appears in logs and in
    /// the run's state directory.
    pub fn new(label: &str) -> Result<Self> {
        let paths = HostPaths::preflight()?;
        let prefix = {
            let _lock = sweep::lock(&paths)?;
            let swept = sweep::sweep(&paths);
            if !swept.is_empty() {
                eprintln!(
                    "[testbed] removed {} crashed run(s): {}",
                    swept.len(),
                    swept.join(", ")
                );
            }
            claim_prefix(&paths, label)?
        };
        let run = Arc::new(Run {
            prefix,
            label: label.to_owned(),
            paths,
            alive: RwLock::new(true),
            registry: Mutex::default(),
            serial: AtomicU64::new(0),
            fabric: Mutex::new(()),
        });
        let testbed = Self { run };
        testbed
            .create_run_dirs()
            .with_context(|| format!("setting up run {}", testbed.run.prefix))?;
        Ok(testbed)
    }

    fn create_run_dirs(&self) -> Result<()> {
        let paths = &self.run.paths;
        for dir in [
            paths.run_cgroup(&self.run.prefix).join(HOST_CGROUP),
            paths.run_bpffs(&self.run.prefix),
        ] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(())
    }

    /// The run's prefix (`wt` and 6 hex digits), the start of all its names.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.run.prefix
    }

    #[must_use]
    pub fn label(&self) -> &str {
        &self.run.label
    }

    /// Creates node `name`: netns `<prefix>-<name>` with bridge `br0` at `198.18.<N>.1/24` (N
    /// counts this run's nodes from 1), its cgroup, its run directory and its bpffs directory.
    /// Node names are DNS labels (lowercase letters, digits, `-`; at most 63).
    pub fn node(&self, name: &str) -> Result<Node> {
        Node::create(&self.run, name)
    }

    /// The nodes created so far.
    #[must_use]
    pub fn node_names(&self) -> Vec<String> {
        self.run.registry().nodes.keys().cloned().collect()
    }

    /// The node's bpffs directory, `/sys/fs/bpf/weft-<prefix>/<node>` (created with the node).
    #[must_use]
    pub fn bpffs_dir(&self, node: &Node) -> PathBuf {
        node.bpffs_dir()
    }

    /// The node's state directory, `/run/weft-testbed/<prefix>/<node>` (created with the node),
    /// for the agent's sockets and config.
    #[must_use]
    pub fn run_dir(&self, node: &Node) -> PathBuf {
        node.run_dir()
    }

    /// What of this run exists right now (everything, until teardown).
    pub fn leftovers(&self) -> Result<Leftovers> {
        Leftovers::of_run(&self.run.paths, &self.run.prefix)
    }

    /// Tears the run down now and returns what could not be removed (empty when all went well).
    pub fn teardown(self) -> Result<Leftovers> {
        self.run.teardown();
        self.leftovers()
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.run.teardown();
    }
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("prefix", &self.run.prefix)
            .field("label", &self.run.label)
            .finish_non_exhaustive()
    }
}

impl Run {
    /// Holds off teardown while something is being created; fails once teardown has begun.
    pub(crate) fn guard_alive(&self) -> Result<RwLockReadGuard<'_, bool>> {
        let alive = self.alive.read().unwrap_or_else(PoisonError::into_inner);
        ensure!(*alive, "testbed run {} has been torn down", self.prefix);
        Ok(alive)
    }

    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The run's state directory, `/run/weft-testbed/<prefix>`.
    pub(crate) fn state_dir(&self) -> PathBuf {
        self.paths.run_state(&self.prefix)
    }

    /// Serialises nodes joining the fabric.
    pub(crate) fn fabric_lock(&self) -> MutexGuard<'_, ()> {
        self.fabric.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A number unique within the run.
    pub(crate) fn next_serial(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed)
    }

    /// Idempotent: the first call removes everything, later calls do nothing.
    fn teardown(&self) {
        {
            let mut alive = self.alive.write().unwrap_or_else(PoisonError::into_inner);
            if !*alive {
                return;
            }
            *alive = false;
        }
        let errors = teardown::teardown_run(&self.paths, &self.prefix);
        for error in &errors {
            eprintln!(
                "[testbed {} {}] teardown: {error:#}",
                self.prefix, self.label
            );
        }
    }
}

impl Registry {
    /// Allocates the next node number for `name`.
    pub(crate) fn add_node(&mut self, name: &str) -> Result<u8> {
        ensure!(
            !self.nodes.contains_key(name),
            "node {name} already exists in this run"
        );
        ensure!(
            self.next_node < MAX_NODES,
            "a run has at most {MAX_NODES} nodes"
        );
        self.next_node += 1;
        let index = self.next_node;
        self.nodes.insert(
            name.to_owned(),
            NodeEntry {
                next_pod: 0,
                pods: BTreeMap::new(),
                index,
            },
        );
        Ok(index)
    }
}

/// Picks a prefix no run uses and creates its state directory with the owner record inside, in
/// one atomic rename. The caller holds the sweep lock.
fn claim_prefix(paths: &HostPaths, label: &str) -> Result<String> {
    let owner = Owner::current();
    for _ in 0..PREFIX_ATTEMPTS {
        let prefix = random_prefix()?;
        if !teardown::run_netns(paths, &prefix)?.is_empty()
            || paths.run_cgroup(&prefix).exists()
            || paths.run_bpffs(&prefix).exists()
        {
            continue;
        }
        let staging = paths
            .state_root
            .join(format!("{NEW_DIR_PREFIX}{prefix}-{}", std::process::id()));
        fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        fs::write(staging.join(OWNER_FILE), owner.render())
            .and_then(|()| fs::write(staging.join("label"), format!("{label}\n")))
            .with_context(|| format!("writing the owner record in {}", staging.display()))?;
        match renameat2(
            AT_FDCWD,
            &staging,
            AT_FDCWD,
            &paths.run_state(&prefix),
            RenameFlags::RENAME_NOREPLACE,
        ) {
            Ok(()) => return Ok(prefix),
            Err(Errno::EEXIST) => {
                teardown::ignore_not_found(fs::remove_dir_all(&staging))?;
            }
            Err(errno) => {
                let _ = fs::remove_dir_all(&staging);
                return Err(errno)
                    .with_context(|| format!("moving {} into place", staging.display()));
            }
        }
    }
    bail!("found no free run prefix in {PREFIX_ATTEMPTS} attempts: are that many runs alive?")
}

/// `wt` and 6 random hex digits.
fn random_prefix() -> Result<String> {
    let mut bytes = [0_u8; 3];
    File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    let mut prefix = String::from("wt");
    for byte in bytes {
        write!(prefix, "{byte:02x}").expect("writing to a String");
    }
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_prefixes_are_run_prefixes() {
        for _ in 0..32 {
            let prefix = random_prefix().unwrap();
            assert!(sweep::is_run_prefix(&prefix), "{prefix}");
        }
    }

    #[test]
    fn node_numbers_count_from_one_and_names_are_unique() {
        let mut registry = Registry::default();
        assert_eq!(registry.add_node("a").unwrap(), 1);
        assert_eq!(registry.add_node("b").unwrap(), 2);
        assert!(registry.add_node("a").is_err());
        for n in 3..=MAX_NODES {
            registry.add_node(&format!("n{n}")).unwrap();
        }
        assert!(registry.add_node("one-too-many").is_err());
    }
}
