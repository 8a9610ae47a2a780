//! Authorization at `connect()`: the policy matrix (source, destination, port → verdict, rule),
//! Istio's semantics (DENY wins, then ALLOW, then the namespace default).
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use mesh_common::{PolicyKey, PolicyValue, verdict};

use super::{RuleId, RuleInfo, Workload, index::PolicyIndex};
use crate::api::{
    ObjectSet,
    objects::{Action, AuthorizationPolicy, DEFAULT_DENY_LABEL, Source, selector_matches},
};

/// Selector policies whose rules use request attributes the kernel cannot see.
pub(super) fn l7_attribute_problems(objects: &ObjectSet) -> Vec<String> {
    let mut problems = Vec::new();
    for p in objects
        .authorization_policies
        .iter()
        .filter(|p| p.spec.target_ref.is_none())
    {
        for (i, rule) in p.spec.rules.iter().enumerate() {
            if rule.has_l7_attributes() {
                problems.push(format!(
                    "AuthorizationPolicy {} rule {i} uses methods, paths or conditions, which \
                     only a policy with a targetRef (a Service, checked per request) can see; at \
                     connect() it {}",
                    policy_name(p),
                    if p.spec.action == Action::Allow {
                        "never matches"
                    } else {
                        "matches on its sources and ports alone"
                    }
                ));
            }
        }
    }
    problems
}

pub(super) fn source_matches(src: &Source, w: &Workload, policy_ns: &str) -> bool {
    src.matches_workload(policy_ns, &w.namespace, &w.service_account, &w.labels)
}

/// The first rule of `p` matching (source, port) at `connect()` time. A rule with L7 attributes cannot be
/// checked there: it never matches in an ALLOW policy and matches on its L4 parts in a DENY
/// policy (both fail closed; such rules belong in `targetRef` policies).
pub(super) fn matching_rule(p: &AuthorizationPolicy, src: &Workload, port: u16) -> Option<usize> {
    let ns = p.metadata.namespace.as_deref().unwrap_or("default");
    p.spec.rules.iter().position(|r| {
        if r.has_l7_attributes() && p.spec.action == Action::Allow {
            return false;
        }
        let from_ok =
            r.from.is_empty() || r.from.iter().any(|f| source_matches(&f.source, src, ns));
        let to_ok = r.to.is_empty()
            || r.to
                .iter()
                .any(|t| t.operation.ports.is_empty() || t.operation.ports.contains(&port));
        from_ok && to_ok
    })
}

pub(super) fn selects(p: &AuthorizationPolicy, dst: &Workload) -> bool {
    p.spec.target_ref.is_none()
        && p.metadata.namespace.as_deref().unwrap_or("default") == dst.namespace
        && p.spec
            .selector
            .as_ref()
            .is_none_or(|s| selector_matches(s, &dst.labels))
}

pub(super) fn policy_name(p: &AuthorizationPolicy) -> String {
    let (namespace, name) = policy_key(p);
    format!("{namespace}/{name}")
}

/// (namespace, name) of a policy, borrowed (what [`policy_name`] joins).
fn policy_key(p: &AuthorizationPolicy) -> (&str, &str) {
    (
        p.metadata.namespace.as_deref().unwrap_or("default"),
        p.metadata.name.as_deref().unwrap_or("?"),
    )
}

/// Rule ids of one matrix: by policy (namespace, name) and rule index (`None`: its "no ALLOW
/// rule matched"). Borrowed keys: a lookup per decision allocates nothing.
pub(super) type RuleIds<'a> = std::collections::HashMap<(&'a str, &'a str, Option<usize>), u32>;

/// Expands authorization policies into explicit kernel entries for every meshed local source and
/// meshed destination that at least one policy selects. Port 0 stands for "any other port".
#[must_use]
pub fn policy_entries(
    workloads: &[Workload],
    policies: &[Arc<AuthorizationPolicy>],
    default_deny: &BTreeSet<String>,
) -> (BTreeMap<PolicyKey, PolicyValue>, Vec<RuleInfo>) {
    let rules = Rules::new(policies, default_deny);
    let m = policy_matrix(workloads, &rules, Sides::Kernel, None);
    (m.entries, rules.infos)
}

/// Which (source, destination) pairs a matrix covers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Sides {
    /// The kernel's map: this node's sources to every destination.
    Kernel,
    /// The tunnel's inbound checks: other nodes' sources to this node's pods.
    Inbound,
}

impl Sides {
    fn source(self, w: &Workload) -> bool {
        w.meshed
            && match self {
                Self::Kernel => w.local,
                Self::Inbound => !w.local,
            }
    }

    fn destination(self, w: &Workload) -> bool {
        w.meshed && (self == Self::Kernel || w.local)
    }
}

/// One destination's verdicts and what they were decided from: while the same policies (the
/// same objects, with the same rule ids) and default select it, and the sources are the same,
/// the next rebuild takes the entries as they are.
#[derive(Clone, Debug)]
pub(super) struct Row {
    applying: Vec<Arc<AuthorizationPolicy>>,
    ids: Vec<u32>,
    deny_by_default: Option<u32>,
    entries: Vec<(PolicyKey, PolicyValue)>,
}

/// Rows by destination.
pub(super) type Rows = std::collections::HashMap<super::WorkloadId, Arc<Row>>;

/// A matrix: its entries and its rows for the next rebuild.
pub(super) struct Matrix {
    pub(super) entries: BTreeMap<PolicyKey, PolicyValue>,
    pub(super) rows: Rows,
}

/// The verdicts for the meshed (source, destination) pairs of `sides`. `previous`: the rows of
/// the last rebuild, given only when the workloads are the same as then.
pub(super) fn policy_matrix(
    workloads: &[Workload],
    rules: &Rules,
    sides: Sides,
    previous: Option<&Rows>,
) -> Matrix {
    let Rules {
        sorted,
        index,
        ids,
        deny_ids,
        ..
    } = rules;

    let mut entries = BTreeMap::new();
    let mut rows = Rows::new();
    let sources: Vec<&Workload> = workloads.iter().filter(|w| sides.source(w)).collect();
    for dst in workloads.iter().filter(|w| sides.destination(w)) {
        let applying: Vec<&Arc<AuthorizationPolicy>> = index
            .candidates(dst)
            .into_iter()
            .map(|i| sorted[i])
            .filter(|p| selects(p, dst))
            .collect();
        let deny_by_default = deny_ids.get(dst.namespace.as_str()).copied();
        if applying.is_empty() && deny_by_default.is_none() {
            continue;
        }
        // The ids of the applying policies' rules, in order: a row names only these.
        let row_ids = || {
            applying.iter().flat_map(|p| {
                let (ns, name) = policy_key(p);
                (0..p.spec.rules.len())
                    .map(Some)
                    .chain(std::iter::once(None))
                    .map(move |i| ids.get(&(ns, name, i)).copied().unwrap_or(0))
            })
        };
        let kept = previous.and_then(|rows| rows.get(&dst.id)).filter(|row| {
            row.deny_by_default == deny_by_default
                && row.applying.len() == applying.len()
                && row
                    .applying
                    .iter()
                    .zip(&applying)
                    .all(|(a, b)| Arc::ptr_eq(a, b))
                && row.ids.iter().copied().eq(row_ids())
        });
        let row = if let Some(row) = kept {
            Arc::clone(row)
        } else {
            let deciding: Vec<&AuthorizationPolicy> = applying.iter().map(|p| &***p).collect();
            Arc::new(Row {
                applying: applying.iter().map(|p| Arc::clone(p)).collect(),
                ids: row_ids().collect(),
                deny_by_default,
                entries: row_entries(&deciding, &sources, dst, ids, deny_by_default),
            })
        };
        entries.extend(row.entries.iter().copied());
        rows.insert(dst.id, row);
    }
    Matrix { entries, rows }
}

/// The verdicts of every source for destination `dst`, on every port its policies name and on
/// port 0 (any other port).
fn row_entries(
    applying: &[&AuthorizationPolicy],
    sources: &[&Workload],
    dst: &Workload,
    ids: &RuleIds,
    deny_by_default: Option<u32>,
) -> Vec<(PolicyKey, PolicyValue)> {
    let mut ports: BTreeSet<u16> = applying
        .iter()
        .flat_map(|p| p.spec.rules.iter())
        .flat_map(|r| r.to.iter())
        .flat_map(|t| t.operation.ports.iter().copied())
        .collect();
    ports.insert(0);
    let mut out = Vec::with_capacity(sources.len() * ports.len());
    for src in sources {
        for &port in &ports {
            let (v, rule_id) = decide(applying, src, port, ids, deny_by_default);
            let key = PolicyKey {
                src_workload: src.id.get(),
                dst_workload: dst.id.get(),
                dst_port_host: port,
                _pad: 0,
            };
            let value = PolicyValue {
                verdict: v,
                _pad0: 0,
                _pad1: 0,
                rule_id,
            };
            out.push((key, value));
        }
    }
    out
}

/// The policies in name order and their rules, each with an id derived from its name (so that
/// adding or removing a policy leaves the others' ids, and the kernel entries naming them, as
/// they were): one per (policy, rule), one per ALLOW policy for "no ALLOW rule matched", one per
/// default-deny namespace.
pub(super) struct Rules<'a> {
    sorted: Vec<&'a Arc<AuthorizationPolicy>>,
    /// Which of `sorted` can select a workload.
    index: PolicyIndex<'a>,
    pub(super) infos: Vec<RuleInfo>,
    ids: RuleIds<'a>,
    deny_ids: std::collections::HashMap<&'a str, u32>,
}

impl<'a> Rules<'a> {
    pub(super) fn new(
        policies: &'a [Arc<AuthorizationPolicy>],
        default_deny: &'a BTreeSet<String>,
    ) -> Self {
        let mut sorted: Vec<&Arc<AuthorizationPolicy>> = policies.iter().collect();
        sorted.sort_by(|a, b| policy_key(a).cmp(&policy_key(b)));
        let (infos, ids, deny_ids) = rule_ids(&sorted, default_deny);
        let plain: Vec<&AuthorizationPolicy> = sorted.iter().map(|p| &***p).collect();
        Self {
            index: PolicyIndex::new(&plain),
            sorted,
            infos,
            ids,
            deny_ids,
        }
    }
}

fn rule_ids<'a>(
    sorted: &[&'a Arc<AuthorizationPolicy>],
    default_deny: &'a BTreeSet<String>,
) -> (
    Vec<RuleInfo>,
    RuleIds<'a>,
    std::collections::HashMap<&'a str, u32>,
) {
    let mut rules = Vec::new();
    let mut ids = RuleIds::new();
    let mut deny_ids = std::collections::HashMap::new();
    let mut taken = BTreeSet::new();
    let mut next_id = |what: &str| {
        let id = super::stable_id(what, &taken);
        taken.insert(id);
        id
    };
    for p in sorted {
        let name = policy_name(p);
        let (p_ns, p_name) = policy_key(p);
        let action = match p.spec.action {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        };
        for (i, _) in p.spec.rules.iter().enumerate() {
            let id = next_id(&format!("{name}#{i}"));
            ids.insert((p_ns, p_name, Some(i)), id);
            rules.push(RuleInfo {
                id: RuleId(id),
                policy: name.clone(),
                action: action.into(),
                rule: Some(i),
                description: format!("{action} by rule {i} of {name}"),
            });
        }
        if p.spec.action == Action::Allow {
            let id = next_id(&format!("{name}#none"));
            ids.insert((p_ns, p_name, None), id);
            rules.push(RuleInfo {
                id: RuleId(id),
                policy: name.clone(),
                action: "DENY".into(),
                rule: None,
                description: format!(
                    "DENY: no ALLOW rule matched ({name} selects the destination)"
                ),
            });
        }
    }
    for ns in default_deny {
        let id = next_id(&format!("namespace {ns}"));
        deny_ids.insert(ns.as_str(), id);
        rules.push(RuleInfo {
            id: RuleId(id),
            policy: format!("namespace {ns}"),
            action: "DENY".into(),
            rule: None,
            description: format!(
                "DENY: namespace {ns} is default-deny ({DEFAULT_DENY_LABEL}) and no ALLOW rule \
                 matched"
            ),
        });
    }
    (rules, ids, deny_ids)
}

/// Verdict for one (source, destination port) given the policies selecting the destination:
/// the enforced policies decide; if they allow and the dry-run ones would deny, the verdict is
/// AUDIT (allowed, recorded). Port 0 stands for "a port no rule names": only rules without port
/// lists can match it. `deny_by_default`: the rule id of the destination namespace's
/// default-deny, if it has one.
pub(super) fn decide(
    applying: &[&AuthorizationPolicy],
    src: &Workload,
    port: u16,
    ids: &RuleIds,
    deny_by_default: Option<u32>,
) -> (u8, u32) {
    let enforced: Vec<&AuthorizationPolicy> = applying
        .iter()
        .copied()
        .filter(|p| !p.spec.dry_run)
        .collect();
    let (v, rule_id) = evaluate(&enforced, src, port, ids, deny_by_default);
    if v != verdict::DENY && enforced.len() < applying.len() {
        let (would, would_rule) = evaluate(applying, src, port, ids, deny_by_default);
        if would == verdict::DENY {
            return (verdict::AUDIT, would_rule);
        }
    }
    (v, rule_id)
}

/// Istio's semantics for one set of policies: DENY rules win, then ALLOW lists.
pub(super) fn evaluate(
    applying: &[&AuthorizationPolicy],
    src: &Workload,
    port: u16,
    ids: &RuleIds,
    deny_by_default: Option<u32>,
) -> (u8, u32) {
    let rule_id = |p: &AuthorizationPolicy, i| {
        let (namespace, name) = policy_key(p);
        ids.get(&(namespace, name, i)).copied().unwrap_or(0)
    };
    for p in applying.iter().filter(|p| p.spec.action == Action::Deny) {
        if let Some(i) = matching_rule(p, src, port) {
            return (verdict::DENY, rule_id(p, Some(i)));
        }
    }
    let mut allows = applying
        .iter()
        .filter(|p| p.spec.action == Action::Allow)
        .peekable();
    let Some(first) = allows.peek().copied() else {
        return deny_by_default.map_or((verdict::FAST, 0), |id| (verdict::DENY, id));
    };
    for p in allows {
        if let Some(i) = matching_rule(p, src, port) {
            return (verdict::FAST, rule_id(p, Some(i)));
        }
    }
    (verdict::DENY, rule_id(first, None))
}
