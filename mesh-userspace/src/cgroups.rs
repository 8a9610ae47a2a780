//! Where a pod's processes live in cgroup v2, and the ids the kernel reports for them (the
//! inode numbers of the cgroup directories). The cgroup programs look a socket's cgroup id up in
//! the identity map, so every cgroup of a pod must be in it: the pod's own and, in kubelet's
//! layout, each container's below it.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// How pod cgroups are laid out below the agent's `--cgroup` directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PodCgroups {
    /// `<cgroup>/<namespace>_<pod>` (local mode and the test bed).
    #[default]
    Weft,
    /// kubelet's: found by the pod's UID anywhere in the first three levels, as
    /// `pod<uid>` (cgroupfs driver) or `…-pod<uid with _ for ->.slice` (systemd driver);
    /// containers are cgroups below it.
    Kubelet,
}

/// How deep below a pod cgroup its containers' cgroups are looked for.
const MAX_DEPTH: usize = 3;

/// The ids of `dir` and of every cgroup below it, up to [`MAX_DEPTH`] levels. Empty when `dir`
/// does not exist (yet).
#[must_use]
pub fn subtree_ids(dir: &Path) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        ids.push(meta.ino());
        if depth == MAX_DEPTH {
            continue;
        }
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    ids
}

/// Pod UID → pod cgroup for kubelet's layouts below `root` (`kubepods` or `kubepods.slice`),
/// read in one walk of its first [`MAX_DEPTH`] levels.
#[must_use]
pub fn kubelet_pods(root: &Path) -> HashMap<String, PathBuf> {
    let mut pods = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(uid) = pod_uid(&name) {
                pods.insert(uid, entry.path());
            } else if depth + 1 < MAX_DEPTH {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    pods
}

/// How deep below the cgroup v2 root kubelet's `kubepods` directory is looked for (a kubelet
/// `cgroupRoot` puts it below other directories).
const KUBEPODS_MAX_DEPTH: usize = 4;

/// Finds kubelet's pod cgroup root (`kubepods` for the cgroupfs driver, `kubepods.slice` for
/// systemd) in the cgroup file system mounted at `cgroup_fs`, on hybrid hosts (cgroup v2 at
/// `unified/`) and pure cgroup v2 hosts alike, at any `cgroupRoot`. With `own_pod_uid` (the
/// agent's own pod) the root that holds that pod is chosen, so several kubelets on one machine
/// are told apart; without it there must be exactly one.
///
/// # Errors
/// A message saying what was looked for and found, for the operator.
pub fn find_kubepods(cgroup_fs: &Path, own_pod_uid: Option<&str>) -> Result<PathBuf, String> {
    let v2 = [cgroup_fs.join("unified"), cgroup_fs.to_owned()]
        .into_iter()
        .find(|p| {
            p.join("cgroup.controllers").is_file()
                || p.join("cgroup.procs").is_file() && p.join("cgroup.subtree_control").is_file()
        })
        .ok_or_else(|| {
            format!(
                "no cgroup v2 hierarchy at {} (or its unified/): Weft needs cgroup v2 (hosts with \
                 cgroup v1 only are not supported)",
                cgroup_fs.display()
            )
        })?;
    let mut candidates = Vec::new();
    let mut stack = vec![(v2.clone(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            if name == "kubepods" || name == "kubepods.slice" {
                candidates.push(entry.path());
            } else if depth + 1 < KUBEPODS_MAX_DEPTH {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    candidates.sort();
    if let Some(uid) = own_pod_uid {
        return candidates
            .iter()
            .find(|c| kubelet_pods(c).contains_key(uid))
            .cloned()
            .ok_or_else(|| {
                format!(
                    "none of the kubepods cgroups below {} ({candidates:?}) holds this pod ({uid})",
                    v2.display()
                )
            });
    }
    match candidates.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!("no kubepods cgroup below {}", v2.display())),
        many => Err(format!(
            "several kubepods cgroups below {} ({many:?}): pass --pod-uid (the agent's own pod) \
             or --cgroup",
            v2.display()
        )),
    }
}

/// The UID in a kubelet pod cgroup name: `pod<uid>` or `kubepods[-<qos>]-pod<uid_>.slice`.
fn pod_uid(name: &str) -> Option<String> {
    let rest = match name.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1.replace('_', "-"),
        None => name.strip_prefix("pod")?.to_owned(),
    };
    let uuid_like = rest.len() == 36 && rest.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    uuid_like.then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b3a2c1d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

    #[test]
    fn pod_uids_from_both_cgroup_drivers() {
        assert_eq!(pod_uid(&format!("pod{UID}")).as_deref(), Some(UID));
        let systemd = format!("kubepods-burstable-pod{}.slice", UID.replace('-', "_"));
        assert_eq!(pod_uid(&systemd).as_deref(), Some(UID));
        for other in [
            "burstable",
            "kubepods-besteffort.slice",
            "pod",
            "podnot-a-uid",
        ] {
            assert_eq!(pod_uid(other), None, "{other}");
        }
    }

    #[test]
    fn kubelet_layouts_are_found_and_containers_are_part_of_their_pod() {
        let root = std::env::temp_dir().join(format!("weft-cgroups-test-{}", std::process::id()));
        let systemd = root.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            UID.replace('-', "_")
        ));
        let other = "11111111-2222-4333-8444-555555555555";
        let cgroupfs = root.join(format!("kubepods/besteffort/pod{other}"));
        for d in [
            systemd.join("cri-containerd-aaaa.scope"),
            systemd.join("cri-containerd-bbbb.scope"),
            cgroupfs.join("cccc"),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        let found = kubelet_pods(&root.join("kubepods.slice"));
        assert_eq!(found.get(UID), Some(&systemd));
        assert_eq!(
            kubelet_pods(&root.join("kubepods")).get(other),
            Some(&cgroupfs)
        );
        // The pod and its two containers.
        assert_eq!(subtree_ids(&systemd).len(), 3);
        assert!(subtree_ids(&root.join("missing")).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn kubepods_root_is_found_on_hybrid_and_pure_v2_at_any_cgroup_root() {
        let base = std::env::temp_dir().join(format!("weft-kubepods-test-{}", std::process::id()));
        // Hybrid: cgroup v2 at unified/, two kubelets below a cgroupRoot each.
        let v2 = base.join("hybrid/unified");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("cgroup.controllers"), "").unwrap();
        let mine = v2.join(format!("weft-cluster-e2e/n1/kubepods/besteffort/pod{UID}"));
        let other = v2
            .join("weft-cluster-e2e/n2/kubepods/burstable/pod11111111-2222-4333-8444-555555555555");
        for d in [&mine, &other] {
            std::fs::create_dir_all(d).unwrap();
        }
        let hybrid = base.join("hybrid");
        assert_eq!(
            find_kubepods(&hybrid, Some(UID)).unwrap(),
            v2.join("weft-cluster-e2e/n1/kubepods")
        );
        assert!(
            find_kubepods(&hybrid, None)
                .unwrap_err()
                .contains("several")
        );
        // Pure v2 with the systemd driver.
        let pure = base.join("pure");
        std::fs::create_dir_all(pure.join("kubepods.slice/kubepods-besteffort.slice")).unwrap();
        std::fs::write(pure.join("cgroup.controllers"), "").unwrap();
        assert_eq!(
            find_kubepods(&pure, None).unwrap(),
            pure.join("kubepods.slice")
        );
        // No cgroup v2 at all.
        let v1 = base.join("v1only");
        std::fs::create_dir_all(v1.join("memory")).unwrap();
        assert!(find_kubepods(&v1, None).unwrap_err().contains("cgroup v1"));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
