//! Request authentication: the JWTs a Service accepts (`RequestAuthentication`), validated by
//! the L7 engine before authorization. As in Istio, a request without a token passes
//! unauthenticated; a token that fails validation is refused (401). A valid token yields the
//! principal (`<iss>/<sub>`) and claims that authorization rules match.
use std::{
    path::PathBuf,
    sync::{Mutex, RwLock},
    time::{Duration, Instant, SystemTime},
};

use base64::Engine as _;
use hyper::{HeaderMap, header::HeaderName};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, JwkSet},
};
use serde_json::{Map, Value};

use crate::state::access::{JwtIssuer, KeySource};

/// Signature algorithms accepted (asymmetric only: no `none`, no shared secrets).
const ALGORITHMS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// Clock skew allowed on `exp` and `nbf`, as Envoy's default.
const LEEWAY_SECS: u64 = 60;

/// How often a `jwksFile` is checked for changes, at most.
const FILE_CHECK: Duration = Duration::from_secs(2);

/// A validated token.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub issuer: String,
    pub subject: String,
    pub claims: Map<String, Value>,
    /// `<issuer>/<subject>`, made once.
    name: String,
}

impl Principal {
    #[must_use]
    pub fn new(issuer: String, subject: String, claims: Map<String, Value>) -> Self {
        let name = format!("{issuer}/{subject}");
        Self {
            issuer,
            subject,
            claims,
            name,
        }
    }

    /// `<issuer>/<subject>`, what `requestPrincipals` match.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The claim at `path` (`["a", "b"]` is claim `a`'s member `b`), as the strings a
    /// condition compares: a string, each string of a list, or a number or boolean as text.
    #[must_use]
    pub fn claim_values(&self, path: &[&str]) -> Vec<String> {
        let Some((first, rest)) = path.split_first() else {
            return Vec::new();
        };
        let mut value = self.claims.get(*first);
        for key in rest {
            value = value.and_then(|v| v.get(*key));
        }
        let scalar = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        match value {
            Some(Value::Array(items)) => items.iter().filter_map(scalar).collect(),
            Some(v) => scalar(v).into_iter().collect(),
            None => Vec::new(),
        }
    }
}

/// Why a token was refused: `reason` is the metric label, `message` says it to a person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{policy}: {message}")]
pub struct Refused {
    /// `namespace/name` of the `RequestAuthentication` (or the Service's, when no rule knows
    /// the issuer).
    pub policy: String,
    pub reason: &'static str,
    pub message: String,
}

/// Where a token is carried.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Location {
    header: HeaderName,
    prefix: String,
}

impl Location {
    fn authorization() -> Self {
        Self {
            header: hyper::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
        }
    }

    /// The token in `headers`, if this location holds one.
    fn find<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        headers.get_all(&self.header).iter().find_map(|v| {
            let v = v.to_str().ok()?;
            let head = v.get(..self.prefix.len())?;
            // Auth schemes are case-insensitive (RFC 9110 11.1).
            head.eq_ignore_ascii_case(&self.prefix)
                .then(|| v[self.prefix.len()..].trim())
                .filter(|t| !t.is_empty())
        })
    }
}

/// One usable key of a JWKS, ready for verification.
struct Key {
    kid: Option<String>,
    /// The key's own `alg`, as `Algorithm`'s `Debug` spells it (compared with the token's).
    alg: Option<String>,
    elliptic: bool,
    /// `None` when the key's parameters do not make a key (its tokens fail the signature).
    decoding: Option<DecodingKey>,
}

impl Key {
    /// The RSA and EC keys of `set` (no other kind can verify an accepted algorithm).
    fn all_of(set: &JwkSet) -> Vec<Key> {
        set.keys
            .iter()
            .filter(|k| crate::identity::usable_jwk(k))
            .map(|k| Key {
                kid: k.common.key_id.clone(),
                alg: k.common.key_algorithm.map(|a| format!("{a:?}")),
                elliptic: matches!(k.algorithm, AlgorithmParameters::EllipticCurve(_)),
                decoding: DecodingKey::from_jwk(k).ok(),
            })
            .collect()
    }
}

/// A key set and, for a file, when it was last read.
struct Keys {
    file: Option<PathBuf>,
    set: RwLock<Result<Vec<Key>, String>>,
    /// (last check, file modification time of the loaded set).
    checked: Mutex<(Instant, Option<SystemTime>)>,
}

impl Keys {
    fn new(source: &KeySource) -> Self {
        let (file, set, mtime) = match source {
            KeySource::Inline(inline) => (
                None,
                crate::identity::parse_jwks(inline).map(|s| Key::all_of(&s)),
                None,
            ),
            KeySource::File(path) => {
                let (set, mtime) = read_jwks_file(path);
                (Some(path.clone()), set, mtime)
            }
            KeySource::Missing => (
                None,
                Err("set exactly one of jwks and jwksFile".to_owned()),
                None,
            ),
        };
        Self {
            file,
            set: RwLock::new(set),
            checked: Mutex::new((Instant::now(), mtime)),
        }
    }

    /// Re-reads a key file whose modification time changed (checked every [`FILE_CHECK`]).
    fn refresh(&self) {
        let Some(path) = &self.file else { return };
        let mut checked = self
            .checked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if checked.0.elapsed() < FILE_CHECK {
            return;
        }
        checked.0 = Instant::now();
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if mtime == checked.1 {
            return;
        }
        let (set, mtime) = read_jwks_file(path);
        if let Err(e) = &set {
            tracing::warn!(target: "weft::config", file = %path.display(), error = %e, "JWKS not loaded");
        }
        checked.1 = mtime;
        *self
            .set
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = set;
    }
}

fn read_jwks_file(path: &std::path::Path) -> (Result<Vec<Key>, String>, Option<SystemTime>) {
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let set = std::fs::read_to_string(path)
        .map_err(|e| format!("jwksFile {}: {e}", path.display()))
        .and_then(|text| {
            crate::identity::parse_jwks(&text)
                .map_err(|e| format!("jwksFile {}: {e}", path.display()))
        });
    (set.map(|s| Key::all_of(&s)), mtime)
}

struct Compiled {
    policy: String,
    issuer: String,
    audiences: Vec<String>,
    locations: Vec<Location>,
    forward: bool,
    keys: Keys,
}

/// The token rules of one Service.
#[derive(Default)]
pub struct Authenticator {
    issuers: Vec<Compiled>,
    /// Every location any rule reads, in order.
    locations: Vec<Location>,
}

impl Authenticator {
    /// The rules of `policies`, and what is wrong with them (a rule whose keys cannot be loaded
    /// refuses every token of its issuer).
    #[must_use]
    pub fn new(rules: &[JwtIssuer]) -> (Self, Vec<String>) {
        let mut out = Self::default();
        let mut problems = Vec::new();
        for rule in rules {
            let (policy, i) = (&rule.policy, rule.index);
            let mut locations = Vec::new();
            for (name, prefix) in &rule.from_headers {
                match HeaderName::from_bytes(name.as_bytes()) {
                    Ok(header) => locations.push(Location {
                        header,
                        prefix: prefix.clone(),
                    }),
                    Err(_) => problems.push(format!(
                        "RequestAuthentication {policy}: jwtRules[{i}].fromHeaders: {name:?} is not a header name"
                    )),
                }
            }
            if rule.from_headers.is_empty() {
                locations.push(Location::authorization());
            }
            let keys = Keys::new(&rule.keys);
            if let Err(e) = &*keys
                .set
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
            {
                problems.push(format!(
                    "RequestAuthentication {policy}: jwtRules[{i}] ({}): {e}; its tokens are refused",
                    rule.issuer
                ));
            }
            for l in &locations {
                if !out.locations.contains(l) {
                    out.locations.push(l.clone());
                }
            }
            out.issuers.push(Compiled {
                policy: policy.clone(),
                issuer: rule.issuer.clone(),
                audiences: rule.audiences.clone(),
                locations,
                forward: rule.forward,
                keys,
            });
        }
        (out, problems)
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// Validates the request's token: `Ok(None)` when it carries none, the principal when it
    /// is valid (its header removed unless the rule forwards it), else why it is refused.
    ///
    /// `service` names the policy of a refusal no rule is responsible for (written only then).
    ///
    /// # Errors
    /// The token is malformed, from an issuer no rule names, or fails its rule's checks.
    pub fn authenticate(
        &self,
        headers: &mut HeaderMap,
        service: &(impl std::fmt::Display + ?Sized),
    ) -> Result<Option<Principal>, Refused> {
        let Some((location, token)) = self
            .locations
            .iter()
            .find_map(|l| l.find(headers).map(|t| (l, t.to_owned())))
        else {
            return Ok(None);
        };
        let refused = |policy: String, reason, message: String| Refused {
            policy,
            reason,
            message,
        };
        let claimed = unverified_issuer(&token).map_err(|m| {
            refused(
                service.to_string(),
                "malformed",
                format!("malformed token: {m}"),
            )
        })?;
        let Some(rule) = self
            .issuers
            .iter()
            .find(|r| r.issuer == claimed && r.locations.contains(location))
        else {
            return Err(refused(
                service.to_string(),
                "unknown_issuer",
                format!(
                    "no jwtRule accepts issuer {claimed:?} in header {}",
                    location.header
                ),
            ));
        };
        let principal = rule
            .validate(&token)
            .map_err(|(reason, message)| refused(rule.policy.clone(), reason, message))?;
        if !rule.forward {
            headers.remove(&location.header);
        }
        Ok(Some(principal))
    }
}

impl Compiled {
    fn validate(&self, token: &str) -> Result<Principal, (&'static str, String)> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| ("malformed", format!("malformed token header: {e}")))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err((
                "algorithm",
                format!("algorithm {:?} is not accepted", header.alg),
            ));
        }
        self.keys.refresh();
        let set = self
            .keys
            .set
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let set = set
            .as_ref()
            .map_err(|e| ("no_keys", format!("the issuer's keys are not loaded: {e}")))?;
        let elliptic = matches!(header.alg, Algorithm::ES256 | Algorithm::ES384);
        let alg = format!("{:?}", header.alg);
        let candidates: Vec<&Key> = set
            .iter()
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .filter(|k| k.alg.as_ref().is_none_or(|a| *a == alg))
            .filter(|k| k.elliptic == elliptic)
            .collect();
        if candidates.is_empty() {
            return Err((
                "unknown_key",
                format!(
                    "no key of the issuer's JWKS matches the token (kid {:?}, alg {:?})",
                    header.kid, header.alg
                ),
            ));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        validation.set_issuer(&[&self.issuer]);
        let mut required = vec!["exp", "iss"];
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_nbf = true;
        let mut last = ("bad_signature", String::new());
        for decoding in candidates.iter().filter_map(|k| k.decoding.as_ref()) {
            match jsonwebtoken::decode::<Map<String, Value>>(token, decoding, &validation) {
                Ok(data) => {
                    let subject = data
                        .claims
                        .get("sub")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    return Ok(Principal::new(self.issuer.clone(), subject, data.claims));
                }
                Err(e) => {
                    last = classify(e.kind());
                    if last.0 != "bad_signature" {
                        // The signature was good: the claims are what is wrong.
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn classify(kind: &ErrorKind) -> (&'static str, String) {
    match kind {
        ErrorKind::InvalidSignature | ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) => {
            ("bad_signature", "the signature does not verify".into())
        }
        ErrorKind::ExpiredSignature => ("expired", "the token has expired".into()),
        ErrorKind::ImmatureSignature => {
            ("not_yet_valid", "the token is not valid yet (nbf)".into())
        }
        ErrorKind::InvalidAudience => (
            "audience",
            "the token's audience is not one the rule accepts".into(),
        ),
        ErrorKind::InvalidIssuer => ("unknown_issuer", "the token's issuer does not match".into()),
        ErrorKind::MissingRequiredClaim(c) => {
            ("missing_claim", format!("the token has no {c:?} claim"))
        }
        other => ("malformed", format!("the token is malformed: {other:?}")),
    }
}

/// The `iss` a token claims, read before any check to choose the rule (never trusted as is).
fn unverified_issuer(token: &str) -> Result<String, String> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not three dot-separated parts".into());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("payload is not base64url: {e}"))?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|e| format!("payload is not a JSON object: {e}"))?;
    claims
        .get("iss")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "no iss claim".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
    use serde_json::json;

    /// An ES256 signing key and its public JWK.
    fn es256(kid: &str) -> (EncodingKey, Value) {
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let jwk = crate::identity::jwks(&pair, kid)["keys"][0].clone();
        (EncodingKey::from_ec_der(&pair.serialize_der()), jwk)
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn sign(key: &EncodingKey, kid: &str, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        encode(&h, claims, key).unwrap()
    }

    fn authenticator(jwks: &Value, extra: &str) -> Authenticator {
        let yaml = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: RequestAuthentication\n\
             metadata: {{name: jwt, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: web}}\n  \
             jwtRules:\n  - issuer: https://issuer.test\n    audiences: [web]\n    jwks: '{jwks}'\n{extra}"
        );
        let (a, problems) = Authenticator::new(&JwtIssuer::from_yaml(&yaml));
        assert!(problems.is_empty(), "{problems:?}");
        a
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {token}").parse().unwrap());
        h
    }

    #[test]
    fn valid_tokens_give_principal_and_claims_and_bad_ones_say_why() {
        let (key, jwk) = es256("k1");
        let a = authenticator(&json!({"keys": [jwk]}), "");
        let good = json!({"iss": "https://issuer.test", "sub": "alice", "aud": "web",
                          "exp": now() + 600, "groups": ["admin", "dev"], "org": {"team": "pay"}});
        let mut h = bearer(&sign(&key, "k1", &good));
        let p = a.authenticate(&mut h, "shop/web").unwrap().unwrap();
        assert_eq!(p.name(), "https://issuer.test/alice");
        assert_eq!(p.claim_values(&["groups"]), ["admin", "dev"]);
        assert_eq!(p.claim_values(&["org", "team"]), ["pay"]);
        assert!(h.get("authorization").is_none(), "not forwarded by default");

        assert_eq!(a.authenticate(&mut HeaderMap::new(), "shop/web"), Ok(None));
        let reason = |claims: &Value, signer: &EncodingKey, kid: &str| {
            a.authenticate(&mut bearer(&sign(signer, kid, claims)), "shop/web")
                .unwrap_err()
                .reason
        };
        let mut expired = good.clone();
        expired["exp"] = json!(now() - 3600);
        assert_eq!(reason(&expired, &key, "k1"), "expired");
        let mut wrong_aud = good.clone();
        wrong_aud["aud"] = json!("other");
        assert_eq!(reason(&wrong_aud, &key, "k1"), "audience");
        let mut other_issuer = good.clone();
        other_issuer["iss"] = json!("https://evil.test");
        assert_eq!(reason(&other_issuer, &key, "k1"), "unknown_issuer");
        let (forged, _) = es256("k1");
        assert_eq!(reason(&good, &forged, "k1"), "bad_signature");
        assert_eq!(reason(&good, &key, "k2"), "unknown_key");
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(reason(&no_exp, &key, "k1"), "missing_claim");
        for junk in ["abc", "a.b.c", "a.e30.c", "..", "a.b.c.d"] {
            let e = a.authenticate(&mut bearer(junk), "shop/web").unwrap_err();
            assert_eq!(e.reason, "malformed", "{junk}: {e}");
        }
        // An unsigned token (alg none) claiming the right issuer.
        let b64 =
            |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&good));
        assert!(a.authenticate(&mut bearer(&none), "shop/web").is_err());
        // A shared-secret token (HS256) claiming the right issuer: refused, whatever its key.
        let hs = encode(
            &Header::new(Algorithm::HS256),
            &good,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert_eq!(
            a.authenticate(&mut bearer(&hs), "shop/web")
                .unwrap_err()
                .reason,
            "algorithm"
        );
    }

    #[test]
    fn custom_header_forwarding_and_key_files_that_rotate() {
        let dir = std::env::temp_dir().join(format!("weft-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("jwks.json");
        let (k1, jwk1) = es256("k1");
        std::fs::write(&file, json!({"keys": [jwk1]}).to_string()).unwrap();
        let yaml = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: RequestAuthentication\n\
             metadata: {{name: jwt, namespace: shop}}\nspec:\n  targetRef: {{kind: Service, name: web}}\n  \
             jwtRules:\n  - issuer: iss\n    jwksFile: {}\n    forwardOriginalToken: true\n    \
             fromHeaders: [{{name: x-token}}]\n",
            file.display()
        );
        let (a, problems) = Authenticator::new(&JwtIssuer::from_yaml(&yaml));
        assert!(problems.is_empty(), "{problems:?}");
        let claims = json!({"iss": "iss", "sub": "bob", "exp": now() + 600});
        let mut h = HeaderMap::new();
        h.insert("x-token", sign(&k1, "k1", &claims).parse().unwrap());
        assert_eq!(a.authenticate(&mut h, "s").unwrap().unwrap().subject, "bob");
        assert!(h.get("x-token").is_some(), "forwarded");
        // The token in the default header is not looked at: this rule reads x-token only.
        let mut other = bearer(&sign(&k1, "k1", &claims));
        assert_eq!(a.authenticate(&mut other, "s"), Ok(None));
        // Rotate: the file now holds only k2; after the check interval k1 tokens are refused.
        let (k2, jwk2) = es256("k2");
        std::fs::write(&file, json!({"keys": [jwk2]}).to_string()).unwrap();
        // A different modification time even on coarse clocks.
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        a.issuers[0].keys.checked.lock().unwrap().0 -= FILE_CHECK;
        let mut h1 = HeaderMap::new();
        h1.insert("x-token", sign(&k1, "k1", &claims).parse().unwrap());
        assert_eq!(
            a.authenticate(&mut h1, "s").unwrap_err().reason,
            "unknown_key"
        );
        let mut h2 = HeaderMap::new();
        h2.insert("x-token", sign(&k2, "k2", &claims).parse().unwrap());
        assert!(a.authenticate(&mut h2, "s").unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unusable_key_sets_are_problems() {
        assert!(crate::identity::parse_jwks("{}").is_err());
        assert!(
            crate::identity::parse_jwks(r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).is_err()
        );
        let rules = JwtIssuer::from_yaml(
            "apiVersion: weft.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {name: j, namespace: n}\n\
             spec:\n  targetRef: {kind: Service, name: web}\n  jwtRules:\n  - issuer: i\n    jwksFile: /nonexistent/jwks.json\n",
        );
        let (_, problems) = Authenticator::new(&rules);
        assert!(
            problems[0].contains("/nonexistent/jwks.json"),
            "{problems:?}"
        );
    }

    proptest::proptest! {
        /// Whatever a client puts in the header, the engine answers (no panic): junk is refused
        /// as malformed or from an unknown issuer, never accepted.
        #[test]
        fn arbitrary_tokens_are_refused_not_panicked(token in "[ -~]{0,300}", payload in "[ -~]{0,120}") {
            let (_, jwk) = es256("k1");
            let a = authenticator(&json!({"keys": [jwk]}), "");
            let b64 = |t: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t);
            for t in [token.clone(), format!("{}.{}.{}", b64("{\"alg\":\"ES256\"}"), b64(&payload), b64(&token))] {
                let mut h = HeaderMap::new();
                if let Ok(v) = format!("Bearer {t}").parse() {
                    h.insert("authorization", v);
                    let r = a.authenticate(&mut h, "s");
                    proptest::prop_assert!(!matches!(r, Ok(Some(_))), "accepted {t:?}");
                }
            }
        }
    }
}
