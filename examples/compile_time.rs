//! Per-variant cold compile time of the fused kernel, to keep its code shape cheap on the
//! software drivers (llvmpipe compiles a kernel at its first dispatch, and its coroutine
//! splitting grows steeply with the code between barriers). Run with the driver's cache off:
//! `MESA_SHADER_CACHE_DISABLE=true WGPU_BACKEND=vulkan cargo run --release --example compile_time`
//! (or `WGPU_BACKEND=gl` for the GL variant). Each line is plan + compile + one tiny dispatch,
//! as wall time and as the process's CPU time (user + system, all threads; Linux only), which
//! a busy machine disturbs much less.

use std::time::Instant;

use posattn::{
    AttentionSpec, Context, ContextOptions, Extrapolation, PositionEncoding, Rope, T5Bias,
};

fn main() -> posattn::Result<()> {
    let gl = std::env::var("WGPU_BACKEND").is_ok_and(|b| b == "gl");
    let rope = || PositionEncoding::Rope(Rope::new(10000.0));
    let t5 = PositionEncoding::T5(T5Bias {
        num_buckets: 32,
        max_distance: 128,
        bidirectional: true,
        table: vec![0.1; 32],
    });
    // (label, rows per invocation, spec)
    let cases: Vec<(&str, u32, AttentionSpec)> = if gl {
        vec![(
            "d64 rows1 rope",
            1,
            AttentionSpec::default()
                .with_seq_len(4)
                .with_position(rope()),
        )]
    } else {
        vec![
            (
                "d64 rows8 rope",
                8,
                AttentionSpec::default()
                    .with_seq_len(4)
                    .with_position(rope()),
            ),
            (
                "d128 rows4 rope two-branch",
                4,
                AttentionSpec::default()
                    .with_seq_len(4)
                    .with_head_dim(128)
                    .with_position(rope())
                    .with_extrapolation(Extrapolation::ReRope {
                        window: 2,
                        leak: None,
                    }),
            ),
            (
                "d128 rows4 rope",
                4,
                AttentionSpec::default()
                    .with_seq_len(4)
                    .with_head_dim(128)
                    .with_position(rope()),
            ),
            (
                "d256 rows2 t5",
                2,
                AttentionSpec::default()
                    .with_seq_len(4)
                    .with_head_dim(256)
                    .with_position(t5),
            ),
        ]
    };
    let mut ctx = Context::with_options(&ContextOptions::default())?;
    println!("adapter: {}", ctx.describe());
    for (label, rows, spec) in cases {
        ctx.set_rows_per_invocation(Some(rows))?;
        let (q, k, v) = (
            vec![0.1; spec.q_len()],
            vec![0.2; spec.kv_len()],
            vec![0.3; spec.kv_len()],
        );
        let (start, cpu0) = (Instant::now(), cpu_seconds());
        let out = ctx.attention(&spec, &q, &k, &v, None)?;
        assert!(
            out.iter().all(|x| x.is_finite()),
            "{label}: non-finite output"
        );
        println!(
            "{label:<28} {:>7.2} s wall {:>7.2} s cpu",
            start.elapsed().as_secs_f64(),
            cpu_seconds() - cpu0
        );
    }
    Ok(())
}

/// User + system CPU seconds of this process so far (from /proc/self/stat; NaN elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which is in parentheses): utime and stime are 14 and 15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // utime is field 14 overall, i.e. index 11 after the state field (field 3).
    (ticks(11) + ticks(12)) / 100.0
}
