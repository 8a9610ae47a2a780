//! Mutual TLS 1.3 for the node-to-node tunnel (rustls): the serving agent presents the SVID of
//! the destination workload the client asked for (by server name) and requires a client SVID
//! chaining to the trust bundle; the client checks the server's chain and that its SPIFFE ID is
//! exactly the destination's.
use std::sync::{Arc, Mutex};

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

use crate::identity::{self, Identities, SpiffeId};

/// The tunnel's ALPN protocol: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the peer's certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("the peer's certificate has no SPIFFE ID (URI SAN)")]
    NoSpiffeId,
    #[error("the trust bundle cannot verify clients: {0}")]
    Verifier(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SPIFFE ID in a certificate's URI SAN (exactly one `spiffe://` URI is expected).
///
/// # Errors
/// When the certificate cannot be parsed or carries no SPIFFE ID.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::Parse(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| TlsError::Parse(e.to_string()))?
        .ok_or(TlsError::NoSpiffeId)?;
    san.value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => SpiffeId::parse(uri).ok(),
            _ => None,
        })
        .ok_or(TlsError::NoSpiffeId)
}

/// Picks the SVID of the workload named by the client's server name.
#[derive(Debug)]
struct ByServerName(Arc<Identities>);

impl ResolvesServerCert for ByServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name()?;
        let id = identity::identity_for_server_name(&self.0.trust_domain(), sni)?;
        match self.0.svid(&id) {
            Ok(svid) => Some(svid.certified.clone()),
            Err(e) => {
                tracing::warn!(identity = %id, error = %e, "no certificate for a tunnel handshake");
                None
            }
        }
    }
}

/// Server configs by bundle generation (rebuilt when the bundle rotates).
#[derive(Debug, Default)]
pub struct ServerConfigs(Mutex<Option<(u64, Arc<rustls::ServerConfig>)>>);

impl ServerConfigs {
    /// The tunnel server's config for the current trust bundle.
    ///
    /// # Errors
    /// When the bundle cannot make a client verifier.
    pub fn get(&self, ids: &Arc<Identities>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let bundle = ids.bundle();
        let mut cached = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((generation, config)) = cached.as_ref()
            && *generation == bundle.generation
        {
            return Ok(config.clone());
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(bundle.roots.clone(), provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Verifier(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(ByServerName(ids.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let config = Arc::new(config);
        *cached = Some((bundle.generation, config.clone()));
        Ok(config)
    }
}

/// Presents the current SVID of one source workload (looked up at each handshake, so a
/// rotation needs no new config).
#[derive(Debug)]
struct SourceSvid {
    ids: Arc<Identities>,
    source: SpiffeId,
}

impl rustls::client::ResolvesClientCert for SourceSvid {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.ids
            .svid(&self.source)
            .ok()
            .map(|s| s.certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies the server's chain against the current bundle and its SPIFFE ID against the
/// expected destination; the TLS name is not used for anything else.
#[derive(Debug)]
struct ExpectIdentity {
    roots: Roots,
    expected: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Where a verifier takes its trust anchors from.
#[derive(Debug)]
enum Roots {
    /// The agent's current bundle (it rotates).
    Live(Arc<Identities>),
    /// One bundle, for one connection.
    Fixed(Arc<identity::Bundle>),
}

impl Roots {
    fn bundle(&self) -> Arc<identity::Bundle> {
        match self {
            Self::Live(ids) => ids.bundle(),
            Self::Fixed(b) => b.clone(),
        }
    }
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundle = self.roots.bundle();
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        cert.verify_for_usage(
            self.algorithms.all,
            &bundle.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("server certificate not trusted: {e}")))?;
        let got = spiffe_id_of(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if got != self.expected {
            return Err(rustls::Error::General(format!(
                "server presented {got}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        None
    }
}

/// The client config of one tunnel connection: `source`'s SVID, `expected` as the server.
///
/// # Errors
/// Never in practice (TLS 1.3 is supported by the provider); kept for the builder's result.
pub fn client_config(
    ids: &Arc<Identities>,
    source: &SpiffeId,
    expected: &SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut config = verifying(Roots::Live(ids.clone()), expected)?.with_client_cert_resolver(
        Arc::new(SourceSvid {
            ids: ids.clone(),
            source: source.clone(),
        }),
    );
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The client config of an agent's certificate request to the controller: no client
/// certificate (the request carries a Kubernetes token), the server verified against `bundle`
/// and its SPIFFE ID against `expected`.
///
/// # Errors
/// Never in practice (TLS 1.3 is supported by the provider).
pub fn ca_client_config(
    bundle: Arc<identity::Bundle>,
    expected: &SpiffeId,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = verifying(Roots::Fixed(bundle), expected)?.with_no_client_auth();
    Ok(Arc::new(config))
}

/// A TLS 1.3 client config that verifies the server against `roots` and its SPIFFE ID against
/// `expected`; the caller chooses the client's own certificate.
fn verifying(
    roots: Roots,
    expected: &SpiffeId,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, TlsError>
{
    let provider = provider();
    let verifier = ExpectIdentity {
        roots,
        expected: expected.clone(),
        algorithms: provider.signature_verification_algorithms,
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Verifier(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier)))
}

/// The server config of the controller's certificate service: the certificate `current`
/// returns (renewed by its owner), no client certificates.
///
/// # Errors
/// Never in practice (TLS 1.3 is supported by the provider).
pub fn ca_server_config(
    current: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Verifier(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(current);
    Ok(Arc::new(config))
}
