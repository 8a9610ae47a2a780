//! The built-in CA: a root or an intermediate (with its chain) that signs short-lived X.509 SVIDs.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};

use super::{IdentityError, SpiffeId, TrustDomain};

/// Allowed clock difference between nodes: certificates are valid from this long ago.
const BACKDATE: Duration = Duration::from_mins(1);

/// Where a CA lives on disk.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaFiles {
    /// The CA certificate, then the chain up to (and including) the root when it is an
    /// intermediate.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    /// `ca.crt` and `ca.key` in `dir`.
    #[must_use]
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
        }
    }
}

/// A signing CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's own certificate and its parents: sent after each SVID.
    chain: Vec<CertificateDer<'static>>,
    /// The last certificate of the chain.
    root: CertificateDer<'static>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// An X.509 SVID: a workload's certificate chain and key, ready for rustls.
#[derive(Debug)]
pub struct Svid {
    pub id: SpiffeId,
    pub certified: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Svid {
    /// `chain` (leaf first) certifying `key` as `id`, valid during `(not_before, not_after)`.
    fn new(
        id: &SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: &KeyPair,
        (not_before, not_after): (SystemTime, SystemTime),
    ) -> Result<Self, IdentityError> {
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer =
            rustls::crypto::ring::sign::any_supported_type(&der).map_err(IdentityError::Key)?;
        Ok(Self {
            id: id.clone(),
            certified: Arc::new(CertifiedKey::new(chain, signer)),
            not_before,
            not_after,
        })
    }

    /// When it should be replaced: half way through its life.
    #[must_use]
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Every certificate in a PEM text.
pub(super) fn certs_from_pem(
    what: &str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Pem {
            what: what.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::NoPem {
            what: what.to_owned(),
            kind: "certificate",
        });
    }
    Ok(certs)
}

fn ca_params(trust_domain: &TrustDomain, name: &str, validity: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::OrganizationName,
        format!("weft {}", trust_domain.as_str()),
    );
    // A unique name per CA: verifiers pick trust anchors and issuers by subject, so two roots
    // in one bundle (a rotation) must not share one.
    dn.push(
        DnType::CommonName,
        format!("{name} {:08x}", rand::random::<u32>()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + validity).into();
    params.serial_number = Some(random_serial());
    params
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // a positive INTEGER
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// A new self-signed root for `trust_domain`: (certificate PEM, key PEM).
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn generate_root(
        trust_domain: &TrustDomain,
        validity: Duration,
    ) -> Result<(String, String), IdentityError> {
        let key = KeyPair::generate()?;
        let cert = ca_params(trust_domain, "weft root CA", validity).self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// An intermediate CA signed by this one: (certificate chain PEM, key PEM). The chain file
    /// holds the intermediate first, then this CA's chain.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn issue_intermediate(
        &self,
        trust_domain: &TrustDomain,
        validity: Duration,
    ) -> Result<(String, String), IdentityError> {
        let key = KeyPair::generate()?;
        let cert = ca_params(trust_domain, "weft intermediate CA", validity)
            .signed_by(&key, &self.issuer)?;
        let mut pem = cert.pem();
        for parent in &self.chain {
            pem.push_str(&rustls_pem(parent));
        }
        Ok((pem, key.serialize_pem()))
    }

    /// Loads a CA from its files.
    ///
    /// # Errors
    /// When a file is unreadable or holds no usable certificate or key.
    pub fn load(files: &CaFiles) -> Result<Self, IdentityError> {
        Self::from_pem(&read(&files.cert)?, &read(&files.key)?)
    }

    /// A CA from its certificate chain and key (PEM).
    ///
    /// # Errors
    /// When the texts hold no usable certificate or key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        let chain = certs_from_pem("CA certificate", cert_pem)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| IdentityError::Pem {
            what: "CA key".into(),
            message: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_der(&chain[0], key)?;
        let root = chain[chain.len() - 1].clone();
        Ok(Self {
            issuer,
            chain,
            root,
        })
    }

    /// The root at the end of the CA's chain (the default trust bundle).
    #[must_use]
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// Signs a fresh key pair for `id`, valid for `ttl` (after a small backdate for clock skew).
    ///
    /// # Errors
    /// When signing fails.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, IdentityError> {
        let (chain, key, not_before, not_after) = self.sign(id, ttl)?;
        Svid::new(id, chain, &key, (not_before, not_after))
    }

    /// [`Ca::issue`] as one PEM text: the certificate, its intermediates, then the key (the
    /// layout haproxy and nginx read), for peers outside the mesh (`weft ca issue`).
    ///
    /// # Errors
    /// When signing fails.
    pub fn issue_pem(&self, id: &SpiffeId, ttl: Duration) -> Result<String, IdentityError> {
        let (chain, key, _, _) = self.sign(id, ttl)?;
        let mut out: String = chain.iter().map(rustls_pem).collect();
        out.push_str(&key.serialize_pem());
        Ok(out)
    }

    /// A fresh key pair and its certificate chain (leaf, then intermediates: the root is the
    /// peer's trust anchor) for `id`.
    fn sign(
        &self,
        id: &SpiffeId,
        ttl: Duration,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            KeyPair,
            SystemTime,
            SystemTime,
        ),
        IdentityError,
    > {
        let key = KeyPair::generate()?;
        let (chain, not_before, not_after) = self.certify(id, ttl, &key)?;
        Ok((chain, key, not_before, not_after))
    }

    /// Signs the key of a certificate request (PEM) for `id` (whatever names the request asks
    /// for: only `id` is certified), returning the chain as PEM: the certificate service of
    /// `weft controller`.
    ///
    /// # Errors
    /// When the request cannot be parsed or its signature does not verify, or signing fails.
    pub fn sign_request(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        csr_pem: &str,
    ) -> Result<String, IdentityError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            IdentityError::Pem {
                what: "certificate request".into(),
                message: e.to_string(),
            }
        })?;
        let (chain, _, _) = self.certify(id, ttl, &csr.public_key)?;
        Ok(chain.iter().map(rustls_pem).collect())
    }

    /// The certificate chain of `public_key` as `id`.
    fn certify(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<(Vec<CertificateDer<'static>>, SystemTime, SystemTime), IdentityError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        let not_after = now + ttl;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(public_key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().filter(|c| **c != self.root).cloned());
        Ok((chain, not_before, not_after))
    }
}

/// An SVID from a chain (PEM, leaf first) certifying `key`, with the leaf's validity.
///
/// # Errors
/// When the chain or the key is unusable.
pub(super) fn svid_from_chain(
    id: &SpiffeId,
    chain_pem: &str,
    key: &KeyPair,
) -> Result<Svid, IdentityError> {
    let chain = certs_from_pem("issued certificate", chain_pem)?;
    let (_, leaf) =
        x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| IdentityError::Pem {
            what: "issued certificate".into(),
            message: e.to_string(),
        })?;
    let time = |t: x509_parser::time::ASN1Time| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let validity = (
        time(leaf.validity().not_before),
        time(leaf.validity().not_after),
    );
    Svid::new(id, chain, key, validity)
}

/// PEM text of one certificate.
fn rustls_pem(cert: &CertificateDer<'static>) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", cert.as_ref().to_vec()))
}
