//! The wire types: the objects users write and the API server stores — Kubernetes Pods,
//! Services, Namespaces and Nodes, Gateway API routes, and Weft's own kinds in group
//! `weft.dev` — with their YAML parsing and their CRD schemas.
//!
//! The lowest layer: it imports nothing else of Weft (a test in `tests/layers.rs` checks it).
//! What the objects mean for a node (workloads, services, rules, compiled routes) is built from
//! them one layer up, in `state`.
use std::time::Duration;

pub mod crds;
pub mod objects;
pub mod refs;
pub mod traffic;

pub use objects::{AuthorizationPolicy, MeshConfig, ObjectSet, ObjectStatus, ParseError};

/// A reference to a core-group Service: group absent, `""` or `"core"`, kind `Service`.
/// (Callers apply their field's default kind first: `Service` for backendRefs.)
#[must_use]
pub fn is_core_service(group: Option<&str>, kind: Option<&str>) -> bool {
    matches!(group, None | Some("" | "core")) && kind == Some("Service")
}

/// Gateway API duration (GEP-2257: "10s", "500ms", "1h2m"), the one duration syntax of every
/// object.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: gateway_api::Duration = s.parse()?;
    Ok(Duration::new(d.as_secs(), d.subsec_nanos()))
}
