//! Endpoint load balancing for one backend service.
//!
//! The default, power-of-two-choices over peak-EWMA latency (Finagle, linkerd), sends traffic
//! away from slow or overloaded endpoints within a few requests without global state: it draws
//! two endpoints at random and takes the cheaper, cost being `rtt_estimate × (in_flight + 1)`.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use rand::Rng;
use tokio::time::Instant;

use crate::state::policy::Algorithm;

/// Time constant of the latency EWMA (linkerd's).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// Estimate for an endpoint without a response yet (linkerd's): low enough that it is tried,
/// not so low that it is flooded.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Virtual nodes per endpoint on the hash ring: spread within about ±10%.
pub const VNODES: u32 = 100;
/// `LeastRequest` scans all endpoints up to this many.
pub const FULL_SCAN_MAX: usize = 8;
/// Random draws before falling back to a scan when endpoints are unusable.
const PROBES: usize = 3;
const DECAY_NS: f64 = DEFAULT_DECAY.as_secs_f64() * 1e9;

/// Shared by every request to one backend service; picking takes no lock but a read lock to
/// clone the endpoint set's `Arc`, and allocates nothing.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    set: RwLock<Arc<Set>>,
    updating: Mutex<()>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct Set {
    endpoints: Vec<Arc<Endpoint>>,
    /// (hash, index in `endpoints`), sorted; empty unless `RingHash`.
    ring: Vec<(u64, usize)>,
}

#[derive(Debug)]
struct Endpoint {
    addr: SocketAddr,
    in_flight: AtomicU32,
    rtt: Mutex<PeakEwma>,
}

/// Finagle's peak EWMA: a slower sample replaces the estimate at once, a faster one is averaged
/// in with weight `1 - e^(-elapsed/τ)`; reading it counts as a sample of 0, so an endpoint that
/// is not picked drifts back to being tried.
#[derive(Debug)]
struct PeakEwma {
    rtt_ns: f64,
    stamp: Instant,
}

impl PeakEwma {
    fn observe(&mut self, sample_ns: f64, now: Instant) -> f64 {
        if sample_ns > self.rtt_ns {
            self.rtt_ns = sample_ns;
        } else {
            let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64() * 1e9;
            let weight = (-elapsed / DECAY_NS).exp();
            self.rtt_ns = self.rtt_ns * weight + sample_ns * (1.0 - weight);
        }
        self.stamp = now;
        self.rtt_ns
    }
}

impl Endpoint {
    fn new(addr: SocketAddr) -> Self {
        let rtt = PeakEwma {
            rtt_ns: DEFAULT_RTT.as_secs_f64() * 1e9,
            stamp: Instant::now(),
        };
        Self {
            addr,
            in_flight: AtomicU32::new(0),
            rtt: Mutex::new(rtt),
        }
    }

    fn in_flight(&self) -> f64 {
        f64::from(self.in_flight.load(Relaxed))
    }

    fn cost(&self, now: Instant) -> f64 {
        let rtt = self
            .rtt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(0.0, now);
        rtt * (self.in_flight() + 1.0)
    }
}

/// The chosen endpoint. While it lives it counts as a request in flight there; report how the
/// request went with [`Pick::record`]. Dropping it without recording releases it without a
/// latency sample (for requests that never reached the endpoint, or were cancelled).
#[derive(Debug)]
#[must_use = "dropping a Pick releases the endpoint at once"]
pub struct Pick {
    endpoint: Arc<Endpoint>,
}

impl Pick {
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    /// Feeds the latency estimate. A failure only counts if it was slower than the estimate: a
    /// fast error must not make a broken endpoint look attractive (outlier detection ejects it).
    pub fn record(self, latency: Duration, ok: bool) {
        let sample = latency.as_secs_f64() * 1e9;
        let mut rtt = self
            .endpoint
            .rtt
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if ok || sample > rtt.rtt_ns {
            rtt.observe(sample, Instant::now());
        }
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Balancer {
    /// Duplicate addresses are dropped.
    #[must_use]
    pub fn new(endpoints: Vec<SocketAddr>, algorithm: Algorithm) -> Self {
        let empty = Set {
            endpoints: Vec::new(),
            ring: Vec::new(),
        };
        let balancer = Self {
            algorithm,
            set: RwLock::new(Arc::new(empty)),
            updating: Mutex::new(()),
            next: AtomicUsize::new(0),
        };
        balancer.update(endpoints);
        balancer
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.set().endpoints.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the endpoint set. Endpoints that stay keep their latency estimate and in-flight
    /// count; new ones start at the default RTT; picks of removed endpoints stay valid and
    /// simply release nothing that matters. The ring is rebuilt (only removed endpoints' keys
    /// move). Concurrent picks see the old or the new set, never a mix.
    pub fn update(&self, endpoints: Vec<SocketAddr>) {
        let _serialised = self.updating.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.set();
        let kept: HashMap<SocketAddr, &Arc<Endpoint>> =
            old.endpoints.iter().map(|e| (e.addr, e)).collect();
        let mut seen = HashSet::with_capacity(endpoints.len());
        let endpoints: Vec<_> = endpoints
            .into_iter()
            .filter(|addr| seen.insert(*addr))
            .map(|addr| match kept.get(&addr) {
                Some(endpoint) => Arc::clone(endpoint),
                None => Arc::new(Endpoint::new(addr)),
            })
            .collect();
        let ring = if self.algorithm == Algorithm::RingHash {
            build_ring(&endpoints)
        } else {
            Vec::new()
        };
        *self.set.write().unwrap_or_else(PoisonError::into_inner) =
            Arc::new(Set { endpoints, ring });
    }

    /// Chooses among the endpoints for which `usable` is true (the caller excludes ejected or
    /// saturated ones); `None` if there is none. `hash` is only used by `RingHash`, which
    /// picks at random without one.
    pub fn pick(&self, hash: Option<u64>, usable: impl Fn(SocketAddr) -> bool) -> Option<Pick> {
        self.pick_with(&mut rand::rng(), hash, usable)
    }

    /// [`Balancer::pick`] with the caller's random source (tests seed it).
    pub fn pick_with<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        hash: Option<u64>,
        usable: impl Fn(SocketAddr) -> bool,
    ) -> Option<Pick> {
        let set = self.set();
        let eps = &set.endpoints;
        let n = eps.len();
        let ok = |i: usize| usable(eps[i].addr);
        let chosen = match (self.algorithm, hash) {
            (Algorithm::RoundRobin, _) => (0..n)
                .map(|_| self.next.fetch_add(1, Relaxed) % n)
                .find(|&i| ok(i)),
            (Algorithm::Random, _) | (Algorithm::RingHash, None) => {
                random_usable(rng, n, None, &ok)
            }
            (Algorithm::RingHash, Some(hash)) => set.ring_lookup(hash, &ok),
            (Algorithm::LeastRequest, _) if n <= FULL_SCAN_MAX => {
                let start = if n == 0 { 0 } else { rng.random_range(0..n) };
                (0..n)
                    .map(|k| (start + k) % n)
                    .filter(|&i| ok(i))
                    .min_by_key(|&i| eps[i].in_flight.load(Relaxed))
            }
            (Algorithm::LeastRequest, _) => p2c(rng, n, &ok, |i| eps[i].in_flight()),
            (Algorithm::P2cPeakEwma, _) => {
                let now = Instant::now();
                p2c(rng, n, &ok, |i| eps[i].cost(now))
            }
        }?;
        let endpoint = Arc::clone(&eps[chosen]);
        endpoint.in_flight.fetch_add(1, Relaxed);
        Some(Pick { endpoint })
    }

    fn set(&self) -> Arc<Set> {
        Arc::clone(&self.set.read().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Set {
    /// The first vnode at or after `hash` (wrapping) whose endpoint is usable: skipping an
    /// unusable endpoint maps its keys exactly as removing it would.
    fn ring_lookup(&self, hash: u64, ok: &impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.ring.len();
        let start = self.ring.partition_point(|&(h, _)| h < hash);
        let mut last_refused = None;
        for k in 0..len {
            let i = self.ring[(start + k) % len].1;
            if last_refused != Some(i) {
                if ok(i) {
                    return Some(i);
                }
                last_refused = Some(i);
            }
        }
        None
    }
}

/// Two distinct usable endpoints at random, the cheaper wins (the first on a tie); a single
/// usable endpoint wins alone.
fn p2c<R: Rng + ?Sized>(
    rng: &mut R,
    n: usize,
    ok: &impl Fn(usize) -> bool,
    cost: impl Fn(usize) -> f64,
) -> Option<usize> {
    let a = random_usable(rng, n, None, ok)?;
    let Some(b) = random_usable(rng, n, Some(a), ok) else {
        return Some(a);
    };
    Some(if cost(b) < cost(a) { b } else { a })
}

/// A uniformly random usable index other than `exclude` while most are usable: a few draws,
/// then a scan from a random start (biased, but bounded and allocation-free).
fn random_usable<R: Rng + ?Sized>(
    rng: &mut R,
    n: usize,
    exclude: Option<usize>,
    ok: &impl Fn(usize) -> bool,
) -> Option<usize> {
    let candidates = n
        .checked_sub(usize::from(exclude.is_some()))
        .filter(|&c| c > 0)?;
    let mut draw = || {
        let i = rng.random_range(0..candidates);
        match exclude {
            Some(x) if i >= x => i + 1,
            _ => i,
        }
    };
    for _ in 0..PROBES {
        let i = draw();
        if ok(i) {
            return Some(i);
        }
    }
    let start = draw();
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| Some(i) != exclude && ok(i))
}

fn build_ring(endpoints: &[Arc<Endpoint>]) -> Vec<(u64, usize)> {
    let mut ring = Vec::with_capacity(endpoints.len() * VNODES as usize);
    for (i, endpoint) in endpoints.iter().enumerate() {
        // ip octets, port and vnode number, big-endian: the same on every node and release.
        let mut buf = [0u8; 16 + 2 + 4];
        let ip_len = match endpoint.addr.ip() {
            IpAddr::V4(ip) => {
                buf[..4].copy_from_slice(&ip.octets());
                4
            }
            IpAddr::V6(ip) => {
                buf[..16].copy_from_slice(&ip.octets());
                16
            }
        };
        buf[ip_len..ip_len + 2].copy_from_slice(&endpoint.addr.port().to_be_bytes());
        for vnode in 0..VNODES {
            buf[ip_len + 2..ip_len + 6].copy_from_slice(&vnode.to_be_bytes());
            ring.push((hash_key(&buf[..ip_len + 6]), i));
        }
    }
    // Ties (vanishingly rare) by address, so the ring does not depend on the input order.
    ring.sort_unstable_by_key(|&(hash, i)| (hash, endpoints[i].addr));
    ring
}

/// Stable 64-bit hash for ring keys (a header or cookie value) and vnodes: FNV-1a, then
/// `MurmurHash3`'s finaliser so that near-identical inputs spread over the whole ring. Unlike
/// std's `SipHash` it is unkeyed: every agent maps a key to the same endpoint.
#[must_use]
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};
    use tokio::time::advance;

    use super::*;

    const _: () = {
        const fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Balancer>();
        send_sync::<Pick>();
    };

    const ALL: [Algorithm; 5] = [
        Algorithm::P2cPeakEwma,
        Algorithm::RoundRobin,
        Algorithm::LeastRequest,
        Algorithm::RingHash,
        Algorithm::Random,
    ];

    fn eps(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect()
    }

    fn any(_: SocketAddr) -> bool {
        true
    }

    fn key(i: u32) -> u64 {
        hash_key(format!("user-{i}").as_bytes())
    }

    #[test]
    fn round_robin_cycles_and_skips_unusable() {
        let e = eps(3);
        let b = Balancer::new(e.clone(), Algorithm::RoundRobin);
        let picked: Vec<_> = (0..6).map(|_| b.pick(None, any).unwrap().addr()).collect();
        assert_eq!(picked, [e[0], e[1], e[2], e[0], e[1], e[2]]);
        let picked: Vec<_> = (0..4)
            .map(|_| b.pick(None, |a| a != e[1]).unwrap().addr())
            .collect();
        assert_eq!(picked, [e[0], e[2], e[0], e[2]]);
    }

    // Paused: unseen endpoints' estimates tie exactly, so P2C spreads over all of them.
    #[tokio::test(start_paused = true)]
    async fn exclusion_is_respected_by_every_algorithm() {
        let e = eps(5);
        let mut rng = StdRng::seed_from_u64(1);
        for algorithm in ALL {
            let b = Balancer::new(e.clone(), algorithm);
            let usable = |a: SocketAddr| a != e[1] && a != e[3];
            let mut seen = HashSet::new();
            for i in 0..300 {
                let hash = if i % 2 == 0 { Some(key(i)) } else { None };
                let addr = b.pick_with(&mut rng, hash, usable).unwrap().addr();
                assert!(usable(addr), "{algorithm:?} picked {addr}");
                seen.insert(addr);
            }
            assert_eq!(seen.len(), 3, "{algorithm:?} uses every usable endpoint");
            assert!(b.pick(Some(key(1)), |_| false).is_none(), "{algorithm:?}");
            assert!(
                Balancer::new(vec![], algorithm)
                    .pick(Some(key(1)), any)
                    .is_none()
            );
            let single = b.pick_with(&mut rng, None, |a| a == e[4]).unwrap();
            assert_eq!(single.addr(), e[4], "{algorithm:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_to_peaks_and_decays() {
        let now = Instant::now();
        let mut ewma = PeakEwma {
            rtt_ns: 1e6,
            stamp: now,
        };
        let peak = ewma.observe(50e6, now);
        assert!((peak - 50e6).abs() < 1.0, "a peak is taken at once");
        let later = now + Duration::from_secs(10);
        let decayed = ewma.observe(0.0, later);
        assert!(
            (decayed - 50e6 / std::f64::consts::E).abs() < 1.0,
            "{decayed}"
        );
        // A faster sample right away barely moves it; after a long time it dominates.
        assert!(ewma.observe(1e6, later + Duration::from_millis(1)) > 18e6);
        assert!(ewma.observe(1e6, later + Duration::from_secs(100)) < 1.01e6);
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_prefers_the_fast_endpoint_and_keeps_probing_the_slow_one() {
        let e = eps(2);
        let fast = e[0];
        let b = Balancer::new(e, Algorithm::P2cPeakEwma);
        let mut rng = StdRng::seed_from_u64(2);
        let (mut fast_picks, mut slow_picks) = (0, 0);
        // 100 s of sequential traffic, one request every 10 ms.
        for _ in 0..10_000 {
            let pick = b.pick_with(&mut rng, None, any).unwrap();
            advance(Duration::from_millis(10)).await;
            if pick.addr() == fast {
                fast_picks += 1;
                pick.record(Duration::from_millis(1), true);
            } else {
                slow_picks += 1;
                pick.record(Duration::from_millis(100), true);
            }
        }
        assert!(fast_picks > 8_000, "{fast_picks} of 10000");
        assert!(
            slow_picks >= 2,
            "the slow endpoint's peak decays and it is tried again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_tries_a_new_endpoint_and_counts_in_flight_requests() {
        let e = eps(3);
        let b = Balancer::new(vec![e[0]], Algorithm::P2cPeakEwma);
        let mut rng = StdRng::seed_from_u64(3);
        b.pick_with(&mut rng, None, any)
            .unwrap()
            .record(Duration::from_millis(200), true);
        b.update(vec![e[0], e[1]]);
        assert_eq!(
            b.pick_with(&mut rng, None, any).unwrap().addr(),
            e[1],
            "unseen: default RTT"
        );

        // Equal estimates: a request in flight doubles the cost.
        let b = Balancer::new(vec![e[1], e[2]], Algorithm::P2cPeakEwma);
        let first = b.pick_with(&mut rng, None, any).unwrap();
        for _ in 0..20 {
            let other = b.pick_with(&mut rng, None, any).unwrap();
            assert_ne!(other.addr(), first.addr());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_failure_does_not_lower_the_estimate() {
        let b = Balancer::new(eps(1), Algorithm::P2cPeakEwma);
        let estimate = |b: &Balancer| b.set().endpoints[0].rtt.lock().unwrap().rtt_ns;
        let before = estimate(&b);
        b.pick(None, any).unwrap().record(Duration::ZERO, false);
        assert!((estimate(&b) - before).abs() < 1.0);
        b.pick(None, any)
            .unwrap()
            .record(Duration::from_secs(1), false);
        assert!((estimate(&b) - 1e9).abs() < 1.0, "a slow failure is a peak");
    }

    #[test]
    fn least_request_avoids_busy_endpoints() {
        let e = eps(3);
        let b = Balancer::new(e.clone(), Algorithm::LeastRequest);
        let mut held: Vec<_> = (0..3)
            .map(|_| b.pick(None, |a| a == e[0]).unwrap())
            .collect();
        for _ in 0..6 {
            let pick = b.pick(None, any).unwrap();
            assert_ne!(pick.addr(), e[0]);
            held.push(pick);
        }
        for addr in &e {
            assert_eq!(held.iter().filter(|p| p.addr() == *addr).count(), 3);
        }

        // Above FULL_SCAN_MAX: two choices, so the one busy endpoint is never the cheaper.
        let e = eps(10);
        let b = Balancer::new(e.clone(), Algorithm::LeastRequest);
        let _busy: Vec<_> = (0..5)
            .map(|_| b.pick(None, |a| a == e[0]).unwrap())
            .collect();
        let mut rng = StdRng::seed_from_u64(4);
        assert!((0..500).all(|_| b.pick_with(&mut rng, None, any).unwrap().addr() != e[0]));
    }

    #[test]
    fn ring_hash_is_stable_spread_and_moves_only_the_removed_endpoints_keys() {
        let e = eps(5);
        let b = Balancer::new(e.clone(), Algorithm::RingHash);
        let map = |b: &Balancer| -> Vec<SocketAddr> {
            (0..2000)
                .map(|i| b.pick(Some(key(i)), any).unwrap().addr())
                .collect()
        };
        let before = map(&b);
        assert_eq!(map(&b), before, "same key, same endpoint");
        let mut shuffled = e.clone();
        shuffled.reverse();
        assert_eq!(
            map(&Balancer::new(shuffled, Algorithm::RingHash)),
            before,
            "order-independent"
        );
        for addr in &e {
            let share = before.iter().filter(|a| *a == addr).count();
            assert!(
                (200..=600).contains(&share),
                "{addr} has {share} of 2000 keys"
            );
        }

        // Skipping an unusable endpoint is the same as removing it...
        let skipped: Vec<_> = (0..2000)
            .map(|i| b.pick(Some(key(i)), |a| a != e[2]).unwrap().addr())
            .collect();
        b.update(e.iter().copied().filter(|a| *a != e[2]).collect());
        let after = map(&b);
        assert_eq!(skipped, after);
        // ...and only the removed endpoint's keys move.
        for (was, is) in before.iter().zip(&after) {
            if *was == e[2] {
                assert_ne!(is, was);
            } else {
                assert_eq!(is, was);
            }
        }
    }

    #[test]
    fn hash_key_is_stable_across_releases() {
        // Changing these remaps every session on upgrade: do it on purpose only.
        assert_eq!(hash_key(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(hash_key(b"user-1"), 0x41a2_fca5_c684_01c5);
    }

    #[test]
    fn update_keeps_stats_of_endpoints_that_stay_and_dedups() {
        let e = eps(3);
        let b = Balancer::new(vec![e[0], e[1], e[0]], Algorithm::LeastRequest);
        assert_eq!(b.len(), 2);
        let busy = b.pick(None, |a| a == e[0]).unwrap();
        b.update(e.clone());
        assert_eq!(b.len(), 3);
        let next: Vec<_> = (0..2).map(|_| b.pick(None, any).unwrap()).collect();
        assert!(
            next.iter().all(|p| p.addr() != e[0]),
            "in-flight count kept"
        );
        b.update(vec![e[1]]);
        busy.record(Duration::from_millis(1), true); // a pick of a removed endpoint still works
        assert_eq!(b.pick(None, any).unwrap().addr(), e[1]);
    }
}
