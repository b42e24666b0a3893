//! # posattn
//!
//! Transformer attention with the position handling fused into the kernel, as WGSL compute
//! shaders run through wgpu, with an f64 CPU reference that checks every result.
//!
//! ```no_run
//! use posattn::{AttentionSpec, Context, PositionEncoding, Rope};
//! let ctx = Context::new()?;
//! let spec = AttentionSpec::new(1, 128, 128, 8, 64)
//!     .with_kv_heads(2)
//!     .with_position(PositionEncoding::Rope(Rope::new(10000.0)));
//! let (q, k, v) = (vec![0.1; spec.q_len()], vec![0.2; spec.kv_len()], vec![0.3; spec.kv_len()]);
//! let out = ctx.attention(&spec, &q, &k, &v, None)?;
//! # Ok::<(), posattn::Error>(())
//! ```

pub mod attention;
pub mod config;
pub mod context;
pub mod decode;
pub mod dtype;
pub mod encoding;
pub mod env;
pub mod error;
#[cfg(feature = "cli")]
pub mod files;
#[cfg(feature = "harness")]
pub mod harness;
mod json;
/// Kernel variants, their composed WGSL and the host↔kernel contract; public for the harness
/// and tools (feature `harness`), internal otherwise.
#[cfg(feature = "harness")]
pub mod kernel;
#[cfg(not(feature = "harness"))]
mod kernel;
pub mod lse;
mod plan;
pub mod spec;

pub use attention::{Attention, AttentionBuffers};
pub use config::{HfConfigFile, HfDefaults, LlamaCppRope, RopeConfig};
#[cfg(not(target_arch = "wasm32"))]
pub use context::enumerate_adapters;
pub use context::{Context, ContextOptions, describe_adapter, enumerate_adapters_async};
pub use decode::{DecodeBuffers, DecodePlan, DecodeSpec, KvCache};
pub use dtype::{Dtype, Dtypes, HalfForm};
pub use encoding::custom::CustomScheme;
pub use encoding::masks::{BiasLayout, Extrapolation, Window};
pub use encoding::position::{
    Alibi, AlibiForm, AlibiSlopes, PositionEncoding, Rope, RopeLayout, Xpos,
};
pub use encoding::relative::{Fire, Kerple, KerpleForm, Sandwich, T5Bias};
pub use encoding::scaling::{LongRope, RopeFrequencies, RopeScaling, Yarn, rope_frequencies};
pub use error::{Error, Result};
pub use spec::{AttentionSpec, SUPPORTED_HEAD_DIMS};
