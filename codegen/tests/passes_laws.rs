//! Laws of the pass pipeline on random graphs: the fused graph verifies after
//! every pass, the interpreter gives the same outputs before and after, the
//! pipeline either partitions every node or names the node it cannot place,
//! and lowering is deterministic.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use tilefuse_codegen::passes::run_pipeline_observed;
use tilefuse_codegen::CodegenError;
use tilefuse_ir::interp::{self, Caches};
use tilefuse_ir::testing::{arb_graph, random_inputs};
use tilefuse_ir::Bindings;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn passes_verify_and_preserve_semantics(g in arb_graph(24)) {
        let b = Bindings::new().with("S", 2).with("T", 3);
        let inputs = random_inputs(&g, &b, 11).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let before = interp::run(&g, &b, &inputs, &mut Caches::default());
        let mut after_graph = None;
        let r = run_pipeline_observed(g.clone(), |_, f| {
            f.verify().expect("verified after each pass");
            after_graph = Some(f.graph.clone());
        });
        match r {
            Ok(_) => {}
            Err(CodegenError::Pass { error, .. }) if matches!(*error, CodegenError::Unsupported { .. }) => {}
            Err(CodegenError::Unsupported { .. }) => {}
            Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
        }
        if let (Ok(before), Some(after)) = (before, after_graph) {
            let after = interp::run(&after, &b, &inputs, &mut Caches::default())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (name, v) in &before {
                let w = &after[name];
                let (a, c) = (v.to_f32(), w.to_f32());
                prop_assert_eq!(a.len(), c.len());
                for (x, y) in a.iter().zip(&c) {
                    prop_assert!(x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()), "{name}: {x} vs {y}");
                }
            }
        }
    }
}
