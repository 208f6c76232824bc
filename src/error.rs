//! The core's one error type. Every variant names the offending parameter and, where there is one, the fix;
//! the binding layer maps them onto Python exceptions.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum CanopyError {
    /// A bad argument value (policy, sizes, ids). Maps to `ValueError`.
    #[error("{param}: {message}")]
    InvalidArgument { param: &'static str, message: String },

    /// A logits row the policy cannot use (NaN, +inf, all -inf). Maps to `ValueError`.
    #[error("logits row {row}: {message}")]
    InvalidLogits { row: usize, message: String },

    /// An array of the wrong shape or inconsistent CSR layout. Maps to `ValueError`.
    #[error("{param}: {message}")]
    Shape { param: &'static str, message: String },

    /// The canopy would grow past the node budget. Maps to `TreeTooLargeError` (a `ValueError`).
    #[error(
        "the canopy exceeds max_nodes={max_nodes}: {reached} nodes were reached ({expanded} expanded, \
         deepest frontier depth {depth}); raise max_nodes, lower top_k / top_p / max_new_tokens, or use \
         canopy_rs.bounded() for a certified bracket within a budget"
    )]
    TreeTooLarge { max_nodes: usize, reached: usize, expanded: usize, depth: u32 },

    /// The driver called the engine out of order (a bug in the caller). Maps to `RuntimeError`.
    #[error("{0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, CanopyError>;

pub(crate) fn invalid(param: &'static str, message: impl Into<String>) -> CanopyError {
    CanopyError::InvalidArgument { param, message: message.into() }
}
