//! # tilefuse
//!
//! Fused, memory-bound decoding for Mixture-of-Experts language models. This
//! crate is the facade: it re-exports the IR ([`ir`]), the graph DSL
//! ([`macros`], whose attribute is [`graph`]), the architecture definitions
//! ([`model`]) and the runtime ([`runtime`]); the `tilefuse` binary is the
//! command-line interface.

pub use tilefuse_ir as ir;
pub use tilefuse_macros as macros;
pub use tilefuse_macros::graph;
pub use tilefuse_model as model;
pub use tilefuse_runtime as runtime;
