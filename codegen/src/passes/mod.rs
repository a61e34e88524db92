//! The ordered pass pipeline: IR graph in, kernel partition out.
//!
//! Each pass is one file with one function over [`Fused`]. The fused graph
//! is verified after every pass in tests and debug builds. Setting
//! `TILEFUSE_DUMP_IR=DIR` writes the printed state after each pass to
//! `DIR/NN-name.txt`, and the input of a failing pass to
//! `DIR/NN-name.input.txt` as a reproducer.
//!
//! A pass that pays only at some bucket sizes runs later, when
//! [`crate::plan::Plan::new`] knows the bucket: [`route_in_up`] (the router
//! inside the gate/up kernel at one token).

mod attention;
mod canonicalize;
mod elementwise;
mod epilogue;
mod experts;
mod matmuls;
mod remaining;
pub mod route_in_up;
mod router;
mod siblings;

use std::path::PathBuf;

use tilefuse_ir::{Graph, Op};

use crate::error::CodegenError;
use crate::fusion::Fused;

/// One named pass.
pub struct Pass {
    /// Name used in dumps and errors.
    pub name: &'static str,
    /// Why it sits at this point of the pipeline.
    pub why: &'static str,
    /// The rewrite.
    pub run: fn(&mut Fused) -> Result<(), CodegenError>,
}

/// The pipeline, in order.
pub const PIPELINE: &[Pass] = &[
    Pass {
        name: "canonicalize",
        why: "first: later passes match patterns and expect no identity casts or reshape chains",
        run: canonicalize::run,
    },
    Pass {
        name: "fuse_attention",
        why: "before the norm and epilogue passes, so RoPE and per-head norms of q and k join the attention kernels instead of becoming epilogues",
        run: attention::run,
    },
    Pass {
        name: "fuse_router",
        why: "router choice and weights share their logits; one kernel also builds the expert routing table",
        run: router::run,
    },
    Pass {
        name: "fuse_experts",
        why: "after the router, whose table the two expert kernels read",
        run: experts::run,
    },
    Pass {
        name: "fuse_matmuls",
        why: "before epilogues, which attach to matmul kernels; a norm feeding only matmuls is recomputed in their prologue rather than stored",
        run: matmuls::run,
    },
    Pass {
        name: "fuse_epilogues",
        why: "once every anchor kernel exists, elementwise consumers (value scale, residual add, cast) join the kernel that produces their input",
        run: epilogue::run,
    },
    Pass {
        name: "fuse_siblings",
        why: "after epilogues, which decide which matmuls stay bare: matvec kernels of the same input (the q, k and v projections) become one kernel over their stacked weights",
        run: siblings::run,
    },
    Pass {
        name: "fuse_elementwise",
        why: "what elementwise work is left is grouped into as few per-element kernels as possible",
        run: elementwise::run,
    },
    Pass {
        name: "remaining",
        why: "last: every node not yet in a kernel gets its own, or an error naming it",
        run: remaining::run,
    },
];

fn dump_dir() -> Option<PathBuf> {
    std::env::var_os("TILEFUSE_DUMP_IR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Collectives (a graph split by `tilefuse_ir::shard`) have no lowering
/// yet: refused before any pass, naming the first one.
fn refuse_collectives(graph: &Graph) -> Result<(), CodegenError> {
    for n in graph.topo_order()? {
        let op = &graph.node(n).op;
        if let Op::Comm(c) = op {
            return Err(CodegenError::Unsupported {
                node: graph.describe(n),
                reason: format!(
                    "`{}` over {} ranks: multi-GPU execution needs the NCCL runtime, which \
                     tilefuse does not have yet; run the sharded graphs on the CPU \
                     (tilefuse_ir::interp::run_ranks) or compile the unsplit graph for one GPU",
                    op.mnemonic(),
                    c.ranks()
                ),
            });
        }
    }
    Ok(())
}

/// Runs every pass on `graph`, verifying between passes (always: it is
/// cheap next to compiling), and returns the fused graph.
pub fn run_pipeline(graph: Graph) -> Result<Fused, CodegenError> {
    run_pipeline_observed(graph, |_, _| {})
}

/// Like [`run_pipeline`], calling `observe(pass name, state)` after each pass
/// (used by snapshot tests and `tilefuse compile --emit ir`).
pub fn run_pipeline_observed(
    graph: Graph,
    mut observe: impl FnMut(&str, &Fused),
) -> Result<Fused, CodegenError> {
    graph.verify()?;
    refuse_collectives(&graph)?;
    let mut fused = Fused::new(graph);
    let dump = dump_dir();
    if let Some(d) = &dump {
        let _ = std::fs::create_dir_all(d);
        let _ = std::fs::write(d.join("00-input.txt"), fused.to_string());
    }
    for (i, pass) in PIPELINE.iter().enumerate() {
        let before = dump.as_ref().map(|_| fused.clone());
        let result = (pass.run)(&mut fused).and_then(|()| fused.verify());
        if let Err(error) = result {
            let reproducer = match (&dump, before) {
                (Some(d), Some(b)) => {
                    let p = d.join(format!("{:02}-{}.input.txt", i + 1, pass.name));
                    let _ = std::fs::write(&p, b.graph.to_string());
                    Some(p.display().to_string())
                }
                _ => None,
            };
            return Err(CodegenError::Pass {
                pass: pass.name,
                error: Box::new(error),
                reproducer,
            });
        }
        if let Some(d) = &dump {
            let _ = std::fs::write(
                d.join(format!("{:02}-{}.txt", i + 1, pass.name)),
                fused.to_string(),
            );
        }
        observe(pass.name, &fused);
    }
    fused.verify_complete()?;
    Ok(fused)
}
