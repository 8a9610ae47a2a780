//! A real Kubernetes control plane for the tests, envtest style: etcd and kube-apiserver from
//! `$KUBEBUILDER_ASSETS` (`cargo xtask test` provides them; see `xtask/src/envtest.rs`), run as
//! node processes of a testbed node. They listen on that node's loopback only, so nothing is
//! reachable from the host, and the run's teardown (or the sweep after a crash) stops them.
//!
//! The test process reaches the API server from a thread that has joined the node's network
//! namespace ([`ControlPlane::block_on`]); Weft's own processes in the node get a kubeconfig
//! file ([`ControlPlane::kubeconfig_path`]).
use std::{
    fs,
    future::Future,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use ::kube::{
    Api,
    api::{DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::Scope,
};
use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

use crate::{Node, Proc, eventually};

/// The `helm` arguments (before the chart path) that render `deploy/manifests/weft.yaml`:
/// `cargo xtask manifests` writes it with them and a test checks it is current with them.
pub const CHART_RENDER_ARGS: &[&str] = &[
    "template",
    "weft",
    "--namespace",
    "weft-system",
    "--include-crds",
];

/// The API server's secure port on the node's loopback.
pub const API_PORT: u16 = 6443;
const ETCD_CLIENT: &str = "http://127.0.0.1:2379";
/// The bearer token of the test's cluster-admin (`system:masters`).
const ADMIN_TOKEN: &str = "weft-test-admin-token";
/// A token the API server knows as the agents' service account (what `weft controller`'s
/// certificate service accepts by default).
pub const AGENT_TOKEN: &str = "weft-test-agent-token";
/// A token of some other user, valid for the API server.
pub const OTHER_TOKEN: &str = "weft-test-other-token";

/// Where the binaries are: `$KUBEBUILDER_ASSETS`, the envtest convention.
pub fn assets_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("KUBEBUILDER_ASSETS").context(
        "KUBEBUILDER_ASSETS is not set: run the tests with `cargo xtask test`, which provides \
         kube-apiserver and etcd (or `cargo xtask envtest` prints a directory to set it to)",
    )?;
    let dir = PathBuf::from(dir);
    for bin in ["kube-apiserver", "etcd"] {
        ensure!(
            dir.join(bin).is_file(),
            "KUBEBUILDER_ASSETS={} has no {bin}",
            dir.display()
        );
    }
    Ok(dir)
}

/// The kubeconfig [`ControlPlane::kubeconfig_path`] will give for `node`, written before the
/// API server starts: for a client that must cope with a server that is not there yet.
pub fn kubeconfig_before_start(node: &Node) -> Result<PathBuf> {
    let dir = node.run_dir().join("kube");
    fs::create_dir_all(&dir)?;
    write_kubeconfig(&dir, "kubeconfig", Ipv4Addr::LOCALHOST)
}

fn write_kubeconfig(dir: &Path, file: &str, server: Ipv4Addr) -> Result<PathBuf> {
    let path = dir.join(file);
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: 'https://{server}:{API_PORT}', insecure-skip-tls-verify: true}}
users:
- name: admin
  user: {{token: {ADMIN_TOKEN}}}
contexts:
- name: test
  context: {{cluster: test, user: admin}}
current-context: test
"
    );
    fs::write(&path, text)?;
    Ok(path)
}

/// Weft's CRDs as shipped: the files the Helm chart installs (deploy/helm/weft/crds).
pub fn shipped_crds() -> Result<Vec<CustomResourceDefinition>> {
    let dir = crate::workspace_dir().join("deploy/helm/weft/crds");
    let mut crds = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let text = fs::read_to_string(&path)?;
        crds.push(
            serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
        );
    }
    ensure!(crds.len() >= 3, "expected Weft's CRDs in {}", dir.display());
    Ok(crds)
}

/// etcd and kube-apiserver running in `node`; stopped on drop.
pub struct ControlPlane {
    node: Node,
    dir: PathBuf,
    // Dropped in this order: the API server before its etcd.
    apiserver: Proc,
    etcd: Proc,
}

impl ControlPlane {
    /// Starts etcd, then the API server, and waits until the server is ready.
    pub fn start(node: &Node) -> Result<Self> {
        let assets = assets_dir()?;
        let dir = node.run_dir().join("kube");
        fs::create_dir_all(dir.join("certs"))?;
        let etcd = node.spawn(
            assets.join("etcd"),
            [
                "--name=default",
                &format!("--data-dir={}", dir.join("etcd").display()),
                &format!("--listen-client-urls={ETCD_CLIENT}"),
                &format!("--advertise-client-urls={ETCD_CLIENT}"),
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=default=http://127.0.0.1:2380",
                "--log-level=warn",
            ],
        )?;
        write_credentials(node, &dir)?;
        let d = |name: &str| dir.join(name).display().to_string();
        let apiserver = node.spawn(
            assets.join("kube-apiserver"),
            [
                format!("--etcd-servers={ETCD_CLIENT}"),
                // Every address of the node: its loopback for its own processes, its fabric
                // address for agents on the run's other nodes.
                "--bind-address=0.0.0.0".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={API_PORT}"),
                "--insecure-port=0".into(),
                format!("--cert-dir={}", d("certs")),
                format!("--token-auth-file={}", d("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", d("sa.pub")),
                format!("--service-account-signing-key-file={}", d("sa.key")),
                "--service-cluster-ip-range=198.19.96.0/20".into(),
                // No controller-manager: no Endpoints reconciler, and no service-account
                // token controller for the ServiceAccount admission plugin to wait for.
                "--endpoint-reconciler-type=none".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                "--v=0".into(),
            ],
        )?;
        let mut cp = Self {
            node: node.clone(),
            dir,
            apiserver,
            etcd,
        };
        cp.wait_ready(Duration::from_mins(1))?;
        Ok(cp)
    }

    /// [`ControlPlane::start`], then Weft's CRDs applied as shipped.
    pub fn start_with_weft_crds(node: &Node) -> Result<Self> {
        let cp = Self::start(node)?;
        for crd in shipped_crds()? {
            cp.apply(&serde_saphyr::to_string(&crd)?)?;
        }
        Ok(cp)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let url = format!("https://127.0.0.1:{API_PORT}/readyz");
        let auth = format!("Authorization: Bearer {ADMIN_TOKEN}");
        let result = eventually(timeout, || {
            for p in [&mut self.etcd, &mut self.apiserver] {
                if !p.is_running() {
                    bail!("{} exited: {}", p.label(), last_lines(&p.stderr(), 15));
                }
            }
            let out = self.node.run(
                Duration::from_secs(5),
                "curl",
                ["-sk", "--max-time", "2", "-H", &auth, &url],
            )?;
            ensure!(out.stdout.trim() == "ok", "readyz: {:?}", out.stdout);
            Ok(())
        });
        result.with_context(|| {
            format!(
                "kube-apiserver not ready; its log ends with:\n{}",
                last_lines(&self.apiserver.stderr(), 15)
            )
        })
    }

    /// A kubeconfig for processes in the node: the admin token, the server's self-signed
    /// certificate trusted as is.
    pub fn kubeconfig_path(&self) -> Result<PathBuf> {
        self.kubeconfig_at("kubeconfig", Ipv4Addr::LOCALHOST)
    }

    /// The same for processes on the run's other nodes: the server at this node's fabric
    /// address.
    pub fn kubeconfig_for_other_nodes(&self) -> Result<PathBuf> {
        self.kubeconfig_at("kubeconfig-remote", self.node.uplink_ip())
    }

    fn kubeconfig_at(&self, file: &str, server: Ipv4Addr) -> Result<PathBuf> {
        write_kubeconfig(&self.dir, file, server)
    }

    /// Starts `weft controller` in the node against this server (its Lease in namespace
    /// `default`), with `extra` arguments. Unless they say `--listen`, its metrics and page
    /// listen on a free loopback port (replicas share the node's network namespace here).
    pub fn spawn_controller(&self, extra: &[&str]) -> Result<Proc> {
        let kubeconfig = self.kubeconfig_path()?.display().to_string();
        let mut args = vec![
            "controller",
            "--kubeconfig",
            &kubeconfig,
            "--namespace",
            "default",
        ];
        if !extra.contains(&"--listen") {
            args.extend_from_slice(&["--listen", "127.0.0.1:0"]);
        }
        args.extend_from_slice(extra);
        self.node.spawn(crate::weft_bin(), args)
    }

    /// The last `lines` lines of the API server's log, for failure messages.
    #[must_use]
    pub fn log_tail(&self, lines: usize) -> String {
        last_lines(&self.apiserver.stderr(), lines)
    }

    /// Runs `f` with a client of this API server, on a thread inside the node's network
    /// namespace (where the server listens), and returns its result.
    pub fn block_on<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(::kube::Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>>,
    {
        let netns = self.node.netns_path();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter_netns(&netns)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let mut config =
                        ::kube::Config::new(format!("https://127.0.0.1:{API_PORT}").parse()?);
                    config.auth_info.token = Some(ADMIN_TOKEN.to_owned().into());
                    config.accept_invalid_certs = true;
                    config.read_timeout = Some(Duration::from_secs(30));
                    let client = ::kube::Client::try_from(config)?;
                    f(client).await
                })
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the API client thread panicked"))?
        })
    }
}

impl ControlPlane {
    /// Server-side applies every document of `yaml` (any kind the server serves), like
    /// `kubectl apply --server-side`; a document's `status` is then written to the status
    /// subresource (Pods carry their IP there).
    pub fn apply(&self, yaml: &str) -> Result<()> {
        self.apply_with(yaml, false).map(drop)
    }

    /// [`ControlPlane::apply`], returning when its first write left this client: after the
    /// connection and discovery, which are the client's cost, not the change's (the scale bench
    /// times a change from here).
    pub fn apply_sent_at(&self, yaml: &str) -> Result<SystemTime> {
        self.apply_with(yaml, false)?.context("nothing to apply")
    }

    /// [`ControlPlane::apply`] as a server-side dry run: the server validates and admits every
    /// object (schemas, defaults, RBAC rules) and stores nothing.
    pub fn apply_dry_run(&self, yaml: &str) -> Result<()> {
        self.apply_with(yaml, true).map(drop)
    }

    /// Applies `yaml`; the time its first write was sent.
    fn apply_with(&self, yaml: &str, dry_run: bool) -> Result<Option<SystemTime>> {
        let docs = documents(yaml)?;
        self.block_on(move |client| async move {
            let mut params = PatchParams::apply("weft-tests").force();
            params.dry_run = dry_run;
            let mut sent = None;
            for mut doc in docs {
                // What the server assigns is not the client's to set.
                if let Some(meta) = doc["metadata"].as_object_mut() {
                    for field in ["uid", "resourceVersion", "creationTimestamp", "generation"] {
                        meta.remove(field);
                    }
                }
                let (api, name) = api_for(&client, &doc).await?;
                sent.get_or_insert_with(SystemTime::now);
                api.patch(&name, &params, &Patch::Apply(&doc))
                    .await
                    .with_context(|| format!("applying {}", describe(&doc)))?;
                if doc.get("status").is_some() && !dry_run {
                    // A merge patch: an apply of the status alone by the same field manager
                    // would drop the fields of the first apply (labels) on a 1.20 server.
                    let status = serde_json::json!({ "status": doc["status"] });
                    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await
                        .with_context(|| format!("applying the status of {}", describe(&doc)))?;
                }
            }
            Ok(sent)
        })
    }

    /// Deletes the objects `yaml` names (absent ones are fine), at once: no kubelet runs here to
    /// finish a Pod's graceful termination, so the grace period is 0.
    pub fn delete(&self, yaml: &str) -> Result<()> {
        self.delete_with(yaml).map(drop)
    }

    /// [`ControlPlane::delete`], returning when its first request left this client (see
    /// [`ControlPlane::apply_sent_at`]).
    pub fn delete_sent_at(&self, yaml: &str) -> Result<SystemTime> {
        self.delete_with(yaml)?.context("nothing to delete")
    }

    /// Deletes what `yaml` names; the time its first request was sent.
    fn delete_with(&self, yaml: &str) -> Result<Option<SystemTime>> {
        let docs = documents(yaml)?;
        self.block_on(move |client| async move {
            let mut sent = None;
            for doc in docs {
                let (api, name) = api_for(&client, &doc).await?;
                sent.get_or_insert_with(SystemTime::now);
                match api
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await
                {
                    Ok(_) => {}
                    Err(::kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("deleting {}", describe(&doc)));
                    }
                }
            }
            Ok(sent)
        })
    }
}

/// The documents of a multi-document YAML text, empty ones skipped.
fn documents(yaml: &str) -> Result<Vec<serde_json::Value>> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).context("parsing YAML")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn describe(doc: &serde_json::Value) -> String {
    format!(
        "{} {}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["namespace"].as_str().unwrap_or("-"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// The API of `doc`'s kind (found by discovery) in its namespace, and its name.
async fn api_for(
    client: &::kube::Client,
    doc: &serde_json::Value,
) -> Result<(Api<DynamicObject>, String)> {
    let api_version = doc["apiVersion"].as_str().context("no apiVersion")?;
    let kind = doc["kind"].as_str().context("no kind")?;
    let name = doc["metadata"]["name"]
        .as_str()
        .context("no metadata.name")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, caps) = ::kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("the API server does not serve {api_version} {kind}"))?;
    let api = match (caps.scope, doc["metadata"]["namespace"].as_str()) {
        (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
        (Scope::Namespaced, ns) => {
            Api::namespaced_with(client.clone(), ns.unwrap_or("default"), &resource)
        }
    };
    Ok((api, name.to_owned()))
}

/// The token file (a cluster-admin, the agents' service account, another user) and the
/// service-account signing key pair.
fn write_credentials(node: &Node, dir: &Path) -> Result<()> {
    fs::write(
        dir.join("tokens.csv"),
        format!(
            "{ADMIN_TOKEN},weft-test-admin,weft-test-admin,system:masters\n\
             {AGENT_TOKEN},system:serviceaccount:weft-system:weft-agent,weft-test-agent\n\
             {OTHER_TOKEN},weft-test-other,weft-test-other\n"
        ),
    )?;
    let key = dir.join("sa.key").display().to_string();
    let public = dir.join("sa.pub").display().to_string();
    node.run(
        Duration::from_secs(30),
        "openssl",
        ["genrsa", "-out", &key, "2048"],
    )?
    .check()?;
    node.run(
        Duration::from_secs(30),
        "openssl",
        ["rsa", "-in", &key, "-pubout", "-out", &public],
    )?
    .check()?;
    Ok(())
}

/// Moves the calling thread (only it) into the network namespace at `path`.
fn enter_netns(path: &Path) -> Result<()> {
    let file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering {}", path.display()))
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}
