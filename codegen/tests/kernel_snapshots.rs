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
/// At one token, where 16 rows of gate and of up a tile fill the card in one
/// wave at three CTAs an SM (Qwen3-30B-A3B: 8 experts x 48 = 384 tiles), the
/// gate/up kernel takes that shape, with no x vector loaded ahead; with
/// several tokens, or where 16-row tiles take more than one wave
/// (MiMo-V2-Flash: 8 x 128 = 1,024), or in the persistent kernel, it keeps
/// its wide tiles at two CTAs.
#[test]
fn one_token_gate_up_tiles_fill_the_card_in_one_wave() {
    let up_in = |preset: &str, opt: PlanOptions| {
        let p = tilefuse_model::presets::by_name(preset).unwrap();
        let g = p.arch.forward_graph(&p.options).unwrap();
        let plan = Plan::new(run_pipeline(g).unwrap(), opt).unwrap();
        let k = lower(&plan)
            .unwrap()
            .kernels
            .into_iter()
            .find(|k| k.name.contains("_up_"))
            .unwrap();
        format!("{}\n{}\n{}", k.header, k.device, k.wrapper)
    };
    let up = |preset: &str, max_t: usize| up_in(preset, PlanOptions::new(max_t));
    let qwen = up("qwen3-30b-a3b", 1);
    assert!(qwen.contains("384 tiles of 256 threads"), "{qwen}");
    assert!(
        qwen.contains("tf::MoeCfg<1, 8, 16, 256, 2048, 768, tf::MvPath::Mma, 0, 0>"),
        "{qwen}"
    );
    assert!(qwen.contains("__launch_bounds__(256, 3)"), "{qwen}");
    let qwen8 = up("qwen3-30b-a3b", 8);
    assert!(
        qwen8.contains("tf::MoeCfg<8, 8, 32, 256, 2048, 768, tf::MvPath::Mma>"),
        "{qwen8}"
    );
    assert!(qwen8.contains("__launch_bounds__(256, 2)"), "{qwen8}");
    let mimo = up("mimo-v2-flash-4l", 1);
    assert!(
        mimo.contains("tf::MoeCfg<1, 8, 64, 256, 4096, 2048, tf::MvPath::Mma>"),
        "{mimo}"
    );
    assert!(mimo.contains("__launch_bounds__(256, 2)"), "{mimo}");
    // The persistent kernel holds one CTA an SM: there the 16-row tiles
    // would only triple the tiles, each choosing the experts again.
    let persistent = up_in("qwen3-30b-a3b", PlanOptions::new(1).with_persistent(true));
    assert!(
        persistent.contains("192 tiles of 256 threads"),
        "{persistent}"
    );
    assert!(
        persistent.contains("tf::MoeCfg<1, 8, 32, 256, 2048, 768, tf::MvPath::Mma>"),
        "{persistent}"
    );
}

/// A step whose tiles outnumber what the SMs hold at once runs a second,
/// short wave after the first: MiMo-V2-Flash's q/k/v kernel in 32-row tiles
/// (464 tiles, three CTAs an SM hold 396) and its down kernel in 16-row
/// tiles (256 tiles at one CTA an SM). Both take tiles twice as wide, one
/// wave each; Qwen3-30B-A3B's, already one wave, keep theirs.
#[test]
fn projection_and_down_tiles_fit_one_wave() {
    let tiles = |preset: &str, max_t: usize| {
        let p = tilefuse_model::presets::by_name(preset).unwrap();
        let g = p.arch.layer_graph(&p.options, 1).unwrap();
        let plan = Plan::new(run_pipeline(g).unwrap(), PlanOptions::new(max_t)).unwrap();
        plan.kernels
            .iter()
            .filter(|k| k.name.contains("matvecs") || k.name.contains("moe_down"))
            .map(|k| format!("{} {}", k.tiling.tiles, k.tiling.shape))
            .collect::<Vec<_>>()
    };
    assert_eq!(tiles("mimo-v2-flash-4l", 1), ["232 64x4096", "128 32x2048"]);
    assert_eq!(tiles("mimo-v2-flash-4l", 8), ["232 64x4096", "128 32x2048"]);
    assert_eq!(tiles("qwen3-30b-a3b", 1), ["320 16x2048", "128 16x768"]);
}
