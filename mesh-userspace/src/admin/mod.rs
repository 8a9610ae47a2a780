//! Admin API over a Unix socket (for the CLI) and, optionally, TCP (for Prometheus):
//! `/metrics`, `/ready`, `/config_dump`, `/flows`, `/status`, `/graph`, `/ui`, `/explain`, and
//! the live event stream `/tap`.
use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, UnixListener};

pub mod cluster;
pub mod graph;
pub mod shared;
pub mod tap;

pub use shared::{EnrolRequest, Shared, SharedState, Wake};

use crate::config::AgentConfig;

/// What `weft status` shows.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Status {
    pub node: String,
    pub ready: bool,
    pub startup: Option<crate::ebpf::Startup>,
    pub bpffs_dir: String,
    pub fast_path_enabled: bool,
    pub fast_path_killed: bool,
    pub workloads: usize,
    pub meshed_local_workloads: usize,
    pub services: usize,
    pub policy_entries: usize,
    pub sockhash_entries: usize,
    /// Sockets of connections made before an upgrade changed the sockhash's layout.
    #[serde(default)]
    pub retired_sockets: usize,
    /// The build that wrote the pinned datapath (`abi<N>-<object hash>`).
    #[serde(default)]
    pub datapath_generation: Option<String>,
    /// The kernel's socket self-test (absent from agents that predate it).
    #[serde(default)]
    pub socket_self_test: Option<crate::ebpf::selftest::SocketSelfTest>,
    /// This node's meshed workloads whose sockets join the socket fast path.
    #[serde(default)]
    pub socket_fast_path_workloads: usize,
    pub live_flows: usize,
    pub interfaces: Vec<String>,
    pub config_errors: Vec<String>,
    /// The verdict on every Weft object and route, as `weft check` prints it (the controller
    /// writes the same reasons and messages in conditions; `/config_dump` has them structured).
    #[serde(default)]
    pub findings: Vec<String>,
    pub last_sync_error: Option<String>,
    /// Workload certificates this agent holds (`spiffe id` → expiry, seconds since the epoch);
    /// absent without a CA (no tunnel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identities: Option<Vec<(String, u64)>>,
}

pub async fn serve(shared: SharedState, config: &AgentConfig) -> std::io::Result<()> {
    if let Some(dir) = config.admin_socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&config.admin_socket);
    let unix = UnixListener::bind(&config.admin_socket)?;
    let hub = shared
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .tap
        .clone();
    tokio::spawn(tap::read_kernel(
        config.bpffs_dir.clone(),
        shared.clone(),
        hub,
    ));
    tracing::info!(socket = %config.admin_socket.display(), "admin API listening");
    let tcp = match config.metrics_addr {
        Some(addr) => {
            let l = TcpListener::bind(addr).await?;
            tracing::info!(%addr, "metrics listening");
            Some(l)
        }
        None => None,
    };
    loop {
        // Only the Unix socket (root on this node: the CNI plugin, the CLI) may change state;
        // the TCP listener, reachable from the network for Prometheus and the controller's
        // page, only reads.
        let (io_stream, local): (Box<dyn AsyncStream>, bool) = tokio::select! {
            r = unix.accept() => (Box::new(r?.0), true),
            r = async { match &tcp { Some(l) => l.accept().await, None => std::future::pending().await } } => (Box::new(r?.0), false),
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(shared.clone(), req, local));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io_stream), svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}

/// A whole answer, or the `/tap` stream.
pub(crate) type AdminBody = Either<Full<Bytes>, tap::Stream>;

pub(crate) fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<AdminBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Either::Left(Full::new(body.into())))
        .unwrap_or_else(|_| Response::new(Either::Left(Full::new(Bytes::new()))))
}

pub(crate) fn json(value: &impl Serialize) -> Response<AdminBody> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            e.to_string(),
        ),
    }
}

/// `POST /cni/add` from the CNI plugin: the datapath thread enrols the pod and answers once it is
/// in the kernel (or says why not yet).
async fn cni_add(shared: &SharedState, req: Request<Incoming>) -> Response<AdminBody> {
    use http_body_util::BodyExt as _;
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return respond(StatusCode::BAD_REQUEST, "text/plain", e.to_string()),
    };
    let enrolment: crate::cni::Enrolment = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return respond(StatusCode::BAD_REQUEST, "text/plain", e.to_string()),
    };
    let sender = shared
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .enrol
        .clone();
    let Some(sender) = sender else {
        return respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the agent is starting\n",
        );
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if sender.send(Wake::Enrol((enrolment, reply))).is_err() {
        return respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the datapath thread is gone\n",
        );
    }
    match tokio::time::timeout(std::time::Duration::from_secs(5), answer).await {
        Ok(Ok(Ok(()))) => respond(StatusCode::OK, "text/plain", "enrolled\n"),
        Ok(Ok(Err(why))) => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why),
        _ => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "no answer from the datapath thread\n",
        ),
    }
}

#[allow(clippy::unused_async, reason = "hyper's service_fn wants a future")]
async fn handle(
    shared: SharedState,
    req: Request<Incoming>,
    local: bool,
) -> Result<Response<AdminBody>, Infallible> {
    if local && req.method() == Method::POST && req.uri().path() == "/cni/add" {
        return Ok(cni_add(&shared, req).await);
    }
    if req.method() == Method::GET && req.uri().path() == "/tap" {
        return Ok(tap::serve(&shared, req.uri().query().unwrap_or_default()).await);
    }
    if req.method() != Method::GET {
        return Ok(respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET is supported (and POST /cni/add on the agent's Unix socket)\n",
        ));
    }
    let s = shared
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let resp = match req.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            match s
                .registry
                .as_ref()
                .map(|r| prometheus_client::encoding::text::encode(&mut body, r))
            {
                Some(Ok(())) => respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                _ => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    "metrics unavailable\n",
                ),
            }
        }
        "/ready" => {
            if s.ready {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                let why = s
                    .last_sync_error
                    .clone()
                    .unwrap_or_else(|| "first sync pending".into());
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {why}\n"),
                )
            }
        }
        "/config_dump" => json(&*s),
        "/flows" => json(&FlowsView {
            flows: &s.flows,
            l7: s
                .engine
                .as_ref()
                .map(|e| e.connections.snapshot())
                .unwrap_or_default(),
        }),
        "/status" => json(&status(&s)),
        "/graph" => {
            let mut text = String::new();
            if let Some(r) = s.registry.as_ref() {
                let _ = prometheus_client::encoding::text::encode(&mut text, r);
            }
            json(&graph::build(&s.node, &s.flows, &s.metrics.get(), &text))
        }
        "/" | "/ui" => respond(StatusCode::OK, "text/html; charset=utf-8", UI),
        "/explain" => explain(&s, req.uri().query().unwrap_or_default()),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /ui, /metrics, /ready, /config_dump, /flows, /graph, /status, /tap or /explain?src=…&dst=…\n",
        ),
    };
    Ok(resp)
}

/// The service graph page: one file, no assets from elsewhere.
pub(crate) const UI: &str = include_str!("ui.html");

/// `/explain?src=namespace/pod&dst=destination`: what the mesh does with such a connection now.
fn explain(s: &Shared, query: &str) -> Response<AdminBody> {
    let param = |name: &str| {
        form_urlencoded::parse(query.as_bytes())
            .find_map(|(k, v)| (k == name).then(|| v.into_owned()))
    };
    let (Some(src), Some(dst)) = (param("src"), param("dst")) else {
        return respond(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "give src=namespace/pod and dst=service[:port] or pod:port\n",
        );
    };
    let kernel = s.metrics.get();
    let facts = crate::state::explain::Facts {
        fast_path: kernel.fast_path_enabled && !kernel.fast_path_killed,
        socket_redirect_exact: s.socket_self_test.as_ref().is_none_or(|t| t.passed),
        engine: s.engine.as_ref().is_some_and(|e| !e.is_draining()),
        tunnel: s
            .config
            .as_ref()
            .is_some_and(|c| c.identity.is_some() && c.engine_addr.is_some()),
    };
    match crate::state::explain::explain(&s.node, &src, &dst, facts) {
        Ok(answer) => json(&answer),
        Err(why) => respond(StatusCode::NOT_FOUND, "text/plain", format!("{why}\n")),
    }
}

/// `/flows`: the kernel's flow table plus the connections the L7 engine holds.
#[derive(Serialize)]
struct FlowsView<'a> {
    #[serde(flatten)]
    flows: &'a crate::flows::FlowSnapshot,
    l7: crate::proxy::L7Flows,
}

fn status(s: &Shared) -> Status {
    let kernel = s.metrics.get();
    Status {
        node: s.node.node.clone(),
        ready: s.ready,
        startup: s.startup,
        bpffs_dir: s
            .config
            .as_ref()
            .map(|c| c.bpffs_dir.display().to_string())
            .unwrap_or_default(),
        fast_path_enabled: kernel.fast_path_enabled,
        fast_path_killed: kernel.fast_path_killed,
        workloads: s.node.workloads.len(),
        meshed_local_workloads: s
            .node
            .workloads
            .iter()
            .filter(|w| w.meshed && w.local)
            .count(),
        services: s.node.services.len(),
        policy_entries: s.node.policy.len(),
        sockhash_entries: kernel.sockhash_entries,
        retired_sockets: kernel.retired_sockets,
        datapath_generation: s.datapath_generation.clone(),
        socket_self_test: s.socket_self_test.clone(),
        socket_fast_path_workloads: {
            let kernel_ok = s.socket_self_test.as_ref().is_some_and(|t| t.passed);
            s.node
                .workloads
                .iter()
                .filter(|w| w.meshed && w.local && w.socket_fast_path.allowed(kernel_ok))
                .count()
        },
        live_flows: s.flows.live.len(),
        interfaces: s
            .interfaces
            .iter()
            .map(|(i, p)| {
                if p.is_empty() {
                    i.clone()
                } else {
                    format!("{i}={p}")
                }
            })
            .collect(),
        config_errors: s.config_errors.clone(),
        findings: s.node.findings.iter().map(ToString::to_string).collect(),
        last_sync_error: s.last_sync_error.clone(),
        identities: s.engine.as_ref().and_then(|e| e.tunnel.as_ref()).map(|t| {
            t.ids
                .held()
                .into_iter()
                .map(|(id, until)| {
                    let secs = until
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    (id.to_string(), secs)
                })
                .collect()
        }),
    }
}
