//! A real Kubernetes 1.20 cluster of two nodes on this machine: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler on the first node; containerd + runc, kubelet,
//! the standard CNI plugins (bridge, host-local, loopback) and kube-proxy on each. Used by
//! `cargo xtask cluster up|down|status` and by the end-to-end test, the same code for both.
//!
//! Isolation (DEVELOPERS.md): each node is a network namespace and a mount namespace of its own,
//! held by a `sleep` that `unshare` started; every process of the cluster runs in them and in the
//! cluster's cgroup (`<cgroup v2>/weft-cluster-<name>`, and the same path in every cgroup v1
//! hierarchy: kubelet's `cgroupRoot` is `/weft-cluster-<name>/<node>`), so one `cgroup.kill`
//! ends everything, containers included. Inside a node's mount namespace the directories the
//! daemons write (`/run`, `/var/lib/kubelet`, `/etc/cni/net.d`, `/opt/cni/bin`, `/var/lib/cni`,
//! `/var/log/pods`, …) are tmpfs or binds of the node's
//! state directory, `/sys/fs/bpf` is a fresh bpffs, and the few sysctl files kubelet would
//! write host-wide are bound to private copies. The host's network, mounts and cgroups are not
//! touched; the only host changes are empty mount-point directories that did not exist (listed
//! in the state directory and removed by `down`).
//!
//! Addresses come from 198.18.0.0/15: nodes 198.18.200.N on a veth link between the nodes (the
//! link a test captures), pods 198.18.20N.0/24 per node, Services 198.19.200.0/24. Each node's
//! default route points into a dead end (a veth whose other end does not forward): nothing leaves
//! the cluster's namespaces.
mod config;
pub mod pki;

use std::{
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::process::command_in_node;

/// The cluster `cargo xtask cluster` and the end-to-end test use.
pub const DEFAULT_NAME: &str = "e2e";
/// Per-cluster state directories live below this.
const STATE_ROOT: &str = "/var/lib/weft-cluster";
/// The CNI network's name.
const CNI_NETWORK: &str = "weft-cluster";
/// The Service network.
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 19, 200, 0), 24);
/// Covers every node's pod network (kube-proxy's `--cluster-cidr`).
pub const CLUSTER_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 192, 0), 18);
/// The inter-node link's name in every node.
pub const LINK: &str = "link0";
/// The dead-end device of each node's default route.
const DEAD_END: &str = "deadend0";
/// cgroup v2 mount points, hybrid hosts first.
const CGROUP2_CANDIDATES: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];
/// Host directories a node mounts over (created if missing, then removed by `down`).
const MOUNT_POINTS: [&str; 7] = [
    "/var/lib/cni",
    "/var/lib/kubelet",
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/weft",
];
/// Host-wide sysctls kubelet sets: a node binds private files with the values it wants over them.
const KUBELET_SYSCTLS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// One node of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeSpec {
    /// The Kubernetes node name (`weft-n1`, …).
    pub name: String,
    /// Its address on the inter-node link (the kubelet's `--node-ip`).
    pub ip: Ipv4Addr,
    /// Its pod network (bridge + host-local; set as the Node's `spec.podCIDR`).
    pub pod_cidr: (Ipv4Addr, u8),
}

/// What `up` needs from outside: the binaries (built by `cargo xtask`, cached), the image
/// archives to import on every node, and whether kube-proxy runs.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    pub nodes: usize,
    /// kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, etcd.
    pub k8s_bin: PathBuf,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    /// OCI/docker archives imported into every node's containerd (`k8s.io` namespace).
    pub images: Vec<PathBuf>,
    pub kube_proxy: bool,
}

/// A running cluster: what `up` recorded in its state directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cluster {
    pub name: String,
    pub state: PathBuf,
    pub nodes: Vec<NodeSpec>,
    /// The `sleep` holding each node's namespaces.
    pub holders: Vec<u32>,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    pub kube_proxy: bool,
    /// cgroup v2 directory of the whole cluster.
    pub cgroup: PathBuf,
}

fn state_dir(name: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(name)
}

fn cgroup_name(name: &str) -> String {
    format!("weft-cluster-{name}")
}

fn cgroup2_root() -> Result<PathBuf> {
    CGROUP2_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| {
            nix::sys::statfs::statfs(p)
                .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        })
        .context("cgroup v2 is not mounted (at /sys/fs/cgroup/unified or /sys/fs/cgroup)")
}

/// cgroup v1 hierarchies (none on a pure cgroup v2 host).
fn cgroup1_hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.join("cgroup.procs").is_file()
                && nix::sys::statfs::statfs(p.as_path())
                    .is_ok_and(|s| s.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        })
        .collect();
    out.sort();
    out
}

/// The node specs of a cluster of `n` nodes.
#[must_use]
pub fn node_specs(n: usize) -> Vec<NodeSpec> {
    (1..=n)
        .map(|i| {
            let i = u8::try_from(i).unwrap_or(u8::MAX);
            NodeSpec {
                name: format!("weft-n{i}"),
                ip: Ipv4Addr::new(198, 18, 200, i),
                pod_cidr: (Ipv4Addr::new(198, 18, 200 + i, 0), 24),
            }
        })
        .collect()
}

/// Like [`crate::eventually`], at a pace fit for spawning `kubectl` (a process each time).
fn eventually<T>(timeout: Duration, mut attempt: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        match attempt() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= timeout => {
                return Err(e.context(format!("still failing after {timeout:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

fn run_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

impl Cluster {
    /// The cluster `name` as `up` left it (for `status`, `kubectl`, and the end-to-end test).
    pub fn attach(name: &str) -> Result<Self> {
        let path = state_dir(name).join("cluster.json");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("no cluster {name} is up ({} missing)", path.display()))?;
        let cluster: Self = serde_json::from_str(&text)?;
        for (node, pid) in cluster.nodes.iter().zip(&cluster.holders) {
            ensure!(
                Path::new(&format!("/proc/{pid}")).exists(),
                "cluster {name}: node {} is gone (its namespace holder {pid} died); run down",
                node.name
            );
        }
        Ok(cluster)
    }

    /// The admin kubeconfig (valid inside the nodes' namespaces).
    #[must_use]
    pub fn kubeconfig(&self) -> PathBuf {
        self.state.join("pki/admin.kubeconfig")
    }

    /// A command run inside node `index`'s network and mount namespaces (not in its cgroup:
    /// short-lived tools, killed by their own timeout).
    pub fn node_command(&self, index: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.holders[index].to_string())
            .args(["-n", "-m", "--"])
            .arg(program);
        cmd
    }

    /// Runs `program args` in node `index` and returns its output; fails on a non-zero exit.
    pub fn node_run<I, S>(&self, index: usize, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        run_ok(self.node_command(index, program).args(args))
    }

    /// `kubectl` against the cluster (run in the first node).
    pub fn kubectl<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let out = run_ok(
            self.node_command(0, &self.kubectl)
                .arg("--kubeconfig")
                .arg(self.kubeconfig())
                .args(args),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        use std::io::Write as _;
        let mut child = self
            .node_command(0, &self.kubectl)
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// `helm` against the cluster (run in the first node).
    pub fn helm<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let out = run_ok(
            self.node_command(0, &self.helm)
                .arg("--kubeconfig")
                .arg(self.kubeconfig())
                .env("HELM_CACHE_HOME", self.state.join("helm/cache"))
                .env("HELM_CONFIG_HOME", self.state.join("helm/config"))
                .env("HELM_DATA_HOME", self.state.join("helm/data"))
                .args(args),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports an image archive into every node's containerd (namespace `k8s.io`).
    pub fn import_image(&self, archive: &Path) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.node_run(
                i,
                "ctr",
                [
                    "--address".as_ref(),
                    "/run/containerd/containerd.sock".as_ref(),
                    "-n".as_ref(),
                    "k8s.io".as_ref(),
                    "images".as_ref(),
                    "import".as_ref(),
                    archive.as_os_str(),
                ],
            )
            .with_context(|| {
                format!("importing {} on {}", archive.display(), self.nodes[i].name)
            })?;
        }
        Ok(())
    }

    /// One line per node: name, Ready, pods.
    pub fn status(&self) -> Result<String> {
        let nodes = self.kubectl(["get", "nodes", "-o", "wide"])?;
        let pods = self.kubectl(["get", "pods", "-A", "-o", "wide"])?;
        Ok(format!("{nodes}\n{pods}"))
    }

    /// The cgroup v2 directory kubelet puts node `index`'s pods in.
    #[must_use]
    pub fn kubepods(&self, index: usize) -> PathBuf {
        self.cgroup.join(&self.nodes[index].name).join("kubepods")
    }
}

/// Brings a cluster up (first removing what a previous one of the same name left).
#[allow(clippy::too_many_lines, reason = "one linear bring-up script")]
pub fn up(opts: &UpOptions) -> Result<Cluster> {
    preflight(opts)?;
    down(&opts.name)?;
    let started = Instant::now();
    let state = state_dir(&opts.name);
    fs::create_dir_all(state.join("log"))?;
    let nodes = node_specs(opts.nodes);
    let api = nodes[0].ip;
    let pki = pki::make(&state.join("pki"), &[api, config::api_service_ip()])?;
    let kubeconfig = state.join("pki/admin.kubeconfig");
    fs::write(
        &kubeconfig,
        config::kubeconfig(api, &pki.ca_cert, &pki.admin_cert, &pki.admin_key),
    )?;

    // cgroups: the cluster's in every hierarchy, each node's (kubelet's cgroupRoot) below it.
    let cg_name = cgroup_name(&opts.name);
    let cgroup = cgroup2_root()?.join(&cg_name);
    for node in &nodes {
        fs::create_dir_all(cgroup.join(&node.name))?;
        fs::create_dir_all(cgroup.join(format!("{}-daemons", node.name)))?;
        for h in cgroup1_hierarchies() {
            for dir in [h.join(&cg_name), h.join(&cg_name).join(&node.name)] {
                fs::create_dir_all(&dir)?;
                let parent = dir.parent().unwrap_or(&h).to_owned();
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    if let Ok(v) = fs::read_to_string(parent.join(f)) {
                        fs::write(dir.join(f), v.trim())
                            .with_context(|| format!("writing {}", dir.join(f).display()))?;
                    }
                }
            }
        }
    }

    // Mount points on the host, remembered so that `down` removes what it created.
    // Every directory made, deepest first (the order `down` removes them in).
    let mut created = Vec::new();
    for dir in MOUNT_POINTS {
        let missing: Vec<&Path> = Path::new(dir)
            .ancestors()
            .take_while(|a| !a.exists())
            .collect();
        fs::create_dir_all(dir)?;
        created.extend(missing.iter().map(|d| d.display().to_string()));
    }
    fs::write(state.join("created-dirs"), created.join("\n"))?;
    let sysctl_dir = state.join("sysctl");
    fs::create_dir_all(&sysctl_dir)?;
    for (path, value) in KUBELET_SYSCTLS {
        fs::write(sysctl_dir.join(path.replace('/', "_")), value)?;
    }

    // One namespace holder per node.
    let mut holders = Vec::new();
    for node in &nodes {
        let daemons = cgroup.join(format!("{}-daemons", node.name));
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec unshare --net --mount --propagation private sleep infinity",
                daemons.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting a node's namespace holder (unshare)")?;
        let pid = child.id();
        // Reaped by init once this process exits; kill happens through the cgroup.
        std::mem::forget(child);
        let own = fs::read_link("/proc/self/ns/net")?;
        eventually(Duration::from_secs(5), || {
            let theirs = fs::read_link(format!("/proc/{pid}/ns/net"))?;
            ensure!(theirs != own, "holder {pid} has not unshared yet");
            Ok(())
        })?;
        holders.push(pid);
    }
    let cluster = Cluster {
        name: opts.name.clone(),
        state: state.clone(),
        nodes: nodes.clone(),
        holders,
        kubectl: opts.kubectl.clone(),
        helm: opts.helm.clone(),
        kube_proxy: opts.kube_proxy,
        cgroup: cgroup.clone(),
    };
    fs::write(
        state.join("cluster.json"),
        serde_json::to_string_pretty(&cluster)?,
    )?;

    for (i, node) in nodes.iter().enumerate() {
        prepare_node(&cluster, i, node, &state, &sysctl_dir)?;
    }
    link_nodes(&cluster)?;

    let bin = |b: &str| opts.k8s_bin.join(b);
    let first = &cluster;
    // Control plane on the first node.
    spawn_daemon(
        first,
        0,
        "etcd",
        &bin("etcd"),
        &[
            "--name=weft".into(),
            format!("--data-dir={}", state.join("etcd").display()),
            "--listen-client-urls=http://127.0.0.1:2379".into(),
            "--advertise-client-urls=http://127.0.0.1:2379".into(),
            "--listen-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
            "--initial-cluster=weft=http://127.0.0.1:2380".into(),
            "--quota-backend-bytes=1073741824".into(),
            "--log-level=warn".into(),
        ],
    )?;
    for (i, node) in nodes.iter().enumerate() {
        let root = state.join(&node.name).join("containerd");
        fs::create_dir_all(&root)?;
        let conf = state.join(&node.name).join("containerd.toml");
        fs::write(&conf, config::containerd(&root))?;
        spawn_daemon(
            first,
            i,
            "containerd",
            Path::new("containerd"),
            &["--config".into(), conf.display().to_string()],
        )?;
    }
    let (svc_net, svc_len) = SERVICE_CIDR;
    let p = |path: &Path| path.display().to_string();
    spawn_daemon(
        first,
        0,
        "kube-apiserver",
        &bin("kube-apiserver"),
        &[
            "--etcd-servers=http://127.0.0.1:2379".into(),
            "--bind-address=0.0.0.0".into(),
            "--secure-port=6443".into(),
            "--insecure-port=0".into(),
            format!("--advertise-address={api}"),
            format!("--client-ca-file={}", p(&pki.ca_cert)),
            format!("--tls-cert-file={}", p(&pki.apiserver_cert)),
            format!("--tls-private-key-file={}", p(&pki.apiserver_key)),
            format!("--kubelet-client-certificate={}", p(&pki.admin_cert)),
            format!("--kubelet-client-key={}", p(&pki.admin_key)),
            format!("--service-account-key-file={}", p(&pki.sa_pub)),
            format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-cluster-ip-range={svc_net}/{svc_len}"),
            "--authorization-mode=Node,RBAC".into(),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            "--event-ttl=10m".into(),
            "--kubelet-preferred-address-types=InternalIP".into(),
        ],
    )?;
    for (i, node) in nodes.iter().enumerate() {
        eventually(Duration::from_mins(1), || {
            cluster
                .node_run(
                    i,
                    "ctr",
                    ["--address", "/run/containerd/containerd.sock", "version"],
                )
                .map(drop)
        })
        .with_context(|| format!("containerd on {}", node.name))?;
    }
    for image in &opts.images {
        cluster.import_image(image)?;
    }
    eventually(Duration::from_mins(2), || {
        let out = cluster.kubectl(["get", "--raw", "/readyz"])?;
        ensure!(out.trim() == "ok", "readyz: {out}");
        Ok(())
    })
    .with_context(|| {
        format!(
            "kube-apiserver; its log: {}",
            log_tail(&cluster, 0, "kube-apiserver")
        )
    })?;
    let api_ready = started.elapsed();
    let kc = p(&kubeconfig);
    spawn_daemon(
        first,
        0,
        "kube-controller-manager",
        &bin("kube-controller-manager"),
        &[
            format!("--kubeconfig={kc}"),
            format!("--service-account-private-key-file={}", p(&pki.sa_key)),
            format!("--root-ca-file={}", p(&pki.ca_cert)),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--bind-address=127.0.0.1".into(),
            "--controllers=*,-nodeipam,-cloud-node-lifecycle".into(),
        ],
    )?;
    spawn_daemon(
        first,
        0,
        "kube-scheduler",
        &bin("kube-scheduler"),
        &[
            format!("--kubeconfig={kc}"),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--bind-address=127.0.0.1".into(),
        ],
    )?;
    for (i, node) in nodes.iter().enumerate() {
        let conf = state.join(&node.name).join("kubelet.yaml");
        let root = format!("/{cg_name}/{}", node.name);
        fs::write(&conf, config::kubelet(node, &root, &pki.ca_cert))?;
        spawn_daemon(
            first,
            i,
            "kubelet",
            &bin("kubelet"),
            &[
                format!("--config={}", p(&conf)),
                format!("--kubeconfig={kc}"),
                "--container-runtime=remote".into(),
                "--container-runtime-endpoint=unix:///run/containerd/containerd.sock".into(),
                format!("--node-ip={}", node.ip),
                format!("--hostname-override={}", node.name),
                "--pod-infra-container-image=k8s.gcr.io/pause:3.2".into(),
                format!("--root-dir={}", "/var/lib/kubelet"),
                "--v=1".into(),
            ],
        )?;
        if opts.kube_proxy {
            let (cnet, clen) = CLUSTER_CIDR;
            spawn_daemon(
                first,
                i,
                "kube-proxy",
                &bin("kube-proxy"),
                &[
                    format!("--kubeconfig={kc}"),
                    format!("--hostname-override={}", node.name),
                    format!("--cluster-cidr={cnet}/{clen}"),
                    "--proxy-mode=iptables".into(),
                    // Zeros: kube-proxy leaves the host-global conntrack sysctls alone.
                    "--conntrack-max-per-core=0".into(),
                    "--conntrack-min=0".into(),
                    "--conntrack-tcp-timeout-established=0".into(),
                    "--conntrack-tcp-timeout-close-wait=0".into(),
                    "--metrics-bind-address=127.0.0.1:10249".into(),
                    "--healthz-bind-address=127.0.0.1:10256".into(),
                    "--oom-score-adj=0".into(),
                ],
            )?;
        }
    }
    // Node objects: give each its pod network (what nodeipam would do), then wait for Ready.
    for node in &nodes {
        let (net, len) = node.pod_cidr;
        eventually(Duration::from_mins(1), || {
            cluster.kubectl(["get", "node", &node.name]).map(drop)
        })
        .with_context(|| {
            format!(
                "{} never registered; kubelet log: {}",
                node.name,
                log_tail(
                    &cluster,
                    nodes.iter().position(|n| n.name == node.name).unwrap_or(0),
                    "kubelet"
                )
            )
        })?;
        cluster.kubectl([
            "patch",
            "node",
            &node.name,
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{{"podCIDR":"{net}/{len}","podCIDRs":["{net}/{len}"]}}}}"#),
        ])?;
    }
    for (i, node) in nodes.iter().enumerate() {
        eventually(Duration::from_mins(3), || {
            let ready = cluster.kubectl([
                "get",
                "node",
                &node.name,
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
            ])?;
            ensure!(ready.trim() == "True", "{} Ready={ready}", node.name);
            Ok(())
        })
        .with_context(|| {
            format!(
                "{}; kubelet log: {}",
                node.name,
                log_tail(&cluster, i, "kubelet")
            )
        })?;
    }
    eventually(Duration::from_mins(1), || {
        cluster
            .kubectl(["get", "serviceaccount", "default"])
            .map(drop)
    })?;
    fs::write(
        state.join("timings"),
        format!(
            "api_ready_secs {:.1}\nnodes_ready_secs {:.1}\n",
            api_ready.as_secs_f64(),
            started.elapsed().as_secs_f64()
        ),
    )?;
    Ok(cluster)
}

fn preflight(opts: &UpOptions) -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "a cluster needs root (namespaces, cgroups, mounts)"
    );
    let cg2 = cgroup2_root()?;
    ensure!(
        cg2.join("cgroup.kill").exists() || fs::read_dir(&cg2).is_ok(),
        "cgroup v2 at {} lacks cgroup.kill (kernel ≥ 5.14 needed)",
        cg2.display()
    );
    for b in [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kubelet",
        "kube-proxy",
        "etcd",
    ] {
        ensure!(
            opts.k8s_bin.join(b).exists(),
            "{} missing: run `cargo xtask cluster up` (it builds the binaries)",
            opts.k8s_bin.join(b).display()
        );
    }
    for tool in [
        "containerd",
        "runc",
        "ctr",
        "nsenter",
        "unshare",
        "openssl",
        "ip",
    ] {
        ensure!(
            which(tool),
            "{tool} is not installed (cargo xtask cluster up installs the Debian packages)"
        );
    }
    if opts.kube_proxy {
        ensure!(
            which("iptables"),
            "kube-proxy needs iptables (Debian package iptables)"
        );
    }
    ensure!(
        Path::new("/usr/lib/cni/bridge").exists(),
        "the CNI plugins are missing (Debian package containernetworking-plugins)"
    );
    Ok(())
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
}

/// Mounts, sysctl binds, loopback and the dead-end default route of one node.
fn prepare_node(
    cluster: &Cluster,
    index: usize,
    node: &NodeSpec,
    state: &Path,
    sysctl_dir: &Path,
) -> Result<()> {
    let dir = state.join(&node.name);
    for sub in ["kubelet", "cni-conf", "cni-bin", "weft-state"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    fs::write(
        dir.join("cni-conf/10-weft-cluster.conflist"),
        config::cni(node),
    )?;
    for plugin in ["bridge", "host-local", "loopback"] {
        fs::copy(
            Path::new("/usr/lib/cni").join(plugin),
            dir.join("cni-bin").join(plugin),
        )
        .with_context(|| format!("copying the CNI plugin {plugin}"))?;
    }
    let mut script = String::from("set -eu\n");
    // A private /run (containerd's socket and state, netns files, the agent's socket, iptables'
    // lock): each node has its own, and nothing of it reaches the host.
    script
        .push_str("mount -t tmpfs -o mode=0755 tmpfs /run\nmkdir -p /run/containerd /run/netns\n");
    for tmpfs in ["/var/lib/cni", "/var/log/pods", "/var/log/containers"] {
        let _ = writeln!(script, "mount -t tmpfs -o mode=0755 tmpfs {tmpfs}");
    }
    for (from, to) in [
        ("kubelet", "/var/lib/kubelet"),
        ("cni-conf", "/etc/cni/net.d"),
        ("cni-bin", "/opt/cni/bin"),
        ("weft-state", "/var/lib/weft"),
    ] {
        let _ = writeln!(script, "mount --bind {} {to}", dir.join(from).display());
    }
    script.push_str("mount -t bpf bpf /sys/fs/bpf\n");
    for (path, _) in KUBELET_SYSCTLS {
        let _ = writeln!(
            script,
            "mount --bind {} /proc/sys/{path}",
            sysctl_dir.join(path.replace('/', "_")).display()
        );
    }
    let _ = write!(
        script,
        "ip link set lo up\n\
         ip link add name {DEAD_END} type veth peer name {DEAD_END}p\n\
         ip link set {DEAD_END}p up\n\
         ip link set {DEAD_END} up\n\
         sysctl -qw net.ipv4.conf.{DEAD_END}p.forwarding=0\n\
         ip route add default dev {DEAD_END}\n"
    );
    cluster
        .node_run(index, "sh", ["-c", &script])
        .with_context(|| format!("preparing node {}", node.name))?;
    Ok(())
}

/// The veth link between the nodes (one link: two nodes), and each node's route to the
/// other's pod network.
fn link_nodes(cluster: &Cluster) -> Result<()> {
    ensure!(
        cluster.nodes.len() <= 2,
        "the link between nodes is one veth pair: at most two nodes"
    );
    let [a, b] = cluster.nodes.as_slice() else {
        return Ok(());
    };
    let other = cluster.holders[1];
    cluster.node_run(
        0,
        "sh",
        [
            "-c",
            &format!(
                "set -eu\nip link add name {LINK} type veth peer name {LINK}-b\n\
                 ip link set {LINK}-b netns /proc/{other}/ns/net\n\
                 ip addr add {}/24 dev {LINK}\nip link set {LINK} up\n",
                a.ip
            ),
        ],
    )?;
    cluster.node_run(
        1,
        "sh",
        [
            "-c",
            &format!(
                "set -eu\nip link set {LINK}-b name {LINK}\n\
                 ip addr add {}/24 dev {LINK}\nip link set {LINK} up\n",
                b.ip
            ),
        ],
    )?;
    for (i, (me, peer)) in [(a, b), (b, a)].into_iter().enumerate() {
        let (net, len) = peer.pod_cidr;
        cluster.node_run(
            i,
            "sh",
            [
                "-c",
                &format!(
                    "set -eu\nsysctl -qw net.ipv4.ip_forward=1\n\
                     ip route add {net}/{len} via {} dev {LINK}\n",
                    peer.ip
                ),
            ],
        )?;
        let _ = me;
    }
    Ok(())
}

/// Starts a daemon in node `index`'s namespaces and the node's daemon cgroup; its output goes
/// to `<state>/log/<node>-<name>.log`.
fn spawn_daemon(
    cluster: &Cluster,
    index: usize,
    name: &str,
    program: &Path,
    args: &[String],
) -> Result<()> {
    let node = &cluster.nodes[index];
    let log = cluster
        .state
        .join("log")
        .join(format!("{}-{name}.log", node.name));
    let out = fs::File::create(&log)?;
    let cgroup = cluster.cgroup.join(format!("{}-daemons", node.name));
    let mut cmd = command_in_node(program, cluster.holders[index], &cgroup)?;
    cmd.args(args)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {name} on {}", node.name))?;
    // It outlives this process on purpose (`cargo xtask cluster up`); `down` ends it through
    // the cluster's cgroup.
    std::mem::forget(child);
    Ok(())
}

/// The last lines of a daemon's log.
#[must_use]
pub fn log_tail(cluster: &Cluster, index: usize, name: &str) -> String {
    let path = cluster
        .state
        .join("log")
        .join(format!("{}-{name}.log", cluster.nodes[index].name));
    let text = fs::read_to_string(&path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(12).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Removes cluster `name` and everything it left: every process (one `cgroup.kill`), the
/// cgroups in every hierarchy, the mount points it created, its state. Idempotent; also cleans
/// up after a crash (namespaces and mounts die with their last process).
pub fn down(name: &str) -> Result<()> {
    let cg_name = cgroup_name(name);
    let cgroup = cgroup2_root()?.join(&cg_name);
    if cgroup.exists() {
        let kill = cgroup.join("cgroup.kill");
        if kill.exists() {
            fs::write(&kill, "1").with_context(|| format!("writing {}", kill.display()))?;
        }
        eventually(Duration::from_secs(20), || {
            let left = procs_below(&cgroup);
            ensure!(
                left.is_empty(),
                "processes left in {}: {left:?}",
                cgroup.display()
            );
            Ok(())
        })?;
    }
    for h in cgroup1_hierarchies().into_iter().chain([cgroup2_root()?]) {
        let dir = h.join(&cg_name);
        if dir.exists() {
            remove_cgroup_tree(&dir)?;
        }
    }
    let state = state_dir(name);
    if let Ok(created) = fs::read_to_string(state.join("created-dirs")) {
        for dir in created.lines().filter(|l| !l.is_empty()) {
            let _ = fs::remove_dir(dir);
        }
    }
    if state.exists() {
        fs::remove_dir_all(&state).with_context(|| format!("removing {}", state.display()))?;
    }
    let _ = fs::remove_dir(STATE_ROOT);
    Ok(())
}

fn procs_below(dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(procs_below(&e.path()));
            }
        }
    }
    pids
}

/// Removes a cgroup directory tree depth first (cgroup directories are removed with rmdir).
fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    let mut last = None;
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    bail!(
        "cannot remove cgroup {}: {}",
        dir.display(),
        last.map(|e| e.to_string()).unwrap_or_default()
    )
}
