//! canopy_rs: the exact canopy entropy of a language model's generation tree.
//!
//! The pure core (`policy`, `frontier`, `tree`, `stats`, `error`) has no Python types and is tested with
//! `cargo test`; `python` is the thin PyO3 layer, compiled only with the `python` feature (maturin turns it on).

pub mod error;
pub mod frontier;
pub mod policy;
pub mod stats;
pub mod tree;

#[cfg(feature = "python")]
mod python;

pub use error::{CanopyError, Result};
pub use frontier::Order;
pub use policy::{Policy, RowsOut};
pub use tree::{Bounds, CanopyStats, Tree, TreeConfig};
