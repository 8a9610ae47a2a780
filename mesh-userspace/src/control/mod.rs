//! Sources of the mesh's objects. Local mode reads Kubernetes-shaped YAML from files; the same
//! typed objects will come from an API server later. Either way the output is an [`ObjectSet`]
//! that `state` turns into the node's desired datapath configuration.
pub mod crds;
pub mod files;
pub mod objects;

pub use objects::{AuthorizationPolicy, MeshConfig, ObjectSet, ObjectStatus, ParseError};
