//! HTTP/1.1 and HTTP/2 (gRPC included) through the engine: routes, traffic policy, golden
//! metrics. One hyper server connection per client connection; upstream requests go through
//! pooled hyper clients (HTTP/1.1 keep-alive, HTTP/2 multiplexed) straight to endpoints.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response, StatusCode, Version,
    body::Incoming,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    service::service_fn,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use rand::Rng as _;
use tokio::{net::TcpStream, time::Instant};

use super::{
    ConnCtx, Engine, FastPath,
    breaker::{ConnPermit, RequestPermit},
    io::LegConnector,
    metrics::{RequestLabels, RouteLabels, ServiceLabels, status_class},
    outlier::Outcome,
    route::{BackendTarget, RequestView, RuleAction},
    snapshot::{Pool, Target},
};
use crate::api::traffic::Retries;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Longest time a client may take to send a request head (slow-loris protection): 408 after.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted: bigger gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Pooled upstream clients: direct ones for this node's pods, and per source workload ones
/// through the tunnel for pods of other nodes.
pub struct Upstreams {
    h1: Client<LegConnector, Body>,
    h2: Client<LegConnector, Body>,
    /// (source workload, HTTP/2) → client over the tunnel.
    tunneled: std::sync::Mutex<
        std::collections::HashMap<(u32, bool), Client<super::tunnel::TunnelConnector, Body>>,
    >,
}

impl Upstreams {
    /// Clients whose connections to this node's pods leave the fast path through `fast_path`
    /// when they carry bulk.
    #[must_use]
    pub fn new(fast_path: Arc<dyn FastPath>) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        let connector = LegConnector::new(http, fast_path);
        let h1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_mins(1))
            .pool_max_idle_per_host(256)
            .set_host(false)
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_mins(1))
            .http2_only(true)
            .set_host(false)
            .build(connector);
        Self {
            h1,
            h2,
            tunneled: std::sync::Mutex::default(),
        }
    }

    /// The client that reaches pods of other nodes as `source` (created on first use).
    fn tunneled(
        &self,
        connector: impl FnOnce() -> super::tunnel::TunnelConnector,
        source: u32,
        h2: bool,
    ) -> Client<super::tunnel::TunnelConnector, Body> {
        let mut clients = self
            .tunneled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients
            .entry((source, h2))
            .or_insert_with(|| {
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(Duration::from_mins(1))
                    .set_host(false);
                if h2 {
                    builder.timer(TokioTimer::new()).http2_only(true);
                }
                builder.build(connector())
            })
            .clone()
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    full(Bytes::new())
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// A response the engine makes itself (errors, faults, limits). gRPC clients get a
/// trailers-only response with the matching `grpc-status`, as a gRPC server would send.
fn local_reply(status: StatusCode, grpc: bool, message: &str) -> Response<Body> {
    let mut resp = if grpc {
        let code = match status.as_u16() {
            429 | 503 => 14, // UNAVAILABLE
            504 => 4,        // DEADLINE_EXCEEDED
            401 => 16,       // UNAUTHENTICATED
            403 => 7,        // PERMISSION_DENIED
            404 => 12,       // UNIMPLEMENTED
            _ => 13,         // INTERNAL
        };
        grpc_reply(code, message)
    } else {
        let mut resp = Response::new(full(format!("{message}\n")));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        resp
    };
    resp.headers_mut()
        .insert("x-weft-local-reply", HeaderValue::from_static("1"));
    resp
}

/// A trailers-only gRPC response (HTTP 200, `grpc-status` in the headers).
fn grpc_reply(code: u32, message: &str) -> Response<Body> {
    let mut resp = Response::new(empty());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(message) {
        h.insert("grpc-message", v);
    }
    resp
}

// --- serving client connections -------------------------------------------------------------

/// Serves an HTTP/1.1 connection. `raw` is a second handle on the same socket, used only to
/// answer 408 when the request head does not arrive in time (hyper closes silently then).
pub async fn serve_http1<I>(io: I, raw: Option<std::net::TcpStream>, ctx: Arc<ConnCtx>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req| {
            let ctx = ctx.clone();
            async move {
                let mut resp = handle(req, ctx.clone()).await?;
                if ctx.engine.is_draining() {
                    // The client learns with this answer that the connection ends: its next
                    // request goes on a new connection, which the kernel no longer sends here.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = async {
            ctx.engine.drain_started().await;
            tokio::time::sleep(super::DRAIN_IDLE_GRACE).await;
        } => {
            // Still open after the grace: idle (it closes now) or busy (it closes after the
            // answer in flight).
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            ctx.engine.metrics.error("header_timeout");
            if let Some(mut raw) = raw {
                use std::io::Write as _;
                let _ = raw.write_all(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        } else if e.is_parse() || e.is_parse_too_large() {
            ctx.engine.metrics.error("bad_request");
            // hyper has answered 400/431 and let go of the socket with the rest of the
            // request unread: closing now would send a reset that can destroy that answer
            // before the client reads it. Close as nginx does: our side first, then read and
            // drop what the client still sends, for a bounded time.
            if let Some(raw) = raw {
                lingering_close(raw).await;
            }
        }
        tracing::debug!(error = %e, "HTTP/1 connection ended with an error");
    }
}

/// Answers a request head the engine refuses (see [`super::strict`]) with `status` and closes the
/// connection the lingering way.
pub async fn refuse_head(
    client: &mut (impl tokio::io::AsyncWrite + Unpin),
    raw: Option<std::net::TcpStream>,
    status: u16,
    problem: &str,
) {
    use tokio::io::AsyncWriteExt as _;
    let body = format!("{problem}\n");
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Bad Request");
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(head.as_bytes()).await;
    let _ = client.flush().await;
    if let Some(raw) = raw {
        lingering_close(raw).await;
    }
}

/// Shuts the socket's sending side, then discards what the peer still sends (at most 1 MiB,
/// for at most 2 s), so that the close does not reset the connection under the last answer.
async fn lingering_close(raw: std::net::TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut socket) = raw
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(raw))
    else {
        return;
    };
    let _ = socket.shutdown().await;
    let mut buf = vec![0_u8; 16 * 1024];
    let mut left: usize = 1 << 20;
    let drain = async {
        while left > 0 {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

pub async fn serve_h2<I>(io: I, ctx: Arc<ConnCtx>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req| handle(req, ctx.clone()))
    };
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).unwrap_or(u32::MAX))
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = ctx.engine.drain_started() => {
            // GOAWAY: streams in flight finish, new ones go on a new connection.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        ctx.engine.metrics.error("h2_connection");
        tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
    }
}

// --- one request ----------------------------------------------------------------------------

/// A request's route as metric labels, with the metric handles of the hot path resolved once
/// per (connection, route) instead of hashed label lookups on every request.
pub struct RouteObs {
    pub route: RouteLabels,
    pub name: String,
    requests: [prometheus_client::metrics::counter::Counter; 5],
    duration: prometheus_client::metrics::histogram::Histogram,
    in_flight: prometheus_client::metrics::gauge::Gauge,
}

impl RouteObs {
    fn new(ctx: &ConnCtx, target: &Target, action: Option<&RuleAction>) -> Self {
        let name = action.map_or_else(
            || "default".to_owned(),
            |a| format!("{}#{}", a.route, a.rule),
        );
        let route = RouteLabels {
            source_namespace: ctx.src.0.clone(),
            source_workload: ctx.src.1.clone(),
            destination_namespace: target.service.namespace.clone(),
            destination_service: target.service.name.clone(),
            route: name.clone(),
        };
        let m = &ctx.engine.metrics;
        let requests = ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
            m.requests
                .get_or_create(&RequestLabels {
                    route: route.clone(),
                    status_class: class,
                })
                .clone()
        });
        Self {
            requests,
            duration: m.duration.get_or_create(&route).clone(),
            in_flight: m.in_flight.get_or_create(&route).clone(),
            route,
            name,
        }
    }

    fn count(&self, class: &str) {
        let i = match class {
            "1xx" => 0,
            "2xx" => 1,
            "3xx" => 2,
            "4xx" => 3,
            _ => 4,
        };
        self.requests[i].inc();
    }
}

type Labels = RouteObs;

#[allow(
    clippy::too_many_lines,
    reason = "one request's life in order: route, forward, observe"
)]
async fn handle(
    mut req: Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let grpc = is_grpc(req.headers());
    if let Some(problem) = framing_problem(&req) {
        // What a strict origin would refuse is refused here, never passed on: a request whose
        // length two headers disagree on is how requests are smuggled (RFC 9112 §6.1).
        ctx.engine.metrics.error("bad_request");
        let mut resp = local_reply(StatusCode::BAD_REQUEST, grpc, problem);
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Ok(resp);
    }
    let snapshot = ctx.engine.snapshot();
    let target = snapshot.targets.get(&ctx.orig_dst).cloned();
    let Some(target) = target else {
        // The service lost its L7 policy while this connection was open: plain proxying.
        return Ok(match snapshot.plain.get(&ctx.orig_dst).cloned() {
            Some(pool) => {
                let (resp, _) = forward_plain(req, &ctx, &pool).await;
                resp
            }
            None => local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                grpc,
                "service has no endpoints",
            ),
        });
    };

    let selected = {
        let view = RequestView {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        target.routes.select(&view)
    };
    if selected.is_none() && !target.routes.is_empty() {
        // Routes are attached but none matches: 404, as Gateway API specifies.
        ctx.note_route("no-match");
        return Ok(local_reply(
            StatusCode::NOT_FOUND,
            grpc,
            "no route matches the request",
        ));
    }
    let principal = match authenticate(&ctx, &target, &mut req, grpc) {
        Ok(p) => p,
        Err(refused) => return Ok(*refused),
    };
    if let Some(refused) = authorize(&ctx, &snapshot, &target, &req, principal.as_ref(), grpc) {
        return Ok(refused);
    }
    let labels = ctx.route_obs(&target, selected, || RouteObs::new(&ctx, &target, selected));
    let route_name = &labels.name;
    ctx.note_route(route_name);
    let in_flight = labels.in_flight.clone();
    in_flight.inc();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = route_request(req, &ctx, &target, selected, &labels, grpc).await;
    in_flight.dec();
    let status = resp.status().as_u16();
    let class = if grpc {
        grpc_class(&resp, status)
    } else {
        status_class(status)
    };
    labels.count(class);
    let elapsed = start.elapsed();
    labels.duration.observe(elapsed.as_secs_f64());
    if let (Some(exporter), Some(trace)) = (
        ctx.engine.tracer.as_ref(),
        resp.extensions().get::<super::trace::Context>(),
    ) {
        let end = std::time::SystemTime::now();
        exporter.record(super::trace::Span {
            ctx: trace.clone(),
            name: format!(
                "{method} {}/{}",
                target.service.namespace, target.service.name
            ),
            start: end - elapsed,
            end,
            attributes: vec![
                ("http.request.method", method.to_string()),
                ("url.path", path.clone()),
                ("http.route", route_name.clone()),
                ("http.response.status_code", status.to_string()),
                ("source.workload", format!("{}/{}", ctx.src.0, ctx.src.1)),
                ("client.address", ctx.client.to_string()),
            ],
            error: status >= 500,
        });
    }
    if target.policy.as_ref().is_some_and(|p| p.spec.access_log) {
        tracing::info!(
            target: "weft::access",
            source = %format!("{}/{}", ctx.src.0, ctx.src.1),
            client = %ctx.client,
            destination = %format!("{}/{}:{}", target.service.namespace, target.service.name, target.port),
            route = %route_name,
            method = %method,
            path = %path,
            status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            trace_id = resp.extensions().get::<super::trace::Context>().map_or("", |t| t.trace_id.as_str()),
            "request"
        );
    }
    Ok(resp)
}

/// Why an HTTP/1 request's framing is not one a strict origin accepts (RFC 9112 §6): both
/// `Content-Length` and `Transfer-Encoding`, several or non-numeric `Content-Length`s, or a
/// transfer coding other than exactly `chunked`.
fn framing_problem<B>(req: &Request<B>) -> Option<&'static str> {
    if req.version() == Version::HTTP_2 {
        return None;
    }
    let headers = req.headers();
    let lengths: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    let codings: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if !lengths.is_empty() && !codings.is_empty() {
        return Some("both Content-Length and Transfer-Encoding");
    }
    if lengths.len() > 1
        || lengths
            .iter()
            .any(|v| v.is_empty() || !v.as_bytes().iter().all(u8::is_ascii_digit))
    {
        return Some("invalid Content-Length");
    }
    match codings.as_slice() {
        [] => None,
        [one] if one.as_bytes().eq_ignore_ascii_case(b"chunked") => None,
        _ => Some("unsupported Transfer-Encoding (only chunked)"),
    }
}

/// The request's JWT under the service's `RequestAuthentication`s: the principal of a valid
/// token (`None` without one), or the 401 (gRPC: `UNAUTHENTICATED`) for a token that fails.
fn authenticate(
    ctx: &Arc<ConnCtx>,
    target: &Target,
    req: &mut Request<Incoming>,
    grpc: bool,
) -> Result<Option<super::authn::Principal>, Box<Response<Body>>> {
    if target.authn.is_empty() {
        return Ok(None);
    }
    let refused = match target
        .authn
        .authenticate(req.headers_mut(), &target.service)
    {
        Ok(p) => return Ok(p),
        Err(r) => r,
    };
    ctx.engine
        .metrics
        .authn_failures
        .get_or_create(&super::metrics::AuthnLabels {
            destination_namespace: target.service.namespace.clone(),
            destination_service: target.service.name.clone(),
            policy: refused.policy.clone(),
            reason: refused.reason,
        })
        .inc();
    record_refusal(
        ctx,
        target,
        req,
        &format!("{} (jwt {})", refused.policy, refused.reason),
        "enforced",
        &refused.message,
    );
    let mut resp = local_reply(StatusCode::UNAUTHORIZED, grpc, "Jwt verification fails");
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    Err(Box::new(resp))
}

/// The service's authorization policies for this request: `Some(403)` when refused (gRPC:
/// `PERMISSION_DENIED`); a dry-run refusal is counted and logged, and the request goes on.
fn authorize(
    ctx: &Arc<ConnCtx>,
    snapshot: &super::snapshot::Snapshot,
    target: &Target,
    req: &Request<Incoming>,
    auth: Option<&super::authn::Principal>,
    grpc: bool,
) -> Option<Response<Body>> {
    let policies = target.authz();
    if policies.is_empty() {
        return None;
    }
    let source = snapshot.mesh.by_id(ctx.src_workload);
    let verdict = super::authz::authorize(
        policies,
        source,
        &super::authz::Request {
            method: req.method().as_str(),
            path: req.uri().path(),
            headers: req.headers(),
            port: target.port,
            auth,
        },
    );
    let (policy, mode) = match verdict {
        super::authz::Verdict::Allow => return None,
        super::authz::Verdict::Deny { policy } => (policy, "enforced"),
        super::authz::Verdict::AuditDeny { policy } => (policy, "dry_run"),
    };
    ctx.engine
        .metrics
        .authz_denials
        .get_or_create(&super::metrics::AuthzLabels {
            destination_namespace: target.service.namespace.clone(),
            destination_service: target.service.name.clone(),
            policy: policy.clone(),
            mode,
        })
        .inc();
    record_refusal(
        ctx,
        target,
        req,
        &policy,
        mode,
        "request refused by authorization policy",
    );
    (mode == "enforced").then(|| local_reply(StatusCode::FORBIDDEN, grpc, "RBAC: access denied"))
}

/// A refused request (or, dry run, one that would be): the flow table's `l7.denied` row and a
/// `weft::deny` log line.
fn record_refusal(
    ctx: &ConnCtx,
    target: &Target,
    req: &Request<Incoming>,
    rule: &str,
    mode: &'static str,
    why: &str,
) {
    let source = format!("{}/{}", ctx.src.0, ctx.src.1);
    let destination = format!(
        "{}/{}:{}",
        target.service.namespace, target.service.name, target.port
    );
    ctx.engine
        .connections
        .denials
        .record(&source, &destination, rule, mode);
    tracing::info!(
        target: "weft::deny",
        source = %source,
        destination = %destination,
        method = %req.method(),
        path = %req.uri().path(),
        rule,
        mode,
        "{why}"
    );
}

/// For gRPC the HTTP status is 200 even for failures: a trailers-only `grpc-status` decides.
fn grpc_class(resp: &Response<Body>, status: u16) -> &'static str {
    match resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
    {
        Some(0) | None => status_class(status),
        Some(_) => "5xx",
    }
}

#[allow(
    clippy::too_many_lines,
    reason = "the request's policy steps in the order they apply"
)]
async fn route_request(
    mut req: Request<Incoming>,
    ctx: &Arc<ConnCtx>,
    target: &Arc<Target>,
    action: Option<&RuleAction>,
    labels: &Labels,
    grpc: bool,
) -> Response<Body> {
    let m = &ctx.engine.metrics;
    let policy = target.policy.as_ref();

    // Route-level filters.
    if let Some(a) = action {
        if let Some(resp) = a.redirect_response(&req) {
            return resp.map(|()| empty());
        }
        a.request_headers.apply(req.headers_mut());
        if let Some(uri) = a.rewritten_uri(&req) {
            *req.uri_mut() = uri;
        }
        if let Some(host) = a.rewritten_host()
            && let Ok(v) = HeaderValue::from_str(host)
        {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let trace = super::trace::propagate(req.headers_mut());

    // Faults.
    if let Some(faults) = policy.and_then(|p| p.spec.faults.as_ref()) {
        if let Some(d) = &faults.delay
            && roll(d.percent)
        {
            m.faults.get_or_create(&labels.route).inc();
            tokio::time::sleep(d.fixed_delay).await;
        }
        if let Some(a) = &faults.abort
            && roll(a.percent)
        {
            m.faults.get_or_create(&labels.route).inc();
            if grpc && let Some(code) = a.grpc_status {
                return grpc_reply(code, "fault injected");
            }
            let status = StatusCode::from_u16(a.http_status.unwrap_or(503))
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return local_reply(status, grpc, "fault injected");
        }
    }
    // Local rate limit.
    if let Some(bucket) = policy.and_then(|p| p.bucket.as_ref())
        && let Err(wait) = bucket.try_acquire()
    {
        m.rate_limited.get_or_create(&labels.route).inc();
        let mut resp = local_reply(StatusCode::TOO_MANY_REQUESTS, grpc, "rate limited");
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        return resp;
    }

    // Backend choice (weighted backendRefs).
    let backend = match action {
        Some(a) => match a.pick_backend(rand::rng().random()) {
            Some(b) => b.clone(),
            None => {
                return local_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    grpc,
                    "route has no usable backend",
                );
            }
        },
        None => target.default_backend.clone(),
    };
    let Some(pool) = target.pool(&backend).cloned() else {
        return local_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            grpc,
            "backend service does not exist",
        );
    };

    let (parts_ro, ()) = (&req, ());
    if is_upgrade(parts_ro.version(), parts_ro.method(), parts_ro.headers()) {
        let Some(pick) = pool.balancer.pick(None, |ep| {
            !pool.outlier.as_ref().is_some_and(|o| o.is_ejected(ep))
        }) else {
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, grpc, "no healthy endpoint");
        };
        let ep = pick.addr();
        return forward_upgrade(req, ep, ctx).await;
    }

    let retries = policy.and_then(|p| p.spec.retries.as_ref());
    // Mirrors: the traffic policy's and the route rule's RequestMirror filters.
    let mut mirrors: Vec<Arc<Pool>> = policy
        .and_then(|p| p.spec.mirror.as_ref())
        .filter(|mi| roll(mi.percent))
        .and_then(|mi| {
            target.pool(&BackendTarget {
                service: crate::api::refs::ServiceRef {
                    namespace: target.service.namespace.clone(),
                    name: mi.name.clone(),
                },
                port: Some(mi.port),
                weight: 1,
            })
        })
        .cloned()
        .into_iter()
        .collect();
    if let Some(a) = action {
        let mut rng = rand::rng();
        mirrors.extend(
            a.mirror
                .iter()
                .filter(|mi| mi.fires(rng.random()))
                .filter_map(|mi| target.pool(&mi.target).cloned()),
        );
    }
    let timeout = action
        .and_then(|a| a.request_timeout)
        .or_else(|| policy.and_then(|p| p.spec.timeout));
    let per_try = action
        .and_then(|a| a.backend_timeout)
        .or_else(|| retries.and_then(|r| r.per_try_timeout));

    // Bodies are kept for retries and mirroring up to a cap; a larger body streams through and
    // makes the request single-try.
    let keep_cap = if retries.is_some() || !mirrors.is_empty() {
        retries.map_or(64 * 1024, |r| r.max_body_bytes)
    } else {
        0
    };
    let (parts, body) = req.into_parts();
    // A client body that breaks off or is malformed (a bad chunk size) is the client's error:
    // marked here, so that the upstream's failure it causes is answered 400, not 502.
    let client_body_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let body = {
        let failed = client_body_failed.clone();
        body.map_err(move |e| {
            failed.store(true, std::sync::atomic::Ordering::Relaxed);
            e
        })
    };
    let body = match buffer_body(body, keep_cap).await {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(error = %e, "client body failed");
            return local_reply(
                StatusCode::BAD_REQUEST,
                grpc,
                "request body could not be read",
            );
        }
    };
    if let ReqBody::Kept(bytes) = &body {
        for mpool in mirrors {
            m.mirrored.get_or_create(&labels.route).inc();
            spawn_mirror(ctx, &mpool, &parts, bytes.clone());
        }
    }

    let attempts = retries.map_or(1, |r| r.attempts.max(1));
    let run = attempt_loop(
        ctx, target, &pool, parts, body, attempts, retries, per_try, labels, grpc,
    );
    let mut resp = match timeout {
        Some(t) => match tokio::time::timeout(t, run).await {
            Ok(r) => r,
            Err(_) => local_reply(StatusCode::GATEWAY_TIMEOUT, grpc, "request timeout"),
        },
        None => run.await,
    };
    if client_body_failed.load(std::sync::atomic::Ordering::Relaxed)
        && resp.status().is_server_error()
    {
        m.error("bad_request");
        resp = local_reply(StatusCode::BAD_REQUEST, grpc, "invalid request body");
    }
    if let Some(a) = action {
        a.response_headers.apply(resp.headers_mut());
    }
    resp.extensions_mut().insert(trace);
    resp
}

fn roll(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && rand::rng().random::<f64>() * 100.0 < percent)
}

enum ReqBody {
    /// Whole body in memory (replayable).
    Kept(Bytes),
    /// Streams through once.
    Stream(Body),
}

async fn buffer_body<B>(mut body: B, cap: u64) -> Result<ReqBody, BoxError>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        return Ok(ReqBody::Kept(Bytes::new()));
    }
    let fits = body.size_hint().upper().is_some_and(|u| u <= cap);
    if cap == 0 || (!fits && body.size_hint().lower() > cap) {
        return Ok(ReqBody::Stream(body.map_err(Into::into).boxed_unsync()));
    }
    // Read frames until the body ends, passes the cap, or stops arriving for a moment: a
    // streaming request (gRPC client or bidi streaming, long uploads) must not wait for its own
    // end before it is forwarded; it then streams through as one try.
    let deadline = Instant::now() + BUFFER_WAIT;
    let mut kept: Vec<Bytes> = Vec::new();
    let mut size = 0u64;
    loop {
        let Ok(next) = tokio::time::timeout_at(deadline, body.frame()).await else {
            return Ok(ReqBody::Stream(chain_prefix(kept, body)));
        };
        match next {
            None => {
                let mut all = bytes::BytesMut::with_capacity(usize::try_from(size).unwrap_or(0));
                for c in kept {
                    all.extend_from_slice(&c);
                }
                return Ok(ReqBody::Kept(all.freeze()));
            }
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    size += data.len() as u64;
                    kept.push(data);
                }
                // Request trailers are dropped when a body is kept (gRPC clients do not send
                // them); documented in ARCHITECTURE.md.
                if size > cap {
                    return Ok(ReqBody::Stream(chain_prefix(kept, body)));
                }
            }
        }
    }
}

/// How long a request body may take to arrive completely and still be kept for retries.
const BUFFER_WAIT: Duration = Duration::from_millis(100);

/// The chunks already read, then the rest of the body.
fn chain_prefix<B>(kept: Vec<Bytes>, rest: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let prefix = futures_util::stream::iter(
        kept.into_iter()
            .map(|b| Ok::<_, BoxError>(hyper::body::Frame::data(b))),
    );
    let rest = http_body_util::BodyStream::new(rest.map_err(Into::into));
    http_body_util::StreamBody::new(futures_util::StreamExt::chain(prefix, rest)).boxed_unsync()
}

fn spawn_mirror(
    ctx: &Arc<ConnCtx>,
    pool: &Arc<Pool>,
    parts: &hyper::http::request::Parts,
    body: Bytes,
) {
    let Some(pick) = pool.balancer.pick(None, |_| true) else {
        return;
    };
    let addr = pick.addr();
    let mut req = Request::new(full(body));
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    *req.version_mut() = parts.version;
    let Some(uri) = upstream_uri(addr, &parts.uri) else {
        return;
    };
    *req.uri_mut() = uri;
    let engine = ctx.engine.clone();
    let src = ctx.src_workload;
    tokio::spawn(async move {
        let res = tokio::time::timeout(Duration::from_secs(10), engine.send(src, req)).await;
        // Fire-and-forget: the mirror's answer is read and dropped.
        if let Ok(Ok(resp)) = res {
            let _ = resp.into_body().collect().await;
        }
        drop(pick);
    });
}

fn upstream_uri(addr: SocketAddr, uri: &hyper::Uri) -> Option<hyper::Uri> {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("http://{addr}{pq}").parse().ok()
}

/// Why an attempt failed, for retry decisions and outlier detection.
#[derive(Debug)]
enum Failure {
    Connect,
    Reset,
    Timeout,
}

#[allow(
    clippy::too_many_arguments,
    clippy::too_many_lines,
    reason = "the retry loop keeps one request's whole context in one place"
)]
async fn attempt_loop(
    ctx: &Arc<ConnCtx>,
    target: &Arc<Target>,
    pool: &Arc<Pool>,
    mut parts: hyper::http::request::Parts,
    body: ReqBody,
    attempts: u32,
    retries: Option<&Retries>,
    per_try: Option<Duration>,
    labels: &Labels,
    grpc: bool,
) -> Response<Body> {
    let m = &ctx.engine.metrics;
    let svc_labels = ServiceLabels {
        destination_namespace: pool.service.namespace.clone(),
        destination_service: pool.service.name.clone(),
    };
    let budget = target.policy.as_ref().and_then(|p| p.budget.as_ref());
    if let Some(b) = budget {
        b.deposit();
    }
    let hash = pool
        .hash_on
        .as_ref()
        .and_then(|h| hash_key(h, &parts.headers));
    let (kept, mut stream) = match body {
        ReqBody::Kept(b) => (Some(b), None),
        ReqBody::Stream(s) => (None, Some(s)),
    };
    let mut tried = Vec::new();
    let mut attempt = 0;
    let mut safe_used = 0;
    loop {
        attempt += 1;
        let body = match (&kept, stream.take()) {
            (Some(b), _) => full(b.clone()),
            (None, Some(s)) => s,
            (None, None) => empty(),
        };
        let replayable = kept.is_some();
        // Endpoint: not ejected, and (on retries) not one that already failed if another exists.
        let Some(pick) = pool
            .balancer
            .pick(hash, |ep| {
                !pool.outlier.as_ref().is_some_and(|o| o.is_ejected(ep))
                    && (tried.len() >= pool.endpoints.len() || !tried.contains(&ep))
            })
            .or_else(|| pool.balancer.pick(hash, |_| true))
        else {
            return local_reply(StatusCode::SERVICE_UNAVAILABLE, grpc, "no healthy endpoint");
        };
        let ep = pick.addr();
        tried.push(ep);
        let permit = match pool.breaker.as_ref() {
            Some(b) => {
                if let Some(p) = b.try_request() {
                    Some(p)
                } else {
                    m.circuit_open.get_or_create(&svc_labels).inc();
                    return local_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        grpc,
                        "circuit breaker open: too many concurrent requests",
                    );
                }
            }
            None => None,
        };
        // HTTP/1.1 upstreams: one connection per request in flight, at most maxConnections;
        // a request that finds none free waits (pending) within its per-try timeout.
        let conn = match pool.breaker.as_ref() {
            Some(b) if parts.version != Version::HTTP_2 => {
                let waited = match per_try {
                    Some(t) => tokio::time::timeout(t, b.connection()).await.ok(),
                    None => Some(b.connection().await),
                };
                match waited {
                    Some(Some(c)) => Some(c),
                    Some(None) => {
                        m.circuit_open.get_or_create(&svc_labels).inc();
                        return local_reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            grpc,
                            "circuit breaker open: too many pending requests",
                        );
                    }
                    None => {
                        return local_reply(
                            StatusCode::GATEWAY_TIMEOUT,
                            grpc,
                            "upstream per-try timeout waiting for a connection",
                        );
                    }
                }
            }
            _ => None,
        };
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        // A try that cannot be repeated takes the headers instead of copying them.
        *req.headers_mut() =
            if !replayable || (attempt - safe_used >= attempts && safe_used >= SAFE_RETRIES) {
                std::mem::take(&mut parts.headers)
            } else {
                parts.headers.clone()
            };
        let Some(uri) = upstream_uri(ep, &parts.uri) else {
            return local_reply(StatusCode::BAD_REQUEST, grpc, "bad request target");
        };
        *req.uri_mut() = uri;
        *req.version_mut() = parts.version;

        let started = Instant::now();
        let send = ctx.engine.send(ctx.src_workload, req);
        let result = match per_try {
            Some(t) => tokio::time::timeout(t, send)
                .await
                .unwrap_or(Err(SendError::Timeout)),
            None => send.await,
        };
        let latency = started.elapsed();
        let (outcome, failure, resp) = match result {
            Ok(resp) => {
                let s = resp.status().as_u16();
                let outcome = if matches!(s, 502..=504) {
                    Outcome::GatewayError
                } else if s >= 500 {
                    Outcome::Status5xx(s)
                } else {
                    Outcome::Success
                };
                (outcome, None, Some(resp))
            }
            Err(SendError::Connect(_)) => (Outcome::GatewayError, Some(Failure::Connect), None),
            Err(SendError::Timeout) => (Outcome::GatewayError, Some(Failure::Timeout), None),
            Err(SendError::Other(_)) => (Outcome::GatewayError, Some(Failure::Reset), None),
        };
        pick.record(latency, matches!(outcome, Outcome::Success));
        if let Some(o) = &pool.outlier
            && o.record(ep, outcome)
        {
            m.ejections.get_or_create(&svc_labels).inc();
            tracing::info!(target: "weft::outlier", endpoint = %ep, service = %format!("{}/{}", pool.service.namespace, pool.service.name), "endpoint ejected");
        }
        let retriable = replayable
            && attempt - safe_used < attempts
            && retries.is_some_and(|r| should_retry(r, resp.as_ref(), failure.as_ref()));
        // Whatever the route's policy: a try whose connection could not be made sent nothing,
        // so any request may go to another endpoint; an idempotent request whose connection
        // broke before an answer may be repeated (RFC 9110 §9.2.2). That is what keeps
        // requests whole while an endpoint, or the agent of its node, goes away.
        let safe = !retriable
            && replayable
            && safe_used < SAFE_RETRIES
            && match failure {
                Some(Failure::Connect) => true,
                Some(Failure::Reset) => parts.method.is_idempotent(),
                _ => false,
            };
        if safe {
            safe_used += 1;
            m.safe_retries.get_or_create(&labels.route).inc();
            tracing::debug!(endpoint = %ep, ?failure, "repeating the try on another connection");
            drop((resp, permit, conn));
            continue;
        }
        if retriable {
            if budget.is_none_or(super::budget::RetryBudget::withdraw) {
                m.retries.get_or_create(&labels.route).inc();
                // The failed try's response and its breaker slots are not held while waiting.
                drop((resp, permit, conn));
                if let Some(r) = retries {
                    let wait = super::budget::backoff(
                        attempt - 1,
                        r.backoff.base,
                        r.backoff.max,
                        &mut rand::rng(),
                    );
                    tokio::time::sleep(wait).await;
                }
                continue;
            }
            m.budget_exhausted.get_or_create(&labels.route).inc();
        }
        return match (resp, failure) {
            (Some(resp), _) => resp.map(|body| {
                Held {
                    body,
                    _permits: (permit, conn),
                }
                .map_err(BoxError::from)
                .boxed_unsync()
            }),
            (None, Some(Failure::Connect)) => local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                grpc,
                "upstream connect error",
            ),
            (None, Some(Failure::Timeout)) => local_reply(
                StatusCode::GATEWAY_TIMEOUT,
                grpc,
                "upstream per-try timeout",
            ),
            (None, _) => {
                m.error("upstream_protocol");
                local_reply(
                    StatusCode::BAD_GATEWAY,
                    grpc,
                    "upstream connection reset or sent an invalid response",
                )
            }
        };
    }
}

/// A response body that keeps the request's circuit-breaker slots until it is done (dropped
/// by hyper once sent, or on error): an HTTP/1.1 connection is busy until its body is read.
struct Held<B> {
    body: B,
    _permits: (Option<RequestPermit>, Option<ConnPermit>),
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Tries [`attempt_loop`] repeats on its own (see there), at most, per request.
const SAFE_RETRIES: u32 = 2;

fn should_retry(r: &Retries, resp: Option<&Response<Incoming>>, failure: Option<&Failure>) -> bool {
    let on = |c: &str| r.on.iter().any(|o| o.eq_ignore_ascii_case(c));
    match (resp, failure) {
        (_, Some(Failure::Connect)) => on("connect-failure") || on("gateway-error") || on("5xx"),
        (_, Some(Failure::Reset)) => on("reset") || on("gateway-error") || on("5xx"),
        (_, Some(Failure::Timeout)) => on("5xx") || on("gateway-error") || on("reset"),
        (Some(resp), None) => {
            let s = resp.status().as_u16();
            let grpc_status = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok());
            (s >= 500 && on("5xx"))
                || (matches!(s, 502..=504) && on("gateway-error"))
                || (r.status_codes.contains(&s)
                    && (on("retriable-status-codes") || !r.status_codes.is_empty()))
                || grpc_status.is_some_and(|g| r.grpc_status_codes.contains(&g))
        }
        (None, None) => false,
    }
}

fn hash_key(h: &crate::api::traffic::HashOn, headers: &HeaderMap) -> Option<u64> {
    if let Some(name) = &h.header {
        return headers
            .get(name.as_str())
            .map(|v| super::balance::hash_key(v.as_bytes()));
    }
    if let Some(cookie) = &h.cookie {
        for v in headers.get_all(header::COOKIE) {
            let Ok(text) = v.to_str() else { continue };
            for kv in text.split(';') {
                if let Some((k, val)) = kv.trim().split_once('=')
                    && k == cookie
                {
                    return Some(super::balance::hash_key(val.as_bytes()));
                }
            }
        }
    }
    None
}

fn is_upgrade(version: Version, method: &hyper::Method, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && (method == hyper::Method::CONNECT || headers.contains_key(header::UPGRADE))
}

pub enum SendError {
    Connect(hyper_util::client::legacy::Error),
    Timeout,
    Other(hyper_util::client::legacy::Error),
}

impl Engine {
    /// Sends `req` for the source workload `src` on a pooled upstream connection (HTTP/2 when
    /// the request is HTTP/2); to a pod of another node through the tunnel, as `src`.
    pub async fn send(
        &self,
        src: u32,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        strip_hop_by_hop(req.headers_mut());
        let h2 = req.version() == Version::HTTP_2;
        if !h2 {
            *req.version_mut() = Version::HTTP_11;
        }
        let remote = req
            .uri()
            .host()
            .and_then(|h| h.parse::<std::net::Ipv4Addr>().ok())
            .is_some_and(|ip| {
                self.snapshot().mesh.remote(ip).is_some_and(|peer| {
                    // A PERMISSIVE pod whose node's agent is down is reached directly.
                    !self.tunnel.as_ref().is_some_and(|t| t.bypass(peer))
                })
            });
        let result = match (&self.tunnel, remote) {
            (Some(tunnel), true) => {
                let connector = || super::tunnel::TunnelConnector {
                    tunnel: tunnel.clone(),
                    snapshots: self.snapshot.clone(),
                    source: src,
                };
                self.upstreams
                    .tunneled(connector, src, h2)
                    .request(req)
                    .await
            }
            _ if h2 => self.upstreams.h2.request(req).await,
            _ => self.upstreams.h1.request(req).await,
        };
        result.map_err(|e| {
            if e.is_connect() {
                SendError::Connect(e)
            } else {
                SendError::Other(e)
            }
        })
    }
}

/// Connection-specific headers are not forwarded (RFC 9110 §7.6.1); `te: trailers` is kept
/// for gRPC.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
    if h.get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.eq_ignore_ascii_case("trailers"))
    {
        h.remove(header::TE);
    }
}

/// WebSocket / `Upgrade` and `CONNECT`: a dedicated upstream connection, the request passed on
/// with its upgrade headers, and after `101` (or `2xx` to CONNECT) bytes copied both ways.
async fn forward_upgrade(
    req: Request<Incoming>,
    ep: SocketAddr,
    ctx: &Arc<ConnCtx>,
) -> Response<Body> {
    let connect_error = || {
        local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            false,
            "upstream connect error",
        )
    };
    let snapshot = ctx.engine.snapshot();
    let remote = match ep {
        SocketAddr::V4(v4) => snapshot.mesh.remote(*v4.ip()).map(|peer| (v4, peer)),
        SocketAddr::V6(_) => None,
    };
    if let (Some((target, peer)), Some(tunnel)) = (remote, &ctx.engine.tunnel) {
        let Some(source) = snapshot.mesh.by_id(ctx.src_workload) else {
            return connect_error();
        };
        return match tunnel.open(source, peer, target).await {
            Ok(stream) => upgrade_over(req, stream).await,
            Err(_) => connect_error(),
        };
    }
    let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(ep)).await
    else {
        return connect_error();
    };
    let _ = stream.set_nodelay(true);
    upgrade_over(req, super::io::Leg::new(stream, &ctx.engine.fast_path)).await
}

/// Passes an upgrade request on over `stream` and, once the upstream switched protocols,
/// copies bytes both ways.
async fn upgrade_over(
    req: Request<Incoming>,
    stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let client_side = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let connect = parts.method == hyper::Method::CONNECT;
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream)).await
    else {
        return local_reply(StatusCode::BAD_GATEWAY, false, "upstream handshake failed");
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let up_req = Request::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
    let Ok(mut resp) = sender.send_request(up_req).await else {
        return local_reply(
            StatusCode::BAD_GATEWAY,
            false,
            "upstream closed during upgrade",
        );
    };
    let switching =
        resp.status() == StatusCode::SWITCHING_PROTOCOLS || (connect && resp.status().is_success());
    let (Some(client_side), true) = (client_side, switching) else {
        return resp.map(|b| b.map_err(BoxError::from).boxed_unsync());
    };
    let upstream_side = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (Ok(down), Ok(up)) = (client_side.await, upstream_side.await) else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(down), &mut TokioIo::new(up)).await;
    });
    let (head, _) = resp.into_parts();
    Response::from_parts(head, empty())
}

/// A connection whose service has no L7 policy any more: forwarded to one endpoint as is.
async fn forward_plain(
    req: Request<Incoming>,
    ctx: &Arc<ConnCtx>,
    pool: &Arc<Pool>,
) -> (Response<Body>, Option<SocketAddr>) {
    let grpc = is_grpc(req.headers());
    let Some(pick) = pool.balancer.pick(None, |_| true) else {
        return (
            local_reply(StatusCode::SERVICE_UNAVAILABLE, grpc, "no endpoint"),
            None,
        );
    };
    let ep = pick.addr();
    let (parts, body) = req.into_parts();
    let Some(uri) = upstream_uri(ep, &parts.uri) else {
        return (
            local_reply(StatusCode::BAD_REQUEST, grpc, "bad request target"),
            None,
        );
    };
    let mut up = Request::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
    *up.uri_mut() = uri;
    match ctx.engine.send(ctx.src_workload, up).await {
        Ok(resp) => (
            resp.map(|b| b.map_err(BoxError::from).boxed_unsync()),
            Some(ep),
        ),
        Err(_) => (
            local_reply(StatusCode::BAD_GATEWAY, grpc, "upstream error"),
            Some(ep),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    use super::{ReqBody, buffer_body};

    /// A body whose first chunk arrives and whose end never does (a streaming request).
    fn endless()
    -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Unpin> {
        let first = futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(b"first")))]);
        StreamBody::new(futures_util::StreamExt::chain(
            first,
            futures_util::stream::pending(),
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn streaming_request_is_forwarded_without_waiting_for_its_end() {
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            buffer_body(endless(), 1 << 20),
        )
        .await
        .expect("buffering gave up in time")
        .unwrap();
        assert!(matches!(out, ReqBody::Stream(_)), "streamed, not kept");
    }

    #[tokio::test(start_paused = true)]
    async fn complete_small_body_is_kept_and_large_one_streams() {
        let small = http_body_util::Full::new(Bytes::from_static(b"hello"));
        assert!(
            matches!(buffer_body(small, 1024).await.unwrap(), ReqBody::Kept(b) if b == "hello")
        );
        let large = http_body_util::Full::new(Bytes::from(vec![7u8; 4096]));
        assert!(matches!(
            buffer_body(large, 1024).await.unwrap(),
            ReqBody::Stream(_)
        ));
    }
}
