//! Per-CPU counters. Updates are plain read-modify-write: each CPU owns its copy.
use mesh_common::{PairKey, PairStats, ZERO_PAIR_STATS};

use crate::maps::{WEFT_GLOBAL, WEFT_PAIRSTATS};

/// Inserted by reference: a zeroed struct on the BPF stack would need a `memset` call.
static ZERO_PAIR: PairStats = ZERO_PAIR_STATS;

#[inline(always)]
pub fn bump(counter: usize) {
    if let Some(stats) = WEFT_GLOBAL.get_ptr_mut(0) {
        if counter < mesh_common::global_counter::COUNT {
            // SAFETY: per-CPU value owned by this CPU for the duration of the program.
            unsafe { (*stats).counters[counter] += 1 };
        }
    }
}

/// Applies `update` to the per-CPU stats of one (source, destination) workload pair.
#[inline(always)]
pub fn pair(src_workload: u32, dst_workload: u32, update: impl FnOnce(&mut PairStats)) {
    let key = PairKey {
        src_workload,
        dst_workload,
    };
    let mut ptr = WEFT_PAIRSTATS.get_ptr_mut(&key);
    if ptr.is_none() {
        // BPF_NOEXIST: a racing insert from another CPU is fine, we re-read below.
        let _ = WEFT_PAIRSTATS.insert(&key, &ZERO_PAIR, 1);
        ptr = WEFT_PAIRSTATS.get_ptr_mut(&key);
    }
    if let Some(p) = ptr {
        // SAFETY: per-CPU value, valid while the program runs.
        update(unsafe { &mut *p });
    }
}
