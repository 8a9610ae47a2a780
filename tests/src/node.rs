//! A node: a network namespace with bridge `br0`, a cgroup the agent attaches to, and the
//! node's bpffs and state directories.
#![forbid(unsafe_code)]

use std::{
    ffi::OsStr, fs, net::Ipv4Addr, path::PathBuf, process::Command, sync::Arc, time::Duration,
};

use anyhow::{Context, Result, ensure};

use crate::{
    host,
    pod::{DEFAULT_NAMESPACE, Pod},
    process::{self, Finished, Proc},
    run::{HOST_CGROUP, Run},
    teardown,
};

/// The bridge every pod of a node is attached to.
pub const BRIDGE: &str = "br0";
/// The node's interface on the run's fabric (see [`Node::uplink_ip`]).
pub const UPLINK: &str = "uplink";
/// The bridge of the fabric netns that links the run's nodes.
const FABRIC_BRIDGE: &str = "fab0";

/// The netns that links a run's nodes; `_` keeps it apart from node names (DNS labels).
fn fabric_netns(prefix: &str) -> String {
    format!("{prefix}-_fabric")
}

/// The route, in a node, to node `index`'s pod network through its uplink.
fn route_to(index: u8) -> String {
    format!("route add 198.18.{index}.0/24 via 198.18.0.{index} dev {UPLINK}")
}

/// A handle onto one node of a [`crate::Testbed`]; clones refer to the same node.
#[derive(Clone)]
pub struct Node {
    pub(crate) run: Arc<Run>,
    name: String,
    index: u8,
    netns: String,
}

impl Node {
    pub(crate) fn create(run: &Arc<Run>, name: &str) -> Result<Self> {
        validate_dns_label("node", name)?;
        let _alive = run.guard_alive()?;
        let index = run.registry().add_node(name)?;
        let node = Self {
            run: Arc::clone(run),
            name: name.to_owned(),
            index,
            netns: format!("{}-{name}", run.prefix),
        };
        if let Err(error) = node.build() {
            node.remove_partial();
            return Err(error.context(format!("creating node {name}")));
        }
        Ok(node)
    }

    fn build(&self) -> Result<()> {
        host::netns_add(&self.netns)?;
        host::ip_batch(
            &self.netns,
            &[
                "link set lo up".to_owned(),
                // An address of its own, set explicitly (as the CNI bridge plugin does): a bridge
                // otherwise takes the lowest MAC of its ports, which changes as pods come and
                // go, and pods' cached neighbour entry for the node then points nowhere for
                // half a minute.
                format!(
                    "link add {BRIDGE} address 02:77:66:00:00:{:02x} type bridge",
                    self.index
                ),
                format!("addr add {}/24 dev {BRIDGE}", self.bridge_ip()),
                format!("link set {BRIDGE} up"),
            ],
        )?;
        for dir in [
            self.cgroup_path(),
            self.host_cgroup(),
            self.agent_cgroup(),
            self.run_dir(),
            self.bpffs_dir(),
        ] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        self.join_fabric()
    }

    /// Connects the node to the run's fabric: netns `<prefix>-_fabric` (made with the first node)
    /// holds bridge `fab0`; the node's `uplink` veth is `198.18.0.<N>/24` on it. Every node routes
    /// each other node's pod network through that node's uplink address and forwards (inside its
    /// own namespace only), so cross-node traffic really crosses the fabric. Pods route
    /// `198.18.0.0/16` (not a default route) via their node.
    fn join_fabric(&self) -> Result<()> {
        let _fabric = self.run.fabric_lock();
        let fabric = fabric_netns(&self.run.prefix);
        if !self.run.paths.netns_path(&fabric).exists() {
            host::netns_add(&fabric)?;
            host::ip_batch(
                &fabric,
                &[
                    "link set lo up".to_owned(),
                    format!("link add {FABRIC_BRIDGE} address 02:77:66:00:01:00 type bridge"),
                    format!("link set {FABRIC_BRIDGE} up"),
                ],
            )?;
        }
        let port = format!("n{}", self.index);
        host::ip_batch(
            &fabric,
            &[format!(
                "link add {port} type veth peer name {UPLINK} netns {}",
                self.netns
            )],
        )?;
        host::ip_batch(
            &fabric,
            &[
                format!("link set {port} master {FABRIC_BRIDGE}"),
                format!("link set {port} up"),
            ],
        )?;
        let others: Vec<(String, u8)> = self
            .run
            .registry()
            .nodes
            .iter()
            .filter(|(name, _)| **name != self.name)
            .map(|(name, entry)| (format!("{}-{name}", self.run.prefix), entry.index))
            .collect();
        let mut lines = vec![
            format!("addr add {}/24 dev {UPLINK}", self.uplink_ip()),
            format!("link set {UPLINK} up"),
        ];
        for (_, index) in &others {
            lines.push(route_to(*index));
        }
        host::ip_batch(&self.netns, &lines)?;
        host::sysctl_in(&self.netns, "net.ipv4.ip_forward", "1")?;
        for (netns, _) in &others {
            host::ip_batch(netns, &[route_to(self.index)])?;
        }
        Ok(())
    }

    /// The node as a Kubernetes `Node` object: its fabric address as `InternalIP` (where its
    /// agent's tunnel listens) and its pod network as `spec.podCIDR`.
    #[must_use]
    pub fn manifest(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\n\
             spec: {{podCIDR: 198.18.{}.0/24}}\n\
             status: {{addresses: [{{type: InternalIP, address: {}}}]}}\n",
            self.name,
            self.index,
            self.uplink_ip()
        )
    }

    /// The node's address on the fabric, `198.18.0.<N>`.
    #[must_use]
    pub fn uplink_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, self.index)
    }

    /// Undoes a failed [`Node::build`] (errors are logged: the run's teardown retries).
    fn remove_partial(&self) {
        let paths = &self.run.paths;
        let steps = [
            host::netns_del(paths, &self.netns),
            teardown::remove_cgroup_tree(&self.cgroup_path()),
            teardown::remove_cgroup_tree(&self.host_cgroup()),
            teardown::ignore_not_found(fs::remove_dir_all(self.run_dir())).map_err(Into::into),
            teardown::remove_bpffs_tree(&self.bpffs_dir()),
        ];
        for error in steps.into_iter().filter_map(Result::err) {
            eprintln!(
                "[testbed {}] cleaning up node {}: {error:#}",
                self.run.prefix, self.name
            );
        }
        self.run.registry().nodes.remove(&self.name);
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// N in `198.18.<N>.0/24`, counting the run's nodes from 1.
    #[must_use]
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The node's network namespace name (for `ip -n`), `<prefix>-<node>`.
    #[must_use]
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `/run/netns/<netns>`.
    #[must_use]
    pub fn netns_path(&self) -> PathBuf {
        self.run.paths.netns_path(&self.netns)
    }

    /// The address of `br0`, `198.18.<N>.1`: the pods' gateway-to-be and the node's own IP.
    #[must_use]
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.index, 1)
    }

    /// The node cgroup, `<cgroup2>/weft-<prefix>/<node>`: the agent attaches its programs here,
    /// and pod cgroups live below it.
    #[must_use]
    pub fn cgroup_path(&self) -> PathBuf {
        self.run.paths.run_cgroup(&self.run.prefix).join(&self.name)
    }

    /// cgroup of the node's own processes (see [`Node::command`]).
    fn host_cgroup(&self) -> PathBuf {
        self.run
            .paths
            .run_cgroup(&self.run.prefix)
            .join(HOST_CGROUP)
            .join(&self.name)
    }

    /// cgroup of the node's agent alone, `weft-<prefix>/_host/<node>/agent`: the agent attaches
    /// `sock_ops` here too (its L7 engine's sockets join the fast path), so nothing else may run in
    /// it.
    #[must_use]
    pub fn agent_cgroup(&self) -> PathBuf {
        self.host_cgroup().join("agent")
    }

    /// The L7 engine's listener: the node address, port 15001.
    #[must_use]
    pub fn engine_addr(&self) -> std::net::SocketAddrV4 {
        std::net::SocketAddrV4::new(self.bridge_ip(), 15001)
    }

    /// Starts the agent binary with `args` in the node's netns and [`Node::agent_cgroup`].
    pub fn spawn_agent<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let _alive = self.run.guard_alive()?;
        let label = format!("{}: agent", self.name);
        let mut command = process::command_in(program, &self.netns_path(), &self.agent_cgroup())?;
        Proc::spawn(label, command.args(args))
    }

    /// `/sys/fs/bpf/weft-<prefix>/<node>`, for the agent's pins.
    #[must_use]
    pub fn bpffs_dir(&self) -> PathBuf {
        self.run.paths.run_bpffs(&self.run.prefix).join(&self.name)
    }

    /// `/run/weft-testbed/<prefix>/<node>`, for the agent's sockets and config.
    #[must_use]
    pub fn run_dir(&self) -> PathBuf {
        self.run.state_dir().join(&self.name)
    }

    /// Creates pod `name` in namespace `default` on this node.
    pub fn pod(&self, name: &str) -> Result<Pod> {
        self.pod_in(DEFAULT_NAMESPACE, name)
    }

    /// Creates pod `name` in Kubernetes namespace `namespace` on this node (see [`Pod`]).
    pub fn pod_in(&self, namespace: &str, name: &str) -> Result<Pod> {
        Pod::create(self, namespace, name)
    }

    /// A command that runs `program` in the node's network namespace, like the agent.
    ///
    /// It is not in the node cgroup (the node's eBPF programs must not see the agent's own
    /// sockets) but in `weft-<prefix>/_host/<node>`, a sibling of the node cgroups, so that
    /// teardown and the sweep of a crashed run find and kill it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let _alive = self.run.guard_alive()?;
        process::command_in(program, &self.netns_path(), &self.host_cgroup())
    }

    /// Starts `program` with `args` in the node (see [`Node::command`]).
    pub fn spawn<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Proc>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let label = format!(
            "{}: {}",
            self.name,
            crate::pod::program_name(program.as_ref())
        );
        Proc::spawn(label, self.command(program)?.args(args))
    }

    /// Runs `program` with `args` in the node to completion (killed after `timeout`).
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

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("index", &self.index)
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

/// Kubernetes DNS-1123 label: what node names and namespaces may be, and what keeps them safe
/// in netns, cgroup and file names.
pub(crate) fn validate_dns_label(what: &str, name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-'),
        "{what} name {name:?} is not a DNS label (lowercase letters, digits and '-', at most 63)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for good in ["a", "node-1", "0", &"x".repeat(63)] {
            validate_dns_label("node", good).unwrap();
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "_host", &"x".repeat(64)] {
            assert!(validate_dns_label("node", bad).is_err(), "{bad}");
        }
    }
}
