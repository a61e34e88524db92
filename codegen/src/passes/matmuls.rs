//! Matmul kernels, with norm prologue fusion: an RMSNorm read only by
//! matmuls (as their activation) is recomputed in each matmul's prologue
//! instead of being written to memory. The norm reads one row per token: a
//! few KB, next to the megabytes of weights each matmul streams. Every other
//! matmul gets a plain matvec kernel here too, so the epilogue pass that
//! follows sees all of them.

use tilefuse_ir::{Nn, NodeId, Op};

use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};

/// Creates a norm-prologue matvec kernel for each matmul of such a norm,
/// and a plain one for every other matmul.
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
        let all_matmul_x = !users.is_empty()
            && users.iter().all(|&u| {
                matches!(f.graph.node(u).op, Op::Nn(Nn::MatMul { .. }))
                    && f.graph.inputs(u)[0] == n
                    && f.graph.inputs(u)[1] != n
            });
        if !all_matmul_x {
            continue;
        }
        for (i, &m) in users.iter().enumerate() {
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
