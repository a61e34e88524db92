//! # tilefuse-runtime
//!
//! Runs compiled forwards and drives decoding. An [`Executable`] holds one
//! forward graph, its weights and its KV caches, and runs it for any binding
//! of the symbols `T` (tokens of this forward) and `S` (tokens already
//! cached). A [`Session`] drives an executable through prefill (in chunks)
//! and token-by-token decoding. The CPU backend executes through the IR's
//! reference interpreter, so everything works on a machine without a GPU.

pub mod accept;
pub mod bench;
pub mod cuda_exec;
pub mod executable;
pub mod fill;
pub mod gpu;
pub mod inspect;
pub mod nvrtc;
pub mod session;
pub mod speculative;
pub mod timeline;

pub use cuda_exec::LaunchMode;
pub use executable::{Backend, Executable};
pub use session::{top2_margin, Sampling, Session, StepTimes};
