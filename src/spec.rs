//! What an attention call computes: shapes, scale, mask and position encoding, and the checks
//! that turn a request into a valid one or a typed error naming the field.

use crate::error::{Error, Result};
use crate::position::PositionEncoding;

/// Head sizes the kernels are built for. Each is one pipeline variant per position kind.
pub const SUPPORTED_HEAD_DIMS: &[u32] = &[32, 64, 80, 96, 128, 160, 192, 256];

/// Largest |position| accepted: differences of two positions must fit an i32.
pub const MAX_ABS_POSITION: i32 = 1 << 30;

/// One attention call over contiguous [batch, seq, heads, head_dim] tensors.
///
/// Causal masking is bottom-right aligned when `seq_q != seq_k` (FlashAttention ≥ 2.1): query row
/// `i` sees key `j` iff `j <= i + seq_k - seq_q`. The mask works on indices; positions only feed the
/// position encoding, so they may take any values (offsets, gaps, random subsets). PyTorch's
/// `is_causal` is top-left aligned: for `seq_q < seq_k` it equals this mask on the last `seq_q`
/// rows of a square problem. Rows that see no key give 0.
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionSpec {
    pub batch: u32,
    pub seq_q: u32,
    pub seq_k: u32,
    pub num_heads: u32,
    /// Heads of K and V: `num_heads` for MHA, a divisor for GQA, 1 for MQA.
    pub num_kv_heads: u32,
    pub head_dim: u32,
    /// Softmax scale; `None` means `1/√head_dim`.
    pub scale: Option<f64>,
    pub causal: bool,
    pub position: PositionEncoding,
    /// Log-n attention scaling (Qwen's `use_logn_attn`, ReRoPE): queries at position m are
    /// multiplied by `max(1, ln(m + 1) / ln(train_len))`. `None` turns it off.
    pub logn_train_len: Option<u32>,
}

impl AttentionSpec {
    /// Multi-head attention with `heads` query and key/value heads, causal, no position encoding.
    pub fn new(batch: u32, seq_q: u32, seq_k: u32, heads: u32, head_dim: u32) -> Self {
        AttentionSpec {
            batch,
            seq_q,
            seq_k,
            num_heads: heads,
            num_kv_heads: heads,
            head_dim,
            scale: None,
            causal: true,
            position: PositionEncoding::None,
            logn_train_len: None,
        }
    }

    pub fn with_kv_heads(mut self, num_kv_heads: u32) -> Self {
        self.num_kv_heads = num_kv_heads;
        self
    }

    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Turns on log-n query scaling for a model trained at `train_len` tokens.
    pub fn with_logn(mut self, train_len: u32) -> Self {
        self.logn_train_len = Some(train_len);
        self
    }

    pub fn with_position(mut self, position: PositionEncoding) -> Self {
        self.position = position;
        self
    }

    /// The softmax scale in use.
    pub fn softmax_scale(&self) -> f64 {
        self.scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f64).sqrt())
    }

    /// Elements of Q and O.
    pub fn q_len(&self) -> usize {
        self.batch as usize * self.seq_q as usize * self.num_heads as usize * self.head_dim as usize
    }

    /// Elements of K and of V.
    pub fn kv_len(&self) -> usize {
        self.batch as usize
            * self.seq_k as usize
            * self.num_kv_heads as usize
            * self.head_dim as usize
    }

    /// Nominal floating-point operations: 4·b·h·seq_q·seq_k·d, halved when causal.
    pub fn flops(&self) -> f64 {
        let f = 4.0
            * self.batch as f64
            * self.num_heads as f64
            * self.seq_q as f64
            * self.seq_k as f64
            * self.head_dim as f64;
        if self.causal { f / 2.0 } else { f }
    }

    /// Default positions: keys at 0..seq_k, queries at the last seq_q of them (bottom-right).
    pub fn default_positions(&self) -> (Vec<i32>, Vec<i32>) {
        let off = self.seq_k as i64 - self.seq_q as i64;
        let q = (0..self.batch)
            .flat_map(|_| (0..self.seq_q as i64).map(move |i| (i + off) as i32))
            .collect();
        let k = (0..self.batch).flat_map(|_| 0..self.seq_k as i32).collect();
        (q, k)
    }

    /// Checks the shapes and parameters (not the device's limits).
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("batch", self.batch),
            ("seq_q", self.seq_q),
            ("seq_k", self.seq_k),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 {
                return Err(Error::invalid(field, "at least 1", v));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::invalid(
                "num_kv_heads",
                format!("a divisor of num_heads ({})", self.num_heads),
                self.num_kv_heads,
            ));
        }
        if !SUPPORTED_HEAD_DIMS.contains(&self.head_dim) {
            return Err(Error::invalid(
                "head_dim",
                format!("one of {SUPPORTED_HEAD_DIMS:?}"),
                self.head_dim,
            ));
        }
        if let Some(s) = self.scale
            && !s.is_finite()
        {
            return Err(Error::invalid("scale", "a finite number", s));
        }
        let max_seq = MAX_ABS_POSITION as u32;
        for (field, v) in [("seq_q", self.seq_q), ("seq_k", self.seq_k)] {
            if v > max_seq {
                return Err(Error::invalid(field, format!("at most {max_seq}"), v));
            }
        }
        if let Some(l) = self.logn_train_len
            && l < 2
        {
            return Err(Error::invalid("logn_train_len", "at least 2", l));
        }
        self.position.resolve(self.head_dim, self.num_heads)?;
        Ok(())
    }

    /// Checks caller-given positions: lengths [batch, seq] and magnitudes.
    pub fn validate_positions(&self, pos_q: &[i32], pos_k: &[i32]) -> Result<()> {
        for (field, p, seq) in [
            ("positions_q", pos_q, self.seq_q),
            ("positions_k", pos_k, self.seq_k),
        ] {
            let want = self.batch as usize * seq as usize;
            if p.len() != want {
                return Err(Error::invalid(
                    field,
                    format!("{want} positions (batch × seq)"),
                    format!("{} positions", p.len()),
                ));
            }
            if let Some(bad) = p
                .iter()
                .find(|x| x.unsigned_abs() > MAX_ABS_POSITION as u32)
            {
                return Err(Error::invalid(
                    field,
                    format!("positions within ±{MAX_ABS_POSITION}"),
                    bad,
                ));
            }
        }
        Ok(())
    }
}
