//! The socket self-test: does this kernel's socket-level redirect serve applications exactly?
//!
//! The socket fast path (sockhash + `sk_msg`, ingress redirect) gives both sockets of a connection
//! the kernel's `tcp_bpf` socket operations. On the kernels measured so far (6.18, and bpf-next at
//! the time of writing) two application-visible differences follow, both in `net/ipv4/tcp_bpf.c`:
//!
//! - **`splice()` readers lose data.** Redirected bytes wait in the socket's psock queue
//!   (`ingress_msg`), which only `tcp_bpf_recvmsg` reads. `splice()` goes through
//!   `tcp_splice_read` → `tcp_read_sock`, which sees only the TCP receive queue: it blocks while
//!   the data sits in the psock queue and returns 0 (end of stream) at the peer's FIN. Go's
//!   `io.Copy` between TCP connections, haproxy and nginx stream proxies splice.
//! - **`SO_RCVLOWAT` is not honoured**: a read returns the first redirected message, however
//!   short.
//! - **Blocking readers get spurious `EAGAIN`.** `tcp_bpf_recvmsg` waits once
//!   (`tcp_msg_wait_data` → `sk_wait_event`); any wake-up of the socket's wait queue without data
//!   — the socket's own state change when it half-closes (`FIN_WAIT2`), send-buffer space freed for
//!   a writer thread — ends the wait and `recv()` returns `-EAGAIN` although the socket is
//!   blocking and its timeout has not expired.
//!
//! Neither can be fixed from the BPF side (the queue and the wait loop are the kernel's), and a
//! socket cannot leave the sockhash without the kernel purging its queue. So the agent runs both
//! cases at start, on the loaded object, between two loopback sockets in a private network
//! namespace; workloads use the socket fast path only on a kernel that passes, unless the
//! operator enables it for them (`SocketFastPath::Enabled`).
//!
//! The test loads its own copy of the object's maps (tiny capacities, pinned in a scratch
//! directory that is removed afterwards) and only the `sk_msg` program: nothing of the node's
//! datapath is touched.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    time::Duration,
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, PerCpuArray, SockHash},
    programs::SkMsg,
};
use mesh_common::{
    CONFIG_INDEX, Config, FlowEntry, GlobalStats, SockKey, ZERO_FLOW, config_flags, global_counter,
    map_names, program_names, role, verdict,
};
use serde::{Deserialize, Serialize};

use super::{EbpfError, OBJECT, io, prog_err, remove_pins};

/// Bytes the splice case sends (several redirected messages).
const SPLICE_BYTES: usize = 256 * 1024;
/// How long a case may wait for data that does not come.
const CASE_TIMEOUT: Duration = Duration::from_secs(2);

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// The outcome of the socket self-test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketSelfTest {
    /// Every case passed: the socket fast path serves applications exactly on this kernel.
    pub passed: bool,
    pub cases: Vec<Case>,
}

impl SocketSelfTest {
    /// The names of the cases that failed, for logs and status.
    #[must_use]
    pub fn failed(&self) -> Vec<&str> {
        self.cases
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect()
    }

    /// A result for when the test itself could not run: the fast path is not trusted.
    #[must_use]
    pub fn not_run(why: String) -> Self {
        Self {
            passed: false,
            cases: vec![Case {
                name: "self_test".into(),
                passed: false,
                detail: why,
            }],
        }
    }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

/// The typed handle of map `name` of a loaded object.
fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut aya::Ebpf,
    name: &'static str,
) -> Result<T, EbpfError> {
    ebpf.take_map(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(map_err(name))
}

/// Runs the socket self-test with scratch pins under `scratch` (a directory on bpffs that is
/// created, and removed again, here).
pub fn run(scratch: &Path) -> Result<SocketSelfTest, EbpfError> {
    remove_pins(scratch)?;
    std::fs::create_dir_all(scratch).map_err(io(scratch))?;
    let result = run_in(scratch);
    let cleanup = remove_pins(scratch);
    let result = result?;
    cleanup?;
    Ok(result)
}

/// Maps the self-test does not shrink: single entries, and the ring buffer (its size is bytes,
/// whole pages).
const KEEP_SIZE: [&str; 3] = [
    map_names::CONFIG,
    map_names::GLOBAL_STATS,
    map_names::EVENTS,
];

fn run_in(scratch: &Path) -> Result<SocketSelfTest, EbpfError> {
    let mut loader = EbpfLoader::new();
    let maps_dir = scratch.join("maps");
    std::fs::create_dir_all(&maps_dir).map_err(io(&maps_dir))?;
    loader.default_map_pin_directory(&maps_dir);
    // The self-test's programs log nothing.
    loader.override_global(super::LOG_LEVEL_GLOBAL, &0u8, true);
    for name in map_names::ALL
        .into_iter()
        .filter(|n| !KEEP_SIZE.contains(n))
    {
        loader.map_max_entries(name, 64);
    }
    let mut ebpf = loader.load(OBJECT)?;
    let mut socks: SockHash<_, SockKey> = take(&mut ebpf, map_names::SOCKS)?;
    let mut flows: HashMap<_, SockKey, FlowEntry> = take(&mut ebpf, map_names::FLOWS)?;
    let mut config: Array<_, Config> = take(&mut ebpf, map_names::CONFIG)?;
    let global: PerCpuArray<_, GlobalStats> = take(&mut ebpf, map_names::GLOBAL_STATS)?;
    config
        .set(
            CONFIG_INDEX,
            Config {
                flags: config_flags::FAST_PATH,
                ..Config::default()
            },
            0,
        )
        .map_err(map_err(map_names::CONFIG))?;
    let name = program_names::SK_MSG;
    let prog: &mut SkMsg = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingProgram(name))?
        .try_into()
        .map_err(prog_err(name))?;
    prog.load().map_err(prog_err(name))?;
    // Detached when `ebpf` is dropped at the end of the test.
    prog.attach(socks.fd()).map_err(prog_err(name))?;

    let redirected = || -> u64 {
        global.get(&0, 0).map_or(0, |per_cpu| {
            per_cpu
                .iter()
                .map(|g| g.counters[global_counter::MSG_FAST])
                .sum()
        })
    };
    let mut join = |client: &TcpStream, server: &TcpStream| -> std::io::Result<()> {
        for (sock, my_role) in [(client, role::CLIENT), (server, role::SERVER)] {
            let key = sock_key(sock.local_addr()?, sock.peer_addr()?);
            let flow = FlowEntry {
                verdict: verdict::FAST,
                role: my_role,
                ..ZERO_FLOW
            };
            flows.insert(key, flow, 0).map_err(std::io::Error::other)?;
            socks
                .insert(key, sock.as_raw_fd(), 0)
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    };
    let cases = in_private_netns(|| {
        let mut cases = Vec::new();
        let before = redirected();
        cases.push(case("redirect", || {
            let (client, mut server) = connected_pair()?;
            join(&client, &server)?;
            (&client).write_all(b"ping")?;
            let mut buf = [0_u8; 4];
            server.set_read_timeout(Some(CASE_TIMEOUT))?;
            server.read_exact(&mut buf)?;
            if redirected() > before {
                Ok(())
            } else {
                Err("the message took the normal stack".into())
            }
        }));
        cases.push(case("splice_reader", || {
            let (client, server) = connected_pair()?;
            join(&client, &server)?;
            splice_reader(&client, &server)
        }));
        cases.push(case("blocking_wakeup", || {
            let (client, server) = connected_pair()?;
            join(&client, &server)?;
            blocking_wakeup(&client, &server)
        }));
        cases.push(case("rcvlowat", || {
            let (client, server) = connected_pair()?;
            join(&client, &server)?;
            rcvlowat(&client, &server)
        }));
        cases
    })
    .map_err(|e| EbpfError::Io {
        path: scratch.to_owned(),
        source: e,
    })?;
    drop(ebpf);
    Ok(SocketSelfTest {
        passed: cases.iter().all(|c| c.passed),
        cases,
    })
}

type CaseResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn case(name: &'static str, f: impl FnOnce() -> CaseResult) -> Case {
    match f() {
        Ok(()) => Case {
            name: name.into(),
            passed: true,
            detail: String::new(),
        },
        Err(e) => Case {
            name: name.into(),
            passed: false,
            detail: e.to_string(),
        },
    }
}

fn sock_key(local: SocketAddr, peer: SocketAddr) -> SockKey {
    let v4 = |a: SocketAddr| match a {
        SocketAddr::V4(a) => (u32::from(*a.ip()).to_be(), u32::from(a.port())),
        SocketAddr::V6(_) => (0, 0),
    };
    let ((local_ip_be, local_port_host), (remote_ip_be, remote_port_host)) = (v4(local), v4(peer));
    SockKey {
        local_ip_be,
        remote_ip_be,
        local_port_host,
        remote_port_host,
    }
}

fn connected_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    Ok((client, server))
}

/// A reader that `splice()`s the stream into a pipe must get every byte before end of stream.
fn splice_reader(client: &TcpStream, server: &TcpStream) -> CaseResult {
    let payload = vec![7_u8; SPLICE_BYTES];
    let mut writer = client;
    writer.write_all(&payload)?;
    client.shutdown(Shutdown::Write)?;
    server.set_read_timeout(Some(CASE_TIMEOUT))?;
    let (pipe_r, pipe_w) = nix::unistd::pipe()?;
    let mut pipe_r = std::fs::File::from(pipe_r);
    let mut got = 0;
    let mut sink = vec![0_u8; 64 * 1024];
    loop {
        let n = nix::fcntl::splice(
            server,
            None,
            &pipe_w,
            None,
            sink.len(),
            nix::fcntl::SpliceFFlags::empty(),
        )
        .map_err(|e| format!("splice: {e} after {got} of {SPLICE_BYTES} bytes"))?;
        if n == 0 {
            break;
        }
        pipe_r.read_exact(&mut sink[..n])?;
        got += n;
    }
    if got == SPLICE_BYTES {
        Ok(())
    } else {
        Err(format!("splice() reached end of stream after {got} of {SPLICE_BYTES} bytes").into())
    }
}

/// A blocking `recv()` waiting for a reply while its own socket half-closes must get the reply,
/// not `EAGAIN`.
fn blocking_wakeup(client: &TcpStream, server: &TcpStream) -> CaseResult {
    client.set_read_timeout(Some(CASE_TIMEOUT))?;
    let reader = client.try_clone()?;
    let waiting = std::thread::spawn(move || {
        let mut buf = [0_u8; 5];
        let mut reader = reader;
        reader.read_exact(&mut buf).map(|()| buf)
    });
    std::thread::sleep(Duration::from_millis(50));
    client.shutdown(Shutdown::Write)?;
    std::thread::sleep(Duration::from_millis(50));
    let mut server = server;
    server.write_all(b"reply")?;
    match waiting.join() {
        Ok(Ok(buf)) if &buf == b"reply" => Ok(()),
        Ok(Ok(buf)) => Err(format!("read {buf:?} instead of the reply").into()),
        Ok(Err(e)) => Err(format!(
            "a blocking recv() failed with \"{e}\" while its socket half-closed, before the reply"
        )
        .into()),
        Err(_) => Err("the reading thread panicked".into()),
    }
}

/// A reader waiting with `SO_RCVLOWAT` 50 must not wake for the first 10 bytes.
fn rcvlowat(client: &TcpStream, server: &TcpStream) -> CaseResult {
    set_rcvlowat(server, 50)?;
    server.set_read_timeout(Some(CASE_TIMEOUT))?;
    let mut reader = server.try_clone()?;
    let waiting = std::thread::spawn(move || {
        let mut buf = [0_u8; 100];
        reader.read(&mut buf)
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut writer = client;
    writer.write_all(&[1; 10])?;
    std::thread::sleep(Duration::from_millis(50));
    writer.write_all(&[2; 90])?;
    match waiting.join() {
        Ok(Ok(n)) if n >= 50 => Ok(()),
        Ok(Ok(n)) => Err(format!("a read with SO_RCVLOWAT 50 returned {n} bytes").into()),
        Ok(Err(e)) => Err(format!("a read with SO_RCVLOWAT 50 failed: {e}").into()),
        Err(_) => Err("the reading thread panicked".into()),
    }
}

/// Runs `f` on a thread of its own in a new network namespace with only loopback (up): the
/// test's sockets never meet the node's. Without the privilege for that, on the caller's
/// namespace's loopback.
fn in_private_netns<T: Send>(f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                match nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                    Ok(()) => loopback_up()?,
                    // A namespace of its own needs CAP_SYS_ADMIN, which a node agent in a
                    // container need not have: its own loopback serves as well (two sockets
                    // on ephemeral ports, for a fraction of a second).
                    Err(nix::errno::Errno::EPERM) => {
                        tracing::debug!("socket self-test on this namespace's loopback");
                    }
                    Err(e) => return Err(e.into()),
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("self-test thread panicked")))
    })
}

/// `setsockopt(SO_RCVLOWAT)`.
#[allow(unsafe_code, reason = "one setsockopt nix has no wrapper for")]
fn set_rcvlowat(socket: &TcpStream, bytes: libc::c_int) -> std::io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: a valid socket and an int of the option's size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&bytes).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `ip link set lo up` in the calling thread's network namespace.
#[allow(
    unsafe_code,
    reason = "two interface ioctls; no safe wrapper exists in our crates"
)]
fn loopback_up() -> std::io::Result<()> {
    // Any AF_INET socket serves for the interface ioctls.
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let fd = sock.as_raw_fd();
    // SAFETY: `ifreq` is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = (*src).cast_signed();
    }
    // SAFETY: valid socket and a properly initialised `ifreq` that outlives the calls.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &raw mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &raw mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
