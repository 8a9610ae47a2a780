//! The workload binary on loopback, without namespaces (no root needed): every subcommand
//! against the matching server mode, including the failure paths tests rely on.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use testbed::{
    Finished, Proc,
    workload::report::{
        ConnectReport, HoldReport, ResetReport, RrReport, StreamReport, TransferReport,
    },
};

const BIN: &str = env!("CARGO_BIN_EXE_weft-workload");
const TIMEOUT: Duration = Duration::from_mins(1);

fn server(mode: &str) -> (Proc, SocketAddr) {
    let proc = Proc::spawn(
        format!("server {mode}"),
        Command::new(BIN).args(["server", "--listen", "127.0.0.1:0", "--mode", mode]),
    )
    .unwrap();
    let line = proc
        .wait_for_json(Duration::from_secs(10), "listening")
        .unwrap();
    let addr = line["listening"].as_str().unwrap().parse().unwrap();
    (proc, addr)
}

fn client(args: &[&str]) -> Finished {
    Proc::spawn(format!("client {}", args[0]), Command::new(BIN).args(args))
        .unwrap()
        .wait(TIMEOUT)
        .unwrap()
}

fn transfer(addr: SocketAddr, bytes: u64, conns: u32) -> (Finished, TransferReport) {
    let out = client(&[
        "transfer",
        "--connect",
        &addr.to_string(),
        "--bytes",
        &bytes.to_string(),
        "--conns",
        &conns.to_string(),
        "--chunk",
        "1000",
    ]);
    let report = out.json_as().unwrap();
    (out, report)
}

#[test]
fn echo_transfer_verifies_every_byte_and_survives_resets() {
    let (mut echo, addr) = server("echo");
    let (out, report) = transfer(addr, 1 << 20, 4);
    assert!(out.success() && report.all_ok(), "{report:?}");
    assert_eq!(report.bytes_sent, 4 << 20);
    assert_eq!(report.bytes_verified, 4 << 20);

    for _ in 0..3 {
        let reset: ResetReport = client(&["reset", "--connect", &addr.to_string()])
            .json_as()
            .unwrap();
        assert!(reset.ok, "{reset:?}");
        assert_eq!(reset.sent, 1024);
    }
    // Zero bytes: only the half-close travels.
    let (_, empty) = transfer(addr, 0, 2);
    assert!(empty.all_ok(), "{empty:?}");
    let (_, again) = transfer(addr, 100_000, 8);
    assert!(again.all_ok(), "{again:?}");
    assert!(echo.is_running(), "the echo server died: {}", echo.stderr());
}

#[test]
fn transfer_reports_a_server_that_does_not_echo() {
    // A sink never echoes: each connection gets the 8-byte count instead of its data.
    let (_sink, addr) = server("sink");
    let (out, report) = transfer(addr, 10_000, 2);
    assert!(!out.success());
    assert_eq!((report.ok, report.failed), (0, 2), "{report:?}");
    assert!(
        report.errors.iter().all(|error| error.contains("differs")),
        "{report:?}"
    );
}

#[test]
fn connect_reports_the_errno() {
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = client(&["connect", "--connect", &free.to_string()]);
    assert!(out.success(), "connect exits 0 whatever the result");
    let refused: ConnectReport = out.json_as().unwrap();
    assert!(!refused.ok);
    assert_eq!(refused.errno, Some(libc::ECONNREFUSED));

    let (_echo, addr) = server("echo");
    let ok: ConnectReport = client(&["connect", "--connect", &addr.to_string()])
        .json_as()
        .unwrap();
    assert!(ok.ok && ok.errno.is_none(), "{ok:?}");
}

#[test]
fn hold_keeps_connections_until_told_to_stop() {
    let (_echo, addr) = server("echo");
    let stop = stop_file("hold");
    let mut hold = Proc::spawn(
        "hold",
        Command::new(BIN).args([
            "hold",
            "--connect",
            &addr.to_string(),
            "--conns",
            "5",
            "--interval-ms",
            "20",
            "--until-file",
            stop.to_str().unwrap(),
            "--max-secs",
            "30",
        ]),
    )
    .unwrap();
    assert_eq!(
        hold.wait_for_json(Duration::from_secs(10), "ready")
            .unwrap()["ready"],
        5
    );
    // Let it do some rounds.
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(&stop, "").unwrap();
    let out = hold.wait(TIMEOUT).unwrap();
    std::fs::remove_file(&stop).unwrap();
    let report: HoldReport = out.json_as().unwrap();
    assert!(out.success(), "{report:?}");
    assert_eq!((report.conns, report.broken), (5, 0), "{report:?}");
    assert!(report.rounds >= 2, "{report:?}");
}

#[test]
fn hold_counts_connections_the_server_breaks() {
    let (mut echo, addr) = server("echo");
    let stop = stop_file("hold-broken");
    let mut hold = Proc::spawn(
        "hold",
        Command::new(BIN).args([
            "hold",
            "--connect",
            &addr.to_string(),
            "--conns",
            "3",
            "--interval-ms",
            "20",
            "--until-file",
            stop.to_str().unwrap(),
            "--max-secs",
            "30",
            "--io-timeout-ms",
            "1000",
        ]),
    )
    .unwrap();
    hold.wait_for_json(Duration::from_secs(10), "ready")
        .unwrap();
    echo.kill().unwrap();
    let out = hold.wait(TIMEOUT).unwrap();
    let report: HoldReport = out.json_as().unwrap();
    assert!(!out.success());
    assert_eq!(report.broken, 3, "{report:?}");
}

#[test]
fn rr_measures_round_trips() {
    let (_echo, addr) = server("echo");
    let out = client(&[
        "rr",
        "--connect",
        &addr.to_string(),
        "--size",
        "100",
        "--secs",
        "0.3",
    ]);
    let report: RrReport = out.json_as().unwrap();
    assert!(out.success(), "{report:?}");
    assert!(report.transactions > 10, "{report:?}");
    assert!(
        report.p50_us > 0.0 && report.p50_us <= report.p90_us && report.p90_us <= report.p99_us,
        "{report:?}"
    );
    assert!(report.p99_us <= report.max_us, "{report:?}");

    let capped: RrReport = client(&[
        "rr",
        "--connect",
        &addr.to_string(),
        "--secs",
        "10",
        "--max-iters",
        "50",
    ])
    .json_as()
    .unwrap();
    assert_eq!(capped.transactions, 50);
}

#[test]
fn stream_to_a_sink_is_counted_exactly() {
    let (_sink, addr) = server("sink");
    let out = client(&["stream", "--connect", &addr.to_string(), "--secs", "0.3"]);
    let report: StreamReport = out.json_as().unwrap();
    assert!(out.success() && report.ok, "{report:?}");
    assert!(report.bytes > 0);
    assert_eq!(report.server_bytes, Some(report.bytes));
    assert!(report.gbps > 0.0);
}

#[test]
fn source_sends_until_the_client_leaves() {
    use std::io::Read;
    let (mut source, addr) = server("source");
    for _ in 0..3 {
        let mut stream = TcpStream::connect(addr).unwrap();
        let mut buf = vec![0; 256 * 1024];
        stream.read_exact(&mut buf).unwrap();
        let mut expected = vec![0; buf.len()];
        testbed::workload::pattern::Pattern::new(0).fill(&mut expected);
        assert!(buf == expected, "source data differs from the pattern");
    }
    assert!(source.is_running(), "{}", source.stderr());
}

#[test]
fn bad_arguments_fail_with_a_json_error() {
    let out = client(&["server", "--listen", "192.0.2.1:1", "--mode", "echo"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.json().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("binding"),
        "{}",
        out.stdout
    );
    let out = client(&["rr", "--connect", "127.0.0.1:1", "--secs", "-1"]);
    assert_eq!(out.status.code(), Some(2));
}

fn stop_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("weft-workload-test-{name}-{}", std::process::id()))
}
