//! The builder-API versions of the model graphs, as they were written before
//! the graph DSL: the reference the DSL versions are compared against.

pub mod common;
pub mod mimo_v2;
pub mod qwen3_moe;
