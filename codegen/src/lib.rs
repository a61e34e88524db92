//! # tilefuse-codegen
//!
//! Turns a verified IR graph into fused kernels and lowers them to CUDA C++
//! over the hand-written header library in `cuda/` ([`cuda::HEADERS`]):
//!
//! 1. [`passes`]: the ordered pipeline that partitions the graph into
//!    kernels ([`fusion::Fused`]);
//! 2. [`plan`]: tiles, schedule, tile-level task graph and memory plan;
//! 3. [`lower`]: CUDA C++ through the typed emitter ([`emit`]).
//!
//! Produces text only: compiling and launching belong to the runtime.

pub mod cuda;
pub mod emit;
pub mod error;
pub mod fusion;
pub mod passes;

pub use error::CodegenError;
pub use fusion::{Fused, Group, KernelKind};
pub mod lower;
pub mod plan;
