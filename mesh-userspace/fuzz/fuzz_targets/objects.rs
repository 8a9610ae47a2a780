//! Untrusted objects (YAML/JSON from files, later from an API server) through the parser and the
//! state builder: no input may panic; bad input must come out as errors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::{
    api::ObjectSet,
    state::{self, WorkloadId},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut set = ObjectSet::default();
    set.add_yaml("fuzz", text);
    let node = state::build(&set, "n1", std::path::Path::new("/sys/fs/cgroup/unified/n1"));
    // Every policy entry must name workloads the state knows.
    for key in node.policy.keys() {
        assert!(
            node.workload(WorkloadId(key.src_workload)).is_some()
                && node.workload(WorkloadId(key.dst_workload)).is_some()
        );
    }
});
