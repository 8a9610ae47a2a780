//! The cap on connections the engine and the tunnel hold at once.
//!
//! Every connection the agent holds costs file descriptors (the client's socket, then one
//! towards the backend) and some memory. Without a cap a flood of connections (or a slowloris
//! client opening thousands) ends in `EMFILE`, and then nothing works: not the flows already
//! open, not the admin socket, not the map syncer. So the engine's listener, the tunnel's
//! listener and the tunnel's inbound streams share one budget; past it a new connection is
//! reset at once (`SO_LINGER` 0, the client sees `ECONNRESET`), a new stream gets 503, and each
//! is counted. What is already open goes on untouched. The agent sizes the budget from its file
//! descriptor limit (see `app`).
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// How many connections may be held at once, and how many are.
#[derive(Debug)]
pub struct ConnectionLimit {
    max: usize,
    open: AtomicUsize,
}

/// One admitted connection: it holds its place until dropped.
#[derive(Debug)]
pub struct Admitted(Arc<ConnectionLimit>);

impl ConnectionLimit {
    #[must_use]
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: AtomicUsize::new(0),
        })
    }

    /// A place for one more connection, or `None` when all are taken.
    #[must_use]
    pub fn try_admit(self: &Arc<Self>) -> Option<Admitted> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max).then_some(open + 1)
            })
            .ok()
            .map(|_| Admitted(self.clone()))
    }

    /// Connections held now.
    #[must_use]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    #[must_use]
    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// File descriptors the agent keeps for itself (maps, programs, admin and metrics listeners,
/// the API server's watches, certificates, logs) whatever the engine holds.
pub const RESERVED_FDS: u64 = 512;

/// The smallest budget, whatever the descriptor limit says (below it the engine could not
/// serve a node at all).
pub const MIN_CONNECTIONS: usize = 64;

/// The budget that fits a file descriptor limit: each held connection may use two descriptors
/// (the client's socket and one towards its backend), after [`RESERVED_FDS`].
#[must_use]
pub fn fits_fd_limit(wanted: usize, fd_limit: u64) -> usize {
    let fit = fd_limit.saturating_sub(RESERVED_FDS) / 2;
    wanted
        .min(usize::try_from(fit).unwrap_or(usize::MAX))
        .max(MIN_CONNECTIONS.min(wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_cap_and_frees_a_place_when_a_connection_ends() {
        let limit = ConnectionLimit::new(2);
        let a = limit.try_admit().expect("first");
        let b = limit.try_admit().expect("second");
        assert!(limit.try_admit().is_none(), "third is over the cap");
        assert_eq!(limit.open(), 2);
        drop(a);
        let c = limit.try_admit().expect("a place was freed");
        assert!(limit.try_admit().is_none());
        drop((b, c));
        assert_eq!(limit.open(), 0);
    }

    #[test]
    fn the_budget_leaves_the_agent_its_own_descriptors() {
        assert_eq!(fits_fd_limit(100_000, 1024), 256);
        assert_eq!(fits_fd_limit(1000, 1 << 20), 1000);
        assert_eq!(fits_fd_limit(1000, 100), MIN_CONNECTIONS);
        assert_eq!(fits_fd_limit(10, 100), 10);
    }
}
