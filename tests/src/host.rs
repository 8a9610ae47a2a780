//! What the testbed needs from the host (root, cgroup v2, bpffs, iproute2) and the one way it
//! changes network namespaces: the `ip` tool.
#![forbid(unsafe_code)]

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, statfs};

/// Where `ip netns` keeps its namespace files.
pub(crate) const NETNS_DIR: &str = "/run/netns";
/// Where bpffs is expected (the agent pins below it).
const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Per-run state: owner records, agent sockets and config.
const STATE_ROOT: &str = "/run/weft-testbed";
/// cgroup v2 mount points, hybrid hosts first.
const CGROUP2_CANDIDATES: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

/// The host directories the testbed works in, checked once per run.
#[derive(Debug, Clone)]
pub(crate) struct HostPaths {
    pub(crate) cgroup_root: PathBuf,
    pub(crate) bpffs_root: PathBuf,
    pub(crate) state_root: PathBuf,
    pub(crate) netns_dir: PathBuf,
}

impl HostPaths {
    /// Fails, saying what to do, unless this process is root and cgroup v2 and bpffs are mounted.
    pub(crate) fn preflight() -> Result<Self> {
        ensure!(
            nix::unistd::geteuid().is_root(),
            "the netns testbed needs root (network namespaces, cgroups, bpffs): run the tests as \
             root, e.g. `sudo -E cargo test -p weft-tests`"
        );
        let cgroup_root = CGROUP2_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|path| is_mounted(path, CGROUP2_SUPER_MAGIC))
            .with_context(|| {
                format!(
                    "cgroup v2 is not mounted at any of {CGROUP2_CANDIDATES:?}: mount it, e.g. \
                     `mount -t cgroup2 none /sys/fs/cgroup/unified`"
                )
            })?;
        let bpffs_root = PathBuf::from(BPFFS_ROOT);
        ensure!(
            is_mounted(&bpffs_root, BPF_FS_MAGIC),
            "bpffs is not mounted at {BPFFS_ROOT}: mount it with `mount -t bpf bpf {BPFFS_ROOT}`"
        );
        Ok(Self {
            cgroup_root,
            bpffs_root,
            state_root: PathBuf::from(STATE_ROOT),
            netns_dir: PathBuf::from(NETNS_DIR),
        })
    }

    /// The run's cgroup: every process the run starts lives below it.
    pub(crate) fn run_cgroup(&self, prefix: &str) -> PathBuf {
        self.cgroup_root.join(format!("weft-{prefix}"))
    }

    pub(crate) fn run_bpffs(&self, prefix: &str) -> PathBuf {
        self.bpffs_root.join(format!("weft-{prefix}"))
    }

    pub(crate) fn run_state(&self, prefix: &str) -> PathBuf {
        self.state_root.join(prefix)
    }

    pub(crate) fn netns_path(&self, name: &str) -> PathBuf {
        self.netns_dir.join(name)
    }
}

fn is_mounted(path: &Path, magic: nix::sys::statfs::FsType) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == magic)
}

/// Serialises `ip netns add` within this process: the first one bind-mounts `/run/netns` onto
/// itself, and racing first calls stack those mounts.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// `ip netns add NAME`.
pub(crate) fn netns_add(name: &str) -> Result<()> {
    let _serial = NETNS_ADD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    ip(&["netns", "add", name])
}

/// `ip netns del NAME`; a namespace that is already gone is not an error.
pub(crate) fn netns_del(paths: &HostPaths, name: &str) -> Result<()> {
    if !paths.netns_path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name])
}

/// Sets a (network-namespaced) sysctl inside `netns`, e.g. forwarding for a node of the run.
pub(crate) fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "sh",
            "-c",
            &format!("echo {value} > {path}"),
        ])
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip netns exec` (is iproute2 installed?)")?;
    if !output.status.success() {
        bail!(
            "setting {key}={value} in netns {netns}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip ARGS`, failing with its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    run_ip(args, None).map(drop)
}

/// Runs the `ip` commands `lines` (without the leading `ip`) in one process inside `netns`.
pub(crate) fn ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    let script = lines.join("\n") + "\n";
    run_ip(&["-n", netns, "-batch", "-"], Some(&script))
        .map(drop)
        .with_context(|| format!("in netns {netns}: {}", lines.join("; ")))
}

/// Runs `ip -j ARGS` and parses its JSON.
pub(crate) fn ip_json(args: &[&str]) -> Result<serde_json::Value> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let stdout = run_ip(&full, None)?;
    serde_json::from_slice(&stdout)
        .with_context(|| format!("`ip {}` printed no JSON", full.join(" ")))
}

fn run_ip(args: &[&str], stdin: Option<&str>) -> Result<Vec<u8>> {
    let describe = || format!("`ip {}`", args.join(" "));
    let mut child = Command::new("ip")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {} (is iproute2 installed?)", describe()))?;
    if let (Some(script), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(script.as_bytes())
            .with_context(|| format!("writing the batch to {}", describe()))?;
    }
    let output = child.wait_with_output().with_context(describe)?;
    if !output.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}
