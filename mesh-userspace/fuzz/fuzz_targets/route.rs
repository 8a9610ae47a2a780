//! Untrusted routes and requests through the route compiler and matcher: no input may panic; a
//! route that does not compile comes out as problems.
//!
//! Input: an HTTPRoute or GRPCRoute as YAML, a NUL byte, then the request: `METHOD /path?query`
//! on the first line and `name: value` headers on the following ones.
#![no_main]

use gateway_api::{
    grpcroutes::{GrpcRoute, GrpcRouteParentRefs},
    httproutes::{HttpRoute, HttpRouteParentRefs},
};
use hyper::http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use libfuzzer_sys::fuzz_target;
use weft::state::{
    ServiceRef,
    routes::{self as route, Compiled, RequestView},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (yaml, request) = text.split_once('\0').unwrap_or((text, "GET /"));
    let mut lines = request.lines();
    let (method, target) = lines
        .next()
        .unwrap_or("")
        .split_once(' ')
        .unwrap_or(("GET", "/"));
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let (path, query) = target
        .split_once('?')
        .map_or((target, None), |(p, q)| (p, Some(q)));
    let mut headers = HeaderMap::new();
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        let name = HeaderName::from_bytes(name.trim().as_bytes());
        if let (Ok(n), Ok(v)) = (name, HeaderValue::from_str(value.trim())) {
            headers.append(n, v);
        }
    }
    let rng = u32::try_from(data.len())
        .unwrap_or(u32::MAX)
        .wrapping_mul(2_654_435_761);

    // Whatever parses is attached to the service, so its rules reach the compiler.
    let service = ServiceRef {
        namespace: "default".into(),
        name: "svc".into(),
    };
    let mut http: Vec<HttpRoute> = serde_saphyr::from_str(yaml).ok().into_iter().collect();
    let mut grpc: Vec<GrpcRoute> = serde_saphyr::from_str(yaml).ok().into_iter().collect();
    let mut ours = (http.clone(), grpc.clone());
    for r in &mut ours.0 {
        let parent = HttpRouteParentRefs {
            kind: Some("Service".into()),
            name: "svc".into(),
            namespace: Some("default".into()),
            ..Default::default()
        };
        r.spec.parent_refs.get_or_insert_with(Vec::new).push(parent);
    }
    for r in &mut ours.1 {
        let parent = GrpcRouteParentRefs {
            kind: Some("Service".into()),
            name: "svc".into(),
            namespace: Some("default".into()),
            ..Default::default()
        };
        r.spec.parent_refs.get_or_insert_with(Vec::new).push(parent);
    }
    http.append(&mut ours.0);
    grpc.append(&mut ours.1);
    let tables = [
        route::compile(&service, 80, &http, &[]),
        route::compile(&service, 80, &http, &grpc),
        route::compile_for_client(&service, 80, Some("client"), &http, &[]),
    ];

    let view = RequestView {
        method: &method,
        path,
        query,
        headers: &headers,
    };
    let req = Request::builder()
        .method(method.clone())
        .uri(target)
        .header("host", "svc.default:80")
        .body(());
    for Compiled { table, .. } in &tables {
        let _ = table.backends().count();
        let Some(action) = table.select(&view) else {
            continue;
        };
        let _ = action.outcome(rng);
        assert!(action.pick_backend(rng).is_none_or(|b| b.weight > 0));
        for m in &action.mirror {
            let _ = m.fires(rng);
        }
        let mut h = headers.clone();
        action.request_headers.apply(&mut h);
        action.response_headers.apply(&mut h);
        if let Ok(req) = &req {
            let _ = action.redirect_response(req);
            let _ = action.rewritten_uri(req);
        }
    }
});
