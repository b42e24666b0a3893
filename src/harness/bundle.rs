//! Conformance cases written out for another WebGPU implementation to run: per case the kernel's
//! WGSL, every binding's bytes (the uniform block and the aux table included), the dispatch size,
//! the f64 reference output and the bound from the tolerance rule of [`check`]. The
//! runner poisons the output with NaN, dispatches, and checks the result with that rule: the
//! largest error against the reference within the bound, and NaN exactly where the reference is
//! NaN. tests/dawn.rs runs the quick subset this way on Dawn (tests/dawn/cases.mjs).
//!
//! Layout of a bundle directory:
//!
//! ```text
//! cases.json              list of case directories, in order
//! kernels/<variant>.wgsl  one module per variant the cases use
//! <case>/case.json        name, kernel, entry point, workgroups, bindings, bound
//! <case>/b<i>.bin         the bytes of binding i (the output binding has none: it is poisoned)
//! <case>/expected.f64     the f64 reference, little-endian
//! ```

use std::path::{Path, PathBuf};

use serde_json::json;

use super::check::{self, Case};
use super::reference;
use crate::kernel::abi::{Access, Family};
use crate::plan;

/// A case as written, with its references for a second check of the output on the host.
#[derive(Clone, Debug)]
pub struct WrittenCase {
    /// The case's name.
    pub name: String,
    /// The kernel variant's name.
    pub kernel: String,
    /// The directory the case was written to.
    pub dir: PathBuf,
    /// The f64 reference output.
    pub ref64: Vec<f64>,
    /// The f32 reference output (its error sets the tolerance).
    pub ref32: Vec<f32>,
    /// The allowed largest error (`check::compare`'s rule).
    pub bound: f64,
}

type Failure = Box<dyn std::error::Error>;

fn write(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// Writes `cases` into `dir` with `rows` query rows per invocation. Zero cases, a NaN-only
/// reference, or a case whose references the rule cannot bound are errors.
pub fn write_cases(dir: &Path, cases: &[Case], rows: u32) -> Result<Vec<WrittenCase>, Failure> {
    if cases.is_empty() {
        return Err("no cases to write".into());
    }
    check::assert_unique_names(cases)?;
    std::fs::create_dir_all(dir.join("kernels"))?;
    let mut written = Vec::new();
    for case in cases {
        written.push(write_case(dir, case, rows)?);
    }
    let list: Vec<&str> = written.iter().map(|w| w.name.as_str()).collect();
    write(&dir.join("cases.json"), json!(list).to_string().as_bytes())?;
    Ok(written)
}

fn write_case(dir: &Path, case: &Case, rows: u32) -> Result<WrittenCase, Failure> {
    let s = &case.spec;
    // What `Attention::new` binds: the same lowering and the same variant choice.
    let plan = plan::lower(s)?;
    if s.dtypes != crate::dtype::Dtypes::F32 {
        return Err(format!("{}: bundles hold f32 tensors only", case.name).into());
    }
    let key = plan.fused_key(s.head_dim, rows, crate::dtype::HalfForm::Packed);
    let workgroups = [s.seq_q.div_ceil(key.block_q), s.num_heads, s.batch];
    let (params, aux) = (plan.params, plan.aux);
    let (q, k, v, pq, pk) = case.inputs();
    let bias = case.bias();
    let b = bias.as_deref();
    let ref64 = reference::attention_with_bias::<f64>(s, &q, &k, &v, &pq, &pk, b);
    let ref32 = reference::attention_with_bias::<f32>(s, &q, &k, &v, &pq, &pk, b);
    if ref64.iter().all(|x| x.is_nan()) {
        return Err(format!("{}: the reference is NaN everywhere", case.name).into());
    }
    // The bound exactly as `check::compare` computes it: the f32 reference compared with itself
    // gives the rule's bound (its own status is irrelevant here).
    let (_, _, err_f32, bound) = check::compare(&ref32, &ref64, &ref32);
    if !bound.is_finite() {
        return Err(format!("{}: bound {bound} from the f32 reference", case.name).into());
    }

    let kernel = key.name();
    let kernel_file = format!("kernels/{kernel}.wgsl");
    let kernel_path = dir.join(&kernel_file);
    if !kernel_path.exists() {
        write(&kernel_path, key.wgsl().as_bytes())?;
    }
    let case_dir = dir.join(&case.name);
    std::fs::create_dir_all(&case_dir)?;
    // Every binding of the fused family's table (the one the WGSL declarations and the bind-group
    // layout are generated from), by name. Without a caller bias, `user_bias` gets the aux table,
    // as `Attention` binds it.
    let aux_bytes: &[u8] = bytemuck::cast_slice(&aux);
    let mut bindings = Vec::new();
    for (binding, slot) in Family::Fused.bindings().iter().enumerate() {
        let bytes: &[u8] = match slot.name {
            "q_buf" => bytemuck::cast_slice(&q),
            "k_buf" => bytemuck::cast_slice(&k),
            "v_buf" => bytemuck::cast_slice(&v),
            "pos_q" => bytemuck::cast_slice(&pq),
            "pos_k" => bytemuck::cast_slice(&pk),
            "aux" => aux_bytes,
            "params" => bytemuck::bytes_of(&params),
            "user_bias" => b.map_or(aux_bytes, |b| bytemuck::cast_slice(b)),
            "o_buf" => {
                bindings.push(json!({
                    "binding": binding,
                    "type": "storage",
                    "output": true,
                    "floats": s.q_len(),
                }));
                continue;
            }
            other => return Err(format!("bundle: no data for binding {other}").into()),
        };
        let ty = match slot.access {
            Access::Read => "read-only-storage",
            Access::ReadWrite => "storage",
            Access::Uniform | Access::DecodeUniform => "uniform",
        };
        let file = format!("b{binding}.bin");
        write(&case_dir.join(&file), bytes)?;
        bindings.push(json!({ "binding": binding, "type": ty, "file": file }));
    }
    bindings.sort_by_key(|b| b["binding"].as_u64());
    let expected: Vec<u8> = ref64.iter().flat_map(|x| x.to_le_bytes()).collect();
    write(&case_dir.join("expected.f64"), &expected)?;
    let meta = json!({
        "name": case.name,
        "kernel": kernel,
        "kernel_file": kernel_file,
        "entry_point": key.entry_point(),
        "workgroups": workgroups,
        "bindings": bindings,
        "expected": "expected.f64",
        "bound": bound,
        "err_f32": err_f32,
    });
    write(&case_dir.join("case.json"), meta.to_string().as_bytes())?;
    Ok(WrittenCase {
        name: case.name.clone(),
        kernel,
        dir: case_dir,
        ref64,
        ref32,
        bound,
    })
}
