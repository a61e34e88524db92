//! Code generation errors: each names the node or kernel and the reason.

use std::fmt;

use tilefuse_ir::IrError;

/// Why code generation failed.
#[derive(Clone, Debug)]
pub enum CodegenError {
    /// The graph is malformed.
    Ir(IrError),
    /// A node, dtype or combination no kernel supports yet.
    Unsupported {
        /// The node, as described by the graph.
        node: String,
        /// What is not supported, and what to do.
        reason: String,
    },
    /// A pass broke an invariant (a bug in tilefuse, reported with the pass name).
    Internal(String),
    /// A pass failed; wraps the error with the pass name and the reproducer path.
    Pass {
        /// The pass.
        pass: &'static str,
        /// The error.
        error: Box<CodegenError>,
        /// Where the input of the failing pass was written, when dumping.
        reproducer: Option<String>,
    },
}

impl fmt::Display for CodegenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodegenError::Ir(e) => write!(f, "{e}"),
            CodegenError::Unsupported { node, reason } => {
                write!(f, "{node}: unsupported: {reason}")
            }
            CodegenError::Internal(m) => write!(f, "internal error: {m}"),
            CodegenError::Pass {
                pass,
                error,
                reproducer,
            } => {
                write!(f, "pass `{pass}` failed: {error}")?;
                if let Some(r) = reproducer {
                    write!(f, "\n(the pass input is saved in {r})")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for CodegenError {}

impl From<IrError> for CodegenError {
    fn from(e: IrError) -> CodegenError {
        CodegenError::Ir(e)
    }
}
