//! `weft jwt`: a signing key and tokens for trying `RequestAuthentication` without an identity
//! provider (what Istio's samples do with a script). ES256 keys; the public half as a JWKS.
use std::{collections::BTreeMap, path::Path, time::Duration};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("key: {0}")]
    Key(String),
    #[error("--claim {0:?}: expected name=value (a value in JSON, e.g. '[\"a\",\"b\"]', or text)")]
    Claim(String),
    #[error("signing: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Writes `key.pem` (private, mode 0600) and `jwks.json` (public) into `dir`; `kid` names the
/// key in both.
///
/// # Errors
/// When the directory cannot be written or `key.pem` exists already.
pub fn keygen(dir: &Path, kid: &str) -> Result<(), JwtError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| JwtError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let pair =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| JwtError::Key(e.to_string()))?;
    let key_path = dir.join("key.pem");
    super::write_private(&key_path, &pair.serialize_pem(), false).map_err(io(&key_path))?;
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, crate::identity::jwks(&pair, kid).to_string())
        .map_err(io(&jwks_path))?;
    Ok(())
}

/// What a token says.
#[derive(Debug, Clone)]
pub struct Claims {
    pub issuer: String,
    pub subject: String,
    pub audience: Option<String>,
    /// Valid for this long from now.
    pub ttl: Duration,
    /// Further claims: `name=value`, the value JSON when it parses, else a string.
    pub extra: Vec<String>,
}

/// A token signed with the key in `key_pem_path` (from [`keygen`]).
///
/// # Errors
/// When the key cannot be read or a claim is malformed.
pub fn sign(key_pem_path: &Path, kid: &str, claims: &Claims) -> Result<String, JwtError> {
    let pem = std::fs::read_to_string(key_pem_path).map_err(|source| JwtError::Io {
        path: key_pem_path.display().to_string(),
        source,
    })?;
    let pair = KeyPair::from_pem(&pem).map_err(|e| JwtError::Key(e.to_string()))?;
    let now = jsonwebtoken::get_current_timestamp();
    let mut body: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    body.insert("iss".to_owned(), claims.issuer.clone().into());
    body.insert("sub".to_owned(), claims.subject.clone().into());
    body.insert("iat".to_owned(), now.into());
    body.insert("exp".to_owned(), (now + claims.ttl.as_secs()).into());
    if let Some(aud) = &claims.audience {
        body.insert("aud".to_owned(), aud.clone().into());
    }
    for c in &claims.extra {
        let (name, value) = c
            .split_once('=')
            .filter(|(n, _)| !n.is_empty())
            .ok_or_else(|| JwtError::Claim(c.clone()))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| value.into());
        body.insert(name.to_owned(), value);
    }
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    let key = jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der());
    Ok(jsonwebtoken::encode(&header, &body, &key)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::authn::Authenticator;

    #[test]
    fn tokens_from_keygen_and_sign_pass_request_authentication() {
        let dir = std::env::temp_dir().join(format!("weft-jwt-cli-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        keygen(&dir, "k1").unwrap();
        assert!(
            keygen(&dir, "k1").is_err(),
            "an existing key is not overwritten"
        );
        let token = sign(
            &dir.join("key.pem"),
            "k1",
            &Claims {
                issuer: "https://issuer.test".into(),
                subject: "alice".into(),
                audience: Some("web".into()),
                ttl: Duration::from_mins(5),
                extra: vec!["groups=[\"admin\"]".into(), "team=pay".into()],
            },
        )
        .unwrap();
        let yaml = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: j, namespace: n}}\n\
             spec:\n  targetRef: {{kind: Service, name: web}}\n  jwtRules:\n  - issuer: https://issuer.test\n    \
             audiences: [web]\n    jwksFile: {}\n",
            dir.join("jwks.json").display()
        );
        let rules = crate::state::access::JwtIssuer::from_yaml(&yaml);
        let (a, problems) = Authenticator::new(&rules);
        assert!(problems.is_empty(), "{problems:?}");
        let mut headers = hyper::HeaderMap::new();
        headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
        let p = a.authenticate(&mut headers, "n/web").unwrap().unwrap();
        assert_eq!(p.name(), "https://issuer.test/alice");
        assert_eq!(p.claim_values(&["groups"]), ["admin"]);
        assert_eq!(p.claim_values(&["team"]), ["pay"]);
        assert!(matches!(
            sign(
                &dir.join("key.pem"),
                "k1",
                &Claims {
                    extra: vec!["=x".into()],
                    ..Claims {
                        issuer: String::new(),
                        subject: String::new(),
                        audience: None,
                        ttl: Duration::from_secs(1),
                        extra: Vec::new()
                    }
                }
            ),
            Err(JwtError::Claim(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
