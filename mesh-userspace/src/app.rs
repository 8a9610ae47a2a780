//! Agent wiring. The datapath loop runs on its own OS thread (map syscalls block); the admin and
//! metrics server runs on a small tokio runtime. They share only [`Shared`].
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::registry::Registry;

use crate::{
    admin::{EnrolRequest, Shared, SharedState, Wake},
    api::objects::SocketFastPath,
    cgroups::PodCgroups,
    config::AgentConfig,
    control::files::FileSource,
    ebpf::{self, Datapath},
    flows::{FlowSnapshot, FlowTable},
    metrics::{KernelSnapshot, Metrics, PairLabels},
    proxy::{self, Engine, OrigDst, Redirected, snapshot::Snapshot},
    state::{self, NodeState},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Datapath(#[from] ebpf::EbpfError),
    #[error("admin server: {0}")]
    Admin(std::io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("workload identity: {0}")]
    Identity(crate::identity::IdentityError),
    #[error("L7 engine listener {addr}: {source}; is the address one of this node's?")]
    EngineListen {
        addr: std::net::SocketAddrV4,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kube(#[from] crate::control::kube::KubeSourceError),
}

/// Where the objects come from.
enum Source {
    Files(FileSource),
    Kube(crate::control::kube::KubeSource),
}

impl Source {
    /// Opens the source; a Kubernetes one sends [`Wake::Objects`] on `wake` with every new view
    /// (files are read again every pass).
    fn open(config: &AgentConfig, wake: std::sync::mpsc::Sender<Wake>) -> Result<Self, AgentError> {
        Ok(match &config.kube {
            Some(k) => Self::Kube(crate::control::kube::KubeSource::start(
                k.kubeconfig.as_deref(),
                k.own_pod.clone(),
                move || {
                    let _ = wake.send(Wake::Objects);
                },
            )?),
            None => Self::Files(FileSource::new(&config.objects_path)),
        })
    }

    /// A new object set when anything changed since the last call.
    fn poll(&mut self) -> Result<Option<crate::api::ObjectSet>, String> {
        match self {
            Self::Files(f) => f.poll().map_err(|e| e.to_string()),
            Self::Kube(k) => Ok(k.poll()),
        }
    }
}

/// Runs the agent until SIGINT/SIGTERM. The datapath stays installed when the agent exits:
/// traffic keeps flowing; `weft agent --uninstall` removes it.
pub fn run(config: &AgentConfig) -> Result<(), AgentError> {
    let datapath = Datapath::open(
        &config.bpffs_dir,
        &config.cgroup_path,
        config.sockhash_capacity,
        config.ebpf_log,
    )?;
    let socket_test = socket_self_test(&config.bpffs_dir);
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let (snapshots_tx, snapshots_rx) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let tap = Arc::new(crate::tap::Hub::default());
    let (engine, engine_thread) = match config.engine_addr {
        Some(addr) => {
            let (engine, thread) =
                start_engine(&datapath, config, addr, snapshots_rx, &mut registry, &tap)?;
            (Some(engine), Some(thread))
        }
        None => (None, None),
    };
    let shared: SharedState = Arc::new(RwLock::new(Shared {
        config: Some(config.clone()),
        startup: Some(datapath.startup),
        socket_self_test: Some(socket_test.clone()),
        datapath_generation: Some(datapath.generation()),
        metrics,
        registry: Some(Arc::new(registry)),
        engine: engine.clone(),
        tap: tap.clone(),
        ..Shared::default()
    }));

    let (wake_tx, wake_rx) = std::sync::mpsc::channel();
    let source = Source::open(config, wake_tx.clone())?;
    shared
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .enrol = Some(wake_tx);
    if let Some(cni) = &config.cni
        && let Err(e) = cni.install_binary()
    {
        tracing::error!(error = %e, "cannot install the CNI plugin; pods are enrolled by the sync pass only");
    }
    let uninstalling = match &source {
        Source::Kube(k) => Some(k.uninstalling()),
        Source::Files(_) => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let loop_thread = {
        let (shared, stop, config) = (shared.clone(), stop.clone(), config.clone());
        std::thread::Builder::new()
            .name("datapath-sync".into())
            .spawn(move || {
                let kernel = KernelChecks {
                    socket_redirect_exact: socket_test.passed,
                };
                sync_loop(
                    datapath,
                    source,
                    &config,
                    kernel,
                    &shared,
                    &stop,
                    &snapshots_tx,
                    &wake_rx,
                );
            })
            .map_err(AgentError::Runtime)?
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let result = rt.block_on(async {
        ebpf::logs::spawn(config.bpffs_dir.clone(), config.ebpf_log);
        let server = crate::admin::serve(shared.clone(), config);
        tokio::select! {
            r = server => r.map_err(AgentError::Admin),
            () = crate::signal::shutdown() => Ok(()),
        }
    });
    // The sync thread marks the engine down in the kernel as it ends: from then on new
    // connections go around the engine (or are refused, for services that fail closed), and
    // the engine can drain what it has.
    stop.store(true, Ordering::Relaxed);
    let _ = loop_thread.join();
    let _ = std::fs::remove_file(&config.admin_socket);
    if let (Some(engine), Some(thread)) = (engine, engine_thread) {
        tracing::info!(timeout = ?config.drain_timeout, "draining the L7 engine");
        engine.drain(tokio::time::Instant::now() + config.drain_timeout);
        let _ = thread.join();
    }
    if uninstalling.is_some_and(|u| u.load(Ordering::Relaxed)) {
        tracing::info!(
            "the agent's DaemonSet is being deleted: removing the datapath from the node"
        );
        uninstall(config)?;
    } else {
        tracing::info!(
            "agent stopped; the datapath stays in place (weft agent --uninstall removes it)"
        );
    }
    result
}

/// What the agent found out about this node's kernel at start.
#[derive(Debug, Clone, Copy)]
struct KernelChecks {
    /// The socket self-test passed: workloads on `Auto` use the socket fast path.
    socket_redirect_exact: bool,
}

/// Runs the socket self-test (scratch pins under `<bpffs dir>/selftest`) and logs its verdict. A
/// test that cannot run counts as failed: the socket fast path is then opt-in only.
fn socket_self_test(bpffs_dir: &std::path::Path) -> ebpf::selftest::SocketSelfTest {
    let result = ebpf::selftest::run(&bpffs_dir.join(ebpf::SELFTEST_DIR)).unwrap_or_else(|e| {
        ebpf::selftest::SocketSelfTest::not_run(format!("the self-test could not run: {e}"))
    });
    if result.passed {
        tracing::info!(
            "socket self-test passed: same-node meshed connections use the socket fast path"
        );
    } else {
        for c in result.cases.iter().filter(|c| !c.passed) {
            tracing::warn!(case = %c.name, detail = %c.detail, "socket self-test case failed");
        }
        tracing::warn!(
            failed = ?result.failed(),
            "this kernel's socket redirect does not serve every application exactly: only \
             workloads with socket fast path Enabled use it; the others keep the normal TCP path"
        );
    }
    result
}

/// The kernel's record of redirected connections, as the engine sees it.
struct KernelOrigDst(ebpf::OrigDstTable);

/// The engine's requests to take legs off the kernel fast path.
struct KernelFastPath(Mutex<ebpf::ShedFlows>);

impl proxy::FastPath for KernelFastPath {
    fn leave(&self, one: std::net::SocketAddrV4, other: std::net::SocketAddrV4) {
        let shed = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .shed(one, other);
        match shed {
            Ok(()) => tracing::debug!(%one, %other, "bulk leg moved off the fast path"),
            Err(e) => {
                tracing::warn!(%one, %other, error = %e, "could not move a bulk leg off the fast path");
            }
        }
    }
}

impl OrigDst for KernelOrigDst {
    fn lookup(&self, client: std::net::SocketAddrV4) -> Option<Redirected> {
        let info = self.0.lookup(client)?;
        Some(Redirected {
            orig_dst: std::net::SocketAddrV4::new(
                u32::from_be(info.orig_dst_ip_be).into(),
                u16::from_be(info.orig_dst_port_be),
            ),
            src_workload: state::WorkloadId(info.src_workload),
        })
    }
}

/// The engine's and the tunnel's connection budget: `--max-connections`, lowered to what the
/// file descriptor limit allows. The agent first raises its limit to what the budget needs
/// (the hard limit too, which a privileged agent may, up to `fs.nr_open`), else the soft limit
/// to the hard one (as Go's runtime does for its programs: the usual soft 1024 would cap the
/// engine at a few hundred connections).
fn connection_budget(wanted: usize) -> usize {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let needed = u64::try_from(wanted)
        .unwrap_or(u64::MAX)
        .saturating_mul(2)
        .saturating_add(proxy::admission::RESERVED_FDS);
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current < needed {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(needed);
        let target = needed.min(nr_open);
        let raised = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: Some(target.max(limit.maximum.unwrap_or(u64::MAX))),
            },
        );
        if raised.is_err() && limit.current != limit.maximum {
            let soft_to_hard = Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            if let Err(e) = setrlimit(Resource::Nofile, soft_to_hard) {
                tracing::warn!(error = %e, "could not raise the file descriptor limit");
            }
        }
    }
    let fds = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let budget = proxy::admission::fits_fd_limit(wanted, fds);
    if budget < wanted {
        tracing::warn!(
            wanted,
            budget,
            file_descriptors = fds,
            "the file descriptor limit lowers --max-connections"
        );
    }
    budget
}

/// Binds the engine's listener and runs the engine on its own thread and single-threaded
/// runtime (the data plane never shares a runtime with the admin server).
fn start_engine(
    datapath: &Datapath,
    config: &AgentConfig,
    addr: std::net::SocketAddrV4,
    snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    registry: &mut Registry,
    tap: &Arc<crate::tap::Hub>,
) -> Result<(Arc<Engine>, std::thread::JoinHandle<()>), AgentError> {
    if let Some(cg) = &config.engine_sockops_cgroup {
        datapath.attach_engine_sockops(cg)?;
    }
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| AgentError::EngineListen { addr, source })?;
    let orig = ebpf::OrigDstTable::open(datapath.dir())?;
    let shed = ebpf::ShedFlows::open(datapath.dir())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let snapshots_for_tunnel = snapshots.clone();
    let mut engine = Engine::new(
        snapshots,
        proxy::metrics::L7Metrics::register(registry),
        Box::new(KernelOrigDst(orig)),
        Arc::new(KernelFastPath(Mutex::new(shed))),
    );
    engine.tap = tap.clone();
    let budget = connection_budget(config.max_connections);
    engine.limit = proxy::admission::ConnectionLimit::new(
        budget,
        config
            .max_connections_per_source
            .unwrap_or_else(|| proxy::admission::default_share(budget)),
    );
    tracing::info!(
        max_connections = engine.limit.max(),
        max_connections_per_source = engine.limit.per_source(),
        "engine connection budget"
    );
    if let Some(endpoint) = &config.otlp_endpoint {
        // The exporter's task lives on the engine's runtime.
        let _guard = rt.enter();
        engine.tracer = Some(proxy::trace::Exporter::spawn(endpoint));
    }
    if let Some(identity) = &config.identity {
        let denials = engine.connections.denials.clone();
        let tunnel = start_tunnel(
            identity,
            &rt,
            snapshots_for_tunnel,
            registry,
            denials,
            engine.fast_path.clone(),
            engine.limit.clone(),
        )?;
        engine.tunnel = Some(tunnel);
    }
    let engine = Arc::new(engine);
    let runner = engine.clone();
    let thread = std::thread::Builder::new()
        .name("l7-engine".into())
        .spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        tracing::info!(%addr, "L7 engine listening");
                        let _ = runner.serve(l).await;
                    }
                    Err(e) => tracing::error!(error = %e, "L7 engine listener"),
                }
            });
        })
        .map_err(AgentError::Runtime)?;
    Ok((engine, thread))
}

/// Loads the CA, binds the tunnel listener and starts, on the engine's runtime, the tunnel
/// server and the certificate refresher (the node's workloads get SVIDs before anyone asks;
/// each is replaced at half its life; the trust bundle file is re-read).
fn start_tunnel(
    identity: &crate::config::IdentityConfig,
    rt: &tokio::runtime::Runtime,
    snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    registry: &mut Registry,
    denials: Arc<proxy::Denials>,
    fast_path: Arc<dyn proxy::FastPath>,
    limit: Arc<proxy::admission::ConnectionLimit>,
) -> Result<Arc<proxy::tunnel::Tunnel>, AgentError> {
    use crate::identity::{Ca, Identities, Issuer};
    let issuer = match &identity.issuer {
        crate::config::IssuerConfig::Local(files) => {
            Issuer::Local(Box::new(Ca::load(files).map_err(AgentError::Identity)?))
        }
        crate::config::IssuerConfig::Remote(remote) => Issuer::Remote(remote.clone()),
    };
    let ca_addr = match &identity.issuer {
        crate::config::IssuerConfig::Remote(remote) => Some(remote.addr.clone()),
        crate::config::IssuerConfig::Local(_) => None,
    };
    // The trust domain comes with the objects (MeshConfig); the agent starts with the default
    // and uses the domain of the first snapshot it gets.
    let trust_domain = snapshots.borrow().trust_domain.clone();
    let metrics = proxy::tunnel::TunnelMetrics::register(registry);
    let ids = Arc::new(
        Identities::new(
            trust_domain,
            issuer,
            identity.svid_ttl,
            identity.trust_bundle.clone(),
            metrics.certificates_issued.clone(),
        )
        .map_err(AgentError::Identity)?,
    );
    let addr = identity.tunnel_listen;
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| AgentError::EngineListen { addr, source })?;
    // Streams reach their pod from the client's own address when the node can route the
    // answers back (see `proxy::transparent`); otherwise from the node's.
    let keep_source = match proxy::transparent::install_reply_route() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot install the reply route: pods see this node, not the client of another node, as their peer"
            );
            false
        }
    };
    let mut tunnel =
        proxy::tunnel::Tunnel::new(ids.clone(), addr.port(), metrics, denials, fast_path, limit);
    tunnel.keep_source = keep_source;
    let tunnel = Arc::new(tunnel);
    let _guard = rt.enter();
    let server = tunnel.clone();
    let server_snapshots = snapshots.clone();
    tokio::spawn(async move {
        match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => {
                tracing::info!(%addr, "mTLS tunnel listening");
                proxy::tunnel::serve(server, server_snapshots, l).await;
            }
            Err(e) => tracing::error!(error = %e, "tunnel listener"),
        }
    });
    tokio::spawn(async move {
        let mut snapshots = snapshots;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let (trust_domain, wanted, ca_endpoints) = {
                let snapshot = snapshots.borrow_and_update();
                (
                    snapshot.trust_domain.clone(),
                    snapshot.mesh.local_identities(),
                    ca_addr
                        .as_deref()
                        .map(|a| snapshot.resolve_service(a))
                        .unwrap_or_default(),
                )
            };
            ids.refresh(&trust_domain, &wanted, &ca_endpoints).await;
            tokio::select! {
                _ = tick.tick() => {}
                r = snapshots.changed() => if r.is_err() { return },
            }
        }
    });
    Ok(tunnel)
}

#[allow(
    clippy::too_many_arguments,
    clippy::too_many_lines,
    reason = "the agent's one loop"
)]
fn sync_loop(
    mut dp: Datapath,
    mut source: Source,
    config: &AgentConfig,
    kernel: KernelChecks,
    shared: &SharedState,
    stop: &AtomicBool,
    snapshots: &tokio::sync::watch::Sender<Arc<Snapshot>>,
    wake: &std::sync::mpsc::Receiver<Wake>,
) {
    // Background work: on a busy node the L7 engine and the pods win any contention for a CPU,
    // while a tenth of one is still plenty for a pass every interval (and the heartbeat).
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10) {
        tracing::debug!(error = %e, "could not lower the sync thread's priority");
    }
    let mut flows = FlowTable::new(config.recent_flows);
    let mut node = Arc::new(NodeState::default());
    let (mut syncs, mut failures) = (0u64, 0u64);
    let mut last_reported: Option<String> = None;
    let mut denials_seen: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut last_observed: Option<Instant> = None;
    let mut tcp_memory = crate::pressure::TcpMemory::default();
    // Ready only once the objects have been read (in Kubernetes mode: every kind listed), so
    // an agent that cannot reach its API server does not claim to enforce anything.
    let mut objects_loaded = false;
    // The last objects, and the addresses the CNI plugin reported for pods whose Pod object
    // does not have one yet.
    let mut objects = crate::api::ObjectSet::default();
    let mut cni_addresses: BTreeMap<(String, String), std::net::Ipv4Addr> = BTreeMap::new();
    let mut netns_cookies: BTreeMap<String, u64> = BTreeMap::new();
    let mut pending: Vec<EnrolRequest> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut config_errors = None;
        let mut node_changed = false;
        let mut fresh = match source.poll() {
            Ok(Some(new)) => {
                objects_loaded = true;
                objects = new;
                true
            }
            Ok(None) => false,
            Err(e) => {
                config_errors = Some(vec![e]);
                false
            }
        };
        for (e, _) in &pending {
            cni_addresses.insert((e.namespace.clone(), e.name.clone()), e.ip);
            if let Some(cookie) = e.netns_cookie {
                netns_cookies.insert(format!("{}/{}", e.namespace, e.name), cookie);
            }
            fresh = true;
        }
        if fresh {
            cni_addresses.retain(|(ns, name), _| state::pod_lacks_address(&objects, ns, name));
            let (mut built, errors) = load(
                &state::with_addresses(&objects, &cni_addresses),
                config,
                snapshots,
                &node,
            );
            // Pods that are gone take their namespace's cookie with them (only this node's
            // pods have one: the rest of the cluster is not looked at).
            let local: BTreeMap<String, state::WorkloadId> = built
                .workloads
                .iter()
                .filter(|w| w.local)
                .map(|w| (w.key(), w.id))
                .collect();
            netns_cookies.retain(|key, _| local.contains_key(key));
            built.netns = netns_cookies
                .iter()
                .filter_map(|(key, cookie)| Some((*local.get(key)?, *cookie)))
                .collect();
            node = Arc::new(built);
            warn_socket_fast_path_forced(&node, kernel);
            node_changed = true;
            config_errors = Some(errors);
        }

        let shed = tcp_memory.update();
        let events = shared
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .tap
            .watching();
        let result = sync_once(&mut dp, &node, config, kernel, shed, events);
        for (enrolment, reply) in pending.drain(..) {
            let answer = match &result {
                Ok(()) => enrolled(&node, config, &enrolment),
                Err(e) => Err(format!("datapath sync failed: {e}")),
            };
            let _ = reply.send(answer);
        }
        if let Some(cni) = &config.cni {
            match cni.ensure_chained() {
                Ok(true) => tracing::info!("weft-cni added to the node's CNI configuration"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot chain weft-cni into the CNI configuration");
                }
            }
        }
        match &result {
            Ok(()) => syncs += 1,
            Err(e) => {
                failures += 1;
                let msg = e.to_string();
                if last_reported.as_ref() != Some(&msg) {
                    tracing::error!(error = %msg, "datapath sync failed; retrying");
                    last_reported = Some(msg);
                }
            }
        }
        let interfaces = config.pod_interfaces.current();
        let attached = match dp.sync_interfaces(&interfaces.values().cloned().collect()) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "attaching TC counters failed");
                BTreeSet::new()
            }
        };

        // Reading the kernel's flows and counters walks every bucket of those maps, so it runs
        // at its own, slower pace (and at once after a change, so the views follow it).
        let now = Instant::now();
        let observe = node_changed
            || config_errors.is_some()
            || last_observed.is_none_or(|t| now.duration_since(t) >= config.stats_interval);
        let observed = observe.then(|| {
            last_observed = Some(now);
            let entries = dp.take_flows();
            let denies = dp.denies();
            let snapshot = flows.update(&entries, &denies, &node);
            log_new_denials(&snapshot, &mut denials_seen);
            let kernel = kernel_snapshot(&dp, &node, &interfaces, syncs, failures);
            (snapshot, kernel)
        });
        {
            let mut s = shared
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(errors) = config_errors {
                s.config_errors = errors;
            }
            s.last_sync_error = result.err().map(|e| e.to_string());
            s.ready = s.ready || (objects_loaded && s.last_sync_error.is_none());
            // The node state only changes with the objects: no per-tick copy of the policy matrix.
            if node_changed {
                s.node = Arc::clone(&node);
            }
            if let Some((snapshot, mut kernel)) = observed {
                s.flows = snapshot;
                let pods: BTreeMap<&String, &String> = kernel
                    .interfaces
                    .iter()
                    .map(|(i, pod, _)| (i, pod))
                    .collect();
                s.interfaces = attached
                    .into_iter()
                    .map(|i| {
                        let pod = pods.get(&i).map(|p| (*p).clone()).unwrap_or_default();
                        (i, pod)
                    })
                    .collect();
                kernel.config_errors = s.config_errors.len();
                s.metrics.set(kernel);
            }
        }
        // Sleep until the next pass, or until the CNI plugin asks to enrol a pod or the
        // objects change (a policy applies as soon as it is seen, not at the next pass).
        if let Ok(first) = wake.recv_timeout(config.sync_interval) {
            for w in std::iter::once(first).chain(wake.try_iter()) {
                if let Wake::Enrol(e) = w {
                    pending.push(e);
                }
            }
        }
    }
    if config.engine_addr.is_some()
        && let Err(e) = dp.mark_engine_down()
    {
        tracing::warn!(error = %e, "could not mark the engine down; the kernel notices within 3 s");
    }
}

/// Whether an enrolled pod is in the kernel now: its workload known, and (a local meshed pod)
/// its cgroup found and mapped.
fn enrolled(
    node: &NodeState,
    config: &AgentConfig,
    e: &crate::cni::Enrolment,
) -> Result<(), String> {
    let key = format!("{}/{}", e.namespace, e.name);
    let Some(w) = node.workloads.iter().find(|w| w.key() == key) else {
        return Err(format!("pod {key} is not known to the agent yet"));
    };
    if !w.meshed || !w.local || (e.netns_cookie.is_some() && node.netns.contains_key(&w.id)) {
        return Ok(());
    }
    let found = match config.pod_cgroups {
        PodCgroups::Kubelet => w
            .uid
            .as_ref()
            .is_some_and(|uid| crate::cgroups::kubelet_pods(&config.cgroup_path).contains_key(uid)),
        PodCgroups::Weft => w.cgroup.as_ref().is_some_and(|c| c.exists()),
    };
    if found {
        Ok(())
    } else {
        Err(format!("the cgroup of pod {key} is not there yet"))
    }
}

/// The node state for new objects; the engine gets its snapshot at once. Returns the state and
/// every problem found, each also logged.
fn load(
    objects: &crate::api::ObjectSet,
    config: &AgentConfig,
    snapshots: &tokio::sync::watch::Sender<Arc<Snapshot>>,
    previous: &NodeState,
) -> (NodeState, Vec<String>) {
    let mut node = state::build_after(
        objects,
        &config.node_name,
        &config.cgroup_path,
        Some(previous),
    );
    let previous = snapshots.borrow().clone();
    let snapshot = Snapshot::build(&node, Some(&previous));
    node.problems.extend(snapshot.problems.iter().cloned());
    snapshots.send_replace(Arc::new(snapshot));
    // The verdicts the controller writes as conditions, word for word.
    let refused = node
        .findings
        .iter()
        .filter(|f| !f.verdict.effective())
        .map(ToString::to_string);
    let errors: Vec<String> = objects
        .errors
        .iter()
        .map(ToString::to_string)
        .chain(refused)
        .chain(node.problems.iter().cloned())
        .collect();
    for e in &errors {
        tracing::warn!(target: "weft::config", error = %e, "object not applied");
    }
    tracing::info!(
        workloads = node.workloads.len(),
        services = node.services.len(),
        policy_entries = node.policy.len(),
        "objects loaded"
    );
    (node, errors)
}

/// One structured event per new denial (target `weft::deny`), so refused connections show up in
/// the agent's log, not only in `/flows`.
fn log_new_denials(snapshot: &FlowSnapshot, seen: &mut BTreeMap<(String, String), u64>) {
    let mut now = BTreeMap::new();
    for d in &snapshot.denied {
        let src = d
            .src
            .workload
            .clone()
            .unwrap_or_else(|| d.src.ip.to_string());
        let dst = format!(
            "{}:{}",
            d.dst
                .workload
                .clone()
                .unwrap_or_else(|| d.dst.ip.to_string()),
            d.dst.port
        );
        let before = seen.get(&(src.clone(), dst.clone())).copied().unwrap_or(0);
        if d.attempts > before {
            let what = if d.verdict == "AUDIT" {
                "connection allowed that a dry-run policy would deny"
            } else {
                "connection denied"
            };
            tracing::info!(
                target: "weft::deny",
                source = %src,
                destination = %dst,
                attempts = d.attempts - before,
                reason = %d.reason,
                "{what}"
            );
        }
        now.insert((src, dst), d.attempts);
    }
    *seen = now;
}

/// Says, when objects change, which of this node's workloads use the socket fast path although
/// the kernel failed the self-test (their operator enabled it).
fn warn_socket_fast_path_forced(node: &NodeState, kernel: KernelChecks) {
    if kernel.socket_redirect_exact {
        return;
    }
    let forced: Vec<String> = node
        .workloads
        .iter()
        .filter(|w| w.local && w.meshed && w.socket_fast_path == SocketFastPath::Enabled)
        .map(crate::state::Workload::key)
        .collect();
    if !forced.is_empty() {
        tracing::warn!(
            workloads = ?forced,
            "socket fast path Enabled on a kernel that failed the socket self-test: splice() \
             readers of these workloads can lose data and blocking readers can get EAGAIN"
        );
    }
}

/// Writes what the node's model asks of the kernel maps (see [`ebpf::desired`]).
fn sync_once(
    dp: &mut Datapath,
    node: &NodeState,
    config: &AgentConfig,
    kernel: KernelChecks,
    shed: bool,
    events: bool,
) -> Result<(), ebpf::EbpfError> {
    let facts = ebpf::desired::Facts {
        engine: config.engine_addr,
        engine_meshed: config.engine_addr.is_some() && config.engine_sockops_cgroup.is_some(),
        tunnel: config.identity.is_some() && config.engine_addr.is_some(),
        socket_redirect_exact: kernel.socket_redirect_exact,
        shed,
        events,
    };
    // The pod's cgroup and every cgroup below it (its containers) are the pod.
    let kubelet_pods = (config.pod_cgroups == PodCgroups::Kubelet)
        .then(|| crate::cgroups::kubelet_pods(&config.cgroup_path));
    let cgroup_ids = |w: &crate::state::Workload| {
        let dir = match &kubelet_pods {
            Some(pods) => w.uid.as_ref().and_then(|uid| pods.get(uid)),
            None => w.cgroup.as_ref(),
        };
        dir.map(|d| crate::cgroups::subtree_ids(d))
            .unwrap_or_default()
    };
    let want = ebpf::desired::desired(node, facts, cgroup_ids);
    let report = dp.apply(&want)?;
    if report.inserted + report.removed > 0 {
        tracing::info!(
            inserted = report.inserted,
            removed = report.removed,
            "maps reconciled"
        );
    }
    Ok(())
}

fn kernel_snapshot(
    dp: &Datapath,
    node: &NodeState,
    interfaces: &BTreeMap<u32, String>,
    syncs: u64,
    failures: u64,
) -> KernelSnapshot {
    let name = |id: u32| node.display_name(state::WorkloadId(id));
    let pairs = dp
        .pair_stats()
        .into_iter()
        .map(|(k, v)| {
            let (src_namespace, src_workload) = name(k.src_workload);
            let (dst_namespace, dst_workload) = name(k.dst_workload);
            (
                PairLabels {
                    src_namespace,
                    src_workload,
                    dst_namespace,
                    dst_workload,
                },
                v,
            )
        })
        .collect();
    let interfaces_out = dp
        .if_stats()
        .into_iter()
        .filter_map(|(idx, st)| {
            let ifname = interfaces.get(&idx)?.clone();
            // The TC program records the source address of the pod's packets.
            let pod = node
                .workload_by_ip(std::net::Ipv4Addr::from(u32::from_be(st.pod_ip_be)))
                .map(crate::state::Workload::key)
                .unwrap_or_default();
            Some((ifname, pod, st))
        })
        .collect();
    let cfg = dp.config().unwrap_or_default();
    KernelSnapshot {
        pairs,
        interfaces: interfaces_out,
        global: dp.global_stats(),
        fast_path_enabled: cfg.flags & mesh_common::config_flags::FAST_PATH != 0,
        fast_path_killed: cfg.fast_path_killed != 0,
        sockhash_entries: dp.sockhash_len(),
        sockhash_capacity: dp.sockhash_capacity(),
        links_attached: dp.links_attached(),
        // Also unpins what an upgrade retired once nothing needs it.
        retired_sockets: dp.sweep_retired().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "sweeping retired maps failed");
            0
        }),
        workloads: node.workloads.len(),
        config_errors: 0,
        syncs,
        sync_failures: failures,
    }
}

/// Removes the node's datapath: every link, program, map and pin.
pub fn uninstall(config: &AgentConfig) -> Result<(), AgentError> {
    // The CNI chain first: a pod created from now on must not wait for an agent that is going.
    if let Some(cni) = &config.cni
        && let Err(e) = cni.uninstall()
    {
        {
            tracing::error!(error = %e, "cannot take weft-cni out of the CNI configuration");
        }
    }
    // A socket that leaves the sockhash with redirected bytes its application has not read
    // yet loses them (the kernel frees its queue with it). Turn the fast path off first: new
    // messages take the normal stack (order-safe), and applications get a moment to read what
    // is queued.
    if ebpf::set_fast_path_killed(&config.bpffs_dir, true).is_ok() {
        std::thread::sleep(UNINSTALL_DRAIN);
    }
    ebpf::remove_pins(&config.bpffs_dir)?;
    if let Err(e) = proxy::transparent::remove_reply_route() {
        tracing::warn!(error = %e, "cannot remove the reply route of source-keeping streams");
    }
    let _ = std::fs::remove_file(&config.admin_socket);
    // The directories the agent made for them, when nothing else is left in them.
    for dir in [config.bpffs_dir.parent(), config.admin_socket.parent()]
        .into_iter()
        .flatten()
    {
        if dir.file_name().is_some_and(|n| n == "weft") {
            let _ = std::fs::remove_dir(dir);
        }
    }
    tracing::info!(dir = %config.bpffs_dir.display(), "datapath removed");
    Ok(())
}

/// On uninstall, how long applications get to read what the fast path queued for them.
const UNINSTALL_DRAIN: Duration = Duration::from_secs(2);

/// Polling interval used when none is configured.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(250);
