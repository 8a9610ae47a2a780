//! Live events: what `weft tap` streams and `weft top` tallies. The kernel's flow events (a
//! connection opened with its verdict, closed with its bytes and duration, refused, moved off
//! the fast path) and the L7 engine's requests meet in one [`Hub`]; the admin API's `/tap`
//! streams them, filtered, as JSON lines.
//!
//! Nothing is produced while nobody watches: the kernel writes events only while the hub has a
//! subscriber (the agent sets a flag in the datapath's configuration), and the engine checks
//! [`Hub::watching`] before it builds one. A subscriber that reads too slowly misses events and
//! is told how many ([`What::Lost`]), as it is when the kernel's ring buffer was full.
use std::{net::Ipv4Addr, sync::Arc};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// One end of an event's connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// `namespace/name` of the workload, when the address is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// 0 when not known (a refused `connect()` has no source port yet).
    #[serde(default)]
    pub port: u16,
}

/// An event, as `/tap` streams it (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    #[serde(default)]
    pub src: Endpoint,
    #[serde(default)]
    pub dst: Endpoint,
    /// `namespace/name:port` when the client connected to a service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(flatten)]
    pub what: What,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum What {
    /// A connection was established (kernel).
    Open {
        verdict: String,
        reason: String,
        path: String,
    },
    /// A connection closed (kernel): payload bytes each way, of them socket to socket.
    Close {
        verdict: String,
        path: String,
        bytes_to_dst: u64,
        bytes_to_src: u64,
        fast_bytes: u64,
        duration_ms: f64,
    },
    /// `connect()` was refused (verdict `DENY`), or a dry-run policy would have refused it
    /// (`AUDIT`, allowed).
    Deny { verdict: String, reason: String },
    /// A socket left the fast path for the normal stack, for good.
    Shed { reason: String },
    /// The L7 engine answered a request.
    Request {
        method: String,
        path: String,
        route: String,
        status: u16,
        duration_ms: f64,
    },
    /// Events this stream did not get: the kernel's buffer was full, or the reader was slow.
    Lost { events: u64, reason: String },
}

impl Event {
    /// The event's type, as in its JSON (`open`, `close`, `deny`, `shed`, `request`, `lost`).
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self.what {
            What::Open { .. } => "open",
            What::Close { .. } => "close",
            What::Deny { .. } => "deny",
            What::Shed { .. } => "shed",
            What::Request { .. } => "request",
            What::Lost { .. } => "lost",
        }
    }

    /// The flow's verdict (`FAST`, `L7`, `PASS`, `DENY`, `AUDIT`); a request's is `L7`.
    #[must_use]
    pub fn verdict(&self) -> Option<&str> {
        match &self.what {
            What::Open { verdict, .. }
            | What::Close { verdict, .. }
            | What::Deny { verdict, .. } => Some(verdict),
            What::Request { .. } => Some("L7"),
            What::Shed { .. } | What::Lost { .. } => None,
        }
    }
}

/// Milliseconds since the Unix epoch, now.
#[must_use]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How many events wait for a slow subscriber before it starts missing some.
const BACKLOG: usize = 4096;

/// Where events meet and subscribers take them.
#[derive(Debug)]
pub struct Hub {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Hub {
    /// Whether anyone watches (producers build no event otherwise).
    #[must_use]
    pub fn watching(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    pub fn publish(&self, event: Event) {
        // No subscriber: nobody to tell.
        let _ = self.tx.send(Arc::new(event));
    }

    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }
}

/// Which events a subscriber wants; every field set must match. The same names are the query
/// parameters of `/tap` and the options of `weft tap`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Either end's workload, or the service, is in this namespace.
    pub namespace: Option<String>,
    /// Either end is this pod (`namespace/name`, or `name`).
    pub pod: Option<String>,
    /// The connection or request went to this service (`namespace/name`, or `name`).
    pub service: Option<String>,
    /// `FAST`, `L7`, `PASS`, `DENY` or `AUDIT`.
    pub verdict: Option<String>,
    /// Requests only, with this status: `503`, or a class as `5xx`.
    pub status: Option<String>,
    /// `open`, `close`, `deny`, `shed` or `request`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

const KINDS: [&str; 5] = ["open", "close", "deny", "shed", "request"];
const VERDICTS: [&str; 5] = ["FAST", "L7", "PASS", "DENY", "AUDIT"];

impl Filter {
    /// Parses `/tap`'s query string.
    ///
    /// # Errors
    /// An unknown parameter, or a value that can never match, says which.
    pub fn from_query(query: &str) -> Result<Self, String> {
        let mut f = Self::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let value = value.into_owned();
            let slot = match key.as_ref() {
                "namespace" => &mut f.namespace,
                "pod" => &mut f.pod,
                "service" => &mut f.service,
                "verdict" => &mut f.verdict,
                "status" => &mut f.status,
                "type" => &mut f.kind,
                other => {
                    return Err(format!(
                        "unknown filter {other:?}: use namespace, pod, service, verdict, status or type"
                    ));
                }
            };
            *slot = Some(value);
        }
        f.check()?;
        Ok(f)
    }

    /// Rejects values that can never match.
    ///
    /// # Errors
    /// Says which value and what is allowed.
    pub fn check(&self) -> Result<(), String> {
        if let Some(v) = &self.verdict
            && !VERDICTS.iter().any(|k| k.eq_ignore_ascii_case(v))
        {
            return Err(format!("verdict {v:?}: one of {}", VERDICTS.join(", ")));
        }
        if let Some(k) = &self.kind
            && !KINDS.contains(&k.as_str())
        {
            return Err(format!("type {k:?}: one of {}", KINDS.join(", ")));
        }
        if let Some(s) = &self.status
            && status_matcher(s).is_none()
        {
            return Err(format!("status {s:?}: a code (503) or a class (5xx)"));
        }
        Ok(())
    }

    /// The query string `from_query` reads back.
    #[must_use]
    pub fn to_query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (key, value) in [
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("service", &self.service),
            ("verdict", &self.verdict),
            ("status", &self.status),
            ("type", &self.kind),
        ] {
            if let Some(v) = value {
                q.append_pair(key, v);
            }
        }
        q.finish()
    }

    /// Whether `event` passes. Lost-event notices always do: a reader must know it missed some.
    #[must_use]
    pub fn keeps(&self, event: &Event) -> bool {
        if matches!(event.what, What::Lost { .. }) {
            return true;
        }
        let workloads = [&event.src.workload, &event.dst.workload];
        let service = event
            .service
            .as_deref()
            .map(|s| s.rsplit_once(':').map_or(s, |(name, _)| name));
        let named = |want: &str, key: Option<&str>| {
            key.is_some_and(|k| k == want || k.split_once('/').is_some_and(|(_, n)| n == want))
        };
        if let Some(ns) = &self.namespace {
            let in_ns = |k: Option<&str>| {
                k.and_then(|k| k.split_once('/'))
                    .is_some_and(|(n, _)| n == ns)
            };
            if !workloads.iter().any(|w| in_ns(w.as_deref())) && !in_ns(service) {
                return false;
            }
        }
        if let Some(pod) = &self.pod
            && !workloads.iter().any(|w| named(pod, w.as_deref()))
        {
            return false;
        }
        if let Some(svc) = &self.service
            && !named(svc, service)
        {
            return false;
        }
        if let Some(v) = &self.verdict
            && !event
                .verdict()
                .is_some_and(|have| have.eq_ignore_ascii_case(v))
        {
            return false;
        }
        if let Some(k) = &self.kind
            && event.kind() != k
        {
            return false;
        }
        if let Some(s) = &self.status {
            let What::Request { status, .. } = event.what else {
                return false;
            };
            if !status_matcher(s).is_some_and(|m| m(status)) {
                return false;
            }
        }
        true
    }
}

/// `503` matches that code, `5xx` the class.
fn status_matcher(s: &str) -> Option<impl Fn(u16) -> bool> {
    let s = s.to_ascii_lowercase();
    let (class, exact) = match s.as_bytes() {
        [c @ b'1'..=b'5', b'x', b'x'] => (Some(u16::from(c - b'0')), None),
        _ => (
            None,
            Some(s.parse::<u16>().ok().filter(|c| (100..600).contains(c))?),
        ),
    };
    Some(move |code: u16| class.map_or(exact == Some(code), |c| code / 100 == c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(src: &str, service: &str, status: u16) -> Event {
        Event {
            time_ms: 1,
            src: Endpoint {
                workload: Some(src.into()),
                ip: None,
                port: 4000,
            },
            dst: Endpoint::default(),
            service: Some(service.into()),
            what: What::Request {
                method: "GET".into(),
                path: "/".into(),
                route: "default".into(),
                status,
                duration_ms: 1.0,
            },
        }
    }

    #[test]
    fn filters_match_names_namespaces_verdicts_and_status_classes() {
        let e = request("shop/client", "shop/web:80", 503);
        let f = |q: &str| Filter::from_query(q).unwrap().keeps(&e);
        assert!(f(""));
        assert!(f(
            "namespace=shop&pod=client&service=web&verdict=l7&status=5xx&type=request"
        ));
        assert!(f("pod=shop/client") && f("service=shop/web") && f("status=503"));
        assert!(!f("namespace=other") && !f("pod=web") && !f("service=client"));
        assert!(!f("status=4xx") && !f("status=500") && !f("verdict=FAST") && !f("type=open"));
        // Lost notices pass any filter.
        let lost = Event {
            what: What::Lost {
                events: 3,
                reason: "slow".into(),
            },
            ..e
        };
        assert!(
            Filter::from_query("pod=nobody&status=200")
                .unwrap()
                .keeps(&lost)
        );
    }

    #[test]
    fn bad_filters_say_why_and_queries_round_trip() {
        for bad in [
            "colour=red",
            "verdict=MAYBE",
            "status=abc",
            "status=7xx",
            "type=flow",
        ] {
            assert!(Filter::from_query(bad).is_err(), "{bad}");
        }
        let f = Filter {
            namespace: Some("a b".into()),
            status: Some("5xx".into()),
            ..Filter::default()
        };
        assert_eq!(Filter::from_query(&f.to_query()).unwrap(), f);
    }

    #[test]
    fn events_serialize_with_their_type_and_read_back() {
        let e = request("shop/client", "shop/web:80", 200);
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.contains(r#""type":"request""#), "{line}");
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e);
    }
}
