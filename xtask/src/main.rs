//! Project automation: `cargo xtask setup | build | test | demo | bench | fuzz | manifests | envtest`.
//!
//! Each command installs what it needs first (see `setup`), prints what it is doing, and leaves
//! nothing behind on the machine but installed packages and tools.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "xtask reports progress on the terminal"
)]

mod bench;
mod cluster;
mod compat;
mod demo;
mod e2e;
mod envtest;
mod fuzz;
mod image;
mod progress;
mod setup;
mod tools;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// Prints a progress line that stands out from cargo's own output.
#[macro_export]
macro_rules! step {
    ($($arg:tt)*) => {{
        println!("\x1b[1;36m==>\x1b[0m {}", format!($($arg)*));
    }};
}

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install every prerequisite (Debian packages, rust-src, bpf-linker, bpffs mount).
    Setup,
    /// Build the weft binary (with the embedded eBPF object) and the test workload.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: unit, root-free object checks, and privileged testbed integration tests.
    Test {
        /// Extra arguments for the test harness (e.g. a test name filter).
        args: Vec<String>,
    },
    /// Run the demo: a local node with a few pods, a policy, traffic, the flow table and metrics.
    Demo {
        /// How long the demo traffic runs.
        #[arg(long, default_value_t = 5)]
        secs: u64,
        /// Save a picture of the service graph page (headless Chromium) to this file.
        #[arg(long)]
        screenshot: Option<std::path::PathBuf>,
    },
    /// Regenerate the manifests under deploy/ from the Rust types (the CRDs).
    Manifests,
    /// Provide a kube-apiserver and etcd for the Kubernetes tests (built from Debian's source
    /// once, then cached) and print their directory, for `KUBEBUILDER_ASSETS`.
    Envtest,
    /// Benchmarks, side by side in one run.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
        /// Measure this weft binary instead of the one built from this tree (another build, to
        /// compare two commits run for run).
        #[arg(long, global = true)]
        weft: Option<PathBuf>,
        /// l7: also measure this other weft build in the same rounds (column weft-base, on a
        /// node of its own) and report weft ÷ weft-base round by round, with a 95 % interval.
        #[arg(long, global = true)]
        baseline: Option<PathBuf>,
    },
    /// Fuzz every parser that takes bytes from the network or from users (cargo-fuzz, installed
    /// on first use), on the corpus kept in mesh-userspace/fuzz/corpus.
    Fuzz {
        /// Minutes in all, shared by the targets.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Write executions, corpus sizes and crashes as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The compatibility matrix: socket patterns and real programs between two pods, without
    /// Weft, with Weft as users get it, and with the socket fast path forced on.
    Compat {
        /// Write the matrix as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Write Weft's container images (OCI archives, importable with `ctr images import`,
    /// `docker load` and `podman load`) into target/images.
    Image,
    /// Weft on a real two-node Kubernetes 1.20 cluster, end to end: cluster up, images
    /// imported, helm install, checks with kubectl, helm uninstall, cluster down.
    E2e {
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Leave the cluster up when a check fails (`cargo xtask cluster down` removes it).
        #[arg(long)]
        keep: bool,
    },
    /// A real two-node Kubernetes 1.20 cluster on this machine (private namespaces and cgroup).
    Cluster {
        #[command(subcommand)]
        action: ClusterCmd,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Build what is missing (Kubernetes from Debian's source, images) and start the cluster.
    Up {
        /// Run without kube-proxy: Services only through Weft's connect-time load balancing.
        #[arg(long)]
        no_kube_proxy: bool,
    },
    /// Remove the cluster and everything it made.
    Down,
    /// Nodes and pods.
    Status,
    /// kubectl against the cluster: `cargo xtask cluster kubectl -- get pods -A`.
    Kubectl { args: Vec<String> },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Same-node pod-to-pod TCP: no mesh vs Weft's socket fast path.
    L4 {
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Seconds per measurement run.
        #[arg(long, default_value_t = 5)]
        secs: u64,
        /// Repetitions of each measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// HTTP/1.1 pod to pod: direct vs Weft's L7 engine vs nginx vs haproxy (requests/s with wrk,
    /// fixed-rate latency with weft-workload http-load, the agent's memory).
    L7(RateArgs),
    /// Cross-node, encrypted: no mesh vs Weft's mTLS tunnel (L4 and L7) vs a haproxy mutual-TLS
    /// pair vs (with `--ztunnel`) Istio's ztunnel pair: fixed-rate HTTP latency, saturation,
    /// bulk throughput, CPU per 1000 requests, memory.
    Mtls {
        #[command(flatten)]
        args: RateArgs,
        /// An Istio ztunnel binary (built from Istio's source with its test CA, `FAKE_CA`,
        /// compiled in) to measure side by side; without it the report names Istio's published
        /// figures instead.
        #[arg(long, env = "WEFT_ZTUNNEL", value_name = "BIN")]
        ztunnel: Option<PathBuf>,
    },
    /// The control path as the cluster grows: a real API server with 50 nodes, 1000 Services,
    /// 1000 policies and more and more pods; time from a policy change to the kernel's verdict,
    /// the agent's and controller's memory and CPU; a table and `scale.svg`.
    Scale {
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Pod counts to measure at, in increasing order (pods are added, never removed).
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
        sizes: Vec<usize>,
        /// Policy changes per size (alternately a DENY policy created and deleted).
        #[arg(long, default_value_t = 40)]
        changes: usize,
        /// Where `scale.svg` goes.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// Steady load through the L7 engine for half an hour: the agent's RSS after every minute
    /// and its slope (does memory grow?).
    Soak {
        /// Write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Minutes of load (one measurement per minute; the first is warm-up).
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// Requests per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
    },
}

/// Flags of the benchmarks that drive a fixed request rate.
#[derive(clap::Args)]
struct RateArgs {
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seconds per measurement run.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Requests per second of the fixed-rate latency runs.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Rounds over all columns (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// l7: let the scheduler place processes (default: load generators on one CPU, the systems
    /// under test and the upstreams on another, when there are two or more).
    #[arg(long)]
    no_pin: bool,
    /// l7: after the rounds, sample the agent with `perf` during one more saturation run and
    /// write a flame graph (`weft-l7.svg`) and the folded stacks into this directory.
    #[arg(long, value_name = "DIR")]
    profile: Option<PathBuf>,
}

impl RateArgs {
    fn options(&self) -> bench::RateOptions {
        bench::RateOptions {
            secs: self.secs,
            rate: self.rate,
            repeats: self.repeats,
            pin: !self.no_pin,
        }
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

#[must_use]
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Runs a command with inherited output; fails with the command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn ensure_setup() -> Result<()> {
    if setup::check_only() {
        Ok(())
    } else {
        step!("some prerequisites are missing: running `cargo xtask setup` first");
        setup::setup()
    }
}

/// Builds the binaries and returns (weft, weft-workload).
pub fn build(release: bool) -> Result<(PathBuf, PathBuf)> {
    step!(
        "building weft (with its eBPF object) and the test workload{}",
        if release { " (release)" } else { "" }
    );
    let mut cmd = cargo();
    cmd.args([
        "build",
        "-p",
        "mesh-userspace",
        "-p",
        "weft-tests",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let dir = workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" });
    Ok((dir.join("weft"), dir.join("weft-workload")))
}

/// Setup, then [`bench_bins`], for the benchmarks that take no `--baseline`.
fn setup_and_bins(weft: Option<PathBuf>, baseline: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    anyhow::ensure!(baseline.is_none(), "--baseline is for bench l7 only");
    ensure_setup()?;
    bench_bins(weft)
}

/// The release binaries to measure: this tree's, or `weft` (another build) with this tree's
/// test workload.
fn bench_bins(weft: Option<PathBuf>) -> Result<(PathBuf, PathBuf)> {
    let built = build(true)?;
    match weft {
        Some(other) => {
            anyhow::ensure!(other.is_file(), "--weft {}: no such file", other.display());
            step!("measuring {} instead of this tree's weft", other.display());
            Ok((other, built.1))
        }
        None => Ok(built),
    }
}

/// Regenerates what deploy/ holds from the code: the CRDs (into the chart) and the chart
/// rendered as plain manifests.
fn manifests() -> Result<()> {
    let chart = workspace_root().join("deploy/helm/weft");
    let crds = chart.join("crds");
    step!(
        "writing the CRDs generated from the Rust types into {}",
        crds.display()
    );
    std::fs::create_dir_all(&crds)?;
    run(cargo()
        .args([
            "run",
            "-q",
            "-p",
            "mesh-userspace",
            "--bin",
            "weft",
            "--",
            "crds",
            "--out-dir",
        ])
        .arg(&crds))?;
    let helm = tools::helm()?;
    let out = workspace_root().join("deploy/manifests/weft.yaml");
    step!("rendering the chart into {}", out.display());
    let rendered = Command::new(&helm)
        .args(testbed::kube::CHART_RENDER_ARGS)
        .arg(&chart)
        .output()
        .context("running helm template")?;
    if !rendered.status.success() {
        bail!(
            "helm template failed: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
    }
    std::fs::create_dir_all(out.parent().unwrap_or(&chart))?;
    let mut text = String::from(MANIFESTS_HEADER);
    text.push_str(&String::from_utf8_lossy(&rendered.stdout));
    std::fs::write(&out, text)?;
    Ok(())
}

const MANIFESTS_HEADER: &str = "# The Helm chart deploy/helm/weft rendered with its default values (`cargo xtask manifests`);\n# apply after `kubectl create namespace weft-system`. Do not edit: change the chart.\n";

/// Builds the release binaries and writes the images.
fn images() -> Result<cluster::Images> {
    ensure_setup()?;
    setup::ensure_packages(cluster::PACKAGES)?;
    let (weft, workload) = build(true)?;
    let k8s = envtest::binaries()?;
    cluster::build_images(&weft, &workload, &k8s, &cluster::image_dir())
}

/// `cargo xtask test`: the Rust tests (unit, object layout, privileged testbed), then the
/// compatibility matrix and the end-to-end test on a real cluster (unless filtered).
fn test(args: &[String]) -> Result<()> {
    ensure_setup()?;
    let assets = envtest::assets()?;
    let helm = tools::helm()?;
    tools::kubernetes_validate()?;
    let (weft, workload) = build(false)?;
    step!("running the tests (unit, object layout, and privileged testbed integration tests)");
    let mut cmd = cargo();
    cmd.args(["test", "--no-fail-fast", "--"])
        .args(["--test-threads", "2"])
        .args(args)
        .env("KUBEBUILDER_ASSETS", &assets)
        .env("WEFT_HELM", &helm)
        .env("WEFT_BIN", &weft)
        .env("WEFT_WORKLOAD_BIN", &workload);
    let tests = run(&mut cmd);
    if !args.is_empty() {
        // A filtered run is for the tests it names.
        return tests;
    }
    step!("the compatibility matrix (cargo xtask compat)");
    let report = workspace_root().join("target/compat.json");
    let compat = testbed::use_binaries(&weft, &workload)
        .and_then(|()| compat::run(Some(&report)))
        .and_then(|r| compat::verdict(&r));
    step!("end to end on a real two-node Kubernetes cluster (cargo xtask e2e)");
    let e2e = images().and_then(|images| {
        let weft = workspace_root().join("target/release/weft");
        let report = workspace_root().join("target/e2e.json");
        e2e::run(&weft, &images, Some(&report), false)
    });
    let failures: Vec<String> = [
        tests.err().map(|e| format!("tests: {e:#}")),
        compat.err().map(|e| format!("{e:#}")),
        e2e.err().map(|e| format!("end to end: {e:#}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", failures.join("\n"))
    }
}

#[allow(clippy::too_many_lines, reason = "one arm per command")]
fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Image => images().map(drop),
        Cmd::Fuzz {
            minutes,
            target,
            json,
        } => fuzz::run_all(minutes, target.as_deref(), json.as_deref()),
        Cmd::Compat { json } => {
            ensure_setup()?;
            let (weft, workload) = build(false)?;
            testbed::use_binaries(&weft, &workload)?;
            let report = compat::run(json.as_deref())?;
            compat::verdict(&report)
        }
        Cmd::E2e { json, keep } => {
            let images = images()?;
            let weft = workspace_root().join("target/release/weft");
            e2e::run(&weft, &images, json.as_deref(), keep).map(drop)
        }
        Cmd::Cluster { action } => {
            let name = testbed::cluster::DEFAULT_NAME;
            match action {
                ClusterCmd::Up { no_kube_proxy } => {
                    let images = images()?;
                    cluster::up(name, &images, !no_kube_proxy).map(drop)
                }
                ClusterCmd::Down => cluster::down(name),
                ClusterCmd::Status => cluster::status(name),
                ClusterCmd::Kubectl { args } => cluster::kubectl(name, &args),
            }
        }
        Cmd::Setup => setup::setup(),
        Cmd::Manifests => manifests(),
        Cmd::Envtest => {
            ensure_setup()?;
            let dir = envtest::assets()?;
            println!("{}", dir.display());
            Ok(())
        }
        Cmd::Build { release } => {
            ensure_setup()?;
            build(release).map(drop)
        }
        Cmd::Test { args } => test(&args),
        Cmd::Demo { secs, screenshot } => {
            ensure_setup()?;
            let bins = build(true)?;
            demo::run(&bins.0, &bins.1, secs, screenshot.as_deref())
        }
        Cmd::Bench {
            which:
                BenchCmd::L4 {
                    json,
                    secs,
                    repeats,
                },
            weft,
            baseline,
        } => {
            let bins = setup_and_bins(weft, baseline.as_deref())?;
            bench::l4(&bins.0, &bins.1, secs, repeats, json.as_deref())
        }
        Cmd::Bench {
            which: BenchCmd::L7(args),
            weft,
            baseline,
        } => {
            ensure_setup()?;
            if let Some(b) = &baseline {
                anyhow::ensure!(b.is_file(), "--baseline {}: no such file", b.display());
            }
            let bins = bench_bins(weft)?;
            bench::l7(
                &bins.0,
                &bins.1,
                args.options(),
                baseline.as_deref(),
                args.profile.as_deref(),
                args.json.as_deref(),
            )
        }
        Cmd::Bench {
            which:
                BenchCmd::Scale {
                    json,
                    sizes,
                    changes,
                    out,
                },
            weft,
            baseline,
        } => {
            let bins = setup_and_bins(weft, baseline.as_deref())?;
            bench::scale(
                &bins.0,
                &bins.1,
                &bench::ScaleOptions { sizes, changes },
                json.as_deref(),
                &out,
            )
        }
        Cmd::Bench {
            which:
                BenchCmd::Soak {
                    json,
                    minutes,
                    rate,
                },
            weft,
            baseline,
        } => {
            let bins = setup_and_bins(weft, baseline.as_deref())?;
            bench::soak(
                &bins.0,
                &bins.1,
                &bench::SoakOptions { minutes, rate },
                json.as_deref(),
            )
        }
        Cmd::Bench {
            which: BenchCmd::Mtls { args, ztunnel },
            weft,
            baseline,
        } => {
            anyhow::ensure!(args.profile.is_none(), "--profile is for bench l7 only");
            let bins = setup_and_bins(weft, baseline.as_deref())?;
            bench::mtls(
                &bins.0,
                &bins.1,
                &args.options(),
                ztunnel.as_deref(),
                args.json.as_deref(),
            )
        }
    }
}
