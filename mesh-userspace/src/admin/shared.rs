//! What the agent shares with its admin API: the datapath thread writes it, the API reads it.
use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::{
    config::AgentConfig,
    ebpf::{self, Startup},
    flows::FlowSnapshot,
    metrics::Metrics,
    proxy::Engine,
    state::NodeState,
};

/// What the admin API serves.
#[derive(Debug, Default, Serialize)]
pub struct Shared {
    pub config: Option<AgentConfig>,
    pub startup: Option<Startup>,
    pub ready: bool,
    /// Shared with the datapath thread, which replaces it when the objects change.
    pub node: std::sync::Arc<NodeState>,
    pub config_errors: Vec<String>,
    pub last_sync_error: Option<String>,
    pub flows: FlowSnapshot,
    /// Interfaces with TC counters: name → pod.
    pub interfaces: BTreeMap<String, String>,
    /// Whether this kernel's socket redirect serves applications exactly (run at start).
    pub socket_self_test: Option<ebpf::selftest::SocketSelfTest>,
    /// This build's datapath generation (what the pins record once an upgrade finished).
    pub datapath_generation: Option<String>,
    /// Enrolments from the CNI plugin, to the datapath thread.
    #[serde(skip)]
    pub enrol: Option<std::sync::mpsc::Sender<Wake>>,
    #[serde(skip)]
    pub metrics: Metrics,
    #[serde(skip)]
    pub registry: Option<Arc<Registry>>,
    #[serde(skip)]
    pub engine: Option<Arc<Engine>>,
    /// Live events (`/tap`): the kernel's and the engine's.
    #[serde(skip)]
    pub tap: Arc<crate::tap::Hub>,
}

pub type SharedState = Arc<RwLock<Shared>>;

/// A pod the CNI plugin asks to enrol, and where to answer (`Ok` once it is in the kernel).
pub type EnrolRequest = (
    crate::cni::Enrolment,
    tokio::sync::oneshot::Sender<Result<(), String>>,
);

/// What wakes the datapath thread before its next pass is due.
pub enum Wake {
    /// A pod the CNI plugin asks to enrol.
    Enrol(EnrolRequest),
    /// The object source has a new view (Kubernetes mode: a watch event).
    Objects,
}
