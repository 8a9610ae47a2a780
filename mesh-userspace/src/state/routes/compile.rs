//! Compiling Gateway API routes into a Service port's route table: validation of each route's
//! matches, filters and backends (with problems reported, never a panic), then the entries.
use std::{cmp::Reverse, time::Duration};

use gateway_api::{
    grpcroutes::{
        GrpcRouteRules, GrpcRouteRulesFiltersType, GrpcRouteRulesMatches,
        GrpcRouteRulesMatchesHeadersType, GrpcRouteRulesMatchesMethodType,
    },
    httproutes::{
        HttpRouteRules, HttpRouteRulesFiltersRequestRedirect,
        HttpRouteRulesFiltersRequestRedirectPathType, HttpRouteRulesFiltersRequestRedirectScheme,
        HttpRouteRulesFiltersType, HttpRouteRulesFiltersUrlRewritePathType, HttpRouteRulesMatches,
        HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesMethod,
        HttpRouteRulesMatchesPathType, HttpRouteRulesMatchesQueryParamsType,
    },
};
use hyper::http::{HeaderName, HeaderValue, Method};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::ObjectMeta, jiff::Timestamp};
use regex::{Regex, RegexBuilder};
use serde::Serialize;

use crate::api::refs::{AsRefParts, RefParts};
use crate::api::{is_core_service, parse_duration};
use crate::state::ServiceRef;

use super::{
    BackendTarget, Cond, Entry, HeaderEdits, Mirror, PathMatch, PathModifier, Rank, Redirect,
    Rewrite, RouteKind, RuleAction, Text,
};

pub(super) fn namespace(m: &ObjectMeta) -> &str {
    m.namespace.as_deref().unwrap_or("default")
}

pub(super) fn route_name(m: &ObjectMeta) -> String {
    format!("{}/{}", namespace(m), m.name.as_deref().unwrap_or(""))
}

macro_rules! problem {
    ($cx:expr, $($fmt:tt)*) => { $cx.problem(&format!($($fmt)*)) };
}

/// A filter type as spelled in YAML (`URLRewrite`, not `UrlRewrite`).
pub(super) fn type_name<T: Serialize>(t: &T) -> String {
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

/// What a rule of either route kind does the same way: its backendRefs, then its filters, the
/// header modifiers and mirrors here, the kind's own filter types by the arms in `$arms`.
macro_rules! rule_parts {
    ($cx:expr, $a:ident, $rule:expr, $T:ident, |$f:ident| { $($arms:tt)* }) => {{
        let refs = $rule.backend_refs.iter().flatten();
        $cx.backends(
            &mut $a,
            refs.map(|b| {
                let has_filters = b.filters.as_ref().is_some_and(|f| !f.is_empty());
                (b.ref_parts(), b.weight, has_filters)
            }),
        );
        for $f in $rule.filters.iter().flatten() {
            match $f.r#type {
                $T::RequestHeaderModifier => {
                    with_config!($cx, $f, request_header_modifier, |m| edits!(
                        $cx,
                        $a.request_headers,
                        m
                    ));
                }
                $T::ResponseHeaderModifier => {
                    with_config!($cx, $f, response_header_modifier, |m| edits!(
                        $cx,
                        $a.response_headers,
                        m
                    ));
                }
                $T::RequestMirror => with_config!($cx, $f, request_mirror, |m| mirror!($cx, $a, m)),
                $($arms)*
            }
        }
    }};
}

/// Compiles the rules of one route into entries; `rule` is the rule being compiled.
pub(super) struct Compiler<'c> {
    pub(super) kind: RouteKind,
    pub(super) route: String,
    pub(super) namespace: String,
    pub(super) created: Option<Timestamp>,
    pub(super) rule: usize,
    pub(super) problems: &'c mut Vec<String>,
    pub(super) entries: &'c mut Vec<Entry>,
}

impl<'c> Compiler<'c> {
    pub(super) fn new(
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

pub(super) fn path_modifier(
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

pub(super) fn http_rule(cx: &mut Compiler<'_>, rule: &HttpRouteRules) {
    use HttpRouteRulesFiltersType as T;
    let mut a = cx.action(rule.name.as_ref());
    rule_parts!(cx, a, rule, T, |f| {
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
    });
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

pub(super) fn redirect(
    cx: &mut Compiler<'_>,
    r: &HttpRouteRulesFiltersRequestRedirect,
) -> Redirect {
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

pub(super) fn http_cond(
    cx: &mut Compiler<'_>,
    m: &HttpRouteRulesMatches,
) -> Option<(Cond, [usize; 5])> {
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

pub(super) fn grpc_rule(cx: &mut Compiler<'_>, rule: &GrpcRouteRules) {
    use GrpcRouteRulesFiltersType as T;
    let mut a = cx.action(rule.name.as_ref());
    rule_parts!(cx, a, rule, T, |f| {
        T::ExtensionRef => cx.problem("filter ExtensionRef is not supported, ignored"),
    });
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
