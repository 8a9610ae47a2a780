//! Kubernetes 1.20.2 from Debian only: a real kube-apiserver and etcd for the Kubernetes tests,
//! envtest style (the tests find them in `$KUBEBUILDER_ASSETS`, the envtest convention), and the
//! rest of a real cluster for `cargo xtask cluster` and the end-to-end test: kube-controller-manager,
//! kube-scheduler, kubelet, kube-proxy and the `pause` binary of the sandbox image. etcd comes
//! from `etcd-server`; the Kubernetes binaries are built from Debian 12's `kubernetes` source
//! package (no registry here ships them) with Debian's Go, in one `make`. The build takes about
//! 11 minutes on 2 cores, once: the result is cached outside the work tree, in [`CACHE_DIR`].
//!
//! What the build needs, found when it was first done here: Debian's patches applied (`apt-get
//! source` does that), the vendored `github.com/modern-go/reflect2` v1.0.1 replaced with
//! Debian's 1.0.2 (v1.0.1 segfaults on the first custom-object create under Go ≥ 1.18), and
//! `make WHAT=cmd/kube-apiserver` (a plain `go build` lacks the generated `OpenAPI` code).
//!
//! A known quirk of this build: in custom objects (not in built-in kinds) an empty string is
//! read as null, so `group: ""` fails a `type: string` schema, as does a CRD whose schema
//! declares `default: ""`. Weft's CRDs declare no empty-string default, and test objects leave
//! such fields out instead of writing them empty.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{run, setup, step};

/// The Debian source package and its exact version (bookworm, with its security update).
const SOURCE_PACKAGE: &str = "kubernetes";
const SOURCE_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
/// Where the built binaries live: outside any work tree, so clean clones and CI runs reuse them.
pub const CACHE_DIR: &str = "/var/cache/weft/k8s/1.20.2";
/// What one `make` builds.
const COMMANDS: [&str; 5] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
];
/// Build inputs from Debian.
pub const PACKAGES: &[&str] = &[
    "golang-go",
    "rsync",
    "make",
    "dpkg-dev",
    "etcd-server",
    "golang-github-modern-go-reflect2-dev",
    // The tests' service-account signing key.
    "openssl",
    // The sandbox image's `pause`, linked statically.
    "gcc",
    "libc6-dev",
];
const REFLECT2_DEBIAN: &str = "/usr/share/gocode/src/github.com/modern-go/reflect2";

/// The directory holding `kube-apiserver` and `etcd` (and the other cluster binaries), building
/// them if needed.
pub fn assets() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS") {
        let dir = PathBuf::from(dir);
        for bin in ["kube-apiserver", "etcd"] {
            if !dir.join(bin).is_file() {
                bail!(
                    "KUBEBUILDER_ASSETS={} has no {bin}; unset it to have one built from Debian",
                    dir.display()
                );
            }
        }
        step!("envtest: using KUBEBUILDER_ASSETS={}", dir.display());
        return Ok(dir);
    }
    binaries()
}

/// The directory holding every Kubernetes binary of a cluster (and `etcd`), building them once.
pub fn binaries() -> Result<PathBuf> {
    let dir = PathBuf::from(CACHE_DIR);
    setup::ensure_packages(PACKAGES)?;
    link_etcd(&dir)?;
    let complete = COMMANDS
        .iter()
        .chain(&["pause"])
        .all(|b| dir.join(b).is_file());
    if complete {
        step!("kubernetes: 1.20.2 binaries present in {CACHE_DIR}");
    } else {
        build(&dir)?;
    }
    Ok(dir)
}

fn link_etcd(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let link = dir.join("etcd");
    if !link.exists() {
        std::os::unix::fs::symlink("/usr/bin/etcd", &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

/// Debian source lines for the apt sources the system has configured: every `deb` entry,
/// as `deb-src`. Both the one-line format and deb822 `.sources` files are read.
fn source_lines() -> Result<String> {
    let mut out = String::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy();
        if name.ends_with(".list") {
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("deb ")
                    && is_debian(rest)
                {
                    writeln!(out, "deb-src {rest}")?;
                }
            }
        } else if name.ends_with(".sources") {
            for stanza in text.split("\n\n") {
                let field = |key: &str| {
                    stanza
                        .lines()
                        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
                };
                let (Some(types), Some(uris), Some(suites)) =
                    (field("Types:"), field("URIs:"), field("Suites:"))
                else {
                    continue;
                };
                let components = field("Components:").unwrap_or_else(|| "main".into());
                let signed = field("Signed-By:")
                    .map(|k| format!("[signed-by={k}] "))
                    .unwrap_or_default();
                if !types.split_whitespace().any(|t| t == "deb") || !is_debian(&uris) {
                    continue;
                }
                for uri in uris.split_whitespace() {
                    for suite in suites.split_whitespace() {
                        writeln!(out, "deb-src {signed}{uri} {suite} {components}")?;
                    }
                }
            }
        }
    }
    if out.is_empty() {
        bail!("no Debian archive in /etc/apt/sources.list(.d): cannot fetch the kubernetes source");
    }
    Ok(out)
}

/// Debian's own archive (not a third-party repository such as nodesource).
fn is_debian(entry: &str) -> bool {
    entry.contains("/debian")
}

/// `apt-get` with a private configuration: our own source list and package lists, so the
/// system's apt state is not changed.
fn private_apt(work: &Path) -> Result<Command> {
    let etc = work.join("apt");
    let lists = etc.join("lists");
    std::fs::create_dir_all(lists.join("partial"))?;
    std::fs::write(etc.join("sources.list"), source_lines()?)?;
    let mut cmd = Command::new("apt-get");
    cmd.arg("-q")
        .arg(format!(
            "-oDir::Etc::SourceList={}",
            etc.join("sources.list").display()
        ))
        .arg("-oDir::Etc::SourceParts=/nonexistent")
        .arg(format!("-oDir::State::Lists={}", lists.display()))
        .arg("-oAPT::Sandbox::User=root");
    Ok(cmd)
}

fn build(cache: &Path) -> Result<()> {
    step!(
        "kubernetes: building {} 1.20.2 from Debian's {SOURCE_PACKAGE} source (about 11 minutes on 2 cores, once; cached in {CACHE_DIR})",
        COMMANDS.join(", ")
    );
    let work = PathBuf::from("/var/cache/weft/k8s/build");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    step!(
        "kubernetes: fetching the source package (private apt configuration, deb-src of the system's Debian archive)"
    );
    run(private_apt(&work)?.arg("update"))?;
    run(private_apt(&work)?
        .current_dir(&work)
        .args(["source", &format!("{SOURCE_PACKAGE}={SOURCE_VERSION}")]))?;
    let tree = std::fs::read_dir(&work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("kubernetes-"))
        })
        .context("apt-get source left no kubernetes-* directory")?;
    step!("kubernetes: replacing vendored modern-go/reflect2 1.0.1 with Debian's 1.0.2");
    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    std::fs::remove_dir_all(&vendored)
        .with_context(|| format!("removing {}", vendored.display()))?;
    run(Command::new("cp")
        .arg("-rL")
        .arg(REFLECT2_DEBIAN)
        .arg(&vendored))?;
    let what = COMMANDS.map(|c| format!("cmd/{c}")).join(" ");
    step!(
        "kubernetes: make WHAT=\"{what}\" (compiler output in {})",
        work.join("make.log").display()
    );
    let log = std::fs::File::create(work.join("make.log"))?;
    run(Command::new("make")
        .arg(format!("WHAT={what}"))
        .arg("GOLDFLAGS=-s -w")
        .current_dir(&tree)
        .stdout(log.try_clone()?)
        .stderr(log)
        .env("GOFLAGS", "-mod=vendor")
        .env("GO111MODULE", "on")
        .env("GOCACHE", work.join("gocache"))
        .env("GOPATH", work.join("gopath"))
        .env("KUBE_GIT_VERSION", "v1.20.2")
        .env("KUBE_GIT_TREE_STATE", "clean"))?;
    for command in COMMANDS {
        let built = tree.join("_output/bin").join(command);
        if !built.is_file() {
            bail!("make finished but {} is missing", built.display());
        }
        install(&built, &cache.join(command))?;
    }
    // The sandbox image's only program (kubelet runs one per pod), from the same tree.
    let pause = work.join("pause");
    run(Command::new("gcc")
        .args(["-Os", "-static", "-o"])
        .arg(&pause)
        .arg(tree.join("build/pause/linux/pause.c"))
        .arg("-DVERSION=3.2-weft"))?;
    run(Command::new("strip").arg(&pause))?;
    install(&pause, &cache.join("pause"))?;
    std::fs::remove_dir_all(&work).ok();
    step!("kubernetes: binaries built and cached in {CACHE_DIR}");
    Ok(())
}

/// Copies a file into the cache atomically (a crash never leaves a half-written binary).
fn install(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).with_context(|| format!("copying {}", from.display()))?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}
