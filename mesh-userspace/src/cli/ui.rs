//! `weft ui`: the agent's web page (`/ui`: the service graph and its flows) on a TCP address of
//! this host, forwarded to the agent's admin socket — the way `kubectl port-forward` or
//! `linkerd viz dashboard` open a cluster's page. Loopback by default: the page shows the
//! node's traffic, so it is not offered to the network unless asked.
use std::{net::SocketAddr, path::Path};

use super::CliError;

/// Listens on `listen` (port 0: any free port) and forwards each connection to the admin
/// socket, until Ctrl-C. The first line printed is the page's address.
pub fn ui(socket: &Path, listen: SocketAddr) -> Result<(), CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    rt.block_on(async {
        // The agent must be there: a page that cannot load helps nobody.
        let (status, body) = crate::agent_client::get(socket, "/ui")
            .await
            .map_err(CliError::Agent)?;
        if !status.is_success() {
            return Err(CliError::Status {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| CliError::Agent(std::io::Error::new(e.kind(), format!("{listen}: {e}"))))?;
        let addr = listener.local_addr().map_err(CliError::Agent)?;
        println!("http://{addr}/ui");
        eprintln!(
            "forwarding http://{addr}/ to the agent at {} (Ctrl-C stops)",
            socket.display()
        );
        if !addr.ip().is_loopback() {
            eprintln!(
                "warning: {addr} is not a loopback address: whoever reaches it sees this node's traffic"
            );
        }
        let shutdown = crate::signal::shutdown();
        tokio::pin!(shutdown);
        loop {
            let (mut client, _) = tokio::select! {
                () = &mut shutdown => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("accept: {e}");
                        continue;
                    }
                },
            };
            let socket = socket.to_owned();
            tokio::spawn(async move {
                match tokio::net::UnixStream::connect(&socket).await {
                    Ok(mut agent) => {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut agent).await;
                    }
                    Err(e) => eprintln!("cannot reach the agent at {}: {e}", socket.display()),
                }
            });
        }
    })
}
