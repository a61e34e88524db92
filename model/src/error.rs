//! The error of everything that reads or writes a checkpoint directory.

use std::fmt;

/// A problem with a checkpoint, its `config.json`, its tensors or its
/// tokenizer. The message names the file, the field or the tensor, says what
/// was expected and what was found, and where it can, what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    message: String,
}

impl LoadError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> LoadError {
        LoadError {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for LoadError {}

impl From<tilefuse_ir::IrError> for LoadError {
    fn from(e: tilefuse_ir::IrError) -> LoadError {
        LoadError::new(e.to_string())
    }
}

/// Result with a [`LoadError`].
pub type Result<T, E = LoadError> = std::result::Result<T, E>;

/// `[a, b, c]`, the way errors print shapes.
pub(crate) fn fmt_shape(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}
