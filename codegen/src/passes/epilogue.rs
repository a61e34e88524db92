//! Epilogue fusion: elementwise consumers of a kernel's result (value
//! scale, residual add, cast) are applied in that kernel before it stores,
//! as long as each intermediate has that single consumer and is not a graph
//! output. The other operand of a binary op must have the same element count
//! (same flat index) or a single element.

use tilefuse_ir::{Elementwise, NodeId, Op};

use crate::error::CodegenError;
use crate::fusion::{Fused, KernelKind};

/// The node whose value an anchor kernel produces, if its kind takes an epilogue.
fn anchor_output(kind: &KernelKind) -> Option<NodeId> {
    match kind {
        KernelKind::MatVec { matmul, .. } => Some(*matmul),
        KernelKind::ExpertsDown { experts } => Some(*experts),
        _ => None,
    }
}

fn numel_key(f: &Fused, n: NodeId) -> Vec<String> {
    // Element counts compared structurally: the sorted dims (reshapes keep the multiset
    // of symbolic dims and the product of constants; here the dims must match as printed).
    let mut c = 1usize;
    let mut syms: Vec<String> = vec![];
    for d in f.graph.node(n).ty.dims() {
        match d.as_const() {
            Some(k) => c *= k,
            None => syms.push(d.to_string()),
        }
    }
    syms.sort();
    syms.push(c.to_string());
    syms
}

/// Extends every anchor kernel with its elementwise consumers.
pub fn run(f: &mut Fused) -> Result<(), CodegenError> {
    for gi in 0..f.groups.len() {
        let Some(anchor) = anchor_output(&f.groups[gi].kind) else {
            continue;
        };
        let key = numel_key(f, anchor);
        loop {
            let tail = *f.groups[gi].epilogue.last().unwrap_or(&anchor);
            if f.is_output(tail) {
                break;
            }
            let users = f.real_users(tail);
            let [u] = users[..] else { break };
            if f.group_of(u).is_some() || numel_key(f, u) != key {
                break;
            }
            let ok = match &f.graph.node(u).op {
                Op::Ew(Elementwise::Unary(_) | Elementwise::Scalar(..) | Elementwise::Cast(_)) => {
                    true
                }
                Op::Ew(Elementwise::Binary(_)) => {
                    let ins = f.graph.inputs(u);
                    let other: Vec<NodeId> = ins
                        .iter()
                        .copied()
                        .filter(|&i| f.storage(i) != tail)
                        .collect();
                    match other[..] {
                        [o] => {
                            numel_key(f, o) == key
                                || f.graph
                                    .node(o)
                                    .ty
                                    .dims()
                                    .iter()
                                    .all(|d| d.as_const() == Some(1))
                        }
                        [] => true,
                        _ => false,
                    }
                }
                _ => false,
            };
            if !ok {
                break;
            }
            let g = &mut f.groups[gi];
            g.nodes.insert(u);
            g.epilogue.push(u);
        }
    }
    Ok(())
}
