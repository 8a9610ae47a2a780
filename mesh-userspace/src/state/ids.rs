//! The model's identifiers. Each is the number the kernel maps carry (`mesh_common`), wrapped so
//! a workload id cannot be passed where a rule or service id is meant; [`WorkloadId::get`] and
//! friends hand the number over at the datapath's edge.
use std::fmt;

use serde::Serialize;

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub u32);

        impl $name {
            /// The number the kernel maps use.
            #[must_use]
            pub const fn get(self) -> u32 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id!(
    /// A workload (pod), stable across agent restarts (derived from namespace/name) so pinned
    /// counters keep their meaning; 0 is "unknown" in the kernel.
    WorkloadId
);
id!(
    /// A Service port of this node's view.
    ServiceId
);
id!(
    /// A policy rule behind a kernel verdict (`/flows` names it).
    RuleId
);
