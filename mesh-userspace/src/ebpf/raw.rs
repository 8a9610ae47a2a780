//! The few `bpf(2)` commands aya 0.14 keeps private, on byte buffers: walking and copying maps
//! whose value layout is only known at run time (migration between datapath generations), and
//! swapping the program behind a pinned link in one step.
#![allow(unsafe_code, reason = "bpf(2) commands aya does not expose")]

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `BPF_NOEXIST`: only insert, never overwrite.
pub const NOEXIST: u64 = 1;

/// The map-element part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The `link_update` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// The `obj_pin`/`obj_get` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// # Safety
/// `attr` must be the part of `union bpf_attr` that `cmd` reads, and every pointer in it must be
/// valid for the sizes the kernel derives from the map.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: forwarded from the caller; the size passed is that of `T`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the object pinned at `path` (any kind: map, program, link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        ..ObjAttr::default()
    };
    // SAFETY: a NUL-terminated path that outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel just returned this new descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The sizes of a map's keys and of its values as the syscalls see them (a per-CPU value is
/// one 8-byte-aligned slot per possible CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub key: usize,
    pub value: usize,
}

/// The key after `key` (the first key when `None`); `None` at the end of the map.
pub fn next_key(
    map: BorrowedFd<'_>,
    key: Option<&[u8]>,
    size: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut next = vec![0u8; size];
    let mut attr = ElemAttr {
        map_fd: fd_u32(map),
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value: next.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    // SAFETY: `key` (when given) and `next` are `size` bytes, the map's key size.
    match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
        Ok(_) => Ok(Some(next)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The value stored under `key`; `None` when there is none (an LRU map may evict meanwhile).
pub fn lookup(map: BorrowedFd<'_>, key: &[u8], sizes: Sizes) -> io::Result<Option<Vec<u8>>> {
    debug_assert_eq!(key.len(), sizes.key);
    let mut value = vec![0u8; sizes.value];
    let mut attr = ElemAttr {
        map_fd: fd_u32(map),
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        ..ElemAttr::default()
    };
    // SAFETY: the key and value buffers have the map's sizes.
    match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Stores `value` under `key` (`flags`: 0 or [`NOEXIST`]).
pub fn update(
    map: BorrowedFd<'_>,
    key: &[u8],
    value: &[u8],
    sizes: Sizes,
    flags: u64,
) -> io::Result<()> {
    if key.len() != sizes.key || value.len() != sizes.value {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "buffer sizes do not match the map",
        ));
    }
    let mut attr = ElemAttr {
        map_fd: fd_u32(map),
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags,
        ..ElemAttr::default()
    };
    // SAFETY: the key and value buffers have the map's sizes; the kernel only reads them.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// Replaces the program behind `link` with `prog` in one step: no moment without a program,
/// and never two at once.
pub fn link_update(link: impl AsFd, prog: impl AsFd) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: fd_u32(link.as_fd()),
        new_prog_fd: fd_u32(prog.as_fd()),
        ..LinkUpdateAttr::default()
    };
    // SAFETY: two valid descriptors, no pointers.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}
