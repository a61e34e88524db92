//! # tilefuse
//!
//! Fused, memory-bound decoding for Mixture-of-Experts language models. This
//! crate is the facade: it re-exports the IR ([`ir`]), the graph DSL
//! ([`graph`]) and the architecture definitions ([`model`]); the `tilefuse`
//! binary is the command-line interface.

pub use tilefuse_ir as ir;
pub use tilefuse_macros as macros;
pub use tilefuse_model as model;
