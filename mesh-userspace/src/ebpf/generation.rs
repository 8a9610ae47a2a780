//! Datapath generations: what an agent does with the pins an agent of another build left.
//!
//! A node's pinned datapath records which build wrote it (`<dir>/generation`: the contract's
//! [`ABI_VERSION`] and the SHA-256 of the eBPF object). An agent of the same build adopts the pins
//! untouched. An agent of another build, or one configured with other map sizes, upgrades them
//! in place:
//! 1. every pinned map whose layout (type, key and value size, capacity, flags) matches the new
//!    object is kept as it is, with its entries;
//! 2. every other map is moved to `<dir>/retired/<n>/` and a map of the new layout takes its
//!    name; entries are copied across, zero-extended, when only the value grew (the rule in
//!    [`mesh_common::ABI_VERSION`]); a sockhash cannot be copied and stays retired, with its
//!    sockets and their old `sk_msg`, until its last connection has closed;
//! 3. the new programs are loaded against those maps, and once the agent has written its
//!    configuration into them, each pinned link is switched to its new program with one
//!    `BPF_LINK_UPDATE` — no instant without a program, never two at once.
//!
//! Established connections never notice: fast-path sockets keep the programs they were
//! linked with, and what the kernel remembers about live flows (connect verdicts, original
//! destinations, counters) moves with them.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::maps::{Array, MapData, MapInfo, MapType};
use mesh_common::{ABI_VERSION, map_names};
use sha2::Digest as _;

use super::{EbpfError, OBJECT, Result, io, raw};

/// Where the generation record is pinned, below a node's bpffs directory.
pub const GENERATION_PIN: &str = "generation";
/// Where replaced maps wait, below a node's bpffs directory.
pub const RETIRED_DIR: &str = "retired";

/// The value of the generation record: the ABI version (little endian), the programs' log
/// level (fixed at load, so part of what was loaded), 3 bytes of padding, the SHA-256 of the
/// eBPF object.
pub type Fingerprint = [u8; 40];

/// This build's fingerprint, its programs loaded with `log`.
#[must_use]
pub fn fingerprint(log: super::LogLevel) -> Fingerprint {
    let mut fp = [0u8; 40];
    fp[..4].copy_from_slice(&ABI_VERSION.to_le_bytes());
    fp[4] = log as u8;
    fp[8..].copy_from_slice(&sha2::Sha256::digest(OBJECT));
    fp
}

/// The ABI version in a fingerprint.
#[must_use]
pub fn abi_of(fp: &Fingerprint) -> u32 {
    u32::from_le_bytes([fp[0], fp[1], fp[2], fp[3]])
}

/// The short, printable form of a fingerprint: `abi<N>-<first 12 hex digits of the object hash>`.
#[must_use]
pub fn describe(fp: &Fingerprint) -> String {
    use std::fmt::Write as _;
    let hash = fp[8..14].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    });
    match fp[4] {
        0 => format!("abi{}-{hash}", abi_of(fp)),
        level => format!("abi{}-{hash}-log{level}", abi_of(fp)),
    }
}

/// The generation recorded in `dir`, if any (datapaths pinned before generations existed have
/// none).
#[must_use]
pub fn read(dir: &Path) -> Option<Fingerprint> {
    let data = MapData::from_pin(dir.join(GENERATION_PIN)).ok()?;
    let map = aya::maps::Map::from_map_data(data).ok()?;
    let array: Array<MapData, Fingerprint> = map.try_into().ok()?;
    array.get(&0, 0).ok()
}

/// Records `fp` as the generation of the datapath in `dir`.
pub fn write(dir: &Path, fp: &Fingerprint) -> Result<()> {
    let path = dir.join(GENERATION_PIN);
    let name = "generation";
    if !path.exists() {
        Array::<MapData, Fingerprint>::create(1, 0)
            .map_err(|source| EbpfError::Map { name, source })?
            .pin(&path)
            .map_err(|source| EbpfError::Pin {
                path: path.clone(),
                source,
            })?;
    }
    let mut array: Array<MapData, Fingerprint> = MapData::from_pin(&path)
        .and_then(|data| aya::maps::Map::from_map_data(data)?.try_into())
        .map_err(|source| EbpfError::Map { name, source })?;
    array
        .set(0, *fp, 0)
        .map_err(|source| EbpfError::Map { name, source })
}

/// A map's shape: a pinned map is reused only when its shape is exactly the wanted one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl Layout {
    fn of_info(info: &MapInfo) -> Option<Self> {
        Some(Self {
            map_type: info.map_type().ok()?,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    fn per_cpu(&self) -> bool {
        matches!(
            self.map_type,
            MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash
        )
    }

    fn holds_sockets(&self) -> bool {
        matches!(self.map_type, MapType::SockHash | MapType::SockMap)
    }

    /// The sizes of a key and of a whole value (all CPUs' slots) in the map syscalls.
    fn sizes(&self) -> Result<raw::Sizes> {
        let value = usize::try_from(self.value_size).unwrap_or(usize::MAX);
        let value = if self.per_cpu() {
            value.next_multiple_of(8) * cpus()?
        } else {
            value
        };
        Ok(raw::Sizes {
            key: usize::try_from(self.key_size).unwrap_or(usize::MAX),
            value,
        })
    }
}

fn cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(what, source)| EbpfError::Io {
        path: PathBuf::from(what),
        source,
    })
}

/// The layout each map of the embedded object will have (with the agent's size overrides).
pub fn wanted_layouts(overrides: &[(&str, u32)]) -> Result<BTreeMap<String, Layout>> {
    let object = aya_obj::Object::parse(OBJECT).map_err(|e| EbpfError::Io {
        path: PathBuf::from("embedded eBPF object"),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut layouts = BTreeMap::new();
    for (name, map) in &object.maps {
        if !map_names::ALL.contains(&name.as_str()) {
            continue;
        }
        let map_type = aya_obj::generated::bpf_map_type::try_from(map.map_type())
            .ok()
            .and_then(|t| MapType::try_from(t).ok())
            .ok_or(EbpfError::MissingProgram(
                "a map of a type this aya does not know",
            ))?;
        let max_entries = overrides
            .iter()
            .find(|(n, _)| n == name)
            .map_or(map.max_entries(), |(_, v)| *v);
        layouts.insert(
            name.clone(),
            Layout {
                map_type,
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries,
                flags: map.map_flags(),
            },
        );
    }
    Ok(layouts)
}

/// The layout of the map pinned at `path`, if one is.
#[must_use]
pub fn pinned_layout(path: &Path) -> Option<Layout> {
    Layout::of_info(&MapInfo::from_pin(path).ok()?)
}

/// A map moved aside by an upgrade.
#[derive(Debug, Clone)]
pub struct Retired {
    pub name: String,
    pub path: PathBuf,
    pub layout: Layout,
}

/// Moves the pins of the maps in `<dir>/maps` whose layout is not the wanted one (all of them when
/// `all`) to a fresh `<dir>/retired/<n>/`, so that loading the object creates them anew.
pub fn retire_changed(
    dir: &Path,
    wanted: &BTreeMap<String, Layout>,
    all: bool,
) -> Result<Vec<Retired>> {
    let retired_root = dir.join(RETIRED_DIR);
    let mut slot = None;
    let mut out = Vec::new();
    for (name, want) in wanted {
        let pin = dir.join("maps").join(name);
        let Some(have) = pinned_layout(&pin) else {
            continue;
        };
        if have == *want && !all {
            continue;
        }
        let slot_dir = if let Some(s) = &slot {
            s
        } else {
            let mut n = 0u32;
            while retired_root.join(n.to_string()).exists() {
                n += 1;
            }
            let d = retired_root.join(n.to_string());
            std::fs::create_dir_all(&d).map_err(io(&d))?;
            slot.insert(d)
        };
        let to = slot_dir.join(name);
        std::fs::rename(&pin, &to).map_err(io(&pin))?;
        tracing::info!(map = %name, ?have, ?want, "map layout changed: retiring the pinned map");
        out.push(Retired {
            name: name.clone(),
            path: to,
            layout: have,
        });
    }
    Ok(out)
}

/// Copies every entry of `old` into `new` that the contract's evolution rule allows: same type,
/// key size and flags, and a value that only grew (zero-extended, per CPU slot for per-CPU
/// maps). Returns how many entries were copied; `None` when the layouts are not compatible.
/// With `raw::NOEXIST` in `flags`, entries already in `new` win.
pub fn migrate(
    old: BorrowedFd<'_>,
    old_layout: &Layout,
    new: BorrowedFd<'_>,
    new_layout: &Layout,
    flags: u64,
) -> Result<Option<usize>> {
    if old_layout.map_type != new_layout.map_type
        || old_layout.key_size != new_layout.key_size
        || old_layout.flags != new_layout.flags
        || old_layout.value_size > new_layout.value_size
        || old_layout.holds_sockets()
        // A ring buffer holds no entries to copy (events in flight are lost with it).
        || old_layout.map_type == MapType::RingBuf
    {
        return Ok(None);
    }
    let (from, to) = (old_layout.sizes()?, new_layout.sizes()?);
    let widen = |value: &[u8]| -> Vec<u8> {
        if from.value == to.value {
            return value.to_vec();
        }
        let mut out = vec![0u8; to.value];
        if old_layout.per_cpu() {
            let (old_slot, new_slot) = (
                (old_layout.value_size as usize).next_multiple_of(8),
                (new_layout.value_size as usize).next_multiple_of(8),
            );
            for (i, chunk) in value.chunks(old_slot).enumerate() {
                let at = i * new_slot;
                if let Some(dst) = out.get_mut(at..at + chunk.len()) {
                    dst.copy_from_slice(chunk);
                }
            }
        } else {
            out[..value.len()].copy_from_slice(value);
        }
        out
    };
    let err = |source: std::io::Error| EbpfError::Io {
        path: PathBuf::from("map migration"),
        source,
    };
    let mut copied = 0;
    let mut key = raw::next_key(old, None, from.key).map_err(err)?;
    while let Some(k) = key {
        if let Some(value) = raw::lookup(old, &k, from).map_err(err)? {
            match raw::update(new, &k, &widen(&value), to, flags) {
                Ok(()) => copied += 1,
                // NOEXIST and the new map already has it, or a full map: keep going.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::E2BIG)) => {}
                Err(e) => return Err(err(e)),
            }
        }
        key = raw::next_key(old, Some(&k), from.key).map_err(err)?;
    }
    Ok(Some(copied))
}

/// Copies what can be kept from each retired map into the map now pinned under its name.
pub fn migrate_retired(dir: &Path, retired: &[Retired], flags: u64) -> Result<()> {
    for r in retired {
        let new_pin = dir.join("maps").join(&r.name);
        let (Ok(old), Ok(new), Some(new_layout)) = (
            raw::obj_get(&r.path),
            raw::obj_get(&new_pin),
            pinned_layout(&new_pin),
        ) else {
            continue;
        };
        match migrate(old.as_fd(), &r.layout, new.as_fd(), &new_layout, flags)? {
            Some(n) => tracing::info!(map = %r.name, entries = n, "map migrated"),
            None if r.layout.holds_sockets() => {
                tracing::info!(map = %r.name, "sockhash retired until its last connection closes");
            }
            None => tracing::warn!(
                map = %r.name, old = ?r.layout, new = ?new_layout,
                "map layout changed incompatibly: the new map starts empty"
            ),
        }
    }
    Ok(())
}

/// How many sockets the retired sockhashes still hold, after unpinning every retired map that
/// is no longer needed (everything but non-empty sockhashes) and removing empty slots.
pub fn sweep_retired(dir: &Path) -> Result<usize> {
    let root = dir.join(RETIRED_DIR);
    let Ok(slots) = std::fs::read_dir(&root) else {
        return Ok(0);
    };
    let mut held = 0;
    for slot in slots.filter_map(Result::ok) {
        let slot = slot.path();
        for entry in std::fs::read_dir(&slot)
            .map_err(io(&slot))?
            .filter_map(Result::ok)
        {
            let path = entry.path();
            let keep = match pinned_layout(&path) {
                Some(layout) if layout.holds_sockets() => {
                    let n = count_keys(&path, &layout)?;
                    held += n;
                    n > 0
                }
                _ => false,
            };
            if !keep {
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
        }
        if std::fs::read_dir(&slot)
            .map_err(io(&slot))?
            .next()
            .is_none()
        {
            std::fs::remove_dir(&slot).map_err(io(&slot))?;
        }
    }
    if std::fs::read_dir(&root)
        .map_err(io(&root))?
        .next()
        .is_none()
    {
        std::fs::remove_dir(&root).map_err(io(&root))?;
    }
    Ok(held)
}

fn count_keys(path: &Path, layout: &Layout) -> Result<usize> {
    let fd = raw::obj_get(path).map_err(io(path))?;
    let size = layout.sizes()?.key;
    let mut n = 0;
    let mut key = raw::next_key(fd.as_fd(), None, size).map_err(io(path))?;
    while let Some(k) = key {
        n += 1;
        key = raw::next_key(fd.as_fd(), Some(&k), size).map_err(io(path))?;
    }
    Ok(n)
}
