//! # tilefuse-model
//!
//! Architecture definitions: MiMo-V2 ([`mimo_v2`]) and Qwen3-MoE
//! ([`qwen3_moe`]) decoder layers and whole forwards, built as `tilefuse-ir`
//! graphs. Parameter names are the transformers in-memory names
//! (`model.layers.{i}.self_attn.q_proj.weight`, stacked experts
//! `model.layers.{i}.mlp.experts.gate_up_proj`), so a loader maps checkpoint
//! tensors to graph weights by name.
//!
//! Checkpoints: [`config`] reads (and writes) Hugging Face `config.json`,
//! [`checkpoint`] maps safetensors files to graph weights, [`export`] writes
//! checkpoint directories (`tilefuse init`), [`quantize`] makes FP4-expert
//! checkpoints, [`tokenizer`] turns text into ids.
//!
//! Every forward graph declares two symbols: `T`, the query tokens of this
//! forward, and `S`, the tokens already in the KV caches. Query `t` sits at
//! absolute position `S + t`.

pub mod canonical;
pub mod checkpoint;
pub mod common;
pub mod config;
pub mod dflash;
pub mod error;
pub mod export;
pub mod mimo_v2;
pub mod presets;
pub mod quantize;
pub mod qwen3_moe;
pub mod tokenizer;

pub use common::GraphOptions;
pub use error::LoadError;
