//! The IR's error type: every error names what it is about.

use std::fmt;

/// What kind of problem an [`IrError`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Input shapes or dtypes do not fit the op.
    Type,
    /// An input refers to a node that is not in the graph.
    Dangling,
    /// A dim mentions a symbol the graph does not declare.
    UnknownSymbol,
    /// The graph has a cycle.
    Cycle,
    /// Two nodes or outputs share a name that must be unique.
    Duplicate,
    /// The text form could not be parsed.
    Parse,
    /// The interpreter was given bad inputs or met a runtime condition.
    Interp,
    /// The sharding pass cannot split a node for the requested ranks.
    Shard,
}

/// An error about a graph, a node of it, or its text.
#[derive(Clone, Debug, PartialEq)]
pub struct IrError {
    /// The kind of problem.
    pub kind: ErrorKind,
    /// The node concerned, as printed: `%7 "layer0.attn.q" (nn.matmul)`.
    pub node: Option<String>,
    /// What is wrong: what was expected and what was found.
    pub message: String,
    /// Extra context (the node's neighbourhood, the offending line, ...).
    pub context: Option<String>,
}

impl IrError {
    /// An error not tied to a node.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> IrError {
        IrError {
            kind,
            node: None,
            message: message.into(),
            context: None,
        }
    }

    /// The same error, naming a node.
    pub fn at(mut self, node: impl Into<String>) -> IrError {
        self.node = Some(node.into());
        self
    }

    /// The same error, with context lines.
    pub fn with_context(mut self, context: impl Into<String>) -> IrError {
        self.context = Some(context.into());
        self
    }
}

impl fmt::Display for IrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = &self.node {
            write!(f, "{n}: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(c) = &self.context {
            write!(f, "\n{c}")?;
        }
        Ok(())
    }
}

impl std::error::Error for IrError {}

/// Result with an [`IrError`].
pub type Result<T, E = IrError> = std::result::Result<T, E>;
