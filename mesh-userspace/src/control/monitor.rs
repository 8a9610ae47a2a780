//! What the controller knows about itself and the mesh, for Prometheus and for its page: the
//! verdict on every object (the same findings `weft check` and the agents compute), whether
//! this replica leads, its status writes, the certificates it issued, and which node agents
//! its page reaches.
//!
//! Metrics (prefix `weft_controller_`; cardinality bounded by the object kinds, five states
//! and three results):
//! - `leader` (gauge, 1 on the replica holding the Lease);
//! - `objects{kind,state}` (gauge; state `programmed`, `unresolved`, `not_accepted`);
//! - `passes_total`, `pass_duration_seconds` (one pass judges every object);
//! - `status_writes_total{kind,result}` (`ok`, `failed`);
//! - `certificates_total{result}` (`issued`, `refused`);
//! - `agents{state}` (`up`, `down`: the node agents the page last asked),
//!   `agent_requests_failed_total`.
use std::sync::Mutex;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::state::validate::Finding;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ObjectLabels {
    kind: String,
    state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WriteLabels {
    kind: String,
    result: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

/// The controller's metrics and its latest findings; shared by its tasks and its page.
pub struct Monitor {
    registry: Registry,
    leader: Gauge,
    objects: Family<ObjectLabels, Gauge>,
    passes: Counter,
    pass_seconds: Histogram,
    status_writes: Family<WriteLabels, Counter>,
    certificates: Family<ResultLabels, Counter>,
    agents: Family<StateLabels, Gauge>,
    agent_failures: Counter,
    findings: Mutex<Vec<Finding>>,
    judged_once: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").finish_non_exhaustive()
    }
}

impl Default for Monitor {
    fn default() -> Self {
        Self::new()
    }
}

impl Monitor {
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let r = registry.sub_registry_with_prefix("weft_controller");
        let leader = Gauge::default();
        r.register(
            "leader",
            "1 while this replica holds the Lease and writes status",
            leader.clone(),
        );
        let objects = Family::<ObjectLabels, Gauge>::default();
        r.register(
            "objects",
            "Weft objects and routes (per Service parent) by verdict",
            objects.clone(),
        );
        let passes = Counter::default();
        r.register("passes", "Passes that judged every object", passes.clone());
        let pass_seconds = Histogram::new([0.001, 0.005, 0.02, 0.1, 0.5, 2.0, 10.0]);
        r.register(
            "pass_duration_seconds",
            "Time to judge every object and write the statuses that changed",
            pass_seconds.clone(),
        );
        let status_writes = Family::<WriteLabels, Counter>::default();
        r.register(
            "status_writes",
            "Status subresource writes",
            status_writes.clone(),
        );
        let certificates = Family::<ResultLabels, Counter>::default();
        r.register(
            "certificates",
            "Workload certificate requests answered",
            certificates.clone(),
        );
        let agents = Family::<StateLabels, Gauge>::default();
        r.register(
            "agents",
            "Node agents the controller's page reached (up) or not (down) when last asked",
            agents.clone(),
        );
        let agent_failures = Counter::default();
        r.register(
            "agent_requests_failed",
            "Requests to node agents that failed or timed out",
            agent_failures.clone(),
        );
        Self {
            registry,
            leader,
            objects,
            passes,
            pass_seconds,
            status_writes,
            certificates,
            agents,
            agent_failures,
            findings: Mutex::new(Vec::new()),
            judged_once: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The metrics as `OpenMetrics` text.
    ///
    /// # Errors
    /// When the text cannot be written (never for these types).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// A pass judged every object in `seconds`: these are the verdicts now.
    pub fn judged(&self, findings: Vec<Finding>, seconds: f64) {
        self.passes.inc();
        self.pass_seconds.observe(seconds);
        self.objects.clear();
        for f in &findings {
            self.objects
                .get_or_create(&ObjectLabels {
                    kind: f.kind.to_owned(),
                    state: f.verdict.state().label().to_owned(),
                })
                .inc();
        }
        *self
            .findings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = findings;
        self.judged_once
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether a pass has judged every object since the controller started (its caches synced).
    #[must_use]
    pub fn ready(&self) -> bool {
        self.judged_once.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The latest verdicts.
    #[must_use]
    pub fn findings(&self) -> Vec<Finding> {
        self.findings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn status_written(&self, kind: &str, ok: bool) {
        self.status_writes
            .get_or_create(&WriteLabels {
                kind: kind.to_owned(),
                result: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    pub fn certificate(&self, issued: bool) {
        self.certificates
            .get_or_create(&ResultLabels {
                result: if issued { "issued" } else { "refused" }.to_owned(),
            })
            .inc();
    }

    /// The page asked the agents: `up` answered, `down` did not.
    pub fn agents_asked(&self, up: usize, down: usize) {
        for (state, n) in [("up", up), ("down", down)] {
            self.agents
                .get_or_create(&StateLabels {
                    state: state.to_owned(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.agent_failures.inc_by(down as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_become_counts_by_kind_and_state() {
        let mut set = crate::api::objects::ObjectSet::default();
        set.add_yaml(
            "test.yaml",
            "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: d}\nspec: {selector: {matchLabels: {app: x}}, action: ALLOW, rules: [{}]}\n",
        );
        let m = Monitor::new();
        m.set_leader(true);
        m.judged(crate::state::validate::findings(&set), 0.01);
        m.agents_asked(2, 1);
        let text = m.encode().expect("encoded");
        assert!(text.contains("weft_controller_leader 1"), "{text}");
        assert!(
            text.contains(
                "weft_controller_objects{kind=\"AuthorizationPolicy\",state=\"programmed\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("weft_controller_agents{state=\"down\"} 1"),
            "{text}"
        );
        assert!(text.contains("weft_controller_passes_total 1"), "{text}");
        assert_eq!(m.findings().len(), 1);
    }
}
