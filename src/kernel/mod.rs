#![cfg_attr(not(feature = "harness"), allow(dead_code, unused_imports))]
//! Everything on the kernel side of the crate: the host↔kernel contract ([`abi`](crate::kernel::abi)), how a
//! variant's WGSL is put together ([`source`](crate::kernel::source)), the variant keys ([`variants`](crate::kernel::variants)) and the
//! pipeline cache (`pipeline`).
//!
//! A variant is an explicit, enumerable key; every loop bound and array size is a compile-time
//! constant for the driver. Continuous parameters (sizes, theta, scale, slopes) travel in
//! [`abi::Params`](crate::kernel::abi::Params) and the aux table, so a new shape never compiles a new shader.

pub mod abi;
#[cfg(feature = "cli")]
pub mod export;
pub(crate) mod pipeline;
pub mod source;
pub mod storage;
pub mod variants;

pub use abi::{NO_SINK_LOGITS, Params, PosKind};
pub use source::ComposeError;
pub use variants::*;
