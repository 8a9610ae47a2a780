//! `weft controller`: validates Weft's objects and tells their authors the outcome. Reflectors
//! cache Services and Weft's kinds; after any change the leader recomputes every object's
//! conditions (`Accepted`, `ResolvedRefs`, `Programmed`, each with `observedGeneration`), writes
//! the ones that changed to the status subresource, and records a Warning Event when an object
//! is refused or a reference does not resolve.
//!
//! Node agents do not wait for the controller: they watch the same objects and apply what they
//! can (see `control::kube`). `Programmed` therefore means "in effect": accepted, with every
//! reference resolved, so the agents program it.
//!
//! Two replicas may run: a `coordination.k8s.io/v1` Lease elects the one that writes status.
//! Expiry compares the holder's `renewTime` with this replica's clock, as client-go does with
//! synchronised node clocks.
use std::{path::PathBuf, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Service},
    apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{Patch, PatchParams, PostParams},
    core::object::HasStatus,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::Notify;

use super::{
    kube::{Keep, Kind, KubeSourceError, client},
    monitor::Monitor,
};
use crate::{
    api::{
        objects::{
            AuthorizationPolicy, MeshConfig, ObjectSet, ObjectStatus, RequestAuthentication,
        },
        traffic::TrafficPolicy,
    },
    state::validate::{self, Verdict},
};
use gateway_api::{grpcroutes::GrpcRoute, httproutes::HttpRoute};

/// The Lease both replicas compete for.
pub const LEASE_NAME: &str = "weft-controller";
/// The field manager and Event reporter.
const MANAGER: &str = "weft-controller";

#[derive(Debug, Clone, Serialize)]
pub struct ControllerConfig {
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the leader-election Lease.
    pub namespace: String,
    /// This replica's name in the Lease (the pod name in a cluster).
    pub identity: String,
    /// A leader that has not renewed for this long is replaced.
    pub lease_duration: Duration,
    /// The certificate service for agents, when the controller holds the CA.
    pub certificates: Option<super::certs::CertServiceConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Connect(#[from] KubeSourceError),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("certificate service: {0}")]
    Certificates(#[from] super::certs::CertServiceError),
    #[error("the monitoring server stopped (see the log for why)")]
    PageStopped,
}

/// Runs until SIGINT/SIGTERM; a leader hands its Lease back on the way out.
/// `page`, given the API client and the controller's [`Monitor`], is the monitoring server's
/// task (metrics, readiness, the cluster's page); it runs beside the controller.
pub fn run<F, Fut>(config: &ControllerConfig, page: F) -> Result<(), ControllerError>
where
    F: FnOnce(Client, Arc<Monitor>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ControllerError::Runtime)?;
    runtime.block_on(async {
        let client = client(config.kubeconfig.as_deref()).await?;
        let monitor = Arc::new(Monitor::new());
        let lease = LeaseLock::new(client.clone(), config);
        let changed = Arc::new(Notify::new());
        let leader = tokio::sync::watch::channel(false);
        let election = elect(&lease, config.lease_duration, &leader.0, &changed, &monitor);
        let certificates = match &config.certificates {
            Some(c) => Some(super::certs::start(client.clone(), c, Arc::clone(&monitor)).await?),
            None => None,
        };
        let page = page(client.clone(), Arc::clone(&monitor));
        let statuses = write_statuses(client, leader.1, Arc::clone(&changed), &monitor);
        let certificates = async move {
            match certificates {
                Some(task) => {
                    let _ = task.await;
                }
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            () = election => Ok(()),
            () = statuses => Ok(()),
            () = certificates => {
                tracing::error!("the certificate service stopped");
                Ok(())
            }
            () = page => Err(ControllerError::PageStopped),
            () = crate::signal::shutdown() => Ok(()),
        };
        if *leader.0.borrow() {
            lease.release().await;
        }
        tracing::info!("controller stopped");
        outcome
    })
}

// --- leader election ------------------------------------------------------------------------

struct LeaseLock {
    api: Api<Lease>,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    fn new(client: Client, config: &ControllerConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            identity: config.identity.clone(),
            duration: config.lease_duration,
        }
    }

    fn seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Takes the Lease if it is free or expired, renews it if held: whether this replica leads.
    async fn acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(LEASE_NAME).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE_NAME.into()),
                    ..ObjectMeta::default()
                },
                spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let secs = i64::from(spec.lease_duration_seconds.unwrap_or(self.seconds()));
            t.0.as_second() + secs < now.0.as_second()
        });
        if !(mine || free || expired) {
            return Ok(false);
        }
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(self.seconds());
        // `replace` carries the resourceVersion read above: of two replicas racing for an
        // expired Lease, one gets 409 Conflict.
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (so the other replica takes over at once, not after expiry).
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(LEASE_NAME).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!("leadership released"),
            Err(e) => tracing::warn!(error = %e, "could not release the Lease; it expires"),
        }
    }
}

/// Keeps `leader` true while this replica holds the Lease; wakes the status writer on a change.
async fn elect(
    lease: &LeaseLock,
    duration: Duration,
    leader: &tokio::sync::watch::Sender<bool>,
    changed: &Notify,
    monitor: &Monitor,
) {
    let every = duration / 3;
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        let leading = match lease.acquire_or_renew().await {
            Ok(true) => {
                last_renewed = Some(tokio::time::Instant::now());
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(error = %e, "Lease renewal failed");
                // Keep leading only while the Lease cannot have expired for the others.
                last_renewed.is_some_and(|t| t.elapsed() < duration.saturating_sub(every))
            }
        };
        if leading != *leader.borrow() {
            tracing::info!(
                identity = lease.identity,
                leading,
                "leadership {}",
                if leading { "acquired" } else { "lost" }
            );
            leader.send_replace(leading);
            monitor.set_leader(leading);
            changed.notify_one();
        }
        tokio::time::sleep(every).await;
    }
}

// --- status ---------------------------------------------------------------------------------

async fn write_statuses(
    client: Client,
    mut leader: tokio::sync::watch::Receiver<bool>,
    changed: Arc<Notify>,
    monitor: &Monitor,
) {
    // A kind the server does not serve (HTTPRoutes without the Gateway API CRDs) is skipped.
    let services = Kind::<Service>::start(&client, Keep::All, &changed).await;
    let traffic = Kind::<TrafficPolicy>::start(&client, Keep::All, &changed).await;
    let authz = Kind::<AuthorizationPolicy>::start(&client, Keep::All, &changed).await;
    let jwt_rules = Kind::<RequestAuthentication>::start(&client, Keep::All, &changed).await;
    let mesh = Kind::<MeshConfig>::start(&client, Keep::All, &changed).await;
    let routes = Kind::<HttpRoute>::start(&client, Keep::All, &changed).await;
    let grpc_routes = Kind::<GrpcRoute>::start(&client, Keep::All, &changed).await;
    services.ready().await;
    traffic.ready().await;
    authz.ready().await;
    jwt_rules.ready().await;
    mesh.ready().await;
    routes.ready().await;
    grpc_routes.ready().await;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: MANAGER.into(),
            instance: None,
        },
    );
    loop {
        let started = std::time::Instant::now();
        let set = ObjectSet {
            services: services.objects(),
            traffic_policies: traffic.objects(),
            authorization_policies: authz.objects(),
            request_authentications: jwt_rules.objects(),
            mesh_configs: mesh.objects(),
            http_routes: routes.objects(),
            grpc_routes: grpc_routes.objects(),
            ..ObjectSet::default()
        };
        // Every replica judges (its metrics and page tell the truth); the leader writes.
        if *leader.borrow_and_update() {
            let service_map = validate::services(&set.services);
            let policies = &set.traffic_policies;
            for p in policies {
                let verdict = validate::traffic_policy(p, policies, &service_map);
                let api = Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
                publish(&api, &recorder, &**p, &verdict, monitor).await;
            }
            for p in &set.authorization_policies {
                let api = Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
                let verdict = validate::authorization_policy(p, &service_map);
                publish(&api, &recorder, &**p, &verdict, monitor).await;
            }
            for p in &set.request_authentications {
                let api = Api::namespaced(client.clone(), &p.namespace().unwrap_or_default());
                let verdict = validate::request_authentication(p, &service_map);
                publish(&api, &recorder, &**p, &verdict, monitor).await;
            }
            for c in &set.mesh_configs {
                let verdict = validate::mesh_config(c);
                publish(
                    &Api::all(client.clone()),
                    &recorder,
                    &**c,
                    &verdict,
                    monitor,
                )
                .await;
            }
            for r in &set.http_routes {
                let api = Api::namespaced(client.clone(), &r.namespace().unwrap_or_default());
                let old = serde_json::to_value(r.status.as_ref().map(|s| &s.parents));
                let parents = validate::http_route(r, &service_map);
                publish_route(&api, &**r, old.unwrap_or_default(), &parents, monitor).await;
            }
            for r in &set.grpc_routes {
                let api = Api::namespaced(client.clone(), &r.namespace().unwrap_or_default());
                let old = serde_json::to_value(r.status.as_ref().map(|s| &s.parents));
                let parents = validate::grpc_route(r, &service_map);
                publish_route(&api, &**r, old.unwrap_or_default(), &parents, monitor).await;
            }
        }
        monitor.judged(validate::findings(&set), started.elapsed().as_secs_f64());
        tokio::select! {
            () = changed.notified() => {}
            r = leader.changed() => if r.is_err() { return },
        }
        // Changes close together (an apply of many objects) are handled in one pass.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Status writes are merge patches under the controller's field manager name.
fn status_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Weft's name in a route's `status.parents[].controllerName`.
pub const ROUTE_CONTROLLER: &str = "weft.dev/mesh";

/// Writes the route's `status.parents` entries for its Service parents (GAMMA), keeping other
/// controllers' entries, when they changed.
/// `old`: the route's current `status.parents` (JSON), whatever its route kind.
async fn publish_route<K>(
    api: &Api<K>,
    route: &K,
    old: serde_json::Value,
    parents: &[validate::RouteParent],
    monitor: &Monitor,
) where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let old_entries: Vec<serde_json::Value> = old.as_array().cloned().unwrap_or_default();
    let mut entries: Vec<serde_json::Value> = old_entries
        .iter()
        .filter(|e| e["controllerName"] != ROUTE_CONTROLLER)
        .cloned()
        .collect();
    for p in parents {
        let previous: Vec<Condition> = old_entries
            .iter()
            .find(|e| e["controllerName"] == ROUTE_CONTROLLER && e["parentRef"] == p.parent_ref)
            .and_then(|e| serde_json::from_value(e["conditions"].clone()).ok())
            .unwrap_or_default();
        let mut conditions = conditions(&p.verdict, route.meta().generation, &previous);
        conditions.retain(|c| c.type_ != "Programmed"); // routes have Accepted and ResolvedRefs
        entries.push(serde_json::json!({
            "parentRef": p.parent_ref,
            "controllerName": ROUTE_CONTROLLER,
            "conditions": conditions,
        }));
    }
    if entries == old_entries {
        return;
    }
    let patch = serde_json::json!({ "status": { "parents": entries } });
    let written = api
        .patch_status(&route.name_any(), &status_params(), &Patch::Merge(&patch))
        .await;
    monitor.status_written(&K::kind(&()), written.is_ok());
    if let Err(e) = written {
        tracing::warn!(route = route.name_any(), error = %e, "writing route status failed");
    }
}

/// The conditions for `verdict`, keeping each condition's `lastTransitionTime` when its status
/// did not change.
fn conditions(verdict: &Verdict, generation: Option<i64>, old: &[Condition]) -> Vec<Condition> {
    let now = Time(Timestamp::now());
    let make = |type_: &str, status: &str, reason: &str, message: String| {
        let since = old
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: since,
        }
    };
    let accepted = match &verdict.rejected {
        None => make("Accepted", "True", "Accepted", "the object is valid".into()),
        Some((reason, message)) => make("Accepted", "False", reason, message.clone()),
    };
    let resolved = match (&verdict.rejected, &verdict.unresolved) {
        (Some(_), _) => make(
            "ResolvedRefs",
            "Unknown",
            "Pending",
            "not checked: the object is not accepted".into(),
        ),
        (None, None) => make(
            "ResolvedRefs",
            "True",
            "ResolvedRefs",
            "every reference resolves".into(),
        ),
        (None, Some((reason, message))) => make("ResolvedRefs", "False", reason, message.clone()),
    };
    let programmed = if verdict.effective() {
        make(
            "Programmed",
            "True",
            "Programmed",
            "in effect: node agents apply it".into(),
        )
    } else {
        make(
            "Programmed",
            "False",
            "Invalid",
            "not in effect: see the Accepted and ResolvedRefs conditions".into(),
        )
    };
    vec![accepted, resolved, programmed]
}

/// Writes the object's conditions if they changed, and a Warning Event when it turned bad.
async fn publish<K>(
    api: &Api<K>,
    recorder: &Recorder,
    obj: &K,
    verdict: &Verdict,
    monitor: &Monitor,
) where
    K: Resource<DynamicType = ()> + HasStatus<Status = ObjectStatus> + Clone + DeserializeOwned,
    K: std::fmt::Debug,
{
    let old = obj
        .status()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let new = conditions(verdict, obj.meta().generation, old);
    if new.as_slice() == old {
        return;
    }
    let name = obj.name_any();
    let patch = serde_json::json!({ "status": { "conditions": new } });
    let written = api
        .patch_status(&name, &status_params(), &Patch::Merge(&patch))
        .await;
    monitor.status_written(&K::kind(&()), written.is_ok());
    if let Err(e) = written {
        tracing::warn!(kind = %K::kind(&()), name, error = %e, "writing status failed");
        return;
    }
    let was_false = |type_: &str| old.iter().any(|c| c.type_ == type_ && c.status == "False");
    let problem = match (&verdict.rejected, &verdict.unresolved) {
        (Some(p), _) if !was_false("Accepted") => Some(p),
        (None, Some(p)) if !was_false("ResolvedRefs") => Some(p),
        _ => None,
    };
    if let Some((reason, message)) = problem {
        tracing::info!(kind = %K::kind(&()), name, reason, message, "object refused");
        let event = Event {
            type_: EventType::Warning,
            reason: (*reason).to_owned(),
            note: Some(message.clone()),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, "recording an Event failed");
        }
    }
}
