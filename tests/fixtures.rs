//! The CPU interpreter against transformers: each fixture under
//! `tests/fixtures/<name>/` is a tiny random model saved by transformers
//! (`tools/make_fixtures.py`, float32) with the logits of every position of
//! `prompt + greedy[:-1]` and the greedy continuation.
//!
//! The checkpoint is loaded through the same path as `tilefuse generate
//! --model` (config.json, safetensors, name mapping, per-expert stacking)
//! into f32 graphs; the prompt is prefilled in chunks of 5 tokens (so chunks
//! cross the sliding windows and their rings), then every continuation token
//! is decoded one at a time from the KV caches. The logits of all positions
//! must match with a relative L2 error below 1e-4, and greedy decoding must
//! choose the same tokens.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tilefuse::ir::interp::{argmax_row, Tensor};
use tilefuse::ir::{Bindings, DType};
use tilefuse::model::checkpoint::{load, LoadOptions};
use tilefuse::runtime::{Backend, Executable};

/// Prefill chunk: smaller than the prompt and near the sliding windows.
const CHUNK: usize = 5;
/// The largest relative L2 error allowed over all logits.
const TOLERANCE: f64 = 1e-4;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Reference {
    prompt: Vec<i32>,
    greedy: Vec<i32>,
    /// `[N, vocab]`, N = prompt + greedy - 1.
    logits: Vec<f32>,
    vocab: usize,
}

fn reference(dir: &Path) -> Reference {
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("reference.json is JSON");
    let ids = |key: &str| -> Vec<i32> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("reference.json: {key}"))
            .iter()
            .map(|x| x.as_i64().expect("token id") as i32)
            .collect()
    };
    let bytes = std::fs::read(dir.join("reference.safetensors")).expect("reference.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .expect("reference.safetensors is safetensors");
    let t = st.tensor("logits").expect("logits");
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    let logits = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Reference {
        prompt: ids("prompt_ids"),
        greedy: ids("greedy_ids"),
        logits,
        vocab: t.shape()[1],
    }
}

/// One forward of `tokens` after `len` cached positions; all logits rows.
fn forward(exe: &mut Executable, len: usize, tokens: &[i32]) -> Vec<f32> {
    let t = tokens.len();
    let pos: Vec<i32> = (len..len + t).map(|p| p as i32).collect();
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "ids".to_string(),
        Tensor::i32(&[t], tokens.to_vec()).expect("ids"),
    );
    inputs.insert("pos".to_string(), Tensor::i32(&[t], pos).expect("pos"));
    let b = Bindings::new().with("S", len).with("T", t);
    let out = exe
        .run(&b, inputs)
        .unwrap_or_else(|e| panic!("forward at {len}: {e}"));
    out["logits"].to_f32()
}

/// Runs a fixture; returns the relative L2 error of all logits.
fn check(name: &str) -> f64 {
    let dir = fixture_dir(name);
    let r = reference(&dir);
    let opts = LoadOptions {
        dtype: Some(DType::F32),
        expert_dtype: Some(DType::F32),
        context: Some(64),
        max_tokens: Some(CHUNK),
    };
    let m = load(&dir, &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(m.config.arch.vocab_size(), r.vocab);
    let mut exe =
        Executable::new(m.graph, m.weights, Backend::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));

    let mut ours: Vec<f32> = Vec::with_capacity(r.logits.len());
    let mut len = 0;
    for chunk in r.prompt.chunks(CHUNK) {
        ours.extend(forward(&mut exe, len, chunk));
        len += chunk.len();
    }
    for (i, &want) in r.greedy.iter().enumerate() {
        let last = &ours[ours.len() - r.vocab..];
        let got = argmax_row(last).expect("a token") as i32;
        assert_eq!(
            got,
            want,
            "{name}: greedy token {i} (position {len}) is {got}, transformers chose {want}; \
             generated so far {:?}",
            &r.greedy[..i]
        );
        if i + 1 < r.greedy.len() {
            ours.extend(forward(&mut exe, len, &[got]));
            len += 1;
        }
    }
    assert_eq!(ours.len(), r.logits.len(), "{name}: logits rows");
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&a, &b) in ours.iter().zip(&r.logits) {
        diff += (f64::from(a) - f64::from(b)).powi(2);
        norm += f64::from(b).powi(2);
    }
    let rel = (diff / norm).sqrt();
    println!(
        "{name}: relative L2 error of {} logits rows = {rel:.3e}; {} greedy tokens match",
        r.logits.len() / r.vocab,
        r.greedy.len()
    );
    assert!(
        rel < TOLERANCE,
        "{name}: relative L2 error {rel:.3e} is not below {TOLERANCE:e}"
    );
    rel
}

#[test]
fn mimo_v2_tiny_matches_transformers() {
    check("mimo_v2_tiny");
}

#[test]
fn mimo_v2_tiny_nonorm_matches_transformers() {
    check("mimo_v2_tiny_nonorm");
}

#[test]
fn qwen3_moe_tiny_matches_transformers() {
    check("qwen3_moe_tiny");
}

#[test]
fn qwen3_moe_tiny_norm_matches_transformers() {
    check("qwen3_moe_tiny_norm");
}
