//! The user's side: `weft flows`, `weft status`, `weft fastpath`, `weft jwt`, `weft check`. Output here is the CLI's own,
//! printed to stdout.
#![allow(clippy::print_stdout, reason = "the CLI's output is its product")]

pub mod args;
pub mod check;
pub mod jwt;
pub mod run;
pub mod tap;
pub mod ui;

/// Writes a secret (a private key) readable by its owner only (mode 0600). Without
/// `overwrite` an existing file is an error (`AlreadyExists`): a key is never replaced by
/// accident.
///
/// # Errors
/// When the file cannot be created or written.
pub fn write_private(path: &Path, text: &str, overwrite: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    std::io::Write::write_all(&mut options.open(path)?, text.as_bytes())
}

use std::{fmt::Write as _, path::Path};

use crate::{
    admin::Status,
    flows::{FlowSnapshot, FlowView},
};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Agent(std::io::Error),
    #[error("the agent answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("unexpected answer from the agent: {0}")]
    Decode(serde_json::Error),
    #[error(transparent)]
    Datapath(#[from] crate::ebpf::EbpfError),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{0}")]
    Usage(String),
}

fn fetch(socket: &Path, path: &str) -> Result<bytes::Bytes, CliError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let (status, body) = rt
        .block_on(crate::agent_client::get(socket, path))
        .map_err(CliError::Agent)?;
    if !status.is_success() {
        return Err(CliError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(body)
}

/// Which rows `weft flows` shows.
#[derive(Debug, Default, Clone)]
pub struct FlowFilter {
    /// `namespace/name` or a bare name, matched against either end.
    pub workload: Option<String>,
    pub verdict: Option<String>,
}

impl FlowFilter {
    fn keeps(&self, f: &FlowView) -> bool {
        let names = |w: &str| {
            self.workload
                .as_deref()
                .is_none_or(|want| w == want || w.rsplit('/').next() == Some(want))
        };
        let workload_ok = self.workload.is_none()
            || [&f.src.workload, &f.dst.workload]
                .into_iter()
                .flatten()
                .any(|w| names(w));
        let verdict_ok = self.verdict.as_deref().is_none_or(|v| f.verdict == v);
        workload_ok && verdict_ok
    }

    pub fn apply(&self, snap: &mut FlowSnapshot) {
        for rows in [&mut snap.live, &mut snap.recent, &mut snap.denied] {
            rows.retain(|f| self.keeps(f));
        }
    }
}

pub fn flows(socket: &Path, json: bool, filter: &FlowFilter) -> Result<(), CliError> {
    let body = fetch(socket, "/flows")?;
    let mut all: FlowsWithL7 = serde_json::from_slice(&body).map_err(CliError::Decode)?;
    filter.apply(&mut all.flows);
    let keep = |f: &crate::proxy::L7Flow| {
        filter.verdict.as_deref().is_none_or(|v| v == "L7")
            && filter
                .workload
                .as_deref()
                .is_none_or(|w| f.source == w || f.source.rsplit('/').next() == Some(w))
    };
    all.l7.live.retain(keep);
    all.l7.recent.retain(keep);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).map_err(CliError::Decode)?
        );
    } else {
        print!("{}", render_flows(&all.flows));
        print!("{}", render_l7(&all.l7));
    }
    Ok(())
}

/// `/flows`: the kernel's table and the engine's connections.
#[derive(serde::Serialize, serde::Deserialize)]
struct FlowsWithL7 {
    #[serde(flatten)]
    flows: FlowSnapshot,
    #[serde(default)]
    l7: crate::proxy::L7Flows,
}

/// The L7 engine's connections: protocol, requests and the routes they took.
#[must_use]
pub fn render_l7(l7: &crate::proxy::L7Flows) -> String {
    use std::fmt::Write as _;
    if l7.live.is_empty() && l7.recent.is_empty() && l7.denied.is_empty() {
        return String::new();
    }
    let mut out = String::from("\nL7 ENGINE  SOURCE → DESTINATION  PROTOCOL  REQUESTS  ROUTES\n");
    for (state, f) in l7
        .live
        .iter()
        .map(|f| ("open", f))
        .chain(l7.recent.iter().map(|f| ("closed", f)))
    {
        let routes: Vec<String> = f.routes.iter().map(|(r, n)| format!("{r}×{n}")).collect();
        let proto = match &f.sni {
            Some(sni) => format!("{} (sni {sni})", f.protocol),
            None => f.protocol.clone(),
        };
        let _ = writeln!(
            out,
            "{state:<10} {} ({}) → {}  {proto}  {}  {}",
            f.source,
            f.client,
            f.destination,
            f.requests,
            routes.join(", ")
        );
    }
    if !l7.denied.is_empty() {
        out.push_str("\nREFUSED BY THE ENGINE  SOURCE → DESTINATION  COUNT  RULE\n");
        for d in &l7.denied {
            let what = if d.mode == "dry_run" {
                "would refuse (dry run)"
            } else {
                "refused"
            };
            let _ = writeln!(
                out,
                "{what:<22} {} → {}  {}  {}",
                d.source, d.destination, d.count, d.rule
            );
        }
    }
    out
}

fn endpoint(p: &crate::flows::Peer) -> String {
    match &p.workload {
        Some(w) if p.port == 0 => w.clone(),
        Some(w) => format!("{w}:{}", p.port),
        None if p.port == 0 => p.ip.to_string(),
        None => format!("{}:{}", p.ip, p.port),
    }
}

#[must_use]
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[allow(clippy::cast_precision_loss, reason = "display only")]
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The flow table as a fixed-width text table.
#[must_use]
pub fn render_flows(snap: &FlowSnapshot) -> String {
    let mut out = String::new();
    let row = |out: &mut String, f: &FlowView| {
        let fast = match f.fast_path {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        let via = f
            .service
            .as_ref()
            .map(|s| format!(" (via {s})"))
            .unwrap_or_default();
        let bytes = if f.state == "denied" {
            format!("{} attempt(s)", f.attempts)
        } else {
            format!(
                "→ {} ← {}",
                human_bytes(f.bytes_to_dst),
                human_bytes(f.bytes_to_src)
            )
        };
        let _ = writeln!(
            out,
            "{:<7} {:<5} {:<4} {:<28} {:<34} {:<28} {}{}",
            f.state,
            f.verdict,
            fast,
            endpoint(&f.src),
            endpoint(&f.dst),
            bytes,
            f.reason,
            via
        );
    };
    let _ = writeln!(
        out,
        "{:<7} {:<5} {:<4} {:<28} {:<34} {:<28} WHY",
        "STATE", "VERD", "FAST", "SOURCE", "DESTINATION", "BYTES"
    );
    for f in snap
        .live
        .iter()
        .chain(snap.recent.iter().rev())
        .chain(snap.denied.iter())
    {
        row(&mut out, f);
    }
    out
}

pub fn explain(socket: &Path, source: &str, destination: &str, json: bool) -> Result<(), CliError> {
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("src", source)
        .append_pair("dst", destination)
        .finish();
    let body = fetch(socket, &format!("/explain?{query}"))?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let e: crate::state::explain::Explanation =
        serde_json::from_slice(&body).map_err(CliError::Decode)?;
    print!("{}", explain_text(&e));
    Ok(())
}

/// `weft explain` as text.
fn explain_text(e: &crate::state::explain::Explanation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} → {}{}",
        e.source,
        e.destination,
        e.source_identity
            .as_ref()
            .map_or_else(String::new, |id| format!("  (source identity {id})"))
    );
    if let Some(s) = &e.service {
        let _ = writeln!(
            out,
            "service {} at {}{}",
            s.name,
            s.address,
            if s.l7 {
                format!(", L7 (if the engine is down: fail {})", s.failure_mode)
            } else {
                String::new()
            }
        );
        for (what, items) in [
            ("routes", &s.routes),
            ("authorization", &s.authorization),
            ("authentication", &s.authentication),
        ] {
            if !items.is_empty() {
                let _ = writeln!(out, "  {what}: {}", items.join(", "));
            }
        }
        if let Some(p) = &s.traffic_policy {
            let _ = writeln!(out, "  traffic policy: {p}");
        }
    }
    for p in &e.paths {
        let _ = writeln!(
            out,
            "backend {}{}\n  verdict  {}\n  by       {}\n  path     {}\n  mTLS     {}",
            p.backend,
            p.node
                .as_ref()
                .map_or_else(String::new, |n| format!(" on node {n}")),
            p.verdict,
            p.decided_by,
            p.path,
            p.mtls
        );
    }
    if !e.objects.is_empty() {
        let _ = writeln!(out, "objects");
        for o in &e.objects {
            let _ = writeln!(
                out,
                "  {}{}: {}{}",
                o.object,
                o.parent
                    .as_ref()
                    .map_or_else(String::new, |p| format!(" (parent {p})")),
                o.state,
                o.reason
                    .as_ref()
                    .map_or_else(String::new, |r| format!(", {r}"))
            );
        }
    }
    out
}

pub fn status(socket: &Path, json: bool) -> Result<(), CliError> {
    let body = fetch(socket, "/status")?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let s: Status = serde_json::from_slice(&body).map_err(CliError::Decode)?;
    let fast = match (s.fast_path_enabled, s.fast_path_killed) {
        (_, true) => "OFF (kill switch)",
        (true, false) => "on",
        (false, false) => "off (MeshConfig)",
    };
    println!("node              {}", s.node);
    println!("ready             {}", if s.ready { "yes" } else { "no" });
    let startup = match s.startup {
        Some(crate::ebpf::Startup::Installed) => "installed",
        Some(crate::ebpf::Startup::Adopted) => "adopted from pins (agent restart)",
        Some(crate::ebpf::Startup::Upgraded) => "upgraded the pins of another build in place",
        None => "not loaded",
    };
    println!("datapath          {startup} at {}", s.bpffs_dir);
    println!("fast path         {fast}");
    match &s.socket_self_test {
        Some(t) if t.passed => println!(
            "socket self-test  passed: socket fast path for every meshed pod (unless Disabled)"
        ),
        Some(t) => println!(
            "socket self-test  FAILED ({}): socket fast path only where Enabled ({} pods here); \
             the others keep the normal TCP path",
            t.failed().join(", "),
            s.socket_fast_path_workloads
        ),
        None => {}
    }
    println!(
        "workloads         {} ({} meshed on this node)",
        s.workloads, s.meshed_local_workloads
    );
    println!("services          {}", s.services);
    println!("policy entries    {}", s.policy_entries);
    println!("fast-path sockets {}", s.sockhash_entries);
    if s.retired_sockets > 0 {
        println!(
            "                  {} more from before the last upgrade",
            s.retired_sockets
        );
    }
    if let Some(g) = &s.datapath_generation {
        println!("datapath          {g}");
    }
    println!("live flows        {}", s.live_flows);
    if let Some(ids) = &s.identities {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        println!("identities        {} (mTLS tunnel on)", ids.len());
        for (id, until) in ids {
            println!("  {id}  expires in {}s", until.saturating_sub(now));
        }
    }
    println!("pod interfaces    {}", s.interfaces.join(" "));
    for e in &s.config_errors {
        println!("config error      {e}");
    }
    if let Some(e) = &s.last_sync_error {
        println!("sync error        {e}");
    }
    Ok(())
}

pub fn fastpath(bpffs_dir: &Path, on: bool) -> Result<(), CliError> {
    crate::ebpf::set_fast_path_killed(bpffs_dir, !on)?;
    println!(
        "fast path kill switch {} for {}",
        if on {
            "released"
        } else {
            "ENGAGED: new messages take the normal stack"
        },
        bpffs_dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::Peer;

    fn row(src: &str, dst: &str, verdict: &str) -> FlowView {
        let peer = |w: &str, port| Peer {
            workload: Some(w.into()),
            ip: std::net::Ipv4Addr::LOCALHOST,
            port,
        };
        FlowView {
            src: peer(src, 40000),
            dst: peer(dst, 80),
            service: None,
            verdict: verdict.into(),
            reason: "why".into(),
            path: if verdict == "DENY" { "denied" } else { "fast" }.into(),
            state: if verdict == "DENY" { "denied" } else { "open" }.into(),
            fast_path: Some(verdict == "FAST"),
            bytes_to_dst: 2048,
            bytes_to_src: 10,
            fast_bytes: 2058,
            attempts: 3,
            opened_ms: 0,
            closed_ms: None,
        }
    }

    #[test]
    fn filter_by_workload_and_verdict() {
        let snap = FlowSnapshot {
            live: vec![
                row("shop/web", "shop/db", "FAST"),
                row("shop/api", "shop/cache", "FAST"),
            ],
            recent: vec![],
            denied: vec![row("jobs/batch", "shop/db", "DENY")],
        };
        let mut by_name = snap.clone();
        FlowFilter {
            workload: Some("db".into()),
            verdict: None,
        }
        .apply(&mut by_name);
        assert_eq!(by_name.live.len() + by_name.denied.len(), 2);
        let mut denied = snap.clone();
        FlowFilter {
            workload: Some("shop/db".into()),
            verdict: Some("DENY".into()),
        }
        .apply(&mut denied);
        assert_eq!((denied.live.len(), denied.denied.len()), (0, 1));
    }

    #[test]
    fn table_shows_verdict_fast_path_bytes_and_attempts() {
        let snap = FlowSnapshot {
            live: vec![row("shop/web", "shop/db", "FAST")],
            recent: vec![],
            denied: vec![row("jobs/batch", "shop/db", "DENY")],
        };
        let text = render_flows(&snap);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("STATE"));
        assert!(
            lines[1].contains("FAST")
                && lines[1].contains("yes")
                && lines[1].contains("→ 2.0 KiB ← 10 B"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("DENY") && lines[2].contains("3 attempt(s)"),
            "{}",
            lines[2]
        );
    }
}
