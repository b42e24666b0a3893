//! The host↔kernel contract, declared once: the uniform parameter block, the codes the kernels
//! switch on, the bind-group layouts and the aux-table layout. The WGSL declarations of all of
//! them (`struct Params`, the `const` codes, every `@binding`) are generated from this module by
//! [`wgsl_declarations`], so the shaders have no hand-kept copy; tests/shaders.rs reflects every
//! variant with naga and compares it with the tables here.
//!
//! # The aux table
//! One read-only `array<vec4<f32>>` per call, in this order (offsets in `Params`):
//! 1. `freq_offset`: one [`freq_entry`] per rotated channel pair (RoPE, xPos; Sandwich's
//!    frequencies for the long-distance sum).
//! 2. `bias_offset`: the encoding's per-head floats packed four to an entry ([`pack4`]):
//!    ALiBi slopes; T5 bucket table; KERPLE (p, a) pairs; Sandwich's distance table then the
//!    per-head scales; FIRE's weights w1, b1, w2, b2.
//! 3. `sink_logit_offset` (a float index, [`NO_SINK_LOGITS`] when absent): one logit per head.
//! 4. `branch_offset`: the second RoPE branch's entries, a [`freq_entry`] whose `w` is a constant
//!    phase in turns.
//!
//! # The bias words
//! `bias_len`, `bias_p0` and `bias_p1` are read per encoding as [`BiasArgs`] says.

use bytemuck::{Pod, Zeroable};

/// A scalar type both sides agree on.
pub trait WgslScalar {
    /// Its WGSL spelling.
    const WGSL: &'static str;
}
impl WgslScalar for u32 {
    const WGSL: &'static str = "u32";
}
impl WgslScalar for i32 {
    const WGSL: &'static str = "i32";
}
impl WgslScalar for f32 {
    const WGSL: &'static str = "f32";
}

/// Declares the Rust struct and the table the WGSL struct is generated from, in one place.
macro_rules! uniform_block {
    ($(#[$meta:meta])* pub struct $name:ident { $( $(#[doc = $doc:expr])* $field:ident : $ty:ty ),* $(,)? }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
        pub struct $name { $( $(#[doc = $doc])* pub $field: $ty, )* }

        impl $name {
            /// Members in declaration order: name, WGSL type, byte offset.
            pub const FIELDS: &'static [(&'static str, &'static str, usize)] = &[
                $( (stringify!($field), <$ty as WgslScalar>::WGSL, std::mem::offset_of!($name, $field)) ),*
            ];
        }
    };
}

uniform_block! {
    /// The uniform block every kernel reads.
    pub struct Params {
        /// Sequences per call.
        batch: u32,
        /// Query rows per sequence.
        seq_q: u32,
        /// Keys per sequence.
        seq_k: u32,
        /// Query heads.
        num_heads: u32,
        /// Key/value heads.
        num_kv_heads: u32,
        /// 1: key index ≤ query index + seq_k − seq_q.
        causal: u32,
        /// Channels that rotate.
        rotary_dim: u32,
        /// 1: ALiBi's symmetric form.
        alibi_symmetric: u32,
        /// Softmax scale times log2(e).
        scale_log2: f32,
        /// RoPE's factor on cos and sin.
        attn_factor: f32,
        /// 1 / xPos' γ.
        xpos_inv_scale_base: f32,
        /// Softmax scale.
        scale: f32,
        /// Aux entry of the first frequency entry.
        freq_offset: u32,
        /// Aux entry of the per-head bias tables.
        bias_offset: u32,
        /// 1 / ln(train_len) for log-n query scaling; 0 turns it off.
        logn_inv_ln_len: f32,
        /// Keys below this index ignore the window (attention sinks).
        sink_tokens: u32,
        /// Sliding window on key indices, before the query's; negative: unbounded.
        window_left: i32,
        /// The window after the query's key index; negative: unbounded.
        window_right: i32,
        /// cap · log2(e); 0 turns the softcap off.
        softcap_log2: f32,
        /// Float index of the sink logits in aux; `NO_SINK_LOGITS` when there are none.
        sink_logit_offset: u32,
        /// See [`BiasArgs`].
        bias_len: u32,
        /// See [`BiasArgs`].
        bias_p0: f32,
        /// See [`BiasArgs`].
        bias_p1: f32,
        /// 1 when a caller bias is bound.
        user_bias: u32,
        /// Caller bias stride per batch in elements (0: broadcast).
        user_bias_stride_b: u32,
        /// Caller bias stride per head in elements (0: broadcast).
        user_bias_stride_h: u32,
        /// A [`BranchRule`] code.
        branch_rule: u32,
        /// A [`BranchQMode`] code.
        branch_q_mode: u32,
        /// ReRoPE's window w.
        branch_w: i32,
        /// Aux entry of the second branch's frequency entries.
        branch_offset: u32,
        /// The encoding's code (`PosKind`); the table-driven encodings share one kernel variant
        /// and branch on it.
        pos_kind: u32,
        /// 1 when RoPE pairs channels (2i, 2i + 1), 0 for (i, i + r/2).
        rope_interleaved: u32,
    }
}

uniform_block! {
    /// The decode kernel's second uniform block: the plan's maxima and layout flags. Actual
    /// lengths come from the caller's lengths buffer at run time.
    pub struct DecodeParams {
        /// Key slots per sequence in the cache.
        capacity: u32,
        /// Most new query rows per sequence (the query and output row stride).
        max_q: u32,
        /// Workgroups the key range of one row block is cut into (1: no reduce pass).
        splits: u32,
        /// Query heads per KV head.
        group: u32,
        /// 1: a ring cache (slot of key index i: i below the sinks, else
        /// sinks + (i − sinks) mod (capacity − sinks)).
        ring: u32,
        /// 1: keys are stored rotated (RoPE only); only queries rotate.
        keys_rotated: u32,
        /// Padding.
        _pad0: u32,
        /// Padding.
        _pad1: u32,
    }
}

/// `Params::sink_logit_offset` when there are no sink logits.
pub const NO_SINK_LOGITS: u32 = u32::MAX;

/// Kernel-facing code of an encoding. None, RoPE, ALiBi, xPos and T5 are each a compile-time
/// constant of their own variant, KERPLE's two kernels share the `Kerple` variant, and Sandwich
/// and FIRE share the `Table` variant; the shared variants branch on `Params::pos_kind` (a
/// uniform branch, against one compile per encoding on the software drivers). The Table variant
/// once held all five table-driven biases, and there the software drivers ran T5 and KERPLE
/// about 2× slower than in a kernel that holds only their own bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PosKind {
    /// No encoding.
    None = 0,
    /// RoPE.
    Rope = 1,
    /// ALiBi.
    Alibi = 2,
    /// xPos.
    Xpos = 3,
    /// T5 buckets.
    T5 = 4,
    /// KERPLE, log kernel.
    KerpleLog = 5,
    /// KERPLE, power kernel.
    KerplePower = 6,
    /// Sandwich.
    Sandwich = 7,
    /// FIRE.
    Fire = 8,
    /// The variant of Sandwich and FIRE.
    Table = 9,
    /// A caller's scheme (`encoding::custom`): its hooks, composed into the variant.
    Custom = 10,
    /// The variant of KERPLE's log and power kernels.
    Kerple = 11,
}

impl PosKind {
    /// Every built-in kind; `Custom` is not listed, since its variants exist per snippet.
    pub const ALL: [PosKind; 11] = [
        PosKind::None,
        PosKind::Rope,
        PosKind::Alibi,
        PosKind::Xpos,
        PosKind::T5,
        PosKind::KerpleLog,
        PosKind::KerplePower,
        PosKind::Sandwich,
        PosKind::Fire,
        PosKind::Table,
        PosKind::Kerple,
    ];

    /// The kinds a fused variant is compiled for.
    pub const VARIANTS: [PosKind; 7] = [
        PosKind::None,
        PosKind::Rope,
        PosKind::Alibi,
        PosKind::Xpos,
        PosKind::T5,
        PosKind::Kerple,
        PosKind::Table,
    ];

    /// The kind of the variant that runs this encoding.
    pub fn variant(self) -> PosKind {
        match self {
            PosKind::KerpleLog | PosKind::KerplePower => PosKind::Kerple,
            PosKind::Sandwich | PosKind::Fire => PosKind::Table,
            k => k,
        }
    }

    /// The kind's name in variant names.
    pub fn name(&self) -> &'static str {
        match self {
            PosKind::None => "none",
            PosKind::Rope => "rope",
            PosKind::Alibi => "alibi",
            PosKind::Xpos => "xpos",
            PosKind::T5 => "t5",
            PosKind::KerpleLog => "kerple_log",
            PosKind::KerplePower => "kerple_power",
            PosKind::Sandwich => "sandwich",
            PosKind::Fire => "fire",
            PosKind::Table => "table",
            PosKind::Custom => "custom",
            PosKind::Kerple => "kerple",
        }
    }

    /// Whether queries and keys rotate.
    pub fn rotates(&self) -> bool {
        matches!(self, PosKind::Rope | PosKind::Xpos)
    }
}

/// Which keys take the second RoPE branch's score (`Params::branch_rule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchRule {
    /// No second branch.
    None = 0,
    /// ReRoPE: keys at distance |Δ| ≥ w.
    Distance = 1,
    /// LM-Infinite, StreamingLLM: keys seen only through the sink rule (outside the window).
    SinkOnly = 2,
}

/// The second branch's query position (`Params::branch_q_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchQMode {
    /// The query's own position.
    Own = 0,
    /// Zero (LM-Infinite: the constant phase carries the distance limit).
    Zero = 1,
    /// The query's index in the rolling cache of sinks and window (StreamingLLM).
    CacheIndex = 2,
}

/// What `bias_len`, `bias_p0` and `bias_p1` mean, per encoding.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum BiasArgs {
    /// Unused (zero).
    #[default]
    None,
    /// T5: `bias_len` = max_distance.
    T5 {
        /// Largest distance with its own bucket table entry.
        max_distance: u32,
    },
    /// Sandwich: `bias_len` = distances tabulated; longer ones are summed in the kernel.
    Sandwich {
        /// Distances tabulated on the host.
        table_len: u32,
    },
    /// FIRE: `bias_len` = MLP width, `bias_p0` = c, `bias_p1` = L (threshold, ≥ 0).
    Fire {
        /// The MLP's width.
        width: u32,
        /// The learned c.
        c: f32,
        /// The threshold L.
        l: f32,
    },
}

impl BiasArgs {
    /// (bias_len, bias_p0, bias_p1).
    pub fn words(&self) -> (u32, f32, f32) {
        match *self {
            BiasArgs::None => (0, 0.0, 0.0),
            BiasArgs::T5 { max_distance } => (max_distance, 0.0, 0.0),
            BiasArgs::Sandwich { table_len } => (table_len, 0.0, 0.0),
            BiasArgs::Fire { width, c, l } => (width, c, l),
        }
    }
}

/// Kernel family: each has its own bind-group layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// The fused attention kernel.
    Fused,
    /// The unfused baseline's stages.
    Unfused,
    /// The decode kernel and its split-KV reduce.
    Decode,
}

/// How a binding is bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `var<storage, read>`
    Read,
    /// `var<storage, read_write>`
    ReadWrite,
    /// `var<uniform>` of `Params`
    Uniform,
    /// `var<uniform>` of `DecodeParams`
    DecodeUniform,
}

/// One binding of group 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The WGSL variable's name.
    pub name: &'static str,
    /// How the kernel accesses it.
    pub access: Access,
    /// The WGSL type of the variable.
    pub ty: &'static str,
}

const fn b(name: &'static str, access: Access, ty: &'static str) -> Binding {
    Binding { name, access, ty }
}

/// The fused kernel's bindings; the index is the binding number.
pub const FUSED_BINDINGS: [Binding; 9] = [
    b("q_buf", Access::Read, "array<f32>"),
    b("k_buf", Access::Read, "array<f32>"),
    b("v_buf", Access::Read, "array<vec4<f32>>"),
    b("o_buf", Access::ReadWrite, "array<vec4<f32>>"),
    b("pos_q", Access::Read, "array<i32>"),
    b("pos_k", Access::Read, "array<i32>"),
    b("aux", Access::Read, "array<vec4<f32>>"),
    b("params", Access::Uniform, "Params"),
    b("user_bias", Access::Read, "array<f32>"),
];

/// The decode kernel's bindings; the index is the binding number. At most 8 storage buffers
/// (WebGPU's default per-stage limit): the split-KV partials share one buffer.
pub const DECODE_BINDINGS: [Binding; 10] = [
    b("q_buf", Access::Read, "array<vec4<f32>>"),
    b("k_cache", Access::Read, "array<vec4<f32>>"),
    b("v_cache", Access::Read, "array<vec4<f32>>"),
    b("o_buf", Access::ReadWrite, "array<vec4<f32>>"),
    b("pos_k", Access::Read, "array<i32>"),
    b("lengths", Access::Read, "array<u32>"),
    b("aux", Access::Read, "array<vec4<f32>>"),
    b("params", Access::Uniform, "Params"),
    b("dparams", Access::DecodeUniform, "DecodeParams"),
    b("partials", Access::ReadWrite, "array<vec4<f32>>"),
];

/// The binding a fused variant that writes the log-sum-exp adds after [`FUSED_BINDINGS`]
/// (a ninth storage buffer, past WebGPU's default of eight per stage, so only those variants
/// declare it).
pub const LSE_BINDING: Binding = b("lse_buf", Access::ReadWrite, "array<f32>");

/// The binding a decode variant with the caller's bias adds after [`DECODE_BINDINGS`] (a ninth
/// storage buffer, past WebGPU's default of eight per stage, so only those variants declare it):
/// f32 `[batch or 1, num_heads or 1, max new queries, capacity]`, over cache slots.
pub const DECODE_BIAS_BINDING: Binding = b("user_bias", Access::Read, "array<f32>");

/// The unfused baseline's bindings (every stage shares them); the index is the binding number.
pub const UNFUSED_BINDINGS: [Binding; 6] = [
    b("src_a", Access::Read, "array<f32>"),
    b("src_b", Access::Read, "array<f32>"),
    b("dst", Access::ReadWrite, "array<f32>"),
    b("positions", Access::Read, "array<i32>"),
    b("aux", Access::Read, "array<vec4<f32>>"),
    b("params", Access::Uniform, "Params"),
];

impl Family {
    /// The family's bindings; the index is the binding number.
    pub fn bindings(self) -> &'static [Binding] {
        match self {
            Family::Fused => &FUSED_BINDINGS,
            Family::Unfused => &UNFUSED_BINDINGS,
            Family::Decode => &DECODE_BINDINGS,
        }
    }

    /// The binding number of the variable `name`.
    pub(crate) fn slot(self, name: &str) -> u32 {
        self.bindings()
            .iter()
            .position(|b| b.name == name)
            .unwrap_or_else(|| panic!("no binding {name}")) as u32
    }
}

/// Bind-group layout entries of `bindings` (binding number = index).
pub(crate) fn layout_entries(bindings: &[Binding]) -> Vec<wgpu::BindGroupLayoutEntry> {
    {
        bindings
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match b.access {
                        Access::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Access::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                        Access::Uniform | Access::DecodeUniform => wgpu::BufferBindingType::Uniform,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: match b.access {
                        Access::Uniform => {
                            wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64)
                        }
                        Access::DecodeUniform => {
                            wgpu::BufferSize::new(std::mem::size_of::<DecodeParams>() as u64)
                        }
                        _ => None,
                    },
                },
                count: None,
            })
            .collect()
    }
}

/// The WGSL declarations of the contract for a family: codes, `struct Params` and the bindings
/// (with the family's default f32 tensor types; [`wgsl_declarations_with`] takes a variant's).
pub fn wgsl_declarations(family: Family) -> String {
    wgsl_declarations_with(family.bindings())
}

/// The WGSL declarations of the contract with the given bindings (a variant's, whose tensor
/// types follow its storage forms).
pub fn wgsl_declarations_with(bindings: &[Binding]) -> String {
    let mut s = String::from("// Generated from src/kernel/abi.rs.\n");
    for k in PosKind::ALL.into_iter().chain([PosKind::Custom]) {
        s += &format!(
            "const POS_{}: u32 = {}u;\n",
            k.name().to_uppercase(),
            k as u32
        );
    }
    for (name, code) in [
        ("BRANCH_RULE_NONE", BranchRule::None as u32),
        ("BRANCH_RULE_DISTANCE", BranchRule::Distance as u32),
        ("BRANCH_RULE_SINK_ONLY", BranchRule::SinkOnly as u32),
        ("BRANCH_Q_OWN", BranchQMode::Own as u32),
        ("BRANCH_Q_ZERO", BranchQMode::Zero as u32),
        ("BRANCH_Q_CACHE_INDEX", BranchQMode::CacheIndex as u32),
        ("NO_SINK_LOGITS", NO_SINK_LOGITS),
    ] {
        s += &format!("const {name}: u32 = {code}u;\n");
    }
    s += "struct Params {\n";
    for (name, ty, _) in Params::FIELDS {
        s += &format!("    {name}: {ty},\n");
    }
    s += "}\n";
    if bindings.iter().any(|b| b.access == Access::DecodeUniform) {
        s += "struct DecodeParams {\n";
        for (name, ty, _) in DecodeParams::FIELDS {
            s += &format!("    {name}: {ty},\n");
        }
        s += "}\n";
    }
    for (i, b) in bindings.iter().enumerate() {
        let space = match b.access {
            Access::Read => "storage, read",
            Access::ReadWrite => "storage, read_write",
            Access::Uniform | Access::DecodeUniform => "uniform",
        };
        s += &format!(
            "@group(0) @binding({i}) var<{space}> {}: {};\n",
            b.name, b.ty
        );
    }
    s
}

/// An aux table under construction; offsets are what the `Params` offset fields take.
#[derive(Clone, Debug, Default)]
pub struct AuxTable {
    entries: Vec<[f32; 4]>,
}

impl AuxTable {
    /// Appends entries; returns the entry offset of the first.
    pub fn push_entries(&mut self, entries: impl IntoIterator<Item = [f32; 4]>) -> u32 {
        let at = self.entries.len() as u32;
        self.entries.extend(entries);
        at
    }

    /// Appends floats packed four to an entry; returns the entry offset of the first.
    pub fn push_floats(&mut self, floats: &[f32]) -> u32 {
        self.push_entries(pack4(floats))
    }

    /// Overwrites entries from `at` on (which must exist).
    pub fn set_entries(&mut self, at: usize, entries: &[[f32; 4]]) {
        self.entries[at..at + entries.len()].copy_from_slice(entries);
    }

    /// The entries so far.
    pub fn entries(&self) -> &[[f32; 4]] {
        &self.entries
    }

    /// The table; never empty (a binding cannot be), so an empty table is one zero entry.
    pub fn into_entries(mut self) -> Vec<[f32; 4]> {
        if self.entries.is_empty() {
            self.entries.push([0.0; 4]);
        }
        self.entries
    }
}

/// Floats packed four to an aux entry, the last one padded with zeros.
pub fn pack4(floats: &[f32]) -> impl Iterator<Item = [f32; 4]> + '_ {
    floats.chunks(4).map(|c| {
        let mut e = [0.0f32; 4];
        e[..c.len()].copy_from_slice(c);
        e
    })
}

/// One frequency entry as the kernels read it (`rope_turns` in shaders/position.wgsl): turns per
/// position split into a 12-bit head, a 12-bit middle and the remainder, so that each product
/// with a 12-bit position chunk is exact in f32; `w` carries log2(ζ) for xPos (or a phase).
pub fn freq_entry(inv_freq: f64, log2_zeta: f64) -> [f32; 4] {
    let turns = inv_freq / std::f64::consts::TAU;
    let hi = round_to_bits(turns, 12);
    let mid = round_to_bits(turns - hi, 12);
    let lo = turns - hi - mid;
    [hi as f32, mid as f32, lo as f32, log2_zeta as f32]
}

/// `x` rounded to `bits` significant bits (exact in f32 for bits ≤ 24).
fn round_to_bits(x: f64, bits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let e = x.abs().log2().floor() as i32;
    let scale = 2f64.powi(bits - 1 - e);
    let r = (x * scale).round() / scale;
    // f32 must hold it exactly: flush what f32 cannot represent as a normal number.
    if r.abs() < f32::MIN_POSITIVE as f64 {
        0.0
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every encoding runs in a variant the crate compiles, and the variant holds its body:
    /// `table_bias` (shaders/position.wgsl) takes T5 and KERPLE from the variant's constant, so
    /// either would get no bias at all in the Table variant.
    #[test]
    fn every_kind_runs_in_a_compiled_variant_that_holds_its_body() {
        for k in PosKind::ALL {
            assert!(
                PosKind::VARIANTS.contains(&k.variant()),
                "{k:?} runs in {:?}, which is not compiled",
                k.variant()
            );
        }
        assert_eq!(PosKind::T5.variant(), PosKind::T5);
        assert_eq!(PosKind::KerpleLog.variant(), PosKind::Kerple);
        assert_eq!(PosKind::KerplePower.variant(), PosKind::Kerple);
        assert_eq!(PosKind::Sandwich.variant(), PosKind::Table);
        assert_eq!(PosKind::Fire.variant(), PosKind::Table);
    }

    #[test]
    fn params_fields_cover_the_struct() {
        let last = Params::FIELDS.last().unwrap();
        assert_eq!(last.2 + 4, std::mem::size_of::<Params>());
        assert_eq!(std::mem::size_of::<Params>() % 16, 0, "uniform size");
        let last = DecodeParams::FIELDS.last().unwrap();
        assert_eq!(last.2 + 4, std::mem::size_of::<DecodeParams>());
        assert_eq!(std::mem::size_of::<DecodeParams>() % 16, 0, "uniform size");
    }

    #[test]
    fn declarations_name_every_binding_once() {
        for family in [Family::Fused, Family::Unfused, Family::Decode] {
            let wgsl = wgsl_declarations(family);
            for (i, b) in family.bindings().iter().enumerate() {
                assert_eq!(wgsl.matches(&format!("@binding({i})")).count(), 1);
                assert_eq!(family.slot(b.name), i as u32);
            }
        }
    }

    #[test]
    fn freq_split_reassembles_exactly_enough() {
        for &f in &[1.0, 0.5, 1e-4, 3.1e-7, 0.7498942093324559] {
            let e = freq_entry(f, 0.0);
            let back = (e[0] as f64 + e[1] as f64 + e[2] as f64) * std::f64::consts::TAU;
            assert!(((back - f) / f).abs() < 1e-13, "{f}: {back}");
            // The head and middle hold at most 12 significant bits.
            for part in [e[0], e[1]] {
                let m = part.to_bits() & 0x7f_ffff;
                assert_eq!(m & 0xfff, 0, "{part} has more than 12 significant bits");
            }
        }
    }
}
