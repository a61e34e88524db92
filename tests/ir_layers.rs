//! Whole decoder layers of both architectures in the IR: built, verified,
//! printed, parsed back and interpreted on random inputs. The printed forms
//! (source places stripped, as they move with every edit) are snapshots.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tilefuse::ir::interp::{self, Caches, Tensor};
use tilefuse::ir::{Bindings, Graph, InputKind};
use tilefuse::model::{mimo_v2, presets, qwen3_moe, GraphOptions};

fn strip_places(text: &str) -> String {
    text.lines()
        .map(|l| l.split(" @ ").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn snapshot(name: &str, g: &Graph) {
    insta::with_settings!({snapshot_path => "../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!(name, strip_places(&g.to_string()));
    });
}

/// Runs a layer graph twice (prefill of 5 tokens, then one decode step) on
/// random inputs and checks the outputs are finite and of the right shape.
fn interpret_layer(g: &Graph, hidden: usize) {
    let weights = presets::random_weights(g, 1).unwrap();
    let mut caches = Caches::for_graph(g, &Bindings::new()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut s = 0;
    for t in [5usize, 1] {
        let mut values = weights.clone();
        let x: Vec<f32> = (0..t * hidden).map(|_| rng.gen_range(-1.0..1.0)).collect();
        values.insert(
            "x".into(),
            Tensor::f32(tilefuse::ir::DType::BF16, &[t, hidden], x).unwrap(),
        );
        values.insert(
            "pos".into(),
            Tensor::i32(&[t], (s as i32..(s + t) as i32).collect()).unwrap(),
        );
        let b = Bindings::new().with("S", s).with("T", t);
        let out = interp::run(g, &b, &values, &mut caches).unwrap();
        let h = &out["hidden"];
        assert_eq!(h.shape, vec![t, hidden]);
        assert!(
            h.to_f32().iter().all(|v| v.is_finite()),
            "non-finite output"
        );
        s += t;
    }
    // Every weight the graph declares was used: the random set matches the inputs.
    let declared: BTreeMap<_, _> = g
        .inputs_of_kind(InputKind::Weight)
        .into_iter()
        .map(|n| (g.node(n).name.clone(), ()))
        .collect();
    assert_eq!(declared.len(), weights.len());
}

fn round_trip(g: &Graph) {
    g.verify().unwrap();
    let text = g.to_string();
    let back: Graph = text.parse().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back.to_string(), text);
}

#[test]
fn mimo_v2_sliding_moe_layer() {
    let cfg = mimo_v2::Config::tiny();
    let opt = GraphOptions {
        context: 64,
        max_tokens: 8,
        ..GraphOptions::default()
    };
    // Layer 1: sliding window with sinks, routed experts with grouped routing.
    let g = mimo_v2::layer_graph(&cfg, &opt, 1).unwrap();
    round_trip(&g);
    interpret_layer(&g, cfg.hidden_size);
    snapshot("mimo_v2_layer1", &g);
}

#[test]
fn qwen3_moe_layer() {
    let cfg = qwen3_moe::Config::tiny();
    let opt = GraphOptions {
        context: 64,
        max_tokens: 8,
        ..GraphOptions::default()
    };
    let g = qwen3_moe::layer_graph(&cfg, &opt, 1).unwrap();
    round_trip(&g);
    interpret_layer(&g, cfg.hidden_size);
    snapshot("qwen3_moe_layer1", &g);
}

#[test]
fn full_width_layers_build_and_round_trip() {
    let opt = GraphOptions::default();
    round_trip(&mimo_v2::layer_graph(&mimo_v2::Config::flash(2), &opt, 1).unwrap());
    round_trip(&qwen3_moe::layer_graph(&qwen3_moe::Config::a3b(), &opt, 3).unwrap());
}
