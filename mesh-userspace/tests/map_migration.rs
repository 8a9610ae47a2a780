//! Moving map entries between datapath generations, on real kernel maps (needs root): a value
//! that grew by appended fields keeps every entry, zero-extended, also per CPU; anything else is
//! refused rather than misread.
use std::os::fd::AsFd as _;

use aya::maps::{HashMap, Map, MapData, MapType, PerCpuHashMap, PerCpuValues};
use weft::ebpf::generation::{Layout, migrate};

fn create(map_type: u32, key: u32, value: u32, entries: u32) -> MapData {
    MapData::create(
        aya_obj::Map::new_from_params(map_type, key, value, entries, 0),
        "weft_migr_test",
        None,
    )
    .expect("creating a map needs root and a bpf-capable kernel")
}

fn layout(map_type: MapType, key: u32, value: u32) -> Layout {
    Layout {
        map_type,
        key_size: key,
        value_size: value,
        max_entries: 64,
        flags: 0,
    }
}

const HASH: u32 = 1; // BPF_MAP_TYPE_HASH
const PERCPU_HASH: u32 = 5; // BPF_MAP_TYPE_PERCPU_HASH

#[test]
fn a_grown_value_keeps_every_entry_zero_extended() {
    let mut old = Map::HashMap(create(HASH, 4, 8, 64));
    let new = create(HASH, 4, 16, 64);
    {
        let mut m: HashMap<&mut MapData, u32, u64> = HashMap::try_from(&mut old).unwrap();
        for k in 0..40u32 {
            m.insert(k, u64::from(k) * 1000 + 7, 0).unwrap();
        }
    }
    {
        let Map::HashMap(old) = &old else {
            unreachable!()
        };
        let copied = migrate(
            old.fd().as_fd(),
            &layout(MapType::Hash, 4, 8),
            new.fd().as_fd(),
            &layout(MapType::Hash, 4, 16),
            0,
        )
        .unwrap();
        assert_eq!(copied, Some(40));
    }
    let m: HashMap<_, u32, [u64; 2]> = Map::HashMap(new).try_into().unwrap();
    for k in 0..40u32 {
        assert_eq!(
            m.get(&k, 0).unwrap(),
            [u64::from(k) * 1000 + 7, 0],
            "key {k}"
        );
    }
}

#[test]
fn per_cpu_values_grow_slot_by_slot() {
    let cpus = aya::util::nr_cpus().unwrap();
    let mut old = Map::PerCpuHashMap(create(PERCPU_HASH, 4, 4, 64));
    let new = create(PERCPU_HASH, 4, 12, 64);
    {
        let mut m: PerCpuHashMap<&mut MapData, u32, u32> =
            PerCpuHashMap::try_from(&mut old).unwrap();
        for k in 0..8u32 {
            let values: Vec<u32> = (0..cpus)
                .map(|c| k * 100 + u32::try_from(c).unwrap())
                .collect();
            m.insert(k, PerCpuValues::try_from(values).unwrap(), 0)
                .unwrap();
        }
    }
    let Map::PerCpuHashMap(old) = &old else {
        unreachable!()
    };
    let copied = migrate(
        old.fd().as_fd(),
        &layout(MapType::PerCpuHash, 4, 4),
        new.fd().as_fd(),
        &layout(MapType::PerCpuHash, 4, 12),
        0,
    )
    .unwrap();
    assert_eq!(copied, Some(8));
    let m: PerCpuHashMap<_, u32, [u32; 3]> = Map::PerCpuHashMap(new).try_into().unwrap();
    for k in 0..8u32 {
        let got = m.get(&k, 0).unwrap();
        for (c, v) in got.iter().enumerate() {
            assert_eq!(
                *v,
                [k * 100 + u32::try_from(c).unwrap(), 0, 0],
                "key {k} cpu {c}"
            );
        }
    }
}

#[test]
fn shrunk_values_or_changed_keys_are_not_copied() {
    let old = create(HASH, 4, 16, 64);
    let narrower = create(HASH, 4, 8, 64);
    let other_key = create(HASH, 8, 16, 64);
    assert_eq!(
        migrate(
            old.fd().as_fd(),
            &layout(MapType::Hash, 4, 16),
            narrower.fd().as_fd(),
            &layout(MapType::Hash, 4, 8),
            0
        )
        .unwrap(),
        None
    );
    assert_eq!(
        migrate(
            old.fd().as_fd(),
            &layout(MapType::Hash, 4, 16),
            other_key.fd().as_fd(),
            &layout(MapType::Hash, 8, 16),
            0
        )
        .unwrap(),
        None
    );
}
