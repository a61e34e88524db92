//! The router inside the expert gate/up kernel, for one-token buckets.
//!
//! A bucket pass: it runs when the plan knows its bucket ([`crate::plan::Plan::new`]),
//! because it pays at one token only. There every gate/up tile runs the
//! router on the logits itself (one warp: softmax, top-k, the one-token
//! routing table, a few hundred instructions) in the time it would otherwise
//! spend reading the router kernel's table from L2, and the router kernel
//! and its kernel boundary go. With several tokens every tile would build
//! the whole table (counts, prefix, placement) and the tiles of experts
//! nobody chose would run the router only to leave: the router keeps its own
//! kernel there.

use crate::fusion::{Fused, KernelKind};

/// The largest bucket (`MAX_T`) this pass applies to.
pub const MAX_T: usize = 1;

/// Moves every router into the gate/up kernel of the experts it routes,
/// when `max_t` is at most [`MAX_T`].
pub fn run(f: &mut Fused, max_t: usize) {
    if max_t > MAX_T {
        return;
    }
    let mut ri = 0;
    while ri < f.groups.len() {
        let KernelKind::Router { select, weights } = f.groups[ri].kind else {
            ri += 1;
            continue;
        };
        let up = f.groups.iter().position(|g| match g.kind {
            KernelKind::ExpertsUp {
                experts,
                router: None,
            } => {
                let ins = f.graph.inputs(experts);
                ins[1] == select && ins[2] == weights
            }
            _ => false,
        });
        let Some(ui) = up else {
            ri += 1;
            continue;
        };
        let nodes = std::mem::take(&mut f.groups[ri].nodes);
        f.groups[ui].nodes.extend(nodes);
        if let KernelKind::ExpertsUp { router, .. } = &mut f.groups[ui].kind {
            *router = Some((select, weights));
        }
        f.groups.remove(ri);
    }
}
