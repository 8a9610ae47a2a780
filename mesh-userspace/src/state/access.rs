//! Who may call an L7 service, compiled for the engine's per-request checks:
//! - `AuthorizationPolicy` objects with a `targetRef`: each rule's sources keep their policy's
//!   namespace, request conditions are parsed into what they look at (a header, the JWT
//!   principal, a claim path), so the engine only compares values;
//! - `RequestAuthentication` objects: one [`JwtIssuer`] per JWT rule, with where its keys are
//!   and where its tokens are carried.
use std::{collections::BTreeMap, path::PathBuf};

use crate::api::objects::{
    Action, AuthorizationPolicy, RequestAuthentication, RequestCondition, Source,
};

/// One `AuthorizationPolicy` that targets a Service.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessPolicy {
    /// `namespace/name`.
    pub name: String,
    /// A DENY policy (else ALLOW).
    pub deny: bool,
    /// Evaluated as if enforced; what it alone would refuse is only reported.
    pub dry_run: bool,
    pub rules: Vec<AccessRule>,
}

/// Matches when one of `from` matches the client (or `from` is empty), one of `to` matches the
/// request (or `to` is empty) and every condition of `when` holds.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessRule {
    pub from: Vec<Peer>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

/// A `from` source: the client's identity fields and the JWT principals it may carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    source: Source,
    policy_namespace: String,
}

impl Peer {
    /// `<issuer>/<subject>` patterns of the request's JWT; empty: any (or none).
    #[must_use]
    pub fn request_principals(&self) -> &[String] {
        &self.source.request_principals
    }

    /// Whether the source names only JWT principals: then an unmeshed client may match too.
    #[must_use]
    pub fn only_principals(&self) -> bool {
        !self.source.request_principals.is_empty()
            && self.source.service_accounts.is_empty()
            && self.source.namespaces.is_empty()
            && self.source.pod_selector.is_none()
    }

    /// Whether a workload running as `service_account` in `namespace` with `labels` is this
    /// source by its identity fields (a bare service-account name is in the policy's namespace).
    #[must_use]
    pub fn matches_workload(
        &self,
        namespace: &str,
        service_account: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        self.source
            .matches_workload(&self.policy_namespace, namespace, service_account, labels)
    }
}

/// A `to` operation; an empty list matches everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub ports: Vec<u16>,
    pub methods: Vec<String>,
    /// Istio string matches: exact, `prefix*`, `*suffix` or `*`.
    pub paths: Vec<String>,
}

/// A `when` condition: the attribute must equal one of `values` (Istio string matches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub attribute: Attribute,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    /// `request.headers[<name>]`.
    Header(String),
    /// `request.auth.principal`.
    Principal,
    /// `request.auth.claims[a][b]`: the path into the claims.
    Claim(Vec<String>),
    /// A key validation refuses; never holds.
    Unknown,
}

impl AccessPolicy {
    #[must_use]
    pub fn compile(p: &AuthorizationPolicy) -> Self {
        let ns = p.metadata.namespace.as_deref().unwrap_or("default");
        Self {
            name: format!("{ns}/{}", p.metadata.name.as_deref().unwrap_or("?")),
            deny: p.spec.action == Action::Deny,
            dry_run: p.spec.dry_run,
            rules: p
                .spec
                .rules
                .iter()
                .map(|r| AccessRule {
                    from: r
                        .from
                        .iter()
                        .map(|f| Peer {
                            source: f.source.clone(),
                            policy_namespace: ns.to_owned(),
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|t| Operation {
                            ports: t.operation.ports.clone(),
                            methods: t.operation.methods.clone(),
                            paths: t.operation.paths.clone(),
                        })
                        .collect(),
                    when: r.when.iter().map(condition).collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
impl AccessPolicy {
    /// The `AuthorizationPolicy` objects in `yaml`, compiled, for tests of the engine.
    pub(crate) fn from_yaml(yaml: &str) -> Vec<Self> {
        let mut set = crate::api::ObjectSet::default();
        set.add_yaml("test", yaml);
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        set.authorization_policies
            .iter()
            .map(|p| Self::compile(p))
            .collect()
    }
}

fn condition(c: &RequestCondition) -> Condition {
    let attribute = if let Some(name) = c
        .key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        Attribute::Header(name.to_owned())
    } else if c.key == "request.auth.principal" {
        Attribute::Principal
    } else if let Some(path) = claim_path(&c.key) {
        Attribute::Claim(path.into_iter().map(str::to_owned).collect())
    } else {
        Attribute::Unknown
    };
    Condition {
        attribute,
        values: c.values.clone(),
    }
}

/// One JWT rule of a `RequestAuthentication`: the tokens of one issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtIssuer {
    /// `namespace/name` of the `RequestAuthentication`.
    pub policy: String,
    /// The rule's index in `jwtRules`, for messages.
    pub index: usize,
    pub issuer: String,
    /// When not empty, the token's `aud` must contain one of these.
    pub audiences: Vec<String>,
    pub keys: KeySource,
    /// (header name, prefix before the token); empty: `Authorization: Bearer`.
    pub from_headers: Vec<(String, String)>,
    /// The token goes on to the service (else its header is removed once validated).
    pub forward: bool,
}

/// Where an issuer's JSON Web Key Set is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Inline(String),
    /// Re-read when it changes.
    File(PathBuf),
    /// Neither or both were set (validation refuses it); every token is refused.
    Missing,
}

impl JwtIssuer {
    /// The rules of `p`, in order.
    #[must_use]
    pub fn compile(p: &RequestAuthentication) -> Vec<Self> {
        let policy = format!(
            "{}/{}",
            p.metadata.namespace.as_deref().unwrap_or("default"),
            p.metadata.name.as_deref().unwrap_or_default()
        );
        p.spec
            .jwt_rules
            .iter()
            .enumerate()
            .map(|(index, rule)| Self {
                policy: policy.clone(),
                index,
                issuer: rule.issuer.clone(),
                audiences: rule.audiences.clone(),
                keys: match (&rule.jwks, &rule.jwks_file) {
                    (Some(inline), None) => KeySource::Inline(inline.clone()),
                    (None, Some(path)) => KeySource::File(PathBuf::from(path)),
                    _ => KeySource::Missing,
                },
                from_headers: rule
                    .from_headers
                    .iter()
                    .map(|h| (h.name.clone(), h.prefix.clone()))
                    .collect(),
                forward: rule.forward_original_token,
            })
            .collect()
    }

    /// The JWT rules of the `RequestAuthentication` objects in `yaml`, for tests of the engine.
    #[cfg(test)]
    pub(crate) fn from_yaml(yaml: &str) -> Vec<Self> {
        let mut set = crate::api::ObjectSet::default();
        set.add_yaml("test", yaml);
        assert!(set.errors.is_empty(), "{:?}", set.errors);
        set.request_authentications
            .iter()
            .flat_map(|p| Self::compile(p))
            .collect()
    }
}

/// `request.auth.claims[a][b]` → `["a", "b"]`.
#[must_use]
pub fn claim_path(key: &str) -> Option<Vec<&str>> {
    let mut rest = key.strip_prefix("request.auth.claims")?;
    let mut path = Vec::new();
    while !rest.is_empty() {
        let (name, tail) = rest.strip_prefix('[')?.split_once(']')?;
        if name.is_empty() {
            return None;
        }
        path.push(name);
        rest = tail;
    }
    (!path.is_empty()).then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_name_what_they_look_at() {
        let policies = AccessPolicy::from_yaml(
            r"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  action: DENY
  rules:
  - from: [{source: {serviceAccounts: [frontend]}}, {source: {requestPrincipals: [iss/*]}}]
    when:
    - {key: 'request.headers[x-user]', values: [a]}
    - {key: request.auth.principal, values: [iss/b]}
    - {key: 'request.auth.claims[org][team]', values: [c]}
",
        );
        let p = &policies[0];
        assert_eq!(
            (p.name.as_str(), p.deny, p.dry_run),
            ("shop/p", true, false)
        );
        let rule = &p.rules[0];
        let attributes: Vec<_> = rule.when.iter().map(|c| c.attribute.clone()).collect();
        assert_eq!(
            attributes,
            [
                Attribute::Header("x-user".into()),
                Attribute::Principal,
                Attribute::Claim(vec!["org".into(), "team".into()]),
            ]
        );
        let labels = BTreeMap::new();
        assert!(rule.from[0].matches_workload("shop", "frontend", &labels));
        assert!(!rule.from[0].matches_workload("other", "frontend", &labels));
        assert!(!rule.from[0].only_principals() && rule.from[1].only_principals());
        assert_eq!(
            claim_path("request.auth.claims[a][b]"),
            Some(vec!["a", "b"])
        );
        assert_eq!(claim_path("request.auth.claims[a"), None);
        assert_eq!(claim_path("request.auth.claims[]"), None);
        assert_eq!(claim_path("request.auth.claims"), None);
    }
}
