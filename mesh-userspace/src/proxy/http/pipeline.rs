//! One request through the engine: framing checks, authentication, authorization, the route,
//! faults and the traffic policy, then the attempts, with golden metrics on the way out.
use std::{convert::Infallible, sync::Arc};

use http_body_util::BodyExt as _;
use hyper::{
    Request, Response, StatusCode, Version,
    body::Incoming,
    header::{self, HeaderValue},
};
use rand::Rng as _;
use tokio::time::Instant;

use super::super::{
    ConnCtx,
    metrics::{L7Metrics, RequestLabels, RouteLabels, status_class},
    snapshot::{Pool, Target},
};
use crate::state::routes::{BackendTarget, RequestView, RuleAction};

use super::*;

/// A request's route as metric labels, with the metric handles of the hot path resolved once
/// per (connection, route) instead of hashed label lookups on every request.
pub struct RouteObs {
    pub route: RouteLabels,
    pub name: String,
    /// Request counters by (class, code), made on first use: a route sees a handful of codes.
    requests: std::sync::Mutex<
        Vec<(
            &'static str,
            u16,
            prometheus_client::metrics::counter::Counter,
        )>,
    >,
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
        Self {
            requests: std::sync::Mutex::default(),
            duration: m.duration.get_or_create(&route).clone(),
            in_flight: m.in_flight.get_or_create(&route).clone(),
            route,
            name,
        }
    }

    fn count(&self, metrics: &L7Metrics, class: &'static str, code: u16) {
        let mut seen = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, _, counter)) = seen.iter().find(|(k, c, _)| *k == class && *c == code) {
            counter.inc();
            return;
        }
        let counter = metrics
            .requests
            .get_or_create(&RequestLabels {
                route: self.route.clone(),
                status_class: class,
                response_code: code,
            })
            .clone();
        counter.inc();
        seen.push((class, code, counter));
    }
}

pub(super) type Labels = RouteObs;

#[allow(
    clippy::too_many_lines,
    reason = "one request's life in order: route, forward, observe"
)]
pub(super) async fn handle(
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
    labels.count(&ctx.engine.metrics, class, status);
    let elapsed = start.elapsed();
    labels.duration.observe(elapsed.as_secs_f64());
    if let (Some(exporter), Some(trace)) = (
        ctx.engine.tracer.as_ref(),
        resp.extensions().get::<super::super::trace::Context>(),
    ) {
        let end = std::time::SystemTime::now();
        // Who called and who answered, as workloads and as SPIFFE identities.
        let source = snapshot.mesh.by_id(ctx.src_workload);
        let answered = resp
            .extensions()
            .get::<super::forward::Endpoint>()
            .and_then(|e| snapshot.mesh.by_ip(e.0));
        let mut attributes = vec![
            ("http.request.method", method.to_string()),
            ("url.path", path.clone()),
            ("http.route", route_name.clone()),
            ("http.response.status_code", status.to_string()),
            ("source.workload", format!("{}/{}", ctx.src.0, ctx.src.1)),
            ("client.address", ctx.client.to_string()),
            (
                "destination.service",
                format!("{}/{}", target.service.namespace, target.service.name),
            ),
        ];
        if let Some(s) = source {
            attributes.push(("source.principal", s.identity.to_string()));
        }
        if let Some(d) = answered {
            attributes.push(("destination.workload", d.key.clone()));
            attributes.push(("destination.principal", d.identity.to_string()));
        }
        exporter.record(super::super::trace::Span {
            ctx: trace.clone(),
            name: format!(
                "{method} {}/{}",
                target.service.namespace, target.service.name
            ),
            start: end - elapsed,
            end,
            attributes,
            error: status >= 500,
        });
    }
    if ctx.engine.tap.watching() {
        let answered = resp
            .extensions()
            .get::<super::forward::Endpoint>()
            .map(|e| e.0);
        ctx.engine.tap.publish(crate::tap::Event {
            time_ms: crate::tap::now_ms(),
            src: crate::tap::Endpoint {
                workload: Some(format!("{}/{}", ctx.src.0, ctx.src.1)),
                ip: Some(*ctx.client.ip()),
                port: ctx.client.port(),
            },
            dst: crate::tap::Endpoint {
                workload: answered
                    .and_then(|ip| snapshot.mesh.by_ip(ip))
                    .map(|d| d.key.clone()),
                ip: answered,
                port: 0,
            },
            service: Some(format!(
                "{}/{}:{}",
                target.service.namespace, target.service.name, target.port
            )),
            what: crate::tap::What::Request {
                method: method.to_string(),
                path: path.clone(),
                route: route_name.clone(),
                status,
                duration_ms: elapsed.as_secs_f64() * 1000.0,
            },
        });
    }
    if target
        .policy
        .as_ref()
        .is_some_and(|p| p.settings.access_log)
    {
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
            trace_id = resp.extensions().get::<super::super::trace::Context>().map_or("", |t| t.trace_id.as_str()),
            "request"
        );
    }
    Ok(resp)
}

/// Why an HTTP/1 request's framing is not one a strict origin accepts (RFC 9112 §6): both
/// `Content-Length` and `Transfer-Encoding`, several or non-numeric `Content-Length`s, or a
/// transfer coding other than exactly `chunked`.
pub(super) fn framing_problem<B>(req: &Request<B>) -> Option<&'static str> {
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
pub(super) fn authenticate(
    ctx: &Arc<ConnCtx>,
    target: &Target,
    req: &mut Request<Incoming>,
    grpc: bool,
) -> Result<Option<super::super::authn::Principal>, Box<Response<Body>>> {
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
        .get_or_create(&super::super::metrics::AuthnLabels {
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
pub(super) fn authorize(
    ctx: &Arc<ConnCtx>,
    snapshot: &super::super::snapshot::Snapshot,
    target: &Target,
    req: &Request<Incoming>,
    auth: Option<&super::super::authn::Principal>,
    grpc: bool,
) -> Option<Response<Body>> {
    let policies = target.authz();
    if policies.is_empty() {
        return None;
    }
    let source = snapshot.mesh.by_id(ctx.src_workload);
    let verdict = super::super::authz::authorize(
        policies,
        source,
        &super::super::authz::Request {
            method: req.method().as_str(),
            path: req.uri().path(),
            headers: req.headers(),
            port: target.port,
            auth,
        },
    );
    let (policy, mode) = match verdict {
        super::super::authz::Verdict::Allow => return None,
        super::super::authz::Verdict::Deny { policy } => (policy, "enforced"),
        super::super::authz::Verdict::AuditDeny { policy } => (policy, "dry_run"),
    };
    ctx.engine
        .metrics
        .authz_denials
        .get_or_create(&super::super::metrics::AuthzLabels {
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
pub(super) fn record_refusal(
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
pub(super) fn grpc_class(resp: &Response<Body>, status: u16) -> &'static str {
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
pub(super) async fn route_request(
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
    let trace = super::super::trace::propagate(req.headers_mut());

    // Faults and the rate limit: answers without a try.
    let counts = super::faults::Counts {
        faults: &m.faults,
        rate_limited: &m.rate_limited,
        route: &labels.route,
    };
    let settings = policy.map(|p| &p.settings);
    if let Some(s) = settings
        && let Some(resp) = super::faults::inject(s, &counts, grpc).await
    {
        return resp;
    }
    if let Some(resp) = policy.and_then(|p| super::faults::rate_limit(p, &counts, grpc)) {
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

    let retries = settings.and_then(|p| p.retries.as_ref());
    // Mirrors: the traffic policy's and the route rule's RequestMirror filters.
    let mut mirrors: Vec<Arc<Pool>> = policy
        .and_then(|p| p.settings.mirror.as_ref())
        .filter(|mi| roll(mi.percent))
        .and_then(|mi| {
            target.pool(&BackendTarget {
                service: mi.service.clone(),
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
        .or_else(|| settings.and_then(|p| p.timeout));
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
    let tries = Attempts {
        upstream: &*ctx.engine,
        metrics: &ctx.engine.metrics,
        src: ctx.src_workload,
        pool: &pool,
        budget: target.policy.as_ref().and_then(|p| p.budget.as_ref()),
        allowed: attempts,
        retries,
        per_try,
        route: &labels.route,
        grpc,
    };
    let mut resp = super::faults::within(timeout, grpc, tries.run(parts, body)).await;
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
