//! The programs' own decision logs (aya-log, `--ebpf-log`) forwarded into the agent's tracing
//! output, under the target `weft::kernel` with the program's module as a field.
use std::path::Path;

use aya::programs::ProgramInfo;
use aya_log::EbpfLogger;
use mesh_common::program_names;
use tokio::io::unix::AsyncFd;

use super::{EbpfError, Result};

/// Turns aya-log's records into tracing events.
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let program = record.target();
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "weft::kernel", program, "{message}"),
            log::Level::Warn => tracing::warn!(target: "weft::kernel", program, "{message}"),
            log::Level::Info => tracing::info!(target: "weft::kernel", program, "{message}"),
            log::Level::Debug => tracing::debug!(target: "weft::kernel", program, "{message}"),
            log::Level::Trace => tracing::trace!(target: "weft::kernel", program, "{message}"),
        }
    }

    fn flush(&self) {}
}

fn log_err(e: impl std::fmt::Display) -> EbpfError {
    EbpfError::Io {
        path: "AYA_LOGS".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Forwards the programs' logs on the current runtime, unless they were loaded without any.
pub fn spawn(dir: std::path::PathBuf, level: super::LogLevel) {
    if level == super::LogLevel::Off {
        return;
    }
    tokio::spawn(async move {
        if let Err(e) = forward(&dir).await {
            tracing::warn!(error = %e, "the eBPF programs' logs are not forwarded");
        }
    });
}

/// Reads the log ring buffer of the programs pinned in `dir` (they all share one: it belongs to
/// the object they were loaded from) until the runtime stops.
///
/// # Errors
/// When the pinned programs or their log buffer cannot be found.
pub async fn forward(dir: &Path) -> Result<()> {
    let pin = dir.join("progs").join(program_names::CONNECT4);
    let id = ProgramInfo::from_pin(&pin)
        .map_err(|source| EbpfError::Program {
            name: program_names::CONNECT4,
            source,
        })?
        .id();
    let logger = EbpfLogger::init_from_id_with_logger(id, Forward).map_err(log_err)?;
    // SAFETY: the AsyncFd owns the logger and with it the ring buffer's descriptor, which
    // stays open and the same while registered.
    #[allow(
        unsafe_code,
        reason = "tokio's registration of a descriptor it does not own"
    )]
    let mut logger =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|e| log_err(std::io::Error::from(e)))?;
    tracing::info!("forwarding the eBPF programs' logs (target weft::kernel)");
    loop {
        let mut guard = logger.readable_mut().await.map_err(log_err)?;
        let inner = guard.get_inner_mut();
        // aya-log panics on a record it cannot decode; the record is consumed either way, and
        // one bad record must not end the forwarding (nor the agent).
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.flush())).is_err() {
            tracing::warn!("an eBPF log record could not be decoded; skipped");
        }
        guard.clear_ready();
    }
}
