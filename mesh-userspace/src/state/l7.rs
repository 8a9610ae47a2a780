//! L7 services: the Service ports the engine serves (routes, an accepted `TrafficPolicy`, L7
//! authorization or authentication), with what applies to each.

use std::{
    collections::HashMap,
    hash::{Hash as _, Hasher as _},
};

use super::{
    L7Service, ServicePort,
    access::{AccessPolicy, JwtIssuer},
    policy::ServicePolicy,
    routes,
};
use crate::api::{ObjectSet, traffic::TrafficPolicy};

/// Whether a policy (its metadata and `targetRef`) targets this Service port.
pub(super) fn targets(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    target: Option<&crate::api::traffic::TargetRef>,
    svc: &ServicePort,
) -> bool {
    meta.namespace.as_deref().unwrap_or("default") == svc.namespace
        && target.is_some_and(|t| {
            t.is_service() && t.name == svc.name && t.port.is_none_or(|p| p == svc.port)
        })
}

/// What an object targets: its metadata and `targetRef`.
type TargetOf<T> = fn(
    &T,
) -> (
    &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    Option<&crate::api::traffic::TargetRef>,
);

/// Objects that target a Service, by (namespace, Service name): each Service port looks at its
/// own candidates, not at every object (1000 Services × 1000 policies was a fifth of a rebuild).
struct ByTarget<'a, T> {
    objects: HashMap<(&'a str, &'a str), Vec<&'a T>>,
    target: TargetOf<T>,
}

impl<'a, T: Clone> ByTarget<'a, T> {
    fn new(all: &'a [T], target: TargetOf<T>) -> Self {
        let mut objects: HashMap<_, Vec<&T>> = HashMap::new();
        for o in all {
            let (meta, t) = target(o);
            if let Some(t) = t.filter(|t| t.is_service()) {
                let ns = meta.namespace.as_deref().unwrap_or("default");
                objects.entry((ns, t.name.as_str())).or_default().push(o);
            }
        }
        Self { objects, target }
    }

    /// The objects whose targetRef is `svc` (its port included).
    fn targeting(&self, svc: &ServicePort) -> Vec<T> {
        self.objects
            .get(&(svc.namespace.as_str(), svc.name.as_str()))
            .into_iter()
            .flatten()
            .filter(|o| {
                let (meta, t) = (self.target)(o);
                targets(meta, t, svc)
            })
            .map(|o| (*o).clone())
            .collect()
    }
}

/// The Services that need the L7 engine (routes, an accepted `TrafficPolicy`, L7 authorization
/// or authentication), with what the engine applies to each.
///
/// A service whose inputs (the digest of every object that shapes it) are those of a service of
/// `previous` is not compiled again: its compiled routes and policies are reused.
pub(super) fn l7_services(
    objects: &ObjectSet,
    traffic_policies: &[&TrafficPolicy],
    services: &mut [ServicePort],
    previous: &[L7Service],
    problems: &mut Vec<String>,
) -> Vec<L7Service> {
    use super::ServiceRef;
    use crate::api::refs::Route as _;
    let previous: std::collections::HashMap<_, _> = previous
        .iter()
        .map(|p| ((p.namespace.as_str(), p.name.as_str(), p.port), p))
        .collect();
    let authz_by_target = ByTarget::new(&objects.authorization_policies, |p| {
        (&p.metadata, p.spec.target_ref.as_ref())
    });
    let jwt_by_target = ByTarget::new(&objects.request_authentications, |p| {
        (&p.metadata, Some(&p.spec.target_ref))
    });
    let mut out = Vec::new();
    for svc in services.iter_mut() {
        let sref = ServiceRef {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
        };
        let http_routes: Vec<_> = objects
            .http_routes
            .iter()
            .filter(|r| r.attaches_to(sref.parts(), svc.port))
            .cloned()
            .collect();
        let grpc_routes: Vec<_> = objects
            .grpc_routes
            .iter()
            .filter(|r| r.attaches_to(sref.parts(), svc.port))
            .cloned()
            .collect();
        // Accepted policies never overlap (validation refuses the younger of two as Conflicted).
        let policy = traffic_policies
            .iter()
            .find(|p| targets(&p.metadata, p.spec.target_ref.as_ref(), svc));
        let authz = authz_by_target.targeting(svc);
        let jwt_policies = jwt_by_target.targeting(svc);
        if http_routes.is_empty()
            && grpc_routes.is_empty()
            && policy.is_none()
            && authz.is_empty()
            && jwt_policies.is_empty()
        {
            continue;
        }
        svc.l7 = true;
        svc.l7_fail_closed = match policy.and_then(|p| p.spec.failure_mode) {
            Some(mode) => mode == crate::api::traffic::FailureMode::Closed,
            // Authorization and authentication must not be skipped; plain routing may.
            None => !authz.is_empty() || !jwt_policies.is_empty(),
        };
        let inputs = digest(&(
            &http_routes,
            &grpc_routes,
            policy.map(|p| (&p.metadata.name, &p.spec)),
            &authz,
            &jwt_policies,
            &svc.app_protocol,
        ));
        let reused = previous
            .get(&(svc.namespace.as_str(), svc.name.as_str(), svc.port))
            .filter(|p| p.inputs == inputs)
            .copied();
        let service = if let Some(p) = reused {
            L7Service {
                service_id: svc.id,
                ..p.clone()
            }
        } else {
            let compiled = routes::compile(&sref, svc.port, &http_routes, &grpc_routes);
            L7Service {
                service_id: svc.id,
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
                port: svc.port,
                app_protocol: svc.app_protocol.clone(),
                routes: compiled.table,
                route_problems: compiled.problems,
                policy: policy.map(|p| {
                    ServicePolicy::compile(
                        &svc.namespace,
                        p.metadata.name.as_deref().unwrap_or_default(),
                        &p.spec,
                    )
                }),
                authz: authz.iter().map(|p| AccessPolicy::compile(p)).collect(),
                authn: jwt_policies
                    .iter()
                    .flat_map(|p| JwtIssuer::compile(p))
                    .collect(),
                inputs,
            }
        };
        problems.extend(service.route_problems.iter().cloned());
        out.push(service);
    }
    out
}

/// A digest of objects as their JSON: equal objects give equal digests within one process.
fn digest(value: &impl serde::Serialize) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(value).unwrap_or_default().hash(&mut h);
    h.finish()
}
