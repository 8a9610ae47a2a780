//! The SVIDs this agent holds for its node's workloads, and the trust bundle.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::pki_types::{CertificateDer, TrustAnchor};

use super::{Ca, IdentityError, RemoteCa, SpiffeId, Svid, TrustDomain, ca::certs_from_pem};

/// Who signs this node's workload certificates.
#[derive(Debug)]
pub enum Issuer {
    /// The agent holds the CA (local mode).
    Local(Box<Ca>),
    /// The controller's certificate service (Kubernetes mode): keys stay on the node.
    Remote(RemoteCa),
}

/// The roots peers' certificates must chain to.
#[derive(Debug)]
pub struct Bundle {
    pub anchors: Vec<TrustAnchor<'static>>,
    pub roots: Arc<rustls::RootCertStore>,
    /// Bumped on every change, so TLS configs built from it can be rebuilt.
    pub generation: u64,
}

impl Bundle {
    fn from_certs(
        certs: &[CertificateDer<'static>],
        generation: u64,
    ) -> Result<Self, IdentityError> {
        let mut roots = rustls::RootCertStore::empty();
        let mut anchors = Vec::new();
        for cert in certs {
            let anchor =
                webpki::anchor_from_trusted_cert(cert).map_err(|e| IdentityError::Pem {
                    what: "trust bundle".into(),
                    message: e.to_string(),
                })?;
            anchors.push(anchor.to_owned());
            roots.add(cert.clone()).map_err(IdentityError::Key)?;
        }
        Ok(Self {
            anchors,
            roots: Arc::new(roots),
            generation,
        })
    }
}

/// Issues, caches and rotates the SVIDs of this node's workloads; keeps the trust bundle.
pub struct Identities {
    trust_domain: RwLock<TrustDomain>,
    issuer: Issuer,
    ttl: Duration,
    svids: RwLock<HashMap<SpiffeId, Arc<Svid>>>,
    bundle: RwLock<Arc<Bundle>>,
    /// A PEM file of roots, re-read when it changes; else the CA's own root.
    bundle_file: Option<PathBuf>,
    bundle_stamp: RwLock<Option<(SystemTime, u64)>>,
    /// SVIDs issued since start (first issues and rotations): `weft_identity_certificates_issued_total`.
    issued: prometheus_client::metrics::counter::Counter,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Identities {
    /// # Errors
    /// When the bundle file cannot be read or parsed, or a remote issuer has no bundle file.
    pub fn new(
        trust_domain: TrustDomain,
        issuer: Issuer,
        ttl: Duration,
        bundle_file: Option<PathBuf>,
        issued_total: prometheus_client::metrics::counter::Counter,
    ) -> Result<Self, IdentityError> {
        let bundle = match &issuer {
            Issuer::Local(ca) => Bundle::from_certs(&[ca.root().clone()], 0)?,
            Issuer::Remote(_) => Bundle::from_certs(&[], 0)?,
        };
        if matches!(issuer, Issuer::Remote(_)) && bundle_file.is_none() {
            return Err(IdentityError::NoPem {
                what: "trust bundle (required with a certificate service)".into(),
                kind: "certificate",
            });
        }
        let this = Self {
            trust_domain: RwLock::new(trust_domain),
            issuer,
            ttl,
            svids: RwLock::default(),
            bundle: RwLock::new(Arc::new(bundle)),
            bundle_file,
            bundle_stamp: RwLock::default(),
            issued: issued_total,
        };
        this.reload_bundle()?;
        Ok(this)
    }

    /// The trust domain of this mesh (from its `MeshConfig`).
    #[must_use]
    pub fn trust_domain(&self) -> TrustDomain {
        self.trust_domain
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    #[must_use]
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the bundle file when its modification time or size changed. A file that
    /// cannot be parsed keeps the previous bundle (and is reported).
    ///
    /// # Errors
    /// When the file exists but is unreadable or holds no usable certificate.
    pub fn reload_bundle(&self) -> Result<bool, IdentityError> {
        let Some(path) = &self.bundle_file else {
            return Ok(false);
        };
        let meta = std::fs::metadata(path).map_err(|source| IdentityError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        if *self
            .bundle_stamp
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == Some(stamp)
        {
            return Ok(false);
        }
        let text = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let certs = certs_from_pem("trust bundle", &text)?;
        let generation = self.bundle().generation + 1;
        let bundle = Bundle::from_certs(&certs, generation)?;
        *self
            .bundle
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(bundle);
        *self
            .bundle_stamp
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(stamp);
        Ok(true)
    }

    /// The current SVID of `id`. With a local CA it is issued now when there is none or it is
    /// due; with a certificate service (which must not be called from a TLS handshake) the one
    /// held is used until it expires, and [`Identities::refresh`] renews it.
    ///
    /// # Errors
    /// When the CA cannot sign, or the service has not issued one yet.
    pub fn svid(&self, id: &SpiffeId) -> Result<Arc<Svid>, IdentityError> {
        let now = SystemTime::now();
        let held = self
            .svids
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned();
        match (&self.issuer, held) {
            (_, Some(svid)) if svid.renew_at() > now => Ok(svid),
            (Issuer::Local(ca), _) => {
                let fresh = Arc::new(ca.issue(id, self.ttl)?);
                self.store(fresh.clone());
                Ok(fresh)
            }
            (Issuer::Remote(_), Some(svid)) if svid.not_after > now => Ok(svid),
            (Issuer::Remote(_), _) => Err(IdentityError::NotIssued(id.to_string())),
        }
    }

    fn store(&self, svid: Arc<Svid>) {
        self.issued.inc();
        tracing::info!(
            target: "weft::identity",
            identity = %svid.id,
            valid_for_s = svid.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
            "new workload certificate"
        );
        self.svids
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(svid.id.clone(), svid);
    }

    /// Keeps SVIDs for exactly `wanted` (the node's workloads): obtains missing ones, replaces
    /// those past half their life, forgets the rest. Open connections keep the certificate they
    /// were established with; new handshakes use the new one.
    ///
    /// `ca_endpoints`: where the certificate service is, when its address names a Service the
    /// agent knows (the engine resolves Service names from its own view); empty: resolve
    /// the address with DNS.
    pub async fn refresh(
        &self,
        trust_domain: &TrustDomain,
        wanted: &HashSet<SpiffeId>,
        ca_endpoints: &[std::net::SocketAddrV4],
    ) {
        *self
            .trust_domain
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = trust_domain.clone();
        self.svids
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|id, _| wanted.contains(id));
        if let Err(e) = self.reload_bundle() {
            tracing::warn!(error = %e, "trust bundle not reloaded; keeping the previous one");
        }
        let now = SystemTime::now();
        for id in wanted {
            let due = self
                .svids
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(id)
                .is_none_or(|s| s.renew_at() <= now);
            if !due {
                continue;
            }
            let issued = match &self.issuer {
                Issuer::Local(ca) => ca.issue(id, self.ttl),
                Issuer::Remote(remote) => {
                    remote
                        .issue(id, self.ttl, self.bundle(), ca_endpoints)
                        .await
                }
            };
            let result = issued.map(|svid| self.store(Arc::new(svid)));
            if let Err(e) = result {
                tracing::error!(identity = %id, error = %e, "cannot obtain a workload certificate");
            }
        }
    }

    /// The identities currently held, with their expiry (for `/status`).
    #[must_use]
    pub fn held(&self) -> Vec<(SpiffeId, SystemTime)> {
        let mut v: Vec<_> = self
            .svids
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|s| (s.id.clone(), s.not_after))
            .collect();
        v.sort();
        v
    }
}
