//! `cargo xtask setup`: installs every prerequisite, idempotently, saying what it does.
//!
//! Debian starts the services of packages such as nginx and haproxy on installation, listening
//! on the host: the benchmark only wants their binaries (it runs them inside a testbed node), so
//! installs go through [`NoServiceStarts`] and are checked for processes they left running.
use std::{collections::BTreeSet, os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{run, step};

/// Debian packages: the LLVM bpf-linker links against, the tools the testbed drives, and the
/// benchmark's peers.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "util-linux",
    "curl",
    "procps",
    // Captures on the testbed's inter-node link (the mTLS tests).
    "tcpdump",
    // `cargo xtask bench l7`: the reverse proxies Weft's L7 engine is compared with (Debian 12
    // ships nginx 1.22 and haproxy 2.6; `nginx-light` is only a metapackage over `nginx` there),
    // and the saturation load generator.
    "nginx",
    "haproxy",
    "wrk",
    // `cargo xtask bench l7 --profile`: the agent sampled during a run.
    "linux-perf",
    // The dashboards test: Debian's Prometheus scrapes an agent and evaluates every panel.
    "prometheus",
    // The service graph page's test loads it in a real headless browser (and a font to render
    // its screenshot with).
    "chromium",
    "fonts-dejavu-core",
];
/// Packages whose installation would start a system service, with the service's process
/// name; see [`NoServiceStarts`].
const SERVICE_PACKAGES: &[(&str, &str)] = &[
    ("nginx", "nginx"),
    ("haproxy", "haproxy"),
    ("prometheus", "prometheus"),
    ("etcd-server", "etcd"),
    ("containerd", "containerd"),
    // `bench mtls --ztunnel` installs it for the client pod's capture rule; its unit
    // (`nftables.service`, which loads /etc/nftables.conf into the host) must not start.
    ("nftables", "nft"),
];
/// Debian's hook that `invoke-rc.d` and `deb-systemd-invoke` ask before starting a service.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

fn missing_packages() -> Vec<&'static str> {
    missing(PACKAGES)
}

fn missing(packages: &[&'static str]) -> Vec<&'static str> {
    packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

/// Installs whichever of `packages` are missing (see [`install_packages`]).
pub fn ensure_packages(packages: &[&'static str]) -> Result<()> {
    let missing = missing(packages);
    if missing.is_empty() {
        step!("setup: Debian packages present ({})", packages.join(", "));
        Ok(())
    } else {
        install_packages(&missing)
    }
}

/// `apt-get install` with service starts refused, then a check that nothing was left running.
fn install_packages(missing: &[&str]) -> Result<()> {
    step!("setup: installing Debian packages: {}", missing.join(" "));
    let services: Vec<&str> = SERVICE_PACKAGES
        .iter()
        .filter(|(p, _)| missing.contains(p))
        .map(|(_, process)| *process)
        .collect();
    let running_before = service_pids(&services);
    let guard = if services.is_empty() {
        None
    } else {
        Some(NoServiceStarts::install()?)
    };
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    let installed = run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    drop(guard);
    installed?;
    stop_started_services(&services, &running_before)
}

/// While alive, Debian maintainer scripts may not start services: a `policy-rc.d` that answers
/// 101 ("action forbidden"). Created only if there is none; removed on drop only if created here.
struct NoServiceStarts {
    created: bool,
}

impl NoServiceStarts {
    fn install() -> Result<Self> {
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            step!(
                "setup: {POLICY_RC_D} exists already; relying on it to keep services from starting"
            );
            return Ok(Self { created: false });
        }
        step!("setup: writing a temporary {POLICY_RC_D} so that package installs start no service");
        std::fs::write(
            path,
            "#!/bin/sh\n# Written by `cargo xtask setup`, removed after the install.\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(Self { created: true })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.created {
            match std::fs::remove_file(POLICY_RC_D) {
                Ok(()) => step!("setup: removed the temporary {POLICY_RC_D}"),
                Err(error) => {
                    eprintln!("setup: could not remove {POLICY_RC_D}: {error}; remove it by hand");
                }
            }
        }
    }
}

/// Pids of processes named exactly like one of `names` (`pgrep -x`).
fn service_pids(names: &[&str]) -> BTreeSet<u32> {
    names
        .iter()
        .filter_map(|name| Command::new("pgrep").args(["-x", name]).output().ok())
        .flat_map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Stops (SIGTERM, by pid) service processes that appeared during the install despite
/// `policy-rc.d`; processes that ran before are someone else's and stay.
fn stop_started_services(names: &[&str], before: &BTreeSet<u32>) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let started: Vec<u32> = service_pids(names).difference(before).copied().collect();
    if started.is_empty() {
        step!(
            "setup: checked: the install started no {} process",
            names.join("/")
        );
        return Ok(());
    }
    step!(
        "setup: the install started {started:?} ({}); stopping them",
        names.join("/")
    );
    for pid in &started {
        run(Command::new("kill").args(["-TERM", &pid.to_string()]))?;
    }
    for _ in 0..50 {
        if service_pids(names)
            .intersection(&started.iter().copied().collect())
            .next()
            .is_none()
        {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!(
        "processes {started:?} started by the package install are still running; stop them by hand"
    )
}

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn rust_src_installed(toolchain: &str) -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        })
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    })
}

/// Returns true when everything was already in place.
pub fn check_only() -> bool {
    missing_packages().is_empty()
        && rust_src_installed(if has_nightly() { "nightly" } else { "stable" })
        && bpf_linker_ok()
        && bpffs_mounted()
}

pub fn setup() -> Result<()> {
    // SAFETY-free check of privileges: the datapath and the testbed need root.
    let uid = Command::new("id").arg("-u").output().context("id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!(
            "Weft's setup, demo and tests need root (eBPF, network namespaces, cgroups); run as root"
        );
    }
    ensure_packages(PACKAGES)?;
    let toolchain = if has_nightly() { "nightly" } else { "stable" };
    if rust_src_installed(toolchain) {
        step!("setup: rust-src present for {toolchain}");
    } else {
        step!(
            "setup: adding rust-src to the {toolchain} toolchain (builds core for the BPF target)"
        );
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            toolchain,
        ]))?;
    }
    if bpf_linker_ok() {
        step!("setup: bpf-linker present");
    } else {
        step!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"
        );
        run(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args([
                    "install",
                    "bpf-linker",
                    "--locked",
                    "--version",
                    BPF_LINKER_VERSION,
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )?;
    }
    if bpffs_mounted() {
        step!("setup: bpffs mounted at /sys/fs/bpf");
    } else {
        step!("setup: mounting bpffs at /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    if !Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists()
        && !Path::new("/sys/fs/cgroup/cgroup.subtree_control").exists()
    {
        bail!(
            "no cgroup v2 mount found at /sys/fs/cgroup/unified or /sys/fs/cgroup: Weft attaches its programs to cgroup v2"
        );
    }
    step!("setup: done");
    Ok(())
}
