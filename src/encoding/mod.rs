//! Position handling as a caller describes it, and its lowering into the tables the kernel reads:
//! RoPE, ALiBi and xPos ([`position`]), RoPE's frequency scalings ([`scaling`]), the relative
//! biases T5, KERPLE, Sandwich and FIRE ([`relative`]), and the masks and extrapolation rules
//! that act per (query, key) ([`masks`]), and a caller's own scheme as WGSL hooks
//! ([`custom`]). Tables are computed on the host in f64.

pub mod custom;
pub mod masks;
pub mod position;
pub mod relative;
pub mod scaling;
