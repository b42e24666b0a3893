//! # posattn
//!
//! Transformer attention with the position handling fused into the kernel, as WGSL compute
//! shaders run through wgpu, with an f64 CPU reference that checks every result.
//!
//! ## From a device to an attention output
//!
//! ```no_run
//! use posattn::{Attention, AttentionBuffers, AttentionSpec, Context, PositionEncoding, Rope, wgpu};
//! # fn guide(device: wgpu::Device, queue: wgpu::Queue,
//! #          q: &wgpu::Buffer, k: &wgpu::Buffer, v: &wgpu::Buffer, out: &wgpu::Buffer)
//! #          -> posattn::Result<()> {
//! let ctx = Context::from_device(device, queue); // your device; the kernel shape is read from it
//! let spec = AttentionSpec::default() // 128 tokens, 8 query heads over 2 KV heads of 64, RoPE
//!     .with_seq_len(128).with_heads(8).with_kv_heads(2).with_head_dim(64)
//!     .with_position(PositionEncoding::Rope(Rope::default()));
//! let attention = Attention::new(&ctx, &spec)?; // validate, compile (cached), upload the tables
//! let mut encoder = ctx.device().create_command_encoder(&Default::default());
//! attention.encode(&ctx, &mut encoder, &AttentionBuffers::new(q, k, v, out))?; // one pass
//! ctx.queue().submit([encoder.finish()]); // `out` holds softmax(q·kᵀ·scale + positions)·v
//! # Ok(()) }
//! ```
//!
//! Tensors are contiguous `[batch, seq, heads, head_dim]` storage buffers (f32 unless
//! [`AttentionSpec::dtypes`] says f16 or bf16). Any of them can be a range of a larger buffer
//! ([`IntoBinding`]: a `wgpu::BufferBinding` or `wgpu::BufferSlice`);
//! [`Attention::encode_in_pass`] records into a compute pass of yours instead of opening one.
//! After the first call with a set of buffers, recording creates nothing and never waits.
//! Every invalid request is an [`Error`] naming the field.
//!
//! - Without a device of your own: [`Context::new`] opens the best adapter, and
//!   [`Context::attention`] runs on host slices and reads the output back.
//! - Generation against a KV cache: [`DecodePlan`], [`KvCache`].
//! - Position schemes: [`PositionEncoding`] (RoPE and its scalings, ALiBi, xPos, T5, KERPLE,
//!   Sandwich, FIRE, your own WGSL as [`CustomScheme`]), windows, sinks and extrapolation
//!   methods on [`AttentionSpec`].
//! - [`wgpu`] is re-exported: `posattn::wgpu` is the version this crate is built against.
//!
//! Features: `harness` (the conformance harness, the CPU reference and the kernel
//! introspection), `cli` (default; the `posattn` command and its plotting, on top of
//! `harness`). Embedders depend with `default-features = false`.

#![warn(missing_docs)]

pub mod attention;
mod binding;
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
#[cfg(feature = "cli")]
pub mod plot;
pub mod spec;
pub mod tune;

pub use attention::{Attention, AttentionBuffers};
pub use binding::IntoBinding;
pub use config::{HfConfigFile, HfDefaults, LlamaCppRope, RopeConfig};
#[cfg(not(target_arch = "wasm32"))]
pub use context::enumerate_adapters;
pub use context::{Context, ContextOptions, describe_adapter, enumerate_adapters_async};
pub use decode::{DecodeBuffers, DecodePlan, DecodeSpec, KvCache};
pub use dtype::{Accumulation, Dtype, Dtypes, HalfForm};
pub use encoding::custom::CustomScheme;
pub use encoding::masks::{BiasLayout, Extrapolation, Window};
pub use encoding::position::{
    Alibi, AlibiForm, AlibiSlopes, PositionEncoding, Rope, RopeLayout, Xpos,
};
pub use encoding::relative::{Fire, Kerple, KerpleForm, Sandwich, T5Bias};
pub use encoding::scaling::{LongRope, RopeFrequencies, RopeScaling, Yarn, rope_frequencies};
pub use error::{Error, Result};
pub use kernel::ScoreTile;
pub use spec::{AttentionSpec, SUPPORTED_HEAD_DIMS};
/// The wgpu this crate is built against: use it to match versions with an engine's own.
pub use wgpu;
