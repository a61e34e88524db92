//! Canonicalisation: identity casts and reshapes removed, reshape chains
//! collapsed, dead nodes dropped. Semantics unchanged (the interpreter gives
//! the same outputs before and after).

use tilefuse_ir::{Elementwise, NodeId, Op, View};

use crate::error::CodegenError;
use crate::fusion::Fused;

/// Runs the rewrites to a fixed point.
pub fn run(f: &mut Fused) -> Result<(), CodegenError> {
    loop {
        let mut changed = false;
        let order = f.graph.topo_order()?;
        for n in order {
            if !f.graph.contains(n) {
                continue;
            }
            let node = f.graph.node(n).clone();
            let ins = f.graph.inputs(n);
            match &node.op {
                // cast to the same dtype, reshape to the same shape: the input itself.
                Op::Ew(Elementwise::Cast(d)) if f.graph.node(ins[0]).ty.dtype == *d => {
                    replace(f, n, ins[0]);
                    changed = true;
                }
                Op::View(View::Reshape(s)) if f.graph.node(ins[0]).ty.shape == *s => {
                    replace(f, n, ins[0]);
                    changed = true;
                }
                // reshape(reshape(x)) = reshape(x).
                Op::View(View::Reshape(_)) => {
                    let src = ins[0];
                    if let Op::View(View::Reshape(_)) = f.graph.node(src).op {
                        let inner = f.graph.inputs(src)[0];
                        f.graph.set_input(n, 0, inner);
                        changed = true;
                    }
                }
                _ => {}
            }
        }
        changed |= f.graph.remove_dead() > 0;
        if !changed {
            return Ok(());
        }
    }
}

/// Makes users of `old` use `new`; when `old` was a graph output the output
/// keeps its name and moves to `new`.
fn replace(f: &mut Fused, old: NodeId, new: NodeId) {
    f.graph.replace_uses(old, new);
    f.graph.remove(old);
}
