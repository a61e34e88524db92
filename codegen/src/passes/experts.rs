//! Expert fusion: each `moe.experts` becomes two kernels. The first streams
//! the gate/up rows of every chosen expert once and writes `silu(g)·u` for
//! the tokens that chose it; the second streams the down rows once and sums
//! the weighted outputs per token (its epilogue may add the residual).

use tilefuse_ir::{Moe, Op};

use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};

/// Creates the up and down kernels of every expert node; the down kernel owns the node.
pub fn run(f: &mut Fused) -> Result<(), CodegenError> {
    for e in f.graph.topo_order()? {
        if !matches!(f.graph.node(e).op, Op::Moe(Moe::Experts)) {
            continue;
        }
        let ins = f.graph.inputs(e);
        let (idx, w) = (ins[1], ins[2]);
        let routed = f.group_of(idx).is_some_and(|g| {
            matches!(f.groups[g].kind, KernelKind::Router { select, weights } if select == idx && weights == w)
        });
        if !routed {
            return Err(CodegenError::Unsupported {
                node: f.graph.describe(e),
                reason: "experts whose indices and weights do not come from one router kernel"
                    .into(),
            });
        }
        f.groups.push(Group::new(
            KernelKind::ExpertsUp {
                experts: e,
                router: None,
            },
            [],
        ));
        f.groups
            .push(Group::new(KernelKind::ExpertsDown { experts: e }, [e]));
    }
    Ok(())
}
