//! The netns testbed: Weft's integration tests, demo and benchmark run real agents, servers and
//! clients on "nodes" and "pods" made of network namespaces, veth pairs and cgroup v2 directories
//! on one Linux host.
//!
//! A [`Testbed`] is one run with a short unique prefix (`wt1a2b3c`). Everything it creates is named
//! after that prefix, so a run can always be found and removed:
//!
//! | what | name |
//! | --- | --- |
//! | node netns | `<prefix>-<node>`, with bridge `br0` at `198.18.<N>.1/24` |
//! | pod netns | `<prefix>-<node>-<pod>` (`<prefix>-<node>-<namespace>_<pod>` outside `default`), `eth0` at `198.18.<N>.<10+k>/24` |
//! | pod veth, node side | `vh<k>` on `br0` in the node netns |
//! | fabric | netns `<prefix>-_fabric` with bridge `fab0`; node N's `uplink` at `198.18.0.<N>/24` routes the other nodes' pod networks (pods route `198.18.0.0/16` via their node; no default routes) |
//! | node cgroup | `<cgroup2>/weft-<prefix>/<node>`; pod cgroups below it as `<namespace>_<pod>` |
//! | node processes (agent) | `<cgroup2>/weft-<prefix>/_host/<node>`, outside the node cgroup |
//! | bpffs | `/sys/fs/bpf/weft-<prefix>/<node>` |
//! | state | `/run/weft-testbed/<prefix>/` (`owner.pid`, per-node run dirs) |
//!
//! Dropping the [`Testbed`] kills every process of the run and removes all of it; a run whose
//! owner died without that is removed by the next [`Testbed::new`] on the host (see `sweep`).
//! Nothing is created in the host's own network namespace.
//!
//! Everything here needs root, cgroup v2 and bpffs; without them [`Testbed::new`] fails with an
//! error saying what is missing: a test never passes by skipping.
#![deny(unsafe_code)] // reason: only `process` (pre_exec) needs it and says why

pub mod agent;
pub mod browser;
pub mod cluster;
mod eventually;
pub mod grpc;
mod host;
pub mod http;
pub mod kube;
mod node;
mod otlp;
pub mod pin;
mod pod;
mod process;
mod run;
pub mod scripts;
mod sweep;
pub mod tcp_memory;
mod teardown;
pub mod workload;

use std::path::PathBuf;

pub use eventually::{POLL_INTERVAL, eventually};
pub use node::Node;
pub use otlp::{OtlpReceiver, OtlpReceiverArgs, ReceivedSpan, run as otlp_receiver};
pub use pod::{DEFAULT_NAMESPACE, POD_VETH_PREFIX, Pod, UNMESHED_ANNOTATION};
pub use process::{Finished, Proc};
pub use run::Testbed;
pub use teardown::{Leftovers, leftovers};
pub use workload::{Hold, ServeMode, Server};

/// The workspace root, for the binaries built next to this crate.
fn workspace_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), PathBuf::from)
}

/// Binaries chosen by the program using the testbed (the demo and the benchmark use release
/// builds); they take precedence over the environment.
static BINARIES: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();

/// Makes [`weft_bin`] and [`workload_bin`] return these paths for the rest of the process.
pub fn use_binaries(weft: &std::path::Path, workload: &std::path::Path) -> anyhow::Result<()> {
    for b in [weft, workload] {
        anyhow::ensure!(b.exists(), "{} was not built", b.display());
    }
    let _ = BINARIES.set((weft.to_owned(), workload.to_owned()));
    Ok(())
}

/// The `weft` binary under test: `$WEFT_BIN`, else `<workspace>/target/debug/weft`.
#[must_use]
pub fn weft_bin() -> PathBuf {
    if let Some((w, _)) = BINARIES.get() {
        return w.clone();
    }
    std::env::var_os("WEFT_BIN")
        .map_or_else(|| workspace_dir().join("target/debug/weft"), PathBuf::from)
}

/// The test workload (`src/bin/weft-workload.rs`): `$WEFT_WORKLOAD_BIN`, else
/// `<workspace>/target/debug/weft-workload` (integration tests of this crate get it built by
/// cargo; other users build it with `cargo build -p weft-tests`).
#[must_use]
pub fn workload_bin() -> PathBuf {
    if let Some((_, w)) = BINARIES.get() {
        return w.clone();
    }
    std::env::var_os("WEFT_WORKLOAD_BIN").map_or_else(
        || workspace_dir().join("target/debug/weft-workload"),
        PathBuf::from,
    )
}
