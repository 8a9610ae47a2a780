//! A chained CNI plugin (`weft-cni`) that enrols each new pod with its node's agent before the
//! pod's containers run, so that a pod's first connection already carries its identity and gets
//! its policy verdict (the approach of istio-cni for ambient mode).
//!
//! The container runtime runs the node's CNI chain when it creates a pod's sandbox, after kubelet
//! has made the pod's cgroup and before any app container starts. Chained after the network
//! plugin, `weft-cni` takes the pod's address from the previous plugin's result and asks the
//! agent (`POST /cni/add` on its admin socket) to enrol the pod: the agent maps the pod's cgroup
//! to its identity, writes its address and policy into the kernel, and answers once that is
//! done. The plugin then passes the previous result on unchanged. Without an answer (the agent
//! is restarting) it fails, and the runtime tries the sandbox again: a pod never starts
//! unenrolled on a node Weft runs on.
//!
//! The agent installs the plugin (a copy of its own binary named `weft-cni`) and adds it to the
//! node's CNI configuration list; on uninstall it takes both out again.
#![deny(unsafe_code)]

use std::{
    io::Read as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The plugin's type in the CNI configuration, and its binary's name.
pub const PLUGIN: &str = "weft-cni";
/// The CNI versions the plugin speaks.
const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// How long ADD waits for the agent by default.
const DEFAULT_TIMEOUT_SECS: u64 = 10;

/// What the plugin asks the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// The pod's network namespace cookie (`SO_NETNS_COOKIE`).
    #[serde(default)]
    pub netns_cookie: Option<u64>,
}

/// The plugin's own settings in the CNI configuration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PluginConf {
    #[serde(default)]
    cni_version: String,
    agent_socket: PathBuf,
    #[serde(default)]
    timeout_seconds: Option<u64>,
    #[serde(default)]
    prev_result: Option<Value>,
}

/// A CNI error result (printed on stdout, exit status 1).
fn error(version: &str, code: u32, msg: &str, details: &str) -> (String, i32) {
    (
        json!({"cniVersion": version, "code": code, "msg": msg, "details": details}).to_string(),
        1,
    )
}

/// Runs the plugin: `env` is the CNI environment (`CNI_COMMAND`, `CNI_ARGS`, …), `stdin` the
/// network configuration. Returns what to print and the exit status.
pub fn plugin(env: &dyn Fn(&str) -> Option<String>, stdin: &str) -> (String, i32) {
    let command = env("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        return (
            json!({"cniVersion": "1.1.0", "supportedVersions": VERSIONS}).to_string(),
            0,
        );
    }
    let conf: PluginConf = match serde_json::from_str(stdin) {
        Ok(c) => c,
        Err(e) => return error("0.4.0", 6, "bad weft-cni configuration", &e.to_string()),
    };
    let version = if conf.cni_version.is_empty() {
        "0.4.0".to_owned()
    } else {
        conf.cni_version.clone()
    };
    // DEL, CHECK, GC, STATUS: nothing to undo or check here (the agent follows pod deletions
    // through the API server).
    if command != "ADD" {
        return (String::new(), 0);
    }
    let Some(prev) = conf.prev_result.clone() else {
        return error(
            &version,
            7,
            "weft-cni must be chained after a network plugin",
            "no prevResult",
        );
    };
    let args = env("CNI_ARGS").unwrap_or_default();
    let arg = |key: &str| {
        args.split(';')
            .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(str::to_owned)
    };
    let (Some(namespace), Some(name)) = (arg("K8S_POD_NAMESPACE"), arg("K8S_POD_NAME")) else {
        // Not a Kubernetes pod: nothing to enrol.
        return (prev.to_string(), 0);
    };
    let Some(ip) = first_ipv4(&prev) else {
        // No IPv4 address (an IPv6-only pod): not meshed yet, pass it on.
        return (prev.to_string(), 0);
    };
    let netns_cookie = env("CNI_NETNS").and_then(|path| match netns_cookie(Path::new(&path)) {
        Ok(cookie) => Some(cookie),
        Err(e) => {
            eprintln!("weft-cni: no network namespace cookie for {path}: {e}");
            None
        }
    });
    let enrolment = Enrolment {
        namespace,
        name,
        ip,
        netns_cookie,
    };
    let timeout = Duration::from_secs(conf.timeout_seconds.unwrap_or(DEFAULT_TIMEOUT_SECS));
    match enrol(&conf.agent_socket, &enrolment, timeout) {
        Ok(()) => (prev.to_string(), 0),
        Err(e) => error(
            &version,
            11,
            "the Weft agent did not enrol the pod (try again later)",
            &e,
        ),
    }
}

/// The cookie the kernel gives network namespace `path` (what BPF programs see for sockets made
/// in it): read from a socket made there, on a thread of its own.
fn netns_cookie(path: &Path) -> std::io::Result<u64> {
    let ns = std::fs::File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let socket = std::net::UdpSocket::bind("0.0.0.0:0")
                    .or_else(|_| std::net::UdpSocket::bind("127.0.0.1:0"))?;
                socket_netns_cookie(&socket)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("thread panicked")))
    })
}

/// `getsockopt(SO_NETNS_COOKIE)` (Linux ≥ 5.14).
#[allow(unsafe_code, reason = "one getsockopt nix has no wrapper for")]
fn socket_netns_cookie(socket: &impl std::os::fd::AsRawFd) -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).unwrap_or(8);
    // SAFETY: a valid socket, and a u64 with its size, as the option wants.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The first IPv4 address of a CNI result (`ips[].address`, e.g. `198.18.1.5/24`).
fn first_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        ip["address"]
            .as_str()?
            .split('/')
            .next()?
            .parse::<Ipv4Addr>()
            .ok()
    })
}

/// Asks the agent, retrying until `timeout`: it answers once the pod is in the kernel.
fn enrol(socket: &Path, enrolment: &Enrolment, timeout: Duration) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let body = serde_json::to_vec(enrolment).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        let answer = rt.block_on(async {
            tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()),
                crate::agent_client::request(socket, hyper::Method::POST, "/cni/add", body.clone()),
            )
            .await
        });
        last = match answer {
            Ok(Ok((status, _))) if status.is_success() => return Ok(()),
            Ok(Ok((status, text))) => format!("{status}: {}", String::from_utf8_lossy(&text)),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_owned(),
        };
        if Instant::now() >= deadline {
            return Err(format!("after {timeout:?}: {last}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Entry point when the binary runs as `weft-cni`.
#[must_use]
pub fn main() -> i32 {
    let mut stdin = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut stdin) {
        let (out, code) = error("0.4.0", 5, "cannot read the configuration", &e.to_string());
        println!("{out}");
        return code;
    }
    let (out, code) = plugin(&|k| std::env::var(k).ok(), &stdin);
    if !out.is_empty() {
        println!("{out}");
    }
    code
}

// --- installation -----------------------------------------------------------------------------

/// Where the node's CNI lives, as the agent sees it, and how the plugin reaches the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CniInstall {
    /// The runtime's plugin directory (e.g. `/opt/cni/bin`, mounted into the agent).
    pub bin_dir: PathBuf,
    /// The runtime's configuration directory (e.g. `/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The agent's admin socket as the node (the plugin) sees it.
    pub agent_socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a CNI configuration list: {message}")]
    Conf { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CniError + '_ {
    move |source| CniError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `data` to `path` through a temporary file and a rename (readers never see half).
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> Result<(), CniError> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension("weft-tmp");
    std::fs::write(&tmp, data).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl CniInstall {
    /// Copies this binary into the plugin directory as `weft-cni` (when it differs).
    ///
    /// # Errors
    /// When the binary cannot be read or written.
    pub fn install_binary(&self) -> Result<(), CniError> {
        let exe = Path::new("/proc/self/exe");
        let ours = std::fs::read(exe).map_err(io(exe))?;
        let target = self.bin_dir.join(PLUGIN);
        if std::fs::read(&target).is_ok_and(|theirs| theirs == ours) {
            return Ok(());
        }
        write_atomically(&target, &ours, 0o755)
    }

    /// The configuration list the runtime uses: the first `*.conflist` by name.
    fn active_conflist(&self) -> Result<Option<PathBuf>, CniError> {
        let mut lists: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(io(&self.conf_dir))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
            .collect();
        lists.sort();
        Ok(lists.into_iter().next())
    }

    /// Makes sure `weft-cni` ends the active configuration list (added when missing; the
    /// network plugin's installer may rewrite the file at any time). Returns whether it changed
    /// the file.
    ///
    /// # Errors
    /// When the list cannot be read, parsed or written.
    pub fn ensure_chained(&self) -> Result<bool, CniError> {
        let Some(path) = self.active_conflist()? else {
            return Ok(false);
        };
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let mut list: Value = serde_json::from_str(&text).map_err(|e| CniError::Conf {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let Some(plugins) = list["plugins"].as_array_mut() else {
            return Err(CniError::Conf {
                path,
                message: "no plugins array".into(),
            });
        };
        let entry = json!({
            "type": PLUGIN,
            "agentSocket": self.agent_socket,
            "timeoutSeconds": DEFAULT_TIMEOUT_SECS,
        });
        if plugins.contains(&entry) {
            return Ok(false);
        }
        plugins.retain(|p| p["type"] != PLUGIN);
        plugins.push(entry);
        let out = serde_json::to_vec_pretty(&list).map_err(|e| CniError::Conf {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_atomically(&path, &out, 0o644)?;
        Ok(true)
    }

    /// Takes `weft-cni` out of every configuration list and removes its binary.
    ///
    /// # Errors
    /// When a list cannot be rewritten or the binary removed.
    pub fn uninstall(&self) -> Result<(), CniError> {
        if let Ok(entries) = std::fs::read_dir(&self.conf_dir) {
            for path in entries.filter_map(Result::ok).map(|e| e.path()) {
                if path.extension().is_none_or(|e| e != "conflist") {
                    continue;
                }
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                let Ok(mut list) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                let Some(plugins) = list["plugins"].as_array_mut() else {
                    continue;
                };
                let before = plugins.len();
                plugins.retain(|p| p["type"] != PLUGIN);
                if plugins.len() != before {
                    let out = serde_json::to_vec_pretty(&list).unwrap_or_default();
                    write_atomically(&path, &out, 0o644)?;
                }
            }
        }
        let binary = self.bin_dir.join(PLUGIN);
        match std::fs::remove_file(&binary) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CniError::Io {
                path: binary,
                source: e,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    const PREV: &str = r#"{"cniVersion":"0.4.0","interfaces":[{"name":"eth0"}],"ips":[{"version":"4","address":"198.18.1.7/24","gateway":"198.18.1.1"}]}"#;

    #[test]
    fn version_lists_what_it_speaks() {
        let (out, code) = plugin(&env(&[("CNI_COMMAND", "VERSION")]), "");
        assert_eq!(code, 0);
        assert!(out.contains("0.4.0") && out.contains("1.0.0"));
    }

    #[test]
    fn del_and_check_succeed_quietly() {
        let conf =
            r#"{"cniVersion":"0.4.0","name":"n","type":"weft-cni","agentSocket":"/nonexistent"}"#;
        for command in ["DEL", "CHECK"] {
            let vars: &'static [(&str, &str)] = if command == "DEL" {
                &[("CNI_COMMAND", "DEL")]
            } else {
                &[("CNI_COMMAND", "CHECK")]
            };
            assert_eq!(plugin(&env(vars), conf), (String::new(), 0));
        }
    }

    #[test]
    fn add_without_an_agent_fails_with_a_retryable_error_and_never_drops_the_result() {
        let conf = format!(
            r#"{{"cniVersion":"0.4.0","name":"n","type":"weft-cni","agentSocket":"/nonexistent/sock","timeoutSeconds":0,"prevResult":{PREV}}}"#
        );
        let vars = &[
            ("CNI_COMMAND", "ADD"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1",
            ),
        ];
        let (out, code) = plugin(&env(vars), &conf);
        assert_eq!(code, 1);
        let err: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(err["code"], 11);
        // Not a pod: passed on unchanged.
        let (out, code) = plugin(&env(&[("CNI_COMMAND", "ADD")]), &conf);
        assert_eq!(code, 0);
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            serde_json::from_str::<Value>(PREV).unwrap()
        );
        assert_eq!(
            first_ipv4(&serde_json::from_str(PREV).unwrap()),
            Some(Ipv4Addr::new(198, 18, 1, 7))
        );
    }

    #[test]
    fn chaining_is_added_once_kept_current_and_removed() {
        let dir = std::env::temp_dir().join(format!("weft-cni-test-{}", std::process::id()));
        let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        let list = conf.join("10-bridge.conflist");
        std::fs::write(
            &list,
            r#"{"cniVersion":"0.4.0","name":"k8s","plugins":[{"type":"bridge","bridge":"cni0"}]}"#,
        )
        .unwrap();
        std::fs::write(conf.join("99-other.conflist"), r#"{"plugins":[]}"#).unwrap();
        let install = CniInstall {
            bin_dir: bin.clone(),
            conf_dir: conf.clone(),
            agent_socket: "/run/weft/admin.sock".into(),
        };
        assert!(install.ensure_chained().unwrap());
        assert!(!install.ensure_chained().unwrap(), "idempotent");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][1]["type"], PLUGIN);
        assert_eq!(v["plugins"][1]["agentSocket"], "/run/weft/admin.sock");
        // Only the active (first) list is changed.
        assert!(
            !std::fs::read_to_string(conf.join("99-other.conflist"))
                .unwrap()
                .contains(PLUGIN)
        );
        install.install_binary().unwrap();
        assert!(bin.join(PLUGIN).is_file());
        install.uninstall().unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 1);
        assert!(!bin.join(PLUGIN).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
