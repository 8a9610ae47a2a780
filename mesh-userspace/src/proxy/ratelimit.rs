//! Local rate limiting: one token bucket per destination service, shared by every connection the
//! agent proxies to it. Over the limit the engine answers 429 with `Retry-After` itself.
use std::{
    sync::{Mutex, PoisonError},
    time::Duration,
};

use tokio::time::Instant;

/// Float slack so that waiting exactly the returned retry-after always succeeds.
const EPSILON: f64 = 1e-9;

/// `burst` tokens, refilled continuously at `rate_per_second`; a request takes one.
///
/// A tiny mutex (a few float operations, never held across an await) keeps the level and its
/// timestamp consistent; a lock-free GCRA needs saturating-time tricks for slow rates that are
/// not worth it at this cost.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    level: Mutex<Level>,
}

#[derive(Debug)]
struct Level {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// Starts full. A `burst` of 0 is raised to 1 (such a bucket could never admit anything).
    /// A rate that is not positive (or NaN) never refills; an infinite rate never limits.
    #[must_use]
    pub fn new(rate_per_second: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: rate_per_second.max(0.0),
            burst,
            level: Mutex::new(Level {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    /// Takes a token, or says how long until one is available (precise; rounding it up to the
    /// whole seconds of a `Retry-After` header is the caller's job).
    pub fn try_acquire(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut level = self.level.lock().unwrap_or_else(PoisonError::into_inner);
        let elapsed = now.saturating_duration_since(level.at).as_secs_f64();
        // `min` ignores the NaN of 0 × ∞, so an infinite rate simply refills to `burst`.
        level.tokens = (level.tokens + elapsed * self.rate).min(self.burst);
        level.at = now;
        if level.tokens >= 1.0 - EPSILON {
            level.tokens = (level.tokens - 1.0).max(0.0);
            return Ok(());
        }
        Err(self.time_for(1.0 - level.tokens))
    }

    /// Time to refill `missing` tokens, rounded up to the nanosecond.
    #[allow(clippy::cast_sign_loss, reason = "both factors are positive")]
    fn time_for(&self, missing: f64) -> Duration {
        let nanos = (missing / self.rate * 1e9).ceil();
        // Also catches a zero rate (∞ nanoseconds).
        if nanos >= 1.8e19 {
            Duration::MAX
        } else {
            Duration::from_nanos(nanos as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, thread};

    use tokio::time::advance;

    use super::*;

    const _: () = {
        const fn send_sync<T: Send + Sync>() {}
        send_sync::<TokenBucket>();
    };

    fn assert_close(got: Result<(), Duration>, want: Duration) {
        let got = got.expect_err("should be limited");
        assert!(
            got.abs_diff(want) <= Duration::from_micros(1),
            "{got:?} != {want:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill_rate_with_precise_retry_after() {
        let bucket = TokenBucket::new(2.0, 3);
        for _ in 0..3 {
            assert_eq!(bucket.try_acquire(), Ok(()));
        }
        assert_eq!(bucket.try_acquire(), Err(Duration::from_millis(500)));
        advance(Duration::from_millis(499)).await;
        assert_close(bucket.try_acquire(), Duration::from_millis(1));
        advance(Duration::from_millis(1)).await;
        assert_eq!(bucket.try_acquire(), Ok(()));
        assert_close(bucket.try_acquire(), Duration::from_millis(500));

        // Sustained: 2 per second, whatever the polling rhythm.
        let mut admitted = 0;
        for _ in 0..1000 {
            advance(Duration::from_millis(10)).await;
            admitted += u32::from(bucket.try_acquire().is_ok());
        }
        assert_eq!(admitted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_the_returned_time_always_succeeds() {
        let bucket = TokenBucket::new(3.0, 1);
        for _ in 0..100 {
            match bucket.try_acquire() {
                Ok(()) => {}
                Err(wait) => {
                    advance(wait).await;
                    assert_eq!(bucket.try_acquire(), Ok(()));
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_never_exceeds_burst() {
        let bucket = TokenBucket::new(100.0, 5);
        advance(Duration::from_hours(1)).await;
        let admitted = (0..50).filter(|_| bucket.try_acquire().is_ok()).count();
        assert_eq!(admitted, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn degenerate_rates() {
        let never = TokenBucket::new(0.0, 0);
        assert_eq!(never.try_acquire(), Ok(()), "burst 0 is raised to 1");
        advance(Duration::from_hours(1)).await;
        assert_eq!(never.try_acquire(), Err(Duration::MAX));
        assert!(TokenBucket::new(f64::NAN, 1).rate.abs() < f64::EPSILON);

        let unlimited = TokenBucket::new(f64::INFINITY, 1);
        assert!((0..1000).all(|_| unlimited.try_acquire().is_ok()));
    }

    #[test]
    fn shared_across_threads_admits_exactly_burst() {
        let bucket = Arc::new(TokenBucket::new(0.0, 100));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let bucket = Arc::clone(&bucket);
                thread::spawn(move || (0..100).filter(|_| bucket.try_acquire().is_ok()).count())
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(admitted, 100);
    }
}
