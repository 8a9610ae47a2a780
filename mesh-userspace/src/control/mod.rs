//! Sources of the mesh's objects. Local mode reads Kubernetes-shaped YAML from files; the same
//! typed objects will come from an API server later. Either way the output is an [`ObjectSet`]
//! that `state` turns into the node's desired datapath configuration.
pub mod certs;
pub mod controller;
pub mod crds;
pub mod files;
pub mod kube;
pub mod objects;
pub mod validate;

pub use objects::{AuthorizationPolicy, MeshConfig, ObjectSet, ObjectStatus, ParseError};
