//! `cargo xtask image` and `cargo xtask cluster up|down|status`: Weft's container images, and a
//! real two-node Kubernetes 1.20 cluster on this machine to run them (the cluster itself is
//! `testbed::cluster`, shared with the end-to-end test).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use testbed::cluster::{self, Cluster, UpOptions};

use crate::{
    envtest,
    image::{self, Entry, ImageSpec},
    run, setup, step, tools, workspace_root,
};

/// What a cluster node runs, from Debian.
pub const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "iptables",
    "bpftool",
    "tcpdump",
    "openssl",
    "iproute2",
    "util-linux",
];

/// The version the chart's default image tag names.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The image archives the cluster imports.
#[derive(Debug, Clone)]
pub struct Images {
    pub weft: PathBuf,
    pub workload: PathBuf,
    pub pause: PathBuf,
    pub busybox: PathBuf,
}

impl Images {
    #[must_use]
    pub fn all(&self) -> Vec<PathBuf> {
        vec![
            self.pause.clone(),
            self.busybox.clone(),
            self.weft.clone(),
            self.workload.clone(),
        ]
    }
}

fn file(src: &Path, dest: &str, mode: u32) -> Entry {
    Entry::File {
        src: src.to_owned(),
        dest: dest.to_owned(),
        mode,
    }
}

/// `/etc/passwd` and `/etc/group` with root and the unprivileged user the chart runs as.
fn accounts() -> Vec<Entry> {
    vec![
        Entry::Bytes {
            data: b"root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532::/:/sbin/nologin\n"
                .to_vec(),
            dest: "/etc/passwd".into(),
            mode: 0o644,
        },
        Entry::Bytes {
            data: b"root:x:0:\nnonroot:x:65532:\n".to_vec(),
            dest: "/etc/group".into(),
            mode: 0o644,
        },
        Entry::Dir {
            dest: "/tmp".into(),
            mode: 0o1777,
        },
    ]
}

/// Debian's static busybox with a link per applet (`sh`, `wget`, `nc`, `httpd`, …).
fn busybox_entries() -> Result<Vec<Entry>> {
    let busybox = Path::new("/bin/busybox");
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .context("running /bin/busybox --list (Debian package busybox-static)")?;
    let mut entries = vec![file(busybox, "/bin/busybox", 0o755)];
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" {
            entries.push(Entry::Symlink {
                target: "/bin/busybox".into(),
                dest: format!("/bin/{applet}"),
            });
        }
    }
    Ok(entries)
}

/// A copy of `binary` without debug information (the image does not need it).
fn stripped(binary: &Path, dir: &Path) -> Result<PathBuf> {
    let name = binary.file_name().context("binary has a file name")?;
    let out = dir.join(name);
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(binary))?;
    Ok(out)
}

/// Writes the image archives into `out_dir`: Weft (the `weft` binary with its eBPF object, and
/// exactly the shared libraries it links), the test workload (with busybox for a shell), and
/// the cluster's `pause` and `busybox` images. Same inputs, same bytes.
pub fn build_images(
    weft: &Path,
    workload: &Path,
    k8s_bin: &Path,
    out_dir: &Path,
) -> Result<Images> {
    std::fs::create_dir_all(out_dir)?;
    let scratch = out_dir.join("stripped");
    std::fs::create_dir_all(&scratch)?;
    let weft = stripped(weft, &scratch)?;
    let workload = stripped(workload, &scratch)?;
    let specs = [
        (
            "weft",
            ImageSpec {
                name: format!("weft:{VERSION}"),
                entries: [
                    vec![file(&weft, "/usr/local/bin/weft", 0o755)],
                    image::with_shared_libraries(std::slice::from_ref(&weft))?,
                    accounts(),
                ]
                .concat(),
                entrypoint: vec!["/usr/local/bin/weft".into()],
                cmd: Vec::new(),
                env: Vec::new(),
                user: Some("65532".into()),
                workdir: None,
            },
        ),
        (
            "weft-workload",
            ImageSpec {
                name: format!("weft-workload:{VERSION}"),
                entries: [
                    vec![file(&workload, "/usr/local/bin/weft-workload", 0o755)],
                    image::with_shared_libraries(std::slice::from_ref(&workload))?,
                    busybox_entries()?,
                    accounts(),
                ]
                .concat(),
                entrypoint: vec!["/usr/local/bin/weft-workload".into()],
                cmd: Vec::new(),
                env: Vec::new(),
                user: None,
                workdir: None,
            },
        ),
        (
            "pause",
            ImageSpec {
                name: "k8s.gcr.io/pause:3.2".into(),
                entries: vec![file(&k8s_bin.join("pause"), "/pause", 0o755)],
                entrypoint: vec!["/pause".into()],
                cmd: Vec::new(),
                env: Vec::new(),
                user: None,
                workdir: None,
            },
        ),
        (
            "busybox",
            ImageSpec {
                name: "busybox:1.35".into(),
                entries: [busybox_entries()?, accounts()].concat(),
                entrypoint: Vec::new(),
                cmd: vec!["sh".into()],
                env: Vec::new(),
                user: None,
                workdir: None,
            },
        ),
    ];
    let mut paths = Vec::new();
    for (file_name, spec) in specs {
        let path = out_dir.join(format!("{file_name}.oci.tar"));
        let info = image::write_archive(&spec, &path)?;
        step!(
            "image {}: {} MiB layer (compressed), {} MiB archive, manifest {}",
            info.reference,
            info.layer_bytes >> 20,
            info.archive_bytes >> 20,
            info.manifest_digest
        );
        paths.push(path);
    }
    std::fs::remove_dir_all(&scratch).ok();
    let [weft, workload, pause, busybox]: [PathBuf; 4] = paths
        .try_into()
        .map_err(|_| anyhow::anyhow!("four images"))?;
    Ok(Images {
        weft,
        workload,
        pause,
        busybox,
    })
}

/// Where `cargo xtask image` writes its archives.
#[must_use]
pub fn image_dir() -> PathBuf {
    workspace_root().join("target/images")
}

/// Everything `up` needs, installed or built if missing.
pub fn prerequisites() -> Result<(PathBuf, PathBuf, PathBuf)> {
    setup::ensure_packages(PACKAGES)?;
    let k8s = envtest::binaries()?;
    let helm = tools::helm()?;
    let kubectl = tools::kubectl()?;
    Ok((k8s, kubectl, helm))
}

/// `cargo xtask cluster up`.
pub fn up(name: &str, images: &Images, kube_proxy: bool) -> Result<Cluster> {
    let (k8s_bin, kubectl, helm) = prerequisites()?;
    let waiting = crate::progress::Waiting::new(&format!(
        "cluster {name}: starting a real Kubernetes 1.20.2 cluster of two nodes (network and mount namespaces, cgroup weft-cluster-{name}; kube-proxy {})",
        if kube_proxy { "on" } else { "off" }
    ));
    let started = std::time::Instant::now();
    let cluster = cluster::up(&UpOptions {
        name: name.to_owned(),
        nodes: 2,
        k8s_bin,
        kubectl,
        helm,
        images: images.all(),
        kube_proxy,
    });
    drop(waiting);
    let cluster = cluster?;
    step!(
        "cluster {name}: both nodes Ready after {:.1}s; kubectl: `cargo xtask cluster kubectl -- get pods -A`",
        started.elapsed().as_secs_f64()
    );
    Ok(cluster)
}

/// `cargo xtask cluster down`.
pub fn down(name: &str) -> Result<()> {
    let waiting = crate::progress::Waiting::new(&format!(
        "cluster {name}: removing every process, mount, cgroup and file it made"
    ));
    let started = std::time::Instant::now();
    let done = cluster::down(name);
    drop(waiting);
    done?;
    step!(
        "cluster {name}: down in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo xtask cluster status`.
pub fn status(name: &str) -> Result<()> {
    let cluster = Cluster::attach(name)?;
    print!("{}", cluster.status()?);
    Ok(())
}

/// `cargo xtask cluster kubectl -- ARGS`.
pub fn kubectl(name: &str, args: &[String]) -> Result<()> {
    let cluster = Cluster::attach(name)?;
    let status = cluster
        .node_command(0, &cluster.kubectl)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args(args)
        .status()?;
    if !status.success() {
        bail!("kubectl: {status}");
    }
    Ok(())
}
