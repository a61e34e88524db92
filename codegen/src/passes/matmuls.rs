//! Matmul kernels, with norm prologue fusion: an RMSNorm that matmuls read
//! (as their activation) is recomputed in each such matmul's prologue. The
//! norm reads one row per token: a few KB, next to the megabytes of weights
//! each matmul streams. When the experts of a MoE block read the norm too
//! (beside its router projection), the first matmul kernel also writes it,
//! from its prologue, instead of a kernel of its own. (Only the experts: an
//! elementwise reader could join that kernel's epilogue and make a cycle.)
//! Every other matmul gets a plain matvec kernel here too, so the epilogue
//! pass that follows sees all of them.

use tilefuse_ir::{Moe, Nn, NodeId, Op};

use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};

/// Creates a norm-prologue matvec kernel for each matmul that reads such a
/// norm (the first owns the norm node, and writes it when the experts read
/// it), and a plain one for every other matmul.
pub fn run(f: &mut Fused) -> Result<(), CodegenError> {
    let grouped = f.grouped();
    for n in f.graph.topo_order()? {
        if grouped.contains(&n)
            || !matches!(f.graph.node(n).op, Op::Nn(Nn::RmsNorm { .. }))
            || f.is_output(n)
        {
            continue;
        }
        let users = f.graph.users(n);
        let is_matmul_x = |u: NodeId| {
            matches!(f.graph.node(u).op, Op::Nn(Nn::MatMul { .. }))
                && f.graph.inputs(u)[0] == n
                && f.graph.inputs(u)[1] != n
        };
        let is_experts_x = |u: NodeId| {
            matches!(f.graph.node(u).op, Op::Moe(Moe::Experts)) && f.graph.inputs(u)[0] == n
        };
        let matmuls: Vec<NodeId> = users.iter().copied().filter(|&u| is_matmul_x(u)).collect();
        if matmuls.is_empty() || !users.iter().all(|&u| is_matmul_x(u) || is_experts_x(u)) {
            continue;
        }
        for (i, &m) in matmuls.iter().enumerate() {
            // The first kernel owns the norm node; the others recompute it too.
            let mut nodes: Vec<NodeId> = vec![m];
            if i == 0 {
                nodes.push(n);
            }
            f.groups.push(Group::new(
                KernelKind::MatVec {
                    matmul: m,
                    norm: Some(n),
                    siblings: vec![],
                },
                nodes,
            ));
        }
    }
    for m in f.graph.topo_order()? {
        if f.group_of(m).is_none() && matches!(f.graph.node(m).op, Op::Nn(Nn::MatMul { .. })) {
            f.groups.push(Group::new(
                KernelKind::MatVec {
                    matmul: m,
                    norm: None,
                    siblings: vec![],
                },
                [m],
            ));
        }
    }
    Ok(())
}
