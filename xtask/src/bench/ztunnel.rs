//! Istio's ztunnel as a column of `bench mtls`: the node proxy of Istio's ambient mode, which
//! does what Weft's tunnel does (HBONE: HTTP/2 CONNECT streams in mutual TLS 1.3 between the
//! nodes, port 15008).
//!
//! Weft does not build ztunnel: `--ztunnel BIN` names a binary the user built from Istio's
//! source (its in-process test CA, `FAKE_CA`, must be compiled in). Each ztunnel runs in its
//! "dedicated" mode (one proxy for one workload, in the workload's own network namespace,
//! configured from a local file instead of istiod), which is what its own namespaced tests
//! run: one in an unmeshed client pod on node `n1`, one in an unmeshed server pod on `n2`. The
//! client pod's outbound connections to the server's ports are captured into ztunnel's outbound
//! listener (15001) with an nftables `redirect` in the pod's namespace (ztunnel reads the
//! original destination from conntrack, as behind its own iptables rules); ztunnel's own
//! upstream sockets carry mark 1337 and are not captured. The server-side ztunnel terminates
//! HBONE and connects to the server on the pod's own address.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use testbed::{Pod, Proc, eventually};

/// The mark ztunnel sets on its own upstream sockets (`PACKET_MARK`), which the capture rule
/// leaves alone.
const MARK: u32 = 1337;
/// ztunnel's listeners in dedicated mode.
const OUTBOUND_PORT: u16 = 15001;
const HBONE_PORT: u16 = 15008;
/// How long a ztunnel gets to listen after it starts, and to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What Istio publishes for ztunnel (their hardware, not this machine): the reference the
/// report names when no binary was given.
pub const PUBLISHED: &str = "Istio's published figures (other hardware, not measured here): \
     a ztunnel pair adds +0.17 ms p90 / +0.20 ms p99 at 1 KB and 1000 requests/s; \
     0.06 vCPU and 12 MB per ztunnel at 1000 requests/s";

/// The two ztunnels; stop them with [`Pair::stop`].
pub struct Pair {
    procs: Vec<Proc>,
    /// `ztunnel version`'s first line.
    pub version: String,
}

/// A workload as ztunnel's local configuration names it (its service account is its name).
struct Workload<'a> {
    namespace: &'a str,
    name: &'a str,
    ip: std::net::Ipv4Addr,
    node: &'a str,
}

impl<'a> Workload<'a> {
    fn of(pod: &'a Pod, node: &'a str) -> Self {
        Self {
            namespace: pod.namespace(),
            name: pod.name(),
            ip: pod.ip(),
            node,
        }
    }

    /// `PROXY_WORKLOAD_INFO`: namespace/name/service account.
    fn info(&self) -> String {
        format!("{0}/{1}/{1}", self.namespace, self.name)
    }
}

/// ztunnel's local configuration (its `LocalConfig`: workloads and services instead of xDS):
/// both pods speak HBONE; they are reached by pod address, so no service is needed.
fn local_config(workloads: &[&Workload]) -> String {
    let mut out = String::from("workloads:\n");
    for w in workloads {
        let _ = write!(
            out,
            "- uid: cluster1//v1/Pod/{ns}/{name}\n  name: {name}\n  namespace: {ns}\n  \
             serviceAccount: {name}\n  trustDomain: cluster.local\n  workloadIps: [\"{ip}\"]\n  \
             protocol: HBONE\n  node: {node}\n  network: \"\"\n  services: {{}}\n",
            ns = w.namespace,
            name = w.name,
            ip = w.ip,
            node = w.node,
        );
    }
    out.push_str("services: []\n");
    out
}

/// The client pod's capture: its connections to `server`'s `ports` go to ztunnel's outbound
/// listener, except ztunnel's own (marked) sockets.
fn capture_rules(server: std::net::Ipv4Addr, ports: &[u16]) -> String {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "# Written by `cargo xtask bench mtls` (the client pod's namespace only).\n\
         table ip weft_bench_ztunnel {{\n  chain output {{\n    \
         type nat hook output priority -100; policy accept;\n    \
         meta mark {MARK} return\n    \
         ip daddr {server} tcp dport {{ {ports} }} redirect to :{OUTBOUND_PORT}\n  }}\n}}\n"
    )
}

fn start_one(bin: &Path, pod: &Pod, workload: &Workload, config: &Path) -> Result<Proc> {
    let mut cmd = pod.command(bin)?;
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("FAKE_CA", "true")
        .env("XDS_ADDRESS", "")
        .env("CA_ADDRESS", "")
        .env("LOCAL_XDS_PATH", config)
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", workload.info())
        .env("NODE_NAME", workload.node)
        .env("PACKET_MARK", MARK.to_string())
        // What ztunnel's own namespaced tests set for dedicated mode: no IP_TRANSPARENT
        // spoofing of the client's address towards the server.
        .env("ENABLE_ORIG_SRC", "false")
        .env("RUST_LOG", "warn");
    Proc::spawn(format!("{}: ztunnel", pod.name()), &mut cmd)
}

fn wait_listening(proc: &mut Proc, pod: &Pod, port: u16) -> Result<()> {
    let filter = format!("sport = :{port}");
    eventually(START_TIMEOUT, || {
        if !proc.is_running() {
            bail!("ztunnel exited: {}", proc.stderr());
        }
        let ss = pod.run(Duration::from_secs(5), "ss", ["-Hltn", filter.as_str()])?;
        ensure!(!ss.stdout.trim().is_empty(), "not listening on {port} yet");
        Ok(())
    })
    .with_context(|| format!("ztunnel in {} did not start", pod.name()))
}

/// `ztunnel version`'s first line (also proves the binary runs here).
fn version(bin: &Path) -> Result<String> {
    let out = std::process::Command::new(bin)
        .arg("version")
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    ensure!(
        out.status.success(),
        "{} version: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

impl Pair {
    /// Starts ztunnel in `client` (on node `client_node`) and in `server`, and captures the
    /// client's connections to the server's `ports`. Files go to `dir`.
    pub fn start(
        bin: &Path,
        dir: &Path,
        (client, client_node): (&Pod, &str),
        (server, server_node): (&Pod, &str),
        ports: &[u16],
    ) -> Result<Self> {
        let version = version(bin)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (c, s) = (
            Workload::of(client, client_node),
            Workload::of(server, server_node),
        );
        let config = dir.join("ztunnel.yaml");
        std::fs::write(&config, local_config(&[&c, &s]))?;
        let rules: PathBuf = dir.join("capture.nft");
        std::fs::write(&rules, capture_rules(server.ip(), ports))?;
        client
            .run(
                Duration::from_secs(10),
                "nft",
                [std::ffi::OsStr::new("-f"), rules.as_os_str()],
            )?
            .check()
            .context("installing the client pod's capture rule (nft)")?;
        let mut pair = Self {
            procs: Vec::new(),
            version,
        };
        for (pod, workload, port) in [(server, &s, HBONE_PORT), (client, &c, OUTBOUND_PORT)] {
            let mut proc = start_one(bin, pod, workload, &config)?;
            let listening = wait_listening(&mut proc, pod, port);
            pair.procs.push(proc);
            listening?;
        }
        Ok(pair)
    }

    /// The client-side and server-side ztunnel's pids.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }

    pub fn stop(mut self) -> Result<()> {
        for proc in &mut self.procs {
            proc.terminate(STOP_GRACE)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_both_workloads_and_the_capture_spares_ztunnel() {
        let client = Workload {
            namespace: "default",
            name: "zclient",
            ip: "198.18.1.12".parse().unwrap(),
            node: "n1",
        };
        let server = Workload {
            namespace: "default",
            name: "zserver",
            ip: "198.18.2.12".parse().unwrap(),
            node: "n2",
        };
        assert_eq!(server.info(), "default/zserver/zserver");
        let config = local_config(&[&client, &server]);
        assert!(config.contains("uid: cluster1//v1/Pod/default/zclient\n"));
        assert!(config.contains("workloadIps: [\"198.18.2.12\"]\n  protocol: HBONE\n  node: n2\n"));
        assert_eq!(config.matches("  services: {}\n").count(), 2, "{config}");
        let rules = capture_rules(server.ip, &[8080, 7001]);
        let mark = rules.find("meta mark 1337 return").unwrap();
        let redirect = rules
            .find("ip daddr 198.18.2.12 tcp dport { 8080, 7001 } redirect to :15001")
            .unwrap();
        assert!(
            mark < redirect,
            "ztunnel's own sockets must pass first: {rules}"
        );
    }
}
