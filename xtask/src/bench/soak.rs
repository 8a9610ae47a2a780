//! `cargo xtask bench soak`: does the agent's memory grow under steady load?
//!
//! One testbed node, the agent with the L7 route of `bench l7` (client pod → Service VIP →
//! the L7 engine → upstream pod). `weft-workload http-load` drives a fixed request rate through
//! it, in back-to-back windows of one minute, for `--minutes` (30 by default: issue 16 asks for a
//! 30-minute run). After every window the agent's RSS (and its anonymous part) is read from
//! `/proc`, with the window's p50/p99. The first window is warm-up (allocator arenas, pools); the
//! slope of RSS over the rest is a least-squares fit, reported in MiB per hour with the growth it
//! predicts over the run. Every window must be clean (every scheduled request answered 2xx):
//! a soak that sheds load would hide a leak.
use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, ensure};
use serde::Serialize;
use testbed::{Testbed, http::HttpLoadArgs};

use super::l7::{self, mib, status_kb};
use crate::step;

/// One window of load.
const WINDOW: Duration = Duration::from_mins(1);
/// "No growth": the fitted slope may predict at most this much over the run (allocator noise).
const TARGET_GROWTH_MIB: f64 = 1.0;

pub struct Options {
    pub minutes: u64,
    pub rate: f64,
}

#[derive(Debug, Serialize)]
struct Window {
    minute: u64,
    rss_mib: f64,
    rss_anon_mib: f64,
    p50_us: f64,
    p99_us: f64,
    completed: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    soak_minutes: u64,
    soak_rate: f64,
    soak_rss_start_mib: f64,
    soak_rss_end_mib: f64,
    soak_rss_max_mib: f64,
    /// Least-squares slope of RSS over the windows after the first, MiB per hour.
    soak_rss_slope_mib_per_hour: f64,
    soak_rss_anon_slope_mib_per_hour: f64,
    /// What the slope predicts over the measured windows, MiB.
    soak_rss_fitted_growth_mib: f64,
    soak_p99_first_us: f64,
    soak_p99_last_us: f64,
    windows: Vec<Window>,
}

/// Least-squares slope of `y` over `x` (0 with fewer than two points).
fn slope(points: &[(f64, f64)]) -> f64 {
    #[allow(clippy::cast_precision_loss, reason = "a few dozen points")]
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

pub fn soak(weft: &Path, workload: &Path, options: &Options, json: Option<&Path>) -> Result<()> {
    ensure!(options.minutes >= 3, "--minutes must be at least 3");
    testbed::use_binaries(weft, workload)?;
    step!(
        "bench soak: {} req/s through the L7 engine for {} minutes, the agent's RSS after each minute",
        options.rate,
        options.minutes
    );
    let tb = Testbed::new("bench-soak")?;
    let node = tb.node("n1")?;
    let side = l7::side(&node)?;
    let mut agent = None;
    let target = l7::weft_target(&node, &side, None, &mut agent)?;
    let pid = target.agent_pid.context("the agent runs")?;
    let mut windows = Vec::new();
    let mut progress = crate::progress::Steps::new("minute", usize::try_from(options.minutes)?);
    for minute in 1..=options.minutes {
        progress.advance(&format!(
            "{} req/s for {} s",
            options.rate,
            WINDOW.as_secs()
        ));
        let load = HttpLoadArgs::new(target.url.parse()?, options.rate, WINDOW)
            .connections(l7::LOAD_CONNECTIONS);
        let report = target.client.http_load(&load)?;
        l7::clean(
            &report,
            options.rate,
            &format!("{} in minute {minute}", target.url),
        )?;
        let w = Window {
            minute,
            rss_mib: mib(status_kb(pid, "VmRSS")?),
            rss_anon_mib: mib(status_kb(pid, "RssAnon")?),
            p50_us: report.p50_us,
            p99_us: report.p99_us,
            completed: report.completed,
        };
        step!(
            "minute {minute}: RSS {:.1} MiB (anon {:.1}), p50 {:.0} µs, p99 {:.0} µs",
            w.rss_mib,
            w.rss_anon_mib,
            w.p50_us,
            w.p99_us
        );
        windows.push(w);
    }
    progress.finish();
    let report = summarize(options, windows);
    print_summary(&report);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        step!("wrote {}", path.display());
    }
    Ok(())
}

#[allow(clippy::cast_precision_loss, reason = "minutes")]
fn summarize(options: &Options, windows: Vec<Window>) -> Report {
    // The first window is warm-up.
    let steady = &windows[1..];
    let fit = |f: fn(&Window) -> f64| {
        let points: Vec<(f64, f64)> = steady.iter().map(|w| (w.minute as f64, f(w))).collect();
        slope(&points) * 60.0
    };
    let rss_slope = fit(|w| w.rss_mib);
    let anon_slope = fit(|w| w.rss_anon_mib);
    let span_hours = (steady.len().saturating_sub(1)) as f64 / 60.0;
    Report {
        soak_minutes: options.minutes,
        soak_rate: options.rate,
        soak_rss_start_mib: steady.first().map_or(0.0, |w| w.rss_mib),
        soak_rss_end_mib: steady.last().map_or(0.0, |w| w.rss_mib),
        soak_rss_max_mib: windows.iter().map(|w| w.rss_mib).fold(0.0, f64::max),
        soak_rss_slope_mib_per_hour: rss_slope,
        soak_rss_anon_slope_mib_per_hour: anon_slope,
        soak_rss_fitted_growth_mib: rss_slope * span_hours,
        soak_p99_first_us: steady.first().map_or(0.0, |w| w.p99_us),
        soak_p99_last_us: steady.last().map_or(0.0, |w| w.p99_us),
        windows,
    }
}

fn print_summary(r: &Report) {
    println!();
    println!(
        "{:>7} {:>10} {:>10} {:>9} {:>9}",
        "minute", "RSS MiB", "anon MiB", "p50 µs", "p99 µs"
    );
    for w in &r.windows {
        println!(
            "{:>7} {:>10.1} {:>10.1} {:>9.0} {:>9.0}",
            w.minute, w.rss_mib, w.rss_anon_mib, w.p50_us, w.p99_us
        );
    }
    let verdict = if r.soak_rss_fitted_growth_mib <= TARGET_GROWTH_MIB {
        "flat (goal met)"
    } else {
        "GROWING (goal missed)"
    };
    println!(
        "agent RSS after warm-up: {:.1} → {:.1} MiB, slope {:+.2} MiB/h (anon {:+.2}), \
         fitted growth over the run {:+.2} MiB: {verdict} (goal: ≤ {TARGET_GROWTH_MIB} MiB)",
        r.soak_rss_start_mib,
        r.soak_rss_end_mib,
        r.soak_rss_slope_mib_per_hour,
        r.soak_rss_anon_slope_mib_per_hour,
        r.soak_rss_fitted_growth_mib
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_the_least_squares_fit() {
        assert!((slope(&[(1.0, 10.0), (2.0, 12.0), (3.0, 14.0)]) - 2.0).abs() < 1e-9);
        assert!(slope(&[(1.0, 5.0), (2.0, 5.0), (3.0, 5.0)]).abs() < 1e-9);
        // Noise around a flat line fits flat-ish; one point fits nothing.
        assert!(slope(&[(1.0, 5.0), (2.0, 6.0), (3.0, 5.0)]).abs() < 1e-9);
        assert!(slope(&[(1.0, 5.0)]).abs() < 1e-9);
    }

    #[test]
    fn the_warm_up_window_is_left_out_of_the_fit() {
        let w = |minute, rss_mib| Window {
            minute,
            rss_mib,
            rss_anon_mib: rss_mib,
            p50_us: 100.0,
            p99_us: 200.0,
            completed: 60_000,
        };
        let r = summarize(
            &Options {
                minutes: 4,
                rate: 1000.0,
            },
            vec![w(1, 5.0), w(2, 20.0), w(3, 20.0), w(4, 20.0)],
        );
        assert!(r.soak_rss_slope_mib_per_hour.abs() < 1e-9);
        assert!((r.soak_rss_max_mib - 20.0).abs() < 1e-9);
        assert!((r.soak_rss_start_mib - 20.0).abs() < 1e-9);
    }
}
