//! Sibling matmuls in one kernel (`fuse_siblings`): the q, k and v
//! projections of a layer become one kernel whose weights the plan lays out
//! back to back, each keeping its own epilogue; weights with block-scale
//! arrays, a matmul whose epilogue reads a sibling's value and a lone
//! matmul stay as they were.

#![allow(clippy::unwrap_used)]

use tilefuse_codegen::lower::lower;
use tilefuse_codegen::passes::run_pipeline;
use tilefuse_codegen::plan::{Plan, PlanOptions};
use tilefuse_codegen::KernelKind;
use tilefuse_ir::{shape, Builder, DType, Graph};
use tilefuse_model::presets;

/// `x [T, 256]` normalised once, then three projections of 512, 128, 128 rows
/// in `dt`; with `scaled`, the third is multiplied by 0.5 (an epilogue).
fn three_projections(dt: DType, scaled: bool) -> Graph {
    let mut b = Builder::new("qkv", &["T"]);
    let x = b.input("x", DType::BF16, shape![T, 256]).unwrap();
    let g = b.weight("norm.weight", DType::BF16, shape![256]).unwrap();
    let h = b.rms_norm(x, g, 1e-5).unwrap();
    for (name, rows) in [("q", 512usize), ("k", 128), ("v", 128)] {
        let w = b
            .weight(&format!("{name}.weight"), dt, shape![(rows), 256])
            .unwrap();
        let mut y = b.matmul(h, w).unwrap();
        if scaled && name == "v" {
            y = b.scale(y, 0.5).unwrap();
        }
        b.output(name, y).unwrap();
    }
    b.finish().unwrap()
}

fn matvec_kernels(g: Graph) -> (Plan, Vec<Vec<String>>) {
    let plan = Plan::new(run_pipeline(g).unwrap(), PlanOptions::new(4)).unwrap();
    let gr = &plan.fused.graph;
    let parts = plan
        .kernels
        .iter()
        .filter_map(|k| match &plan.group(k).kind {
            KernelKind::MatVec {
                matmul, siblings, ..
            } => Some(
                std::iter::once(*matmul)
                    .chain(siblings.iter().map(|s| s.matmul))
                    .map(|m| gr.node(gr.inputs(m)[1]).name.clone())
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    lower(&plan).unwrap();
    (plan, parts)
}

#[test]
fn bf16_projections_share_one_kernel_over_contiguous_weights() {
    let (plan, parts) = matvec_kernels(three_projections(DType::BF16, false));
    assert_eq!(parts, vec![vec!["q.weight", "k.weight", "v.weight"]]);
    let slot = |n: &str| plan.weights.iter().find(|w| w.name == n).unwrap();
    assert_eq!(
        slot("q.weight").offset + slot("q.weight").bytes,
        slot("k.weight").offset
    );
    assert_eq!(
        slot("k.weight").offset + slot("k.weight").bytes,
        slot("v.weight").offset
    );
    let k = plan
        .kernels
        .iter()
        .find(|k| matches!(plan.group(k).kind, KernelKind::MatVec { .. }))
        .unwrap();
    assert_eq!(k.tiling.tiles, (512 + 128 + 128) / 16);
}

#[test]
fn scaled_fp4_projections_stay_apart() {
    let (_, parts) = matvec_kernels(three_projections(DType::MXFP4, false));
    assert_eq!(parts.len(), 3, "{parts:?}");
}

/// MiMo's value scale: the scaled v joins q and k, and the scale is applied
/// to v's rows only, stored where v's scaled value lives.
#[test]
fn a_projection_with_an_epilogue_joins_its_siblings_and_keeps_it() {
    let (plan, parts) = matvec_kernels(three_projections(DType::BF16, true));
    assert_eq!(
        parts,
        vec![vec!["q.weight", "k.weight", "v.weight"]],
        "{parts:?}"
    );
    let k = plan
        .kernels
        .iter()
        .find(|k| matches!(plan.group(k).kind, KernelKind::MatVec { .. }))
        .unwrap();
    let group = plan.group(k);
    let gr = &plan.fused.graph;
    let scale = gr.outputs().iter().find(|(name, _)| name == "v").unwrap().1;
    let KernelKind::MatVec { siblings, .. } = &group.kind else {
        panic!("{} is not a matvec kernel", k.name);
    };
    let epilogues: Vec<&[tilefuse_ir::NodeId]> = siblings.iter().map(|s| &s.epilogue[..]).collect();
    assert_eq!(epilogues, [&[][..], &[scale][..]]);
    let lowered = lower(&plan).unwrap();
    let src = lowered
        .kernels
        .iter()
        .find(|l| l.name.contains("matvecs"))
        .map(|l| l.device.to_string())
        .unwrap();
    // The scale sits in v's branch of the row dispatch (rows 640..768), and
    // nowhere else.
    let v_branch = src.find("if (n >= 640)").expect(&src);
    let mul = src.find("* 0.5f").expect(&src);
    assert!(
        mul > v_branch && src.matches("* 0.5f").count() == 1,
        "{src}"
    );
}

/// SwiGLU's `silu(gate) * up` on up reads what the gate rows compute: up
/// stays a kernel of its own rather than read rows other tiles write.
#[test]
fn a_projection_whose_epilogue_reads_a_sibling_stays_apart() {
    let mut b = Builder::new("glu", &["T"]);
    let x = b.input("x", DType::BF16, shape![T, 256]).unwrap();
    let wg = b
        .weight("gate.weight", DType::BF16, shape![128, 256])
        .unwrap();
    let wu = b
        .weight("up.weight", DType::BF16, shape![128, 256])
        .unwrap();
    let gate = b.matmul(x, wg).unwrap();
    let up = b.matmul(x, wu).unwrap();
    let act = b.silu(gate).unwrap();
    let y = b.mul(act, up).unwrap();
    b.output("y", y).unwrap();
    let (_, parts) = matvec_kernels(b.finish().unwrap());
    assert_eq!(parts.len(), 2, "{parts:?}");
}

#[test]
fn a_qwen3_layer_takes_seven_kernels_at_one_token_and_eight_at_more() {
    let p = presets::by_name("qwen3-30b-a3b").unwrap();
    let g = p.arch.layer_graph(&p.options, 1).unwrap();
    // With several tokens the router keeps a kernel of its own.
    let plan8 = Plan::new(run_pipeline(g.clone()).unwrap(), PlanOptions::new(8)).unwrap();
    let names8: Vec<&str> = plan8.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(plan8.kernels.len(), 8, "{names8:?}");
    assert!(names8.iter().any(|n| n.contains("_router_")), "{names8:?}");
    assert!(names8.iter().any(|n| n.contains("_moe_up_")), "{names8:?}");
    let plan = Plan::new(run_pipeline(g).unwrap(), PlanOptions::new(1)).unwrap();
    let names: Vec<&str> = plan.kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(plan.kernels.len(), 7, "{names:?}");
    // At one token every gate/up tile runs the router itself, and the one
    // that writes the routing table is the gate/up kernel.
    assert!(!names.iter().any(|n| n.contains("_router_")), "{names:?}");
    let up = plan
        .kernels
        .iter()
        .find(|k| k.name.contains("moe_routed_up"))
        .unwrap_or_else(|| panic!("no routed gate/up kernel: {names:?}"));
    let KernelKind::ExpertsUp {
        router: Some((select, weights)),
        ..
    } = plan.group(up).kind
    else {
        panic!("{} does not run its router", up.name);
    };
    for n in [select, weights] {
        assert!(
            up.writes.contains(&tilefuse_codegen::plan::Value::Node(n)),
            "{} does not store the router's choice and weights for the down kernel",
            up.name
        );
    }
    assert!(names[0].contains("norm_matvecs"), "{names:?}");
    // The new keys are the queries' own tokens: the attention kernel
    // appends them, no kernel of their own.
    assert!(names[1].contains("attention_bf16"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.contains("rope_append")),
        "{names:?}"
    );
    // The norm before the router is the router projection's prologue, which
    // also stores it for the experts: no kernel of its own.
    assert!(!names.iter().any(|n| n.contains("rms_norm")), "{names:?}");
    let router_mv = plan
        .kernels
        .iter()
        .find(|k| k.name.contains("norm_matvec_"))
        .unwrap_or_else(|| panic!("no norm-prologue router projection: {names:?}"));
    let KernelKind::MatVec { norm: Some(nm), .. } = plan.group(router_mv).kind else {
        panic!("{} is not a norm-prologue matvec", router_mv.name);
    };
    assert!(
        router_mv
            .writes
            .contains(&tilefuse_codegen::plan::Value::Node(nm)),
        "{} does not store its norm for the experts",
        router_mv.name
    );
}
