//! Certificates from the control plane: the agent generates each workload's key, sends a
//! certificate request to `weft controller`'s certificate service over TLS (the server checked
//! against the trust bundle and its SPIFFE ID), authenticated with the agent's Kubernetes
//! service-account token, and keeps the key in memory only. The wire format is JSON over HTTP/1.1:
//! `POST /v1/certificates` with [`Request`], answered with [`Response`] or an error text.
use std::{path::PathBuf, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, StatusCode, header};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use serde::{Deserialize, Serialize};

use super::{Bundle, IdentityError, SpiffeId, Svid, ca::svid_from_chain};

/// The path of the certificate service.
pub const PATH: &str = "/v1/certificates";

/// A certificate request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    /// The workload identity asked for.
    pub identity: String,
    /// The node the agent runs on: the identity must be a pod's of that node.
    pub node: String,
    /// PKCS#10 request (PEM) for the workload's key.
    pub csr: String,
    pub ttl_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    /// The certificate, then its intermediates (PEM).
    pub chain: String,
}

/// How an agent reaches the certificate service.
#[derive(Debug, Clone, Serialize)]
pub struct RemoteCa {
    /// `host:port` (a name is resolved for every request).
    pub addr: String,
    /// The service's SPIFFE ID (its certificate must carry exactly this).
    pub server_id: SpiffeId,
    /// The agent's service-account token (re-read for every request: tokens rotate).
    pub token_file: PathBuf,
    pub node: String,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl RemoteCa {
    /// A fresh key and its certificate for `id` from the service.
    ///
    /// # Errors
    /// When the service cannot be reached or verified, or refuses (its reason is in the error).
    pub async fn issue(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        bundle: Arc<Bundle>,
        endpoints: &[std::net::SocketAddrV4],
    ) -> Result<Svid, IdentityError> {
        let key = KeyPair::generate()?;
        let csr = CertificateParams::default()
            .serialize_request(&key)?
            .pem()?;
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|source| IdentityError::Read {
                path: self.token_file.display().to_string(),
                source,
            })?;
        let body = serde_json::to_vec(&Request {
            identity: id.to_string(),
            node: self.node.clone(),
            csr,
            ttl_seconds: ttl.as_secs(),
        })
        .map_err(|e| self.error(e))?;
        let chain = tokio::time::timeout(TIMEOUT, self.post(body, token.trim(), bundle, endpoints))
            .await
            .map_err(|_| self.error("no answer within 10 s"))??;
        svid_from_chain(id, &chain, &key)
    }

    /// Posts to one of `endpoints` (the service's pods, tried in order), or to `addr` itself
    /// through DNS when the service is not known by name.
    async fn post(
        &self,
        body: Vec<u8>,
        token: &str,
        bundle: Arc<Bundle>,
        endpoints: &[std::net::SocketAddrV4],
    ) -> Result<String, IdentityError> {
        let config = crate::identity::tls::ca_client_config(bundle, &self.server_id)
            .map_err(|e| self.error(e))?;
        let tcp = if endpoints.is_empty() {
            tokio::net::TcpStream::connect(self.addr.as_str())
                .await
                .map_err(|e| self.error(e))?
        } else {
            let mut last = None;
            let mut connected = None;
            for endpoint in endpoints {
                match tokio::net::TcpStream::connect(endpoint).await {
                    Ok(tcp) => {
                        connected = Some(tcp);
                        break;
                    }
                    Err(e) => last = Some(format!("{endpoint}: {e}")),
                }
            }
            connected.ok_or_else(|| self.error(last.unwrap_or_default()))?
        };
        // The name is not checked (the SPIFFE ID is); it only has to be a valid one.
        let name = rustls::pki_types::ServerName::try_from("weft-ca").map_err(|e| self.error(e))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| self.error(format!("TLS: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.error(e))?;
        tokio::spawn(conn);
        let request = hyper::Request::builder()
            .method(Method::POST)
            .uri(PATH)
            .header(header::HOST, self.addr.as_str())
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .map_err(|e| self.error(e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.error(e))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.error(e))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(self.error(format!(
                "refused ({status}): {}",
                String::from_utf8_lossy(&bytes).trim()
            )));
        }
        let answer: Response = serde_json::from_slice(&bytes).map_err(|e| self.error(e))?;
        Ok(answer.chain)
    }

    fn error(&self, e: impl std::fmt::Display) -> IdentityError {
        IdentityError::Remote {
            addr: self.addr.clone(),
            message: e.to_string(),
        }
    }
}
