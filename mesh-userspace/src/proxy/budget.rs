//! How many retries a backend service may receive, and how long to wait before each one.
//!
//! A fixed "3 attempts" turns an outage into a 3× (or, across hops, 3ⁿ×) retry storm. A budget
//! as in linkerd and Finagle caps retries to a fraction of recent traffic instead, plus a small
//! floor so low-traffic services can still retry.
use std::{
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use rand::Rng;
use tokio::time::Instant;

/// Fixed-point units of one retry: a ratio is kept to 1/10⁴ (rounded to nearest).
const RETRY: i64 = 10_000;
#[allow(clippy::cast_precision_loss, reason = "exact for this constant")]
const RETRY_F: f64 = RETRY as f64;
/// The window slides in this many steps: a deposit counts for between 9/10 and all of the TTL.
const BUCKETS: usize = 10;

/// Retries allowed at any moment = `min_per_second × ttl` + `ratio` × the requests deposited
/// within the last `ttl`, minus the retries withdrawn within it. Withdrawals age out like
/// deposits, so the floor comes back one window after it was spent.
#[derive(Debug)]
pub struct RetryBudget {
    deposit: i64,
    reserve: i64,
    bucket_len: Duration,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    buckets: [i64; BUCKETS],
    current: usize,
    /// When `buckets[current]` began.
    started: Instant,
}

impl RetryBudget {
    /// `ratio` 0.2 allows one retry per five requests (negative or NaN means 0); `ttl` below
    /// one second is raised to one second (the window moves in tenths of it).
    #[must_use]
    pub fn new(ratio: f64, min_per_second: u32, ttl: Duration) -> Self {
        let ttl = ttl.max(Duration::from_secs(1));
        Self {
            deposit: (ratio.max(0.0) * RETRY_F).round() as i64,
            reserve: (f64::from(min_per_second) * ttl.as_secs_f64() * RETRY_F).round() as i64,
            bucket_len: ttl / BUCKETS as u32,
            window: Mutex::new(Window {
                buckets: [0; BUCKETS],
                current: 0,
                started: Instant::now(),
            }),
        }
    }

    /// Call once per original request (not per retry).
    pub fn deposit(&self) {
        let mut window = self.window();
        let current = window.current;
        window.buckets[current] = window.buckets[current].saturating_add(self.deposit);
    }

    /// Call before each retry; `false` means the budget is spent: do not retry.
    pub fn withdraw(&self) -> bool {
        let mut window = self.window();
        if self.balance(&window) < RETRY {
            return false;
        }
        let current = window.current;
        window.buckets[current] -= RETRY;
        true
    }

    /// Retries the budget would allow right now.
    #[must_use]
    pub fn available(&self) -> u64 {
        let window = self.window();
        u64::try_from(self.balance(&window) / RETRY).unwrap_or(0)
    }

    fn balance(&self, window: &Window) -> i64 {
        window
            .buckets
            .iter()
            .fold(self.reserve, |sum, b| sum.saturating_add(*b))
    }

    /// The window, slid forward to now.
    fn window(&self) -> MutexGuard<'_, Window> {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(window.started).as_nanos();
        let len = self.bucket_len.as_nanos();
        let steps = elapsed / len;
        if steps > 0 {
            if steps >= BUCKETS as u128 {
                window.buckets = [0; BUCKETS];
            } else {
                for _ in 0..steps {
                    window.current = (window.current + 1) % BUCKETS;
                    let current = window.current;
                    window.buckets[current] = 0;
                }
            }
            window.started = now - Duration::from_nanos((elapsed % len) as u64);
        }
        window
    }
}

/// Full-jitter exponential backoff: uniform in `[0, min(max, base × 2^attempt)]`, attempt 0
/// being the first retry. Jitter spreads the retries of many clients that failed together.
pub fn backoff(attempt: u32, base: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let cap = 1u32
        .checked_shl(attempt)
        .and_then(|factor| base.checked_mul(factor))
        .map_or(max, |d| d.min(max));
    let cap = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=cap))
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};
    use tokio::time::advance;

    use super::*;

    const _: () = {
        const fn send_sync<T: Send + Sync>() {}
        send_sync::<RetryBudget>();
    };

    const TTL: Duration = Duration::from_secs(10);

    fn withdraw_all(budget: &RetryBudget) -> u32 {
        let mut n = 0;
        while budget.withdraw() {
            n += 1;
            assert!(n < 1_000_000, "budget never runs out");
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn allows_ratio_of_requests_plus_the_floor() {
        let floor_only = RetryBudget::new(0.0, 1, TTL);
        for _ in 0..100 {
            floor_only.deposit();
        }
        assert_eq!(withdraw_all(&floor_only), 10);

        let ratio_only = RetryBudget::new(0.2, 0, TTL);
        assert!(!ratio_only.withdraw());
        for _ in 0..100 {
            ratio_only.deposit();
        }
        assert_eq!(ratio_only.available(), 20);
        assert_eq!(withdraw_all(&ratio_only), 20);

        let both = RetryBudget::new(0.2, 1, TTL);
        for _ in 0..100 {
            both.deposit();
        }
        assert_eq!(withdraw_all(&both), 30);

        let fractional = RetryBudget::new(0.1, 0, TTL);
        for _ in 0..95 {
            fractional.deposit();
        }
        assert_eq!(withdraw_all(&fractional), 9, "no rounding up");
    }

    #[tokio::test(start_paused = true)]
    async fn stops_a_retry_storm() {
        // 100 requests per second for a minute, every one failing and wanting 3 retries.
        let budget = RetryBudget::new(0.2, 1, TTL);
        let (mut requests, mut retries) = (0u32, 0u32);
        for _ in 0..6000 {
            budget.deposit();
            requests += 1;
            retries += (0..3).map(|_| u32::from(budget.withdraw())).sum::<u32>();
            advance(Duration::from_millis(10)).await;
        }
        // 20% of 6000 plus a floor of 10 per window (6 windows, refilled as withdrawals age out).
        assert!(
            (1200..=1300).contains(&retries),
            "{retries} retries for {requests} requests"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_and_withdrawals_age_out_after_the_window() {
        let budget = RetryBudget::new(0.2, 1, TTL);
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(withdraw_all(&budget), 30);
        advance(Duration::from_secs(5)).await;
        assert_eq!(budget.available(), 0, "still inside the window");
        advance(TTL).await;
        assert_eq!(budget.available(), 10, "only the floor is back");
        for _ in 0..50 {
            budget.deposit();
        }
        advance(Duration::from_secs(9)).await;
        assert_eq!(budget.available(), 20, "recent deposits still count");
        advance(Duration::from_secs(1)).await;
        assert_eq!(budget.available(), 10);
    }

    #[test]
    fn degenerate_inputs() {
        let b = RetryBudget::new(f64::NAN, 0, Duration::ZERO);
        b.deposit();
        assert!(!b.withdraw());
        assert_eq!(b.bucket_len, Duration::from_millis(100));
    }

    #[test]
    fn backoff_is_full_jitter_capped_by_max() {
        let mut rng = StdRng::seed_from_u64(7);
        let (base, max) = (Duration::from_millis(10), Duration::from_secs(1));
        for attempt in 0..12 {
            let cap = (base * (1 << attempt)).min(max);
            let samples: Vec<_> = (0..500)
                .map(|_| backoff(attempt, base, max, &mut rng))
                .collect();
            assert!(samples.iter().all(|d| *d <= cap), "attempt {attempt}");
            // Uniform over [0, cap]: both halves are used.
            assert!(
                samples.iter().any(|d| *d < cap / 4) && samples.iter().any(|d| *d > cap * 3 / 4)
            );
        }
        assert!(
            backoff(200, base, max, &mut rng) <= max,
            "no overflow for huge attempts"
        );
        assert!(backoff(u32::MAX, Duration::MAX, Duration::MAX, &mut rng) <= Duration::MAX);
        assert_eq!(backoff(3, Duration::ZERO, max, &mut rng), Duration::ZERO);
        assert!(backoff(0, base, Duration::from_millis(1), &mut rng) <= Duration::from_millis(1));
    }
}
