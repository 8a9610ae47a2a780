//! Removing what a run created: shared by the owner's teardown, pod deletion and the sweep of
//! crashed runs, and the inventory of what is left ([`Leftovers`]).
#![forbid(unsafe_code)]

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{sys::signal, unistd::Pid};

use crate::host::{self, HostPaths};

/// How long killed processes get to leave their cgroups.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Rounds of SIGKILL on kernels without `cgroup.kill` (processes may fork while being killed).
const FALLBACK_KILL_ROUNDS: u32 = 20;

/// Removes everything of run `prefix`: kills its processes, then removes its bpffs pins, network
/// namespaces, cgroups and finally its state directory (last, so that a teardown that dies half
/// way is still found by the sweep). Goes on after errors and returns them all.
pub(crate) fn teardown_run(paths: &HostPaths, prefix: &str) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    let mut record = |result: Result<()>| {
        if let Err(error) = result {
            errors.push(error);
        }
    };
    let cgroup = paths.run_cgroup(prefix);
    record(kill_cgroup(&cgroup).context("killing the run's processes"));
    record(remove_bpffs_tree(&paths.run_bpffs(prefix)));
    match run_netns(paths, prefix) {
        Ok(names) => {
            for name in names {
                record(host::netns_del(paths, &name));
            }
        }
        Err(error) => record(Err(error)),
    }
    record(remove_cgroup_tree(&cgroup));
    let state = paths.run_state(prefix);
    record(
        ignore_not_found(fs::remove_dir_all(&state))
            .with_context(|| format!("removing {}", state.display())),
    );
    errors
}

/// Kills every process in the cgroup tree at `dir` and waits until the tree is unpopulated.
pub(crate) fn kill_cgroup(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists() {
        ignore_not_found(fs::write(&kill_file, "1"))
            .with_context(|| format!("writing 1 to {}", kill_file.display()))?;
    } else {
        kill_each(dir)?;
    }
    let deadline = Instant::now() + KILL_TIMEOUT;
    while is_populated(dir)? {
        if Instant::now() >= deadline {
            bail!(
                "processes {:?} are still in {} {KILL_TIMEOUT:?} after SIGKILL",
                cgroup_pids(dir).unwrap_or_default(),
                dir.display()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Pre-5.14 kernels have no `cgroup.kill`: signal each process, a few rounds to catch forks.
fn kill_each(dir: &Path) -> Result<()> {
    for _ in 0..FALLBACK_KILL_ROUNDS {
        let pids = cgroup_pids(dir)?;
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            let pid = i32::try_from(pid).context("pid out of range")?;
            // ESRCH: it exited meanwhile.
            let _ = signal::kill(Pid::from_raw(pid), signal::Signal::SIGKILL);
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Whether any process is left in the tree (`populated` of `cgroup.events` covers descendants).
fn is_populated(dir: &Path) -> Result<bool> {
    let events = match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(error) => {
            return Err(error).with_context(|| format!("reading {}/cgroup.events", dir.display()));
        }
    };
    Ok(events.lines().any(|line| line == "populated 1"))
}

/// Pids in every cgroup of the tree at `dir`.
pub(crate) fn cgroup_pids(dir: &Path) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for cgroup in cgroup_dirs(dir)? {
        let procs = match fs::read_to_string(cgroup.join("cgroup.procs")) {
            Ok(procs) => procs,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("reading {}/cgroup.procs", cgroup.display()));
            }
        };
        pids.extend(
            procs
                .lines()
                .filter_map(|line| line.trim().parse::<u32>().ok()),
        );
    }
    Ok(pids)
}

/// The cgroup directories of the tree at `dir`, parents before children; empty if it is gone.
fn cgroup_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    if dir.is_dir() {
        collect_dirs(dir, &mut found)?;
    }
    Ok(found)
}

fn collect_dirs(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    found.push(dir.to_path_buf());
    for entry in read_dir_if_exists(dir)? {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            collect_dirs(&entry.path(), found)?;
        }
    }
    Ok(())
}

/// Removes the (empty) cgroup tree at `dir` bottom-up.
pub(crate) fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    for cgroup in cgroup_dirs(dir)?.iter().rev() {
        ignore_not_found(fs::remove_dir(cgroup))
            .with_context(|| format!("removing cgroup {}", cgroup.display()))?;
    }
    Ok(())
}

/// Removes a bpffs tree: pins are unlinked, directories removed once empty.
pub(crate) fn remove_bpffs_tree(dir: &Path) -> Result<()> {
    for entry in read_dir_if_exists(dir)? {
        let path = entry.path();
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            remove_bpffs_tree(&path)?;
        } else {
            ignore_not_found(fs::remove_file(&path))
                .with_context(|| format!("unpinning {}", path.display()))?;
        }
    }
    ignore_not_found(fs::remove_dir(dir)).with_context(|| format!("removing {}", dir.display()))
}

/// Every path in the bpffs tree at `dir`, the directory itself first.
fn bpffs_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    if dir.exists() {
        found.push(dir.to_path_buf());
        for entry in read_dir_if_exists(dir)? {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                found.extend(bpffs_paths(&entry.path())?);
            } else {
                found.push(entry.path());
            }
        }
    }
    Ok(found)
}

/// Network namespaces of run `prefix` (pods' and nodes').
pub(crate) fn run_netns(paths: &HostPaths, prefix: &str) -> Result<Vec<String>> {
    let mut names: Vec<String> = read_dir_if_exists(&paths.netns_dir)?
        .into_iter()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| {
            name.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('-'))
        })
        .collect();
    names.sort();
    Ok(names)
}

fn read_dir_if_exists(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .collect::<io::Result<Vec<_>>>()
            .with_context(|| format!("listing {}", dir.display())),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(error).with_context(|| format!("listing {}", dir.display())),
    }
}

pub(crate) fn ignore_not_found(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// What still exists of a run; empty after a complete teardown.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    /// Network namespaces named after the run.
    pub netns: Vec<String>,
    /// The run's cgroup directories.
    pub cgroups: Vec<PathBuf>,
    /// Processes still in those cgroups.
    pub processes: Vec<u32>,
    /// The run's bpffs directories and pins.
    pub bpffs: Vec<PathBuf>,
    /// The run's state directory.
    pub state_dir: Option<PathBuf>,
}

impl Leftovers {
    pub(crate) fn of_run(paths: &HostPaths, prefix: &str) -> Result<Self> {
        let cgroup = paths.run_cgroup(prefix);
        let state = paths.run_state(prefix);
        Ok(Self {
            netns: run_netns(paths, prefix)?,
            cgroups: cgroup_dirs(&cgroup)?,
            processes: cgroup_pids(&cgroup)?,
            bpffs: bpffs_paths(&paths.run_bpffs(prefix))?,
            state_dir: state.exists().then_some(state),
        })
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl fmt::Display for Leftovers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("nothing left");
        }
        write!(
            f,
            "left over: netns {:?}, cgroups {:?}, processes {:?}, bpffs {:?}, state dir {:?}",
            self.netns, self.cgroups, self.processes, self.bpffs, self.state_dir
        )
    }
}

/// What is left on this host of the run with prefix `prefix` (see [`crate::Testbed::prefix`]),
/// e.g. to check after dropping a testbed that its teardown was complete.
pub fn leftovers(prefix: &str) -> Result<Leftovers> {
    Leftovers::of_run(&HostPaths::preflight()?, prefix)
}
