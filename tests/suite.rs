//! The native test suite as one binary: each module is one file of this folder (its own doc
//! comment says what it covers). One binary links once, and its tests share the test threads,
//! so a file with one long test no longer leaves the other core idle while it runs. Two files
//! stay binaries of their own: `tune.rs` (it sets an environment variable the others read) and
//! `browser.rs` (wasm32 only, run by wasm-bindgen-test-runner). Run one file's tests with
//! `cargo test --release --test suite conformance::`.

mod common;

mod async_api;
mod cli;
mod config;
mod conformance;
mod custom;
mod dawn;
mod decode;
mod decode_generation;
mod embedding;
mod errors;
mod examples;
mod fuzz;
mod invariants;
mod lse;
mod portability;
mod precision;
mod prefill_hot_path;
mod robustness;
mod roof;
mod scaling;
mod shaders;
mod shaders_command;
mod web_page;
