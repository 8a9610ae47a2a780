//! `cargo xtask setup`: installs every prerequisite, idempotently, saying what it does.
use std::{path::Path, process::Command};

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
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
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
    let missing = missing_packages();
    if missing.is_empty() {
        step!("setup: Debian packages present ({})", PACKAGES.join(", "));
    } else {
        step!("setup: installing Debian packages: {}", missing.join(" "));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
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
