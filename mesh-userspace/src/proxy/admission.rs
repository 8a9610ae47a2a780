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
//!
//! Within the budget each source has a share (`--max-connections-per-source`, by default half
//! of it): a pod opening thousands of connections, or one peer node's tunnel, cannot take the
//! places every other client needs. Past its share a source's new connection is refused the
//! same way and counted apart (`source_connection_limit`).
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

/// Who a connection counts against within the budget.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A client's address: a pod of this node (the engine), a peer node (the tunnel).
    Addr(IpAddr),
    /// A tunnel stream's client identity (a SPIFFE id): streams of many pods share a peer
    /// node's connection, so they count against whom they come from.
    Identity(String),
}

/// Why a connection got no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The budget is used up.
    Full,
    /// This source holds its whole share.
    SourceShare,
}

impl Refused {
    /// Metric label.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Self::Full => "connection_limit",
            Self::SourceShare => "source_connection_limit",
        }
    }
}

/// How many connections may be held at once, in all and per source, and how many are.
#[derive(Debug)]
pub struct ConnectionLimit {
    max: usize,
    per_source: usize,
    open: AtomicUsize,
    /// Connections held per source, only while a share smaller than the budget applies; a
    /// source leaves the table with its last connection.
    sources: Mutex<HashMap<Source, usize>>,
}

/// One admitted connection: it holds its place (and its source's) until dropped.
#[derive(Debug)]
pub struct Admitted {
    limit: Arc<ConnectionLimit>,
    source: Option<Source>,
}

impl ConnectionLimit {
    /// A budget of `max` connections, each source holding at most `per_source` of them.
    #[must_use]
    pub fn new(max: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_source: per_source.clamp(1, max.max(1)),
            open: AtomicUsize::new(0),
            sources: Mutex::new(HashMap::new()),
        })
    }

    /// No limit at all (tests, and an engine built without one).
    #[must_use]
    pub fn unlimited() -> Arc<Self> {
        Self::new(usize::MAX, usize::MAX)
    }

    /// A place for one more connection from `source`, or why there is none.
    ///
    /// # Errors
    /// [`Refused::Full`] when every place is taken, [`Refused::SourceShare`] when `source`
    /// holds its share.
    pub fn try_admit(self: &Arc<Self>, source: Source) -> Result<Admitted, Refused> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.max).then_some(open + 1)
            })
            .map_err(|_| Refused::Full)?;
        if self.per_source >= self.max {
            return Ok(Admitted {
                limit: self.clone(),
                source: None,
            });
        }
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let held = sources.entry(source.clone()).or_insert(0);
        if *held >= self.per_source {
            drop(sources);
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::SourceShare);
        }
        *held += 1;
        Ok(Admitted {
            limit: self.clone(),
            source: Some(source),
        })
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

    /// The most one source may hold.
    #[must_use]
    pub fn per_source(&self) -> usize {
        self.per_source
    }

    /// Sources holding at least one connection while a share applies.
    #[must_use]
    pub fn sources(&self) -> usize {
        self.sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(source) = self.source.take() {
            let mut sources = self
                .limit
                .sources
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(held) = sources.get_mut(&source) {
                *held -= 1;
                if *held == 0 {
                    sources.remove(&source);
                }
            }
        }
        self.limit.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The share of the budget one source gets unless told otherwise: half, so that a single
/// client never leaves the others less than half the places.
#[must_use]
pub fn default_share(max: usize) -> usize {
    max.div_ceil(2)
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
        let limit = ConnectionLimit::new(2, 2);
        let a = limit.try_admit(client(1)).expect("first");
        let b = limit.try_admit(client(1)).expect("second");
        assert_eq!(limit.try_admit(client(2)).err(), Some(Refused::Full));
        assert_eq!(limit.open(), 2);
        drop(a);
        let c = limit.try_admit(client(2)).expect("a place was freed");
        assert!(limit.try_admit(client(3)).is_err());
        drop((b, c));
        assert_eq!(limit.open(), 0);
    }

    fn client(n: u8) -> Source {
        Source::Addr(IpAddr::from([198, 18, 0, n]))
    }

    #[test]
    fn one_source_holds_at_most_its_share_and_the_others_keep_the_rest() {
        let limit = ConnectionLimit::new(4, 2);
        let greedy: Vec<Admitted> = (0..2)
            .map(|_| limit.try_admit(client(1)).expect("within the share"))
            .collect();
        assert_eq!(
            limit.try_admit(client(1)).err(),
            Some(Refused::SourceShare),
            "past its share, with places left"
        );
        assert_eq!(limit.open(), 2, "a refused connection holds nothing");
        let other = limit.try_admit(client(2)).expect("another source");
        let by_id = limit
            .try_admit(Source::Identity("spiffe://td/ns/a/sa/b".into()))
            .expect("identities are sources too");
        assert_eq!(limit.try_admit(client(3)).err(), Some(Refused::Full));
        assert_eq!(limit.sources(), 3);
        drop(greedy);
        assert_eq!(
            limit.sources(),
            2,
            "a source leaves with its last connection"
        );
        let again = limit
            .try_admit(client(1))
            .expect("its places are free again");
        drop((other, by_id, again));
        assert_eq!((limit.open(), limit.sources()), (0, 0));
        assert_eq!(default_share(9_744), 4_872);
        assert_eq!(default_share(1), 1);
        assert_eq!(ConnectionLimit::new(10, 0).per_source(), 1);
        assert_eq!(ConnectionLimit::new(10, 50).per_source(), 10);
    }

    #[test]
    fn the_budget_leaves_the_agent_its_own_descriptors() {
        assert_eq!(fits_fd_limit(100_000, 1024), 256);
        assert_eq!(fits_fd_limit(1000, 1 << 20), 1000);
        assert_eq!(fits_fd_limit(1000, 100), MIN_CONNECTIONS);
        assert_eq!(fits_fd_limit(10, 100), 10);
    }
}
