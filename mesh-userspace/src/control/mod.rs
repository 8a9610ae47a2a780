//! Sources of the mesh's objects and the controller. Local mode reads Kubernetes-shaped YAML
//! from files (`files`); in a cluster they come from the API server (`kube`). Either way the
//! output is an [`ObjectSet`](crate::api::ObjectSet) that `state` turns into the node's desired
//! datapath configuration.
pub mod certs;
pub mod controller;
pub mod files;
pub mod kube;
pub mod monitor;
