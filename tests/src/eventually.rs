//! Polling instead of sleeping: tests wait for a condition, not for a guessed duration.
#![forbid(unsafe_code)]

use std::{
    thread,
    time::{Duration, Instant},
};

/// Pause between two attempts of [`eventually`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Calls `attempt` until it succeeds or `timeout` has passed, pausing [`POLL_INTERVAL`] between
/// attempts; on timeout returns the last error, annotated with how long and how often it was
/// tried. `attempt` runs at least once, even with a zero timeout.
pub fn eventually<T>(
    timeout: Duration,
    mut attempt: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let mut attempts: u32 = 0;
    loop {
        attempts += 1;
        let error = match attempt() {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(error.context(format!(
                "still failing after {elapsed:.2?} ({attempts} attempts, timeout {timeout:?})"
            )));
        }
        thread::sleep(POLL_INTERVAL.min(timeout.saturating_sub(elapsed)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_success() {
        let mut calls = 0;
        let value = eventually(Duration::from_secs(5), || {
            calls += 1;
            if calls < 3 {
                anyhow::bail!("not yet");
            }
            Ok(calls)
        })
        .unwrap();
        assert_eq!(value, 3);
    }

    #[test]
    fn returns_the_last_error_on_timeout() {
        let mut calls = 0;
        let error = eventually(Duration::from_millis(120), || -> anyhow::Result<()> {
            calls += 1;
            anyhow::bail!("attempt {calls}")
        })
        .unwrap_err();
        assert!(calls >= 2, "polled {calls} times");
        assert_eq!(error.root_cause().to_string(), format!("attempt {calls}"));
        assert!(
            error.to_string().starts_with("still failing after"),
            "{error:#}"
        );
    }

    #[test]
    fn tries_once_with_zero_timeout() {
        let mut calls = 0;
        let _ = eventually(Duration::ZERO, || -> anyhow::Result<()> {
            calls += 1;
            anyhow::bail!("no")
        });
        assert_eq!(calls, 1);
    }
}
