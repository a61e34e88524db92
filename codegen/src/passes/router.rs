//! Router fusion: expert choice and expert weights over the same logits
//! become one kernel, which also writes the routing table the expert
//! kernels read (each chosen expert once, with the tokens that chose it).

use tilefuse_ir::{Moe, NodeId, Op};

use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};

/// Pairs every `moe.router_select` with the `moe.router_weights` of the same logits.
pub fn run(f: &mut Fused) -> Result<(), CodegenError> {
    let order = f.graph.topo_order()?;
    for sel in order.iter().copied() {
        if !matches!(f.graph.node(sel).op, Op::Moe(Moe::RouterSelect { .. })) {
            continue;
        }
        let logits = f.graph.inputs(sel)[0];
        let weights: Vec<NodeId> = f
            .graph
            .users(sel)
            .into_iter()
            .filter(|&u| {
                matches!(f.graph.node(u).op, Op::Moe(Moe::RouterWeights { .. }))
                    && f.graph.inputs(u)[0] == logits
            })
            .collect();
        let [w] = weights[..] else {
            return Err(CodegenError::Unsupported {
                node: f.graph.describe(sel),
                reason: format!(
                    "an expert choice needs exactly one `moe.router_weights` over the same logits, found {}",
                    weights.len()
                ),
            });
        };
        f.groups.push(Group::new(
            KernelKind::Router {
                select: sel,
                weights: w,
            },
            [sel, w],
        ));
    }
    Ok(())
}
