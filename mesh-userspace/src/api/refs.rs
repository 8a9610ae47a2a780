//! References between objects as Gateway API writes them (parentRefs, backendRefs, mirror
//! backendRefs of both route kinds), and the Service they may name.
use super::is_core_service;
use gateway_api::{
    grpcroutes::{
        GrpcRoute, GrpcRouteParentRefs, GrpcRouteRulesBackendRefs,
        GrpcRouteRulesFiltersRequestMirrorBackendRef,
    },
    httproutes::{
        HttpRoute, HttpRouteParentRefs, HttpRouteRulesBackendRefs,
        HttpRouteRulesFiltersRequestMirrorBackendRef,
    },
};

/// The fields shared by parentRefs, backendRefs and mirror backendRefs of both route kinds.
#[derive(Clone, Copy, Debug)]
pub struct RefParts<'a> {
    pub group: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub name: &'a str,
    pub namespace: Option<&'a str>,
    pub port: Option<i32>,
}

pub trait AsRefParts {
    fn ref_parts(&self) -> RefParts<'_>;
}

macro_rules! ref_parts {
    ($($t:ty),*) => {$(
        impl AsRefParts for $t {
            fn ref_parts(&self) -> RefParts<'_> {
                let (group, kind) = (self.group.as_deref(), self.kind.as_deref());
                let (name, namespace, port) = (&self.name, self.namespace.as_deref(), self.port);
                RefParts { group, kind, name, namespace, port }
            }
        }
    )*};
}
ref_parts!(
    HttpRouteParentRefs,
    GrpcRouteParentRefs,
    HttpRouteRulesBackendRefs,
    GrpcRouteRulesBackendRefs,
    HttpRouteRulesFiltersRequestMirrorBackendRef,
    GrpcRouteRulesFiltersRequestMirrorBackendRef
);

/// Whether a route in `route_ns` with these parentRefs attaches to Service
/// `namespace`/`name` port `port`.
pub fn attaches<P: AsRefParts>(
    route_ns: &str,
    parent_refs: Option<&[P]>,
    (namespace, name): (&str, &str),
    port: u16,
) -> bool {
    parent_refs
        .unwrap_or_default()
        .iter()
        .map(AsRefParts::ref_parts)
        .any(|r| {
            is_core_service(r.group, r.kind)
                && r.name == name
                && r.namespace.unwrap_or(route_ns) == namespace
                && r.port.is_none_or(|p| p == i32::from(port))
        })
}

/// What both route kinds say about where they attach.
pub trait Route {
    /// Whether the route attaches to Service `namespace`/`name` port `port`.
    fn attaches_to(&self, service: (&str, &str), port: u16) -> bool;
}

macro_rules! route {
    ($($t:ty),*) => {$(
        impl Route for $t {
            fn attaches_to(&self, service: (&str, &str), port: u16) -> bool {
                let ns = self.metadata.namespace.as_deref().unwrap_or("default");
                attaches(ns, self.spec.parent_refs.as_deref(), service, port)
            }
        }
    )*};
}
route!(HttpRoute, GrpcRoute);
