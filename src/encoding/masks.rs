//! Masks and extrapolation-time methods: sliding windows, attention sinks (StreamingLLM,
//! LM-Infinite), ReRoPE and Leaky ReRoPE, and the layout of a caller-provided bias. All of them
//! act per (query, key) inside the kernel; tiles that a mask hides from a whole workgroup are
//! never loaded.

/// A sliding window as FlashAttention's `window_size = (left, right)`: query row i (at key index
/// `i' = i + seq_k − seq_q`, bottom-right aligned) sees key j iff `i' − left ≤ j ≤ i' + right`.
/// `None` on a side means unbounded. Combined with `causal`, right is irrelevant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Window {
    /// Keys at most this far before the query's key index stay visible (`None`: unbounded).
    pub left: Option<u32>,
    /// Keys at most this far after it stay visible (`None`: unbounded).
    pub right: Option<u32>,
}

impl Window {
    /// No window: every key the other masks allow.
    pub const NONE: Window = Window {
        left: None,
        right: None,
    };

    /// A causal sliding window over the `size` most recent keys including the query's own
    /// (Mistral's `sliding_window`, StreamingLLM's recent cache): left = size − 1.
    pub fn recent(size: u32) -> Self {
        Window {
            left: Some(size.saturating_sub(1)),
            right: None,
        }
    }

    /// Whether neither side is bounded.
    pub fn is_none(&self) -> bool {
        self.left.is_none() && self.right.is_none()
    }
}

/// How keys seen only through the sink rule (index below `sink_tokens`, outside the window) are
/// positioned, and which RoPE scores are rectified. Each needs RoPE.
#[derive(Clone, Debug, PartialEq, Default)]
#[non_exhaustive]
pub enum Extrapolation {
    #[default]
    /// Positions as given, one RoPE score per key.
    None,
    /// ReRoPE (bojone/rerope): keys at `|Δ| < window` get the ordinary RoPE score; farther keys
    /// see the query rotated at distance `window` (distance clamped). With `leak = Some(k)`,
    /// Leaky ReRoPE: beyond the window the distance grows as `window + (Δ − window)/k`.
    /// Both scores come from one pass over the keys.
    ReRope {
        /// Distance from which the clamped score is used.
        window: u32,
        /// `Some(k)`: Leaky ReRoPE's slope divisor (≥ 1); `None`: plain ReRoPE.
        leak: Option<f64>,
    },
    /// LM-Infinite's distance limit: a key reached only through the sink rule (its global branch)
    /// is scored with the query rotated at `limit` and the key unrotated, whatever the real
    /// distance. Use with `sink_tokens` = n_global and `Window::recent(local_branch)`.
    LmInfinite {
        /// The distance every sink-only key is scored at.
        limit: u32,
    },
    /// StreamingLLM's pos-shift convention: each query sees the sink keys at the distance they
    /// have in the rolling cache (sinks, then the `left + 1` most recent keys), i.e. as if the
    /// query sat at cache index `min(i', sink_tokens + left)`. Without it (the default) keys keep
    /// their original positions. Needs a window with `left`.
    StreamingCacheIndex,
}

impl Extrapolation {
    /// The method's name, as error messages and case names spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Extrapolation::None => "none",
            Extrapolation::ReRope { leak: None, .. } => "rerope",
            Extrapolation::ReRope { leak: Some(_), .. } => "leaky_rerope",
            Extrapolation::LmInfinite { .. } => "lm_infinite",
            Extrapolation::StreamingCacheIndex => "streaming_cache_index",
        }
    }
}

/// Shape of a caller-provided additive bias, added (in natural-log units, after the softcap) to
/// the scaled logits: f32 `[batch or 1, num_heads or 1, seq_q, seq_k]`. A value of −∞ (or
/// ≤ −1e30) hides the key, as a boolean mask would; NaN at a visible key propagates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BiasLayout {
    /// One bias for every batch entry (leading dimension 1).
    pub broadcast_batch: bool,
    /// One bias for every head (second dimension 1).
    pub broadcast_heads: bool,
}
