//! What `weft-workload` prints: one JSON object per line, the last one being the result. The
//! binary serialises these types and the testbed deserialises them, so both sides agree.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// First line of `server`: where it accepts connections (the real port when asked for port 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listening {
    pub listening: String,
}

/// First line of `hold`: all connections are open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub ready: u32,
}

/// Result of `server` (printed only if it stops on its own, at its time or connection limit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerReport {
    pub accepted: u64,
    pub accept_errors: u64,
    /// Connections that ended with an IO error (e.g. reset by the peer).
    pub conn_errors: u64,
    /// Bytes received over all connections.
    pub bytes: u64,
}

/// Result of `transfer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferReport {
    pub conns: u32,
    pub ok: u32,
    pub failed: u32,
    pub bytes_sent: u64,
    /// Echoed bytes that matched what was sent.
    pub bytes_verified: u64,
    /// The first few errors, prefixed with the connection index.
    pub errors: Vec<String>,
}

impl TransferReport {
    #[must_use]
    pub fn all_ok(&self) -> bool {
        self.conns > 0 && self.ok == self.conns && self.failed == 0
    }
}

/// Result of `reset`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetReport {
    pub ok: bool,
    pub sent: u64,
    pub error: Option<String>,
}

/// Result of `hold`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReport {
    pub conns: u32,
    pub rounds: u64,
    /// Connections that saw an IO error or a wrong echo (each counted once).
    pub broken: u32,
    pub errors: Vec<String>,
}

/// Result of `connect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectReport {
    pub ok: bool,
    /// The connect error's errno (e.g. 1 EPERM for a policy denial, 111 ECONNREFUSED).
    pub errno: Option<i32>,
    pub error: Option<String>,
    /// No answer within the timeout (no errno: the client gave up).
    pub timed_out: bool,
    /// What `getpeername()` says after a successful connect (a service VIP stays the VIP).
    #[serde(default)]
    pub peer: Option<String>,
    pub elapsed_us: u64,
}

/// Result of `rr`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RrReport {
    pub size: usize,
    pub transactions: u64,
    pub secs: f64,
    pub tps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub error: Option<String>,
}

/// Result of `stream`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamReport {
    pub bytes: u64,
    /// What the sink server counted; equals `bytes` when all arrived.
    pub server_bytes: Option<u64>,
    pub secs: f64,
    pub gbps: f64,
    pub ok: bool,
    pub error: Option<String>,
}
