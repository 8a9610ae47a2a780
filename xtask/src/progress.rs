//! Progress of long-running commands (bench rounds, images, cluster start and stop).
//!
//! On a terminal a bar (or, with no known number of steps, a spinner) redraws in place with the
//! time elapsed and, for steps, an estimate of what is left. Where nobody watches a terminal
//! (CI logs, a pipe) nothing is redrawn: each step prints as a `==>` line instead, so logs keep
//! every step and no control characters.
use std::{io::IsTerminal as _, time::Duration};

use indicatif::{ProgressBar, ProgressStyle};

use crate::step;

/// Steps of known number: `advance` at the start of each.
pub struct Steps {
    noun: &'static str,
    bar: Option<ProgressBar>,
    total: u64,
    done: u64,
}

impl Steps {
    /// `noun` names a step (`round`).
    pub fn new(noun: &'static str, total: usize) -> Self {
        let total = u64::try_from(total).unwrap_or(u64::MAX);
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner:.cyan} [{elapsed_precise}] {bar:24.cyan/blue} {prefix} {pos}/{len}: {msg} (about {eta} left)",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(noun);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            noun,
            bar,
            total,
            done: 0,
        }
    }

    /// Step `done + 1` of `total` starts; `what` says what it does.
    pub fn advance(&mut self, what: &str) {
        self.done += 1;
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.done - 1);
                bar.set_message(what.to_owned());
            }
            None => step!("{} {}/{}: {what}", self.noun, self.done, self.total),
        }
    }

    /// All steps done: the bar gives way to the command's own summary.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A spinner with the time elapsed, for a wait without steps (a cluster starting). Stops when
/// dropped.
pub struct Waiting(Option<ProgressBar>);

impl Waiting {
    /// Prints `what` as a step line, then (on a terminal) spins under it.
    pub fn new(what: &str) -> Self {
        step!("{what}");
        Self(std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner:.cyan} [{elapsed_precise}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.set_message("working");
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        }))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(bar) = self.0.take() {
            bar.finish_and_clear();
        }
    }
}
