//! Workload identity: SPIFFE IDs, the built-in CA, and the X.509 SVIDs the agent holds for the
//! workloads of its node (in memory only, rotated at half their lifetime).
//!
//! A workload's identity is its service account:
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. The CA is a root (`weft ca
//! init`) or an intermediate under a user's root (`weft ca intermediate`), loaded from PEM files;
//! the trust bundle (the roots peers are checked against) is a PEM file of its own that may hold
//! several roots, so a root can be rotated by publishing old and new side by side.
mod ca;
pub mod remote;
mod store;
pub mod tls;

use std::fmt;

use serde::Serialize;

pub use self::{
    ca::{Ca, CaFiles, Svid},
    remote::RemoteCa,
    store::{Bundle, Identities, Issuer},
};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not a SPIFFE ID (spiffe://<trust-domain>/<path>)")]
    NotSpiffe(String),
    #[error("trust domain {0:?} is not valid: lowercase letters, digits, '.', '-' and '_' only")]
    TrustDomain(String),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: no PEM {kind} found; expected a file written by `weft ca init`")]
    NoPem { what: String, kind: &'static str },
    #[error("{what}: {message}")]
    Pem { what: String, message: String },
    #[error("the CA could not sign: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("certificate key: {0}")]
    Key(rustls::Error),
    #[error("certificate service {addr}: {message}")]
    Remote { addr: String, message: String },
    #[error("no certificate for {0} yet (the certificate service has not answered)")]
    NotIssued(String),
}

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct SpiffeId(String);

impl SpiffeId {
    /// The identity of the pods running as `service_account` in `namespace`.
    #[must_use]
    pub fn workload(trust_domain: &TrustDomain, namespace: &str, service_account: &str) -> Self {
        Self(format!(
            "spiffe://{}/ns/{namespace}/sa/{service_account}",
            trust_domain.0
        ))
    }

    /// Parses `spiffe://<trust-domain>/<path>`.
    ///
    /// # Errors
    /// When the scheme, the trust domain or the path is malformed.
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(text.to_owned()))?;
        let (domain, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::NotSpiffe(text.to_owned()))?;
        TrustDomain::new(domain)?;
        let path_ok = !path.is_empty()
            && path.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            });
        if !path_ok {
            return Err(IdentityError::NotSpiffe(text.to_owned()));
        }
        Ok(Self(text.to_owned()))
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    #[must_use]
    pub fn trust_domain(&self) -> &str {
        self.0["spiffe://".len()..]
            .split('/')
            .next()
            .unwrap_or_default()
    }

    /// `(namespace, service account)` of a workload identity (`/ns/<ns>/sa/<sa>`).
    #[must_use]
    pub fn namespace_and_account(&self) -> Option<(&str, &str)> {
        let path = self.0["spiffe://".len()..].split_once('/')?.1;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE trust domain (`cluster.local` unless the mesh configuration names another).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// # Errors
    /// When the name has characters a SPIFFE trust domain may not have.
    pub fn new(name: &str) -> Result<Self, IdentityError> {
        let ok = !name.is_empty()
            && name.len() <= 255
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(IdentityError::TrustDomain(name.to_owned()))
        }
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        Self("cluster.local".to_owned())
    }
}

/// The TLS server name a tunnel client asks for to reach the workload `id` of the serving node
/// (`<service-account>.<namespace>.identity.weft`): SNI must be a DNS name, and the serving
/// agent presents the certificate of that identity. `None` for a non-workload identity.
#[must_use]
pub fn server_name_for(id: &SpiffeId) -> Option<String> {
    let (ns, sa) = id.namespace_and_account()?;
    Some(format!("{sa}.{ns}.{SNI_SUFFIX}"))
}

/// The inverse of [`server_name_for`], in `trust_domain`.
#[must_use]
pub fn identity_for_server_name(trust_domain: &TrustDomain, sni: &str) -> Option<SpiffeId> {
    let (sa, ns) = sni
        .strip_suffix(SNI_SUFFIX)?
        .strip_suffix('.')?
        .rsplit_once('.')?;
    let id = SpiffeId::workload(trust_domain, ns, sa);
    SpiffeId::parse(id.as_str()).ok()
}

const SNI_SUFFIX: &str = "identity.weft";

/// The JWKS (RFC 7517) holding the public half of a P-256 key, for ES256 tokens.
#[must_use]
pub fn jwks(pair: &rcgen::KeyPair, kid: &str) -> serde_json::Value {
    let raw = pair.public_key_raw(); // 0x04 || x || y
    let b64 =
        |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
    serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
    }]})
}

/// A JSON Web Key Set with at least one RSA or EC key.
///
/// # Errors
/// The text is not a key set, or has no key the engine can use.
pub fn parse_jwks(text: &str) -> Result<jsonwebtoken::jwk::JwkSet, String> {
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    if !set.keys.iter().any(usable_jwk) {
        return Err("the JWKS has no RSA or EC public key".to_owned());
    }
    Ok(set)
}

/// Whether the engine can verify tokens with this key (RSA or EC public keys).
#[must_use]
pub fn usable_jwk(k: &jsonwebtoken::jwk::Jwk) -> bool {
    matches!(
        k.algorithm,
        jsonwebtoken::jwk::AlgorithmParameters::RSA(_)
            | jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = SpiffeId::workload(&td, "shop", "web");
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace_and_account(), Some(("shop", "web")));
        assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id);
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe://Cluster/ns/a",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://td/a//b",
            "spiffe://td/a/../b",
            "spiffe://td/a b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            SpiffeId::parse("spiffe://td/other/path")
                .unwrap()
                .namespace_and_account(),
            None
        );
    }

    #[test]
    fn server_names_round_trip() {
        let td = TrustDomain::default();
        let id = SpiffeId::workload(&td, "shop", "web-v1.x");
        let sni = server_name_for(&id).unwrap();
        assert_eq!(sni, "web-v1.x.shop.identity.weft");
        assert_eq!(identity_for_server_name(&td, &sni), Some(id));
        assert_eq!(identity_for_server_name(&td, "example.com"), None);
        assert_eq!(identity_for_server_name(&td, "identity.weft"), None);
    }

    #[test]
    fn certificate_requests_get_only_the_identity_asked_for() {
        let td = TrustDomain::default();
        let (cert, key) = Ca::generate_root(&td, std::time::Duration::from_hours(1)).unwrap();
        let ca = Ca::from_pem(&cert, &key).unwrap();
        let id = SpiffeId::workload(&td, "shop", "web");
        // The request asks for another name too: it is not certified.
        let workload_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/kube-system/sa/admin"
                .try_into()
                .unwrap(),
        ));
        let csr = params
            .serialize_request(&workload_key)
            .unwrap()
            .pem()
            .unwrap();
        let chain = ca
            .sign_request(&id, std::time::Duration::from_mins(10), &csr)
            .unwrap();
        let svid = ca::svid_from_chain(&id, &chain, &workload_key).unwrap();
        let leaf = &svid.certified.cert[0];
        assert_eq!(crate::identity::tls::spiffe_id_of(leaf).unwrap(), id);
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).unwrap();
        let names = parsed.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(names.general_names.len(), 1, "{names:?}");
        // It chains to the root, and the key is the requester's.
        let anchor = webpki::anchor_from_trusted_cert(ca.root()).unwrap();
        webpki::EndEntityCert::try_from(leaf)
            .unwrap()
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &[anchor],
                &[],
                rustls::pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .unwrap();
        assert!(svid.not_after > std::time::SystemTime::now());
        // Malformed requests are refused.
        let tampered = csr.replacen("MII", "MIJ", 1);
        assert!(
            ca.sign_request(&id, std::time::Duration::from_mins(10), &tampered)
                .is_err()
        );
        assert!(
            ca.sign_request(&id, std::time::Duration::from_mins(10), "junk")
                .is_err()
        );
    }
}
