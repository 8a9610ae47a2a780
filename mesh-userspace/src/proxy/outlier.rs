//! Outlier detection for one backend service, Envoy/Istio style: an endpoint that keeps failing
//! is ejected from load balancing for a while, longer each time it is ejected again.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Mutex, PoisonError, RwLock, RwLockReadGuard,
        atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    },
};

use tokio::time::Instant;

use crate::state::policy::Ejection;

/// How a request to an endpoint ended. Anything that is not a 5xx (4xx included) is a success:
/// the endpoint answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx status; 502, 503 and 504 also count as gateway errors.
    Status5xx(u16),
    /// Connect failure, reset or timeout before a response.
    GatewayError,
}

impl Outcome {
    #[must_use]
    pub fn from_status(status: u16) -> Self {
        if (500..600).contains(&status) {
            Self::Status5xx(status)
        } else {
            Self::Success
        }
    }

    fn is_gateway_error(self) -> bool {
        matches!(self, Self::GatewayError | Self::Status5xx(502..=504))
    }
}

/// Shared by every request to one backend service. Recording and the ejection check are
/// atomics under a read lock; only an actual ejection takes a mutex (it must count the others).
#[derive(Debug)]
pub struct Detector {
    config: Ejection,
    /// Origin of the nanosecond timestamps below.
    epoch: Instant,
    endpoints: RwLock<HashMap<SocketAddr, Endpoint>>,
    ejecting: Mutex<()>,
    ejections: AtomicU64,
    overflows: AtomicU64,
}

#[derive(Debug, Default)]
struct Endpoint {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Nanoseconds since `epoch`; 0: never ejected.
    ejected_until: AtomicU64,
    times_ejected: AtomicU32,
}

impl Endpoint {
    fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Relaxed)
    }

    fn reset(&self) {
        self.consecutive_5xx.store(0, Relaxed);
        self.consecutive_gateway.store(0, Relaxed);
    }
}

type Endpoints = HashMap<SocketAddr, Endpoint>;

impl Detector {
    /// Endpoints are learnt from [`Detector::update`] and from the outcomes they report.
    #[must_use]
    pub fn new(config: Ejection) -> Self {
        Self {
            config,
            epoch: Instant::now(),
            endpoints: RwLock::default(),
            ejecting: Mutex::new(()),
            ejections: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
        }
    }

    #[must_use]
    pub fn config(&self) -> &Ejection {
        &self.config
    }

    /// Replaces the endpoint set, which `max_percent` counts: call it with the
    /// service's endpoints before traffic flows. Endpoints that stay keep their streaks,
    /// ejection and history; the others are forgotten (and learnt again if they report).
    pub fn update(&self, endpoints: &[SocketAddr]) {
        let mut map = self
            .endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut old = std::mem::take(&mut *map);
        for ep in endpoints {
            let state = old.remove(ep).unwrap_or_default();
            map.entry(*ep).or_insert(state);
        }
    }

    /// Returns whether this outcome ejected the endpoint.
    pub fn record(&self, ep: SocketAddr, outcome: Outcome) -> bool {
        let map = self.read();
        let Some(state) = map.get(&ep) else {
            drop(map);
            let mut map = self
                .endpoints
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            map.entry(ep).or_default();
            drop(map);
            return self.record(ep, outcome);
        };
        let now = self.now();
        // Requests sent before an ejection are still finishing: they prove nothing new.
        if outcome == Outcome::Success || state.is_ejected(now) {
            if outcome == Outcome::Success {
                state.reset();
            }
            return false;
        }
        let n5xx = state
            .consecutive_5xx
            .fetch_add(1, Relaxed)
            .saturating_add(1);
        let ngateway = if outcome.is_gateway_error() {
            state
                .consecutive_gateway
                .fetch_add(1, Relaxed)
                .saturating_add(1)
        } else {
            state.consecutive_gateway.store(0, Relaxed);
            0
        };
        let trips = |threshold: u32, n: u32| threshold > 0 && n >= threshold;
        let c = &self.config;
        if trips(c.consecutive_5xx, n5xx) || trips(c.consecutive_gateway_errors, ngateway) {
            self.eject(&map, ep, state, now)
        } else {
            false
        }
    }

    #[must_use]
    pub fn is_ejected(&self, ep: SocketAddr) -> bool {
        self.read()
            .get(&ep)
            .is_some_and(|state| state.is_ejected(self.now()))
    }

    /// Endpoints ejected right now.
    #[must_use]
    pub fn ejected_count(&self) -> usize {
        let now = self.now();
        self.read()
            .values()
            .filter(|state| state.is_ejected(now))
            .count()
    }

    #[must_use]
    pub fn ejections_total(&self) -> u64 {
        self.ejections.load(Relaxed)
    }

    /// Ejections that were due but refused by `max_percent`.
    #[must_use]
    pub fn overflows_total(&self) -> u64 {
        self.overflows.load(Relaxed)
    }

    fn read(&self) -> RwLockReadGuard<'_, Endpoints> {
        self.endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> u64 {
        Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos() as u64
    }

    fn eject(&self, map: &Endpoints, ep: SocketAddr, state: &Endpoint, now: u64) -> bool {
        let _serialised = self.ejecting.lock().unwrap_or_else(PoisonError::into_inner);
        if state.is_ejected(now) {
            return false; // another failure got here first
        }
        let percent = self.config.max_percent.min(100) as usize;
        let max = if percent == 0 {
            0
        } else {
            (map.len() * percent / 100).max(1)
        };
        if map.values().filter(|s| s.is_ejected(now)).count() >= max {
            // The streak stays, so the next failure tries again once there is room.
            self.overflows.fetch_add(1, Relaxed);
            return false;
        }
        // Envoy lowers the multiplier once per healthy interval; here, lazily, once per
        // `base` spent healthy since the last ejection ended.
        let (base, previous_end) = (self.config.base, state.ejected_until.load(Relaxed));
        let forgiven = match now
            .saturating_sub(previous_end)
            .checked_div(base.as_nanos() as u64)
        {
            Some(n) if previous_end > 0 => u32::try_from(n).unwrap_or(u32::MAX),
            _ => u32::MAX,
        };
        let times = state
            .times_ejected
            .load(Relaxed)
            .saturating_sub(forgiven)
            .saturating_add(1);
        state.times_ejected.store(times, Relaxed);
        let length = base.saturating_mul(times).min(self.config.max.max(base));
        let until = now.saturating_add(length.as_nanos() as u64);
        state.ejected_until.store(until, Relaxed);
        state.reset();
        self.ejections.fetch_add(1, Relaxed);
        tracing::debug!(endpoint = %ep, ?length, "outlier ejected");
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::advance;

    use super::*;

    const _: () = {
        const fn send_sync<T: Send + Sync>() {}
        send_sync::<Detector>();
    };

    fn eps(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8080)))
            .collect()
    }

    fn detector(config: Ejection, endpoints: &[SocketAddr]) -> Detector {
        let d = Detector::new(config);
        d.update(endpoints);
        d
    }

    fn fail(d: &Detector, ep: SocketAddr, n: u32) -> bool {
        (0..n)
            .map(|_| d.record(ep, Outcome::Status5xx(500)))
            .fold(false, |_, last| last)
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_5xx_eject_for_base_time() {
        let e = eps(10);
        let d = detector(Ejection::default(), &e);
        assert!(!fail(&d, e[0], 4));
        assert!(!d.is_ejected(e[0]));
        assert!(d.record(e[0], Outcome::Status5xx(500)), "the fifth ejects");
        assert!(d.is_ejected(e[0]) && !d.is_ejected(e[1]));
        assert_eq!((d.ejections_total(), d.ejected_count()), (1, 1));
        assert!(!d.record(e[0], Outcome::GatewayError), "already ejected");
        advance(Duration::from_secs(30) - Duration::from_millis(1)).await;
        assert!(d.is_ejected(e[0]));
        advance(Duration::from_millis(1)).await;
        assert!(!d.is_ejected(e[0]));
        assert_eq!(d.ejected_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_breaks_the_streak() {
        let e = eps(10);
        let d = detector(Ejection::default(), &e);
        for _ in 0..10 {
            assert!(!fail(&d, e[0], 4));
            assert!(!d.record(e[0], Outcome::from_status(404)));
        }
        assert_eq!(d.ejections_total(), 0);
        // Gateway errors are 5xx too.
        assert!((0..5).any(|_| d.record(e[1], Outcome::GatewayError)));
    }

    #[tokio::test(start_paused = true)]
    async fn gateway_error_detector() {
        let e = eps(10);
        let config = Ejection {
            consecutive_5xx: 0,
            consecutive_gateway_errors: 3,
            ..Default::default()
        };
        let d = detector(config, &e);
        assert!(!fail(&d, e[0], 50), "plain 500s do not count");
        d.record(e[0], Outcome::GatewayError);
        d.record(e[0], Outcome::from_status(503));
        d.record(e[0], Outcome::from_status(500)); // breaks the gateway streak
        d.record(e[0], Outcome::GatewayError);
        assert!(!d.record(e[0], Outcome::from_status(502)));
        assert!(d.record(e[0], Outcome::from_status(504)));
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_max_ejection_percent() {
        let e = eps(20);
        let d = detector(Ejection::default(), &e); // 10% of 20: 2
        assert!(fail(&d, e[0], 5) && fail(&d, e[1], 5));
        assert!(!fail(&d, e[2], 5));
        assert!(!d.record(e[2], Outcome::GatewayError));
        assert_eq!((d.ejected_count(), d.overflows_total()), (2, 2));
        advance(Duration::from_secs(30)).await;
        assert!(
            d.record(e[2], Outcome::GatewayError),
            "the streak was kept; now there is room"
        );

        // Small services still shed one endpoint; 0% never ejects.
        let small = detector(Ejection::default(), &eps(3));
        assert!(fail(&small, eps(3)[0], 5));
        assert!(!fail(&small, eps(3)[1], 5));
        let off = detector(
            Ejection {
                max_percent: 0,
                ..Default::default()
            },
            &e,
        );
        assert!(!fail(&off, e[0], 100));
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_ejections_grow_up_to_the_cap_and_are_forgiven() {
        let e = eps(10);
        let config = Ejection {
            base: Duration::from_secs(100),
            ..Default::default()
        };
        let d = detector(config, &e);
        for expected in [100, 200, 300, 300] {
            assert!(fail(&d, e[0], 5));
            advance(Duration::from_secs(expected - 1)).await;
            assert!(d.is_ejected(e[0]), "ejection of {expected}s");
            advance(Duration::from_secs(1)).await;
            assert!(!d.is_ejected(e[0]));
        }
        // Healthy for two base periods: the multiplier drops from 4 to 2, then this is the 3rd.
        advance(Duration::from_secs(200)).await;
        assert!(fail(&d, e[0], 5));
        advance(Duration::from_secs(299)).await;
        assert!(d.is_ejected(e[0]));
        advance(Duration::from_secs(1)).await;
        assert!(!d.is_ejected(e[0]));
    }

    #[tokio::test(start_paused = true)]
    async fn update_keeps_state_of_endpoints_that_stay() {
        let e = eps(20);
        let d = detector(Ejection::default(), &e[..10]); // at most 1 ejected
        assert!(fail(&d, e[0], 5));
        assert!(!fail(&d, e[1], 4));
        d.update(&e); // at most 2
        assert!(d.is_ejected(e[0]));
        assert!(d.record(e[1], Outcome::GatewayError), "streak of 4 kept");
        d.update(&e[2..]);
        assert!(!d.is_ejected(e[0]), "forgotten");

        // Never told its endpoints: learns them from their outcomes.
        let lazy = Detector::new(Ejection::default());
        assert!(!fail(&lazy, e[0], 4) && !fail(&lazy, e[1], 4));
        assert!(lazy.record(e[0], Outcome::GatewayError));
        assert!(
            !lazy.record(e[1], Outcome::GatewayError),
            "1 of 2 known is the most"
        );
    }
}
