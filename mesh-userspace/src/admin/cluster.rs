//! The controller's monitoring server: its own metrics and readiness, and the cluster-wide
//! page. The page is the agent's (`/ui`); the controller answers the same questions for the
//! whole mesh by asking every node agent and merging:
//! - `/graph`: the agents' graphs merged (see [`graph::merge`]), with `agents`: who answered;
//! - `/flows`: every agent's flow table, each flow with its `node`;
//! - `/tap`: every agent's live events as one stream (or one batch), each with its `node`;
//! - `/explain`: the first agent that knows the source pod answers (they all hold the same
//!   objects; the kernel verdict is computed from the same policy);
//! - `/objects`: the controller's verdict on every object, as its status conditions say.
//!
//! Agents are found by the Endpoints of their metrics Service (`--agents-service`; a ready
//! address per node, port `metrics`) and by `--agent URL`. Requests to agents time out after
//! [`AGENT_TIMEOUT`]; an agent that does not answer is listed as down and left out. Every
//! [`AGENT_CHECK_INTERVAL`] the agents are asked `/ready`, so `weft_controller_agents{state}`
//! says how many are up without anyone looking at the page.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Either, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Endpoints;
use serde::Serialize;
use tokio::{net::TcpListener, sync::mpsc};

use super::{
    graph::{self, Graph},
    json, respond,
    tap::Stream,
};
use crate::control::monitor::Monitor;

/// A request to one agent gives up after this long (a `/tap` batch: its `for` plus this).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the agents are asked whether they are ready, for `weft_controller_agents`.
pub const AGENT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// Largest answer read from an agent.
const MAX_AGENT_ANSWER: usize = 32 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct ClusterConfig {
    pub listen: SocketAddr,
    /// Agents given by URL (`http://host:port`).
    pub agents: Vec<String>,
    /// The agents' metrics Service in `namespace`, whose Endpoints list every ready agent.
    pub agents_service: Option<String>,
    pub namespace: String,
}

/// One agent, as the page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    /// Its node (the Endpoints' `nodeName`, else its address).
    pub name: String,
    pub url: String,
    pub up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Serialize)]
struct ClusterGraph {
    #[serde(flatten)]
    graph: Graph,
    agents: Vec<AgentView>,
}

struct Cluster {
    config: ClusterConfig,
    client: kube::Client,
    monitor: Arc<Monitor>,
    /// The node names `--agent` URLs gave in their `/status` (URL → node).
    names: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

type Body = super::AdminBody;

/// Serves until the listener fails.
pub async fn serve(config: ClusterConfig, client: kube::Client, monitor: Arc<Monitor>) {
    let listener = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(addr = %config.listen, error = %e, "the monitoring server cannot listen");
            return;
        }
    };
    tracing::info!(addr = %config.listen, "monitoring server and cluster page listening");
    let cluster = Arc::new(Cluster {
        config,
        client,
        monitor,
        names: std::sync::Mutex::default(),
    });
    // `weft_controller_agents` stays current without anyone on the page.
    let watcher = Arc::clone(&cluster);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(AGENT_CHECK_INTERVAL);
        loop {
            every.tick().await;
            let _ = watcher.ask_all("/ready", AGENT_TIMEOUT).await;
        }
    });
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cluster = Arc::clone(&cluster);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let cluster = Arc::clone(&cluster);
                async move { Ok::<_, Infallible>(cluster.handle(&req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "monitoring connection ended with an error");
            }
        });
    }
}

/// The agent (`name`, base URL) pairs to ask, and how many listed agents are not ready.
struct Found {
    agents: Vec<(String, String)>,
    not_ready: Vec<AgentView>,
}

impl Cluster {
    async fn handle(&self, req: &Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET is supported\n",
            );
        }
        let query = req.uri().query().unwrap_or_default();
        match req.uri().path() {
            "/metrics" => match self.monitor.encode() {
                Ok(text) => respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            },
            "/ready" => {
                if self.monitor.ready() {
                    respond(StatusCode::OK, "text/plain", "ready\n")
                } else {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: the objects are not judged yet\n",
                    )
                }
            }
            "/objects" => json(
                &self
                    .monitor
                    .findings()
                    .iter()
                    .map(crate::state::explain::ObjectState::of)
                    .collect::<Vec<_>>(),
            ),
            "/" | "/ui" => respond(StatusCode::OK, "text/html; charset=utf-8", super::UI),
            "/graph" => self.graph().await,
            "/flows" => self.flows().await,
            "/explain" => self.explain(query).await,
            "/tap" => self.tap(query).await,
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /ui, /metrics, /ready, /objects, /graph, /flows, /tap or /explain?src=…&dst=…\n",
            ),
        }
    }

    /// The node an `--agent` URL serves, as its `/status` says (asked once; its address
    /// until it answers).
    async fn name_of(&self, url: &str) -> String {
        let known = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(url)
            .cloned();
        if let Some(name) = known {
            return name;
        }
        let node = get(url, "/status", AGENT_TIMEOUT)
            .await
            .ok()
            .and_then(|body| serde_json::from_slice::<super::Status>(&body).ok())
            .map(|s| s.node)
            .filter(|n| !n.is_empty());
        match node {
            Some(node) => {
                self.names
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(url.to_owned(), node.clone());
                node
            }
            None => url.trim_start_matches("http://").to_owned(),
        }
    }

    /// Every agent to ask now.
    async fn find(&self) -> Found {
        let urls: Vec<String> = self
            .config
            .agents
            .iter()
            .map(|u| u.trim_end_matches('/').to_owned())
            .collect();
        let names = futures_util::future::join_all(urls.iter().map(|u| self.name_of(u))).await;
        let mut found = Found {
            agents: names.into_iter().zip(urls).collect(),
            not_ready: Vec::new(),
        };
        let Some(service) = &self.config.agents_service else {
            return found;
        };
        let api: kube::Api<Endpoints> =
            kube::Api::namespaced(self.client.clone(), &self.config.namespace);
        let endpoints = match api.get_opt(service).await {
            Ok(Some(e)) => e,
            Ok(None) => return found,
            Err(e) => {
                tracing::debug!(error = %e, service, "cannot read the agents' Endpoints");
                return found;
            }
        };
        for subset in endpoints.subsets.unwrap_or_default() {
            let ports = subset.ports.unwrap_or_default();
            let Some(port) = ports
                .iter()
                .find(|p| p.name.as_deref() == Some("metrics"))
                .or(ports.first())
                .map(|p| p.port)
            else {
                continue;
            };
            let url = |ip: &str| {
                if ip.contains(':') {
                    format!("http://[{ip}]:{port}")
                } else {
                    format!("http://{ip}:{port}")
                }
            };
            for a in subset.addresses.unwrap_or_default() {
                let name = a.node_name.clone().unwrap_or_else(|| a.ip.clone());
                found.agents.push((name, url(&a.ip)));
            }
            for a in subset.not_ready_addresses.unwrap_or_default() {
                found.not_ready.push(AgentView {
                    name: a.node_name.clone().unwrap_or_else(|| a.ip.clone()),
                    url: url(&a.ip),
                    up: false,
                    error: Some("not ready".into()),
                });
            }
        }
        found
    }

    /// Asks every agent for `path_and_query`; the answers of those that answered 200.
    async fn ask_all(
        &self,
        path_and_query: &str,
        timeout: Duration,
    ) -> (Vec<(String, Bytes)>, Vec<AgentView>) {
        let found = self.find().await;
        let asks = found.agents.iter().map(|(name, base)| async move {
            let answer = get(base, path_and_query, timeout).await;
            (name.clone(), base.clone(), answer)
        });
        let answers = futures_util::future::join_all(asks).await;
        let mut ok = Vec::new();
        let mut views = found.not_ready;
        for (name, url, answer) in answers {
            match answer {
                Ok(body) => {
                    ok.push((name.clone(), body));
                    views.push(AgentView {
                        name,
                        url,
                        up: true,
                        error: None,
                    });
                }
                Err(e) => views.push(AgentView {
                    name,
                    url,
                    up: false,
                    error: Some(e),
                }),
            }
        }
        let up = views.iter().filter(|v| v.up).count();
        self.monitor.agents_asked(up, views.len() - up);
        (ok, views)
    }

    async fn graph(&self) -> Response<Body> {
        let (answers, mut agents) = self.ask_all("/graph", AGENT_TIMEOUT).await;
        let mut graphs = Vec::new();
        for (name, body) in answers {
            match serde_json::from_slice::<Graph>(&body) {
                Ok(mut g) => {
                    if g.node.is_empty() {
                        g.node.clone_from(&name);
                    }
                    graphs.push(g);
                }
                Err(e) => {
                    if let Some(v) = agents.iter_mut().find(|v| v.name == name) {
                        v.up = false;
                        v.error = Some(format!("its graph is not understood: {e}"));
                    }
                }
            }
        }
        json(&ClusterGraph {
            graph: graph::merge(&graphs),
            agents,
        })
    }

    async fn flows(&self) -> Response<Body> {
        let (answers, agents) = self.ask_all("/flows", AGENT_TIMEOUT).await;
        let mut merged = serde_json::Map::new();
        for (name, body) in answers {
            let Ok(serde_json::Value::Object(view)) = serde_json::from_slice(&body) else {
                continue;
            };
            for (key, value) in view {
                let serde_json::Value::Array(items) = value else {
                    continue;
                };
                let into = merged
                    .entry(key)
                    .or_insert_with(|| serde_json::Value::Array(Vec::new()));
                if let serde_json::Value::Array(into) = into {
                    into.extend(items.into_iter().map(|mut f| {
                        if let Some(f) = f.as_object_mut() {
                            f.insert("node".into(), name.clone().into());
                        }
                        f
                    }));
                }
            }
        }
        merged.insert(
            "agents".into(),
            serde_json::to_value(agents).unwrap_or_default(),
        );
        json(&merged)
    }

    async fn explain(&self, query: &str) -> Response<Body> {
        let found = self.find().await;
        let mut last = (
            StatusCode::SERVICE_UNAVAILABLE,
            "no node agent to ask\n".to_owned(),
        );
        for (_, base) in &found.agents {
            match get_status(base, &format!("/explain?{query}"), AGENT_TIMEOUT).await {
                Ok((StatusCode::OK, body)) => {
                    return respond(StatusCode::OK, "application/json", body);
                }
                Ok((status, body)) => last = (status, String::from_utf8_lossy(&body).into_owned()),
                Err(e) => last = (StatusCode::BAD_GATEWAY, format!("{base}: {e}\n")),
            }
        }
        respond(last.0, "text/plain", last.1)
    }

    /// Every agent's `/tap` with the same query; lines get their agent's `node`. One
    /// `watching` line first, once every agent said it watches.
    async fn tap(&self, query: &str) -> Response<Body> {
        let batch = form_urlencoded::parse(query.as_bytes())
            .any(|(k, v)| k == "batch" && (v == "true" || v == "1"));
        let seconds = form_urlencoded::parse(query.as_bytes())
            .find_map(|(k, v)| (k == "for").then(|| v.parse::<u64>().ok()))
            .flatten();
        if batch && seconds.is_none() {
            return respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "batch=true needs for=<seconds>\n",
            );
        }
        // A batch answers after its `for` seconds; a stream answers at once.
        let answer_within =
            AGENT_TIMEOUT + Duration::from_secs(seconds.filter(|_| batch).unwrap_or(0));
        let found = self.find().await;
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        let agents = found.agents.len();
        let (watching_tx, mut watching_rx) = mpsc::channel::<()>(agents.max(1));
        for (name, base) in found.agents {
            let tx = tx.clone();
            let watching = watching_tx.clone();
            let path = format!("/tap?{query}");
            tokio::spawn(async move {
                if let Err(e) = relay_tap(&base, &path, answer_within, &name, &tx, &watching).await
                {
                    tracing::debug!(agent = name, error = %e, "an agent's tap ended");
                }
            });
        }
        drop(watching_tx);
        // The merged stream: `watching` once all agents watch (or gave up), then their lines.
        let (out_tx, out_rx) = mpsc::channel::<Bytes>(256);
        let mut lines = rx;
        drop(tx);
        tokio::spawn(async move {
            let mut seen = 0;
            while seen < agents && watching_rx.recv().await.is_some() {
                seen += 1;
            }
            let hello = serde_json::json!({"type": "watching", "agents": agents});
            if out_tx
                .send(Bytes::from(format!("{hello}\n")))
                .await
                .is_err()
            {
                return;
            }
            while let Some(line) = lines.recv().await {
                if out_tx.send(line).await.is_err() {
                    return;
                }
            }
        });
        let mut stream = Stream(out_rx);
        if batch {
            let mut body = Vec::new();
            while let Some(line) = stream.0.recv().await {
                body.extend_from_slice(&line);
            }
            return respond(StatusCode::OK, "application/x-ndjson", body);
        }
        Response::builder()
            .header(header::CONTENT_TYPE, "application/x-ndjson")
            .body(Either::Right(stream))
            .unwrap_or_else(|_| respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", ""))
    }
}

/// Copies one agent's `/tap` lines into `tx` with `"node"` added; says on `watching` when the
/// agent watches (or when it failed, so the merged stream does not wait for it).
async fn relay_tap(
    base: &str,
    path: &str,
    answer_within: Duration,
    name: &str,
    tx: &mpsc::Sender<Bytes>,
    watching: &mpsc::Sender<()>,
) -> Result<(), String> {
    let mut said = false;
    let result = async {
        let mut body = open(base, path, answer_within).await?;
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let Ok(serde_json::Value::Object(mut event)) = serde_json::from_slice(&line) else {
                    continue;
                };
                if event.get("type").and_then(|t| t.as_str()) == Some("watching") {
                    if !said {
                        said = true;
                        let _ = watching.send(()).await;
                    }
                    continue;
                }
                event.insert("node".into(), name.into());
                let mut out = serde_json::to_vec(&event).map_err(|e| e.to_string())?;
                out.push(b'\n');
                if tx.send(Bytes::from(out)).await.is_err() {
                    return Ok(()); // the reader left
                }
            }
            if pending.len() > 1 << 20 {
                return Err("a line longer than 1 MiB".into());
            }
        }
        Ok(())
    }
    .await;
    if !said {
        let _ = watching.send(()).await;
    }
    result
}

/// `GET base+path` (`base`: `http://host:port`): status and whole body.
async fn get_status(
    base: &str,
    path: &str,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), String> {
    tokio::time::timeout(timeout, async {
        let response = request(base, path).await?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_AGENT_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    })
    .await
    .map_err(|_| format!("no answer in {timeout:?}"))?
}

/// `GET base+path`: the body of a 200 answer.
async fn get(base: &str, path: &str, timeout: Duration) -> Result<Bytes, String> {
    match get_status(base, path, timeout).await? {
        (StatusCode::OK, body) => Ok(body),
        (status, body) => Err(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )),
    }
}

/// `GET base+path`, the body left to read (a stream), after a 200 answer within `timeout`.
async fn open(base: &str, path: &str, timeout: Duration) -> Result<Incoming, String> {
    let response = tokio::time::timeout(timeout, request(base, path))
        .await
        .map_err(|_| format!("no answer in {timeout:?}"))??;
    if response.status() != StatusCode::OK {
        return Err(format!("answered {}", response.status()));
    }
    Ok(response.into_body())
}

async fn request(base: &str, path: &str) -> Result<Response<Incoming>, String> {
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("{base}: only http:// agents are asked"))?
        .trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let req = Request::get(path)
        .header(header::HOST, authority)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    sender.send_request(req).await.map_err(|e| e.to_string())
}
