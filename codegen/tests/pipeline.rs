//! The pass pipeline on whole models: every node lands in exactly one kernel,
//! and the kernel list is what the design says it is.

#![allow(clippy::unwrap_used)]

use tilefuse_codegen::passes::run_pipeline;
use tilefuse_model::presets;

fn kinds(preset: &str) -> Vec<String> {
    let p = presets::by_name(preset).unwrap();
    let g = p.arch.forward_graph(&p.options).unwrap();
    let f = run_pipeline(g).unwrap_or_else(|e| panic!("{e}"));
    f.groups
        .iter()
        .map(|g| g.kind.short().to_string())
        .collect()
}

#[test]
fn mimo_tiny_kernels() {
    let k = kinds("mimo-v2-tiny");
    println!("{k:?}");
    assert_eq!(k.iter().filter(|s| *s == "attention").count(), 3);
    assert_eq!(k.iter().filter(|s| *s == "moe_down").count(), 2);
}

#[test]
fn qwen_tiny_kernels() {
    let k = kinds("qwen3-moe-tiny");
    println!("{k:?}");
    assert_eq!(k.iter().filter(|s| *s == "attention").count(), 2);
}

#[test]
fn full_width_plans_fit_the_shared_memory_of_an_sm() {
    use tilefuse_codegen::plan::{Plan, PlanOptions};
    for name in ["mimo-v2-flash-4l", "qwen3-30b-a3b"] {
        let p = presets::by_name(name).unwrap();
        let g = p.arch.forward_graph(&p.options).unwrap();
        for max_t in [1, 8, 16, 64] {
            let plan =
                Plan::new(run_pipeline(g.clone()).unwrap(), PlanOptions::new(max_t)).unwrap();
            for k in &plan.kernels {
                assert!(
                    k.tiling.smem <= 227 * 1024,
                    "{name} T<={max_t}: {} needs {} bytes",
                    k.name,
                    k.tiling.smem
                );
            }
        }
    }
}

#[test]
fn kernels_wait_only_on_what_they_must() {
    use tilefuse_codegen::plan::{Plan, PlanOptions};
    let p = presets::by_name("qwen3-30b-a3b").unwrap();
    let g = p.arch.forward_graph(&p.options).unwrap();
    let plan = Plan::new(run_pipeline(g).unwrap(), PlanOptions::new(1)).unwrap();
    let most = plan.kernels.iter().map(|k| k.deps.len()).max().unwrap();
    // After the transitive reduction a kernel waits on its direct producers
    // (and an occasional arena anti-dependency), not on half the forward.
    assert!(most <= 4, "a kernel waits on {most} kernels");
    for (i, k) in plan.kernels.iter().enumerate().skip(1) {
        assert!(!k.deps.is_empty(), "{} (k{i}) waits on nothing", k.name);
    }
}
