//! The decoder layers written with the graph DSL build the same graphs as the
//! builder-API versions they replaced (kept in `builder_reference/`): same
//! nodes, order, types and names. Source places differ (the reference records
//! none), so they are compared with places cleared, and checked on their own.

#![allow(clippy::unwrap_used)]

mod builder_reference;

use tilefuse_ir::{DType, Graph, Result};
use tilefuse_model::{mimo_v2, qwen3_moe, GraphOptions};

/// The graph with every node's source place cleared.
fn without_places(mut g: Graph) -> Graph {
    for id in g.topo_order().expect("a built graph is acyclic") {
        g.node_mut(id).loc = None;
    }
    g
}

/// Every node of a DSL graph records a place in the model sources.
fn assert_places(g: &Graph) {
    for id in g.topo_order().expect("a built graph is acyclic") {
        let loc = g.node(id).loc.as_ref();
        assert!(
            loc.is_some_and(|l| l.file.starts_with("model/src/") && l.line > 0),
            "{} has no place in model/src: {loc:?}",
            g.describe(id)
        );
    }
}

fn assert_same(what: &str, dsl: Result<Graph>, reference: Result<Graph>) {
    let dsl = dsl.unwrap_or_else(|e| panic!("{what}: the DSL graph fails to build: {e}"));
    let reference =
        reference.unwrap_or_else(|e| panic!("{what}: the reference fails to build: {e}"));
    assert_places(&dsl);
    let (d, r) = (without_places(dsl).to_string(), reference.to_string());
    assert!(d == r, "{what}: the DSL graph differs from the builder reference\n--- dsl\n{d}\n--- reference\n{r}");
}

fn options() -> [GraphOptions; 2] {
    let small = GraphOptions {
        context: 64,
        max_tokens: 4,
        ..GraphOptions::default()
    };
    let fp4 = GraphOptions {
        expert_dtype: DType::MXFP4,
        ..GraphOptions::default()
    };
    [small, fp4]
}

fn check_mimo(name: &str, cfg: &mimo_v2::Config) {
    for opt in options() {
        for i in 0..cfg.num_hidden_layers {
            assert_same(
                &format!("{name} layer {i}"),
                mimo_v2::layer_graph(cfg, &opt, i),
                builder_reference::mimo_v2::layer_graph(cfg, &opt, i),
            );
        }
        assert_same(
            &format!("{name} forward"),
            mimo_v2::forward_graph(cfg, &opt),
            builder_reference::mimo_v2::forward_graph(cfg, &opt),
        );
    }
}

fn check_qwen(name: &str, cfg: &qwen3_moe::Config) {
    for opt in options() {
        for i in 0..cfg.num_hidden_layers {
            assert_same(
                &format!("{name} layer {i}"),
                qwen3_moe::layer_graph(cfg, &opt, i),
                builder_reference::qwen3_moe::layer_graph(cfg, &opt, i),
            );
        }
        assert_same(
            &format!("{name} forward"),
            qwen3_moe::forward_graph(cfg, &opt),
            builder_reference::qwen3_moe::forward_graph(cfg, &opt),
        );
    }
}

#[test]
fn mimo_v2_tiny() {
    check_mimo("mimo_v2 tiny", &mimo_v2::Config::tiny());
}

#[test]
fn mimo_v2_flash_two_layers() {
    // Layer 0 is full attention with a dense MLP; layer 1 sliding with experts.
    check_mimo("mimo_v2 flash(2)", &mimo_v2::Config::flash(2));
}

#[test]
fn qwen3_moe_tiny() {
    check_qwen("qwen3_moe tiny", &qwen3_moe::Config::tiny());
}

#[test]
fn qwen3_moe_a3b_two_layers() {
    let cfg = qwen3_moe::Config {
        num_hidden_layers: 2,
        mlp_only_layers: vec![1],
        ..qwen3_moe::Config::a3b()
    };
    check_qwen("qwen3_moe a3b(2)", &cfg);
}

/// The names the DSL gives are the readable ones the rest of the project
/// looks for, and the places point at the lines that made the nodes.
#[test]
fn names_and_places() {
    let g = qwen3_moe::layer_graph(&qwen3_moe::Config::tiny(), &GraphOptions::default(), 1)
        .expect("the tiny layer builds");
    let text = g.to_string();
    for name in [
        "layer1.attn_norm",
        "layer1.attn.q",
        "layer1.attn.q_rope",
        "layer1.attn.attn",
        "layer1.attn.out",
        "layer1.attn_residual",
        "layer1.moe.router_logits",
        "layer1.moe.experts_idx",
        "layer1.moe.out",
        "layer1.out",
    ] {
        assert!(
            text.contains(&format!("\"{name}\" @ model/src/")),
            "no node {name} with a place in\n{text}"
        );
    }
    let source = include_str!("../src/qwen3_moe.rs");
    let line = |needle: &str| {
        source
            .lines()
            .position(|l| l.contains(needle))
            .map(|n| n + 1)
            .unwrap_or_else(|| panic!("`{needle}` is not in qwen3_moe.rs"))
    };
    let want = format!(
        "\"layer1.moe.router_logits\" @ model/src/qwen3_moe.rs:{}",
        line("let router_logits = h.matmul(wr).cast(f32);")
    );
    assert!(text.contains(&want), "{want} not in\n{text}");
}
