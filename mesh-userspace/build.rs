//! Builds mesh-ebpf for bpfel-unknown-none with aya-build and leaves the object in `OUT_DIR`, where
//! `src/ebpf/mod.rs` embeds it.
//!
//! The nightly toolchain is used when rustup has one; otherwise the current (stable) toolchain
//! builds `core` itself under `RUSTC_BOOTSTRAP=1`, which these machines support as a fallback.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf");
    let has_nightly = std::process::Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let toolchain = if has_nightly {
        Toolchain::Nightly
    } else {
        println!(
            "cargo:warning=no nightly toolchain: building the eBPF object with stable + RUSTC_BOOTSTRAP=1"
        );
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
        Toolchain::Custom("stable")
    };
    aya_build::build_ebpf(
        [Package {
            name: "mesh-ebpf",
            root_dir,
            ..Default::default()
        }],
        toolchain,
    )
}
