//! Root-free check of the kernel contract: the embedded eBPF object declares exactly the maps and
//! programs mesh-common names, with the key and value sizes of mesh-common's types. A field added
//! on one side only fails here, not as silent lookup misses in the kernel.
use std::collections::BTreeSet;

use mesh_common::{MAP_LAYOUT, map_names, program_names};

fn object() -> aya_obj::Object {
    aya_obj::Object::parse(weft::ebpf::OBJECT).expect("the embedded eBPF object parses")
}

#[test]
fn every_map_matches_mesh_common_sizes() {
    let obj = object();
    for (name, key, value) in MAP_LAYOUT {
        let map = obj
            .maps
            .get(name)
            .unwrap_or_else(|| panic!("object has no map {name}"));
        assert_eq!(map.key_size() as usize, key, "{name}: key size");
        assert_eq!(map.value_size() as usize, value, "{name}: value size");
    }
}

#[test]
fn object_has_no_maps_or_programs_beyond_the_contract() {
    let obj = object();
    // aya-ebpf may add its own data sections (.rodata, .bss); the contract covers named maps.
    let declared: BTreeSet<&str> = obj
        .maps
        .keys()
        .map(String::as_str)
        .filter(|n| n.starts_with("WEFT_"))
        .collect();
    let expected: BTreeSet<&str> = map_names::ALL.into_iter().collect();
    assert_eq!(declared, expected);
    let programs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = program_names::ALL.into_iter().collect();
    assert_eq!(programs, expected);
}

#[test]
fn map_names_fit_the_kernel_object_name_limit() {
    for name in map_names::ALL.iter().chain(program_names::ALL.iter()) {
        assert!(
            name.len() <= 15,
            "{name} would be truncated by the kernel (BPF_OBJ_NAME_LEN)"
        );
    }
}
