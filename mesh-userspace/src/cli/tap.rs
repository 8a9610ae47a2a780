//! `weft tap`: the node's live events as they happen (the kernel's connections opened, closed,
//! refused and moved off the fast path; the engine's requests), filtered like `/tap`; and
//! `weft top`: a live per-workload table of the same events.
use std::{
    collections::{BTreeMap, VecDeque},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;

use super::CliError;
use crate::tap::{Endpoint, Event, Filter, What};

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
}

/// Streams `/tap` with `filter`, handing each event to `each` (false stops) and calling
/// `watching` once the agent's kernel writes events for this reader. Ends after `duration`.
fn follow(
    socket: &Path,
    filter: &Filter,
    duration: Option<Duration>,
    mut watching: impl FnMut(),
    mut each: impl FnMut(&[u8], Event) -> bool,
) -> Result<(), CliError> {
    filter.check().map_err(CliError::Usage)?;
    let path = format!("/tap?{}", filter.to_query());
    let stream = crate::agent_client::stream_lines(socket, &path, |line| {
        let value: serde_json::Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable line from the agent");
                return true;
            }
        };
        if value["type"] == "watching" {
            watching();
            return true;
        }
        match serde_json::from_value::<Event>(value) {
            Ok(event) => each(line, event),
            // A kind of event this CLI does not know (a newer agent): skipped.
            Err(_) => true,
        }
    });
    let rt = runtime()?;
    rt.block_on(async {
        match duration {
            Some(d) => tokio::time::timeout(d, stream).await.unwrap_or(Ok(())),
            None => stream.await,
        }
    })
    .map_err(CliError::Agent)
}

/// `weft tap`.
pub fn tap(
    socket: &Path,
    filter: &Filter,
    json: bool,
    count: Option<u64>,
    duration: Option<Duration>,
) -> Result<(), CliError> {
    let mut seen = 0u64;
    follow(
        socket,
        filter,
        duration,
        || eprintln!("watching the node's events (Ctrl-C stops)"),
        |line, event| {
            if json {
                println!("{}", String::from_utf8_lossy(line));
            } else {
                println!("{}", render_event(&event));
            }
            seen += 1;
            count.is_none_or(|c| seen < c)
        },
    )
}

/// `hh:mm:ss.mmm` (UTC) of a time in milliseconds since the epoch.
fn clock(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

fn end(p: &Endpoint) -> String {
    let who = p
        .workload
        .clone()
        .or_else(|| p.ip.map(|ip| ip.to_string()))
        .unwrap_or_else(|| "?".into());
    if p.port == 0 {
        who
    } else {
        format!("{who}:{}", p.port)
    }
}

/// One event as a line for people.
#[must_use]
pub fn render_event(e: &Event) -> String {
    let t = clock(e.time_ms);
    let svc = e
        .service
        .as_ref()
        .map(|s| format!(" (service {s})"))
        .unwrap_or_default();
    let (src, dst) = (end(&e.src), end(&e.dst));
    match &e.what {
        What::Open {
            verdict,
            reason,
            path,
        } => format!("{t} OPEN    {src} → {dst}{svc}  {verdict} via {path}: {reason}"),
        What::Close {
            verdict,
            path,
            bytes_to_dst,
            bytes_to_src,
            fast_bytes,
            duration_ms,
        } => {
            let total = bytes_to_dst + bytes_to_src;
            let fast = if total == 0 {
                String::new()
            } else {
                #[allow(clippy::cast_precision_loss, reason = "a percentage")]
                let share = *fast_bytes as f64 * 100.0 / total as f64;
                format!(", {share:.0} % socket to socket")
            };
            format!(
                "{t} CLOSE   {src} → {dst}{svc}  {verdict} via {path}: {bytes_to_dst} B → {bytes_to_src} B ←{fast}, {duration_ms:.1} ms"
            )
        }
        What::Deny { verdict, reason } => {
            format!("{t} {verdict:<7} {src} → {dst}{svc}  refused at connect(): {reason}")
        }
        What::Shed { reason } => format!("{t} SHED    {src} → {dst}{svc}  {reason}"),
        What::Request {
            method,
            path,
            route,
            status,
            duration_ms,
        } => format!(
            "{t} REQUEST {src} → {}{}  {method} {path} → {status} in {duration_ms:.2} ms (route {route})",
            e.service.as_deref().unwrap_or("?"),
            e.dst
                .workload
                .as_ref()
                .map(|w| format!(" at {w}"))
                .unwrap_or_default()
        ),
        What::Lost { events, reason } => format!("{t} LOST    {events} events: {reason}"),
    }
}

/// One row of `weft top`: a workload as a destination, over the last window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TopRow {
    pub workload: String,
    pub requests_per_s: f64,
    /// Share of requests answered without a 5xx (`None`: no request).
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Connections that closed in the window, and their payload bytes both ways.
    pub connections: u64,
    pub bytes: u64,
    /// Share of those bytes that went socket to socket in the kernel.
    pub fast_path_share: Option<f64>,
    /// `connect()`s refused.
    pub denied: u64,
}

enum Sample {
    Request { status: u16, ms: f64 },
    Close { bytes: u64, fast: u64 },
    Deny,
}

/// The events of the last window, by destination workload.
struct Tally {
    window: Duration,
    samples: VecDeque<(Instant, String, Sample)>,
}

impl Tally {
    fn add(&mut self, e: &Event) {
        let key = e
            .dst
            .workload
            .clone()
            .or_else(|| e.service.clone())
            .or_else(|| e.dst.ip.map(|ip| ip.to_string()))
            .unwrap_or_else(|| "?".into());
        let sample = match &e.what {
            What::Request {
                status,
                duration_ms,
                ..
            } => Sample::Request {
                status: *status,
                ms: *duration_ms,
            },
            What::Close {
                bytes_to_dst,
                bytes_to_src,
                fast_bytes,
                ..
            } => Sample::Close {
                bytes: bytes_to_dst + bytes_to_src,
                fast: *fast_bytes,
            },
            What::Deny { verdict, .. } if verdict == "DENY" => Sample::Deny,
            _ => return,
        };
        self.samples.push_back((Instant::now(), key, sample));
    }

    /// The rows over the window that ends at `now`.
    fn rows(&mut self, now: Instant) -> Vec<TopRow> {
        while self
            .samples
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) > self.window)
        {
            self.samples.pop_front();
        }
        // Per key: the row, request latencies, requests answered without a 5xx, fast bytes.
        let mut by: BTreeMap<&str, (TopRow, Vec<f64>, u64, u64)> = BTreeMap::new();
        for (_, key, sample) in &self.samples {
            let (row, latencies, ok, fast_bytes) = by.entry(key).or_default();
            match sample {
                Sample::Request { status, ms } => {
                    latencies.push(*ms);
                    *ok += u64::from(*status < 500);
                }
                Sample::Close { bytes, fast } => {
                    row.connections += 1;
                    row.bytes += bytes;
                    *fast_bytes += fast;
                }
                Sample::Deny => row.denied += 1,
            }
        }
        let secs = self.window.as_secs_f64();
        by.into_iter()
            .map(|(key, (mut row, mut latencies, ok, fast_bytes))| {
                key.clone_into(&mut row.workload);
                latencies.sort_by(f64::total_cmp);
                let n = latencies.len();
                #[allow(clippy::cast_precision_loss, reason = "rates and shares")]
                {
                    row.requests_per_s = n as f64 / secs;
                    row.success_rate = (n > 0).then(|| ok as f64 / n as f64);
                    row.fast_path_share =
                        (row.bytes > 0).then(|| fast_bytes as f64 / row.bytes as f64);
                }
                let at = |q: f64| {
                    #[allow(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        clippy::cast_precision_loss,
                        reason = "an index into the sorted latencies"
                    )]
                    let i = ((n as f64 * q).ceil() as usize).clamp(1, n) - 1;
                    latencies[i]
                };
                row.p50_ms = (n > 0).then(|| at(0.50));
                row.p99_ms = (n > 0).then(|| at(0.99));
                row
            })
            .collect()
    }
}

fn fmt_opt(v: Option<f64>, scale: f64, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.digits$}", v * scale))
}

const HEADER: [&str; 9] = [
    "WORKLOAD",
    "REQ/S",
    "SUCCESS",
    "P50 MS",
    "P99 MS",
    "CONNS",
    "BYTES",
    "FAST PATH",
    "DENIED",
];

fn cells(r: &TopRow) -> [String; 9] {
    [
        r.workload.clone(),
        format!("{:.1}", r.requests_per_s),
        fmt_opt(r.success_rate, 100.0, 1) + if r.success_rate.is_some() { " %" } else { "" },
        fmt_opt(r.p50_ms, 1.0, 2),
        fmt_opt(r.p99_ms, 1.0, 2),
        r.connections.to_string(),
        r.bytes.to_string(),
        fmt_opt(r.fast_path_share, 100.0, 0)
            + if r.fast_path_share.is_some() {
                " %"
            } else {
                ""
            },
        r.denied.to_string(),
    ]
}

/// The table as text (what `weft top --once` prints).
#[must_use]
pub fn render_top(rows: &[TopRow]) -> String {
    let all: Vec<[String; 9]> = std::iter::once(HEADER.map(str::to_owned))
        .chain(rows.iter().map(cells))
        .collect();
    let widths: Vec<usize> = (0..9)
        .map(|i| all.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &all {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `weft top`: a live table in the terminal, refreshed every second, over the last `window`
/// (q quits); with `once`, or when stdout is not a terminal, one table after `window`.
pub fn top(
    socket: &Path,
    filter: &Filter,
    window: Duration,
    once: bool,
    json: bool,
) -> Result<(), CliError> {
    use std::io::IsTerminal as _;
    let tally = Arc::new(Mutex::new(Tally {
        window,
        samples: VecDeque::new(),
    }));
    let live = !once && !json && std::io::stdout().is_terminal();
    if !live {
        // Collect for one window, counted from when the kernel's events are on.
        let started: Arc<Mutex<Option<Instant>>> = Arc::default();
        let t = tally.clone();
        let s = started.clone();
        // The stream ends at the first event past the window, or (a quiet node) a little
        // after it: the agent's next sync pass turns the kernel's events on first.
        follow(
            socket,
            filter,
            Some(window + Duration::from_secs(3)),
            || *s.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now()),
            |_, event| {
                let past = s
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .is_some_and(|at| at.elapsed() >= window);
                if !past {
                    t.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .add(&event);
                }
                !past
            },
        )?;
        // The window is the one that started when the kernel's events did, not the last one.
        let until = started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .map_or_else(Instant::now, |at| at + window);
        let rows = tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .rows(until.min(Instant::now()));
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&rows).map_err(CliError::Decode)?
            );
        } else {
            print!("{}", render_top(&rows));
        }
        return Ok(());
    }
    let reader = {
        let (socket, filter, tally) = (socket.to_owned(), filter.clone(), tally.clone());
        std::thread::spawn(move || {
            follow(
                &socket,
                &filter,
                None,
                || {},
                |_, event| {
                    tally
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .add(&event);
                    true
                },
            )
        })
    };
    let result = tui(&tally, window, &reader);
    ratatui::restore();
    result?;
    if reader.is_finished()
        && let Ok(Err(e)) = reader.join()
    {
        return Err(e);
    }
    Ok(())
}

fn tui(
    tally: &Mutex<Tally>,
    window: Duration,
    reader: &std::thread::JoinHandle<Result<(), CliError>>,
) -> Result<(), CliError> {
    use ratatui::{
        crossterm::event::{self, Event as Key, KeyCode, KeyModifiers},
        layout::Constraint,
        style::{Modifier, Style},
        widgets::{Block, Row, Table},
    };
    let mut terminal = ratatui::try_init().map_err(CliError::Agent)?;
    loop {
        let rows = tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .rows(Instant::now());
        terminal
            .draw(|frame| {
                let table = Table::new(
                    rows.iter().map(|r| Row::new(cells(r))),
                    [
                        Constraint::Min(24),
                        Constraint::Length(8),
                        Constraint::Length(9),
                        Constraint::Length(8),
                        Constraint::Length(8),
                        Constraint::Length(7),
                        Constraint::Length(12),
                        Constraint::Length(10),
                        Constraint::Length(7),
                    ],
                )
                .header(Row::new(HEADER).style(Style::new().add_modifier(Modifier::BOLD)))
                .block(Block::bordered().title(format!(
                    " weft top: by destination workload, last {} s (q quits) ",
                    window.as_secs()
                )));
                frame.render_widget(table, frame.area());
            })
            .map_err(CliError::Agent)?;
        if reader.is_finished() {
            return Ok(());
        }
        if event::poll(Duration::from_secs(1)).map_err(CliError::Agent)?
            && let Key::Key(k) = event::read().map_err(CliError::Agent)?
            && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                || (k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL)))
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(dst: &str, what: What) -> Event {
        Event {
            time_ms: 45_296_789,
            src: Endpoint {
                workload: Some("shop/client".into()),
                ip: None,
                port: 40_000,
            },
            dst: Endpoint {
                workload: Some(dst.into()),
                ip: None,
                port: 8080,
            },
            service: None,
            what,
        }
    }

    fn request(status: u16, ms: f64) -> What {
        What::Request {
            method: "GET".into(),
            path: "/".into(),
            route: "r".into(),
            status,
            duration_ms: ms,
        }
    }

    #[test]
    fn top_rows_tally_requests_success_latency_bytes_and_fast_path_share() {
        let mut t = Tally {
            window: Duration::from_secs(10),
            samples: VecDeque::new(),
        };
        for i in 0..100 {
            let status = if i % 10 == 0 { 503 } else { 200 };
            t.add(&event("shop/web", request(status, f64::from(i + 1))));
        }
        t.add(&event(
            "shop/db",
            What::Close {
                verdict: "FAST".into(),
                path: "fast".into(),
                bytes_to_dst: 300,
                bytes_to_src: 100,
                fast_bytes: 300,
                duration_ms: 5.0,
            },
        ));
        t.add(&event(
            "shop/db",
            What::Deny {
                verdict: "DENY".into(),
                reason: "policy".into(),
            },
        ));
        let rows = t.rows(Instant::now());
        let web = rows.iter().find(|r| r.workload == "shop/web").unwrap();
        assert!((web.requests_per_s - 10.0).abs() < 1e-9);
        assert_eq!(web.success_rate, Some(0.9));
        assert_eq!((web.p50_ms, web.p99_ms), (Some(50.0), Some(99.0)));
        let db = rows.iter().find(|r| r.workload == "shop/db").unwrap();
        assert_eq!((db.connections, db.bytes, db.denied), (1, 400, 1));
        assert_eq!(db.fast_path_share, Some(0.75));
        assert_eq!(db.success_rate, None);
        let text = render_top(&rows);
        assert!(text.starts_with("WORKLOAD"), "{text}");
        assert!(text.contains("90.0 %") && text.contains("75 %"), "{text}");
    }

    #[test]
    fn events_render_as_one_line_each() {
        let line = render_event(&event("shop/web", request(503, 1.5)));
        assert_eq!(
            line,
            "12:34:56.789 REQUEST shop/client:40000 → ? at shop/web  GET / → 503 in 1.50 ms (route r)"
        );
        let deny = render_event(&event(
            "shop/db",
            What::Deny {
                verdict: "DENY".into(),
                reason: "rule x".into(),
            },
        ));
        assert!(
            deny.contains("DENY    shop/client:40000 → shop/db:8080  refused"),
            "{deny}"
        );
    }
}
