//! A sharded graph (collectives) is refused by codegen with an error that
//! names the collective and says what is missing, not a panic.

#![allow(clippy::unwrap_used)]

use tilefuse_codegen::passes::run_pipeline;
use tilefuse_codegen::CodegenError;
use tilefuse_ir::shard::{shard, Parallelism};
use tilefuse_model::presets;

#[test]
fn collectives_need_the_nccl_runtime() {
    let p = presets::by_name("qwen3-moe-tiny").unwrap();
    let g = p.arch.layer_graph(&p.options, 1).unwrap();
    let sh = shard(&g, 2, Parallelism::default()).unwrap();
    let e = run_pipeline(sh.ranks[0].clone()).unwrap_err();
    assert!(matches!(e, CodegenError::Unsupported { .. }), "{e:?}");
    let m = e.to_string();
    assert!(
        m.contains("comm.all_reduce") && m.contains("NCCL runtime") && m.contains("layer1.attn"),
        "{m}"
    );
}
