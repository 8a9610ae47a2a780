//! `weft`: the node agent and its CLI (`weft::cli` holds the commands).
use std::path::Path;

use clap::Parser as _;
use weft::cli::args::Cli;

fn main() -> anyhow::Result<()> {
    // Installed as the CNI plugin `weft-cni`: the runtime runs it by that name.
    if std::env::args_os()
        .next()
        .is_some_and(|a| Path::new(&a).file_name() == Some(std::ffi::OsStr::new(weft::cni::PLUGIN)))
    {
        std::process::exit(weft::cni::main());
    }
    // glibc gives every thread that allocates its own 64 MiB arena; the agent's few threads
    // (datapath sync, admin, L7 engine) need no more than two, and memory is a target.
    // SAFETY: mallopt only tunes the allocator and runs before any other thread exists.
    #[allow(unsafe_code, reason = "one libc call to tune the allocator")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            // The eBPF programs' logs pass at every level: `--ebpf-log` already chose which
            // exist (the programs were loaded with only those).
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,weft::kernel=trace".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    weft::cli::run::run(cli)
}
