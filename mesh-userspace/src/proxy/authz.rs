//! Per-request authorization of L7 services: `AuthorizationPolicy` objects whose `targetRef`
//! names the Service, with Istio's semantics (DENY rules win; if any ALLOW policy applies, a
//! request must match one of its rules). Rules may look at the source (service account,
//! namespace, pod labels, the JWT principal), the Service port, the method, the path, request
//! headers and JWT claims.
//! Dry-run policies are evaluated as if enforced; what they alone would deny is reported.
use hyper::HeaderMap;

use super::{authn::Principal, snapshot::MeshPeer};
use crate::state::access::{AccessPolicy, AccessRule, Attribute, Condition, Peer};

/// What one request is, for the rules.
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The Service port the client connected to.
    pub port: u16,
    /// The request's validated JWT, if it carried one.
    pub auth: Option<&'a Principal>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused: `policy` names the policy (and rule) that decided.
    Deny {
        policy: String,
    },
    /// Allowed, but a dry-run policy would refuse it.
    AuditDeny {
        policy: String,
    },
}

/// The verdict for `request` from `source` (None: an unmeshed client) under `policies`.
#[must_use]
pub fn authorize(
    policies: &[AccessPolicy],
    source: Option<&MeshPeer>,
    request: &Request<'_>,
) -> Verdict {
    if policies.is_empty() {
        return Verdict::Allow;
    }
    let enforced: Vec<&AccessPolicy> = policies.iter().filter(|p| !p.dry_run).collect();
    if let Some(policy) = evaluate(&enforced, source, request) {
        return Verdict::Deny { policy };
    }
    if enforced.len() < policies.len() {
        let all: Vec<&AccessPolicy> = policies.iter().collect();
        if let Some(policy) = evaluate(&all, source, request) {
            return Verdict::AuditDeny { policy };
        }
    }
    Verdict::Allow
}

/// `Some(why)` when `policies` refuse the request.
fn evaluate(
    policies: &[&AccessPolicy],
    source: Option<&MeshPeer>,
    request: &Request<'_>,
) -> Option<String> {
    for p in policies.iter().filter(|p| p.deny) {
        if let Some(i) = matching_rule(p, source, request) {
            return Some(format!("{} rule {i}", p.name));
        }
    }
    let mut allows = policies.iter().filter(|p| !p.deny).peekable();
    let first = allows.peek().copied()?;
    for p in allows {
        if matching_rule(p, source, request).is_some() {
            return None;
        }
    }
    Some(format!("{}: no ALLOW rule matched", first.name))
}

fn matching_rule(
    p: &AccessPolicy,
    source: Option<&MeshPeer>,
    request: &Request<'_>,
) -> Option<usize> {
    p.rules
        .iter()
        .position(|r| rule_matches(r, source, request))
}

fn rule_matches(r: &AccessRule, source: Option<&MeshPeer>, request: &Request<'_>) -> bool {
    let from_ok = r.from.is_empty()
        || r.from
            .iter()
            .any(|f| source_matches(f, source, request.auth));
    let to_ok = r.to.is_empty()
        || r.to.iter().any(|op| {
            (op.ports.is_empty() || op.ports.contains(&request.port))
                && (op.methods.is_empty() || op.methods.iter().any(|m| m == request.method))
                && (op.paths.is_empty() || op.paths.iter().any(|p| glob(p, request.path)))
        });
    let when_ok = r.when.iter().all(|c| condition_holds(c, request));
    from_ok && to_ok && when_ok
}

/// A source with only `requestPrincipals` matches any client whose request carries such a
/// token; every other field needs a meshed client.
fn source_matches(src: &Peer, peer: Option<&MeshPeer>, auth: Option<&Principal>) -> bool {
    let principals = src.request_principals();
    let principal_ok = principals.is_empty()
        || auth.is_some_and(|a| principals.iter().any(|want| glob(want, a.name())));
    principal_ok
        && (src.only_principals()
            || peer.is_some_and(|p| {
                p.identity
                    .namespace_and_account()
                    .is_some_and(|(ns, sa)| src.matches_workload(ns, sa, &p.labels))
            }))
}

/// The attribute named by the condition's key must have one of the values.
fn condition_holds(c: &Condition, request: &Request<'_>) -> bool {
    fn any<'v>(values: &[String], mut have: impl Iterator<Item = &'v str>) -> bool {
        have.any(|v| values.iter().any(|want| glob(want, v)))
    }
    match (&c.attribute, request.auth) {
        (Attribute::Header(name), _) => any(
            &c.values,
            request
                .headers
                .get_all(name.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok()),
        ),
        (Attribute::Principal, Some(auth)) => any(&c.values, std::iter::once(auth.name())),
        (Attribute::Claim(path), Some(auth)) => {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            any(
                &c.values,
                auth.claim_values(&path).iter().map(String::as_str),
            )
        }
        // Without a validated JWT, `request.auth` conditions never hold; unknown keys never
        // hold (the schema and validation refuse them).
        (Attribute::Principal | Attribute::Claim(_), None) | (Attribute::Unknown, _) => false,
    }
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*` for anything.
fn glob(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{SpiffeId, TrustDomain};

    fn peer(ns: &str, sa: &str) -> MeshPeer {
        MeshPeer {
            workload: crate::state::WorkloadId(1),
            key: format!("{ns}/p"),
            identity: SpiffeId::workload(&TrustDomain::default(), ns, sa),
            local: true,
            node_addr: None,
            strict: false,
            labels: [("app".to_owned(), sa.to_owned())].into(),
        }
    }

    fn policies(yaml: &str) -> Vec<AccessPolicy> {
        AccessPolicy::from_yaml(yaml)
    }

    fn check(
        ps: &[AccessPolicy],
        who: Option<&MeshPeer>,
        method: &str,
        path: &str,
        hdr: &[(&str, &str)],
    ) -> Verdict {
        let mut headers = HeaderMap::new();
        for (k, v) in hdr {
            headers.insert(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        authorize(
            ps,
            who,
            &Request {
                method,
                path,
                headers: &headers,
                port: 80,
                auth: None,
            },
        )
    }

    const POLICIES: &str = r"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-read, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  rules:
  - from: [{source: {serviceAccounts: [frontend]}}]
    to: [{operation: {methods: [GET], paths: [/public/*, /health]}}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-block, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  action: DENY
  rules:
  - when: [{key: 'request.headers[x-block]', values: [yes]}]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-audit, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  action: DENY
  dryRun: true
  rules:
  - to: [{operation: {paths: ['*.bak']}}]
";

    #[test]
    fn methods_paths_headers_sources_and_dry_run() {
        let ps = policies(POLICIES);
        let fe = peer("shop", "frontend");
        let other = peer("shop", "batch");
        assert_eq!(
            check(&ps, Some(&fe), "GET", "/public/a", &[]),
            Verdict::Allow
        );
        assert_eq!(check(&ps, Some(&fe), "GET", "/health", &[]), Verdict::Allow);
        let denied = |v: Verdict| matches!(v, Verdict::Deny { .. });
        assert!(denied(check(&ps, Some(&fe), "POST", "/public/a", &[])));
        assert!(denied(check(&ps, Some(&fe), "GET", "/private", &[])));
        assert!(denied(check(&ps, Some(&other), "GET", "/public/a", &[])));
        assert!(denied(check(&ps, None, "GET", "/public/a", &[])));
        assert_eq!(
            check(&ps, Some(&fe), "GET", "/public/a", &[("x-block", "yes")]),
            Verdict::Deny {
                policy: "shop/web-block rule 0".into()
            }
        );
        assert_eq!(
            check(&ps, Some(&fe), "GET", "/public/x.bak", &[]),
            Verdict::AuditDeny {
                policy: "shop/web-audit rule 0".into()
            }
        );
        assert_eq!(check(&[], None, "DELETE", "/", &[]), Verdict::Allow);
    }

    #[test]
    fn jwt_principals_and_claims() {
        let ps = policies(
            r"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: need-jwt, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  rules:
  - from: [{source: {requestPrincipals: ['https://issuer.test/*']}}]
    when: [{key: 'request.auth.claims[groups]', values: [admin]}]
  - from: [{source: {requestPrincipals: ['*'], serviceAccounts: [batch]}}]
    when: [{key: 'request.auth.claims[org][team]', values: [pay]}]
",
        );
        let principal = |sub: &str, claims: serde_json::Value| {
            Principal::new(
                "https://issuer.test".into(),
                sub.into(),
                claims.as_object().unwrap().clone(),
            )
        };
        let headers = HeaderMap::new();
        let req = |auth| Request {
            method: "GET",
            path: "/",
            headers: &headers,
            port: 80,
            auth,
        };
        let admin = principal("alice", serde_json::json!({"groups": ["dev", "admin"]}));
        let dev = principal(
            "bob",
            serde_json::json!({"groups": "dev", "org": {"team": "pay"}}),
        );
        // Principal-only sources match unmeshed clients too.
        assert_eq!(authorize(&ps, None, &req(Some(&admin))), Verdict::Allow);
        assert!(matches!(
            authorize(&ps, None, &req(Some(&dev))),
            Verdict::Deny { .. }
        ));
        assert!(matches!(
            authorize(&ps, None, &req(None)),
            Verdict::Deny { .. }
        ));
        // The second rule wants the token and the service account.
        let batch = peer("shop", "batch");
        assert_eq!(
            authorize(&ps, Some(&batch), &req(Some(&dev))),
            Verdict::Allow
        );
        assert!(matches!(
            authorize(&ps, Some(&peer("shop", "other")), &req(Some(&dev))),
            Verdict::Deny { .. }
        ));
        assert!(matches!(
            authorize(&ps, Some(&batch), &req(None)),
            Verdict::Deny { .. }
        ));
    }

    #[test]
    fn globs() {
        assert!(glob("*", "anything"));
        assert!(glob("/a/*", "/a/b/c"));
        assert!(!glob("/a/*", "/b"));
        assert!(glob("*.bak", "/x.bak"));
        assert!(glob("/x", "/x") && !glob("/x", "/x/"));
    }
}
