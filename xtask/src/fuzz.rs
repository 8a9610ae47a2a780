//! `cargo xtask fuzz --minutes N [--target T]`: runs every cargo-fuzz target of
//! `mesh-userspace/fuzz` (the parsers that take bytes from the network or from users) for its
//! share of N minutes, on the corpus kept in the repository (`fuzz/corpus/<target>`, which grows
//! with what libFuzzer finds), and prints executions, corpus size and crashes per target. A crash
//! fails the command; its input stays in `fuzz/artifacts/<target>/` to become a regression test.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::{run, step, workspace_root};

#[derive(Debug, Serialize)]
struct TargetRun {
    target: String,
    seconds: u64,
    executions: u64,
    corpus_files: usize,
    crashes: Vec<PathBuf>,
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("mesh-userspace/fuzz")
}

/// The targets the fuzz crate declares (`cargo fuzz list`).
fn targets() -> Result<Vec<String>> {
    let out = Command::new("cargo")
        .current_dir(fuzz_dir())
        .args(["fuzz", "list"])
        .output()
        .context("cargo fuzz list")?;
    if !out.status.success() {
        bail!("cargo fuzz list: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

fn cargo_fuzz_present() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The target triple `cargo fuzz build` builds for (this machine's).
fn host_triple() -> String {
    Command::new("rustc")
        .args(["+nightly", "-vV"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        })
        .unwrap_or_else(|| "x86_64-unknown-linux-gnu".to_owned())
}

/// `stat::number_of_executed_units: N` from libFuzzer's final statistics.
fn executions(stderr: &str) -> u64 {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

pub fn run_all(minutes: f64, only: Option<&str>, json: Option<&Path>) -> Result<()> {
    if !cargo_fuzz_present() {
        step!("fuzz: installing cargo-fuzz (once)");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let all = targets()?;
    let chosen: Vec<String> = match only {
        Some(t) if all.iter().any(|a| a == t) => vec![t.to_owned()],
        Some(t) => bail!("no fuzz target {t}; there are {all:?}"),
        None => all,
    };
    // Whole seconds each, at least ten (libFuzzer needs time to start).
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "minutes of a command line, split over a handful of targets"
    )]
    let each = ((minutes * 60.0) / chosen.len() as f64).max(10.0) as u64;
    step!(
        "fuzz: {} target(s), {each} s each: {}",
        chosen.len(),
        chosen.join(", ")
    );
    // Built first, in view (the first build with sanitizers takes minutes), so that each
    // target's time is spent fuzzing.
    step!("fuzz: building the targets (nightly, with sanitizers)");
    let mut build = Command::new("cargo");
    build
        .current_dir(fuzz_dir())
        .args(["+nightly", "fuzz", "build"]);
    if let [one] = chosen.as_slice() {
        build.arg(one);
    }
    run(&mut build)?;
    let mut runs = Vec::new();
    for target in &chosen {
        runs.push(run_target(target, each)?);
    }
    println!(
        "\n{:<12} {:>8} {:>14} {:>8} {:>8}",
        "target", "seconds", "executions", "corpus", "crashes"
    );
    for r in &runs {
        println!(
            "{:<12} {:>8} {:>14} {:>8} {:>8}",
            r.target,
            r.seconds,
            r.executions,
            r.corpus_files,
            r.crashes.len()
        );
    }
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&runs)?)?;
    }
    let crashed: Vec<&PathBuf> = runs.iter().flat_map(|r| &r.crashes).collect();
    if !crashed.is_empty() {
        bail!(
            "fuzzing found {} crash input(s): {crashed:?}",
            crashed.len()
        );
    }
    Ok(())
}

/// One target for `each` seconds on its corpus.
fn run_target(target: &str, each: u64) -> Result<TargetRun> {
    let corpus = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    let artifacts = fuzz_dir().join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts)?;
    let before = files_in(&artifacts);
    step!(
        "fuzz: {target} for {each} s (corpus {} files)",
        files_in(&corpus).len()
    );
    let started = Instant::now();
    // The binary `cargo fuzz build` made, run directly: `cargo fuzz run` would rebuild the
    // whole tree with sanitizers whenever a source changed since (minutes of a target's time).
    let binary = fuzz_dir()
        .join("target")
        .join(host_triple())
        .join("release")
        .join(target);
    let mut child = Command::new(&binary)
        .current_dir(fuzz_dir())
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .args([
            &format!("-max_total_time={each}"),
            "-rss_limit_mb=2048",
            "-timeout=10",
            "-print_final_stats=1",
        ])
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", binary.display()))?;
    // libFuzzer's "pulse" lines (at powers of two executions) show progress; all of it is kept
    // for the statistics and for a failure's report.
    let mut stderr = String::new();
    if let Some(pipe) = child.stderr.take() {
        for line in std::io::BufRead::lines(std::io::BufReader::new(pipe)).map_while(Result::ok) {
            if line.contains("\tpulse ") || line.starts_with("==") || line.contains("panicked") {
                eprintln!("  {target}: {line}");
            }
            stderr.push_str(&line);
            stderr.push('\n');
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("running {}", binary.display()))?;
    let crashes: Vec<PathBuf> = files_in(&artifacts)
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    let r = TargetRun {
        target: target.to_owned(),
        seconds: started.elapsed().as_secs(),
        executions: executions(&stderr),
        corpus_files: files_in(&corpus).len(),
        crashes,
    };
    if !status.success() && r.crashes.is_empty() {
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} failed without a crash input:\n{}",
            tail.join("\n")
        );
    }
    step!(
        "fuzz: {target}: {} executions in {} s, corpus {} files, {} crash(es)",
        r.executions,
        r.seconds,
        r.corpus_files,
        r.crashes.len()
    );
    Ok(r)
}
