//! Lowering: each kernel of a plan becomes a `__device__` tile function over
//! the header library, a thin `__global__` wrapper, and (for the persistent
//! mode) an entry in the dispatcher.

use tilefuse_ir::{DType, Op};

use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};
use crate::plan::{PlanOptions, Tiling};

/// The launch shape of a group's kernel for a bucket.
pub fn tiling(f: &Fused, group: &Group, opt: &PlanOptions) -> Result<Tiling, CodegenError> {
    let _ = (f, opt);
    // Placeholder shapes until each kind's lowering decides them.
    Ok(Tiling {
        tiles: 1,
        threads: 128,
        smem: 0,
        workspaces: match group.kind {
            KernelKind::Router { .. } => vec![(0, "routing".into(), 4096)],
            KernelKind::ExpertsUp { .. } => vec![(0, "h".into(), 4096)],
            _ => vec![],
        },
        shape: "1".into(),
    })
}

/// The dtype that names a kernel: its weight's, else its output's.
pub fn weight_dtype_name(f: &Fused, group: &Group) -> DType {
    let g = &f.graph;
    let weight = match group.kind {
        KernelKind::MatVec { matmul, .. } => Some(g.inputs(matmul)[1]),
        KernelKind::ExpertsUp { experts } | KernelKind::ExpertsDown { experts } => Some(g.inputs(experts)[3]),
        _ => None,
    };
    match weight {
        Some(w) => g.node(w).ty.dtype,
        None => group
            .nodes
            .iter()
            .find(|&&n| !matches!(g.node(n).op, Op::Input(_)))
            .map(|&n| g.node(n).ty.dtype)
            .unwrap_or(DType::F32),
    }
}
