//! Elementwise fusion: what elementwise nodes remain are grouped into
//! per-element kernels, a node joining its producer's kernel when it is that
//! producer's only consumer and has the same element count.

use tilefuse_ir::{NodeId, Op};

use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};

fn numel(f: &Fused, n: NodeId) -> String {
    let mut dims: Vec<String> = f
        .graph
        .node(n)
        .ty
        .dims()
        .iter()
        .map(|d| d.to_string())
        .collect();
    dims.sort();
    dims.join("*")
}

/// Groups the remaining elementwise nodes.
pub fn run(f: &mut Fused) -> Result<(), CodegenError> {
    for n in f.graph.topo_order()? {
        if f.group_of(n).is_some() || !matches!(f.graph.node(n).op, Op::Ew(_)) {
            continue;
        }
        // Join the kernel of an elementwise producer whose only consumer is `n`.
        let join = f
            .graph
            .inputs(n)
            .into_iter()
            .map(|i| f.storage(i))
            .find_map(|p| {
                let g = f.group_of(p)?;
                let ok = f.groups[g].kind == KernelKind::Elementwise
                    && f.real_users(p) == vec![n]
                    && !f.is_output(p)
                    && numel(f, p) == numel(f, n);
                ok.then_some(g)
            });
        match join {
            Some(g) => {
                f.groups[g].nodes.insert(n);
                f.groups[g].epilogue.push(n);
            }
            None => {
                let mut g = Group::new(KernelKind::Elementwise, [n]);
                g.epilogue.push(n);
                f.groups.push(g);
            }
        }
    }
    Ok(())
}
