//! A pod: a network namespace wired to its node's bridge by a veth pair, a cgroup below the node
//! cgroup, and the Kubernetes object that describes it to the agent.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use serde_json::json;

use crate::{
    host,
    node::{BRIDGE, Node, validate_dns_label},
    process::{self, Finished, Proc},
    teardown,
};

/// The Kubernetes namespace of [`Node::pod`].
pub const DEFAULT_NAMESPACE: &str = "default";
/// Node-side pod interfaces are named `vh<slot>` (the agent finds pod interfaces by this prefix).
pub const POD_VETH_PREFIX: &str = "vh";
/// Annotation that keeps a pod out of the mesh (see [`Pod::manifest_unmeshed`]).
pub const UNMESHED_ANNOTATION: &str = "weft.dev/inject";
/// Pod addresses are `198.18.<N>.<10+slot>`, so at most this many pods per node and run.
const MAX_PODS: u8 = 245;
/// First host byte of pod addresses (below are the bridge and spares).
const FIRST_POD_HOST: u8 = 10;
/// How long the kernel gets to remove a deleted pod's veth pair.
const VETH_GONE_TIMEOUT: Duration = Duration::from_secs(10);

/// A handle onto one pod of a [`crate::Testbed`]; clones refer to the same pod.
#[derive(Clone)]
pub struct Pod {
    node: Node,
    namespace: String,
    name: String,
    slot: u8,
    netns: String,
    host_veth: String,
    host_veth_ifindex: u32,
}

impl Pod {
    pub(crate) fn create(node: &Node, namespace: &str, name: &str) -> Result<Self> {
        validate_dns_label("namespace", namespace)?;
        validate_pod_name(name)?;
        let run = &node.run;
        let _alive = run.guard_alive()?;
        let slot = {
            let mut registry = run.registry();
            let entry = registry
                .nodes
                .get_mut(node.name())
                .context("node is not part of this run")?;
            let key = (namespace.to_owned(), name.to_owned());
            ensure!(
                !entry.pods.contains_key(&key),
                "pod {namespace}/{name} already exists on node {}",
                node.name()
            );
            let in_use: std::collections::BTreeSet<u8> = entry.pods.values().copied().collect();
            let slot = (0..MAX_PODS)
                .map(|i| ((u16::from(entry.next_pod) + u16::from(i)) % u16::from(MAX_PODS)) as u8)
                .find(|slot| !in_use.contains(slot))
                .with_context(|| {
                    format!(
                        "node {} has {MAX_PODS} pods, the most it can hold",
                        node.name()
                    )
                })?;
            entry.next_pod = ((u16::from(slot) + 1) % u16::from(MAX_PODS)) as u8;
            entry.pods.insert(key, slot);
            slot
        };
        let netns = if namespace == DEFAULT_NAMESPACE {
            format!("{}-{name}", node.netns())
        } else {
            format!("{}-{namespace}_{name}", node.netns())
        };
        let mut pod = Self {
            node: node.clone(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            slot,
            netns,
            host_veth: format!("{POD_VETH_PREFIX}{slot}"),
            host_veth_ifindex: 0,
        };
        match pod.build() {
            Ok(ifindex) => {
                pod.host_veth_ifindex = ifindex;
                Ok(pod)
            }
            Err(error) => {
                if let Err(cleanup) = pod.remove() {
                    eprintln!(
                        "[testbed {}] cleaning up pod {}: {cleanup:#}",
                        run.prefix,
                        pod.id()
                    );
                }
                Err(error.context(format!("creating pod {} on node {}", pod.id(), node.name())))
            }
        }
    }

    /// Creates the netns, the veth pair and the cgroup; returns the node-side veth's ifindex.
    fn build(&self) -> Result<u32> {
        host::netns_add(&self.netns)?;
        let node_netns = self.node.netns();
        host::ip(&[
            "-n",
            node_netns,
            "link",
            "add",
            &self.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &self.netns,
        ])?;
        host::ip_batch(
            node_netns,
            &[
                format!("link set {} master {BRIDGE}", self.host_veth),
                format!("link set {} up", self.host_veth),
            ],
        )?;
        host::ip_batch(
            &self.netns,
            &[
                "link set lo up".to_owned(),
                format!("addr add {}/24 dev eth0", self.ip()),
                "link set eth0 up".to_owned(),
                // Other nodes' pods, through this node (no default route: nothing leaves the run).
                format!("route add 198.18.0.0/16 via {}", self.node.bridge_ip()),
            ],
        )?;
        let cgroup = self.cgroup_path();
        std::fs::create_dir(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
        let links = host::ip_json(&["-n", node_netns, "link", "show", "dev", &self.host_veth])?;
        links[0]["ifindex"]
            .as_u64()
            .and_then(|index| u32::try_from(index).ok())
            .with_context(|| format!("no ifindex for {} in {links}", self.host_veth))
    }

    /// Kills the pod's processes and removes its namespace (with the veth pair) and cgroup.
    /// Other handles onto the pod become stale. The run's teardown does this for every pod.
    pub fn delete(self) -> Result<()> {
        let _alive = self.node.run.guard_alive()?;
        self.remove()
    }

    fn remove(&self) -> Result<()> {
        let paths = &self.node.run.paths;
        let cgroup = self.cgroup_path();
        let steps = [
            teardown::kill_cgroup(&cgroup),
            host::netns_del(paths, &self.netns).and_then(|()| self.wait_veth_gone()),
            teardown::remove_cgroup_tree(&cgroup),
        ];
        if let Some(entry) = self.node.run.registry().nodes.get_mut(self.node.name()) {
            entry
                .pods
                .remove(&(self.namespace.clone(), self.name.clone()));
        }
        let errors: Vec<String> = steps
            .into_iter()
            .filter_map(Result::err)
            .map(|error| format!("{error:#}"))
            .collect();
        ensure!(
            errors.is_empty(),
            "removing pod {}: {}",
            self.id(),
            errors.join("; ")
        );
        Ok(())
    }

    /// The kernel dismantles a deleted namespace asynchronously; the node-side veth disappears
    /// with it. Waiting for that makes deletion visible to the node (and its agent) on return.
    fn wait_veth_gone(&self) -> Result<()> {
        let node_netns = self.node.netns();
        let deadline = Instant::now() + VETH_GONE_TIMEOUT;
        loop {
            let links = host::ip_json(&["-n", node_netns, "link", "show"])?;
            let present = links.as_array().is_some_and(|links| {
                links
                    .iter()
                    .any(|link| link["ifname"] == self.host_veth.as_str())
            });
            if !present {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{} is still in {node_netns} {VETH_GONE_TIMEOUT:?} after its pod's netns was deleted",
                self.host_veth
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `namespace/name`.
    fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    #[must_use]
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// `eth0`'s address, `198.18.<N>.<10+slot>` (a /24 shared with the node's other pods).
    #[must_use]
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.node.index(), FIRST_POD_HOST + self.slot)
    }

    /// The pod's network namespace name (for `ip -n`).
    #[must_use]
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `/run/netns/<netns>`.
    #[must_use]
    pub fn netns_path(&self) -> PathBuf {
        self.node.run.paths.netns_path(&self.netns)
    }

    /// `<node cgroup>/<namespace>_<name>`.
    #[must_use]
    pub fn cgroup_path(&self) -> PathBuf {
        self.node
            .cgroup_path()
            .join(format!("{}_{}", self.namespace, self.name))
    }

    /// The node-side end of the pod's veth pair, attached to `br0` (`vh<slot>`).
    #[must_use]
    pub fn host_veth(&self) -> &str {
        &self.host_veth
    }

    /// The ifindex of [`Pod::host_veth`] in the node's namespace.
    #[must_use]
    pub fn host_veth_ifindex(&self) -> u32 {
        self.host_veth_ifindex
    }

    /// The pod as a Kubernetes object (JSON, which is also YAML), as the agent would read it from
    /// the API server: metadata, service account, node, one container, and its IP.
    #[must_use]
    pub fn manifest(&self, labels: &[(&str, &str)], service_account: &str) -> String {
        self.manifest_with(labels, service_account, &[])
    }

    /// [`Pod::manifest`] with the annotation that keeps the pod out of the mesh.
    #[must_use]
    pub fn manifest_unmeshed(&self, labels: &[(&str, &str)], service_account: &str) -> String {
        self.manifest_with(
            labels,
            service_account,
            &[(UNMESHED_ANNOTATION, "disabled")],
        )
    }

    /// A meshed pod manifest with extra annotations (e.g. `weft.dev/mtls-mode`).
    #[must_use]
    pub fn manifest_annotated(
        &self,
        labels: &[(&str, &str)],
        service_account: &str,
        annotations: &[(&str, &str)],
    ) -> String {
        self.manifest_with(labels, service_account, annotations)
    }

    fn manifest_with(
        &self,
        labels: &[(&str, &str)],
        service_account: &str,
        annotations: &[(&str, &str)],
    ) -> String {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let mut metadata = json!({
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid(),
            "labels": labels,
        });
        if !annotations.is_empty() {
            let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
            metadata["annotations"] = json!(annotations);
        }
        let ip = self.ip().to_string();
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": {
                "serviceAccountName": service_account,
                "nodeName": self.node.name(),
                "containers": [{ "name": "app", "image": "weft-workload" }],
            },
            "status": {
                "phase": "Running",
                "hostIP": self.node.bridge_ip().to_string(),
                "podIP": ip,
                "podIPs": [{ "ip": ip }],
            },
        });
        serde_json::to_string_pretty(&pod).expect("a JSON value serialises")
    }

    /// A stable UUID-shaped uid, unique per run, node, namespace and name.
    fn uid(&self) -> String {
        let key = format!(
            "{}/{}/{}/{}",
            self.node.run.prefix,
            self.node.name(),
            self.namespace,
            self.name
        );
        let high = fnv1a(0xcbf2_9ce4_8422_2325, &key);
        let low = fnv1a(high ^ 0x9e37_79b9_7f4a_7c15, &key);
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            high >> 32,
            (high >> 16) & 0xffff,
            high & 0xffff,
            low >> 48,
            low & 0xffff_ffff_ffff
        )
    }

    /// A command that runs `program` inside the pod: in its network namespace and its cgroup
    /// (so the node's cgroup eBPF programs apply to it, as to a container).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let _alive = self.node.run.guard_alive()?;
        process::command_in(program, &self.netns_path(), &self.cgroup_path())
    }

    /// A command that runs `program` in a container of the pod: in the pod's network namespace
    /// and in the cgroup `<pod cgroup>/<container>` (created if needed), as a container runtime
    /// places a container's processes below its pod's cgroup.
    pub fn command_in_container(
        &self,
        container: &str,
        program: impl AsRef<OsStr>,
    ) -> Result<Command> {
        crate::node::validate_dns_label("container", container)?;
        let _alive = self.node.run.guard_alive()?;
        let cgroup = self.cgroup_path().join(container);
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating {}", cgroup.display()))?;
        process::command_in(program, &self.netns_path(), &cgroup)
    }

    /// Starts `program` with `args` inside the pod.
    pub fn spawn<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let label = format!(
            "{}/{}: {}",
            self.node.name(),
            self.id(),
            program_name(program.as_ref())
        );
        Proc::spawn(label, self.command(program)?.args(args))
    }

    /// Runs `program` with `args` inside the pod to completion (killed after `timeout`).
    pub fn run<I, S>(
        &self,
        timeout: Duration,
        program: impl AsRef<OsStr>,
        args: I,
    ) -> Result<Finished>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn(program, args)?.wait(timeout)
    }
}

impl std::fmt::Debug for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pod")
            .field("node", &self.node.name())
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("ip", &self.ip())
            .field("host_veth", &self.host_veth)
            .finish_non_exhaustive()
    }
}

/// The file name of a program path, for labels.
pub(crate) fn program_name(program: &OsStr) -> String {
    std::path::Path::new(program)
        .file_name()
        .unwrap_or(program)
        .to_string_lossy()
        .into_owned()
}

/// Pod names: DNS-1123 subdomain characters, at most 63 so that `<namespace>_<name>` fits a
/// cgroup directory name.
fn validate_pod_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric()),
        "pod name {name:?} is not valid (lowercase letters, digits, '-' and '.', at most 63, \
         starting and ending alphanumeric)"
    );
    Ok(())
}

fn fnv1a(seed: u64, text: &str) -> u64 {
    text.bytes().fold(seed, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names() {
        for good in ["web", "web-0", "a.b", "x"] {
            validate_pod_name(good).unwrap();
        }
        for bad in ["", "-web", "web-", "Web", "a_b", ".a", &"x".repeat(64)] {
            assert!(validate_pod_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn program_names_are_file_names() {
        assert_eq!(
            program_name(OsStr::new("/a/b/weft-workload")),
            "weft-workload"
        );
        assert_eq!(program_name(OsStr::new("ip")), "ip");
    }
}
