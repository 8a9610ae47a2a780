//! The process's stop request, shared by the agent and the controller.

/// Resolves at the first SIGTERM (a pod's stop, systemd) or SIGINT (Ctrl-C); never, if the
/// handlers cannot be installed.
pub async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
