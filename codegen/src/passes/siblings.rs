//! Sibling matmuls in one kernel: matvec kernels that read the same `x`
//! (through the same norm prologue, if any) become one kernel whose tiles
//! cover the rows of all their weights, as if the weights were stacked. The
//! q, k and v projections are the case in point: three dependent-free steps
//! of which two (k and v) have far fewer tiles than the GPU has SMs become
//! one full step.
//!
//! The plan lays the siblings' weights out one after the other, so the
//! stacked matrix is one contiguous row-major block; the epilogue routes each
//! row to its own matmul's output. Only formats without block-scale arrays
//! (bf16, f32, FP8 E4M3) stack that way, and each weight's bytes must be a
//! multiple of the plan's alignment (so no padding separates them) and its
//! rows a multiple of the smallest tile. Each matmul keeps its own
//! elementwise epilogue (MiMo's value scale on v), applied to its rows only.

use std::collections::{BTreeMap, BTreeSet};

use tilefuse_ir::{DType, NodeId};

use crate::error::CodegenError;
use crate::fusion::{Fused, KernelKind, Sibling};
use crate::plan::ALIGN;

/// Rows of the smallest matvec tile: every sibling's rows are a multiple of it.
const MIN_ROWS: usize = 16;

/// `(weight, rows, K, dtype)` of a matmul whose weights could stack.
fn stackable(f: &Fused, m: NodeId) -> Option<(NodeId, usize, usize, DType)> {
    let w = f.graph.inputs(m)[1];
    let ty = &f.graph.node(w).ty;
    if !matches!(ty.dtype, DType::BF16 | DType::F32 | DType::F8E4M3) || ty.rank() != 2 {
        return None;
    }
    let n = ty.dims()[0].as_const()?;
    let k = ty.dims()[1].as_const()?;
    let bytes = ty.dtype.storage_bytes(n * k, k)?;
    (n.is_multiple_of(MIN_ROWS) && bytes.is_multiple_of(ALIGN)).then_some((w, n, k, ty.dtype))
}

/// Merges every set of sibling matvec kernels into the first of them.
pub fn run(f: &mut Fused) -> Result<(), CodegenError> {
    // Candidates keyed by (x storage, norm, K, dtype), in creation order.
    let mut sets: BTreeMap<(NodeId, Option<NodeId>, usize, String), Vec<usize>> = BTreeMap::new();
    for (gi, g) in f.groups.iter().enumerate() {
        let KernelKind::MatVec {
            matmul,
            norm,
            ref siblings,
        } = g.kind
        else {
            continue;
        };
        if !siblings.is_empty() {
            continue;
        }
        let Some((_, _, k, dt)) = stackable(f, matmul) else {
            continue;
        };
        let x = match norm {
            Some(nm) => f.graph.inputs(nm)[0],
            None => f.graph.inputs(matmul)[0],
        };
        sets.entry((f.storage(x), norm, k, dt.to_string()))
            .or_default()
            .push(gi);
    }
    let mut removed = Vec::new();
    for mut members in sets.into_values() {
        // A matmul whose epilogue reads what another of the set computes
        // (SwiGLU's `silu(gate) * up` on up) stays a kernel of its own: its
        // tiles would otherwise read rows other tiles of the same step write.
        let all: BTreeSet<NodeId> = members
            .iter()
            .flat_map(|&gi| f.groups[gi].nodes.iter().copied())
            .collect();
        members.retain(|&gi| {
            let own = &f.groups[gi].nodes;
            f.groups[gi]
                .epilogue
                .iter()
                .flat_map(|&e| f.graph.inputs(e))
                .all(|i| own.contains(&i) || !all.contains(&i))
        });
        if members.len() < 2 {
            continue;
        }
        let first = members[0];
        let mut extra = Vec::new();
        for &gi in &members[1..] {
            if let KernelKind::MatVec { matmul, .. } = f.groups[gi].kind {
                extra.push(Sibling {
                    matmul,
                    epilogue: std::mem::take(&mut f.groups[gi].epilogue),
                });
            }
            let nodes = std::mem::take(&mut f.groups[gi].nodes);
            f.groups[first].nodes.extend(nodes);
            removed.push(gi);
        }
        if let KernelKind::MatVec { siblings, .. } = &mut f.groups[first].kind {
            *siblings = extra;
        }
    }
    removed.sort_unstable();
    for gi in removed.into_iter().rev() {
        f.groups.remove(gi);
    }
    Ok(())
}
