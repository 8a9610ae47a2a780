//! Circuit breaking, Envoy style: hard caps on the connections, pending requests and requests
//! in flight to one backend service. Over a cap the engine fails fast instead of queueing
//! without bound, so one slow backend cannot absorb every task and socket of the proxy.
use std::sync::{
    Arc,
    atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::state::policy::Limits;

/// Counts what is in use and what was refused. A cheap handle: clones share the counters, and
/// permits keep a reference, so they can move into spawned tasks.
#[derive(Debug, Clone)]
pub struct Breaker {
    /// Indexed by `Kind`.
    gauges: Arc<[Gauge; 2]>,
    /// Connection slots and their number, `None` when unlimited. A semaphore, not a gauge,
    /// because a request that finds no free connection waits for one (fairly, in arrival order).
    connections: Option<(Arc<Semaphore>, u32)>,
}

/// What is held right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub connections: u32,
    pub pending_requests: u32,
    pub requests: u32,
}

#[derive(Debug)]
struct Gauge {
    max: u32,
    active: AtomicU32,
    overflows: AtomicU64,
}

impl Gauge {
    fn new(max: u32) -> Self {
        Self {
            max,
            active: AtomicU32::new(0),
            overflows: AtomicU64::new(0),
        }
    }

    fn try_acquire(&self) -> bool {
        let admitted = (self.active)
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max).then(|| n + 1))
            .is_ok();
        if !admitted {
            self.overflows.fetch_add(1, Relaxed);
        }
        admitted
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Pending = 0,
    Request = 1,
}

/// Releases its slot on drop.
#[derive(Debug)]
struct Held {
    gauges: Arc<[Gauge; 2]>,
    kind: Kind,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauges[self.kind as usize].active.fetch_sub(1, Relaxed);
    }
}

/// A request in flight; hold it until the response (body included) is done.
#[derive(Debug)]
#[must_use = "the slot is released when the permit is dropped"]
pub struct RequestPermit(#[allow(dead_code, reason = "held for its Drop")] Held);

/// A request waiting for a connection; drop it once the request has one.
#[derive(Debug)]
#[must_use = "the slot is released when the permit is dropped"]
struct PendingPermit(#[allow(dead_code, reason = "held for its Drop")] Held);

/// An upstream connection in use; hold it until the response (body included) is done.
#[derive(Debug)]
#[must_use = "the slot is released when the permit is dropped"]
pub struct ConnPermit(
    #[allow(dead_code, reason = "held for its Drop")] Option<OwnedSemaphorePermit>,
);

impl Breaker {
    #[must_use]
    pub fn new(limits: Limits) -> Self {
        let gauges = [
            Gauge::new(limits.pending_requests.unwrap_or(u32::MAX)),
            Gauge::new(limits.requests.unwrap_or(u32::MAX)),
        ];
        let connections = limits.connections.map(|max| {
            let slots = usize::try_from(max).unwrap_or(usize::MAX);
            let semaphore = Arc::new(Semaphore::new(slots.min(Semaphore::MAX_PERMITS)));
            (semaphore, max)
        });
        Self {
            gauges: Arc::new(gauges),
            connections,
        }
    }

    pub fn try_request(&self) -> Option<RequestPermit> {
        self.hold(Kind::Request).map(RequestPermit)
    }

    fn try_pending(&self) -> Option<PendingPermit> {
        self.hold(Kind::Pending).map(PendingPermit)
    }

    /// A connection slot: at once if one is free, else after waiting as a pending request;
    /// `None` when the pending requests are already at their cap (counted as an overflow).
    /// Cancel-safe: dropping the future gives up the place in the queue.
    pub async fn connection(&self) -> Option<ConnPermit> {
        let Some((slots, _)) = &self.connections else {
            return Some(ConnPermit(None));
        };
        if let Ok(p) = Arc::clone(slots).try_acquire_owned() {
            return Some(ConnPermit(Some(p)));
        }
        let pending = self.try_pending()?;
        // The semaphore is never closed.
        let p = Arc::clone(slots).acquire_owned().await.ok()?;
        drop(pending);
        Some(ConnPermit(Some(p)))
    }

    #[must_use]
    pub fn usage(&self) -> Usage {
        let [pending_requests, requests] = self.gauges.each_ref().map(|g| g.active.load(Relaxed));
        let connections = self.connections.as_ref().map_or(0, |(s, max)| {
            let free = u32::try_from(s.available_permits()).unwrap_or(u32::MAX);
            max.saturating_sub(free)
        });
        Usage {
            connections,
            pending_requests,
            requests,
        }
    }

    /// Refusals since the breaker was created, whichever cap refused (Envoy's
    /// `upstream_rq_pending_overflow` + `upstream_rq_overflow`; a busy connection makes a request
    /// wait, not fail).
    #[must_use]
    pub fn overflows(&self) -> u64 {
        self.gauges.iter().map(|g| g.overflows.load(Relaxed)).sum()
    }

    fn hold(&self, kind: Kind) -> Option<Held> {
        self.gauges[kind as usize].try_acquire().then(|| Held {
            gauges: Arc::clone(&self.gauges),
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{thread, time::Duration};

    use super::*;

    const _: () = {
        const fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Breaker>();
        send_sync::<RequestPermit>();
        send_sync::<ConnPermit>();
    };

    /// Caps of connections, pending and in-flight requests; `u32::MAX` is none.
    fn breaker(connections: u32, pending: u32, requests: u32) -> Breaker {
        let cap = |v: u32| (v != u32::MAX).then_some(v);
        Breaker::new(Limits {
            connections: cap(connections),
            pending_requests: cap(pending),
            requests: cap(requests),
        })
    }

    #[test]
    fn request_cap_refuses_and_counts_then_frees_on_drop() {
        let b = breaker(10, 10, 2);
        let first = b.try_request().unwrap();
        let _second = b.try_request().unwrap();
        assert!(b.try_request().is_none());
        assert!(b.try_request().is_none());
        assert_eq!(b.overflows(), 2);
        assert_eq!(b.usage().requests, 2);
        drop(first);
        assert_eq!(b.usage().requests, 1);
        assert!(b.try_request().is_some());
        assert_eq!(b.overflows(), 2);
    }

    #[tokio::test]
    async fn caps_are_independent() {
        let b = breaker(1, 2, 3);
        let _c = b.connection().await.unwrap();
        let _r: Vec<_> = (0..3).map(|_| b.try_request().unwrap()).collect();
        assert!(b.try_request().is_none());
        let u = b.usage();
        assert_eq!((u.connections, u.pending_requests, u.requests), (1, 0, 3));
        assert_eq!(b.overflows(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn busy_connections_queue_requests_up_to_the_pending_cap() {
        let b = breaker(1, 2, u32::MAX);
        let first = b.connection().await.unwrap();
        let wait = || {
            let b = b.clone();
            tokio::spawn(async move { b.connection().await.map(|_held| ()) })
        };
        let w1 = wait();
        tokio::task::yield_now().await;
        assert_eq!(b.usage().pending_requests, 1);
        // A waiter that gives up frees its pending slot.
        let gave_up = tokio::time::timeout(Duration::from_millis(10), b.connection()).await;
        assert!(gave_up.is_err());
        assert_eq!(b.usage().pending_requests, 1);
        let w2 = wait();
        tokio::task::yield_now().await;
        assert_eq!(b.usage().pending_requests, 2);
        // One more is refused at once and counted.
        assert!(b.connection().await.is_none());
        assert_eq!(b.overflows(), 1);
        let waiting = [w1, w2];
        drop(first);
        for w in waiting {
            assert!(w.await.unwrap().is_some());
        }
        let u = b.usage();
        assert_eq!((u.connections, u.pending_requests), (0, 0));
    }

    #[tokio::test]
    async fn default_is_unlimited_and_zero_admits_nothing() {
        let b = Breaker::new(Limits::default());
        let held: Vec<_> = (0..10_000).map(|_| b.try_request().unwrap()).collect();
        assert_eq!(b.usage().requests, 10_000);
        drop(held);
        assert_eq!(b.usage().requests, 0);
        let conns = futures_held(&b, 1000).await;
        assert_eq!((conns, b.usage().connections), (1000, 0));

        let closed = breaker(0, 0, 0);
        assert!(closed.connection().await.is_none());
        assert!(closed.try_request().is_none());
    }

    async fn futures_held(b: &Breaker, n: usize) -> usize {
        let mut held = Vec::new();
        for _ in 0..n {
            held.extend(b.connection().await);
        }
        held.len()
    }

    #[test]
    fn permits_move_across_threads_and_the_cap_holds_under_contention() {
        let b = breaker(1, 1, 10);
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                thread::spawn(move || (0..100).filter_map(|_| b.try_request()).collect::<Vec<_>>())
            })
            .collect();
        let held: Vec<_> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(held.len(), 10);
        assert_eq!(b.overflows(), 790);
        drop(held);
        assert_eq!(b.usage().requests, 0);
    }
}
