//! Matching a request against the compiled entries: paths, headers, query parameters,
//! methods, gRPC services and methods, and the spec's precedence between entries.
use std::{borrow::Cow, cmp::Reverse};

use hyper::http::{HeaderMap, HeaderName, Method};
use k8s_openapi::jiff::Timestamp;
use regex::Regex;

use super::{RequestView, RuleAction};

#[derive(Clone, Debug)]
pub(super) enum Text {
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
pub(super) enum PathMatch {
    Exact(String),
    /// Without trailing slash; "" for "/".
    Prefix(String),
    Regex(Regex),
}

#[derive(Clone, Debug)]
pub(super) enum Cond {
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

pub(super) fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

pub(super) fn headers_match(want: &[(HeaderName, Text)], have: &HeaderMap) -> bool {
    want.iter().all(|(n, t)| {
        have.get(n)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .is_some_and(|v| t.matches(v))
    })
}

pub(super) fn percent_decode(s: &str) -> Cow<'_, str> {
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
pub(super) fn query_value<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

impl Cond {
    pub(super) fn matches(&self, req: &RequestView<'_>, grpc: Option<(&str, &str)>) -> bool {
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

    pub(super) fn prefix(&self) -> Option<&str> {
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
pub(super) struct Rank {
    pub(super) specificity: Reverse<[usize; 5]>,
    pub(super) created: (bool, Option<Timestamp>),
    pub(super) route: String,
    pub(super) rule: usize,
    pub(super) index: usize,
}

#[derive(Clone, Debug)]
pub(super) struct Entry {
    pub(super) rank: Rank,
    pub(super) cond: Cond,
    pub(super) action: RuleAction,
}
