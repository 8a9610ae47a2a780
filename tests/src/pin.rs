//! CPU pinning for benchmarks: load generators on one CPU, the systems under test on another,
//! so that the scheduler moving them about does not become part of what is measured.
use anyhow::{Context as _, Result};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};

/// Pins the calling thread (and so the threads it starts afterwards) to `cpu`.
///
/// # Errors
/// When `cpu` is not one this process may run on.
pub fn pin_self(cpu: usize) -> Result<()> {
    sched_setaffinity(Pid::from_raw(0), &cpu_set(cpu)?)
        .with_context(|| format!("pinning to CPU {cpu}"))
}

/// Pins every thread of process `pid` and of its descendants to `cpu`; returns how many
/// threads were pinned. Threads they start later inherit it.
///
/// # Errors
/// When `cpu` is no CPU of this machine or a thread of `pid` cannot be pinned.
pub fn pin_tree(pid: u32, cpu: usize) -> Result<usize> {
    let set = cpu_set(cpu)?;
    let mut pinned = 0;
    let mut pending = vec![pid];
    while let Some(pid) = pending.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("threads of process {pid}"))?;
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            // A thread that ended meanwhile is no failure.
            if sched_setaffinity(Pid::from_raw(tid), &set).is_ok() {
                pinned += 1;
            }
            if let Ok(children) =
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children"))
            {
                pending.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    anyhow::ensure!(
        pinned > 0,
        "process {pid}: no thread could be pinned to CPU {cpu}"
    );
    Ok(pinned)
}

/// The CPUs this process may run on, in order.
#[must_use]
pub fn allowed_cpus() -> Vec<usize> {
    nix::sched::sched_getaffinity(Pid::from_raw(0))
        .map(|set| {
            (0..CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect()
        })
        .unwrap_or_default()
}

fn cpu_set(cpu: usize) -> Result<CpuSet> {
    let mut set = CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_and_its_threads_end_up_on_the_chosen_cpu() {
        let cpus = allowed_cpus();
        let cpu = *cpus.last().expect("some CPU");
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(pin_tree(child.id(), cpu).unwrap() >= 1);
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_owned();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(allowed, cpu.to_string());
    }
}
