//! Lookups built once per rebuild, so that matching Services and policies to pods costs what
//! they select rather than (objects × pods): with 10,000 pods and 1,000 Services and policies,
//! `cargo xtask bench scale` found every rebuild comparing names and labels some 10⁸ times
//! (seconds from a policy change to the kernel).
use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use super::Workload;
use crate::api::objects::AuthorizationPolicy;

/// namespace → label → value → indices: nested, so that lookups take `&str` of any lifetime.
type ByLabel<'a> = HashMap<&'a str, HashMap<&'a str, HashMap<&'a str, Vec<usize>>>>;

fn by_label<'m>(map: &'m ByLabel, ns: &str, k: &str, v: &str) -> Option<&'m Vec<usize>> {
    map.get(ns)?.get(k)?.get(v)
}

fn push<'a>(map: &mut ByLabel<'a>, ns: &'a str, k: &'a str, v: &'a str, i: usize) {
    map.entry(ns)
        .or_default()
        .entry(k)
        .or_default()
        .entry(v)
        .or_default()
        .push(i);
}

/// Workloads by namespace and by (namespace, label, value), as ascending indices.
pub(super) struct WorkloadIndex<'a> {
    by_namespace: HashMap<&'a str, Vec<usize>>,
    by_label: ByLabel<'a>,
}

impl<'a> WorkloadIndex<'a> {
    pub(super) fn new(workloads: &'a [Workload]) -> Self {
        let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut labels = ByLabel::new();
        for (i, w) in workloads.iter().enumerate() {
            by_namespace.entry(&w.namespace).or_default().push(i);
            for (k, v) in &w.labels {
                push(&mut labels, &w.namespace, k, v, i);
            }
        }
        Self {
            by_namespace,
            by_label: labels,
        }
    }

    /// The workloads of `namespace` that can match a selector whose first pair is `first`
    /// (every workload of the namespace when it has none); the caller still checks the whole
    /// selector.
    pub(super) fn candidates(&self, namespace: &str, first: Option<(&str, &str)>) -> &[usize] {
        match first {
            Some((k, v)) => by_label(&self.by_label, namespace, k, v),
            None => self.by_namespace.get(namespace),
        }
        .map_or(&[], Vec::as_slice)
    }
}

/// Pods by (namespace, name).
pub(super) fn pods_by_key(pods: &[Arc<Pod>]) -> HashMap<(&str, &str), &Pod> {
    pods.iter()
        .filter_map(|p| {
            let name = p.metadata.name.as_deref()?;
            Some((
                (p.metadata.namespace.as_deref().unwrap_or("default"), name),
                &**p,
            ))
        })
        .collect()
}

/// Selector policies (no `targetRef`) that can select a workload: per namespace, those whose
/// selector has no label pair to index by, and by the first `matchLabels` pair of the others.
/// Indices into the slice given to [`PolicyIndex::new`].
pub(super) struct PolicyIndex<'p> {
    unindexed: HashMap<&'p str, Vec<usize>>,
    by_label: ByLabel<'p>,
}

impl<'p> PolicyIndex<'p> {
    pub(super) fn new(policies: &[&'p AuthorizationPolicy]) -> Self {
        let mut unindexed: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut labels = ByLabel::new();
        for (i, p) in policies.iter().enumerate() {
            if p.spec.target_ref.is_some() {
                continue;
            }
            let ns = p.metadata.namespace.as_deref().unwrap_or("default");
            let first = p
                .spec
                .selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .and_then(|m| m.iter().next());
            match first {
                Some((k, v)) => push(&mut labels, ns, k, v, i),
                None => unindexed.entry(ns).or_default().push(i),
            }
        }
        Self {
            unindexed,
            by_label: labels,
        }
    }

    /// Ascending indices of the policies that can select `w` (the caller still checks each).
    pub(super) fn candidates(&self, w: &Workload) -> Vec<usize> {
        let ns = w.namespace.as_str();
        let mut out: Vec<usize> = self.unindexed.get(ns).cloned().unwrap_or_default();
        for (k, v) in &w.labels {
            if let Some(more) = by_label(&self.by_label, ns, k, v) {
                out.extend_from_slice(more);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}
