//! The persistent mode's static schedule: every tile once, each SM's list in
//! schedule order, dependencies only on earlier kernels (the deadlock-freedom
//! argument of `TaskTables` rests on these three facts).

#![allow(clippy::unwrap_used)]

use tilefuse_codegen::lower::TASK_TILE_BITS;
use tilefuse_codegen::passes::run_pipeline;
use tilefuse_codegen::plan::{Plan, PlanOptions};
use tilefuse_model::presets;
use tilefuse_runtime::cuda_exec::TaskTables;

#[test]
fn tables_cover_every_tile_in_order() {
    for preset in ["mimo-v2-tiny", "qwen3-moe-tiny"] {
        let p = presets::by_name(preset).unwrap();
        let g = p.arch.forward_graph(&p.options).unwrap();
        let plan = Plan::new(run_pipeline(g).unwrap(), PlanOptions::new(8)).unwrap();
        for sms in [1, 7, 132] {
            let t = TaskTables::new(&plan, sms);
            assert_eq!(t.sm_offsets.len(), sms + 1);
            let mut seen = std::collections::BTreeSet::new();
            for s in 0..sms {
                let list = &t.tasks[t.sm_offsets[s] as usize..t.sm_offsets[s + 1] as usize];
                let kernels: Vec<i32> = list.iter().map(|x| x >> TASK_TILE_BITS).collect();
                assert!(
                    kernels.windows(2).all(|w| w[0] <= w[1]),
                    "SM {s} list out of order"
                );
                for &x in list {
                    assert!(seen.insert(x), "task {x} twice");
                }
            }
            let total: u32 = plan.kernels.iter().map(|k| k.tiling.tiles).sum();
            assert_eq!(seen.len() as u32, total);
            for (k, kernel) in plan.kernels.iter().enumerate() {
                let d = &t.deps[t.dep_offsets[k] as usize..t.dep_offsets[k + 1] as usize];
                assert!(
                    d.iter().all(|&x| (x as usize) < k),
                    "kernel {} depends on a later kernel",
                    kernel.name
                );
            }
        }
    }
}
