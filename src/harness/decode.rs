//! Decode conformance: each case fills a KV cache from a seeded token history (in a ring cache
//! later tokens overwrite earlier slots), runs one decode step on the GPU with a poisoned output,
//! and compares every sequence's new rows with the f64 reference run on that sequence's whole
//! prefix (its `keys` tokens, positions as stored). The tolerance rule is
//! [`check::compare`](super::check::compare)'s; rows past a sequence's query count must still
//! hold the poison.

use web_time::Instant;

use super::check::{CaseResult, SplitMix, Status, compare, encodings};
use super::reference;
use crate::context::Context;
use crate::decode::{DecodePlan, DecodeSpec, cache_slot};
use crate::encoding::masks::{Extrapolation, Window};
use crate::error::Error;
use crate::spec::AttentionSpec;

/// One decode step to check.
#[derive(Clone, Debug)]
pub struct DecodeCase {
    /// The case's name.
    pub name: String,
    /// The plan's spec.
    pub spec: DecodeSpec,
    /// (new queries, keys) per sequence.
    pub lengths: Vec<(u32, u32)>,
    /// Added to every token's index to give its position.
    pub position_offset: i32,
    /// Seed of the inputs.
    pub seed: u64,
}

impl DecodeCase {
    /// A case of `spec` with these (new queries, keys) per sequence.
    pub fn new(name: impl Into<String>, spec: DecodeSpec, lengths: Vec<(u32, u32)>) -> Self {
        let name = name.into();
        let seed = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        DecodeCase {
            name,
            spec,
            lengths,
            position_offset: 0,
            seed,
        }
    }

    /// Adds `offset` to every token's position.
    pub fn with_position_offset(mut self, offset: i32) -> Self {
        self.position_offset = offset;
        self
    }
}

/// A seeded token history: per sequence, K and V rows `[tokens, kv_heads, head_dim]` and
/// positions, plus Q rows for the new queries `[max_q, heads, head_dim]`.
pub struct History {
    /// Per sequence, K rows `[tokens, kv_heads, head_dim]`.
    pub k: Vec<Vec<f32>>,
    /// Per sequence, V rows, like `k`.
    pub v: Vec<Vec<f32>>,
    /// Per sequence, each token's position.
    pub pos: Vec<Vec<i32>>,
    /// Q rows of the new queries, `[batch, max_q, heads, head_dim]`.
    pub q: Vec<f32>,
    /// The caller's bias over cache slots when the spec has a bias layout (`[batch or 1,
    /// heads or 1, max_q, capacity]`): seeded values, with every seventh slot of each row
    /// hidden (−∞), as a mask would.
    pub bias: Option<Vec<f32>>,
}

impl History {
    /// A history of `tokens[b]` tokens per sequence, positions from `offset`, seeded.
    pub fn new(spec: &DecodeSpec, tokens: &[u32], offset: i32, seed: u64) -> Self {
        let a = &spec.attention;
        let row = (a.num_kv_heads * a.head_dim) as usize;
        let mut rng = SplitMix::new(seed);
        // Inputs rounded to their storage dtypes: the reference runs on what the kernel reads
        // (check's rule for half storage).
        let d = a.dtypes;
        let mut draw = |n: usize, t: crate::Dtype| -> Vec<f32> {
            rng.vec(n, 1.0).into_iter().map(|x| t.round(x)).collect()
        };
        let q = draw(a.q_len(), d.q);
        let (mut k, mut v, mut pos) = (Vec::new(), Vec::new(), Vec::new());
        for &n in tokens {
            k.push(draw(n as usize * row, d.k));
            v.push(draw(n as usize * row, d.v));
            pos.push((0..n as i32).map(|i| i + offset).collect());
        }
        let bias = a.bias.map(|_| {
            let cap = a.seq_k as usize;
            rng.vec(crate::spec::bias_len(a), 1.0)
                .into_iter()
                .enumerate()
                .map(|(i, x)| {
                    if (i % cap) % 7 == 3 {
                        f32::NEG_INFINITY
                    } else {
                        0.5 * x
                    }
                })
                .collect()
        });
        History { k, v, pos, q, bias }
    }

    /// Sequence b's bias for its `q_len` new rows over its first `keys` tokens, re-laid from
    /// cache slots to token order (`[1, heads or 1, q_len, keys]`), if the spec has one.
    fn sequence_bias(
        &self,
        spec: &DecodeSpec,
        b: usize,
        q_len: u32,
        keys: u32,
    ) -> Option<Vec<f32>> {
        let a = &spec.attention;
        let (layout, bias) = (a.bias?, self.bias.as_ref()?);
        let cap = a.seq_k as usize;
        let heads = if layout.broadcast_heads {
            1
        } else {
            a.num_heads as usize
        };
        let plane = a.seq_q as usize * cap;
        let base = if layout.broadcast_batch {
            0
        } else {
            b * heads * plane
        };
        let mut out = Vec::with_capacity(heads * (q_len * keys) as usize);
        for h in 0..heads {
            for i in 0..q_len as usize {
                for j in 0..keys {
                    let slot = cache_slot(spec.ring, a.sink_tokens, a.seq_k, j) as usize;
                    out.push(bias[base + h * plane + i * cap + slot]);
                }
            }
        }
        Some(out)
    }

    /// The cache contents after the whole history was appended: (k, v, positions).
    pub fn cache(&self, spec: &DecodeSpec) -> (Vec<f32>, Vec<f32>, Vec<i32>) {
        let a = &spec.attention;
        let row = (a.num_kv_heads * a.head_dim) as usize;
        let cap = a.seq_k as usize;
        let mut k = vec![0.0; a.kv_len()];
        let mut v = vec![0.0; a.kv_len()];
        let mut p = vec![0; a.batch as usize * cap];
        for b in 0..a.batch as usize {
            for i in 0..self.pos[b].len() {
                let s = cache_slot(spec.ring, a.sink_tokens, a.seq_k, i as u32) as usize;
                let dst = (b * cap + s) * row;
                k[dst..dst + row].copy_from_slice(&self.k[b][i * row..(i + 1) * row]);
                v[dst..dst + row].copy_from_slice(&self.v[b][i * row..(i + 1) * row]);
                p[b * cap + s] = self.pos[b][i];
            }
        }
        (k, v, p)
    }

    /// The references (f64, f32) for sequence b's `q_len` new rows over its first `keys` tokens;
    /// with `acc` f16 the f32 one is the plain implementation with P·V in f16
    /// (`reference::attention_half_acc`).
    pub fn reference(
        &self,
        spec: &DecodeSpec,
        b: usize,
        q_len: u32,
        keys: u32,
        acc: crate::Accumulation,
    ) -> (Vec<f64>, Vec<f32>) {
        let a = &spec.attention;
        let row = (a.num_kv_heads * a.head_dim) as usize;
        let qrow = (a.num_heads * a.head_dim) as usize;
        let s = AttentionSpec {
            batch: 1,
            seq_q: q_len,
            seq_k: keys,
            ..a.clone()
        };
        let bias = self.sequence_bias(spec, b, q_len, keys);
        let off = b * a.seq_q as usize * qrow;
        let q = &self.q[off..off + q_len as usize * qrow];
        let k = &self.k[b][..keys as usize * row];
        let v = &self.v[b][..keys as usize * row];
        let pk = &self.pos[b][..keys as usize];
        let pq = &pk[(keys - q_len) as usize..];
        let bias = bias.as_deref();
        let r32 = match acc {
            crate::Accumulation::F32 => {
                reference::attention_with_bias::<f32>(&s, q, k, v, pq, pk, bias)
            }
            crate::Accumulation::F16 => {
                reference::attention_half_acc::<f32>(&s, q, k, v, pq, pk, bias)
            }
        };
        (
            reference::attention_with_bias::<f64>(&s, q, k, v, pq, pk, bias),
            r32,
        )
    }
}

/// Compares a decode output `[batch, max_q, heads, head_dim]` with the references of every
/// sequence's new rows; rows past a sequence's query count must be NaN (the poison).
pub fn check_output(
    spec: &DecodeSpec,
    history: &History,
    lengths: &[(u32, u32)],
    gpu: &[f32],
) -> (Status, f64, f64, f64) {
    check_output_with(spec, history, lengths, gpu, crate::Accumulation::F32)
}

/// [`check_output`] for a plan whose P·V ran in `acc` arithmetic (the bound's plain
/// implementation does the same).
pub fn check_output_with(
    spec: &DecodeSpec,
    history: &History,
    lengths: &[(u32, u32)],
    gpu: &[f32],
    acc: crate::Accumulation,
) -> (Status, f64, f64, f64) {
    let a = &spec.attention;
    let qrow = (a.num_heads * a.head_dim) as usize;
    let (mut g_all, mut r64_all, mut r32_all) = (Vec::new(), Vec::new(), Vec::new());
    for (b, &(ql, kl)) in lengths.iter().enumerate() {
        let off = b * a.seq_q as usize * qrow;
        let rows = &gpu[off..off + a.seq_q as usize * qrow];
        let (written, rest) = rows.split_at(ql as usize * qrow);
        if let Some(i) = rest.iter().position(|x| !x.is_nan()) {
            return (
                Status::Fail(format!(
                    "sequence {b}: element {i} past its {ql} query rows was written"
                )),
                f64::NAN,
                f64::NAN,
                f64::NAN,
            );
        }
        if ql == 0 {
            continue;
        }
        let (r64, r32) = history.reference(spec, b, ql, kl, acc);
        g_all.extend_from_slice(written);
        r64_all.extend(r64);
        // The plain implementation stores its output in the output's dtype too.
        r32_all.extend(r32.into_iter().map(|x| a.dtypes.out.round(x)));
    }
    if g_all.is_empty() {
        return (
            Status::Fail("no sequence has a query row: nothing compared".into()),
            f64::NAN,
            f64::NAN,
            f64::NAN,
        );
    }
    compare(&g_all, &r64_all, &r32_all)
}

/// Runs one decode case on `ctx` against the reference.
#[cfg(not(target_arch = "wasm32"))]
pub fn run_decode_case(ctx: &Context, case: &DecodeCase) -> CaseResult {
    pollster::block_on(run_decode_case_async(ctx, case))
}

/// [`run_decode_case`] as a future.
pub async fn run_decode_case_async(ctx: &Context, case: &DecodeCase) -> CaseResult {
    let tokens: Vec<u32> = case.lengths.iter().map(|l| l.1).collect();
    let history = History::new(&case.spec, &tokens, case.position_offset, case.seed);
    let (k, v, p) = history.cache(&case.spec);
    let start = Instant::now();
    let gpu = match DecodePlan::new_async(ctx, &case.spec).await {
        Ok(plan) => {
            plan.run_with_bias_async(
                ctx,
                &history.q,
                &k,
                &v,
                Some(&p),
                &case.lengths,
                history.bias.as_deref(),
            )
            .await
        }
        Err(e) => Err(e),
    };
    let mut result = CaseResult {
        name: case.name.clone(),
        status: Status::Pass,
        err_gpu: f64::NAN,
        err_f32: f64::NAN,
        bound: f64::NAN,
        time: start.elapsed(),
    };
    match gpu {
        Err(e @ Error::Unavailable { .. }) => result.status = Status::Unsupported(e.to_string()),
        Err(e) => result.status = Status::Fail(e.to_string()),
        Ok(gpu) => {
            let (status, eg, ef, b) = check_output_with(
                &case.spec,
                &history,
                &case.lengths,
                &gpu,
                ctx.accumulation(),
            );
            result.status = status;
            result.err_gpu = eg;
            result.err_f32 = ef;
            result.bound = b;
        }
    }
    result
}

fn rope() -> crate::PositionEncoding {
    crate::PositionEncoding::Rope(crate::Rope::new(10000.0))
}

/// The decode matrix. Head size 64 throughout (one variant per encoding); `heads` query heads
/// over `kv` KV heads.
pub fn decode_cases() -> Vec<DecodeCase> {
    let mut cases = Vec::new();
    let spec = |batch, max_q, cap, heads, kv| {
        DecodeSpec::new(
            AttentionSpec::default()
                .with_batch(batch)
                .with_seq_q(max_q)
                .with_seq_k(cap)
                .with_heads(heads)
                .with_kv_heads(kv)
                .with_position(rope()),
        )
    };
    // New queries × cache lengths, one sequence, GQA 4:2.
    for q in [1u32, 4, 16] {
        for keys in [1u32, 100, 2049, 4100] {
            if q > keys {
                continue;
            }
            cases.push(DecodeCase::new(
                format!("decode_rope_q{q}_k{keys}"),
                spec(1, q, keys.max(q) + 7, 4, 2),
                vec![(q, keys)],
            ));
        }
    }
    // Ragged batch of 4: own query and key counts, one sequence with no new query.
    cases.push(DecodeCase::new(
        "decode_ragged_b4",
        spec(4, 4, 300, 4, 2),
        vec![(1, 1), (4, 299), (0, 17), (3, 130)],
    ));
    // GQA 8:1, positions offset (a continued sequence).
    cases.push(
        DecodeCase::new(
            "decode_gqa8_k777",
            spec(2, 2, 800, 8, 1),
            vec![(1, 777), (2, 64)],
        )
        .with_position_offset(5000),
    );
    // Every encoding, bidirectional as well as causal for one.
    for (name, enc) in encodings(4) {
        let s = DecodeSpec::new(
            AttentionSpec::default()
                .with_batch(2)
                .with_seq_q(3)
                .with_seq_k(200)
                .with_heads(4)
                .with_kv_heads(2)
                .with_position(enc),
        );
        cases.push(DecodeCase::new(
            format!("decode_enc_{name}"),
            s,
            vec![(3, 150), (1, 61)],
        ));
    }
    for (name, enc) in [
        ("t5", super::check::t5(32, 128, false, 4)),
        (
            "kerple_log",
            super::check::kerple(crate::KerpleForm::Log, 4),
        ),
        (
            "kerple_power",
            super::check::kerple(crate::KerpleForm::Power, 4),
        ),
        ("fire", super::check::fire(4)),
        (
            "sandwich",
            crate::PositionEncoding::Sandwich(crate::Sandwich::default()),
        ),
    ] {
        let s = DecodeSpec::new(
            AttentionSpec::default()
                .with_batch(2)
                .with_seq_q(3)
                .with_seq_k(200)
                .with_heads(4)
                .with_kv_heads(2)
                .with_position(enc),
        );
        cases.push(DecodeCase::new(
            format!("decode_enc_{name}"),
            s,
            vec![(3, 150), (1, 61)],
        ));
    }
    // Features: softcap, sink logits, log-n scaling, bidirectional.
    let base = || {
        AttentionSpec::default()
            .with_batch(2)
            .with_seq_q(2)
            .with_seq_k(600)
            .with_heads(4)
            .with_kv_heads(2)
            .with_position(rope())
    };
    let lens = vec![(2, 513), (1, 40)];
    for (name, a) in [
        ("softcap", base().with_softcap(5.0)),
        (
            "sink_logits",
            base().with_sink_logits(vec![0.5, -1.0, 2.0, 0.0]),
        ),
        ("logn", base().with_logn(64)),
        ("bidir", base().with_causal(false)),
        ("window", base().with_window(Window::recent(100))),
        // StreamingLLM: reads only the sink and window keys.
        (
            "window_sinks",
            base().with_window(Window::recent(64)).with_sink_tokens(4),
        ),
    ] {
        cases.push(DecodeCase::new(
            format!("decode_{name}"),
            DecodeSpec::new(a),
            lens.clone(),
        ));
    }
    // Extrapolation methods: two RoPE scores per key, one picked by the method's rule (ReRoPE's
    // distance, LM-Infinite's and StreamingLLM's sink-only keys), all in one kernel variant;
    // split in 2 and with several new queries so that rows of one block take both branches.
    for (name, a) in [
        (
            "rerope_w16",
            base().with_extrapolation(Extrapolation::ReRope {
                window: 16,
                leak: None,
            }),
        ),
        (
            "leaky_rerope_w16_k4",
            base().with_extrapolation(Extrapolation::ReRope {
                window: 16,
                leak: Some(4.0),
            }),
        ),
        (
            "lm_infinite_g4_l32_limit40",
            base().with_lm_infinite(4, 32, 40),
        ),
        (
            "streaming_cache_index_s4_r32",
            base().with_streaming(4, 32, true),
        ),
    ] {
        cases.push(DecodeCase::new(
            format!("decode_{name}"),
            DecodeSpec::new(a).with_splits(2),
            lens.clone(),
        ));
    }
    // ReRoPE in the interleaved layout: keys rotated in the general form (partner vec4s read
    // from the cache) in both branches.
    let interleaved = encodings(4)
        .into_iter()
        .find(|e| e.0 == "rope_interleaved")
        .expect("rope_interleaved")
        .1;
    cases.push(DecodeCase::new(
        "decode_rerope_w16_interleaved",
        DecodeSpec::new(base().with_position(interleaved).with_extrapolation(
            Extrapolation::ReRope {
                window: 16,
                leak: Some(2.0),
            },
        )),
        lens.clone(),
    ));
    // StreamingLLM's cache-index positions in a ring cache of sinks and window.
    cases.push(DecodeCase::new(
        "decode_ring_streaming_cache_index_s4_r32",
        DecodeSpec::new(
            AttentionSpec::default()
                .with_batch(2)
                .with_seq_q(2)
                .with_seq_k(4 + 32 + 2)
                .with_heads(4)
                .with_kv_heads(2)
                .with_position(rope())
                .with_streaming(4, 32, true),
        )
        .with_ring(),
        vec![(2, 700), (1, 90)],
    ));
    // The caller's bias over cache slots (a ninth storage buffer): per sequence and head on a
    // GQA batch; broadcast over heads and batch on a split run; in a ring cache of sinks and
    // window, where slots are not token indices. Every seventh slot of each row is hidden (−∞).
    let biased = |mut s: DecodeSpec, layout: crate::BiasLayout| {
        s.attention = s.attention.with_bias(layout);
        s
    };
    cases.push(DecodeCase::new(
        "decode_bias_gqa_b2",
        biased(spec(2, 3, 200, 4, 2), crate::BiasLayout::default()),
        vec![(3, 150), (1, 61)],
    ));
    cases.push(DecodeCase::new(
        "decode_bias_broadcast_split3",
        biased(
            spec(2, 2, 2100, 4, 2).with_splits(3),
            crate::BiasLayout {
                broadcast_batch: true,
                broadcast_heads: true,
            },
        ),
        vec![(2, 2049), (1, 700)],
    ));
    cases.push(DecodeCase::new(
        "decode_bias_ring_streaming_s4_r32",
        biased(
            DecodeSpec::new(
                AttentionSpec::default()
                    .with_batch(2)
                    .with_seq_q(2)
                    .with_seq_k(4 + 32 + 2)
                    .with_heads(4)
                    .with_kv_heads(2)
                    .with_position(rope())
                    .with_streaming(4, 32, false),
            )
            .with_ring(),
            crate::BiasLayout {
                broadcast_batch: false,
                broadcast_heads: true,
            },
        ),
        vec![(2, 700), (1, 90)],
    ));
    // Split KV, forced: 1 (unsplit), 3, 7 and 130 chunks on the same inputs (130: more than the
    // GPU split rule makes, some of them empty for the shorter sequence, merged by the reduce's
    // 16 groups at head size 64, each over 8 or 9 chunks).
    for splits in [1u32, 3, 7, 130] {
        let mut c = DecodeCase::new(
            format!("decode_split{splits}"),
            spec(2, 2, 2100, 4, 2).with_splits(splits),
            vec![(2, 2049), (1, 300)],
        );
        c.seed = 7;
        cases.push(c);
    }
    // Llama-3's shape at head size 128 (4 query heads per KV head, one new query: a 4-row
    // block, 8 lanes a key, which is `subgroupAdd` over lavapipe's 8-lane subgroups), and the
    // form of a GPU without subgroups (the workgroup-memory lane sum, no read-ahead) forced on
    // the same inputs with a ragged batch, split in 3 and in 40 (the reduce's 8 groups at head
    // size 128, each over 5 chunks of 38 keys).
    for (name, subgroups) in [
        ("decode_d128_gqa4", true),
        ("decode_d128_gqa4_lanes_wg", false),
    ] {
        let mut c = DecodeCase::new(
            name,
            DecodeSpec::new(
                AttentionSpec::default()
                    .with_batch(2)
                    .with_seq_q(1)
                    .with_seq_k(1500)
                    .with_heads(8)
                    .with_head_dim(128)
                    .with_kv_heads(2)
                    .with_position(crate::PositionEncoding::Rope(crate::Rope::new(500000.0))),
            )
            .with_splits(if subgroups { 3 } else { 40 })
            .with_subgroups(subgroups)
            .with_read_ahead(subgroups),
            vec![(1, 1500), (1, 421)],
        );
        c.seed = 11;
        cases.push(c);
    }
    // Ring caches: window + max_q slots (+ sinks), far more tokens than slots.
    let ring = |sinks: u32, window: u32, max_q: u32| {
        DecodeSpec::new(
            AttentionSpec::default()
                .with_batch(2)
                .with_seq_q(max_q)
                .with_seq_k(sinks + window + max_q)
                .with_heads(4)
                .with_kv_heads(2)
                .with_position(rope())
                .with_window(Window::recent(window))
                .with_sink_tokens(sinks),
        )
        .with_ring()
    };
    cases.push(DecodeCase::new(
        "decode_ring_w64",
        ring(0, 64, 1),
        vec![(1, 1000), (1, 30)],
    ));
    cases.push(DecodeCase::new(
        "decode_ring_w64_sinks4_q3",
        ring(4, 64, 3).with_splits(2),
        vec![(3, 517), (2, 68)],
    ));
    // Half storage: an f16 cache with f32 queries and output, all f16, all bf16 (the f16 form is
    // the adapter's: native where it has SHADER_F16, else packed), on a split ragged batch.
    for (name, dtypes) in [
        (
            "kv_f16",
            crate::Dtypes {
                k: crate::Dtype::F16,
                v: crate::Dtype::F16,
                ..crate::Dtypes::F32
            },
        ),
        ("f16", crate::Dtypes::all(crate::Dtype::F16)),
        ("bf16", crate::Dtypes::all(crate::Dtype::Bf16)),
    ] {
        cases.push(DecodeCase::new(
            format!("decode_{name}_b2_split2"),
            DecodeSpec::new(
                AttentionSpec::default()
                    .with_batch(2)
                    .with_seq_q(4)
                    .with_seq_k(600)
                    .with_heads(4)
                    .with_kv_heads(2)
                    .with_position(rope())
                    .with_dtypes(dtypes),
            )
            .with_splits(2),
            vec![(4, 590), (1, 33)],
        ));
    }
    // Custom schemes (src/harness/custom.rs): ALiBi through score_mod, a window through mask_mod
    // and RoPE through the rotation hook, checked against their Rust twins; split in two.
    for (name, enc) in [
        ("custom_alibi", crate::harness::custom::alibi(4)),
        (
            "custom_window_mask",
            crate::harness::custom::window_mask(40, false),
        ),
        ("custom_rope", crate::harness::custom::rope(10000.0, 64)),
    ] {
        cases.push(DecodeCase::new(
            format!("decode_{name}"),
            DecodeSpec::new(
                AttentionSpec::default()
                    .with_batch(2)
                    .with_seq_q(4)
                    .with_seq_k(400)
                    .with_heads(4)
                    .with_kv_heads(2)
                    .with_position(enc),
            )
            .with_splits(2),
            vec![(4, 390), (1, 77)],
        ));
    }
    cases
}

/// The small subset run on every backend besides the main one: two RoPE cases (new queries
/// against a cache, a ragged batch) that compile a single variant, since the GL driver takes
/// minutes per decode variant.
pub fn decode_quick_cases() -> Vec<DecodeCase> {
    decode_cases()
        .into_iter()
        .filter(|c| ["decode_rope_q4_k100", "decode_ragged_b4"].contains(&c.name.as_str()))
        .collect()
}

/// One decode benchmark shape: Llama-3-8B heads (32 query, 8 KV, head_dim 128, RoPE), one new
/// query per sequence against `cache` keys, every sequence full.
pub fn bench_spec(batch: u32, cache: u32) -> DecodeSpec {
    DecodeSpec::new(
        AttentionSpec::default()
            .with_batch(batch)
            .with_seq_q(1)
            .with_seq_k(cache)
            .with_heads(32)
            .with_head_dim(128)
            .with_kv_heads(8)
            .with_position(crate::PositionEncoding::Rope(crate::Rope::new(500000.0))),
    )
}

/// Seeded device buffers of a decode step (cache full, one new query per sequence).
pub struct DecodeSetup {
    /// New queries.
    pub q: wgpu::Buffer,
    /// Key cache.
    pub k: wgpu::Buffer,
    /// Value cache.
    pub v: wgpu::Buffer,
    /// Positions per slot.
    pub positions: wgpu::Buffer,
    /// (new queries, keys) per sequence.
    pub lengths: wgpu::Buffer,
    /// Output.
    pub out: wgpu::Buffer,
}

impl DecodeSetup {
    /// Seeded buffers for `spec`, every sequence's cache full.
    pub fn new(ctx: &Context, spec: &DecodeSpec) -> crate::Result<Self> {
        let a = &spec.attention;
        let mut rng = SplitMix::new(a.seq_k as u64);
        let st = wgpu::BufferUsages::STORAGE;
        let mk = |bytes: &[u8]| {
            let b = ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: bytes.len() as u64,
                usage: st | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            ctx.queue().write_buffer(&b, 0, bytes);
            b
        };
        let pos: Vec<i32> = (0..a.batch).flat_map(|_| 0..a.seq_k as i32).collect();
        let lens: Vec<u32> = (0..a.batch).flat_map(|_| [1, a.seq_k]).collect();
        // Every tensor stored in its dtype.
        let d = a.dtypes;
        Ok(DecodeSetup {
            q: mk(&d.q.encode(&rng.vec(a.q_len(), 1.0))),
            k: mk(&d.k.encode(&rng.vec(a.kv_len(), 1.0))),
            v: mk(&d.v.encode(&rng.vec(a.kv_len(), 1.0))),
            positions: mk(bytemuck::cast_slice(&pos)),
            lengths: mk(bytemuck::cast_slice(&lens)),
            out: mk(&d.out.encode(&vec![0.0f32; a.q_len()])),
        })
    }

    /// The step's buffers as a decode call takes them.
    pub fn buffers(&self) -> crate::decode::DecodeBuffers<'_> {
        crate::decode::DecodeBuffers::new(&self.q, &self.k, &self.v, &self.lengths, &self.out)
            .with_positions(&self.positions)
    }

    /// The same tensors as a prefill call with seq_q = 1 (the cache is full, so it is
    /// contiguous `[batch, cache, kv_heads, head_dim]`).
    pub fn prefill_buffers(&self) -> crate::AttentionBuffers<'_> {
        crate::AttentionBuffers::new(&self.q, &self.k, &self.v, &self.out)
    }
}

/// A plain copy kernel (vec4 loads and stores, 256 per workgroup), the adapter's memory roof.
pub struct CopyRoof {
    pipeline: wgpu::ComputePipeline,
    src: wgpu::Buffer,
    dst: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
    vec4s: u32,
}

const COPY_WGSL: &str = "
@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;
@compute @workgroup_size(256)
fn copy(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 256u;
    if (i < arrayLength(&src)) {
        dst[i] = src[i];
    }
}
";

impl CopyRoof {
    /// A copy of `bytes` (rounded down to whole vec4s).
    pub fn new(ctx: &Context, bytes: u64) -> crate::Result<Self> {
        let d = ctx.device();
        ctx.scoped("building the copy kernel", || {
            let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("posattn copy roof"),
                source: wgpu::ShaderSource::Wgsl(COPY_WGSL.into()),
            });
            let pipeline = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("posattn copy roof"),
                layout: None,
                module: &module,
                entry_point: Some("copy"),
                compilation_options: Default::default(),
                cache: None,
            });
            let size = bytes / 16 * 16;
            let mk = || {
                d.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size,
                    usage: wgpu::BufferUsages::STORAGE,
                    mapped_at_creation: false,
                })
            };
            let (src, dst) = (mk(), mk());
            let bind_group = d.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: src.as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: dst.as_entire_binding(),
                    },
                ],
            });
            CopyRoof {
                pipeline,
                src,
                dst,
                bind_group,
                vec4s: (size / 16) as u32,
            }
        })
    }

    /// Bytes the copy moves: read plus written.
    pub fn bytes_moved(&self) -> u64 {
        self.src.size() + self.dst.size()
    }

    /// Records the copy into `encoder`.
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder) {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let groups = self.vec4s.div_ceil(256);
        pass.dispatch_workgroups(groups.min(65535), groups.div_ceil(65535), 1);
    }
}
