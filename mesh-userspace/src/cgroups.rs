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
}
