//! Weft's userspace: the node agent and the CLI that talks to it.
//!
//! Layout (see ARCHITECTURE.md): `control` turns YAML objects into a desired node `state`; `ebpf`
//! (the only module that imports aya) loads or adopts the datapath and keeps its maps in sync;
//! `metrics` and `admin` expose what the kernel counted; `app` wires it together; `cli` is the
//! user's side.
#![deny(unsafe_code)]

pub mod admin;
pub mod agent_client;
pub mod api;
pub mod app;
pub mod cgroups;
pub mod cli;
pub mod cni;
pub mod config;
pub mod control;
pub mod ebpf;
pub mod flows;
pub mod identity;
pub mod interfaces;
pub mod metrics;
pub mod pressure;
pub mod proxy;
pub mod signal;
pub mod state;
pub mod tap;
