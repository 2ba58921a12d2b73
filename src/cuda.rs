//! The CUDA kernels of `kernels/*.cu`, compiled by build.rs (feature `cuda`): PTX text and
//! sm_80 / sm_90 cubins embedded in the library. The safe launch wrappers arrive with the
//! kernels (issue 5); until then this module only carries what build.rs produced.

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
