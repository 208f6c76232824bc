//! canopy_rs: the exact canopy entropy of a language model's generation tree.
//!
//! The pure core (`policy`, `tree`, `stats`, `error`) has no Python types and is tested with `cargo test`;
//! `python` is the thin PyO3 layer, compiled only with the `python` feature (maturin turns it on).

pub mod error;
pub mod policy;
pub mod stats;
pub mod tree;

#[cfg(feature = "python")]
mod python;

pub use error::{CanopyError, Result};
pub use policy::Policy;
pub use tree::{Bounds, CanopyStats, Order, Tree, TreeConfig};
