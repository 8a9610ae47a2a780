//! Kubernetes mode: the agent's objects come from an API server instead of files. kube-rs
//! reflectors keep a cache of every kind the node needs; after any change (debounced) the
//! caches become one [`ObjectSet`], which the agent turns into datapath state exactly as it does
//! in local mode.
//!
//! Pods are watched cluster-wide, not only this node's: without `EndpointSlices` (absent on the
//! 1.20 servers Weft supports) a Service's endpoints are derived from Pods, and backends on other
//! nodes count. Only this node's pods become workloads with a cgroup (see `state`).
//!
//! Nothing is published until every watched kind has been listed once, so the datapath never
//! runs on a partial view (an authorization policy not yet seen would be an allow).
use std::{
    fmt::Debug,
    hash::Hash,
    path::PathBuf,
    sync::{Arc, OnceLock, mpsc},
    time::Duration,
};

use futures_util::StreamExt as _;
use gateway_api::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::{
    Api, Client, Resource,
    api::ApiResource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::api::objects::{
    AuthorizationPolicy, MeshConfig, ObjectSet, RequestAuthentication, object_kinds,
};
use crate::api::traffic::TrafficPolicy;

/// Changes closer together than this are published together. Short: it only gathers the events
/// of one burst (a Deployment's pods, a relist); while a view is being turned into datapath
/// state, newer changes wait and are published together anyway.
const DEBOUNCE: Duration = Duration::from_millis(10);
/// The longest wait between two attempts to ask the API server which kinds it serves.
const MAX_DISCOVERY_BACKOFF: Duration = Duration::from_secs(10);
/// kubectl's annotation holding the whole object as last applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// How often a kind the API server does not serve is asked for again.
const RECHECK_UNSERVED: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not in a pod and no $KUBECONFIG or ~/.kube/config ({0}); pass --kubeconfig"
    )]
    Infer(#[from] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("Kubernetes source thread: {0}")]
    Thread(std::io::Error),
}

/// Where to find the API server: a kubeconfig file, or inferred (in-cluster service account,
/// then `$KUBECONFIG` / `~/.kube/config`).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let file =
                Kubeconfig::read_from(path).map_err(|source| KubeSourceError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| KubeSourceError::Kubeconfig {
                    path: path.to_owned(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// The objects of one node's agent, from the API server. A thread of its own runs the
/// reflectors; [`KubeSource::poll`] hands over the newest complete view, and the `wake` given to
/// [`KubeSource::start`] is called whenever there is one, so the agent need not poll.
pub struct KubeSource {
    updates: mpsc::Receiver<ObjectSet>,
    /// Set once the agent's own `DaemonSet` is being deleted (an uninstall).
    uninstalling: Arc<std::sync::atomic::AtomicBool>,
}

impl KubeSource {
    /// Connects (on its own thread) and starts watching. Connection problems after the start
    /// are retried with backoff and logged; they never stop the agent, which keeps its last view.
    /// With `own_pod` (namespace, name) it also watches the `DaemonSet` that runs the agent.
    pub fn start(
        kubeconfig: Option<&std::path::Path>,
        own_pod: Option<(String, String)>,
        wake: impl Fn() + Send + 'static,
    ) -> Result<Self, KubeSourceError> {
        let (tx, updates) = mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(KubeSourceError::Thread)?;
        // The client is built here so that a bad kubeconfig fails the agent's start.
        let client = runtime.block_on(client(kubeconfig))?;
        let uninstalling = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&uninstalling);
        std::thread::Builder::new()
            .name("kube-source".into())
            .spawn(move || {
                runtime.block_on(async move {
                    if let Some((namespace, name)) = own_pod {
                        tokio::spawn(watch_own_daemonset(client.clone(), namespace, name, flag));
                    }
                    watch_all(client, tx, wake).await;
                });
            })
            .map_err(KubeSourceError::Thread)?;
        Ok(Self {
            updates,
            uninstalling,
        })
    }

    /// The newest complete view since the last call, if any.
    pub fn poll(&mut self) -> Option<ObjectSet> {
        self.updates.try_iter().last()
    }

    /// Whether the agent's `DaemonSet` is gone or being deleted: the agent stops because Weft is
    /// being uninstalled (not restarted or upgraded). Known from a watch kept while the agent
    /// runs, because by the time the agent is told to stop, an uninstall may already have
    /// deleted its service account and its permissions.
    #[must_use]
    pub fn uninstalling(&self) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::clone(&self.uninstalling)
    }
}

/// Watches the `DaemonSet` that owns pod `namespace/name` and sets `flag` when it is deleted or
/// marked for deletion. Retried with backoff; a pod without such an owner (run by hand) is left
/// alone.
async fn watch_own_daemonset(
    client: Client,
    namespace: String,
    name: String,
    flag: Arc<std::sync::atomic::AtomicBool>,
) {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let mut backoff = Duration::from_millis(500);
    let owner = loop {
        match pods.get_opt(&name).await {
            Ok(Some(pod)) => {
                break pod
                    .metadata
                    .owner_references
                    .unwrap_or_default()
                    .into_iter()
                    .find(|o| o.kind == "DaemonSet");
            }
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the agent's own pod yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_DISCOVERY_BACKOFF);
            }
        }
    };
    let Some(owner) = owner else {
        return;
    };
    let sets: Api<DaemonSet> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", owner.name));
    let stream = watcher(sets, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let deleting = match event {
            Ok(watcher::Event::Delete(_)) => true,
            Ok(watcher::Event::Apply(set) | watcher::Event::InitApply(set)) => {
                set.metadata.deletion_timestamp.is_some()
                    || set.metadata.uid.as_deref() != Some(owner.uid.as_str())
            }
            Ok(_) => false,
            Err(e) => {
                tracing::debug!(error = %e, "watching the agent's DaemonSet; retrying");
                false
            }
        };
        if deleting {
            tracing::info!(daemonset = %owner.name, "the agent's DaemonSet is being deleted");
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// One watched kind: its cache, once the API server serves the kind. A kind that is not served
/// (its CRD not installed yet: a chart installs CRDs and agents together) is asked for again
/// every [`RECHECK_UNSERVED`], and watched from the moment it appears.
pub(super) struct Kind<K: Resource + 'static>
where
    K::DynamicType: Hash + Eq + Clone,
{
    store: Arc<OnceLock<Store<K>>>,
}

impl<K> Kind<K>
where
    K: Cached,
    K::DynamicType: Hash + Eq + Clone + Default,
{
    /// Starts watching every `K` when the API server serves the kind; every event wakes
    /// `changed`. Only an answer of the API server decides that a kind is not served: while it
    /// cannot be asked (not reachable yet, a Service route not written yet, a 5xx), this retries
    /// with backoff, so a node agent that starts before the API server is reachable does not go
    /// blind for good.
    pub(super) async fn start(client: &Client, keep: Keep, changed: &Arc<Notify>) -> Self {
        let kind = K::kind(&K::DynamicType::default()).into_owned();
        let store = Arc::new(OnceLock::new());
        if ask_until_answered::<K>(client, &kind).await {
            let _ = store.set(cache(Api::all(client.clone()), keep, changed));
        } else {
            tracing::warn!(
                kind,
                "the API server does not serve this kind (CRD not installed?); asking again every {RECHECK_UNSERVED:?}"
            );
            let (client, changed, later) =
                (client.clone(), Arc::clone(changed), Arc::clone(&store));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RECHECK_UNSERVED).await;
                    if ask_until_answered::<K>(&client, &kind).await {
                        tracing::info!(kind, "the API server serves this kind now; watching it");
                        let _ = later.set(cache(Api::all(client.clone()), keep, &changed));
                        changed.notify_one();
                        return;
                    }
                }
            });
        }
        Self { store }
    }

    pub(super) async fn ready(&self) {
        if let Some(store) = self.store.get() {
            // Only fails when the writer is dropped, which ends the watch: nothing to wait for.
            let _ = store.wait_until_ready().await;
        }
    }

    /// Whether a cached object satisfies `f` (nothing is copied).
    pub(super) fn any(&self, f: impl Fn(&K) -> bool) -> bool {
        self.store.get().is_some_and(|s| s.find(f).is_some())
    }

    /// The cached objects, shared with the cache (nothing is copied); none while the kind is
    /// not served, or (when it has just appeared) until its first list arrived.
    pub(super) fn objects(&self) -> Vec<Arc<K>> {
        self.store.get().map_or_else(Vec::new, Store::state)
    }
}

/// Whether the API server serves `K`, asking until it answers (backoff up to
/// [`MAX_DISCOVERY_BACKOFF`]).
async fn ask_until_answered<K: Resource>(client: &Client, kind: &str) -> bool
where
    K::DynamicType: Default,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        match served::<K>(client).await {
            Ok(served) => return served,
            Err(e) => {
                tracing::warn!(
                    kind,
                    error = %e,
                    retry_in = ?backoff,
                    "cannot ask the API server which kinds it serves; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_DISCOVERY_BACKOFF);
            }
        }
    }
}

/// What a cache keeps of each object. Always dropped: the API server's field bookkeeping
/// (`managedFields`) and kubectl's copy of the last applied object (nothing here reads them, and
/// on a pod they are most of its size).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Keep {
    /// The rest as it is (the controller compares the status it writes with the one there).
    All,
    /// What the node agent reads ([`Cached::trim`]), without `resourceVersion`: a write that
    /// changes nothing the agent reads (a status, a heartbeat) leaves the cached object equal to
    /// the one before, and no rebuild follows (see [`watch_all`]).
    Read,
}

/// A kind that is cached.
pub(super) trait Cached:
    Resource + Clone + DeserializeOwned + Debug + PartialEq + Send + Sync + 'static
{
    /// Drops what this kind carries that the node agent does not read.
    fn trim(&mut self) {}
}

impl Cached for Namespace {}
impl Cached for Service {}

/// Of a Pod the agent reads its metadata, where it runs and as whom, its containers' named ports
/// (Service `targetPort`s), its address, its phase and which conditions hold. The rest (volumes,
/// images, container statuses, probe times) is most of a real pod, and changes while the pod
/// starts without changing anything the mesh does.
impl Cached for Pod {
    fn trim(&mut self) {
        use k8s_openapi::api::core::v1::{Container, PodCondition, PodSpec, PodStatus};
        if let Some(spec) = self.spec.as_mut() {
            *spec = PodSpec {
                node_name: spec.node_name.take(),
                service_account_name: spec.service_account_name.take(),
                host_network: spec.host_network,
                containers: std::mem::take(&mut spec.containers)
                    .into_iter()
                    .map(|c| Container {
                        name: c.name,
                        ports: c.ports,
                        ..Container::default()
                    })
                    .collect(),
                ..PodSpec::default()
            };
        }
        if let Some(status) = self.status.as_mut() {
            *status = PodStatus {
                pod_ip: status.pod_ip.take(),
                pod_ips: status.pod_ips.take(),
                phase: status.phase.take(),
                conditions: status.conditions.take().map(|conditions| {
                    conditions
                        .into_iter()
                        .map(|c| PodCondition {
                            type_: c.type_,
                            status: c.status,
                            ..PodCondition::default()
                        })
                        .collect()
                }),
                ..PodStatus::default()
            };
        }
    }
}

/// Of a Node only its addresses are read (the `InternalIP` its agent's tunnel listens on); its
/// conditions and heartbeat times change on their own.
impl Cached for Node {
    fn trim(&mut self) {
        if let Some(status) = self.status.as_mut() {
            *status = k8s_openapi::api::core::v1::NodeStatus {
                addresses: status.addresses.take(),
                ..Default::default()
            };
        }
    }
}

/// The status of Weft's kinds and of routes is the controller's verdict, written after every
/// change of the object; the agent judges the objects itself.
macro_rules! without_status {
    ($($kind:ty),*) => {
        $(impl Cached for $kind {
            fn trim(&mut self) {
                self.status = None;
            }
        })*
    };
}
without_status!(
    AuthorizationPolicy,
    RequestAuthentication,
    MeshConfig,
    HttpRoute,
    GrpcRoute,
    TrafficPolicy
);

/// Drops from `o` what `keep` says a cache does without.
fn trimmed<K: Cached>(o: &mut K, keep: Keep) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
    if keep == Keep::Read {
        meta.resource_version = None;
        o.trim();
    }
}

/// A cache of every `K` that `api` lists, trimmed as `keep` says, kept current by a watch
/// (retried with backoff) on a spawned task; every event, an error included, wakes `changed`.
fn cache<K>(api: Api<K>, keep: Keep, changed: &Arc<Notify>) -> Store<K>
where
    K: Cached,
    K::DynamicType: Hash + Eq + Clone + Default,
{
    let (reader, writer) = reflector::store();
    let objects =
        watcher(api, watcher::Config::default()).modify(move |o: &mut K| trimmed(o, keep));
    let stream = reflector::reflector(writer, objects).default_backoff();
    let changed = Arc::clone(changed);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                let kind = K::kind(&K::DynamicType::default()).into_owned();
                tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
            }
            changed.notify_one();
        }
    });
    reader
}

/// Whether the API server serves `K` (its group/version lists its plural; a group/version the
/// server answers 404 for is not served). Any other error means "could not ask".
async fn served<K: Resource>(client: &Client) -> Result<bool, kube::Error>
where
    K::DynamicType: Default,
{
    let dt = K::DynamicType::default();
    let resource = ApiResource::erase::<K>(&dt);
    let listing = if resource.group.is_empty() {
        client.list_core_api_resources(&resource.version).await
    } else {
        client.list_api_group_resources(&resource.api_version).await
    };
    match listing {
        Ok(l) => Ok(l.resources.iter().any(|r| r.name == resource.plural)),
        // A group/version the server does not know is answered with a plain-text 404.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

struct Kinds {
    namespaces: Kind<Namespace>,
    nodes: Kind<Node>,
    pods: Kind<Pod>,
    services: Kind<Service>,
    authorization_policies: Kind<AuthorizationPolicy>,
    request_authentications: Kind<RequestAuthentication>,
    mesh_configs: Kind<MeshConfig>,
    http_routes: Kind<HttpRoute>,
    grpc_routes: Kind<GrpcRoute>,
    traffic_policies: Kind<TrafficPolicy>,
}

impl Kinds {
    async fn start(client: &Client, changed: &Arc<Notify>) -> Self {
        macro_rules! start {
            ($($kind:ident),*) => {
                Self { $($kind: Kind::start(client, Keep::Read, changed).await,)* }
            };
        }
        object_kinds!(start)
    }

    async fn ready(&self) {
        macro_rules! ready {
            ($($kind:ident),*) => {
                $(self.$kind.ready().await;)*
            };
        }
        object_kinds!(ready);
    }

    fn snapshot(&self) -> ObjectSet {
        macro_rules! objects {
            ($($kind:ident),*) => {
                ObjectSet { $($kind: self.$kind.objects(),)* errors: Vec::new() }
            };
        }
        object_kinds!(objects)
    }
}

async fn watch_all(client: Client, tx: mpsc::Sender<ObjectSet>, wake: impl Fn()) {
    let changed = Arc::new(Notify::new());
    let kinds = Kinds::start(&client, &changed).await;
    kinds.ready().await;
    tracing::info!("Kubernetes objects listed; programming the datapath from them");
    let mut last: Option<ObjectSet> = None;
    loop {
        let view = kinds.snapshot();
        // A write that changed nothing the agent reads (a status, a heartbeat) is not a change.
        if last.as_ref().is_none_or(|l| !l.same_as(&view)) {
            if tx.send(view.clone()).is_err() {
                return; // the agent is gone
            }
            last = Some(view);
            wake();
        }
        changed.notified().await;
        tokio::time::sleep(DEBOUNCE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object<K: DeserializeOwned>(json: serde_json::Value) -> K {
        serde_json::from_value(json).expect("a valid object")
    }

    fn policy(version: &str, accepted: &str, sa: &str) -> AuthorizationPolicy {
        object(serde_json::json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop", "resourceVersion": version},
            "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"serviceAccounts": [sa]}}]}]},
            "status": {"conditions": [{"type": "Accepted", "status": accepted, "reason": "R",
                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
        }))
    }

    fn node(version: &str, ip: &str, heartbeat: &str) -> Node {
        object(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "resourceVersion": version},
            "status": {
                "addresses": [{"type": "InternalIP", "address": ip}],
                "conditions": [{"type": "Ready", "status": "True",
                    "lastHeartbeatTime": heartbeat}],
            },
        }))
    }

    fn read<K: Cached>(mut o: K) -> K {
        trimmed(&mut o, Keep::Read);
        o
    }

    #[test]
    fn the_agent_sees_no_change_in_a_status_or_heartbeat_write() {
        assert_eq!(
            read(policy("1", "True", "a")),
            read(policy("2", "False", "a"))
        );
        assert_ne!(
            read(policy("1", "True", "a")),
            read(policy("2", "True", "b"))
        );
        let (before, beat) = (
            node("1", "198.18.0.1", "2026-01-01T00:00:00Z"),
            node("2", "198.18.0.1", "2026-01-01T00:00:10Z"),
        );
        assert_eq!(read(before.clone()), read(beat));
        assert_ne!(
            read(before),
            read(node("3", "198.18.0.2", "2026-01-01T00:00:10Z"))
        );
    }

    fn pod(ready: &str, ip: &str, restarts: i32, probed: &str) -> Pod {
        object(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {
                "nodeName": "n1", "serviceAccountName": "web",
                "containers": [{"name": "app", "image": "web:1",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "env": [{"name": "A", "value": "b"}]}],
                "volumes": [{"name": "token", "emptyDir": {}}],
            },
            "status": {
                "podIP": ip, "phase": "Running",
                "conditions": [{"type": "Ready", "status": ready, "lastProbeTime": probed}],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": restarts,
                    "image": "web:1", "imageID": "sha256:1"}],
            },
        }))
    }

    #[test]
    fn a_pod_keeps_what_the_agent_reads_and_nothing_that_churns() {
        let base = read(pod("True", "198.18.1.10", 0, "2026-01-01T00:00:00Z"));
        // A restart counted, a probe time moved: nothing the mesh does changes.
        assert_eq!(
            base,
            read(pod("True", "198.18.1.10", 3, "2026-01-01T00:01:00Z"))
        );
        // Readiness and the address do.
        assert_ne!(
            base,
            read(pod("False", "198.18.1.10", 0, "2026-01-01T00:00:00Z"))
        );
        assert_ne!(
            base,
            read(pod("True", "198.18.1.11", 0, "2026-01-01T00:00:00Z"))
        );
        // What the state reads is still there.
        let spec = base.spec.as_ref().expect("spec");
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.service_account_name.as_deref(), Some("web"));
        // A named targetPort still resolves.
        let port = &spec.containers[0].ports.as_ref().expect("ports")[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("http"), 8080)
        );
        assert!(spec.volumes.is_none() && spec.containers[0].env.is_none());
        let status = base.status.as_ref().expect("status");
        assert_eq!(status.pod_ip.as_deref(), Some("198.18.1.10"));
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(status.container_statuses.is_none());
    }

    #[test]
    fn the_controller_keeps_the_status_it_compares_with() {
        let mut p = policy("1", "True", "a");
        trimmed(&mut p, Keep::All);
        assert!(p.status.is_some());
        assert_eq!(p.metadata.resource_version.as_deref(), Some("1"));
        assert_ne!(p, {
            let mut q = policy("1", "False", "a");
            trimmed(&mut q, Keep::All);
            q
        });
    }

    #[test]
    fn a_view_is_the_same_only_with_the_same_objects_in_the_same_order() {
        let a = Arc::new(read(policy("1", "True", "a")));
        let b = Arc::new(read(policy("1", "True", "b")));
        let view = |policies: Vec<Arc<AuthorizationPolicy>>| ObjectSet {
            authorization_policies: policies,
            ..ObjectSet::default()
        };
        let first = view(vec![Arc::clone(&a), Arc::clone(&b)]);
        assert!(first.same_as(&view(vec![Arc::clone(&a), Arc::clone(&b)])));
        // Equal objects read again count as the same.
        assert!(first.same_as(&view(vec![Arc::new((*a).clone()), Arc::clone(&b)])));
        assert!(!first.same_as(&view(vec![Arc::clone(&b), Arc::clone(&a)])));
        assert!(!first.same_as(&view(vec![Arc::clone(&a)])));
        assert!(!first.same_as(&view(vec![Arc::clone(&a), Arc::clone(&a)])));
    }
}
