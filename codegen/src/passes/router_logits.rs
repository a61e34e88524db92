//! Router logits and router in one kernel: the matvec that computes a
//! router's logits also chooses the experts, in the last of its tiles to
//! finish (a ticket in the arena head counts the tiles that stored their
//! logits). One kernel boundary less per MoE layer: the logits are read back
//! from L2 by one CTA that is already running instead of by a kernel that
//! must first be launched and wait for the matvec's end.

use crate::error::CodegenError;
use crate::fusion::{Fused, KernelKind};

/// Moves every router into the matvec kernel that computes its logits, when
/// that kernel stores the logits as its own result (the matmul or its
/// epilogue's last node) and computes no sibling matmul.
pub fn run(f: &mut Fused) -> Result<(), CodegenError> {
    let mut gi = 0;
    while gi < f.groups.len() {
        let KernelKind::Router { select, weights } = f.groups[gi].kind else {
            gi += 1;
            continue;
        };
        let logits = f.storage(f.graph.inputs(select)[0]);
        let Some(pi) = f.group_of(logits) else {
            gi += 1;
            continue;
        };
        let producer = &f.groups[pi];
        let fits = match &producer.kind {
            KernelKind::MatVec {
                matmul,
                siblings,
                router: None,
                ..
            } => siblings.is_empty() && *producer.epilogue.last().unwrap_or(matmul) == logits,
            _ => false,
        };
        if !fits {
            gi += 1;
            continue;
        }
        let nodes = std::mem::take(&mut f.groups[gi].nodes);
        f.groups[pi].nodes.extend(nodes);
        if let KernelKind::MatVec { router, .. } = &mut f.groups[pi].kind {
            *router = Some((select, weights));
        }
        f.groups.remove(gi);
    }
    Ok(())
}
