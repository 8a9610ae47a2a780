//! The controller's certificate service: agents ask it for their workloads' certificates
//! (`identity::remote`), so that no node holds the CA key. A request is accepted when
//! - its bearer token is valid for the API server (a `TokenReview`) and names the agents'
//!   service account (`--agent-user`);
//! - the identity asked for is a pod's that the API server schedules on the node the agent
//!   names, in the mesh's trust domain;
//! - the certificate request is well formed and signed by its key (proof of possession).
//!
//! The certificate then carries only the identity asked for, whatever else the request names.
//! Limitation: a Kubernetes 1.20 token does not say which node its pod runs on, so an agent's
//! token is good for any node's identities (newer servers put the node in the token; not
//! used yet).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use serde::Serialize;
use tokio::sync::Notify;

use super::kube::{Keep, Kind};
use crate::api::objects::MeshConfig;
use crate::identity::{
    Ca, CaFiles, SpiffeId, TrustDomain,
    remote::{self, Response as Issued},
};

#[derive(Debug, Clone, Serialize)]
pub struct CertServiceConfig {
    pub ca: CaFiles,
    pub listen: SocketAddr,
    /// The service's own identity, in its TLS certificate.
    pub server_id: SpiffeId,
    /// The Kubernetes user name of the agents' service account.
    pub agent_user: String,
    pub max_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CertServiceError {
    #[error("CA: {0}")]
    Ca(#[from] crate::identity::IdentityError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] crate::identity::tls::TlsError),
}

/// Requests larger than this are refused (a CSR and a few names).
const MAX_BODY: usize = 64 * 1024;

struct Service {
    ca: Ca,
    config: CertServiceConfig,
    client: Client,
    pods: Kind<Pod>,
    mesh: Kind<MeshConfig>,
    monitor: Arc<super::monitor::Monitor>,
}

/// The service's own certificate, re-issued at half its life.
#[derive(Debug)]
struct OwnCert {
    service: std::sync::Mutex<Arc<crate::identity::Svid>>,
    ca: Arc<Service>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for OwnCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let mut current = self
            .service
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.renew_at() <= std::time::SystemTime::now() {
            match self.ca.ca.issue(&self.ca.config.server_id, OWN_TTL) {
                Ok(fresh) => *current = Arc::new(fresh),
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the certificate service's certificate");
                }
            }
        }
        Some(current.certified.clone())
    }
}

const OWN_TTL: Duration = Duration::from_hours(24);

/// Loads the CA, binds the listener and serves on a spawned task.
///
/// # Errors
/// When the CA cannot be loaded or the address cannot be bound.
pub async fn start(
    client: Client,
    config: &CertServiceConfig,
    monitor: Arc<super::monitor::Monitor>,
) -> Result<tokio::task::JoinHandle<()>, CertServiceError> {
    let ca = Ca::load(&config.ca)?;
    let own = ca.issue(&config.server_id, OWN_TTL)?;
    let changed = Arc::new(Notify::new());
    let service = Arc::new(Service {
        ca,
        config: config.clone(),
        pods: Kind::start(&client, Keep::All, &changed).await,
        mesh: Kind::start(&client, Keep::All, &changed).await,
        client,
        monitor,
    });
    // Requests are checked against both caches: serve once both are filled (an empty MeshConfig
    // cache would mean the default trust domain).
    service.pods.ready().await;
    service.mesh.ready().await;
    let tls = crate::identity::tls::ca_server_config(Arc::new(OwnCert {
        service: std::sync::Mutex::new(Arc::new(own)),
        ca: service.clone(),
    }))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| CertServiceError::Listen {
            addr: config.listen,
            source,
        })?;
    tracing::info!(addr = %config.listen, identity = %config.server_id, "certificate service listening");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    Ok(tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let acceptor = acceptor.clone();
            let service = service.clone();
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "certificate service: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let handler = hyper::service::service_fn(move |req| {
                    let service = service.clone();
                    async move { Ok::<_, std::convert::Infallible>(service.handle(req, peer).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tls), handler)
                    .await;
            });
        }
    }))
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

impl Service {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let answer = self.issue(req).await;
        self.monitor.certificate(answer.is_ok());
        match answer {
            Ok((id, node, pem)) => {
                tracing::info!(target: "weft::identity", %peer, identity = %id, node, "certificate issued");
                let body = serde_json::to_vec(&Issued { chain: pem }).unwrap_or_default();
                let mut r = reply(StatusCode::OK, body);
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            Err((status, message)) => {
                tracing::warn!(target: "weft::identity", %peer, status = status.as_u16(), "certificate refused: {message}");
                reply(status, format!("{message}\n"))
            }
        }
    }

    async fn issue(
        &self,
        req: Request<Incoming>,
    ) -> Result<(SpiffeId, String, String), (StatusCode, String)> {
        if req.method() != Method::POST || req.uri().path() != remote::PATH {
            return Err((
                StatusCode::NOT_FOUND,
                format!("only POST {} is served", remote::PATH),
            ));
        }
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .ok_or((
                StatusCode::UNAUTHORIZED,
                "no bearer token (the agent's service-account token)".to_owned(),
            ))?;
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("request body: {e}")))?
            .to_bytes();
        let request: remote::Request = serde_json::from_slice(&body)
            .map_err(|e| (StatusCode::BAD_REQUEST, format!("request: {e}")))?;
        self.authenticate(&token).await?;
        let id = SpiffeId::parse(&request.identity)
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        self.authorize(&id, &request.node)?;
        let ttl = Duration::from_secs(request.ttl_seconds.max(60)).min(self.config.max_ttl);
        let pem = self
            .ca
            .sign_request(&id, ttl, &request.csr)
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        Ok((id, request.node, pem))
    }

    /// The token must be valid and name the agents' service account.
    async fn authenticate(&self, token: &str) -> Result<(), (StatusCode, String)> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                ..TokenReviewSpec::default()
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("TokenReview failed: {e}"),
                )
            })?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err((
                StatusCode::UNAUTHORIZED,
                format!(
                    "the API server does not accept the token{}",
                    status.error.map(|e| format!(": {e}")).unwrap_or_default()
                ),
            ));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        if user != self.config.agent_user {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "{user:?} may not request certificates (only {})",
                    self.config.agent_user
                ),
            ));
        }
        Ok(())
    }

    /// The identity must be in the mesh's trust domain and belong to a pod on `node`.
    fn authorize(&self, id: &SpiffeId, node: &str) -> Result<(), (StatusCode, String)> {
        let trust_domain = self
            .mesh
            .objects()
            .into_iter()
            .find(|m| m.metadata.name.as_deref() == Some("default"))
            .and_then(|m| m.spec.trust_domain.clone())
            .and_then(|td| TrustDomain::new(&td).ok())
            .unwrap_or_default();
        if id.trust_domain() != trust_domain.as_str() {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "{id} is not in the mesh's trust domain {}",
                    trust_domain.as_str()
                ),
            ));
        }
        let Some((ns, sa)) = id.namespace_and_account() else {
            return Err((
                StatusCode::FORBIDDEN,
                format!("{id} is not a workload identity (spiffe://<td>/ns/<ns>/sa/<sa>)"),
            ));
        };
        let runs_there = self.pods.any(|p| {
            let spec = p.spec.as_ref();
            p.metadata.namespace.as_deref() == Some(ns)
                && spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                && spec
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default")
                    == sa
        });
        if runs_there {
            Ok(())
        } else {
            Err((
                StatusCode::FORBIDDEN,
                format!("no pod of service account {ns}/{sa} is scheduled on node {node:?}"),
            ))
        }
    }
}
