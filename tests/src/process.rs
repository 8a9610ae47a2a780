//! Processes inside nodes and pods: commands that enter a netns and a cgroup before `exec`, and
//! [`Proc`], the guard that captures their output and kills them when dropped.
#![allow(unsafe_code)] // reason: `CommandExt::pre_exec` is the only way to setns/join a cgroup between fork and exec

use std::{
    ffi::OsStr,
    fmt::Write as _,
    fs::File,
    io::{self, BufRead, BufReader, Read},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{self, Signal},
    unistd::Pid,
};
use serde::de::DeserializeOwned;

/// Builds a command that, once forked, joins the cgroup `cgroup_dir` and the network namespace at
/// `netns_path`, then execs `program`.
///
/// Both files are opened here, in the parent, so that failures name the path; the child only
/// makes two system calls, which allocate nothing (required between fork and exec of a
/// multi-threaded parent). The descriptors are close-on-exec and owned by the command.
pub(crate) fn command_in(
    program: impl AsRef<OsStr>,
    netns_path: &Path,
    cgroup_dir: &Path,
) -> Result<Command> {
    let netns = File::open(netns_path)
        .with_context(|| format!("opening netns {}", netns_path.display()))?;
    let procs_path = cgroup_dir.join("cgroup.procs");
    let procs = File::options()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {}", procs_path.display()))?;
    let mut command = Command::new(program);
    let enter = move || -> io::Result<()> {
        // "0" moves the writing process: the child, before it execs.
        nix::unistd::write(&procs, b"0").map_err(errno_to_io)?;
        setns(&netns, CloneFlags::CLONE_NEWNET).map_err(errno_to_io)?;
        Ok(())
    };
    // SAFETY: `enter` only calls write(2) and setns(2) on descriptors it owns and builds errors
    // from raw errnos; it allocates nothing and takes no locks, so it is safe after fork.
    unsafe {
        command.pre_exec(enter);
    }
    Ok(command)
}

/// Builds a command that, once forked, starts a session of its own (it outlives the caller and
/// its terminal), joins the cgroup `cgroup_dir` and the network and mount namespaces of the
/// process `holder`, then execs `program`: a daemon of a cluster node.
pub(crate) fn command_in_node(
    program: impl AsRef<OsStr>,
    holder: u32,
    cgroup_dir: &Path,
) -> Result<Command> {
    let open = |ns: &str| {
        let path = format!("/proc/{holder}/ns/{ns}");
        File::open(&path).with_context(|| format!("opening {path}: is the node's holder alive?"))
    };
    let (net, mnt) = (open("net")?, open("mnt")?);
    let procs_path = cgroup_dir.join("cgroup.procs");
    let procs = File::options()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {}", procs_path.display()))?;
    let mut command = Command::new(program);
    let enter = move || -> io::Result<()> {
        nix::unistd::setsid().map_err(errno_to_io)?;
        nix::unistd::write(&procs, b"0").map_err(errno_to_io)?;
        setns(&net, CloneFlags::CLONE_NEWNET).map_err(errno_to_io)?;
        setns(&mnt, CloneFlags::CLONE_NEWNS).map_err(errno_to_io)?;
        Ok(())
    };
    // SAFETY: as in `command_in`: setsid(2), write(2) and setns(2) on descriptors it owns, no
    // allocation, no locks; safe after fork.
    unsafe {
        command.pre_exec(enter);
    }
    Ok(command)
}

fn errno_to_io(errno: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(errno as i32)
}

// ---------------------------------------------------------------------------------------------
// Proc

/// At most this much of each output stream is kept; more is counted, not stored.
const CAPTURE_LIMIT: usize = 8 << 20;
/// How long a killed process gets to be reaped, and its pipes to close, before we give up.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exited process's output pipes get to close (children it left may hold them).
const PIPE_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How much of stderr a failing test shows per process.
const STDERR_TAIL: usize = 4096;

/// A running process the testbed started; dropping it kills (SIGKILL) and reaps it.
///
/// Its stdout and stderr are captured (for [`Proc::wait_for_line`] and for the report when a test
/// fails: a `Proc` dropped while the thread panics prints its stderr tail).
pub struct Proc {
    label: String,
    child: Child,
    /// Set once reaped: from then on the pid may belong to someone else and is never signalled.
    status: Option<ExitStatus>,
    stdout: Arc<Capture>,
    stderr: Arc<Capture>,
}

/// A process that has exited, with its captured output.
#[derive(Debug, Clone)]
pub struct Finished {
    pub label: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Proc {
    /// Spawns `command` with stdin closed and stdout and stderr captured. `label` names the
    /// process in errors and logs (e.g. `node1/web: weft-workload`).
    pub fn spawn(label: impl Into<String>, command: &mut Command) -> Result<Self> {
        let label = label.into();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| {
                format!("{label}: cannot start {}", command.get_program().display())
            })?;
        let stdout = Capture::start(&label, "stdout", child.stdout.take())?;
        let stderr = Capture::start(&label, "stderr", child.stderr.take())?;
        Ok(Self {
            label,
            child,
            status: None,
            stdout,
            stderr,
        })
    }

    #[must_use]
    pub fn label(&self) -> &str {
        &self.label
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        self.poll().is_none()
    }

    /// Waits until stdout has a line for which `matches` is true and returns it. Fails if the
    /// process closes stdout (exits) first or `timeout` passes; the error carries its stderr.
    pub fn wait_for_line(
        &self,
        timeout: Duration,
        mut matches: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.stdout.lock();
        loop {
            if let Some(line) = state.lines().find(|line| matches(line)) {
                return Ok(line.to_owned());
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                let why = if state.closed {
                    "closed stdout"
                } else {
                    "printed nothing matching"
                };
                bail!(
                    "{}: {why} within {timeout:?}; stdout: {:?}; stderr: {}",
                    self.label,
                    state.text,
                    self.stderr.tail(STDERR_TAIL)
                );
            }
            state = self
                .stdout
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits for a stdout line that is a JSON object with field `key` and returns the object.
    pub fn wait_for_json(&self, timeout: Duration, key: &str) -> Result<serde_json::Value> {
        let line = self.wait_for_line(timeout, |line| {
            json_object(line).is_some_and(|value| value.get(key).is_some())
        })?;
        json_object(&line).context("the matched line stopped being JSON")
    }

    /// Captured stdout so far.
    #[must_use]
    pub fn stdout(&self) -> String {
        self.stdout.lock().text.clone()
    }

    /// Captured stderr so far.
    #[must_use]
    pub fn stderr(&self) -> String {
        self.stderr.lock().text.clone()
    }

    /// Waits up to `timeout` for it to exit on its own. On timeout it is killed and the error
    /// carries its output.
    pub fn wait(&mut self, timeout: Duration) -> Result<Finished> {
        let deadline = Instant::now() + timeout;
        while self.poll().is_none() {
            if Instant::now() >= deadline {
                self.stop();
                bail!(
                    "{}: still running after {timeout:?}, killed; stdout: {:?}; stderr: {}",
                    self.label,
                    self.stdout(),
                    self.stderr.tail(STDERR_TAIL)
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.finished()
    }

    /// Sends `signal` (e.g. SIGTERM for a graceful stop); a no-op once it has exited.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.poll().is_some() {
            return Ok(());
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).context("pid out of range")?);
        signal::kill(pid, signal).with_context(|| format!("{}: sending {signal}", self.label))
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Result<Finished> {
        self.signal(Signal::SIGTERM)?;
        let deadline = Instant::now() + grace;
        while self.poll().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        self.kill()
    }

    /// Kills it (SIGKILL) unless it has exited, reaps it and returns what it printed.
    pub fn kill(&mut self) -> Result<Finished> {
        self.stop();
        self.finished()
    }

    /// SIGKILL unless already exited, then reap (bounded by [`REAP_TIMEOUT`]).
    fn stop(&mut self) {
        if self.poll().is_some() {
            return;
        }
        // Not reaped yet, so the pid is still ours even if it has just exited.
        if let Err(error) = self.child.kill() {
            eprintln!("[testbed] {}: SIGKILL failed: {error}", self.label);
        }
        let deadline = Instant::now() + REAP_TIMEOUT;
        while self.poll().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reaps it if it has exited.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(status) => self.status = status,
                Err(error) => eprintln!("[testbed] {}: waitpid failed: {error}", self.label),
            }
        }
        self.status
    }

    /// Output of an exited process, once its pipes are closed (a grandchild may still hold them:
    /// then what was captured so far).
    fn finished(&self) -> Result<Finished> {
        let status = self.status.with_context(|| {
            format!(
                "{}: still not reaped {REAP_TIMEOUT:?} after SIGKILL (stuck in the kernel?)",
                self.label
            )
        })?;
        let deadline = Instant::now() + PIPE_CLOSE_TIMEOUT;
        self.stdout.wait_closed(deadline);
        self.stderr.wait_closed(deadline);
        Ok(Finished {
            label: self.label.clone(),
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            self.stderr.wait_closed(Instant::now() + PIPE_CLOSE_TIMEOUT);
            let status = self
                .status
                .map_or_else(|| "not reaped".to_owned(), |status| status.to_string());
            eprintln!(
                "[testbed] {} ({status}) stderr, last {STDERR_TAIL} bytes:\n{}",
                self.label,
                self.stderr.tail(STDERR_TAIL)
            );
        }
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("label", &self.label)
            .field("pid", &self.child.id())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Finished {
    #[must_use]
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The last stdout line that is a JSON object (the workload's result).
    pub fn json(&self) -> Result<serde_json::Value> {
        self.stdout
            .lines()
            .rev()
            .find_map(json_object)
            .with_context(|| {
                format!(
                    "{}: no JSON result on stdout ({}); stdout: {:?}; stderr: {}",
                    self.label,
                    self.status,
                    self.stdout,
                    tail(&self.stderr, STDERR_TAIL)
                )
            })
    }

    /// [`Finished::json`] deserialised into `T`.
    pub fn json_as<T: DeserializeOwned>(&self) -> Result<T> {
        let value = self.json()?;
        serde_json::from_value(value.clone())
            .with_context(|| format!("{}: unexpected result {value}", self.label))
    }

    /// Fails unless it exited with status 0; the error carries its output.
    pub fn check(self) -> Result<Self> {
        if self.success() {
            Ok(self)
        } else {
            bail!(
                "{} failed ({}); stdout: {:?}; stderr: {}",
                self.label,
                self.status,
                self.stdout,
                tail(&self.stderr, STDERR_TAIL)
            )
        }
    }
}

fn json_object(line: &str) -> Option<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(line.trim())
        .ok()
        .filter(serde_json::Value::is_object)
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

// ---------------------------------------------------------------------------------------------
// Output capture

/// One output stream of a [`Proc`], filled by a reader thread.
struct Capture {
    state: Mutex<CaptureState>,
    changed: Condvar,
}

#[derive(Default)]
struct CaptureState {
    text: String,
    /// Bytes dropped beyond [`CAPTURE_LIMIT`].
    dropped: usize,
    closed: bool,
}

impl CaptureState {
    /// Complete lines only: a line being written is not matched half way.
    fn lines(&self) -> impl Iterator<Item = &str> {
        let complete = if self.closed {
            &self.text[..]
        } else {
            self.text.rsplit_once('\n').map_or("", |(done, _)| done)
        };
        complete.lines()
    }
}

impl Capture {
    fn start(
        label: &str,
        stream: &str,
        pipe: Option<impl Read + Send + 'static>,
    ) -> Result<Arc<Self>> {
        let capture = Arc::new(Self {
            state: Mutex::default(),
            changed: Condvar::new(),
        });
        let Some(pipe) = pipe else {
            capture.lock().closed = true;
            return Ok(capture);
        };
        let writer = Arc::clone(&capture);
        // Detached: it ends when every holder of the pipe's write end (the process and any
        // children it left behind) is gone, which teardown's cgroup kill guarantees.
        thread::Builder::new()
            .name(format!("{label} {stream}"))
            .spawn(move || writer.fill(pipe))
            .with_context(|| format!("{label}: starting the {stream} reader"))?;
        Ok(capture)
    }

    fn fill(&self, pipe: impl Read) {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    let mut state = self.lock();
                    if state.text.len() + line.len() <= CAPTURE_LIMIT {
                        state.text.push_str(&String::from_utf8_lossy(&line));
                    } else {
                        state.dropped += line.len();
                    }
                    drop(state);
                    self.changed.notify_all();
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    let _ = write!(self.lock().text, "\n[testbed: reading failed: {error}]\n");
                    break;
                }
            }
        }
        let mut state = self.lock();
        if state.dropped > 0 {
            let dropped = state.dropped;
            let _ = write!(state.text, "\n[testbed: {dropped} more bytes not kept]\n");
        }
        state.closed = true;
        drop(state);
        self.changed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CaptureState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_closed(&self, deadline: Instant) {
        let mut state = self.lock();
        while !state.closed {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn tail(&self, max: usize) -> String {
        tail(&self.lock().text, max).to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn captures_output_and_finds_lines() {
        let mut proc = Proc::spawn(
            "sh",
            Command::new("sh").args([
                "-c",
                "echo '{\"ready\":1}'; echo oops >&2; echo '{\"done\":true}'",
            ]),
        )
        .unwrap();
        let ready = proc
            .wait_for_json(Duration::from_secs(10), "ready")
            .unwrap();
        assert_eq!(ready["ready"], 1);
        let finished = proc.wait(Duration::from_secs(10)).unwrap();
        assert!(finished.success());
        assert_eq!(finished.json().unwrap()["done"], true);
        assert_eq!(finished.stderr, "oops\n");
    }

    #[test]
    fn a_process_that_exits_first_fails_the_wait_for_line() {
        let proc = Proc::spawn("true", &mut Command::new("true")).unwrap();
        let error = proc
            .wait_for_line(Duration::from_secs(10), |_| true)
            .unwrap_err();
        assert!(error.to_string().contains("closed stdout"), "{error:#}");
    }

    #[test]
    fn kill_and_drop_stop_a_running_process() {
        let mut proc = Proc::spawn("sleep", Command::new("sleep").arg("600")).unwrap();
        assert!(proc.is_running());
        let finished = proc.kill().unwrap();
        assert_eq!(finished.status.signal(), Some(Signal::SIGKILL as i32));
        assert!(!proc.is_running());
        // Killing again is a no-op: the pid is no longer ours.
        assert_eq!(proc.kill().unwrap().status, finished.status);

        let proc = Proc::spawn("sleep", Command::new("sleep").arg("600")).unwrap();
        let pid = Pid::from_raw(i32::try_from(proc.pid()).unwrap());
        drop(proc);
        assert_eq!(signal::kill(pid, None), Err(nix::errno::Errno::ESRCH));
    }

    #[test]
    fn wait_times_out_and_kills() {
        let mut proc = Proc::spawn("sleep", Command::new("sleep").arg("600")).unwrap();
        let error = proc.wait(Duration::from_millis(100)).unwrap_err();
        assert!(error.to_string().contains("still running"), "{error:#}");
        assert!(!proc.is_running());
    }

    #[test]
    fn tail_respects_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
    }
}
