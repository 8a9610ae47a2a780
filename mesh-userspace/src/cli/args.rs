//! The command line: every command and flag (clap), and their conversion into the typed
//! configurations the rest of Weft takes.
use std::{
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Parser, Subcommand};

use crate::config::AgentConfig;

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "Weft: an eBPF-accelerated, sidecar-free service mesh"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Clone)]
pub struct NodeArgs {
    /// Node name (pods with this spec.nodeName belong to this agent).
    #[arg(long, default_value = "local")]
    pub node: String,
    /// Admin socket; default /run/weft/<node>/admin.sock.
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
}

/// Which live events to show (every option given must match).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TapFilterArgs {
    /// Either end (or the service) is in this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Either end is this pod (`namespace/name`, or `name`).
    #[arg(long)]
    pub pod: Option<String>,
    /// To this service (`namespace/name`, or `name`).
    #[arg(long)]
    pub service: Option<String>,
    /// Only flows with this verdict (requests count as L7).
    #[arg(long, value_parser = ["FAST", "L7", "PASS", "DENY", "AUDIT"], ignore_case = true)]
    pub verdict: Option<String>,
    /// Only requests answered with this status: a code (503) or a class (5xx).
    #[arg(long)]
    pub status: Option<String>,
    /// Only events of this type.
    #[arg(long = "type", value_parser = ["open", "close", "deny", "shed", "request"])]
    pub kind: Option<String>,
}

impl TapFilterArgs {
    #[must_use]
    pub fn filter(self) -> crate::tap::Filter {
        crate::tap::Filter {
            namespace: self.namespace,
            pod: self.pod,
            service: self.service,
            verdict: self.verdict.map(|v| v.to_uppercase()),
            status: self.status,
            kind: self.kind,
        }
    }
}

/// How a command prints what it shows.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Output {
    /// Tables and lines for people.
    Text,
    /// JSON for programs (the admin API's document, pretty-printed).
    Json,
}

/// `-o/--output text|json`, and `--json` for short.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct OutputArgs {
    /// How to print: text for people, JSON for programs.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// The same as `--output json`.
    #[arg(long, conflicts_with = "output")]
    json: bool,
}

impl OutputArgs {
    #[must_use]
    pub fn json(self) -> bool {
        self.json || self.output == Output::Json
    }
}

impl NodeArgs {
    /// The admin socket to talk to.
    #[must_use]
    pub fn socket(&self) -> PathBuf {
        self.admin_socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/run/weft/{}/admin.sock", self.node)))
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the node agent: load or adopt the datapath, sync it with the objects, serve the admin API.
    Agent(Box<AgentArgs>),
    /// The built-in CA's files.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// A signing key and tokens, for trying JWT request authentication without an identity provider.
    Jwt {
        #[command(subcommand)]
        command: JwtCommand,
    },
    /// Show the node's flows: verdict, bytes each way, fast path or not, and why.
    Flows {
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        output: OutputArgs,
        /// Only flows from or to this workload (`namespace/name`, or `name`).
        #[arg(long)]
        workload: Option<String>,
        /// Only flows with this verdict.
        #[arg(long, value_parser = ["FAST", "DENY", "PASS", "L7"], ignore_case = true)]
        verdict: Option<String>,
    },
    /// Watch the node's traffic live: each connection opened (with the kernel's verdict and
    /// why), closed (bytes each way, how many went socket to socket, how long), refused or moved
    /// off the fast path, and each request the L7 engine answered. Like `hubble observe` and
    /// `linkerd viz tap`; runs until Ctrl-C, `--count` or `--duration`.
    Tap {
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        filter: TapFilterArgs,
        /// Text lines for people, or JSON lines (one event per line) for programs.
        #[command(flatten)]
        output: OutputArgs,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// A live table per destination workload over the last seconds: requests/s, success rate,
    /// p50/p99 latency, connections, bytes, fast-path share, refused connects (q quits). With
    /// `--once`, `--output json` or stdout not a terminal: one table after the window.
    Top {
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        filter: TapFilterArgs,
        #[command(flatten)]
        output: OutputArgs,
        /// The window the rates and percentiles cover, in seconds.
        #[arg(long, default_value_t = 10)]
        window: u64,
        /// Print one table after the window and exit.
        #[arg(long)]
        once: bool,
    },
    /// Open the agent's web page (the service graph, its flows and policies) on this host:
    /// serves it on a local TCP address, forwarded to the agent's admin socket, until Ctrl-C.
    /// The first line printed is the page's address.
    Ui {
        #[command(flatten)]
        node: NodeArgs,
        /// Where to listen (port 0: any free port). A non-loopback address shows the node's
        /// traffic to whoever reaches it.
        #[arg(long, default_value = "127.0.0.1:15500")]
        listen: std::net::SocketAddr,
    },
    /// Check objects in files (or directories, or `-` for stdin) offline, as the controller
    /// and the agent would judge them: the same verdicts and messages. Exit status 1 when an
    /// object would not be accepted or a document is not understood.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// What the mesh does with a connection from a pod to a service or pod, now: the verdict
    /// the kernel gives at connect and the rule that decides it, the path (socket fast path,
    /// kernel TCP, L7 engine, tunnel), the routes and policies the engine applies, and mTLS.
    Explain {
        #[command(flatten)]
        node: NodeArgs,
        /// The client pod, `namespace/name`.
        source: String,
        /// `namespace/service[:port]`, `service.namespace[:port]`, `namespace/pod:port` or
        /// `ip:port`.
        destination: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show the agent's state.
    Status {
        #[command(flatten)]
        node: NodeArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Run the control plane: validate Weft's objects on the API server and write their status
    /// conditions (two replicas elect a leader with a Lease).
    Controller {
        /// The kubeconfig; default: in-cluster, then $KUBECONFIG or ~/.kube/config.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Namespace of the leader-election Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
        namespace: String,
        /// This replica's name in the Lease; default: the host name and process id.
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// A leader that has not renewed the Lease for this long is replaced.
        #[arg(long, default_value_t = 15)]
        lease_duration_secs: u64,
        /// Run the certificate service with this CA (PEM chain; see `weft ca`): agents started
        /// with --ca-addr get their workloads' certificates from it and never hold the CA key.
        /// Every replica serves it (no leader needed).
        #[arg(long, requires = "ca_key")]
        ca_cert: Option<PathBuf>,
        #[arg(long, requires = "ca_cert")]
        ca_key: Option<PathBuf>,
        /// Where the certificate service listens.
        #[arg(long, default_value = "0.0.0.0:15012")]
        ca_listen: std::net::SocketAddr,
        /// The certificate service's own SPIFFE ID (agents check it).
        #[arg(
            long,
            default_value = "spiffe://cluster.local/ns/weft-system/sa/weft-controller"
        )]
        ca_server_id: String,
        /// The Kubernetes user (from `TokenReview`) whose tokens may request certificates: the
        /// agents' service account.
        #[arg(long, default_value = "system:serviceaccount:weft-system:weft-agent")]
        agent_user: String,
        /// Longest certificate lifetime handed out.
        #[arg(long, default_value_t = 86_400)]
        max_svid_ttl_secs: u64,
        /// Where the controller serves its metrics (`/metrics`), readiness (`/ready`) and the
        /// cluster-wide page (`/ui`, with `/graph`, `/flows`, `/tap`, `/explain`, `/objects`
        /// merged from every agent).
        #[arg(long, default_value = "0.0.0.0:15014")]
        listen: std::net::SocketAddr,
        /// A node agent's metrics address (`http://host:port`) the page asks; repeatable.
        #[arg(long = "agent", value_name = "URL")]
        agents: Vec<String>,
        /// The agents' metrics Service (in --namespace) whose Endpoints list every agent;
        /// empty: only the --agent URLs.
        #[arg(long, default_value = "weft-agent-metrics")]
        agents_service: String,
    },
    /// Print Weft's `CustomResourceDefinitions` as YAML (for `kubectl apply -f -`).
    Crds {
        /// Write one file per CRD into this directory instead.
        #[arg(long)]
        out_dir: Option<PathBuf>,
        /// Print instead the Gateway API route CRDs (`HTTPRoute`, `GRPCRoute`) as Weft's types
        /// describe them: for test clusters. Production clusters install the Gateway API
        /// project's own CRDs.
        #[arg(long, conflicts_with = "out_dir")]
        gateway_api: bool,
    },
    /// The fast-path kill switch; works even while the agent is down.
    Fastpath {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        #[arg(long, default_value = "local")]
        node: String,
        #[arg(long)]
        bpffs_dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "independent command-line switches"
)]
pub struct AgentArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The node's cgroup v2 directory (programs attach here; pods are its children), or `auto`:
    /// kubelet's `kubepods` (cgroupfs driver) or `kubepods.slice` (systemd) found in the cgroup
    /// file system at --cgroup-fs, on hybrid and pure cgroup v2 hosts, at any kubelet
    /// `cgroupRoot` (the one holding --pod-uid when given).
    #[arg(long)]
    cgroup: PathBuf,
    /// Per-node bpffs directory for pins; default /sys/fs/bpf/weft/<node>.
    #[arg(long)]
    bpffs_dir: Option<PathBuf>,
    /// YAML objects: a file or a directory.
    #[arg(long, conflicts_with = "kube")]
    objects: Option<PathBuf>,
    /// Where the host's cgroup file system is mounted (for `--cgroup auto`).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_fs: PathBuf,
    /// The agent's own pod UID (Kubernetes downward API), to find its node's pod cgroups when
    /// several kubelets share a machine.
    #[arg(long, env = "POD_UID")]
    pod_uid: Option<String>,
    /// Where pod cgroups are below --cgroup: `weft` (`<namespace>_<pod>`, local mode) or
    /// `kubelet` (found by pod UID; containers below the pod cgroup count as the pod).
    #[arg(long, value_enum, default_value_t = crate::cgroups::PodCgroups::Weft)]
    pod_cgroups: crate::cgroups::PodCgroups,
    /// Kubernetes mode: watch the API server for pods, services, routes and Weft's kinds
    /// instead of reading YAML files.
    #[arg(long)]
    kube: bool,
    /// The kubeconfig for `--kube`; default: in-cluster, then $KUBECONFIG or ~/.kube/config.
    #[arg(long, requires = "kube")]
    kubeconfig: Option<PathBuf>,
    /// Install the chained CNI plugin `weft-cni` into this directory (the container runtime's
    /// CNI plugin directory, e.g. /opt/cni/bin as mounted into the agent) and chain it into the
    /// active configuration list in --cni-conf-dir: new pods are enrolled before their
    /// containers run, so their first connection carries their identity.
    #[arg(long, requires_all = ["cni_conf_dir", "kube"])]
    cni_bin_dir: Option<PathBuf>,
    /// The container runtime's CNI configuration directory (e.g. /etc/cni/net.d).
    #[arg(long, requires = "cni_bin_dir")]
    cni_conf_dir: Option<PathBuf>,
    /// The agent's admin socket as the node sees it (the plugin runs on the node).
    #[arg(long, default_value = "/run/weft/admin.sock")]
    cni_agent_socket: PathBuf,
    /// The agent's own pod (`namespace/name`, e.g. from the downward API): when it stops because
    /// its `DaemonSet` is being deleted (`helm uninstall`), it removes the datapath from the node.
    #[arg(long, env = "WEFT_POD", requires = "kube")]
    own_pod: Option<String>,
    /// Also serve /metrics (and the rest) on this TCP address.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Which host-side interfaces are pods' (they get the TC programs: counters and the STRICT
    /// gate): `auto` (every veth/netkit whose peer is in another network namespace and which has
    /// no address of its own, whatever the CNI names it), or comma-separated name prefixes
    /// (`veth,cali`).
    #[arg(long, alias = "pod-interface-prefix", default_value = "auto")]
    pod_interfaces: crate::interfaces::PodInterfaces,
    /// How often the objects are re-read, the maps reconciled and the engine heartbeat
    /// written.
    #[arg(long, default_value_t = 250)]
    sync_interval_ms: u64,
    /// How often the kernel's flow table and counters are read (a walk over each map's
    /// capacity, so less often than the sync).
    #[arg(long, default_value_t = 1000)]
    stats_interval_ms: u64,
    /// On SIGTERM, how long the L7 engine may take to finish its connections: new connections
    /// go around it at once, HTTP clients are told to reconnect, the rest runs until it ends or
    /// this time is up.
    #[arg(long, default_value_t = 10)]
    drain_timeout_secs: u64,
    /// Override the fast-path socket map capacity.
    #[arg(long)]
    sockhash_capacity: Option<u32>,
    /// The eBPF programs' own decision logs (aya-log), forwarded into the agent's log under
    /// the target `weft::kernel`: off, error, warn, info (refused connects, sheds), debug (every
    /// connect verdict and fast-path join) or trace. Fixed when the programs are loaded: the
    /// verifier drops the statements of disabled levels, so off costs nothing; changing it
    /// upgrades the pinned programs in place (no connection notices).
    #[arg(long, default_value = "off")]
    ebpf_log: crate::ebpf::LogLevel,
    /// Connections the L7 engine and the tunnel hold at once (clients' connections, tunnel
    /// connections and streams); past it new ones are reset and counted. Lowered to what the
    /// agent's file descriptor limit allows (two per connection, 512 kept for the agent).
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,
    /// The most one source may hold of that budget: a client pod (its address), a peer node's
    /// tunnel connections, a tunnel client identity's streams. Default: half of the budget.
    #[arg(long)]
    max_connections_per_source: Option<usize>,
    #[arg(long, default_value_t = 1000)]
    recent_flows: usize,
    /// Run the L7 engine on this node address (e.g. the node's bridge IP and port 15001).
    #[arg(long)]
    engine_addr: Option<SocketAddrV4>,
    /// Attach `sock_ops` to this cgroup too (the agent's own), so the engine's legs to local
    /// pods use the fast path. Only give a cgroup this deployment owns.
    #[arg(long)]
    engine_sockops_cgroup: Option<PathBuf>,
    /// Send one span per L7 request to this OTLP/HTTP collector (e.g. <http://10.0.0.5:4318>).
    #[arg(long)]
    otlp_endpoint: Option<hyper::Uri>,
    /// The CA that signs this node's workload certificates (PEM: the CA certificate, then
    /// its chain when it is an intermediate). With it the agent runs the mTLS tunnel.
    #[arg(long, requires = "ca_key", conflicts_with = "ca_addr")]
    ca_cert: Option<PathBuf>,
    /// The CA's private key (PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Instead of holding the CA: the certificate service of `weft controller --ca-cert …`
    /// (host:port). The agent sends it a request per workload key, authenticated with
    /// --ca-token-file; needs --trust-bundle. With it the agent runs the mTLS tunnel.
    #[arg(long, requires = "trust_bundle")]
    ca_addr: Option<String>,
    /// The certificate service's SPIFFE ID (its certificate must carry exactly this).
    #[arg(
        long,
        default_value = "spiffe://cluster.local/ns/weft-system/sa/weft-controller"
    )]
    ca_server_id: String,
    /// The agent's Kubernetes service-account token, sent with certificate requests.
    #[arg(
        long,
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    ca_token_file: PathBuf,
    /// PEM roots peers are verified against, re-read when the file changes (root rotation:
    /// publish old and new roots together); default: the root of --ca-cert's chain.
    #[arg(long)]
    trust_bundle: Option<PathBuf>,
    /// Lifetime of workload certificates; they are replaced at half of it.
    #[arg(long, default_value_t = 3600)]
    svid_ttl_secs: u64,
    /// Where the tunnel listens (every node uses the same port).
    #[arg(long, default_value = "0.0.0.0:15008")]
    tunnel_listen: SocketAddrV4,
    /// Remove every program, link, map and pin of this node, then exit.
    #[arg(long)]
    pub uninstall: bool,
}

#[derive(Subcommand)]
pub enum JwtCommand {
    /// Write an ES256 key (`key.pem`) and its public JWKS (`jwks.json`, for `jwks`/`jwksFile`).
    Keygen {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "weft")]
        kid: String,
    },
    /// Print a token signed with a `keygen` key.
    Sign {
        /// The `key.pem` from `weft jwt keygen`.
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value = "weft")]
        kid: String,
        #[arg(long)]
        iss: String,
        #[arg(long)]
        sub: String,
        #[arg(long)]
        aud: Option<String>,
        /// Valid for this long from now.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// More claims, `name=value` (a JSON value, or text), repeatable.
        #[arg(long)]
        claim: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a root CA (`ca.crt`, `ca.key`) in a directory.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, default_value_t = 3650)]
        valid_days: u64,
    },
    /// Create an intermediate CA signed by an existing (e.g. your organisation's) CA: `ca.crt`
    /// (the intermediate, then its chain) and `ca.key` in `--dir`.
    Intermediate {
        #[arg(long)]
        root_cert: PathBuf,
        #[arg(long)]
        root_key: PathBuf,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
    },
    /// Issue a certificate for a peer outside the mesh (e.g. a proxy): one PEM file with the
    /// certificate, its intermediates and its key.
    Issue {
        #[arg(long)]
        ca_cert: PathBuf,
        #[arg(long)]
        ca_key: PathBuf,
        /// The SPIFFE ID it carries (URI SAN).
        #[arg(long)]
        id: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 30)]
        valid_days: u64,
    },
}

/// The agent's configuration from its flags, checked and converted once.
impl TryFrom<AgentArgs> for AgentConfig {
    type Error = anyhow::Error;

    fn try_from(args: AgentArgs) -> anyhow::Result<AgentConfig> {
        let AgentArgs {
            node,
            cgroup,
            cgroup_fs,
            pod_uid,
            bpffs_dir,
            objects,
            kube,
            kubeconfig,
            own_pod,
            cni_bin_dir,
            cni_conf_dir,
            cni_agent_socket,
            pod_cgroups,
            metrics_addr,
            pod_interfaces,
            sync_interval_ms,
            stats_interval_ms,
            drain_timeout_secs,
            sockhash_capacity,
            ebpf_log,
            max_connections,
            max_connections_per_source,
            recent_flows,
            engine_addr,
            engine_sockops_cgroup,
            otlp_endpoint,
            ca_cert,
            ca_key,
            ca_addr,
            ca_server_id,
            ca_token_file,
            trust_bundle,
            svid_ttl_secs,
            tunnel_listen,
            uninstall: _,
        } = args;
        let issuer = issuer(
            ca_cert.zip(ca_key),
            ca_addr,
            &ca_server_id,
            ca_token_file,
            &node.node,
        )?;
        let cgroup = if cgroup == Path::new("auto") {
            let found = crate::cgroups::find_kubepods(&cgroup_fs, pod_uid.as_deref())
                .map_err(|e| anyhow::anyhow!("--cgroup auto: {e}"))?;
            tracing::info!(cgroup = %found.display(), "found kubelet's pod cgroups");
            found
        } else {
            cgroup
        };
        Ok(AgentConfig {
            admin_socket: node.socket(),
            bpffs_dir: bpffs_dir.unwrap_or_else(|| bpffs_default(&node.node)),
            node_name: node.node,
            cgroup_path: cgroup,
            objects_path: objects.unwrap_or_else(|| PathBuf::from("/etc/weft/objects")),
            kube: kube.then_some(crate::config::KubeMode {
                kubeconfig,
                own_pod: own_pod
                    .map(|p| {
                        p.split_once('/')
                            .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
                            .ok_or_else(|| anyhow::anyhow!("--own-pod {p:?}: want namespace/name"))
                    })
                    .transpose()?,
            }),
            pod_cgroups,
            metrics_addr,
            cni: cni_bin_dir
                .zip(cni_conf_dir)
                .map(|(bin_dir, conf_dir)| crate::cni::CniInstall {
                    bin_dir,
                    conf_dir,
                    agent_socket: cni_agent_socket,
                }),
            pod_interfaces,
            sync_interval: Duration::from_millis(sync_interval_ms.max(10)),
            stats_interval: Duration::from_millis(stats_interval_ms.max(10)),
            drain_timeout: Duration::from_secs(drain_timeout_secs),
            sockhash_capacity,
            ebpf_log,
            max_connections,
            max_connections_per_source,
            recent_flows,
            engine_addr,
            engine_sockops_cgroup,
            otlp_endpoint,
            identity: issuer.map(|issuer| crate::config::IdentityConfig {
                issuer,
                trust_bundle,
                svid_ttl: Duration::from_secs(svid_ttl_secs.max(2)),
                tunnel_listen,
            }),
        })
    }
}

/// Where the agent's certificates come from: a CA's files (it signs itself), a CA server, or
/// neither (no identity, no mTLS).
fn issuer(
    ca_files: Option<(PathBuf, PathBuf)>,
    ca_addr: Option<String>,
    ca_server_id: &str,
    token_file: PathBuf,
    node: &str,
) -> anyhow::Result<Option<crate::config::IssuerConfig>> {
    Ok(match (ca_files, ca_addr) {
        (Some((cert, key)), _) => Some(crate::config::IssuerConfig::Local(
            crate::identity::CaFiles { cert, key },
        )),
        (None, Some(addr)) => Some(crate::config::IssuerConfig::Remote(
            crate::identity::RemoteCa {
                addr,
                server_id: crate::identity::SpiffeId::parse(ca_server_id)?,
                token_file,
                node: node.to_owned(),
            },
        )),
        (None, None) => None,
    })
}

/// The host name and process id: unique among replicas outside a cluster.
#[must_use]
pub fn default_identity() -> String {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    format!("{host}-{}", std::process::id())
}

/// Where a node's pins live unless told otherwise.
#[must_use]
pub fn bpffs_default(node: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/weft/{node}"))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, Command};

    fn status_json(args: &[&str]) -> Result<bool, clap::Error> {
        let cli = Cli::try_parse_from(["weft", "status"].iter().chain(args))?;
        match cli.command {
            Command::Status { output, .. } => Ok(output.json()),
            _ => unreachable!("parsed as status"),
        }
    }

    #[test]
    fn every_table_command_takes_output_json_or_text() {
        assert!(!status_json(&[]).unwrap());
        assert!(status_json(&["-o", "json"]).unwrap());
        assert!(status_json(&["--output", "json"]).unwrap());
        assert!(status_json(&["--json"]).unwrap());
        assert!(!status_json(&["--output", "text"]).unwrap());
        assert!(status_json(&["--output", "yaml"]).is_err());
        assert!(status_json(&["--json", "-o", "text"]).is_err());
        for command in [
            &["flows", "-o", "json"][..],
            &["check", "x.yaml", "-o", "json"],
            &["explain", "default/a", "default/web", "-o", "json"],
        ] {
            let args = std::iter::once("weft").chain(command.iter().copied());
            assert!(Cli::try_parse_from(args).is_ok(), "{command:?}");
        }
    }
}
