//! A handful of generated kernels, as snapshots (paired with the GPU tests
//! that run them), and the law that code generation is deterministic.

#![allow(clippy::unwrap_used)]

use tilefuse_codegen::lower::lower;
use tilefuse_codegen::passes::run_pipeline;
use tilefuse_codegen::plan::{Hints, Plan, PlanOptions};
use tilefuse_ir::{DType, Graph};
use tilefuse_model::canonical;

fn module(g: Graph, max_t: usize) -> tilefuse_codegen::lower::Module {
    module_with(g, max_t, Hints::default())
}

fn module_with(g: Graph, max_t: usize, hints: Hints) -> tilefuse_codegen::lower::Module {
    let plan = Plan::new(
        run_pipeline(g).unwrap(),
        PlanOptions::new(max_t).with_hints(hints),
    )
    .unwrap();
    lower(&plan).unwrap()
}

fn strip_places(text: &str) -> String {
    text.lines()
        .map(|l| l.split(" @ ").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn snapshot(name: &str, text: String) {
    insta::with_settings!({snapshot_path => "../../snapshots", prepend_module_to_snapshot => false}, {
        insta::assert_snapshot!(name, strip_places(&text));
    });
}

#[test]
fn norm_linear_mxfp4_kernel() {
    let m = module(canonical::norm_linear(DType::MXFP4).unwrap(), 1);
    snapshot("kernel_norm_matvec_mxfp4_t1", m.kernels[0].source());
}

#[test]
fn moe_block_kernels() {
    let m = module(canonical::moe_block(DType::MXFP4).unwrap(), 8);
    let text: Vec<String> = m
        .kernels
        .iter()
        .filter(|k| k.name.contains("router") || k.name.contains("moe_down"))
        .map(|k| k.source())
        .collect();
    snapshot("kernels_router_and_moe_down_mxfp4_t8", text.join("\n"));
}

#[test]
fn attention_kernels() {
    let m = module(canonical::attention_block().unwrap(), 1);
    let text: Vec<String> = m
        .kernels
        .iter()
        .filter(|k| k.name.contains("attention") || k.name.contains("rope_append"))
        .map(|k| k.source())
        .collect();
    snapshot("kernels_rope_append_attention_t1", text.join("\n"));
}

#[test]
fn codegen_is_deterministic() {
    for make in [
        || canonical::norm_linear(DType::NVFP4).unwrap(),
        || canonical::attention_block().unwrap(),
        || canonical::full_attention_block().unwrap(),
        || canonical::moe_block(DType::MXFP4).unwrap(),
    ] {
        for t in [1, 16] {
            assert_eq!(module(make(), t).source, module(make(), t).source);
        }
    }
}

#[test]
fn layers_share_kernel_functions() {
    let p = tilefuse_model::presets::by_name("qwen3-30b-a3b").unwrap();
    let g = p.arch.forward_graph(&p.options).unwrap();
    let plan = Plan::new(run_pipeline(g).unwrap(), PlanOptions::new(1)).unwrap();
    let m = lower(&plan).unwrap();
    // 48 identical layers: the functions do not grow with depth.
    assert!(
        m.kernels.len() < 30,
        "{} functions for {} kernels",
        m.kernels.len(),
        plan.kernels.len()
    );
    assert_eq!(m.instances.len(), plan.kernels.len());
}

/// The L2 hints that are off unless asked for: off, no kernel mentions
/// them; on, the dense kernels' prefetch asks ahead for the tiles after the
/// first wave, the router asks for its experts' gate/up rows and a
/// persistent task asks for the next task's weights; on a tiny
/// model, where neither can pay, nothing changes. They are hints, so they
/// change no tile body: the rest of the source is the same.
#[test]
fn l2_hints_appear_only_when_asked_for() {
    // A full-width layer: the hints are emitted only where they can pay
    // (kernels past one wave, experts of a megabyte or more).
    let p = tilefuse_model::presets::by_name("qwen3-30b-a3b").unwrap();
    let g = p.arch.layer_graph(&p.options, 1).unwrap();
    let source = |g: &Graph, hints: Hints| module_with(g.clone(), 1, hints).source;
    let lower_with = |hints: Hints| source(&g, hints);
    let off = lower_with(Hints::default());
    for hint in ["prefetch_l2_ahead", "router_gate_up_hint", "ntile"] {
        assert!(!off.contains(hint), "{hint} without the hint");
    }
    let on = lower_with(Hints::parse("all").unwrap());
    assert!(on.contains("tf::prefetch_l2_ahead("), "no ahead prefetch");
    assert!(on.contains("tf::router_gate_up_hint<"), "no gate/up hint");
    assert!(
        on.contains("_prefetch(ntile, wts, nrow)"),
        "no next-task prefetch"
    );
    let ahead = lower_with(Hints::parse("ahead").unwrap());
    assert!(ahead.contains("tf::prefetch_l2_ahead(") && !ahead.contains("router_gate_up_hint"));
    // Without the hint lines and the offset tables they extend, the sources
    // agree: a hint adds calls, it never changes a tile.
    let body = |s: &str| -> Vec<String> {
        s.lines()
            .filter(|l| {
                !l.contains("prefetch_l2_")
                    && !l.contains("next")
                    && !l.contains("nrow")
                    && !l.contains("i + 1 < sm_offsets")
                    && l.trim() != "}"
                    && !l.contains("gate_up")
                    && !l.contains("off[")
                    && !l.contains("offsets")
            })
            .map(str::to_string)
            .collect()
    };
    assert_eq!(body(&off), body(&on));
    let tiny = tilefuse_model::presets::by_name("qwen3-moe-tiny").unwrap();
    let tg = tiny.arch.forward_graph(&tiny.options).unwrap();
    let tiny_with = |hints: Hints| source(&tg, hints);
    assert_eq!(
        tiny_with(Hints::default()),
        tiny_with(Hints::parse("all").unwrap())
    );
}

#[test]
fn hint_names_parse_and_an_unknown_one_is_refused() {
    assert_eq!(Hints::parse("").unwrap(), Hints::default());
    assert_eq!(Hints::parse("none").unwrap(), Hints::default());
    let all = Hints::parse("all").unwrap();
    assert!(all.ahead && all.gate_up && all.next);
    assert_eq!(Hints::parse(" ahead , gate_up,next ").unwrap(), all);
    let some = Hints::parse("gate_up").unwrap();
    assert!(some.gate_up && !some.ahead && !some.next);
    assert_eq!(all.to_string(), "ahead,gate_up,next");
    assert_eq!(Hints::default().to_string(), "none");
    assert_eq!(some.to_string(), "gate_up");
    let e = Hints::parse("ahead,prefetch_everything").unwrap_err();
    assert!(
        e.contains("prefetch_everything") && e.contains("gate_up"),
        "{e}"
    );
}

/// The matvec tiling: a short matrix takes 2 to 8 rows a tile on the CUDA
/// cores, a longer one 16 or more on the tensor cores (the shapes the GPU
/// test `norm_linear_matches_the_interpreter` runs).
#[test]
fn short_matrices_take_short_tiles() {
    for (rows, k, name) in [
        (512, 256, "norm_matvec_mxfp4_t1_4x256"),
        (2048, 256, "norm_matvec_mxfp4_t1_16x256"),
        (128, 2048, "norm_matvec_mxfp4_t1_2x2048"),
    ] {
        let m = module(canonical::norm_linear_of(DType::MXFP4, rows, k).unwrap(), 1);
        assert_eq!(m.kernels[0].name, name);
        let src = m.kernels[0].source();
        let path = if name.contains("_16x") { "Mma" } else { "Simt" };
        assert!(
            src.contains(&format!("tf::MvPath::{path}>")),
            "{name}: {path}"
        );
    }
}
