//! Running `weft agent` for a testbed node, and reading what it serves.
//!
//! The agent runs in the node's network namespace (it attaches TC programs to the pods' veths
//! there), attaches its cgroup programs to the node cgroup, pins under the run's bpffs directory
//! and serves its admin API on a Unix socket in the node's run directory. Objects are YAML files
//! in `<run dir>/objects`, which tests rewrite to change the mesh live.
use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{Node, eventually, process::Proc, weft_bin};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug)]
pub struct Agent {
    proc: Option<Proc>,
    /// The `weft` binary it runs ([`weft_bin`] unless started with [`Agent::start_binary`]).
    bin: PathBuf,
    node_name: String,
    cgroup: PathBuf,
    own_cgroup: PathBuf,
    engine_addr: std::net::SocketAddrV4,
    pub bpffs_dir: PathBuf,
    pub objects_dir: PathBuf,
    pub socket: PathBuf,
    extra: Vec<String>,
    /// Kubernetes mode: the agent watches the API server this kubeconfig names instead of
    /// reading `objects_dir`.
    kubeconfig: Option<PathBuf>,
}

impl Agent {
    /// Starts the agent for `node` and waits until `/ready` answers 200.
    pub fn start(node: &Node, extra_args: &[&str]) -> Result<Self> {
        Self::start_with(node, extra_args, None)
    }

    /// [`Agent::start`] with another `weft` binary (another build, measured beside this one).
    pub fn start_binary(node: &Node, bin: &Path, extra_args: &[&str]) -> Result<Self> {
        let mut agent = Self::new(node, extra_args, None)?;
        bin.clone_into(&mut agent.bin);
        agent.spawn(node)?;
        Ok(agent)
    }

    /// Starts the agent for `node` in Kubernetes mode (`--kube --kubeconfig <kubeconfig>`).
    pub fn start_kube(node: &Node, kubeconfig: &Path, extra_args: &[&str]) -> Result<Self> {
        Self::start_with(node, extra_args, Some(kubeconfig.to_owned()))
    }

    /// Starts the agent in Kubernetes mode without waiting for it to become ready (its API
    /// server may not be reachable yet); see [`Agent::ready_code`] and [`Agent::wait_ready`].
    pub fn spawn_kube(node: &Node, kubeconfig: &Path, extra_args: &[&str]) -> Result<Self> {
        let mut agent = Self::new(node, extra_args, Some(kubeconfig.to_owned()))?;
        let _ = std::fs::remove_file(&agent.socket);
        agent.proc = Some(node.spawn_agent(&agent.bin, agent.args())?);
        Ok(agent)
    }

    /// What `/ready` answers now (0 while the admin socket is not up).
    #[must_use]
    pub fn ready_code(&self) -> u16 {
        self.get("/ready").map_or(0, |(code, _)| code)
    }

    /// Waits until `/ready` answers 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        eventually(timeout, || {
            if let Some(p) = self.proc.as_mut()
                && !p.is_running()
            {
                bail!("agent exited: {}", p.stderr());
            }
            match self.get("/ready")? {
                (200, _) => Ok(()),
                (code, body) => bail!("/ready answered {code}: {body}"),
            }
        })
        .with_context(|| {
            let log = self.stderr();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            format!(
                "agent for {} did not become ready; its log ends with:\n{}",
                self.node_name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
    }

    fn new(node: &Node, extra_args: &[&str], kubeconfig: Option<PathBuf>) -> Result<Self> {
        let objects_dir = node.run_dir().join("objects");
        std::fs::create_dir_all(&objects_dir)?;
        Ok(Self {
            proc: None,
            bin: weft_bin(),
            node_name: node.name().to_owned(),
            cgroup: node.cgroup_path(),
            own_cgroup: node.agent_cgroup(),
            engine_addr: node.engine_addr(),
            bpffs_dir: node.bpffs_dir(),
            socket: node.run_dir().join("admin.sock"),
            objects_dir,
            extra: extra_args.iter().map(|s| (*s).to_owned()).collect(),
            kubeconfig,
        })
    }

    fn start_with(node: &Node, extra_args: &[&str], kubeconfig: Option<PathBuf>) -> Result<Self> {
        let mut agent = Self::new(node, extra_args, kubeconfig)?;
        agent.spawn(node)?;
        Ok(agent)
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "agent",
            "--node",
            &self.node_name,
            "--cgroup",
            &self.cgroup.display().to_string(),
            "--bpffs-dir",
            &self.bpffs_dir.display().to_string(),
            "--admin-socket",
            &self.socket.display().to_string(),
            "--engine-addr",
            &self.engine_addr.to_string(),
            "--engine-sockops-cgroup",
            &self.own_cgroup.display().to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        match &self.kubeconfig {
            Some(k) => args.extend([
                "--kube".into(),
                "--kubeconfig".into(),
                k.display().to_string(),
            ]),
            None => args.extend(["--objects".into(), self.objects_dir.display().to_string()]),
        }
        // Tests want changes and counters to show quickly; callers that measure (benches, the
        // demo) pass the production intervals instead.
        if !self.extra.iter().any(|a| a.ends_with("-interval-ms")) {
            args.extend(
                ["--sync-interval-ms", "100", "--stats-interval-ms", "100"].map(str::to_owned),
            );
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// The agent's own defaults for its sync and stats intervals (what a user runs): for
    /// measurements, where the test-speed intervals would cost CPU a deployment does not spend.
    pub const PRODUCTION_INTERVALS: [&str; 4] =
        ["--sync-interval-ms", "250", "--stats-interval-ms", "1000"];

    fn spawn(&mut self, node: &Node) -> Result<()> {
        let _ = std::fs::remove_file(&self.socket);
        let proc = node.spawn_agent(&self.bin, self.args())?;
        self.proc = Some(proc);
        self.wait_ready(READY_TIMEOUT)
    }

    /// The agent's process id while it runs.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// `kill -9`, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take()
            && let Err(e) = p.kill()
        {
            eprintln!("[agent] kill -9: {e}");
        }
    }

    /// Starts the agent again (after [`Agent::kill9`] or [`Agent::stop`]).
    pub fn restart(&mut self, node: &Node) -> Result<()> {
        self.kill9();
        self.spawn(node)
    }

    /// Starts the agent again with other extra arguments (another configuration of the same
    /// node, e.g. other map sizes).
    pub fn restart_with(&mut self, node: &Node, extra_args: &[&str]) -> Result<()> {
        self.kill9();
        self.extra = extra_args.iter().map(|s| (*s).to_owned()).collect();
        self.spawn(node)
    }

    /// SIGTERM and wait: the datapath stays installed.
    pub fn stop(&mut self) -> Result<String> {
        match self.proc.take() {
            Some(mut p) => Ok(p.terminate(Duration::from_secs(10))?.stderr),
            None => Ok(String::new()),
        }
    }

    /// `weft agent --uninstall` for this node (the agent should be stopped first).
    pub fn uninstall(&mut self, node: &Node) -> Result<()> {
        self.stop()?;
        let mut args = self.args();
        args.push("--uninstall".into());
        let done = node.run(Duration::from_secs(30), &self.bin, args)?;
        if !done.success() {
            bail!("uninstall failed: {}", done.stderr);
        }
        Ok(())
    }

    pub fn stderr(&self) -> String {
        self.proc.as_ref().map(Proc::stderr).unwrap_or_default()
    }

    /// Turns the socket fast path on for every workload of the node (`MeshConfig`
    /// `socketFastPath: Enabled`), whatever the kernel's self-test said: for tests of the socket
    /// fast path itself, whose workloads read the way it serves exactly (event loops).
    pub fn enable_socket_fast_path(&self) -> Result<()> {
        self.apply(
            "meshconfig.yaml",
            "apiVersion: weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: default}\n\
             spec: {socketFastPath: Enabled}\n",
        )
    }

    /// Writes (replaces) one objects file; the agent picks it up on its next sync.
    pub fn apply(&self, file: &str, yaml: &str) -> Result<()> {
        let path = self.objects_dir.join(file);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn delete(&self, file: &str) -> Result<()> {
        std::fs::remove_file(self.objects_dir.join(file))?;
        Ok(())
    }

    /// GET over the admin socket: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(&self.socket, path)
    }

    pub fn json(&self, path: &str) -> Result<Value> {
        let (code, body) = self.get(path)?;
        if code != 200 {
            bail!("{path} answered {code}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    pub fn status(&self) -> Result<Value> {
        self.json("/status")
    }

    pub fn flows(&self) -> Result<Value> {
        self.json("/flows")
    }

    pub fn metrics(&self) -> Result<String> {
        let (code, body) = self.get("/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(body)
    }

    /// Sum of the samples of `name` whose labels contain every `key="value"` in `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(sum_metric(&self.metrics()?, name, labels))
    }

    /// Waits until the objects in `objects_dir` are applied: the agent saw `workloads` of them.
    pub fn wait_workloads(&self, workloads: u64) -> Result<()> {
        eventually(Duration::from_secs(10), || {
            let s = self.status()?;
            let n = s["workloads"].as_u64().unwrap_or(0);
            if n == workloads && s["last_sync_error"].is_null() {
                Ok(())
            } else {
                bail!("agent sees {n} workloads (want {workloads}): {s}")
            }
        })
    }
}

/// Agent flags giving it the run's CA (made with `weft ca init` on first use, in the run's
/// state directory), so that it holds workload identities and runs the mTLS tunnel.
pub fn identity_args(node: &Node) -> Result<Vec<String>> {
    ca_args(node, "ca")
}

/// Agent flags for the CA `name` of the run (made with `weft ca init` on first use): tests use
/// a second one as a foreign CA.
pub fn ca_args(node: &Node, name: &str) -> Result<Vec<String>> {
    let dir = node
        .run_dir()
        .parent()
        .context("a node run dir has a parent")?
        .join(name);
    if !dir.join("ca.key").exists() {
        let done = std::process::Command::new(weft_bin())
            .args(["ca", "init", "--dir"])
            .arg(&dir)
            .output()
            .context("running weft ca init")?;
        if !done.status.success() {
            bail!(
                "weft ca init failed: {}",
                String::from_utf8_lossy(&done.stderr)
            );
        }
    }
    Ok(ca_flags(&dir))
}

/// `--ca-cert <dir>/ca.crt --ca-key <dir>/ca.key` (the files `weft ca init` and
/// `weft ca intermediate` write).
#[must_use]
pub fn ca_flags(dir: &Path) -> Vec<String> {
    vec![
        "--ca-cert".into(),
        dir.join("ca.crt").display().to_string(),
        "--ca-key".into(),
        dir.join("ca.key").display().to_string(),
    ]
}

/// Sum of the samples of a Prometheus text metric, filtered by labels.
#[must_use]
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A minimal HTTP/1.1 GET over a Unix socket (the agent answers with a Content-Length body).
pub fn http_get(socket: &Path, path: &str) -> Result<(u16, String)> {
    let mut s =
        UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: weft\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("bad status line")?;
    Ok((code, body.to_owned()))
}
