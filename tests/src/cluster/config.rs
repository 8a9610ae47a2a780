//! The configuration files of a cluster node's daemons.
use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use super::{CNI_NETWORK, NodeSpec, SERVICE_CIDR};

/// containerd 1.6 for one node: its own root in the node's state directory, its socket and
/// state on the node's private `/run/containerd`, CNI from `/opt/cni/bin` (the node's own copy
/// of Debian's plugins, where a chained plugin can be installed too).
pub(super) fn containerd(root: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "k8s.gcr.io/pause:3.2"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#,
        root = root.display()
    )
}

/// The node's CNI network: Debian's bridge plugin with host-local addresses from the node's
/// pod network; the pods' default route goes through the bridge (the node), which routes
/// other nodes' pod networks over the inter-node link.
pub(super) fn cni(node: &NodeSpec) -> String {
    let (net, len) = node.pod_cidr;
    format!(
        r#"{{"cniVersion": "0.4.0", "name": "{CNI_NETWORK}", "plugins": [
  {{"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{net}/{len}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}]}}}}]}}
"#
    )
}

/// kubelet: the cgroupfs driver with the node's own cgroup root (every pod below it, so one
/// `cgroup.kill` ends them), webhook authentication and authorization against the API server,
/// eviction thresholds low enough for a shared machine.
pub(super) fn kubelet(node: &NodeSpec, cgroup_root: &str, ca: &Path) -> String {
    format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {ip}
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
protectKernelDefaults: false
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
clusterDomain: cluster.local
authentication: {{anonymous: {{enabled: false}}, webhook: {{enabled: true}}, x509: {{clientCAFile: {ca}}}}}
authorization: {{mode: Webhook}}
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
podPidsLimit: 4096
",
        ip = node.ip,
        ca = ca.display()
    )
}

/// A kubeconfig with client certificate credentials.
pub(super) fn kubeconfig(server: Ipv4Addr, ca: &Path, cert: &Path, key: &Path) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "apiVersion: v1
kind: Config
clusters:
- name: weft
  cluster: {{server: 'https://{server}:6443', certificate-authority: {ca}}}
users:
- name: admin
  user: {{client-certificate: {cert}, client-key: {key}}}
contexts:
- name: weft
  context: {{cluster: weft, user: admin}}
current-context: weft
",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display()
    );
    out
}

/// The first address of the service network: the `kubernetes` Service, which the API server's
/// certificate must name.
pub(super) fn api_service_ip() -> Ipv4Addr {
    let (net, _) = SERVICE_CIDR;
    Ipv4Addr::from(u32::from(net) + 1)
}
