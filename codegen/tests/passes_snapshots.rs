//! The canonical graphs through the pass pipeline: the graph once, then the
//! kernel partition after each named pass (and the graph again whenever a
//! pass rewrote it). Paired with `pipeline.rs`, which checks the partitions.

#![allow(clippy::unwrap_used)]

use tilefuse_codegen::passes::run_pipeline_observed;
use tilefuse_ir::{DType, Graph};
use tilefuse_model::canonical;

fn strip_places(text: &str) -> String {
    text.lines()
        .map(|l| l.split(" @ ").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn trace(g: Graph) -> String {
    let mut out = format!("== input\n{}", strip_places(&g.to_string()));
    let mut last_graph = g.to_string();
    run_pipeline_observed(g, |pass, f| {
        out.push_str(&format!("\n== after {pass}\n"));
        let text = f.to_string();
        let (kernels, graph): (Vec<&str>, Vec<&str>) =
            text.lines().partition(|l| l.starts_with("kernel "));
        out.push_str(&kernels.join("\n"));
        let graph = graph.join("\n") + "\n";
        if graph != last_graph {
            out.push_str("\n-- graph rewritten:\n");
            out.push_str(&strip_places(&graph));
            last_graph = graph;
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    out
}

fn snapshot(name: &str, text: String) {
    insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!(name, text);
    });
}

#[test]
fn norm_linear_passes() {
    snapshot(
        "passes_norm_linear",
        trace(canonical::norm_linear(DType::MXFP4).unwrap()),
    );
}

#[test]
fn attention_block_passes() {
    snapshot(
        "passes_attention_block",
        trace(canonical::attention_block().unwrap()),
    );
}

#[test]
fn moe_block_passes() {
    snapshot(
        "passes_moe_block",
        trace(canonical::moe_block(DType::MXFP4).unwrap()),
    );
}
