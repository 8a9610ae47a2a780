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

use std::{borrow::Cow, cmp::Reverse, time::Duration};

use gateway_api::{
    grpcroutes::{
        GrpcRoute, GrpcRouteRules, GrpcRouteRulesFiltersType, GrpcRouteRulesMatches,
        GrpcRouteRulesMatchesHeadersType, GrpcRouteRulesMatchesMethodType,
    },
    httproutes::{
        HttpRoute, HttpRouteRules, HttpRouteRulesFiltersRequestRedirect,
        HttpRouteRulesFiltersRequestRedirectPathType, HttpRouteRulesFiltersRequestRedirectScheme,
        HttpRouteRulesFiltersType, HttpRouteRulesFiltersUrlRewritePathType, HttpRouteRulesMatches,
        HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesMethod,
        HttpRouteRulesMatchesPathType, HttpRouteRulesMatchesQueryParamsType,
    },
};
use hyper::http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header,
};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::ObjectMeta, jiff::Timestamp};
use regex::{Regex, RegexBuilder};
use serde::Serialize;

use crate::api::refs::{AsRefParts, RefParts, ServiceRef, attaches};
use crate::api::{is_core_service, parse_duration};

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

/// A header modifier filter, applied as remove, then set, then add (Envoy's order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

impl PathModifier {
    /// The new path. `ReplacePrefixMatch` without a matched prefix (the match was not a
    /// `PathPrefix` one; reported at compile time) leaves the path alone.
    #[must_use]
    pub fn apply(&self, path: &str, matched_prefix: Option<&str>) -> String {
        match (self, matched_prefix) {
            (Self::ReplaceFullPath(p), _) => p.clone(),
            (Self::ReplacePrefixMatch(with), Some(prefix)) => {
                let prefix = prefix.trim_end_matches('/');
                let rest = path.get(prefix.len()..).unwrap_or("");
                let out = format!("{}{rest}", with.trim_end_matches('/'));
                if out.is_empty() { "/".to_owned() } else { out }
            }
            (Self::ReplacePrefixMatch(_), None) => path.to_owned(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

impl Redirect {
    /// The `Location` for a request that arrived as `scheme://authority/path?query`. Port rules
    /// per spec: the filter's port, else the well-known port of a redirect scheme, else the port
    /// the request used; 80 for http and 443 for https are left out.
    #[must_use]
    pub fn location(
        &self,
        scheme: &str,
        authority: &str,
        path: &str,
        query: Option<&str>,
        matched_prefix: Option<&str>,
    ) -> String {
        let (req_host, req_port) = split_authority(authority);
        let out_scheme = self.scheme.as_deref().unwrap_or(scheme);
        let port = self.port.or_else(|| match &self.scheme {
            Some(s) => well_known_port(s)
                .or(req_port)
                .or_else(|| well_known_port(scheme)),
            None => req_port.or_else(|| well_known_port(scheme)),
        });
        let host = self.hostname.as_deref().unwrap_or(req_host);
        let path = self.path.as_ref().map_or(Cow::Borrowed(path), |p| {
            Cow::Owned(p.apply(path, matched_prefix))
        });
        let port = port.filter(|p| Some(*p) != well_known_port(out_scheme));
        let port = port.map_or(String::new(), |p| format!(":{p}"));
        let query = query.map_or(String::new(), |q| format!("?{q}"));
        format!("{out_scheme}://{host}{port}{path}{query}")
    }
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// `host[:port]` or `[v6]:port` into host and port.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    let colon = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => i,
        _ => return (authority, None),
    };
    (&authority[..colon], authority[colon + 1..].parse().ok())
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// A `RequestMirror` filter: fires for `numerator/denominator` of the requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    pub target: BackendTarget,
    pub numerator: u32,
    pub denominator: u32,
}

impl Mirror {
    #[must_use]
    pub fn fires(&self, rng_value: u32) -> bool {
        scale(rng_value, u64::from(self.denominator)) < u64::from(self.numerator)
    }
}

/// `rng_value` (uniform over u32) mapped uniformly onto `0..total`.
fn scale(rng_value: u32, total: u64) -> u64 {
    ((u128::from(rng_value) * u128::from(total)) >> 32) as u64
}

/// What to do with a request that matched one (rule, match) of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleAction {
    /// `namespace/name` of the route.
    pub route: String,
    pub kind: RouteKind,
    pub rule: usize,
    pub rule_name: Option<String>,
    /// The normalised `PathPrefix` value that matched (no trailing slash; "" for "/").
    pub matched_prefix: Option<String>,
    pub backends: Vec<BackendTarget>,
    /// Summed weight of invalid backendRefs: that share of requests gets 500 (spec).
    pub invalid_weight: u32,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    pub mirror: Vec<Mirror>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
}

/// The terminal action for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    Redirect(&'a Redirect),
    Forward(&'a BackendTarget),
    /// No usable backend (none, all weight 0, or the draw fell on an invalid one): 500.
    Fail(StatusCode),
}

impl RuleAction {
    /// Weighted choice; `None` means answer 500. The caller supplies the randomness.
    #[must_use]
    pub fn pick_backend(&self, rng_value: u32) -> Option<&BackendTarget> {
        let total = self
            .backends
            .iter()
            .map(|b| u64::from(b.weight))
            .sum::<u64>()
            + u64::from(self.invalid_weight);
        let mut point = scale(rng_value, total);
        for b in &self.backends {
            if point < u64::from(b.weight) {
                return Some(b);
            }
            point -= u64::from(b.weight);
        }
        None
    }

    #[must_use]
    pub fn outcome(&self, rng_value: u32) -> Outcome<'_> {
        if let Some(r) = &self.redirect {
            return Outcome::Redirect(r);
        }
        self.pick_backend(rng_value).map_or(
            Outcome::Fail(StatusCode::INTERNAL_SERVER_ERROR),
            Outcome::Forward,
        )
    }

    /// The redirect answer (status and `Location`), if this rule redirects.
    pub fn redirect_response<B>(&self, req: &Request<B>) -> Option<Response<()>> {
        let r = self.redirect.as_ref()?;
        let uri = req.uri();
        let authority = uri
            .authority()
            .map(hyper::http::uri::Authority::as_str)
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
            })
            .unwrap_or("");
        let loc = r.location(
            uri.scheme_str().unwrap_or("http"),
            authority,
            uri.path(),
            uri.query(),
            self.matched_prefix.as_deref(),
        );
        let mut resp = Response::new(());
        *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
        if let Ok(v) = HeaderValue::try_from(loc) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Some(resp)
    }

    /// The URI after `URLRewrite` (path, and hostname when the URI carries an authority), or
    /// `None` when nothing changes.
    pub fn rewritten_uri<B>(&self, req: &Request<B>) -> Option<Uri> {
        let rw = self.rewrite.as_ref()?;
        let uri = req.uri();
        let path = rw
            .path
            .as_ref()
            .map(|p| p.apply(uri.path(), self.matched_prefix.as_deref()));
        let host = rw.hostname.as_deref().filter(|_| uri.authority().is_some());
        if path.is_none() && host.is_none() {
            return None;
        }
        let mut parts = uri.clone().into_parts();
        if let Some(p) = path {
            let pq = match uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            parts.path_and_query = Some(pq.parse().ok()?);
        }
        if let Some(h) = host {
            parts.authority = Some(h.parse().ok()?);
        }
        Uri::from_parts(parts).ok()
    }

    /// The `URLRewrite` hostname: the new `Host`.
    #[must_use]
    pub fn rewritten_host(&self) -> Option<&str> {
        self.rewrite.as_ref()?.hostname.as_deref()
    }
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
    http: &[HttpRoute],
    grpc: &[GrpcRoute],
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
    http: &[HttpRoute],
    grpc: &[GrpcRoute],
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
        .filter(|r| {
            attaches(
                namespace(&r.metadata),
                r.spec.parent_refs.as_deref(),
                service,
                port,
            )
        })
        .collect();
    let mut grpc: Vec<&GrpcRoute> = grpc
        .iter()
        .filter(|r| {
            attaches(
                namespace(&r.metadata),
                r.spec.parent_refs.as_deref(),
                service,
                port,
            )
        })
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
    for r in http {
        routes.push(format!("HTTPRoute {}", route_name(&r.metadata)));
        let mut cx = Compiler::new(RouteKind::Http, &r.metadata, &mut problems, &mut entries);
        for (ri, rule) in r.spec.rules.iter().flatten().enumerate() {
            cx.rule = ri;
            http_rule(&mut cx, rule);
        }
    }
    for r in grpc {
        routes.push(format!("GRPCRoute {}", route_name(&r.metadata)));
        let mut cx = Compiler::new(RouteKind::Grpc, &r.metadata, &mut problems, &mut entries);
        for (ri, rule) in r.spec.rules.iter().flatten().enumerate() {
            cx.rule = ri;
            grpc_rule(&mut cx, rule);
        }
    }
    entries.sort_by(|a, b| a.rank.cmp(&b.rank));
    let table = RouteTable { entries, routes };
    Compiled { table, problems }
}

// ---- matching ----

#[derive(Clone, Debug)]
enum Text {
    Exact(String),
    Regex(Regex),
}

impl Text {
    fn matches(&self, s: &str) -> bool {
        match self {
            Self::Exact(e) => e == s,
            Self::Regex(r) => r.is_match(s),
        }
    }
}

#[derive(Clone, Debug)]
enum PathMatch {
    Exact(String),
    /// Without trailing slash; "" for "/".
    Prefix(String),
    Regex(Regex),
}

#[derive(Clone, Debug)]
enum Cond {
    Http {
        path: PathMatch,
        method: Option<Method>,
        headers: Vec<(HeaderName, Text)>,
        query: Vec<(String, Text)>,
    },
    Grpc {
        service: Option<Text>,
        method: Option<Text>,
        headers: Vec<(HeaderName, Text)>,
    },
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn headers_match(want: &[(HeaderName, Text)], have: &HeaderMap) -> bool {
    want.iter().all(|(n, t)| {
        have.get(n)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .is_some_and(|v| t.matches(v))
    })
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        if let (b'%', Some(h), Some(l)) = (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The first value of query parameter `name`.
fn query_value<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

impl Cond {
    fn matches(&self, req: &RequestView<'_>, grpc: Option<(&str, &str)>) -> bool {
        match self {
            Self::Http {
                path,
                method,
                headers,
                query,
            } => {
                let path_ok = match path {
                    PathMatch::Exact(p) => p == req.path,
                    PathMatch::Prefix(p) => prefix_matches(p, req.path),
                    PathMatch::Regex(r) => r.is_match(req.path),
                };
                path_ok
                    && method.as_ref().is_none_or(|m| m == req.method)
                    && headers_match(headers, req.headers)
                    && query.iter().all(|(n, t)| {
                        req.query
                            .and_then(|q| query_value(q, n))
                            .is_some_and(|v| t.matches(&v))
                    })
            }
            Self::Grpc {
                service,
                method,
                headers,
            } => {
                let part = |want: &Option<Text>, have: Option<&str>| {
                    want.as_ref()
                        .is_none_or(|t| have.is_some_and(|h| t.matches(h)))
                };
                part(service, grpc.map(|g| g.0))
                    && part(method, grpc.map(|g| g.1))
                    && headers_match(headers, req.headers)
            }
        }
    }

    fn prefix(&self) -> Option<&str> {
        match self {
            Self::Http {
                path: PathMatch::Prefix(p),
                ..
            } => Some(p),
            _ => None,
        }
    }
}

/// Sorts ascending: most specific first, then oldest, then `ns/name`, then rule and match order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    specificity: Reverse<[usize; 5]>,
    created: (bool, Option<Timestamp>),
    route: String,
    rule: usize,
    index: usize,
}

#[derive(Clone, Debug)]
struct Entry {
    rank: Rank,
    cond: Cond,
    action: RuleAction,
}

// ---- compilation ----

fn namespace(m: &ObjectMeta) -> &str {
    m.namespace.as_deref().unwrap_or("default")
}

fn route_name(m: &ObjectMeta) -> String {
    format!("{}/{}", namespace(m), m.name.as_deref().unwrap_or(""))
}

macro_rules! problem {
    ($cx:expr, $($fmt:tt)*) => { $cx.problem(&format!($($fmt)*)) };
}

/// A filter type as spelled in YAML (`URLRewrite`, not `UrlRewrite`).
fn type_name<T: Serialize>(t: &T) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Runs `$body` with the filter's configuration, or reports that it is missing.
macro_rules! with_config {
    ($cx:expr, $f:expr, $field:ident, |$m:ident| $body:expr) => {
        match &$f.$field {
            Some($m) => $body,
            None => problem!(
                $cx,
                "filter {} lacks its configuration, ignored",
                type_name(&$f.r#type)
            ),
        }
    };
}

/// A header modifier (same shape in both route kinds) into `HeaderEdits`.
macro_rules! edits {
    ($cx:expr, $edits:expr, $m:expr) => {{
        for h in $m.set.iter().flatten() {
            $edits.set.extend($cx.header_pair(&h.name, &h.value));
        }
        for h in $m.add.iter().flatten() {
            $edits.add.extend($cx.header_pair(&h.name, &h.value));
        }
        for n in $m.remove.iter().flatten() {
            $edits.remove.extend($cx.header_pair(n, "").map(|(n, _)| n));
        }
    }};
}

/// A `RequestMirror` filter (same shape in both route kinds).
macro_rules! mirror {
    ($cx:expr, $a:expr, $m:expr) => {
        $cx.mirror(
            &mut $a,
            $m.backend_ref.ref_parts(),
            $m.fraction.as_ref().map(|f| (f.numerator, f.denominator)),
            $m.percent,
        )
    };
}

/// Compiles the rules of one route into entries; `rule` is the rule being compiled.
struct Compiler<'c> {
    kind: RouteKind,
    route: String,
    namespace: String,
    created: Option<Timestamp>,
    rule: usize,
    problems: &'c mut Vec<String>,
    entries: &'c mut Vec<Entry>,
}

impl<'c> Compiler<'c> {
    fn new(
        kind: RouteKind,
        m: &ObjectMeta,
        problems: &'c mut Vec<String>,
        entries: &'c mut Vec<Entry>,
    ) -> Self {
        let created = m.creation_timestamp.as_ref().map(|t| t.0);
        let (route, namespace) = (route_name(m), namespace(m).to_owned());
        Self {
            kind,
            route,
            namespace,
            created,
            rule: 0,
            problems,
            entries,
        }
    }

    fn problem(&mut self, msg: &str) {
        let kind = match self.kind {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        };
        self.problems
            .push(format!("{kind} {} rule {}: {msg}", self.route, self.rule));
    }

    /// A full-match regex; `None` (reported) when invalid or too large.
    fn regex(&mut self, pattern: &str) -> Option<Regex> {
        // Compiled alone first: a pattern such as `a)|(b` must not escape the anchoring group.
        let anchored = format!("^(?:{pattern})$");
        let build = |p: &str| RegexBuilder::new(p).size_limit(1 << 20).build();
        let regex = build(pattern).and_then(|_| build(&anchored));
        regex
            .map_err(|e| {
                problem!(
                    self,
                    "invalid regex {pattern:?}, its match never matches: {e}"
                );
            })
            .ok()
    }

    fn text(&mut self, value: &str, regex: bool) -> Option<Text> {
        if regex {
            self.regex(value).map(Text::Regex)
        } else {
            Some(Text::Exact(value.to_owned()))
        }
    }

    /// Header matches, first of each (case-insensitive) name only, as the spec says.
    fn headers<'h>(
        &mut self,
        list: impl Iterator<Item = (&'h str, &'h str, bool)>,
    ) -> Option<Vec<(HeaderName, Text)>> {
        let mut out: Vec<(HeaderName, Text)> = Vec::new();
        for (name, value, regex) in list {
            let Ok(n) = HeaderName::from_bytes(name.as_bytes()) else {
                problem!(
                    self,
                    "invalid header name {name:?}, its match never matches"
                );
                return None;
            };
            if !out.iter().any(|(o, _)| *o == n) {
                out.push((n, self.text(value, regex)?));
            }
        }
        Some(out)
    }

    fn header_pair(&mut self, name: &str, value: &str) -> Option<(HeaderName, HeaderValue)> {
        let pair = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        );
        if let (Ok(n), Ok(v)) = pair {
            return Some((n, v));
        }
        problem!(
            self,
            "invalid header {name:?}: {value:?} in a header modifier, skipped"
        );
        None
    }

    /// A Service reference; `Err(weight)` when it cannot be used (its share then fails).
    fn backend(&mut self, r: RefParts<'_>, weight: Option<i32>) -> Result<BackendTarget, u32> {
        let (name, weight) = (r.name, weight.unwrap_or(1));
        let w = u32::try_from(weight).unwrap_or_else(|_| {
            problem!(self, "backend {name} has negative weight {weight}, using 0");
            0
        });
        if !is_core_service(r.group, r.kind.or(Some("Service"))) {
            let (g, k) = (r.group.unwrap_or(""), r.kind.unwrap_or(""));
            problem!(
                self,
                "backend {name} is a {g}/{k}, only Services are supported; \
                 its share of requests gets 500"
            );
            return Err(w);
        }
        let port = match r.port.map(u16::try_from) {
            None => None,
            Some(Ok(port)) if port != 0 => Some(port),
            Some(_) => {
                problem!(
                    self,
                    "backend {name} has invalid port {}; its share of requests gets 500",
                    r.port.unwrap_or_default()
                );
                return Err(w);
            }
        };
        let namespace = r.namespace.unwrap_or(&self.namespace).to_owned();
        let service = ServiceRef {
            namespace,
            name: name.to_owned(),
        };
        Ok(BackendTarget {
            service,
            port,
            weight: w,
        })
    }

    fn backends<'b>(
        &mut self,
        a: &mut RuleAction,
        refs: impl Iterator<Item = (RefParts<'b>, Option<i32>, bool)>,
    ) {
        for (r, weight, has_filters) in refs {
            if has_filters {
                problem!(
                    self,
                    "backend {}: per-backend filters are not supported, ignored",
                    r.name
                );
            }
            match self.backend(r, weight) {
                Ok(b) => a.backends.push(b),
                Err(w) => a.invalid_weight = a.invalid_weight.saturating_add(w),
            }
        }
    }

    fn mirror(
        &mut self,
        a: &mut RuleAction,
        r: RefParts<'_>,
        fraction: Option<(i32, Option<i32>)>,
        percent: Option<i32>,
    ) {
        let fraction = fraction.map(|(n, d)| (n, d.unwrap_or(100)));
        let (num, den) = fraction.or(percent.map(|n| (n, 100))).unwrap_or((1, 1));
        match (u32::try_from(num), u32::try_from(den)) {
            (Ok(numerator), Ok(denominator)) if numerator <= denominator && denominator > 0 => {
                if let Ok(target) = self.backend(r, Some(1)) {
                    a.mirror.push(Mirror {
                        target,
                        numerator,
                        denominator,
                    });
                }
            }
            _ => problem!(
                self,
                "mirror to {}: invalid fraction {num}/{den}, mirror dropped",
                r.name
            ),
        }
    }

    fn action(&self, name: Option<&String>) -> RuleAction {
        let (edits, route) = (HeaderEdits::default(), self.route.clone());
        RuleAction {
            route,
            kind: self.kind,
            rule: self.rule,
            rule_name: name.cloned(),
            matched_prefix: None,
            backends: Vec::new(),
            invalid_weight: 0,
            request_headers: edits.clone(),
            response_headers: edits,
            redirect: None,
            rewrite: None,
            mirror: Vec::new(),
            request_timeout: None,
            backend_timeout: None,
        }
    }

    fn timeout(&mut self, what: &str, value: Option<&str>) -> Option<Duration> {
        let v = value?;
        match parse_duration(v) {
            Ok(d) if d.is_zero() => None, // "0s" disables the timeout (spec)
            Ok(d) => Some(d),
            Err(e) => {
                problem!(
                    self,
                    "timeouts.{what} {v:?} is not a duration like 10s or 1m30s ({e}); ignored"
                );
                None
            }
        }
    }

    fn push(&mut self, action: &RuleAction, index: usize, cond: Cond, specificity: [usize; 5]) {
        let mut action = action.clone();
        action.matched_prefix = cond.prefix().map(str::to_owned);
        let rewrite = action.rewrite.as_ref().and_then(|r| r.path.as_ref());
        let redirect = action.redirect.as_ref().and_then(|r| r.path.as_ref());
        let by_prefix =
            |m: Option<&PathModifier>| matches!(m, Some(PathModifier::ReplacePrefixMatch(_)));
        if action.matched_prefix.is_none() && (by_prefix(rewrite) || by_prefix(redirect)) {
            problem!(
                self,
                "match {index}: ReplacePrefixMatch needs a PathPrefix match; path left unchanged"
            );
        }
        let rank = Rank {
            specificity: Reverse(specificity),
            created: (self.created.is_none(), self.created),
            route: self.route.clone(),
            rule: self.rule,
            index,
        };
        self.entries.push(Entry { rank, cond, action });
    }
}

fn path_modifier(
    full: Option<&String>,
    prefix: Option<&String>,
    is_full: bool,
) -> Option<PathModifier> {
    if is_full {
        full.map(|f| PathModifier::ReplaceFullPath(f.clone()))
    } else {
        prefix.map(|f| PathModifier::ReplacePrefixMatch(f.clone()))
    }
}

fn http_rule(cx: &mut Compiler<'_>, rule: &HttpRouteRules) {
    use HttpRouteRulesFiltersType as T;
    let mut a = cx.action(rule.name.as_ref());
    let refs = rule.backend_refs.iter().flatten();
    cx.backends(
        &mut a,
        refs.map(|b| {
            (
                b.ref_parts(),
                b.weight,
                b.filters.as_ref().is_some_and(|f| !f.is_empty()),
            )
        }),
    );
    for f in rule.filters.iter().flatten() {
        match f.r#type {
            T::RequestHeaderModifier => with_config!(cx, f, request_header_modifier, |m| edits!(
                cx,
                a.request_headers,
                m
            )),
            T::ResponseHeaderModifier => with_config!(cx, f, response_header_modifier, |m| edits!(
                cx,
                a.response_headers,
                m
            )),
            T::RequestMirror => with_config!(cx, f, request_mirror, |m| mirror!(cx, a, m)),
            T::RequestRedirect => with_config!(cx, f, request_redirect, |r| a.redirect =
                Some(redirect(cx, r))),
            T::UrlRewrite => with_config!(cx, f, url_rewrite, |r| {
                let path = r.path.as_ref().and_then(|m| {
                    let full = m.r#type == HttpRouteRulesFiltersUrlRewritePathType::ReplaceFullPath;
                    path_modifier(
                        m.replace_full_path.as_ref(),
                        m.replace_prefix_match.as_ref(),
                        full,
                    )
                });
                a.rewrite = Some(Rewrite {
                    hostname: r.hostname.clone(),
                    path,
                });
            }),
            T::ExtensionRef | T::Cors => {
                problem!(
                    cx,
                    "filter {} is not supported, ignored",
                    type_name(&f.r#type)
                );
            }
        }
    }
    if a.redirect.is_some() && (a.rewrite.is_some() || !a.backends.is_empty()) {
        cx.problem(
            "RequestRedirect cannot be combined with URLRewrite or backendRefs; the redirect wins",
        );
    }
    if let Some(t) = &rule.timeouts {
        a.request_timeout = cx.timeout("request", t.request.as_deref());
        a.backend_timeout = cx.timeout("backendRequest", t.backend_request.as_deref());
        if let (Some(req), Some(be)) = (a.request_timeout, a.backend_timeout)
            && be > req
        {
            cx.problem("timeouts.backendRequest is longer than timeouts.request and never fires");
        }
    }
    let default = [HttpRouteRulesMatches::default()];
    let matches = rule.matches.as_deref().filter(|m| !m.is_empty());
    for (mi, m) in matches.unwrap_or(&default).iter().enumerate() {
        if let Some((cond, spec)) = http_cond(cx, m) {
            cx.push(&a, mi, cond, spec);
        }
    }
}

fn redirect(cx: &mut Compiler<'_>, r: &HttpRouteRulesFiltersRequestRedirect) -> Redirect {
    use HttpRouteRulesFiltersRequestRedirectScheme as S;
    let status = match r.status_code.unwrap_or(302) {
        s @ (301 | 302 | 303 | 307 | 308) => u16::try_from(s).unwrap_or(302),
        s => {
            problem!(
                cx,
                "redirect status {s} is not 301/302/303/307/308, using 302"
            );
            302
        }
    };
    let port = r
        .port
        .and_then(|v| u16::try_from(v).ok().filter(|p| *p != 0));
    if r.port.is_some() && port.is_none() {
        problem!(
            cx,
            "redirect port {} is out of range, ignored",
            r.port.unwrap_or_default()
        );
    }
    let path = r.path.as_ref().and_then(|m| {
        let full = m.r#type == HttpRouteRulesFiltersRequestRedirectPathType::ReplaceFullPath;
        path_modifier(
            m.replace_full_path.as_ref(),
            m.replace_prefix_match.as_ref(),
            full,
        )
    });
    let scheme = r.scheme.as_ref().map(|s| match s {
        S::Http => "http".to_owned(),
        S::Https => "https".to_owned(),
    });
    Redirect {
        scheme,
        hostname: r.hostname.clone(),
        path,
        port,
        status,
    }
}

fn http_cond(cx: &mut Compiler<'_>, m: &HttpRouteRulesMatches) -> Option<(Cond, [usize; 5])> {
    use HttpRouteRulesMatchesMethod as M;
    use HttpRouteRulesMatchesPathType as P;
    let value = m
        .path
        .as_ref()
        .and_then(|p| p.value.as_deref())
        .unwrap_or("/");
    let (path, class, len) = match m.path.as_ref().and_then(|p| p.r#type.as_ref()) {
        Some(P::Exact) => (PathMatch::Exact(value.to_owned()), 2, value.len()),
        None | Some(P::PathPrefix) => {
            let v = value.trim_end_matches('/');
            (PathMatch::Prefix(v.to_owned()), 1, v.len())
        }
        Some(P::RegularExpression) => (PathMatch::Regex(cx.regex(value)?), 0, 0),
    };
    let re = |t: Option<&HttpRouteRulesMatchesHeadersType>| {
        t == Some(&HttpRouteRulesMatchesHeadersType::RegularExpression)
    };
    let headers = m
        .headers
        .iter()
        .flatten()
        .map(|h| (h.name.as_str(), h.value.as_str(), re(h.r#type.as_ref())));
    let headers = cx.headers(headers)?;
    let mut query: Vec<(String, Text)> = Vec::new();
    for q in m.query_params.iter().flatten() {
        if !query.iter().any(|(n, _)| *n == q.name) {
            let re = q.r#type == Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression);
            query.push((q.name.clone(), cx.text(&q.value, re)?));
        }
    }
    let method = m.method.as_ref().map(|x| match x {
        M::Get => Method::GET,
        M::Head => Method::HEAD,
        M::Post => Method::POST,
        M::Put => Method::PUT,
        M::Delete => Method::DELETE,
        M::Connect => Method::CONNECT,
        M::Options => Method::OPTIONS,
        M::Trace => Method::TRACE,
        M::Patch => Method::PATCH,
    });
    let spec = [
        class,
        len,
        usize::from(method.is_some()),
        headers.len(),
        query.len(),
    ];
    Some((
        Cond::Http {
            path,
            method,
            headers,
            query,
        },
        spec,
    ))
}

fn grpc_rule(cx: &mut Compiler<'_>, rule: &GrpcRouteRules) {
    use GrpcRouteRulesFiltersType as T;
    let mut a = cx.action(rule.name.as_ref());
    let refs = rule.backend_refs.iter().flatten();
    cx.backends(
        &mut a,
        refs.map(|b| {
            (
                b.ref_parts(),
                b.weight,
                b.filters.as_ref().is_some_and(|f| !f.is_empty()),
            )
        }),
    );
    for f in rule.filters.iter().flatten() {
        match f.r#type {
            T::RequestHeaderModifier => with_config!(cx, f, request_header_modifier, |m| edits!(
                cx,
                a.request_headers,
                m
            )),
            T::ResponseHeaderModifier => with_config!(cx, f, response_header_modifier, |m| edits!(
                cx,
                a.response_headers,
                m
            )),
            T::RequestMirror => with_config!(cx, f, request_mirror, |m| mirror!(cx, a, m)),
            T::ExtensionRef => cx.problem("filter ExtensionRef is not supported, ignored"),
        }
    }
    let default = [GrpcRouteRulesMatches::default()];
    let matches = rule.matches.as_deref().filter(|m| !m.is_empty());
    'matches: for (mi, m) in matches.unwrap_or(&default).iter().enumerate() {
        let (mut service, mut method) = (None, None);
        if let Some(mm) = &m.method {
            let re = mm.r#type == Some(GrpcRouteRulesMatchesMethodType::RegularExpression);
            if mm.service.is_none() && mm.method.is_none() {
                problem!(
                    cx,
                    "match {mi}: a method match needs service or method; treated as absent"
                );
            }
            for (v, slot) in [(&mm.service, &mut service), (&mm.method, &mut method)] {
                if let Some(v) = v {
                    let Some(t) = cx.text(v, re) else {
                        continue 'matches;
                    };
                    *slot = Some(t);
                }
            }
        }
        let re = |t: Option<&GrpcRouteRulesMatchesHeadersType>| {
            t == Some(&GrpcRouteRulesMatchesHeadersType::RegularExpression)
        };
        let headers = m
            .headers
            .iter()
            .flatten()
            .map(|h| (h.name.as_str(), h.value.as_str(), re(h.r#type.as_ref())));
        let Some(headers) = cx.headers(headers) else {
            continue;
        };
        let class = |t: &Option<Text>| match t {
            Some(Text::Exact(_)) => 2,
            Some(Text::Regex(_)) => 1,
            None => 0,
        };
        let spec = [class(&service), class(&method), headers.len(), 0, 0];
        cx.push(
            &a,
            mi,
            Cond::Grpc {
                service,
                method,
                headers,
            },
            spec,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use gateway_api::httproutes::{
        HttpRouteParentRefs, HttpRouteRulesMatchesHeaders, HttpRouteRulesMatchesQueryParams,
    };
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
        compile(&svc(), 80, &[http("r", None, rules)], &[])
    }

    fn table(http: &[HttpRoute]) -> RouteTable {
        let c = compile(&svc(), 80, http, &[]);
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
        let c = compile(&svc(), 80, &[http("h", None, "[{}]")], &[grpc]);
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
            attaches(ns, Some(refs.as_slice()), &s, port)
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
        assert!(!attaches::<HttpRouteParentRefs>("ns", None, &s, 80));

        let routes = [
            http("producer", None, "[{}]"),
            http_in("client", "consumer", None, "[{}]"),
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
        let c = compile(&svc(), 80, &[], &[serde_saphyr::from_str(grpc).unwrap()]);
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
        let c = compile(&s, 9080, &[again], &[]);
        assert_eq!(
            c.problems,
            ["HTTPRoute shop/reviews rule 1: filter CORS is not supported, ignored"]
        );
        assert!(compile(&s, 9081, &[route], &[]).table.is_empty()); // port-restricted parentRef

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
            let c = compile(&svc(), 80, &routes, &[]);
            prop_assert!(c.problems.is_empty(), "{:?}", c.problems);
            let pq = query.map_or(path.to_owned(), |q| format!("{path}?{q}"));
            let got = select(&c.table, method, &pq, &headers).map(|a| (a.route.clone(), a.rule));
            prop_assert_eq!(got, reference(&routes, method, path, query, &headers));
        }
    }
}
