//! The read side of the kernel's flow events ring buffer ([`map_names::EVENTS`]).
use std::path::Path;

use aya::maps::{Map, MapData, RingBuf};
use mesh_common::{FlowEvent, map_names};
use tokio::io::unix::AsyncFd;

use super::{EbpfError, Result};

/// Reads the events the programs write (while the agent asks them to, see
/// [`mesh_common::config_flags::EVENTS`]).
pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    /// Opens the ring buffer pinned in the datapath directory `dir`. Needs a tokio runtime
    /// with I/O enabled.
    ///
    /// # Errors
    /// When the pin is missing or is not a ring buffer, or the runtime cannot watch it.
    pub fn open(dir: &Path) -> Result<Self> {
        let name = map_names::EVENTS;
        let path = dir.join("maps").join(name);
        let data = MapData::from_pin(&path).map_err(|source| EbpfError::Map { name, source })?;
        let ring = RingBuf::try_from(Map::RingBuf(data))
            .map_err(|source| EbpfError::Map { name, source })?;
        // SAFETY: the AsyncFd owns the ring buffer, so its descriptor stays open (and the
        // same) for as long as it is registered.
        #[allow(
            unsafe_code,
            reason = "tokio's registration of a descriptor it does not own"
        )]
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| EbpfError::Io {
                path,
                source: std::io::Error::from(e),
            })?;
        Ok(Self { ring })
    }

    /// Waits for events and appends every one waiting to `out`. Entries of another size (a
    /// program of another build during an upgrade) are skipped.
    ///
    /// # Errors
    /// When the runtime stops watching the ring buffer.
    pub async fn next_batch(&mut self, out: &mut Vec<FlowEvent>) -> std::io::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            // Entries of another size (a program of another build, mid-upgrade) are skipped.
            if let Some(event) = decode(&item) {
                out.push(event);
            }
        }
        guard.clear_ready();
        Ok(())
    }
}

/// A [`FlowEvent`] from the bytes the kernel wrote (native byte order, the struct's own
/// layout; every field is a plain integer, so any bytes of its size make one).
fn decode(b: &[u8]) -> Option<FlowEvent> {
    use std::mem::offset_of;
    if b.len() != size_of::<FlowEvent>() {
        return None;
    }
    let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap_or_default());
    let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap_or_default());
    let key = offset_of!(FlowEvent, key);
    Some(FlowEvent {
        ktime_ns: u64_at(offset_of!(FlowEvent, ktime_ns)),
        opened_ns: u64_at(offset_of!(FlowEvent, opened_ns)),
        tx_bytes: u64_at(offset_of!(FlowEvent, tx_bytes)),
        rx_bytes: u64_at(offset_of!(FlowEvent, rx_bytes)),
        fast_bytes: u64_at(offset_of!(FlowEvent, fast_bytes)),
        key: mesh_common::SockKey {
            local_ip_be: u32_at(key + offset_of!(mesh_common::SockKey, local_ip_be)),
            remote_ip_be: u32_at(key + offset_of!(mesh_common::SockKey, remote_ip_be)),
            local_port_host: u32_at(key + offset_of!(mesh_common::SockKey, local_port_host)),
            remote_port_host: u32_at(key + offset_of!(mesh_common::SockKey, remote_port_host)),
        },
        local_workload: u32_at(offset_of!(FlowEvent, local_workload)),
        remote_workload: u32_at(offset_of!(FlowEvent, remote_workload)),
        rule_id: u32_at(offset_of!(FlowEvent, rule_id)),
        service_id: u32_at(offset_of!(FlowEvent, service_id)),
        orig_dst_ip_be: u32_at(offset_of!(FlowEvent, orig_dst_ip_be)),
        orig_dst_port_be: {
            let o = offset_of!(FlowEvent, orig_dst_port_be);
            u16::from_ne_bytes([b[o], b[o + 1]])
        },
        kind: b[offset_of!(FlowEvent, kind)],
        verdict: b[offset_of!(FlowEvent, verdict)],
        reason: b[offset_of!(FlowEvent, reason)],
        role: b[offset_of!(FlowEvent, role)],
        fast: b[offset_of!(FlowEvent, fast)],
        _pad0: 0,
        _pad1: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_field_from_its_offset() {
        use std::mem::offset_of;
        let mut b = vec![0u8; size_of::<FlowEvent>()];
        b[offset_of!(FlowEvent, tx_bytes)..][..8].copy_from_slice(&1_048_576u64.to_ne_bytes());
        b[offset_of!(FlowEvent, key) + 12..][..4].copy_from_slice(&8080u32.to_ne_bytes());
        b[offset_of!(FlowEvent, orig_dst_port_be)..][..2].copy_from_slice(&80u16.to_be_bytes());
        b[offset_of!(FlowEvent, kind)] = mesh_common::event_kind::CLOSE;
        b[offset_of!(FlowEvent, fast)] = 1;
        let e = decode(&b).unwrap();
        assert_eq!(e.tx_bytes, 1_048_576);
        assert_eq!(e.key.remote_port_host, 8080);
        assert_eq!(u16::from_be(e.orig_dst_port_be), 80);
        assert_eq!(
            (e.kind, e.fast, e.verdict),
            (mesh_common::event_kind::CLOSE, 1, 0)
        );
        assert!(decode(&b[1..]).is_none());
    }
}
