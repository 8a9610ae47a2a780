//! What a matched rule does: header edits, path rewrites, redirects, mirrors, the weighted
//! backend choice.
use std::{borrow::Cow, time::Duration};

use hyper::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};

use super::{BackendTarget, RouteKind};

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

pub(super) fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// `host[:port]` or `[v6]:port` into host and port.
pub(super) fn split_authority(authority: &str) -> (&str, Option<u16>) {
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
pub(super) fn scale(rng_value: u32, total: u64) -> u64 {
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
