//! Finding runs whose owner died without tearing down (a crashed or killed test) and removing them.
//!
//! A run's state directory `/run/weft-testbed/<prefix>` holds `owner.pid` (pid and start time, so
//! a reused pid does not keep a dead run alive). It appears atomically, with the record inside,
//! before anything else of the run exists, and the owner's teardown removes it last. So:
//! - a state directory whose owner is gone, or whose record is missing, belongs to a dead run;
//! - a namespace, cgroup or bpffs directory named after a run without a state directory is an
//!   orphan of a teardown that died half way.
//!
//! Sweeping and creating runs hold an exclusive lock on `/run/weft-testbed/.lock`.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeSet,
    fs::{self, File},
    path::Path,
};

use anyhow::{Context, Result};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
    sys::signal,
    unistd::Pid,
};

use crate::{host::HostPaths, teardown};

/// Name of the owner record in a run's state directory.
pub(crate) const OWNER_FILE: &str = "owner.pid";
/// Prefix of a state directory being prepared (`.new-<prefix>-<pid>`), renamed into place.
pub(crate) const NEW_DIR_PREFIX: &str = ".new-";
/// Length of a run prefix: `wt` and 6 hex digits.
const PREFIX_LEN: usize = 8;

/// The process that owns a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22); `None` if unknown.
    start_time: Option<u64>,
}

impl Owner {
    pub(crate) fn current() -> Self {
        let pid = i32::try_from(std::process::id()).expect("pids fit in i32");
        Self {
            pid,
            start_time: start_time(pid),
        }
    }

    pub(crate) fn render(self) -> String {
        match self.start_time {
            Some(start) => format!("{}\n{start}\n", self.pid),
            None => format!("{}\n", self.pid),
        }
    }

    /// Parses `pid` or `pid\nstart_time`.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
        let pid = lines.next()?.parse().ok().filter(|pid: &i32| *pid > 0)?;
        let start_time = match lines.next() {
            Some(start) => Some(start.parse().ok()?),
            None => None,
        };
        Some(Self { pid, start_time })
    }

    pub(crate) fn is_alive(self) -> bool {
        if !pid_exists(self.pid) {
            return false;
        }
        match (self.start_time, start_time(self.pid)) {
            (Some(recorded), Some(now)) => recorded == now,
            // Unknown start time: trust the pid.
            _ => true,
        }
    }
}

fn pid_exists(pid: i32) -> bool {
    // Signal 0 only checks; EPERM means it exists but is not ours (we are root, so unlikely).
    !matches!(signal::kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

fn start_time(pid: i32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Field 22 of `/proc/<pid>/stat`; the command name (field 2) may hold spaces and parentheses,
/// so fields are counted after its last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Whether `name` is a run prefix (`wt` and 6 lowercase hex digits).
pub(crate) fn is_run_prefix(name: &str) -> bool {
    name.len() == PREFIX_LEN
        && name.starts_with("wt")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The run prefix of a netns name (`<prefix>-...`).
fn prefix_of_netns(name: &str) -> Option<&str> {
    let prefix = name.get(..PREFIX_LEN)?;
    (is_run_prefix(prefix) && name[PREFIX_LEN..].starts_with('-')).then_some(prefix)
}

/// The run prefix of a per-run directory name (`weft-<prefix>`).
fn prefix_of_dir(name: &str) -> Option<&str> {
    name.strip_prefix("weft-")
        .filter(|prefix| is_run_prefix(prefix))
}

/// Takes the host-wide testbed lock, creating the state root if needed.
pub(crate) fn lock(paths: &HostPaths) -> Result<Flock<File>> {
    fs::create_dir_all(&paths.state_root)
        .with_context(|| format!("creating {}", paths.state_root.display()))?;
    let path = paths.state_root.join(".lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .with_context(|| format!("locking {}", path.display()))
}

/// Removes every dead run and orphan on the host; the caller holds [`lock`]. Returns the prefixes
/// it removed; problems are logged, not returned, so a stuck leftover never blocks new runs.
pub(crate) fn sweep(paths: &HostPaths) -> Vec<String> {
    let mut swept = Vec::new();
    let entries = match fs::read_dir(&paths.state_root) {
        Ok(entries) => entries.filter_map(Result::ok).collect::<Vec<_>>(),
        Err(error) => {
            eprintln!(
                "[testbed] sweep: cannot list {}: {error}",
                paths.state_root.display()
            );
            Vec::new()
        }
    };
    for entry in &entries {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if is_run_prefix(&name) {
            let owner = fs::read_to_string(entry.path().join(OWNER_FILE))
                .ok()
                .and_then(|text| Owner::parse(&text));
            if owner.is_some_and(Owner::is_alive) {
                continue;
            }
            let why = owner.map_or_else(
                || "no owner record".to_owned(),
                |owner| format!("owner pid {} is gone", owner.pid),
            );
            remove_run(paths, &name, &why);
            swept.push(name);
        } else if let Some(rest) = name.strip_prefix(NEW_DIR_PREFIX) {
            let owner = rest.rsplit_once('-').and_then(|(_, pid)| Owner::parse(pid));
            if !owner.is_some_and(Owner::is_alive)
                && let Err(error) = teardown::ignore_not_found(fs::remove_dir_all(entry.path()))
            {
                eprintln!(
                    "[testbed] sweep: removing {}: {error}",
                    entry.path().display()
                );
            }
        }
    }
    for prefix in orphan_prefixes(paths) {
        if !paths.run_state(&prefix).exists() {
            remove_run(paths, &prefix, "orphan without a state directory");
            swept.push(prefix);
        }
    }
    swept
}

/// Prefixes named by namespaces, cgroups and bpffs directories on the host.
fn orphan_prefixes(paths: &HostPaths) -> BTreeSet<String> {
    let names = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|entry| entry.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut prefixes = BTreeSet::new();
    prefixes.extend(
        names(&paths.netns_dir)
            .iter()
            .filter_map(|name| prefix_of_netns(name))
            .map(str::to_owned),
    );
    for dir in [&paths.cgroup_root, &paths.bpffs_root] {
        prefixes.extend(
            names(dir)
                .iter()
                .filter_map(|name| prefix_of_dir(name))
                .map(str::to_owned),
        );
    }
    prefixes
}

fn remove_run(paths: &HostPaths, prefix: &str, why: &str) {
    eprintln!("[testbed] sweeping run {prefix} ({why})");
    for error in teardown::teardown_run(paths, prefix) {
        eprintln!("[testbed] sweep of {prefix}: {error:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_record_round_trips() {
        let owner = Owner {
            pid: 4242,
            start_time: Some(123_456),
        };
        assert_eq!(Owner::parse(&owner.render()), Some(owner));
        let bare = Owner {
            pid: 7,
            start_time: None,
        };
        assert_eq!(Owner::parse(&bare.render()), Some(bare));
        assert_eq!(Owner::parse("7"), Some(bare));
    }

    #[test]
    fn malformed_owner_records_are_rejected() {
        for text in ["", "\n", "abc", "-3", "0", "12\nxyz"] {
            assert_eq!(Owner::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn start_time_is_found_after_an_awkward_command_name() {
        let stat = "1234 (we) ird (name) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 \
                    12345678 300 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("1 (x) S 1"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = Owner::current();
        assert!(me.start_time.is_some());
        assert!(me.is_alive());
        let impostor = Owner {
            start_time: me.start_time.map(|start| start + 1),
            ..me
        };
        assert!(!impostor.is_alive());
    }

    #[test]
    fn prefixes_are_recognised_strictly() {
        assert!(is_run_prefix("wt01beef"));
        for name in ["wt01bee", "wt01beef0", "xt01beef", "wt01BEEF", "wt01beeg"] {
            assert!(!is_run_prefix(name), "{name}");
        }
        assert_eq!(prefix_of_netns("wt01beef-node1-web"), Some("wt01beef"));
        assert_eq!(prefix_of_netns("wt01beef"), None);
        assert_eq!(prefix_of_netns("wt01beefx-node"), None);
        assert_eq!(prefix_of_dir("weft-wt01beef"), Some("wt01beef"));
        assert_eq!(prefix_of_dir("weft-wt01beef-x"), None);
    }
}
