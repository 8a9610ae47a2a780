//! Empty library target: `mesh-userspace` build-depends on this crate so that cargo rebuilds the
//! embedded object when the programs change. The programs themselves live in the binary target.
#![no_std]
