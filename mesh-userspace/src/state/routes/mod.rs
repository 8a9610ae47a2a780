//! The route table of one Service port: Gateway API `HTTPRoute`/`GRPCRoute` objects that name the
//! Service as a parent (GAMMA), compiled into one entry per route match, sorted by the spec's
//! precedence. `select` is then a linear scan without allocation: the first entry that matches
//! is the one the spec picks.
//!
//! Choices where the spec leaves room (each one is tested below):
//! - `RegularExpression` paths are full matches on the raw path and rank after `Exact` and
//!   `PathPrefix` paths of any length; among themselves they compare by method/headers/query.
//! - Prefix length counts the prefix without its trailing slash (`/a/` and `/a` are one match).
//! - Query parameters are percent-decoded (`+` stays literal); header and query values are
//!   compared on the first occurrence only; a header value that is not UTF-8 never matches.
//! - gRPC service/method: `Exact` beats `RegularExpression` beats absent, service before method.
//! - When `GRPCRoute`s and `HTTPRoute`s attach to the same service port, the latter are ignored
//!   (GEP-1426 route type precedence) and reported.
//! - Consumer routes (route namespace != service namespace) apply only to clients in the route's
//!   namespace and then replace the producer routes: see `compile_for_client`. `hostnames` and
//!   parentRef `sectionName` are ignored (GEP-1426 says not to infer anything from hostnames).
//! - A backendRef to a Service without a port means "the port the client used". Cross-namespace
//!   backendRefs need no `ReferenceGrant` (GEP-1426: mesh routes only augment reachability).
//! - Each `RuleAction` is the action of one (rule, match) pair, so it carries the prefix that
//!   matched (`matched_prefix`) for `ReplacePrefixMatch`; `select` returns `&RuleAction` directly.
#![forbid(unsafe_code)]

use gateway_api::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
use hyper::http::{HeaderMap, Method};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;
use std::sync::Arc;

use super::ServiceRef;
use crate::api::refs::Route as _;

mod action;
mod compile;
mod matching;

pub use action::*;
use compile::{Compiler, grpc_rule, http_rule, namespace, route_name};
use matching::{Cond, Entry, PathMatch, Rank, Text};

// ---- public types ----

/// A backendRef: `port: None` means the service port the client used.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct BackendTarget {
    pub service: ServiceRef,
    pub port: Option<u16>,
    pub weight: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RouteKind {
    Http,
    Grpc,
}

/// What `select` looks at. `path` excludes the query.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// Entries sorted by precedence. Empty means no route attached: plain service behaviour. When
/// routes are attached and `select` finds nothing the spec answers 404.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    entries: Vec<Entry>,
    routes: Vec<String>,
}

impl RouteTable {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.routes.is_empty()
    }

    /// `Kind ns/name` of every route compiled in, for `/config_dump`.
    #[must_use]
    pub fn routes(&self) -> &[String] {
        &self.routes
    }

    /// The highest-precedence action whose match the request meets. No allocation unless a
    /// query parameter has to be percent-decoded.
    #[must_use]
    pub fn select(&self, req: &RequestView<'_>) -> Option<&RuleAction> {
        let grpc = req.path.strip_prefix('/').and_then(|p| p.split_once('/'));
        self.entries
            .iter()
            .find(|e| e.cond.matches(req, grpc))
            .map(|e| &e.action)
    }

    pub fn actions(&self) -> impl Iterator<Item = &RuleAction> {
        self.entries.iter().map(|e| &e.action)
    }

    /// Every backend and mirror target (with repeats): the pools the engine must hold.
    pub fn backends(&self) -> impl Iterator<Item = &BackendTarget> {
        self.actions()
            .flat_map(|a| a.backends.iter().chain(a.mirror.iter().map(|m| &m.target)))
    }
}

#[derive(Debug)]
pub struct Compiled {
    pub table: RouteTable,
    pub problems: Vec<String>,
}

/// The producer routes attached to `service` port `port` (see `compile_for_client`).
#[must_use]
pub fn compile(
    service: &ServiceRef,
    port: u16,
    http: &[Arc<HttpRoute>],
    grpc: &[Arc<GrpcRoute>],
) -> Compiled {
    compile_for_client(service, port, None, http, grpc)
}

/// The table a client in `client_namespace` sees: the consumer routes of its own namespace when
/// there are any, else the producer routes (route namespace = service namespace). Routes that do
/// not attach are skipped, so passing every route is fine.
#[must_use]
pub fn compile_for_client(
    service: &ServiceRef,
    port: u16,
    client_namespace: Option<&str>,
    http: &[Arc<HttpRoute>],
    grpc: &[Arc<GrpcRoute>],
) -> Compiled {
    let scope = |m: &ObjectMeta| -> Option<bool> {
        let ns = namespace(m);
        if ns == service.namespace {
            Some(false)
        } else {
            (Some(ns) == client_namespace).then_some(true)
        }
    };
    let mut http: Vec<&HttpRoute> = http
        .iter()
        .map(|r| &**r)
        .filter(|r| r.attaches_to(service.parts(), port))
        .collect();
    let mut grpc: Vec<&GrpcRoute> = grpc
        .iter()
        .map(|r| &**r)
        .filter(|r| r.attaches_to(service.parts(), port))
        .collect();
    let consumer = http
        .iter()
        .map(|r| &r.metadata)
        .chain(grpc.iter().map(|r| &r.metadata))
        .any(|m| scope(m) == Some(true));
    http.retain(|r| scope(&r.metadata) == Some(consumer));
    grpc.retain(|r| scope(&r.metadata) == Some(consumer));

    let mut problems = Vec::new();
    if !grpc.is_empty() {
        for r in http.drain(..) {
            problems.push(format!(
                "HTTPRoute {}: ignored for {service}:{port}, a GRPCRoute attaches to the same port \
                 and wins (GEP-1426); route this service with GRPCRoutes only",
                route_name(&r.metadata)
            ));
        }
    }
    let mut entries = Vec::new();
    let mut routes = Vec::new();
    let mut route = |kind, meta: &ObjectMeta, rules: &mut dyn FnMut(&mut Compiler<'_>)| {
        let label = if kind == RouteKind::Http {
            "HTTPRoute"
        } else {
            "GRPCRoute"
        };
        routes.push(format!("{label} {}", route_name(meta)));
        rules(&mut Compiler::new(kind, meta, &mut problems, &mut entries));
    };
    for r in http {
        route(RouteKind::Http, &r.metadata, &mut |cx| {
            for (ri, rule) in r.spec.rules.iter().flatten().enumerate() {
                cx.rule = ri;
                http_rule(cx, rule);
            }
        });
    }
    for r in grpc {
        route(RouteKind::Grpc, &r.metadata, &mut |cx| {
            for (ri, rule) in r.spec.rules.iter().flatten().enumerate() {
                cx.rule = ri;
                grpc_rule(cx, rule);
            }
        });
    }
    entries.sort_by(|a, b| a.rank.cmp(&b.rank));
    let table = RouteTable { entries, routes };
    Compiled { table, problems }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::api::refs::attaches;

    use std::{cmp::Reverse, time::Duration};

    use gateway_api::httproutes::{
        HttpRouteParentRefs, HttpRouteRulesMatches, HttpRouteRulesMatchesHeaders,
        HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
        HttpRouteRulesMatchesQueryParams, HttpRouteRulesMatchesQueryParamsType,
    };
    use hyper::http::{HeaderName, HeaderValue, Request, StatusCode, header};
    use regex::Regex;

    use crate::api::parse_duration;
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    type Headers<'a> = &'a [(&'a str, &'a str)];
    /// (method, path?query, headers, the rule `select` must pick)
    type Case<'a> = (&'a str, &'a str, Headers<'a>, Option<usize>);
    const NONE: Headers = &[];

    fn sref(namespace: &str, name: &str) -> ServiceRef {
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        ServiceRef { namespace, name }
    }

    fn svc() -> ServiceRef {
        sref("ns", "svc")
    }

    /// An `HTTPRoute` `route_ns/name` attached to ns/svc, `rules` in YAML flow style.
    fn http_in(route_ns: &str, name: &str, created: Option<&str>, rules: &str) -> HttpRoute {
        let created = created.map_or(String::new(), |c| format!(", creationTimestamp: '{c}'"));
        let parent = "{kind: Service, name: svc, namespace: ns}";
        let meta = format!("{{name: {name}, namespace: {route_ns}{created}}}");
        let yaml = format!("metadata: {meta}\nspec: {{parentRefs: [{parent}], rules: {rules}}}");
        serde_saphyr::from_str(&yaml).unwrap()
    }

    fn http(name: &str, created: Option<&str>, rules: &str) -> HttpRoute {
        http_in("ns", name, created, rules)
    }

    /// One route `ns/r` compiled for ns/svc:80.
    fn one(rules: &str) -> Compiled {
        compile(&svc(), 80, &[Arc::new(http("r", None, rules))], &[])
    }

    fn table(http: &[HttpRoute]) -> RouteTable {
        let http: Vec<_> = http.iter().cloned().map(Arc::new).collect();
        let c = compile(&svc(), 80, &http, &[]);
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        c.table
    }

    fn select<'t>(
        t: &'t RouteTable,
        method: &str,
        pq: &str,
        hs: Headers,
    ) -> Option<&'t RuleAction> {
        let method: Method = method.parse().unwrap();
        let (path, query) = pq.split_once('?').map_or((pq, None), |(p, q)| (p, Some(q)));
        let mut headers = HeaderMap::new();
        for (n, v) in hs {
            let name = HeaderName::from_bytes(n.as_bytes()).unwrap();
            headers.append(name, HeaderValue::from_str(v).unwrap());
        }
        let method = &method;
        t.select(&RequestView {
            method,
            path,
            query,
            headers: &headers,
        })
    }

    fn check(t: &RouteTable, cases: &[Case<'_>]) {
        for (m, pq, hs, want) in cases {
            let got = select(t, m, pq, hs).map(|a| a.rule);
            assert_eq!(got, *want, "{m} {pq} {hs:?}");
        }
    }

    /// `ns/name#rule` of the selected action.
    fn hit(t: &RouteTable, pq: &str) -> Option<String> {
        select(t, "GET", pq, NONE).map(|a| format!("{}#{}", a.route, a.rule))
    }

    #[test]
    fn prefix_is_segment_wise() {
        for prefix in ["/foo", "/foo/"] {
            let rules =
                format!("[{{matches: [{{path: {{type: PathPrefix, value: '{prefix}'}}}}]}}]");
            let t = table(&[http("r", None, &rules)]);
            for (path, want) in [("/foo", true), ("/foo/", true), ("/foo/bar", true)] {
                assert_eq!(hit(&t, path).is_some(), want, "{prefix} vs {path}");
            }
            for path in ["/foobar", "/fo", "/", "/x/foo"] {
                assert_eq!(hit(&t, path), None, "{prefix} vs {path}");
            }
        }
        let t = table(&[http("r", None, "[{}]")]); // no matches: PathPrefix "/"
        assert!(["/", "/x", "/x/y"].iter().all(|p| hit(&t, p).is_some()));
    }

    const PRECEDENCE: &str = r"[
        {matches: [{path: {value: /}}]},
        {matches: [{path: {value: /a}}]},
        {matches: [{path: {type: Exact, value: /a/b}}]},
        {matches: [{path: {value: /a/b}}]},
        {matches: [{path: {value: /a/b}, method: GET}]},
        {matches: [{path: {value: /a/b}, headers: [{name: x, value: '1'}]}]},
        {matches: [{path: {value: /a/b}, headers: [{name: x, value: '1'}, {name: y, value: '1'}]}]},
        {matches: [{path: {value: /a/b}, queryParams: [{name: q, value: '1'}]}]},
        {matches: [{path: {type: RegularExpression, value: '/a/.*'}, method: GET,
                    headers: [{name: x, value: '1'}]}]},
    ]";

    #[test]
    fn precedence_follows_the_spec_order() {
        const X: Headers = &[("x", "1")];
        const XY: Headers = &[("x", "1"), ("y", "1")];
        let t = table(&[http("r", None, PRECEDENCE)]);
        check(
            &t,
            &[
                ("GET", "/a/b", XY, Some(2)),          // Exact beats everything
                ("GET", "/a/b/c?q=1", XY, Some(4)),    // then longest prefix; method beats headers
                ("POST", "/a/b/c?q=1", XY, Some(6)),   // two headers beat one
                ("POST", "/a/b/c?q=1", X, Some(5)),    // headers beat query params
                ("POST", "/a/b/c?q=1", NONE, Some(7)), // query params beat nothing
                ("POST", "/a/b/c", NONE, Some(3)),
                ("GET", "/a/c", X, Some(1)), // a regex ranks after prefixes of any length
                ("GET", "/b", NONE, Some(0)),
            ],
        );
        // Regex paths are full matches and win when nothing else matches.
        let rules = "[{matches: [{path: {type: RegularExpression, value: '/a/[0-9]+'}}]}]";
        let t = table(&[http("r", None, rules)]);
        assert!(hit(&t, "/a/12").is_some());
        assert!(hit(&t, "/a/12/x").is_none() && hit(&t, "/x/a/12").is_none());
    }

    #[test]
    fn ties_break_by_age_then_name_then_rule_order() {
        let rules = "[{matches: [{path: {value: /x}}]}, {matches: [{path: {value: /x}}]}]";
        let (old, new) = (Some("2024-01-01T00:00:00Z"), Some("2024-01-02T00:00:00Z"));
        let oldest = [
            http("a", new, rules),
            http("c", None, rules),
            http("b", old, rules),
        ];
        assert_eq!(hit(&table(&oldest), "/x").unwrap(), "ns/b#0");
        let missing_is_newest = [http("a", None, rules), http("b", new, rules)];
        assert_eq!(hit(&table(&missing_is_newest), "/x").unwrap(), "ns/b#0");
        let by_name = [http("b", None, rules), http("a", None, rules)];
        assert_eq!(hit(&table(&by_name), "/x").unwrap(), "ns/a#0");
    }

    const CONDITIONS: &str = r"[
        {matches: [{headers: [{name: X-Ver, value: v1}, {name: x-ver, value: ignored}]}]},
        {matches: [{headers: [{name: x-re, type: RegularExpression, value: 'v[0-9]+'}]}]},
        {matches: [{queryParams: [{name: q, value: 'a b'}]},
                   {queryParams: [{name: r, type: RegularExpression, value: '[0-9]+'}]}]},
        {matches: [{method: DELETE}]},
        {matches: [{path: {value: /p}, method: GET, headers: [{name: h, value: '1'}],
                    queryParams: [{name: q, value: '1'}]}]},
    ]";

    #[test]
    fn header_query_and_method_conditions() {
        let h1: Headers = &[("h", "1")];
        check(
            &table(&[http("r", None, CONDITIONS)]),
            &[
                // Header names are case-insensitive; a repeated name in a match is ignored.
                ("GET", "/", &[("x-ver", "v1")], Some(0)),
                // The first value of a header counts.
                ("GET", "/", &[("X-VER", "v1"), ("x-ver", "v2")], Some(0)),
                ("GET", "/", &[("x-ver", "v2"), ("x-ver", "v1")], None),
                ("GET", "/", &[("x-re", "v12")], Some(1)),
                ("GET", "/", &[("x-re", "v12x")], None), // regexes match in full
                ("GET", "/?q=a%20b", NONE, Some(2)),     // query values are percent-decoded
                ("GET", "/?q=a+b", NONE, None),
                ("GET", "/?x&r=12&r=y", NONE, Some(2)), // the matches of a rule are ORed
                ("GET", "/?r=y&r=12", NONE, None),      // the first value counts
                ("DELETE", "/", NONE, Some(3)),
                ("GET", "/p?q=1", h1, Some(4)),
                // The conditions of a match are ANDed.
                ("POST", "/p?q=1", h1, None),
                ("GET", "/p?q=2", h1, None),
                ("GET", "/p?q=1", &[("h", "2")], None),
                ("GET", "/px?q=1", h1, None),
            ],
        );
    }

    #[test]
    fn invalid_regex_makes_its_match_never_match() {
        let c = one(r"[
            {matches: [{path: {type: RegularExpression, value: '('}}, {path: {value: /ok}}]},
            {matches: [{headers: [{name: h, type: RegularExpression, value: 'a)|(.*'}]}]},
        ]");
        assert_eq!(c.problems.len(), 2, "{:?}", c.problems);
        assert!(c.problems[0].starts_with("HTTPRoute ns/r rule 0: invalid regex"));
        assert_eq!(hit(&c.table, "/ok").unwrap(), "ns/r#0");
        // The invalid matches are gone, not turned into catch-alls.
        assert_eq!(select(&c.table, "GET", "/(", &[("h", "zz")]), None);
    }

    const GRPC: &str = r"[
        {matches: [{method: {service: pkg.Svc, method: Get}}]},
        {matches: [{method: {service: pkg.Svc}}]},
        {matches: [{method: {method: Get}}]},
        {matches: [{method: {type: RegularExpression, service: 'pkg\..*'}}]},
        {},
        {matches: [{headers: [{name: x, value: '1'}]}]},
    ]";

    #[test]
    fn grpc_precedence_and_conflict_with_http() {
        let meta = "metadata: {name: g, namespace: ns}";
        let yaml =
            format!("{meta}\nspec: {{parentRefs: [{{kind: Service, name: svc}}], rules: {GRPC}}}");
        let grpc: GrpcRoute = serde_saphyr::from_str(&yaml).unwrap();
        let c = compile(
            &svc(),
            80,
            &[Arc::new(http("h", None, "[{}]"))],
            &[Arc::new(grpc)],
        );
        assert_eq!(c.problems.len(), 1);
        assert!(
            c.problems[0].contains("HTTPRoute ns/h: ignored"),
            "{:?}",
            c.problems
        );
        assert!(c.table.actions().all(|a| a.kind == RouteKind::Grpc));
        let x: Headers = &[("x", "1")];
        check(
            &c.table,
            &[
                ("POST", "/pkg.Svc/Get", x, Some(0)),      // service and method
                ("POST", "/pkg.Svc/Put", NONE, Some(1)),   // service only
                ("POST", "/other.Svc/Get", NONE, Some(2)), // method only
                ("POST", "/pkg.Other/Put", NONE, Some(3)), // regex service
                ("POST", "/other.X/Y", x, Some(5)),
                ("POST", "/other.X/Y", NONE, Some(4)),
                ("POST", "/not-grpc", NONE, Some(4)),
            ],
        );
    }

    #[test]
    fn attachment_and_consumer_routes() {
        let s = svc();
        let at = |ns, refs: &str, port| {
            let refs: Vec<HttpRouteParentRefs> = serde_saphyr::from_str(refs).unwrap();
            attaches(ns, Some(refs.as_slice()), s.parts(), port)
        };
        assert!(at("ns", "[{kind: Service, name: svc}]", 80));
        assert!(at(
            "ns",
            "[{group: core, kind: Service, name: svc, port: 80}]",
            80
        ));
        assert!(at(
            "client",
            "[{group: '', kind: Service, name: svc, namespace: ns}]",
            80
        ));
        assert!(!at("ns", "[{kind: Service, name: svc, port: 81}]", 80));
        assert!(!at("ns", "[{name: svc}]", 80)); // kind defaults to Gateway
        assert!(!at("ns", "[{group: x.io, kind: Service, name: svc}]", 80));
        assert!(!at("client", "[{kind: Service, name: svc}]", 80)); // the route's namespace
        assert!(!attaches::<HttpRouteParentRefs>("ns", None, s.parts(), 80));

        let routes = [
            Arc::new(http("producer", None, "[{}]")),
            Arc::new(http_in("client", "consumer", None, "[{}]")),
        ];
        let route_of = |client| hit(&compile_for_client(&s, 80, client, &routes, &[]).table, "/");
        assert_eq!(route_of(None).unwrap(), "ns/producer#0");
        assert_eq!(route_of(Some("client")).unwrap(), "client/consumer#0");
        assert_eq!(route_of(Some("other")).unwrap(), "ns/producer#0");
        assert!(compile(&s, 80, &[], &[]).table.is_empty());
    }

    #[test]
    fn weighted_pick_is_proportional_and_invalid_shares_fail() {
        let c = one(r"[
            {backendRefs: [{name: a, port: 80, weight: 1}, {name: b, namespace: o, port: 8080, weight: 3},
                           {name: z, port: 80, weight: 0}, {kind: Pod, name: bad, weight: 1}]},
            {matches: [{path: {value: /zero}}], backendRefs: [{name: a, port: 80, weight: 0}]},
            {matches: [{path: {value: /none}}]},
        ]");
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
        let split = select(&c.table, "GET", "/", NONE).unwrap();
        let b = BackendTarget {
            service: sref("o", "b"),
            port: Some(8080),
            weight: 3,
        };
        assert_eq!(split.backends[1], b);
        let total = 5000_u64;
        let mut counts: HashMap<&str, u64> = HashMap::new();
        for i in 0..total {
            let picked = split.pick_backend(u32::try_from((i << 32) / total).unwrap());
            *counts
                .entry(picked.map_or("500", |b| b.service.name.as_str()))
                .or_default() += 1;
        }
        for (name, want) in [("a", 1000), ("b", 3000), ("500", 1000)] {
            assert!(counts[name].abs_diff(want) <= 1, "{counts:?}");
        }
        assert!(!counts.contains_key("z"));
        assert_eq!(split.pick_backend(u32::MAX), None); // the last fifth is the invalid backend
        for path in ["/zero", "/none"] {
            let failing = select(&c.table, "GET", path, NONE).unwrap();
            assert_eq!(
                failing.outcome(7),
                Outcome::Fail(StatusCode::INTERNAL_SERVER_ERROR)
            );
        }
        let mirror = Mirror {
            target: b,
            numerator: 1,
            denominator: 4,
        };
        let fired = (0..400_u64).filter(|i| mirror.fires(u32::try_from((i << 32) / 400).unwrap()));
        assert_eq!(fired.count(), 100);
    }

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("10s", 10_000),
            ("500ms", 500),
            ("1h2m", 3_720_000),
            ("1h2m3s4ms", 3_723_004),
        ] {
            assert_eq!(parse_duration(text), Ok(ms(want)));
        }
        for bad in [
            "",
            "10",
            "1.5s",
            "-1s",
            "10us",
            "1d",
            "s",
            "123456s",
            "1h1m1s1ms1h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let c = one(
            "[{timeouts: {request: 0s, backendRequest: 1x}}, {timeouts: {request: 1s, backendRequest: 2s}}]",
        );
        assert_eq!(c.problems.len(), 2, "{:?}", c.problems); // invalid; backendRequest > request
        let got: Vec<_> = c
            .table
            .actions()
            .map(|a| (a.request_timeout, a.backend_timeout))
            .collect();
        assert_eq!(got, [(None, None), (Some(ms(1000)), Some(ms(2000)))]); // 0s disables
    }

    #[test]
    fn prefix_rewrite_follows_the_spec_table() {
        for (path, prefix, with, want) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/foo/bar", "/", "/xyz", "/xyz/foo/bar"),
        ] {
            let got = PathModifier::ReplacePrefixMatch(with.into()).apply(path, Some(prefix));
            assert_eq!(got, want, "{path} {prefix} {with}");
        }
        assert_eq!(
            PathModifier::ReplacePrefixMatch("/x".into()).apply("/a", None),
            "/a"
        );
    }

    const FILTERS: &str = r"[
        {matches: [{path: {type: Exact, value: /old}}],
         filters: [{type: RequestRedirect,
                    requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}]},
        {matches: [{path: {value: /api/v1}}], backendRefs: [{name: be, port: 80}],
         filters: [{type: URLRewrite,
                    urlRewrite: {hostname: be.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}]},
    ]";

    #[test]
    fn redirects_and_rewrites() {
        let r = |scheme: Option<&str>, host: Option<&str>, port| {
            let (scheme, hostname) = (scheme.map(Into::into), host.map(Into::into));
            Redirect {
                scheme,
                hostname,
                path: None,
                port,
                status: 302,
            }
        };
        for (redirect, authority, query, want) in [
            (
                r(None, None, None),
                "svc:8080",
                Some("x=1"),
                "http://svc:8080/a?x=1",
            ),
            (r(None, None, None), "svc", None, "http://svc/a"),
            (
                r(Some("https"), None, None),
                "svc:8080",
                None,
                "https://svc/a",
            ),
            (
                r(Some("https"), None, Some(8443)),
                "svc",
                None,
                "https://svc:8443/a",
            ),
            (
                r(None, Some("h"), Some(80)),
                "[::1]:8080",
                None,
                "http://h/a",
            ),
            (
                r(None, None, None),
                "[::1]:8080",
                None,
                "http://[::1]:8080/a",
            ),
        ] {
            assert_eq!(
                redirect.location("http", authority, "/a", query, None),
                want
            );
        }

        let c = one(FILTERS);
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        let req = |uri: &str| {
            Request::builder()
                .uri(uri)
                .header("host", "svc.ns:8080")
                .body(())
        };
        let a = select(&c.table, "GET", "/old", NONE).unwrap();
        assert!(matches!(a.outcome(0), Outcome::Redirect(_)));
        let resp = a.redirect_response(&req("/old?x=1").unwrap()).unwrap();
        assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            resp.headers()[header::LOCATION],
            "http://svc.ns:8080/new?x=1"
        );
        let a = select(&c.table, "GET", "/api/v1/items", NONE).unwrap();
        assert_eq!(a.matched_prefix.as_deref(), Some("/api/v1"));
        assert_eq!(
            a.rewritten_uri(&req("/api/v1/items?x=1").unwrap()).unwrap(),
            "/v2/items?x=1"
        );
        let absolute = req("http://svc:80/api/v1").unwrap();
        assert_eq!(a.rewritten_uri(&absolute).unwrap(), "http://be.internal/v2");
        assert_eq!(a.rewritten_host(), Some("be.internal"));
        assert!(a.redirect_response(&absolute).is_none());
    }

    const HOSTILE: &str = r"[
        {backendRefs: [{name: a, port: 70000}, {name: b, weight: -3}, {group: x.io, kind: Pod, name: c}],
         filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m}, fraction: {numerator: 5, denominator: 0}}},
                   {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: 'bad name', value: x}]}},
                   {type: ExtensionRef, extensionRef: {group: x.io, kind: K, name: n}},
                   {type: URLRewrite}]},
        {matches: [{path: {type: Exact, value: /x}}],
         filters: [{type: RequestRedirect, requestRedirect: {statusCode: 999, port: 0,
                    path: {type: ReplacePrefixMatch, replacePrefixMatch: /y}}}]},
    ]";

    #[test]
    fn hostile_values_become_problems() {
        let c = one(HOSTILE);
        assert_eq!(c.problems.len(), 10, "{:#?}", c.problems);
        assert!(c.problems[6].ends_with("filter URLRewrite lacks its configuration, ignored"));
        let a = select(&c.table, "GET", "/", NONE).unwrap();
        assert!(a.mirror.is_empty() && a.request_headers.is_empty());
        assert_eq!(a.backends.iter().map(|b| b.weight).collect::<Vec<_>>(), [0]); // b
        assert_eq!((a.invalid_weight, a.pick_backend(0)), (2, None)); // a and c; b weighs 0
        let r = select(&c.table, "GET", "/x", NONE)
            .unwrap()
            .redirect
            .clone()
            .unwrap();
        assert_eq!((r.status, r.port), (302, None));
        let grpc =
            "metadata: {name: g, namespace: ns}\nspec: {parentRefs: [{kind: Service, name: svc}],
                    rules: [{matches: [{method: {type: Exact}}]}]}";
        let c = compile(
            &svc(),
            80,
            &[],
            &[Arc::new(serde_saphyr::from_str(grpc).unwrap())],
        );
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
    }

    const REVIEWS: &str = r"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop, creationTimestamp: '2024-05-01T10:00:00Z'}
spec:
  parentRefs:
  - {group: '', kind: Service, name: reviews, port: 9080}
  hostnames: [ignored.example.com]
  rules:
  - name: canary
    matches:
    - path: {type: PathPrefix, value: /api/}
      headers: [{name: X-Canary, value: 'true'}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: canary}]
        add: [{name: x-seen, value: weft}]
        remove: [x-debug]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: cache-control, value: no-store}]}
    backendRefs: [{name: reviews-v2, port: 9080}]
    timeouts: {request: 10s, backendRequest: 2s500ms}
  - backendRefs:
    - {name: reviews, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 9080}, percent: 5}
    - type: CORS
      cors: {allowOrigins: ['*']}
";

    /// A realistic route through YAML, back, and through `compile`.
    #[test]
    fn yaml_round_trip_compiles() {
        let route: HttpRoute = serde_saphyr::from_str(REVIEWS).unwrap();
        let again: HttpRoute =
            serde_saphyr::from_str(&serde_saphyr::to_string(&route).unwrap()).unwrap();
        assert_eq!(route, again);
        let s = sref("shop", "reviews");
        let c = compile(&s, 9080, &[Arc::new(again)], &[]);
        assert_eq!(
            c.problems,
            ["HTTPRoute shop/reviews rule 1: filter CORS is not supported, ignored"]
        );
        assert!(compile(&s, 9081, &[Arc::new(route)], &[]).table.is_empty()); // port-restricted parentRef

        let canary = select(&c.table, "GET", "/api/x", &[("x-canary", "true")]).unwrap();
        assert_eq!(
            (canary.rule_name.as_deref(), canary.backends.len()),
            (Some("canary"), 1)
        );
        let timeouts = (canary.request_timeout, canary.backend_timeout);
        assert_eq!(
            timeouts,
            (
                Some(Duration::from_secs(10)),
                Some(Duration::from_millis(2500))
            )
        );
        let mut h = HeaderMap::new();
        for (n, v) in [("x-route", "old"), ("x-seen", "proxy"), ("x-debug", "1")] {
            h.insert(n, HeaderValue::from_static(v));
        }
        canary.request_headers.apply(&mut h);
        let values = |n| {
            h.get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            (values("x-route"), values("x-seen")),
            (vec!["canary"], vec!["proxy", "weft"])
        );
        assert!(!h.contains_key("x-debug") && !canary.response_headers.is_empty());

        let split = select(&c.table, "GET", "/api/x", NONE).unwrap();
        assert_eq!(split.rule, 1);
        let shadow = BackendTarget {
            service: sref("shop", "shadow"),
            port: Some(9080),
            weight: 1,
        };
        assert_eq!(
            split.mirror,
            [Mirror {
                target: shadow,
                numerator: 5,
                denominator: 100
            }]
        );
        let names: Vec<_> = c
            .table
            .backends()
            .map(|b| b.service.name.as_str())
            .collect();
        assert_eq!(names, ["reviews-v2", "reviews", "reviews-v2", "shadow"]);
    }

    // ---- property test against a naive reference ----

    type Cond = Vec<(&'static str, (&'static str, bool))>;

    #[derive(Clone, Debug)]
    struct Match {
        path: Option<(&'static str, &'static str)>,
        method: Option<&'static str>,
        headers: Cond,
        query: Cond,
    }

    fn a_match() -> impl Strategy<Value = Match> {
        use prop::sample::select;
        let prefix = (
            select(vec!["Exact", "PathPrefix"]),
            select(vec!["/", "/a", "/a/", "/a/b", "/ab"]),
        );
        let regex = select(vec!["/a.*", "/a/?", ".*b"]).prop_map(|v| ("RegularExpression", v));
        let path = prop_oneof![Just(None), prefix.prop_map(Some), regex.prop_map(Some)];
        let value = select(vec![
            ("1", false),
            ("2", false),
            ("[13]", true),
            ("2|3", true),
        ]);
        let header = (select(vec!["x-a", "X-A", "x-b"]), value.clone());
        let query = (select(vec!["q", "r"]), value);
        // Mostly unconditional matches, so that path and tie-break rules get exercised too.
        let headers = prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(header, 1..=2)];
        let query = prop_oneof![3 => Just(Vec::new()), 1 => query.prop_map(|q| vec![q])];
        let method = prop_oneof![3 => Just(None), 1 => select(vec!["GET", "POST"]).prop_map(Some)];
        (path, method, headers, query).prop_map(|(path, method, headers, query)| Match {
            path,
            method,
            headers,
            query,
        })
    }

    fn to_route(name: &str, created: Option<&str>, rules: &[Vec<Match>]) -> HttpRoute {
        let cond = |list: &Cond| -> Vec<serde_json::Value> {
            let ty = |re| if re { "RegularExpression" } else { "Exact" };
            list.iter()
                .map(|(n, (v, re))| json!({"name": n, "value": v, "type": ty(*re)}))
                .collect()
        };
        let one = |m: &Match| {
            let mut o = json!({"headers": cond(&m.headers), "queryParams": cond(&m.query)});
            if let Some((t, v)) = m.path {
                o["path"] = json!({"type": t, "value": v});
            }
            if let Some(x) = m.method {
                o["method"] = json!(x);
            }
            o
        };
        let rules: Vec<_> = rules
            .iter()
            .map(|ms| json!({"matches": ms.iter().map(one).collect::<Vec<_>>()}))
            .collect();
        let metadata = json!({"name": name, "namespace": "ns", "creationTimestamp": created});
        let spec = json!({"parentRefs": [{"kind": "Service", "name": "svc"}], "rules": rules});
        serde_json::from_value(json!({"metadata": metadata, "spec": spec})).unwrap()
    }

    fn equal_or_full_match(regex: bool, want: &str, have: &str) -> bool {
        if regex {
            Regex::new(&format!("^(?:{want})$")).unwrap().is_match(have)
        } else {
            want == have
        }
    }

    fn naive_decode(s: &str) -> String {
        let (mut out, b) = (Vec::new(), s.as_bytes());
        let mut i = 0;
        while i < b.len() {
            let hex = s
                .get(i + 1..i + 3)
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()));
            match (b[i], hex) {
                (b'%', Some(h)) => (out.push(u8::from_str_radix(h, 16).unwrap()), i += 3),
                (c, _) => (out.push(c), i += 1),
            };
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Every (rule, match) that matches, ranked by a key written from the spec's wording.
    fn reference(
        routes: &[HttpRoute],
        method: &str,
        path: &str,
        query: Option<&str>,
        headers: Headers,
    ) -> Option<(String, usize)> {
        use HttpRouteRulesMatchesPathType as P;
        let pairs: Vec<(String, String)> = query.map_or(Vec::new(), |q| {
            let pair = |kv: &str| {
                kv.split_once('=')
                    .map_or((kv.into(), String::new()), |(k, v)| (k.into(), v.into()))
            };
            q.split('&')
                .map(pair)
                .map(|(k, v): (String, String)| (naive_decode(&k), naive_decode(&v)))
                .collect()
        });
        let mut found = Vec::new();
        for r in routes {
            let name = format!("ns/{}", r.metadata.name.as_deref().unwrap());
            let created = r.metadata.creation_timestamp.as_ref().map(|t| t.0);
            for (ri, rule) in r.spec.rules.iter().flatten().enumerate() {
                let default = vec![HttpRouteRulesMatches::default()];
                for m in rule
                    .matches
                    .clone()
                    .filter(|m| !m.is_empty())
                    .unwrap_or(default)
                {
                    let kind = m
                        .path
                        .as_ref()
                        .and_then(|p| p.r#type.clone())
                        .unwrap_or(P::PathPrefix);
                    let value = m
                        .path
                        .as_ref()
                        .and_then(|p| p.value.clone())
                        .unwrap_or_else(|| "/".into());
                    let prefix = value.trim_end_matches('/');
                    let (path_ok, class, len) = match kind {
                        P::Exact => (path == value, 0, value.len()),
                        P::PathPrefix => {
                            let (want, have): (Vec<_>, Vec<_>) =
                                (prefix.split('/').collect(), path.split('/').collect());
                            (
                                have.len() >= want.len() && have[..want.len()] == want[..],
                                1,
                                prefix.len(),
                            )
                        }
                        P::RegularExpression => (equal_or_full_match(true, &value, path), 2, 0),
                    };
                    let method_ok = m
                        .method
                        .as_ref()
                        .is_none_or(|x| serde_json::to_value(x).unwrap() == method);
                    let mut hs: Vec<&HttpRouteRulesMatchesHeaders> = Vec::new();
                    for h in m.headers.iter().flatten() {
                        if !hs.iter().any(|o| o.name.eq_ignore_ascii_case(&h.name)) {
                            hs.push(h);
                        }
                    }
                    let headers_ok = hs.iter().all(|h| {
                        let re =
                            h.r#type == Some(HttpRouteRulesMatchesHeadersType::RegularExpression);
                        let first = headers
                            .iter()
                            .find(|(n, _)| n.eq_ignore_ascii_case(&h.name));
                        first.is_some_and(|(_, v)| equal_or_full_match(re, &h.value, v))
                    });
                    let mut qs: Vec<&HttpRouteRulesMatchesQueryParams> = Vec::new();
                    for q in m.query_params.iter().flatten() {
                        if !qs.iter().any(|o| o.name == q.name) {
                            qs.push(q);
                        }
                    }
                    let query_ok = qs.iter().all(|q| {
                        let re = q.r#type
                            == Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression);
                        let first = pairs.iter().find(|(k, _)| *k == q.name);
                        first.is_some_and(|(_, v)| equal_or_full_match(re, &q.value, v))
                    });
                    if path_ok && method_ok && headers_ok && query_ok {
                        let specificity = (
                            class,
                            Reverse(len),
                            Reverse(m.method.is_some()),
                            Reverse(hs.len()),
                            Reverse(qs.len()),
                        );
                        found.push((specificity, created.is_none(), created, name.clone(), ri));
                    }
                }
            }
        }
        found.into_iter().min().map(|k| (k.3, k.4))
    }

    type RouteModel = (u8, Option<u8>, Vec<Vec<Match>>);

    fn routes() -> impl Strategy<Value = Vec<HttpRoute>> {
        let rules = prop::collection::vec(prop::collection::vec(a_match(), 0..=2), 1..=3);
        let route = (0..3_u8, prop::option::of(1..3_u8), rules);
        prop::collection::vec(route, 1..=3).prop_map(|routes| {
            let route = |(i, (seed, day, rules)): (usize, &RouteModel)| {
                let created = day.map(|d| format!("2024-01-0{d}T00:00:00Z"));
                to_route(&format!("r{seed}-{i}"), created.as_deref(), rules)
            };
            routes.iter().enumerate().map(route).collect()
        })
    }

    const QUERIES: &[Option<&str>] = &[
        None,
        Some("q=1"),
        Some("q=2&q=1"),
        Some("r=1&q=2"),
        Some("q"),
        Some("q=%31"),
        Some("r=3"),
    ];

    fn request_headers() -> impl Strategy<Value = Vec<(&'static str, &'static str)>> {
        let header = (
            prop::sample::select(vec!["x-a", "X-A", "x-b"]),
            prop::sample::select(vec!["1", "2", "3"]),
        );
        prop::collection::vec(header, 0..=3)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn select_agrees_with_the_naive_reference(
            routes in routes(),
            method in prop::sample::select(vec!["GET", "POST", "PUT"]),
            path in prop::sample::select(vec!["/", "/a", "/a/", "/a/b", "/a/bc", "/ab", "/b"]),
            headers in request_headers(),
            query in prop::sample::select(QUERIES.to_vec()),
        ) {
            let shared: Vec<_> = routes.iter().cloned().map(Arc::new).collect();
            let c = compile(&svc(), 80, &shared, &[]);
            prop_assert!(c.problems.is_empty(), "{:?}", c.problems);
            let pq = query.map_or(path.to_owned(), |q| format!("{path}?{q}"));
            let got = select(&c.table, method, &pq, &headers).map(|a| (a.route.clone(), a.rule));
            prop_assert_eq!(got, reference(&routes, method, path, query, &headers));
        }
    }
}
