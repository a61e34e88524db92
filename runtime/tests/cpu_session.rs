//! The CPU backend: decoding with KV caches gives the logits of a full
//! recompute, for both architectures, across the sliding window's ring.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use tilefuse_ir::interp::Tensor;
use tilefuse_ir::Bindings;
use tilefuse_model::presets;
use tilefuse_runtime::{Backend, Executable, Sampling, Session};

fn exe(preset: &str) -> (Executable, presets::Preset) {
    let p = presets::by_name(preset).unwrap();
    let g = p.arch.forward_graph(&p.options).unwrap();
    let w = presets::random_weights(&g, 7).unwrap();
    (Executable::new(g, w, Backend::Cpu).unwrap(), p)
}

fn full_logits(preset: &str, tokens: &[i32]) -> Vec<f32> {
    let (mut e, p) = exe(preset);
    let t = tokens.len();
    let mut inputs = BTreeMap::new();
    inputs.insert(
        "ids".to_string(),
        Tensor::i32(&[t], tokens.to_vec()).unwrap(),
    );
    inputs.insert(
        "pos".to_string(),
        Tensor::i32(&[t], (0..t as i32).collect()).unwrap(),
    );
    let out = e
        .run(&Bindings::new().with("S", 0).with("T", t), inputs)
        .unwrap();
    let v = p.arch.vocab_size();
    out["logits"].to_f32()[(t - 1) * v..].to_vec()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn cached_decoding_matches_full_recompute() {
    // 14 tokens: past the tiny MiMo window (8), so the ring wraps. Full forward
    // needs T <= context; the session feeds chunks of max_tokens (16) and then
    // single tokens.
    for preset in ["mimo-v2-tiny", "qwen3-moe-tiny", "mimo-v2-tiny-mxfp4"] {
        let tokens: Vec<i32> = (0..14).map(|i| (i * 37 + 11) % 256).collect();
        let (e, p) = exe(preset);
        let mut s = Session::new(e, p.options.context, p.options.max_tokens).unwrap();
        s.feed(&tokens[..5]).unwrap();
        let mut last = Vec::new();
        for &t in &tokens[5..] {
            last = s.feed(&[t]).unwrap();
        }
        let full = full_logits(preset, &tokens);
        let err = rel_l2(&last, &full);
        assert!(
            err < 2e-2,
            "{preset}: rel L2 {err} between cached and full logits"
        );
    }
}

#[test]
fn greedy_generation_is_deterministic_and_stops_at_the_context_limit() {
    let (e, p) = exe("mimo-v2-tiny");
    let mut s = Session::new(e, p.options.context, p.options.max_tokens).unwrap();
    let a = s
        .generate(&[1, 2, 3], 10, Sampling::Greedy, |_| true)
        .unwrap();
    let (e, _) = exe("mimo-v2-tiny");
    let mut s = Session::new(e, p.options.context, p.options.max_tokens).unwrap();
    let b = s
        .generate(&[1, 2, 3], 10, Sampling::Greedy, |_| true)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 10);
    let (e, _) = exe("mimo-v2-tiny");
    let mut s = Session::new(e, 8, 4).unwrap();
    let err = s
        .generate(&[1, 2, 3], 10, Sampling::Greedy, |_| true)
        .unwrap_err();
    assert!(
        err.to_string().contains("past the context limit of 8"),
        "{err}"
    );
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let run = |seed| {
        let (e, p) = exe("qwen3-moe-tiny");
        let mut s = Session::new(e, p.options.context, p.options.max_tokens).unwrap();
        s.generate(
            &[5, 6],
            12,
            Sampling::Temperature {
                temperature: 1.0,
                seed,
            },
            |_| true,
        )
        .unwrap()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}
