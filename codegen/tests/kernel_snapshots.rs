//! A handful of generated kernels, as snapshots (paired with the GPU tests
//! that run them), and the law that code generation is deterministic.

#![allow(clippy::unwrap_used)]

use tilefuse_codegen::lower::lower;
use tilefuse_codegen::passes::run_pipeline;
use tilefuse_codegen::plan::{Plan, PlanOptions};
use tilefuse_ir::{DType, Graph};
use tilefuse_model::canonical;

fn module(g: Graph, max_t: usize) -> tilefuse_codegen::lower::Module {
    let plan = Plan::new(run_pipeline(g).unwrap(), PlanOptions::new(max_t)).unwrap();
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

/// The attention tile's RoPE table (f64 cos/sin of its query positions, an
/// input of the forward) is made by its prologue, which the kernel's wrapper
/// runs before it waits for the kernel before; the wrapper then runs the
/// tile that finds the table made, and the persistent dispatcher the tile
/// that makes it itself.
#[test]
fn the_rope_table_is_made_before_the_wait() {
    let m = module(canonical::attention_block().unwrap(), 1);
    let attn = m
        .kernels
        .iter()
        .find(|k| k.name.starts_with("attention_bf16"))
        .unwrap();
    let prologue = attn.prologue.as_ref().expect("no prologue").to_string();
    assert!(
        prologue.contains("tf::attention_prologue<C>("),
        "{prologue}"
    );
    let wrapper = attn.wrapper.to_string();
    let at = |s: &str| {
        wrapper
            .find(s)
            .unwrap_or_else(|| panic!("{s} not in {wrapper}"))
    };
    let name = &attn.name;
    assert!(at(&format!("{name}_prologue(")) < at("tf::grid_dependency_wait()"));
    assert!(at("tf::grid_dependency_wait()") < at(&format!("{name}_tile<true>(")));
    let device = attn.device.to_string();
    assert!(
        device.contains("template <bool PROLOGUE_RAN>")
            && device.contains("tf::attention_tile<C, true, false, PROLOGUE_RAN>("),
        "{device}"
    );
    let dispatcher = m.persistent.as_ref().expect("no dispatcher").to_string();
    assert!(dispatcher.contains(&format!("{name}_tile<false>(tile,")));
    assert!(!dispatcher.contains("_prologue("));
    // Other kernels have none and keep a plain tile function.
    for k in m
        .kernels
        .iter()
        .filter(|k| !k.name.starts_with("attention_bf16"))
    {
        assert!(k.prologue.is_none(), "{}", k.name);
        assert!(!k.device.to_string().contains("PROLOGUE_RAN"), "{}", k.name);
    }
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
