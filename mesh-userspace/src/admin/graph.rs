//! The service graph (`/graph`, drawn by the page at `/ui`): workloads and L7 services as
//! nodes; as edges, who talked to whom and which way the bytes went — socket to socket in the
//! kernel (`fast`), the normal stack (`kernel`), the L7 engine (`l7`), the mTLS tunnel
//! (`tunnel`) or refused (`denied`) — with each edge's golden numbers and the reasons (policy
//! rules) its flows were given.
//!
//! Built from what the agent already has, so the picture agrees with `weft flows` and with
//! Prometheus: the flow table (paths and reasons of live and recent flows), the kernel's pair
//! counters (connections, bytes, fast-path bytes, denials since the agent started) and the L7
//! engine's metrics (requests, 5xx, latency histogram), read from their `OpenMetrics` text.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{flows::FlowSnapshot, metrics::KernelSnapshot, state::NodeState};

/// The engine's own workload in the pair counters and the flow table.
const ENGINE: &str = "weft-system/l7-engine";
/// At most this many distinct reasons are kept per edge.
const MAX_REASONS: usize = 6;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Graph {
    /// The agent's node (empty for a merged graph).
    #[serde(default)]
    pub node: String,
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<GraphEdge>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GraphNode {
    /// `namespace/name` of a workload, `svc:namespace/name` of an L7 service, or an address
    /// outside the mesh.
    pub id: String,
    /// What to show: `namespace/name` or the address.
    pub label: String,
    /// `workload`, `service` or `external`.
    pub kind: String,
    pub meshed: bool,
    /// On this agent's node.
    pub local: bool,
    /// The node it runs on, when known (in a merged graph: the node whose agent has it local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// SPIFFE id of a workload.
    pub identity: Option<String>,
    /// mTLS mode of a workload (PERMISSIVE or STRICT).
    pub mtls: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GraphEdge {
    pub source: String,
    pub target: String,
    /// `fast`, `kernel`, `l7`, `tunnel`, `denied`, `audit` or `passthrough`.
    pub path: String,
    /// Connections opened (kernel counters, since the agent started).
    pub connections: u64,
    /// Connections refused by policy.
    pub denied: u64,
    /// Payload bytes, both directions.
    pub bytes: u64,
    /// Of which socket to socket in the kernel.
    pub fast_bytes: u64,
    /// L7 edges: requests answered, of which 5xx, and latency quantiles (milliseconds).
    pub requests: Option<u64>,
    pub errors: Option<u64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Flows open now.
    pub live: u64,
    /// Destination ports seen (the service's port for L7 edges), a few at most.
    pub ports: Vec<u16>,
    /// Why its flows got their verdicts (policy rules, the mesh default…).
    pub reasons: Vec<String>,
}

/// One sample of an `OpenMetrics` text.
#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Samples of `OpenMetrics` text (`name{l="v",…} value`); comments and malformed lines are skipped.
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(sample)
        .collect()
}

fn sample(line: &str) -> Option<Sample> {
    let Some(open) = line.find('{') else {
        let (name, value) = line.split_once(' ')?;
        return Some(Sample {
            name: name.to_owned(),
            labels: BTreeMap::new(),
            value: value.split_whitespace().next()?.parse().ok()?,
        });
    };
    let mut rest = &line[open + 1..];
    let mut labels = BTreeMap::new();
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            rest = after;
            break;
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_owned();
        // The value: "…" with \" \\ and \n escapes.
        let quoted = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut close = None;
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => {
                    close = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        rest = &quoted[close? + 1..];
        labels.insert(key, value);
    }
    Some(Sample {
        name: line[..open].to_owned(),
        labels,
        value: rest.split_whitespace().next()?.parse().ok()?,
    })
}

/// The `q` quantile of a cumulative histogram (`le` upper bound, count), linear within the
/// bucket, as `PromQL`'s `histogram_quantile` does.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let in_bucket = count - prev.1;
            let frac = if in_bucket > 0.0 {
                (rank - prev.1) / in_bucket
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    Some(prev.0)
}

/// Golden numbers per (source workload, destination service) from the engine's metrics.
#[derive(Debug, Default)]
struct L7Numbers {
    requests: f64,
    errors: f64,
    /// `le` → cumulative count, summed over routes.
    buckets: BTreeMap<u64, (f64, f64)>,
}

fn l7_numbers(text: &str) -> BTreeMap<(String, String), L7Numbers> {
    let mut out: BTreeMap<(String, String), L7Numbers> = BTreeMap::new();
    for s in samples(text) {
        let l = |k: &str| s.labels.get(k).map_or("", String::as_str);
        let key = (
            format!("{}/{}", l("source_namespace"), l("source_workload")),
            format!(
                "{}/{}",
                l("destination_namespace"),
                l("destination_service")
            ),
        );
        match s.name.as_str() {
            "weft_l7_requests_total" => {
                let n = out.entry(key).or_default();
                n.requests += s.value;
                if l("status_class") == "5xx" {
                    n.errors += s.value;
                }
            }
            "weft_l7_request_duration_seconds_bucket" => {
                let le: f64 = match l("le") {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().unwrap_or(f64::INFINITY),
                };
                let slot = out
                    .entry(key)
                    .or_default()
                    .buckets
                    .entry(le.to_bits())
                    .or_insert((le, 0.0));
                slot.1 += s.value;
            }
            _ => {}
        }
    }
    out
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "counter samples are exact non-negative integers"
)]
fn count(v: f64) -> u64 {
    v.max(0.0) as u64
}

type Edges = BTreeMap<(String, String, String), GraphEdge>;

/// The edge from `source` to `target` by `path`, made empty if new.
fn edge<'e>(edges: &'e mut Edges, source: &str, target: &str, path: &str) -> &'e mut GraphEdge {
    edges
        .entry((source.to_owned(), target.to_owned(), path.to_owned()))
        .or_insert_with(|| GraphEdge {
            source: source.to_owned(),
            target: target.to_owned(),
            path: path.to_owned(),
            ..GraphEdge::default()
        })
}

/// The graph now.
#[must_use]
#[allow(
    clippy::too_many_lines,
    reason = "one pass per source of facts, in order"
)]
pub fn build(
    node: &NodeState,
    flows: &FlowSnapshot,
    kernel: &KernelSnapshot,
    metrics_text: &str,
) -> Graph {
    let mut nodes: BTreeMap<String, GraphNode> = node
        .workloads
        .iter()
        .map(|w| {
            (
                w.key(),
                GraphNode {
                    id: w.key(),
                    label: w.key(),
                    kind: "workload".into(),
                    meshed: w.meshed,
                    local: w.local,
                    host: w.local.then(|| node.node.clone()),
                    identity: Some(w.identity.to_string()),
                    mtls: Some(format!("{:?}", w.mtls).to_uppercase()),
                },
            )
        })
        .collect();
    let mut edges: Edges = BTreeMap::new();
    // `ns/name:port` of the flow table → the service node's id and the port.
    let service_of = |s: &str| {
        let (name, port) = s.rsplit_once(':').unwrap_or((s, ""));
        (format!("svc:{name}"), port.parse::<u16>().ok())
    };

    // The flow table: which way each pair's flows went, and why.
    let rows = flows
        .live
        .iter()
        .map(|f| (f, true))
        .chain(flows.recent.iter().map(|f| (f, false)))
        .chain(flows.denied.iter().map(|f| (f, false)));
    for (f, live) in rows {
        let src = f
            .src
            .workload
            .clone()
            .unwrap_or_else(|| f.src.ip.to_string());
        if src == ENGINE || (f.path == "l7" && f.service.is_none()) {
            continue; // the engine's legs to backends: drawn from the services below
        }
        let (target, port) = match (&f.service, f.path.as_str()) {
            (Some(svc), "l7") => service_of(svc),
            _ => (
                f.dst
                    .workload
                    .clone()
                    .unwrap_or_else(|| f.dst.ip.to_string()),
                Some(f.dst.port),
            ),
        };
        let e = edge(&mut edges, &src, &target, &f.path);
        e.live += u64::from(live);
        if let Some(port) = port.filter(|p| *p != 0)
            && e.ports.len() < 4
            && !e.ports.contains(&port)
        {
            e.ports.push(port);
        }
        if f.path == "denied" {
            e.denied = e.denied.max(f.attempts);
        }
        if e.reasons.len() < MAX_REASONS && !e.reasons.contains(&f.reason) {
            e.reasons.push(f.reason.clone());
        }
    }

    // Kernel counters per workload pair, onto the pair's edges (or a new one when the flow
    // table no longer remembers its flows).
    for (labels, p) in &kernel.pairs {
        let src = format!("{}/{}", labels.src_namespace, labels.src_workload);
        let dst = format!("{}/{}", labels.dst_namespace, labels.dst_workload);
        if src == ENGINE || dst == ENGINE {
            continue;
        }
        let bytes = p.bytes_to_dst + p.bytes_to_src;
        let known: Vec<String> = edges
            .keys()
            .filter(|(s, t, path)| *s == src && *t == dst && path != "l7")
            .map(|(_, _, path)| path.clone())
            .collect();
        let path = if known.is_empty() {
            let crosses = |id: &str, local: bool| nodes.get(id).is_some_and(|n| n.local == local);
            if p.conns_denied > 0 && p.conns_opened == 0 {
                "denied".to_owned()
            } else if crosses(&src, true) && crosses(&dst, false) {
                "tunnel".to_owned() // to another node's pod: the engine's mTLS tunnel
            } else if p.bytes_fast > 0 || p.conns_fast > 0 {
                "fast".to_owned()
            } else {
                "kernel".to_owned()
            }
        } else {
            known[0].clone()
        };
        let e = edge(&mut edges, &src, &dst, &path);
        e.connections += p.conns_opened;
        e.denied = e.denied.max(p.conns_denied);
        e.bytes += bytes;
        e.fast_bytes += p.bytes_fast;
    }

    // L7 services: client → service with the engine's numbers, service → its backends.
    for ((src, service), n) in l7_numbers(metrics_text) {
        if n.requests <= 0.0 && n.buckets.is_empty() {
            continue;
        }
        let buckets: Vec<(f64, f64)> = n.buckets.values().copied().collect();
        let e = edge(&mut edges, &src, &format!("svc:{service}"), "l7");
        e.requests = Some(count(n.requests));
        e.errors = Some(count(n.errors));
        e.p50_ms = quantile(0.5, &buckets).map(|s| s * 1000.0);
        e.p99_ms = quantile(0.99, &buckets).map(|s| s * 1000.0);
    }
    let engine_bytes: BTreeMap<String, (u64, u64, u64)> = kernel
        .pairs
        .iter()
        .filter(|(l, _)| format!("{}/{}", l.src_namespace, l.src_workload) == ENGINE)
        .map(|(l, p)| {
            (
                format!("{}/{}", l.dst_namespace, l.dst_workload),
                (
                    p.conns_opened,
                    p.bytes_to_dst + p.bytes_to_src,
                    p.bytes_fast,
                ),
            )
        })
        .collect();
    let drawn: BTreeSet<String> = edges
        .keys()
        .filter(|(_, _, path)| path == "l7")
        .map(|(_, t, _)| t.clone())
        .collect();
    for svc in node.services.iter().filter(|s| s.l7) {
        let id = format!("svc:{}/{}", svc.namespace, svc.name);
        if !drawn.contains(&id) {
            continue; // an L7 service nobody called yet
        }
        nodes.entry(id.clone()).or_insert_with(|| GraphNode {
            id: id.clone(),
            label: format!("{}/{}", svc.namespace, svc.name),
            kind: "service".into(),
            meshed: true,
            local: true,
            host: None,
            identity: None,
            mtls: None,
        });
        for (wid, _, target_port) in &svc.backends {
            let Some(w) = node.workload(*wid) else {
                continue;
            };
            let e = edge(&mut edges, &id, &w.key(), "l7");
            if !e.ports.contains(target_port) && e.ports.len() < 4 {
                e.ports.push(*target_port);
            }
            if let Some((conns, bytes, fast)) = engine_bytes.get(&w.key()) {
                e.connections = *conns;
                e.bytes = *bytes;
                e.fast_bytes = *fast;
            }
        }
    }

    let edges: Vec<GraphEdge> = edges.into_values().collect();
    for e in &edges {
        for id in [&e.source, &e.target] {
            nodes.entry(id.clone()).or_insert_with(|| GraphNode {
                id: id.clone(),
                label: id.trim_start_matches("svc:").to_owned(),
                kind: if id.starts_with("svc:") {
                    "service"
                } else if id.contains('/') {
                    "workload"
                } else {
                    "external"
                }
                .into(),
                meshed: false,
                local: false,
                host: None,
                identity: None,
                mtls: None,
            });
        }
    }
    Graph {
        node: node.node.clone(),
        nodes: nodes.into_values().collect(),
        edges,
    }
}

/// The cluster's graph from its agents' graphs.
///
/// An edge whose source workload runs on a reporting agent's node is counted by that agent
/// alone (the client's kernel and engine see every one of its connections and requests); a
/// receiving agent's view of the same edge is then left out, so nothing is counted twice.
/// Other edges (a service to its backends, a source outside the mesh) are the sum of what each
/// agent saw: each saw its own share. Latency quantiles cannot be merged exactly from
/// quantiles: the merged p50 is the busiest reporter's, the merged p99 the highest.
#[must_use]
pub fn merge(graphs: &[Graph]) -> Graph {
    // Each report's own workloads, looked up once per report.
    let local: Vec<BTreeSet<&str>> = graphs
        .iter()
        .map(|g| {
            g.nodes
                .iter()
                .filter(|n| n.local && n.kind == "workload")
                .map(|n| n.id.as_str())
                .collect()
        })
        .collect();
    let by_source: BTreeSet<(&str, &str, &str)> = graphs
        .iter()
        .zip(&local)
        .flat_map(|(g, local)| {
            g.edges
                .iter()
                .filter(|e| local.contains(e.source.as_str()))
                .map(|e| (e.source.as_str(), e.target.as_str(), e.path.as_str()))
        })
        .collect();
    let mut nodes: BTreeMap<String, GraphNode> = BTreeMap::new();
    let mut edges: Edges = BTreeMap::new();
    for (g, local) in graphs.iter().zip(&local) {
        for n in &g.nodes {
            let merged = nodes.entry(n.id.clone()).or_insert_with(|| GraphNode {
                local: false,
                host: None,
                ..n.clone()
            });
            merged.meshed |= n.meshed;
            merged.identity = merged.identity.take().or_else(|| n.identity.clone());
            merged.mtls = merged.mtls.take().or_else(|| n.mtls.clone());
            if n.local && n.kind == "workload" {
                merged.local = true;
                merged.host = n.host.clone().or_else(|| Some(g.node.clone()));
            }
        }
        for e in &g.edges {
            let key = (e.source.as_str(), e.target.as_str(), e.path.as_str());
            if by_source.contains(&key) && !local.contains(e.source.as_str()) {
                continue; // the receiving side of an edge its client's agent reports
            }
            let m = edge(&mut edges, &e.source, &e.target, &e.path);
            let busier = e.requests.unwrap_or(0) > m.requests.unwrap_or(0);
            m.connections += e.connections;
            m.denied += e.denied;
            m.bytes += e.bytes;
            m.fast_bytes += e.fast_bytes;
            m.live += e.live;
            if busier {
                m.p50_ms = e.p50_ms;
            }
            m.p99_ms = match (m.p99_ms, e.p99_ms) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            let add = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
            };
            m.requests = add(m.requests, e.requests);
            m.errors = add(m.errors, e.errors);
            for p in &e.ports {
                if m.ports.len() < 4 && !m.ports.contains(p) {
                    m.ports.push(*p);
                }
            }
            for r in &e.reasons {
                if m.reasons.len() < MAX_REASONS && !m.reasons.contains(r) {
                    m.reasons.push(r.clone());
                }
            }
        }
    }
    Graph {
        node: String::new(),
        nodes: nodes.into_values().collect(),
        edges: edges.into_values().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(id: &str, local: bool) -> GraphNode {
        GraphNode {
            id: id.into(),
            label: id.into(),
            kind: "workload".into(),
            meshed: true,
            local,
            host: None,
            identity: None,
            mtls: None,
        }
    }

    fn numbers(
        source: &str,
        target: &str,
        path: &str,
        connections: u64,
        requests: Option<u32>,
    ) -> GraphEdge {
        GraphEdge {
            source: source.into(),
            target: target.into(),
            path: path.into(),
            connections,
            bytes: connections * 100,
            requests: requests.map(u64::from),
            errors: requests.map(|_| 1),
            p50_ms: requests.map(f64::from),
            p99_ms: requests.map(|r| 10.0 * f64::from(r)),
            ..GraphEdge::default()
        }
    }

    #[test]
    fn merging_counts_each_edge_once_and_each_share() {
        // n1 runs a; n2 runs b and c. a → b crosses nodes (both agents see it); both engines
        // send to b behind svc:web.
        let n1 = Graph {
            node: "n1".into(),
            nodes: vec![workload("d/a", true), workload("d/b", false)],
            edges: vec![
                numbers("d/a", "d/b", "tunnel", 5, None),
                numbers("svc:d/web", "d/b", "l7", 3, None),
                numbers("d/a", "svc:d/web", "l7", 3, Some(30)),
            ],
        };
        let n2 = Graph {
            node: "n2".into(),
            nodes: vec![
                workload("d/a", false),
                workload("d/b", true),
                workload("d/c", true),
            ],
            edges: vec![
                numbers("d/a", "d/b", "tunnel", 5, None),
                numbers("svc:d/web", "d/b", "l7", 2, None),
                numbers("d/c", "svc:d/web", "l7", 2, Some(20)),
            ],
        };
        let g = merge(&[n1, n2]);
        let find = |s: &str, t: &str, p: &str| {
            g.edges
                .iter()
                .find(|e| e.source == s && e.target == t && e.path == p)
                .unwrap_or_else(|| panic!("no {s} → {t} {p}: {:?}", g.edges))
        };
        assert_eq!(
            find("d/a", "d/b", "tunnel").connections,
            5,
            "counted by a's agent only"
        );
        assert_eq!(
            find("svc:d/web", "d/b", "l7").connections,
            5,
            "each engine's share"
        );
        assert_eq!(find("d/a", "svc:d/web", "l7").requests, Some(30));
        assert_eq!(g.edges.len(), 4);
        let host = |id: &str| {
            g.nodes
                .iter()
                .find(|n| n.id == id)
                .and_then(|n| n.host.clone())
        };
        assert_eq!(host("d/a").as_deref(), Some("n1"));
        assert_eq!(host("d/b").as_deref(), Some("n2"));
        assert_eq!(host("d/c").as_deref(), Some("n2"));
    }

    #[test]
    fn parses_openmetrics_samples_with_escapes() {
        let text = "# HELP x y\nweft_l7_requests_total{source_namespace=\"default\",source_workload=\"a\\\"b\",status_class=\"5xx\"} 7\nweft_up 1\nbroken{x=\"1\" 2\n";
        let s = samples(text);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].labels["source_workload"], "a\"b");
        assert_eq!(s[0].labels["status_class"], "5xx");
        assert!((s[0].value - 7.0).abs() < f64::EPSILON);
        assert_eq!(s[1].name, "weft_up");
    }

    #[test]
    fn quantiles_interpolate_within_the_bucket() {
        let b = [
            (0.001, 50.0),
            (0.002, 90.0),
            (0.004, 100.0),
            (f64::INFINITY, 100.0),
        ];
        let p50 = quantile(0.5, &b).unwrap();
        assert!((p50 - 0.001).abs() < 1e-9, "{p50}");
        let p99 = quantile(0.99, &b).unwrap();
        assert!((p99 - 0.0038).abs() < 1e-9, "{p99}");
        assert_eq!(quantile(0.5, &[(f64::INFINITY, 0.0)]), None);
    }

    #[test]
    fn engine_numbers_per_source_and_service() {
        let text = "weft_l7_requests_total{source_namespace=\"default\",source_workload=\"client\",destination_namespace=\"default\",destination_service=\"web\",route=\"default\",status_class=\"2xx\",response_code=\"200\"} 9\n\
weft_l7_requests_total{source_namespace=\"default\",source_workload=\"client\",destination_namespace=\"default\",destination_service=\"web\",route=\"default\",status_class=\"5xx\",response_code=\"500\"} 1\n\
weft_l7_request_duration_seconds_bucket{source_namespace=\"default\",source_workload=\"client\",destination_namespace=\"default\",destination_service=\"web\",route=\"default\",le=\"0.001\"} 10\n\
weft_l7_request_duration_seconds_bucket{source_namespace=\"default\",source_workload=\"client\",destination_namespace=\"default\",destination_service=\"web\",route=\"default\",le=\"+Inf\"} 10\n";
        let n = l7_numbers(text);
        let web = &n[&("default/client".to_owned(), "default/web".to_owned())];
        assert!((web.requests - 10.0).abs() < f64::EPSILON);
        assert!((web.errors - 1.0).abs() < f64::EPSILON);
        assert_eq!(web.buckets.len(), 2);
    }
}
