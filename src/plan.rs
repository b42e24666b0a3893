//! Lowering: a spec becomes a plan (the kernel variant's choices, the parameter block and the
//! aux table) in one place, after validation and before anything touches a device.

use crate::dtype::{Dtypes, HalfForm};
use crate::encoding::custom::CheckedScheme;
use crate::encoding::masks::Extrapolation;
use crate::encoding::position::{PositionEncoding, ResolvedPosition};
use crate::error::Result;
use crate::kernel::abi::{BranchQMode, BranchRule, NO_SINK_LOGITS, Params, PosKind, freq_entry};
use crate::kernel::storage::StorageForm;
use crate::kernel::{KernelKey, two_branch_rows};
use crate::spec::AttentionSpec;
use crate::spec::bias_dims;

/// Everything a kernel reads besides the tensors.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub kind: PosKind,
    /// Two RoPE scores per key (an extrapolation rule is set).
    pub two_branch: bool,
    pub params: Params,
    pub aux: Vec<[f32; 4]>,
    pub dtypes: Dtypes,
    /// A custom scheme's checked hooks.
    pub custom: Option<CheckedScheme>,
}

impl Plan {
    /// The fused variant for `rows` query rows per invocation (the adapter's choice) with the
    /// spec's dtypes stored in f16 form `half` (the adapter's choice too).
    pub fn fused_key(&self, head_dim: u32, rows: u32, half: HalfForm) -> KernelKey {
        let key = if let Some(c) = &self.custom {
            KernelKey::fused_custom(head_dim, rows, c.id)
        } else if self.two_branch {
            KernelKey::fused_two_branch(head_dim, two_branch_rows(rows))
        } else {
            KernelKey::fused(head_dim, rows, self.kind.variant())
        };
        let d = self.dtypes;
        key.with_storage([d.q, d.k, d.v, d.out].map(|t| StorageForm::of(t, half)))
    }
}

/// Validates `spec` and lowers it: the encoding's tables with the sink logits and the
/// second-branch frequencies appended, and the uniform block. Tables are built once, here.
pub(crate) fn lower(spec: &AttentionSpec) -> Result<Plan> {
    spec.validate_shape()?;
    let seq_hint = spec.seq_q.max(spec.seq_k);
    let mut pos = spec
        .position
        .resolve(spec.head_dim, spec.num_heads, seq_hint)?;
    spec.validate_extras()?;
    spec.validate_f32(&pos)?;
    let mut params = params_for(spec, &pos);
    if let Some(s) = &spec.sink_logits {
        params.sink_logit_offset = pos.aux.push_floats(s) * 4;
    }
    if let PositionEncoding::Rope(rope) = &spec.position {
        let inv = rope.inv_freq(spec.head_dim);
        let turns = |x: f64| (x / std::f64::consts::TAU).rem_euclid(1.0);
        // Rule, query position mode, w, and per pair the branch frequency and the constant phase
        // (turns) queries add.
        type Branch = (BranchRule, BranchQMode, i32, Vec<(f64, f64)>);
        let table: Option<Branch> = match spec.extrapolation {
            Extrapolation::None => None,
            Extrapolation::ReRope { window, leak } => {
                let inv_k = leak.map_or(0.0, |k| 1.0 / k);
                let w = window as f64;
                Some((
                    BranchRule::Distance,
                    BranchQMode::Own,
                    window as i32,
                    inv.iter()
                        .map(|&f| (f * inv_k, turns(w * (1.0 - inv_k) * f)))
                        .collect(),
                ))
            }
            Extrapolation::LmInfinite { limit } => Some((
                BranchRule::SinkOnly,
                BranchQMode::Zero,
                0,
                inv.iter()
                    .map(|&f| (0.0, turns(limit as f64 * f)))
                    .collect(),
            )),
            Extrapolation::StreamingCacheIndex => Some((
                BranchRule::SinkOnly,
                BranchQMode::CacheIndex,
                0,
                inv.iter().map(|&f| (f, 0.0)).collect(),
            )),
        };
        if let Some((rule, q_mode, w, entries)) = table {
            params.branch_rule = rule as u32;
            params.branch_q_mode = q_mode as u32;
            params.branch_w = w;
            params.branch_offset = pos.aux.push_entries(entries.iter().map(|&(f, phase)| {
                let mut e = freq_entry(f, 0.0);
                e[3] = phase as f32;
                e
            }));
        }
    }
    Ok(Plan {
        kind: pos.kind,
        two_branch: spec.extrapolation != Extrapolation::None,
        params,
        aux: pos.aux.into_entries(),
        dtypes: spec.dtypes,
        custom: pos.custom,
    })
}

fn params_for(spec: &AttentionSpec, pos: &ResolvedPosition) -> Params {
    let scale = spec.softmax_scale();
    let log2e = std::f64::consts::LOG2_E;
    // Strides in elements; a broadcast (or size-1) dimension has stride 0. Sizes past u32 never
    // reach a dispatch: check_limits rejects a bias larger than a storage binding.
    let (stride_b, stride_h) = match bias_dims(spec) {
        Some([b, h, sq, sk]) => {
            let plane = sq as u64 * sk as u64;
            let fit = |x: u64| u32::try_from(x).unwrap_or(u32::MAX);
            (
                if b == 1 { 0 } else { fit(h as u64 * plane) },
                if h == 1 { 0 } else { fit(plane) },
            )
        }
        None => (0, 0),
    };
    let side = |w: Option<u32>| w.map_or(-1, |w| w as i32);
    let (bias_len, bias_p0, bias_p1) = pos.bias.words();
    Params {
        batch: spec.batch,
        seq_q: spec.seq_q,
        seq_k: spec.seq_k,
        num_heads: spec.num_heads,
        num_kv_heads: spec.num_kv_heads,
        causal: spec.causal as u32,
        rotary_dim: pos.rotary_dim,
        alibi_symmetric: pos.alibi_symmetric as u32,
        scale_log2: (scale * log2e) as f32,
        attn_factor: pos.attention_factor,
        xpos_inv_scale_base: pos.xpos_inv_scale_base,
        scale: scale as f32,
        freq_offset: pos.freq_offset,
        bias_offset: pos.bias_offset,
        logn_inv_ln_len: spec
            .logn_train_len
            .map_or(0.0, |l| (1.0 / (l as f64).ln()) as f32),
        sink_tokens: spec.sink_tokens,
        window_left: side(spec.window.left),
        window_right: side(spec.window.right),
        softcap_log2: spec.softcap.map_or(0.0, |c| (c * log2e) as f32),
        sink_logit_offset: NO_SINK_LOGITS,
        bias_len,
        bias_p0,
        bias_p1,
        user_bias: spec.bias.is_some() as u32,
        user_bias_stride_b: stride_b,
        user_bias_stride_h: stride_h,
        branch_rule: BranchRule::None as u32,
        branch_q_mode: BranchQMode::Own as u32,
        branch_w: 0,
        branch_offset: 0,
        pos_kind: pos.kind as u32,
        rope_interleaved: pos.interleaved as u32,
    }
}
