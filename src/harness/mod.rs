//! What checks and measures the library, kept out of an embedder's build (feature `harness`,
//! which the `cli` feature, the tests and the benches turn on): the f64/f32 CPU reference, the
//! conformance case matrix and its runner, GPU timing, and the unfused baseline the fused kernel
//! is measured against.

pub mod bundle;
pub mod check;
pub mod custom;
pub mod decode;
pub mod reference;
/// The matmul roof is timed: native only.
#[cfg(not(target_arch = "wasm32"))]
pub mod roof;
/// GPU timing waits on the host: native only.
#[cfg(not(target_arch = "wasm32"))]
pub mod timing;
pub mod unfused;

pub use unfused::Unfused;
