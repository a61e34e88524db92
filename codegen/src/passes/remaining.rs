//! The remaining nodes: each gets a kernel of its own kind, or an error that
//! names it and says what is not supported on the GPU.

use tilefuse_ir::{Nn, Op, Sample, View};

use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};

/// Gives every ungrouped computing node its kernel.
pub fn run(f: &mut Fused) -> Result<(), CodegenError> {
    for n in f.graph.topo_order()? {
        if f.group_of(n).is_some() || f.is_alias(n) {
            continue;
        }
        let kind = match &f.graph.node(n).op {
            Op::Input(_) => continue,
            Op::Nn(Nn::Embedding) => KernelKind::Embedding { node: n },
            Op::Nn(Nn::RmsNorm { .. }) => KernelKind::RmsNorm { node: n },
            Op::View(View::Concat { .. }) => KernelKind::Concat { node: n },
            Op::Sample(Sample::Argmax) => KernelKind::Argmax { node: n },
            Op::Sample(Sample::Sample { .. }) => KernelKind::Sample { node: n },
            op => {
                return Err(CodegenError::Unsupported {
                    node: f.graph.describe(n),
                    reason: format!(
                        "`{}` has no GPU kernel in this position; the CPU interpreter runs it (use --backend cpu)",
                        op.mnemonic()
                    ),
                })
            }
        };
        f.groups.push(Group::new(kind, [n]));
    }
    Ok(())
}
