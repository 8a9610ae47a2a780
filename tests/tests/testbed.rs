//! The testbed itself, as root: nodes and pods are wired as documented, processes land in the
//! right namespace and cgroup, traffic flows between pods, and nothing survives a teardown or a
//! crashed run.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::unix::{fs::MetadataExt, process::ExitStatusExt},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use testbed::{Pod, Proc, ServeMode, Testbed, eventually, leftovers, workload_bin};

/// `ip ARGS` on the host, stdout as text.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The cgroup v2 path of `pid`, relative to the cgroup2 root.
fn cgroup_of(pid: u32) -> String {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    cgroups
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .unwrap()
        .to_owned()
}

/// Whether `pid` is in the network namespace mounted at `netns_path`.
fn in_netns(pid: u32, netns_path: &Path) -> bool {
    let proc_ns = fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
    let bound = fs::metadata(netns_path).unwrap();
    (proc_ns.dev(), proc_ns.ino()) == (bound.dev(), bound.ino())
}

/// `path` as seen from the cgroup2 root (`/sys/fs/cgroup/unified/x/y` -> `/x/y`).
fn relative_cgroup(path: &Path) -> String {
    let text = path.to_str().unwrap();
    for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if let Some(rest) = text.strip_prefix(root) {
            return rest.to_owned();
        }
    }
    panic!("{text} is not under a cgroup2 mount")
}

fn echo_server(pod: &Pod, port: u16) -> Result<(Proc, SocketAddr)> {
    let listen = format!("0.0.0.0:{port}");
    let mut command = pod.command(workload_bin())?;
    command.args(["server", "--listen", &listen, "--mode", "echo"]);
    let server = Proc::spawn("echo server", &mut command)?;
    server.wait_for_json(Duration::from_secs(10), "listening")?;
    Ok((server, SocketAddr::from((pod.ip(), port))))
}

/// The basic flow: one node, two pods, an echo server in one started with `pod.command`, a
/// verified transfer from the other, then nothing left after the testbed is dropped.
#[test]
fn pods_on_a_node_talk_and_teardown_removes_everything() -> Result<()> {
    let tb = Testbed::new("pods_on_a_node_talk")?;
    let prefix = tb.prefix().to_owned();
    let node = tb.node("node1")?;
    let a = node.pod("a")?;
    let b = node.pod("b")?;

    // Pods reach each other over br0 and nothing else: no default route.
    for pod in [&a, &b] {
        assert_eq!(ip(&["-n", pod.netns(), "route", "show", "default"]), "");
        assert_eq!(
            ip(&["-n", pod.netns(), "-4", "route"]).trim(),
            format!(
                "198.18.0.0/16 via 198.18.{0}.1 dev eth0 \n\
                 198.18.{0}.0/24 dev eth0 proto kernel scope link src {1}",
                node.index(),
                pod.ip()
            )
        );
    }

    // A server in pod A, started with `pod.command`, runs in A's netns and cgroup.
    let (mut server, addr) = echo_server(&a, 7000)?;
    assert_eq!(cgroup_of(server.pid()), relative_cgroup(&a.cgroup_path()));
    assert!(in_netns(server.pid(), &a.netns_path()));

    let report = b.transfer(addr, 1 << 20, 4)?;
    assert!(report.all_ok(), "{report:?}");
    assert_eq!(report.bytes_verified, 4 << 20);

    // Teardown while processes still run: the run's cgroup kill takes them.
    let mut agent_like = node.spawn("sleep", ["600"])?;
    let before = tb.leftovers()?;
    assert_eq!(before.processes.len(), 2, "{before}");
    drop(tb);
    let left = leftovers(&prefix)?;
    assert!(left.is_empty(), "{left}");
    assert!(!ip(&["netns", "list"]).contains(prefix.as_str()));
    assert!(
        !Path::new("/sys/fs/cgroup/unified")
            .join(format!("weft-{prefix}"))
            .exists()
    );
    assert!(!Path::new("/run/weft-testbed").join(&prefix).exists());
    assert!(
        !Path::new("/sys/fs/bpf")
            .join(format!("weft-{prefix}"))
            .exists()
    );
    assert!(!server.is_running() && !agent_like.is_running());
    assert_eq!(server.kill()?.status.signal(), Some(libc::SIGKILL));
    // Handles outlive the run but refuse to create anything.
    assert!(node.pod("late").is_err());
    assert!(a.command("true").is_err());
    Ok(())
}

#[test]
fn nodes_and_pods_are_wired_and_named_as_documented() -> Result<()> {
    let tb = Testbed::new("wired_as_documented")?;
    let prefix = tb.prefix().to_owned();
    let node = tb.node("node1")?;
    let a = node.pod("a")?;
    let b = node.pod("b")?;
    let shop = node.pod_in("shop", "a")?;

    assert_eq!(node.netns(), format!("{prefix}-node1"));
    assert_eq!(node.bridge_ip(), Ipv4Addr::new(198, 18, node.index(), 1));
    assert_eq!(
        node.cgroup_path(),
        Path::new("/sys/fs/cgroup/unified").join(format!("weft-{prefix}/node1"))
    );
    assert_eq!(
        tb.bpffs_dir(&node),
        Path::new("/sys/fs/bpf").join(format!("weft-{prefix}/node1"))
    );
    assert_eq!(
        tb.run_dir(&node),
        Path::new("/run/weft-testbed").join(format!("{prefix}/node1"))
    );
    assert!(node.bpffs_dir().is_dir() && node.run_dir().is_dir());

    assert_eq!(
        (a.ip(), b.ip(), shop.ip()),
        (node_ip(&node, 10), node_ip(&node, 11), node_ip(&node, 12))
    );
    assert_eq!(
        (a.netns(), shop.netns()),
        (
            &*format!("{prefix}-node1-a"),
            &*format!("{prefix}-node1-shop_a")
        )
    );
    assert_eq!(
        (a.cgroup_path(), shop.cgroup_path()),
        (
            node.cgroup_path().join("default_a"),
            node.cgroup_path().join("shop_a")
        )
    );
    assert!(a.cgroup_path().is_dir() && shop.cgroup_path().is_dir());
    assert_eq!(
        (a.host_veth(), b.host_veth(), shop.host_veth()),
        ("vh0", "vh1", "vh2")
    );
    assert!(node.pod("a").is_err(), "duplicate pod names are refused");

    let links: serde_json::Value = serde_json::from_str(&ip(&[
        "-j",
        "-n",
        node.netns(),
        "link",
        "show",
        "master",
        "br0",
    ]))?;
    let bridged: Vec<(&str, u64)> = links
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["ifname"].as_str().unwrap(),
                l["ifindex"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(&str, u64)> = [&a, &b, &shop]
        .iter()
        .map(|p| (p.host_veth(), u64::from(p.host_veth_ifindex())))
        .collect();
    assert_eq!(bridged, expected);
    let eth0: serde_json::Value =
        serde_json::from_str(&ip(&["-j", "-n", a.netns(), "addr", "show", "eth0"]))?;
    assert_eq!(eth0[0]["operstate"], "UP");
    assert!(ip(&["-n", a.netns(), "link", "show", "lo"]).contains("UP"));
    Ok(())
}

fn node_ip(node: &testbed::Node, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, node.index(), host)
}

#[test]
fn node_processes_run_in_the_node_netns_outside_the_node_cgroup() -> Result<()> {
    let tb = Testbed::new("node_processes")?;
    let node = tb.node("node1")?;
    let pod = node.pod("web")?;
    let echo = pod.serve(ServeMode::Echo, 0)?;
    assert!(echo.addr().port() > 0);

    let agent_like = node.spawn("sleep", ["600"])?;
    assert!(in_netns(agent_like.pid(), &node.netns_path()));
    let cgroup = cgroup_of(agent_like.pid());
    assert_eq!(cgroup, format!("/weft-{}/_host/node1", tb.prefix()));
    assert!(
        !cgroup.starts_with(&relative_cgroup(&node.cgroup_path())),
        "{cgroup}"
    );

    // The node reaches its pods over br0.
    let from_node = node.run(
        Duration::from_secs(20),
        workload_bin(),
        ["connect", "--connect", &echo.addr().to_string()],
    )?;
    assert_eq!(from_node.json()?["ok"], true, "{}", from_node.stdout);
    Ok(())
}

#[test]
fn manifests_describe_the_pod() -> Result<()> {
    let tb = Testbed::new("manifests")?;
    let node = tb.node("node1")?;
    let pod = node.pod_in("shop", "web-0")?;
    let manifest: serde_json::Value =
        serde_json::from_str(&pod.manifest(&[("app", "web"), ("tier", "front")], "web-sa"))?;
    assert_eq!(manifest["apiVersion"], "v1");
    assert_eq!(manifest["kind"], "Pod");
    assert_eq!(manifest["metadata"]["name"], "web-0");
    assert_eq!(manifest["metadata"]["namespace"], "shop");
    assert_eq!(
        manifest["metadata"]["labels"],
        serde_json::json!({ "app": "web", "tier": "front" })
    );
    assert_eq!(manifest["metadata"]["uid"].as_str().map(str::len), Some(36));
    assert!(manifest["metadata"].get("annotations").is_none());
    assert_eq!(manifest["spec"]["serviceAccountName"], "web-sa");
    assert_eq!(manifest["spec"]["nodeName"], "node1");
    assert_eq!(
        manifest["spec"]["containers"],
        serde_json::json!([{ "name": "app", "image": "weft-workload" }])
    );
    assert_eq!(manifest["status"]["podIP"], pod.ip().to_string());
    assert_eq!(
        manifest["status"]["podIPs"],
        serde_json::json!([{ "ip": pod.ip().to_string() }])
    );

    let unmeshed: serde_json::Value = serde_json::from_str(&pod.manifest_unmeshed(&[], "default"))?;
    assert_eq!(
        unmeshed["metadata"]["annotations"]["weft.dev/inject"],
        "disabled"
    );
    assert_eq!(unmeshed["metadata"]["uid"], manifest["metadata"]["uid"]);
    Ok(())
}

#[test]
fn deleting_a_pod_kills_its_processes_and_frees_its_name() -> Result<()> {
    let tb = Testbed::new("delete_pod")?;
    let node = tb.node("node1")?;
    let keep = node.pod("keep")?;
    let doomed_pod = node.pod("doomed")?;
    let mut doomed = doomed_pod.spawn("sleep", ["600"])?;
    let (netns, cgroup, veth) = (
        doomed_pod.netns_path(),
        doomed_pod.cgroup_path(),
        doomed_pod.host_veth().to_owned(),
    );
    doomed_pod.delete()?;
    assert!(!doomed.is_running());
    assert!(!netns.exists() && !cgroup.exists());
    assert!(
        !ip(&["-n", node.netns(), "link"]).contains(&format!("{veth}@")),
        "the veth pair went with the netns"
    );
    assert!(keep.cgroup_path().exists());

    let again = node.pod("doomed")?;
    assert_eq!(again.host_veth(), "vh2", "slots are not reused");
    let echo = again.serve(ServeMode::Echo, 0)?;
    let report = keep.transfer(echo.addr(), 64 * 1024, 2)?;
    assert!(report.all_ok(), "{report:?}");
    Ok(())
}

/// Bytes the node's `uplink` (its side of the fabric) has received, from `ip -s`.
fn uplink_rx_bytes(node: &testbed::Node) -> u64 {
    let out = ip(&[
        "-n",
        node.netns(),
        "-j",
        "-s",
        "link",
        "show",
        "dev",
        "uplink",
    ]);
    let links: serde_json::Value = serde_json::from_str(&out).unwrap();
    links[0]["stats64"]["rx"]["bytes"].as_u64().unwrap()
}

#[test]
fn nodes_are_numbered_and_linked_by_the_fabric() -> Result<()> {
    let tb = Testbed::new("nodes_are_numbered")?;
    let one = tb.node("one")?;
    let two = tb.node("two")?;
    assert_eq!((one.index(), two.index()), (1, 2));
    assert_eq!(two.uplink_ip(), Ipv4Addr::new(198, 18, 0, 2));
    assert!(tb.node("one").is_err(), "duplicate node names are refused");
    assert!(tb.node("Bad_Name").is_err());
    assert_eq!(tb.node_names(), ["one", "two"]);
    let here = one.pod("web")?;
    let there = two.pod("web")?;
    assert_eq!(there.ip(), Ipv4Addr::new(198, 18, 2, 10));
    // Still no default route anywhere: the fabric only links the run's own networks.
    for netns in [one.netns(), two.netns(), here.netns(), there.netns()] {
        assert_eq!(ip(&["-n", netns, "route", "show", "default"]), "");
    }
    let (_server, addr) = echo_server(&there, 8080)?;
    let before = uplink_rx_bytes(&two);
    let report = here.transfer(addr, 1 << 20, 2)?;
    assert!(report.all_ok(), "{report:?}");
    assert_eq!(report.bytes_verified, 2 << 20);
    // The bytes really crossed the link into node two.
    let crossed = uplink_rx_bytes(&two) - before;
    assert!(
        crossed >= 2 << 20,
        "only {crossed} bytes arrived on two's uplink"
    );
    // A third node joins later and reaches the first two.
    let three = tb.node("three")?;
    let third = three.pod("web")?;
    let report = third.transfer(addr, 1 << 16, 1)?;
    assert!(report.all_ok(), "{report:?}");
    let left = tb.teardown()?;
    assert!(left.is_empty(), "{left}");
    Ok(())
}

#[test]
fn hold_sees_no_breakage_on_a_quiet_node() -> Result<()> {
    let tb = Testbed::new("hold")?;
    let node = tb.node("n")?;
    let (client, server) = (node.pod("client")?, node.pod("server")?);
    let echo = server.serve(ServeMode::Echo, 9000)?;
    let hold = client.hold(
        echo.addr(),
        8,
        Duration::from_millis(20),
        Duration::from_secs(30),
    )?;
    let rr = client.rr(echo.addr(), 64, Duration::from_millis(200))?;
    assert!(rr.error.is_none() && rr.transactions > 0, "{rr:?}");
    let reset = client.reset(echo.addr())?;
    assert!(reset.ok, "{reset:?}");
    let report = hold.finish()?;
    assert_eq!((report.conns, report.broken), (8, 0), "{report:?}");
    assert!(report.rounds > 0);
    Ok(())
}

/// Waits for `child` (a process of a crashed run) to be killed.
fn killed(child: &mut std::process::Child) -> Result<()> {
    eventually(Duration::from_secs(10), || {
        let status = child.try_wait()?.context("still running")?;
        ensure!(
            status.signal() == Some(libc::SIGKILL),
            "exited with {status}"
        );
        Ok(())
    })
}

#[test]
fn a_new_testbed_sweeps_crashed_runs_and_orphans_but_not_live_runs() -> Result<()> {
    let alive = Testbed::new("sweep: live neighbour")?;
    alive.node("n")?.pod("p")?;

    // A run whose owner died: its owner record names a pid that no longer exists.
    let crashed = Testbed::new("sweep: crashed")?;
    let crashed_prefix = crashed.prefix().to_owned();
    let pod = crashed.node("n")?.pod("p")?;
    let mut orphan_proc = pod
        .command("sleep")?
        .arg("600")
        .stdin(Stdio::null())
        .spawn()?;
    let mut dead = Command::new("true").spawn()?;
    let dead_pid = dead.id();
    dead.wait()?;
    fs::write(
        Path::new("/run/weft-testbed")
            .join(&crashed_prefix)
            .join("owner.pid"),
        format!("{dead_pid}\n"),
    )?;
    std::mem::forget(crashed);

    // Leftovers of a teardown that died half way: a netns and a cgroup, no state directory.
    let orphan_prefix = format!("wt{:06x}", std::process::id() & 0xff_ffff);
    let orphan_netns = format!("{orphan_prefix}-ghost");
    let orphan_cgroup = Path::new("/sys/fs/cgroup/unified").join(format!("weft-{orphan_prefix}"));
    ip(&["netns", "add", &orphan_netns]);
    fs::create_dir_all(orphan_cgroup.join("ghost"))?;

    let sweeper = Testbed::new("sweep: sweeper")?;
    killed(&mut orphan_proc)?;
    let crashed_left = leftovers(&crashed_prefix)?;
    assert!(crashed_left.is_empty(), "{crashed_left}");
    let orphan_left = leftovers(&orphan_prefix)?;
    assert!(orphan_left.is_empty(), "{orphan_left}");
    let live = alive.leftovers()?;
    assert_eq!(
        live.netns.len(),
        3,
        "the live run keeps its namespaces (fabric, node, pod): {live}"
    );
    assert!(live.state_dir.is_some());

    let (alive_left, sweeper_left) = (alive.teardown()?, sweeper.teardown()?);
    assert!(
        alive_left.is_empty() && sweeper_left.is_empty(),
        "{alive_left}; {sweeper_left}"
    );
    Ok(())
}
