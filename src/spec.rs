//! What an attention call computes: shapes, scale, mask and position encoding, and the checks
//! that turn a request into a valid one or a typed error naming the field.

use crate::dtype::{Dtype, Dtypes};
use crate::encoding::masks::{BiasLayout, Extrapolation, Window};
use crate::encoding::position::PositionEncoding;
use crate::error::{Error, Result};

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
///
/// Built from [`Default`] (one sequence of one token, one head of 64, causal, no position
/// encoding, f32) with the `with_*` setters; every field is public to read and to set.
///
/// ```
/// use posattn::{AttentionSpec, PositionEncoding, Rope};
/// let spec = AttentionSpec::default()
///     .with_batch(2)
///     .with_seq_len(1024)
///     .with_heads(32)
///     .with_kv_heads(8)
///     .with_head_dim(128)
///     .with_position(PositionEncoding::Rope(Rope::default()));
/// assert!(spec.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct AttentionSpec {
    /// Sequences per call.
    pub batch: u32,
    /// Query rows per sequence.
    pub seq_q: u32,
    /// Keys per sequence.
    pub seq_k: u32,
    /// Query heads.
    pub num_heads: u32,
    /// Heads of K and V: `num_heads` for MHA, a divisor for GQA, 1 for MQA.
    pub num_kv_heads: u32,
    /// Head size, one of [`SUPPORTED_HEAD_DIMS`].
    pub head_dim: u32,
    /// Softmax scale; `None` means `1/√head_dim`.
    pub scale: Option<f64>,
    /// Causal mask (bottom-right aligned).
    pub causal: bool,
    /// The position encoding.
    pub position: PositionEncoding,
    /// Log-n attention scaling (Qwen's `use_logn_attn`, ReRoPE): queries at position m are
    /// multiplied by `max(1, ln(m + 1) / ln(train_len))`. `None` turns it off.
    pub logn_train_len: Option<u32>,
    /// Sliding window on key indices (FlashAttention `window_size`).
    pub window: Window,
    /// Attention sinks: the first `sink_tokens` keys stay visible to every query whatever the
    /// window (StreamingLLM's `start_size`, LM-Infinite's global branch). The causal mask still
    /// applies. Needs a window.
    pub sink_tokens: u32,
    /// ReRoPE, LM-Infinite's distance limit or StreamingLLM's cache-index positions.
    pub extrapolation: Extrapolation,
    /// Logit softcap (Gemma 2): `s = cap · tanh(s / cap)` on the scaled logits, before any bias
    /// and mask (FlashAttention 2 and llama.cpp order).
    pub softcap: Option<f64>,
    /// Learned per-head sink logits (gpt-oss, llama.cpp `add_sinks`, onnxruntime `head_sink`): one
    /// extra logit per head, in natural-log units and not scaled, that joins the softmax
    /// denominator and attends to nothing.
    pub sink_logits: Option<Vec<f32>>,
    /// A caller-provided additive bias (the escape hatch); the buffer comes with each call.
    pub bias: Option<BiasLayout>,
    /// Storage dtypes of Q, K, V and the output (f32 by default); the kernel computes in f32
    /// whatever they are (see [`crate::dtype`]).
    pub dtypes: Dtypes,
}

impl Default for AttentionSpec {
    fn default() -> Self {
        AttentionSpec {
            batch: 1,
            seq_q: 1,
            seq_k: 1,
            num_heads: 1,
            num_kv_heads: 1,
            head_dim: 64,
            scale: None,
            causal: true,
            position: PositionEncoding::None,
            logn_train_len: None,
            window: Window::NONE,
            sink_tokens: 0,
            extrapolation: Extrapolation::None,
            softcap: None,
            sink_logits: None,
            bias: None,
            dtypes: Dtypes::F32,
        }
    }
}

impl AttentionSpec {
    /// Sets the batch size (sequences per call).
    pub fn with_batch(mut self, batch: u32) -> Self {
        self.batch = batch;
        self
    }

    /// Self-attention over `len` tokens: `seq_q = seq_k = len`.
    pub fn with_seq_len(mut self, len: u32) -> Self {
        self.seq_q = len;
        self.seq_k = len;
        self
    }

    /// Sets the query rows per sequence (fewer than the keys: the last rows, bottom-right).
    pub fn with_seq_q(mut self, seq_q: u32) -> Self {
        self.seq_q = seq_q;
        self
    }

    /// Sets the keys per sequence.
    pub fn with_seq_k(mut self, seq_k: u32) -> Self {
        self.seq_k = seq_k;
        self
    }

    /// Multi-head attention with `heads` query heads and as many key/value heads; follow with
    /// [`AttentionSpec::with_kv_heads`] for GQA or MQA.
    pub fn with_heads(mut self, heads: u32) -> Self {
        self.num_heads = heads;
        self.num_kv_heads = heads;
        self
    }

    /// Sets the head size (one of [`SUPPORTED_HEAD_DIMS`]).
    pub fn with_head_dim(mut self, head_dim: u32) -> Self {
        self.head_dim = head_dim;
        self
    }

    /// Stores Q, K, V and the output as `dtypes` says.
    pub fn with_dtypes(mut self, dtypes: Dtypes) -> Self {
        self.dtypes = dtypes;
        self
    }

    /// Stores Q, K, V and the output all as `dtype`.
    pub fn with_dtype(mut self, dtype: Dtype) -> Self {
        self.dtypes = Dtypes::all(dtype);
        self
    }

    /// Key/value heads (a divisor of `num_heads`): GQA, or 1 for MQA.
    pub fn with_kv_heads(mut self, num_kv_heads: u32) -> Self {
        self.num_kv_heads = num_kv_heads;
        self
    }

    /// Turns the causal mask on or off.
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// Sets the softmax scale (default `1/√head_dim`, 1 for T5).
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Turns on log-n query scaling for a model trained at `train_len` tokens.
    pub fn with_logn(mut self, train_len: u32) -> Self {
        self.logn_train_len = Some(train_len);
        self
    }

    /// Sets the position encoding.
    pub fn with_position(mut self, position: PositionEncoding) -> Self {
        self.position = position;
        self
    }

    /// Sets the sliding window.
    pub fn with_window(mut self, window: Window) -> Self {
        self.window = window;
        self
    }

    /// Keeps the first `sink_tokens` keys visible whatever the window.
    pub fn with_sink_tokens(mut self, sink_tokens: u32) -> Self {
        self.sink_tokens = sink_tokens;
        self
    }

    /// Sets the extrapolation method (RoPE only).
    pub fn with_extrapolation(mut self, extrapolation: Extrapolation) -> Self {
        self.extrapolation = extrapolation;
        self
    }

    /// Caps the logits: `cap · tanh(s / cap)`.
    pub fn with_softcap(mut self, cap: f64) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Per-head sink logits (one per query head).
    pub fn with_sink_logits(mut self, logits: Vec<f32>) -> Self {
        self.sink_logits = Some(logits);
        self
    }

    /// Expects a caller bias laid out as `layout` with every call.
    pub fn with_bias(mut self, layout: BiasLayout) -> Self {
        self.bias = Some(layout);
        self
    }

    /// StreamingLLM: the first `start_size` keys plus the `recent_size` most recent ones, causal;
    /// `cache_index` re-assigns positions by index in the rolling cache (its pos-shift mode).
    pub fn with_streaming(mut self, start_size: u32, recent_size: u32, cache_index: bool) -> Self {
        self.causal = true;
        self.sink_tokens = start_size;
        self.window = Window::recent(recent_size);
        self.extrapolation = if cache_index {
            Extrapolation::StreamingCacheIndex
        } else {
            Extrapolation::None
        };
        self
    }

    /// LM-Infinite: Λ-shaped mask (the first `global_branch` keys and the keys at distance below
    /// `local_branch`), causal, with distances of global keys limited to `limit_distance`.
    pub fn with_lm_infinite(
        mut self,
        global_branch: u32,
        local_branch: u32,
        limit_distance: u32,
    ) -> Self {
        self.causal = true;
        self.sink_tokens = global_branch;
        self.window = Window::recent(local_branch);
        self.extrapolation = Extrapolation::LmInfinite {
            limit: limit_distance,
        };
        self
    }

    /// The softmax scale in use: the given one, else 1 for T5 buckets (T5 does not scale its
    /// logits) and `1/√head_dim` otherwise.
    pub fn softmax_scale(&self) -> f64 {
        match (self.scale, &self.position) {
            (Some(s), _) => s,
            (None, PositionEncoding::T5(_)) => 1.0,
            (None, _) => 1.0 / (self.head_dim as f64).sqrt(),
        }
    }

    /// Whether query row `i` sees key `j`: bounds, the bottom-right aligned causal mask, the
    /// window and the sinks (a caller bias of −∞ aside).
    pub fn visible(&self, i: usize, j: usize) -> bool {
        let ip = i as i64 + self.seq_k as i64 - self.seq_q as i64;
        let j = j as i64;
        if j >= self.seq_k as i64 || (self.causal && j > ip) {
            return false;
        }
        j < self.sink_tokens as i64 || self.in_window(ip, j)
    }

    /// Whether key `j` lies in the window of a query at key index `ip`.
    pub fn in_window(&self, ip: i64, j: i64) -> bool {
        self.window.left.is_none_or(|l| j >= ip - l as i64)
            && self.window.right.is_none_or(|r| j <= ip + r as i64)
    }

    /// (query, key) pairs the masks leave visible, summed over rows (per batch and head).
    pub fn visible_pairs(&self) -> u64 {
        let sk = self.seq_k as i64;
        let sinks = (self.sink_tokens as i64).min(sk);
        (0..self.seq_q as i64)
            .map(|i| {
                let ip = i + sk - self.seq_q as i64;
                let mut hi = sk - 1;
                if self.causal {
                    hi = hi.min(ip);
                }
                let mut w_hi = hi;
                if let Some(r) = self.window.right {
                    w_hi = w_hi.min(ip + r as i64);
                }
                let w_lo = self.window.left.map_or(0, |l| (ip - l as i64).max(0));
                let window = (w_hi - w_lo + 1).max(0);
                // Sinks below the window and not past the causal bound.
                let s_hi = sinks.min(hi + 1).min(w_lo);
                (window + s_hi.max(0)) as u64
            })
            .sum()
    }

    /// Elements of Q and O.
    pub fn q_len(&self) -> usize {
        self.batch as usize * self.seq_q as usize * self.num_heads as usize * self.head_dim as usize
    }

    /// Elements of the log-sum-exp output: one per (batch, head, query row).
    pub fn lse_len(&self) -> usize {
        self.batch as usize * self.num_heads as usize * self.seq_q as usize
    }

    /// Elements of K and of V.
    pub fn kv_len(&self) -> usize {
        self.batch as usize
            * self.seq_k as usize
            * self.num_kv_heads as usize
            * self.head_dim as usize
    }

    /// Nominal floating-point operations: 4·b·h·seq_q·seq_k·d, halved when causal; with a
    /// window or sinks, 4·b·h·d per visible (query, key) pair.
    pub fn flops(&self) -> f64 {
        if !self.window.is_none() || self.sink_tokens > 0 {
            return 4.0
                * self.batch as f64
                * self.num_heads as f64
                * self.head_dim as f64
                * self.visible_pairs() as f64;
        }
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
        crate::plan::lower(self).map(|_| ())
    }

    /// The checks that need no tables: sizes, scale, sequence limits.
    pub(crate) fn validate_shape(&self) -> Result<()> {
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
        Ok(())
    }

    /// The kernel computes in f32: every parameter it reads must be representable there, and
    /// the products it forms from them (the logit factor `scale · log2 e · attention_factor²`,
    /// a RoPE angle at the largest position) must stay finite in f32. A value finite in f64
    /// but not in f32 is refused here rather than turned into an output of NaN.
    pub(crate) fn validate_f32(
        &self,
        resolved: &crate::encoding::position::ResolvedPosition,
    ) -> Result<()> {
        let log2e = std::f64::consts::LOG2_E;
        let fits = |x: f64| x.is_finite() && x.abs() <= f32::MAX as f64;
        let scale = self.softmax_scale();
        let af = resolved.attention_factor as f64;
        if !fits(scale * log2e) || !fits(scale * log2e * af * af) {
            let (field, got) = match (self.scale, &self.position) {
                (_, PositionEncoding::Rope(r))
                    if !fits(scale * log2e * af * af) && fits(scale * log2e) =>
                {
                    ("rope.attention_factor", r.attention_factor)
                }
                _ => ("scale", scale),
            };
            return Err(Error::invalid(
                field,
                "a value whose logit factor scale · log2(e) · attention_factor² fits f32 (the kernel's precision)",
                got,
            ));
        }
        if let Some(c) = self.softcap {
            let c2 = c * log2e;
            if !(fits(c2) && c2 >= f32::MIN_POSITIVE as f64) {
                return Err(Error::invalid(
                    "softcap",
                    format!(
                        "a cap with cap · log2(e) a normal f32 (the kernel's precision): {:e} to {:e}",
                        f32::MIN_POSITIVE as f64 / log2e,
                        f32::MAX as f64 / log2e
                    ),
                    c,
                ));
            }
        }
        if let Some(bad) = resolved
            .aux
            .entries()
            .iter()
            .flatten()
            .find(|x| !x.is_finite())
        {
            return Err(Error::invalid(
                self.position.name(),
                "parameters whose tables fit f32 (the kernel's precision)",
                format!("a table entry of {bad}"),
            ));
        }
        if !resolved.xpos_inv_scale_base.is_finite() {
            return Err(Error::invalid(
                "xpos.scale_base",
                "a value whose inverse fits f32 (the kernel's precision)",
                format!("{:e}", 1.0 / resolved.xpos_inv_scale_base as f64),
            ));
        }
        // A rotation angle is position × frequency in f32: finite for every allowed position.
        let max_freq = match &self.position {
            PositionEncoding::Rope(r) => r.inv_freq(self.head_dim).into_iter().fold(0.0, f64::max),
            PositionEncoding::Xpos(x) => {
                crate::encoding::position::rope_inv_freq(x.theta, self.head_dim)
                    .into_iter()
                    .fold(0.0, f64::max)
            }
            _ => 0.0,
        };
        if !fits(max_freq * MAX_ABS_POSITION as f64) {
            let field = match &self.position {
                PositionEncoding::Rope(r) if r.inv_freq.is_some() => "rope.inv_freq",
                PositionEncoding::Rope(_) => "rope.theta",
                _ => "xpos.theta",
            };
            return Err(Error::invalid(
                field,
                format!(
                    "frequencies at most {:e}, so that angles up to position 2^30 fit f32 (the kernel's precision)",
                    f32::MAX as f64 / MAX_ABS_POSITION as f64
                ),
                format!("a frequency of {max_freq:e}"),
            ));
        }
        if let PositionEncoding::Alibi(a) = &self.position
            && let crate::encoding::position::AlibiSlopes::Custom(s) = &a.slopes
            && let Some(bad) = s
                .iter()
                .find(|x| !fits(**x as f64 * 2.0 * MAX_ABS_POSITION as f64))
        {
            return Err(Error::invalid(
                "alibi.slopes",
                "slopes whose bias at distance 2^31 fits f32 (the kernel's precision)",
                bad,
            ));
        }
        Ok(())
    }

    /// Window, sinks, extrapolation, softcap, sink logits and bias (after the encoding).
    pub(crate) fn validate_extras(&self) -> Result<()> {
        let max = MAX_ABS_POSITION as u32;
        for (field, side) in [
            ("window.left", self.window.left),
            ("window.right", self.window.right),
        ] {
            if let Some(w) = side
                && w > max
            {
                return Err(Error::invalid(field, format!("at most {max}"), w));
            }
        }
        if self.sink_tokens > max {
            return Err(Error::invalid(
                "sink_tokens",
                format!("at most {max}"),
                self.sink_tokens,
            ));
        }
        if self.sink_tokens > 0 && self.window.is_none() {
            return Err(Error::invalid(
                "sink_tokens",
                "0 unless a window is set (without one every key is visible already)",
                self.sink_tokens,
            ));
        }
        if let Some(c) = self.softcap
            && !(c.is_finite() && c > 0.0)
        {
            return Err(Error::invalid("softcap", "a finite number > 0", c));
        }
        if let Some(s) = &self.sink_logits {
            if s.len() != self.num_heads as usize {
                return Err(Error::invalid(
                    "sink_logits",
                    format!("{} logits (one per query head)", self.num_heads),
                    format!("{} logits", s.len()),
                ));
            }
            if let Some(bad) = s.iter().find(|x| !x.is_finite()) {
                return Err(Error::invalid("sink_logits", "finite logits", bad));
            }
        }
        let name = self.extrapolation.name();
        if self.extrapolation != Extrapolation::None
            && !matches!(self.position, PositionEncoding::Rope(_))
        {
            return Err(Error::invalid(
                "extrapolation",
                format!("RoPE as the position encoding for {name}"),
                self.position.name(),
            ));
        }
        match &self.extrapolation {
            Extrapolation::None => {}
            Extrapolation::ReRope { window, leak } => {
                if *window == 0 || *window > max {
                    return Err(Error::invalid(
                        "extrapolation.window",
                        format!("in 1..={max}"),
                        window,
                    ));
                }
                if let Some(k) = leak
                    && !(k.is_finite() && *k >= 1.0)
                {
                    return Err(Error::invalid(
                        "extrapolation.leak",
                        "a finite number ≥ 1",
                        k,
                    ));
                }
            }
            Extrapolation::LmInfinite { .. } | Extrapolation::StreamingCacheIndex => {
                if self.sink_tokens == 0 || self.window.left.is_none() {
                    return Err(Error::invalid(
                        "extrapolation",
                        format!("sink_tokens > 0 and a window with `left` for {name}"),
                        format!(
                            "sink_tokens {}, window.left {:?}",
                            self.sink_tokens, self.window.left
                        ),
                    ));
                }
                if let Extrapolation::LmInfinite { limit } = self.extrapolation
                    && limit > max
                {
                    return Err(Error::invalid(
                        "extrapolation.limit",
                        format!("at most {max}"),
                        limit,
                    ));
                }
            }
        }
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

/// Shape of the caller bias a spec expects: [batch or 1, heads or 1, seq_q, seq_k].
pub fn bias_dims(spec: &AttentionSpec) -> Option<[u32; 4]> {
    spec.bias.map(|l| {
        [
            if l.broadcast_batch { 1 } else { spec.batch },
            if l.broadcast_heads { 1 } else { spec.num_heads },
            spec.seq_q,
            spec.seq_k,
        ]
    })
}

/// Elements of the caller bias a spec expects (0 without one).
pub fn bias_len(spec: &AttentionSpec) -> usize {
    bias_dims(spec).map_or(0, |d| d.iter().map(|&x| x as usize).product())
}
