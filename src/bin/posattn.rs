//! `posattn`: check that an adapter computes attention correctly, and see what it has.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use posattn::harness::check::{self, CaseResult, Status};
use posattn::{Context, ContextOptions, Dtype, describe_adapter, enumerate_adapters};

#[derive(Parser)]
#[command(
    name = "posattn",
    version,
    about = "Fused position-aware attention on wgpu"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How the fused kernel forms a tile's scores (`posattn::ScoreTile`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scores {
    /// Each invocation's rows, f32 dot products (the default).
    Rows,
    /// The score tile from f16 operands in plain WGSL: the cooperative-matrix kernel's
    /// arithmetic on any adapter.
    Tile,
    /// The score tile on the adapter's cooperative matrices (opens the device with wgpu's
    /// experimental cooperative-matrix feature; unavailable elsewhere, and reported).
    Coop,
    /// `tile` with P·V formed as a tile product too (f16 weights and V, f32 accumulation).
    TilePv,
    /// `coop` with P·V on the cooperative matrices too.
    CoopPv,
}

/// Opens `adapter` for `scores` and sets the context's score tile (the cooperative-matrix form
/// the adapter offers for `Coop`; an error naming `score_tile` where it offers none), lanes per
/// row and P·V arithmetic (an error naming `accumulation` for f16 without `SHADER_F16`).
fn open_for(
    adapter: &wgpu::Adapter,
    scores: Scores,
    row_lanes: Option<u32>,
    accumulate: posattn::Accumulation,
) -> posattn::Result<Context> {
    let coop = matches!(scores, Scores::Coop | Scores::CoopPv);
    let mut ctx = pollster::block_on(Context::open_async(adapter, coop))?;
    ctx.set_row_lanes(row_lanes)?;
    ctx.set_accumulation(accumulate)?;
    let tile = match scores {
        Scores::Rows => posattn::ScoreTile::Rows,
        Scores::Tile => posattn::ScoreTile::Emulated,
        Scores::Coop => ctx.coop_score_tile().unwrap_or(posattn::ScoreTile::Coop16),
        Scores::TilePv => posattn::ScoreTile::EmulatedPv,
        Scores::CoopPv => ctx
            .coop_score_tile()
            .unwrap_or(posattn::ScoreTile::Coop16)
            .with_pv(),
    };
    ctx.set_score_tile(tile)?;
    Ok(ctx)
}

/// `--accumulate`'s values: `f32` or `f16`.
fn parse_accumulation(text: &str) -> Result<posattn::Accumulation, String> {
    posattn::Accumulation::parse(text).ok_or_else(|| format!("expected f32 or f16, got {text:?}"))
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    All,
    Vulkan,
    Gl,
    Metal,
    Dx12,
}

impl Backend {
    fn backends(self) -> wgpu::Backends {
        match self {
            Backend::All => wgpu::Backends::all(),
            Backend::Vulkan => wgpu::Backends::VULKAN,
            Backend::Gl => wgpu::Backends::GL,
            Backend::Metal => wgpu::Backends::METAL,
            Backend::Dx12 => wgpu::Backends::DX12,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the conformance matrix on every adapter (or the chosen ones) against the f64 CPU
    /// reference and print a pass/fail table per adapter. Exits non-zero on any failure.
    Check(CheckArgs),
    /// One attention on tensors from .npy files ([batch, seq, heads, head_dim]; f32, f16 or f64,
    /// computed in f32), described by a JSON spec; writes the output as .npy.
    Run {
        #[command(flatten)]
        args: RunArgs,
        #[arg(long, value_enum)]
        backend: Option<Backend>,
        #[arg(long)]
        adapter: Option<String>,
    },
    /// A quick side-by-side of the fused kernel and the unfused pipeline on every adapter
    /// (causal, RoPE, 8 heads, head_dim 64 unless `--head-dim`, batch 1): median GPU time of a
    /// few runs, GFLOP/s,
    /// fused/unfused speed and device memory. `cargo bench` is the careful measurement.
    Bench {
        #[arg(long, value_enum)]
        backend: Option<Backend>,
        #[arg(long)]
        adapter: Option<String>,
        /// Sequence lengths.
        #[arg(long, value_delimiter = ',', default_values_t = vec![256u32, 512, 1024])]
        seq: Vec<u32>,
        /// Timed runs per measurement (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Report each measurement's fastest run instead of the median: steadier where other
        /// work shares the machine, whose bursts only ever slow a run down.
        #[arg(long)]
        fastest: bool,
        /// Prefill: head sizes, each a table of its own (decode uses Llama-3-8B's 128).
        #[arg(long, value_delimiter = ',', default_values_t = vec![64u32])]
        head_dim: Vec<u32>,
        /// Decode instead: one new query against a KV cache, Llama-3-8B heads (32 query, 8 KV,
        /// head_dim 128, RoPE), per cache length and batch, with the adapter's copy-kernel
        /// bandwidth as the roof and today's prefill kernel at seq_q = 1 for comparison.
        #[arg(long)]
        decode: bool,
        /// Decode: cache lengths.
        #[arg(long, value_delimiter = ',', default_values_t = vec![512u32, 1024, 2048, 4096, 8192, 16384, 32768])]
        cache: Vec<u32>,
        /// Decode: batch sizes.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1u32, 4])]
        batch: Vec<u32>,
        /// Decode: run the prefill kernel only up to this cache length (it is slow at seq_q = 1).
        #[arg(long, default_value_t = 8192)]
        prefill_max: u32,
        /// Decode: keys stored rotated (only queries rotate).
        #[arg(long)]
        keys_rotated: bool,
        /// Decode: split count instead of the split rule's.
        #[arg(long)]
        splits: Option<u32>,
        /// Decode: read the next keys' rows ahead (`true`) or not (`false`) instead of the
        /// adapter rule's choice (on for CPU adapters).
        #[arg(long)]
        read_ahead: Option<bool>,
        /// Decode: storage dtypes, each run with every tensor (the cache too) in it; f16 in the
        /// adapter's form (native where it has SHADER_F16, else packed).
        #[arg(long, value_delimiter = ',', default_values_t = vec!["f32".to_string(), "f16".to_string(), "bf16".to_string()])]
        dtype: Vec<String>,
        /// Also write the rows as JSON to FILE. Prefill rows: adapter, seq, head_dim, dtype,
        /// form (the dtype table's column), scores, row_lanes, block_q, accumulation,
        /// q_workgroup, fused_gflops,
        /// unfused_gflops (f32 only, else null) and roof_gflops (the best plain WGSL matmul on the
        /// adapter, measured in the same run). Decode rows: batch, cache, dtype, splits,
        /// us_per_token, gbps, roof_gbps (a copy kernel's), prefill_kernel_us.
        #[arg(long, value_name = "FILE")]
        json: Option<std::path::PathBuf>,
        /// Prefill: also time the fused kernel with its scores formed this way (f32 and f16
        /// storage), beside the row form; `coop` opens the device with cooperative matrices
        /// and reports where the adapter has none; the P·V forms (`tile-pv`, `coop-pv`) are
        /// timed beside their score-only forms.
        #[arg(long, value_enum, default_value_t = Scores::Rows)]
        scores: Scores,
        /// Prefill: also time the fused kernel (f32) with these lanes per query row (1, 2, 4 or
        /// 8, comma-separated; the lane-split form, see `check --row-lanes`) beside the
        /// adapter's choice, in the storage-dtype table.
        #[arg(long, value_delimiter = ',')]
        row_lanes: Vec<u32>,
        /// Prefill: also time the fused kernel (f32) with these query rows per workgroup (64,
        /// 128 or 256, comma-separated) beside the adapter's choice (`Context::block_q`), in
        /// the storage-dtype table.
        #[arg(long, value_delimiter = ',')]
        block_q: Vec<u32>,
        /// Also time P·V in this arithmetic (`f16`: f16 weights, V and accumulators, needs
        /// SHADER_F16; `Context::set_accumulation`). Prefill: the fused kernel in f32 and native
        /// f16 storage, beside the f32 forms in the storage-dtype table. Decode: every row
        /// again (lanes column `acc16`).
        #[arg(long, value_delimiter = ',', value_parser = parse_accumulation)]
        accumulate: Vec<posattn::Accumulation>,
        /// Prefill: also time the fused kernel (f32, the adapter's rows and lanes, 64-row query
        /// blocks) with its queries in workgroup memory instead of registers, beside the other
        /// forms (`--block-q 64` is its register twin where the adapter's block is larger).
        #[arg(long)]
        q_workgroup: bool,
        /// Decode: also time the decode kernel with these lanes per key (1, 2, 4, 8 or 16,
        /// comma-separated; `Context::set_decode_lanes`) beside the adapter's choice, one row
        /// each.
        #[arg(long, value_delimiter = ',')]
        lanes: Vec<u32>,
        /// Decode: also time the decode kernel folding these keys per softmax step (2 or 4,
        /// comma-separated; `Context::set_decode_keys_per_step`) beside one key a step, every
        /// row again (lanes column `ks2`, `ks4`).
        #[arg(long, value_delimiter = ',')]
        keys_per_step: Vec<u32>,
    },
    /// Write every kernel variant the crate builds into DIR, one file per variant named by its
    /// key (`<name>.<lang>`): the WGSL wgpu compiles, or naga's translation to SPIR-V, MSL,
    /// HLSL or GLSL ES 3.10. Needs no adapter.
    Shaders {
        #[arg(long, value_name = "DIR")]
        out: std::path::PathBuf,
        #[arg(long, value_enum, default_value_t = Lang::Wgsl)]
        lang: Lang,
        /// Only the variants whose names contain one of these (comma-separated), e.g.
        /// `decode_d128` or `_d64_,_coop16`; matching none is an error.
        #[arg(long, value_delimiter = ',')]
        filter: Vec<String>,
        /// Translating threads (default: the machine's available parallelism).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Time the fused kernel's candidate variants (query rows per invocation) on each adapter at
    /// a representative prefill shape (causal RoPE, 8 heads, batch 1) per head size, check each
    /// candidate against the f64 reference first, and store the fastest in the tuning file
    /// (POSATTN_TUNE_FILE, else the user's cache folder: see `posattn::tune`), which `Context`
    /// reads when it is made.
    Tune {
        #[arg(long, value_enum)]
        backend: Option<Backend>,
        #[arg(long)]
        adapter: Option<String>,
        /// Head sizes to tune.
        #[arg(long, value_delimiter = ',', default_values_t = vec![64u32, 128])]
        head_dim: Vec<u32>,
        /// Sequence length of the timed shape (default: 512 on CPU adapters, 2048 elsewhere).
        #[arg(long)]
        seq: Option<u32>,
        /// Cache length of the timed decode step (default: 2048 on CPU adapters, 8192
        /// elsewhere).
        #[arg(long)]
        cache: Option<u32>,
        /// Timed runs per candidate (the median decides).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// The tuning file (default: POSATTN_TUNE_FILE, else the user's cache folder).
        #[arg(long, value_name = "FILE")]
        file: Option<std::path::PathBuf>,
        /// Decode: time 2 and 4 keys a softmax step (at the best lanes per key and the next
        /// larger count) on a CPU adapter too; GPUs always do.
        #[arg(long)]
        decode_keys: bool,
    },
    /// Draw what a position scheme does into a PNG: its logit against relative distance and
    /// one head's attention weights over a long sequence with and without each extrapolation
    /// method, computed by the f64 reference. Needs no adapter.
    Plot {
        /// One of rope, linear, ntk, dynamic, yarn, longrope, llama3, alibi, xpos, t5, kerple,
        /// sandwich, fire, all.
        #[arg(long)]
        scheme: String,
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
    },
    /// List adapters with the limits and features that matter to this crate.
    Info {
        #[arg(long, value_enum)]
        backend: Option<Backend>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Lang {
    Wgsl,
    Spv,
    Msl,
    Hlsl,
    Glsl,
}

fn shaders(
    out: &std::path::Path,
    lang: Lang,
    filter: &[String],
    threads: Option<usize>,
) -> ExitCode {
    use posattn::kernel::export;
    let lang = match lang {
        Lang::Wgsl => export::Lang::Wgsl,
        Lang::Spv => export::Lang::Spv,
        Lang::Msl => export::Lang::Msl,
        Lang::Hlsl => export::Lang::Hlsl,
        Lang::Glsl => export::Lang::Glsl,
    };
    if threads == Some(0) {
        eprintln!("error: invalid `--threads`: expected at least 1, got 0");
        return ExitCode::from(2);
    }
    let keys = export::matching(&export::all_variants(), filter);
    if keys.is_empty() {
        eprintln!(
            "error: invalid `--filter`: expected part of at least one variant's name (`posattn \
             shaders --out DIR` writes them all), got {}",
            filter.join(",")
        );
        return ExitCode::from(2);
    }
    let threads = threads.unwrap_or_else(export::default_threads);
    match export::write_variants(out, lang, &keys, threads) {
        Ok(paths) => {
            println!(
                "{} variants written to {} as {}",
                paths.len(),
                out.display(),
                lang.extension()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// The adapter choice: flags first, then `WGPU_BACKEND` / `WGPU_ADAPTER_NAME` (read strictly:
/// an unknown backend name is an error naming the variable, even when a flag overrides it).
fn options(backend: Option<Backend>, adapter: Option<String>) -> posattn::Result<ContextOptions> {
    let mut o = ContextOptions::from_env()?;
    if let Some(b) = backend {
        o.backends = b.backends();
    }
    if adapter.is_some() {
        o.adapter_name = adapter;
    }
    Ok(o)
}

fn no_adapter(o: &ContextOptions) -> String {
    format!(
        "no adapter found (backends {:?}, name filter {:?}): {}",
        o.backends,
        o.adapter_name,
        posattn::env::no_adapter_hint(o.backends)
    )
}

fn fmt_err(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.2e}")
    }
}

fn print_row(r: &CaseResult) {
    let (status, note) = match &r.status {
        Status::Pass => ("pass", String::new()),
        Status::Fail(why) => ("FAIL", why.clone()),
        Status::Unsupported(why) => ("unsupported", why.clone()),
    };
    println!(
        "  {:<44} {:<11} {:>9} {:>9} {:>9.1} ms  {}",
        r.name,
        status,
        fmt_err(r.err_gpu),
        fmt_err(r.bound),
        r.time.as_secs_f64() * 1e3,
        note
    );
}

fn status_json(s: &Status) -> (&'static str, Option<&str>) {
    match s {
        Status::Pass => ("pass", None),
        Status::Fail(w) => ("fail", Some(w.as_str())),
        Status::Unsupported(w) => ("unsupported", Some(w.as_str())),
    }
}

fn num_json(x: f64) -> serde_json::Value {
    if x.is_finite() {
        serde_json::json!(x)
    } else {
        serde_json::Value::Null
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let CheckArgs {
        backend,
        adapter,
        quick,
        full,
        filter,
        dtype,
        verbose,
        json,
        scores,
        row_lanes,
        accumulate,
        q_workgroup,
        threads,
    } = args;
    if threads == Some(0) {
        eprintln!("error: invalid `--threads`: expected at least 1, got 0");
        return ExitCode::from(2);
    }
    let threads = threads.unwrap_or_else(check::default_check_threads);
    // Without --full or --dtype, the half dtypes run on the covering subset only.
    let every_dtype = full || dtype.is_some();
    let covered = move |c: &check::Case| {
        every_dtype || c.spec.dtypes == posattn::Dtypes::F32 || c.is_rope_d64()
    };
    let dtypes: Vec<Dtype> = match dtype.as_deref() {
        None => Dtype::ALL.to_vec(),
        Some(text) => match text
            .split(',')
            .map(|t| Dtype::parse("dtype", t.trim()))
            .collect::<posattn::Result<Vec<_>>>()
        {
            Ok(d) if !d.is_empty() => d,
            Ok(_) => unreachable!("split yields at least one term"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    if let Some(l) = row_lanes
        && !posattn::kernel::ROW_LANES_CHOICES.contains(&l)
    {
        eprintln!(
            "error: invalid `--row-lanes`: expected one of {:?}, got {l}",
            posattn::kernel::ROW_LANES_CHOICES
        );
        return ExitCode::from(2);
    }
    let opts = match options(backend, adapter) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut cases = if quick {
        check::quick_cases()
    } else {
        check::conformance_cases()
    };
    if let Some(f) = &filter {
        let selection = match check::Selection::parse(f) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        // A dtype term selects among the dtypes below; the other terms select cases.
        cases.retain(|c| {
            Dtype::ALL
                .iter()
                .any(|&d| selection.matches(&c.clone().with_dtype(d)))
        });
    }
    let selection = filter
        .as_deref()
        .map(|f| check::Selection::parse(f).expect("parsed above"));
    let base_cases = cases;
    let cases = check::in_dtypes(&base_cases, &dtypes);
    let cases: Vec<_> = cases
        .into_iter()
        .filter(|c| covered(c) && selection.as_ref().is_none_or(|s| s.matches(c)))
        .collect();
    // Zero cases would report every adapter as passing.
    if cases.is_empty() {
        eprintln!(
            "error: invalid `filter`: expected terms that match at least one case{}, got {:?}, \
             which matches none",
            if quick { " of the quick subset" } else { "" },
            filter.unwrap_or_default()
        );
        return ExitCode::from(2);
    }
    let adapters = enumerate_adapters(&opts);
    if adapters.is_empty() {
        eprintln!("{}", no_adapter(&opts));
        return ExitCode::from(2);
    }
    println!("adapters found:");
    for a in &adapters {
        println!("  {}", describe_adapter(&a.get_info()));
    }
    let mut summary = Vec::new();
    let mut report = Vec::new();
    for adapter in adapters {
        let name = describe_adapter(&adapter.get_info());
        println!("\n{name}");
        let ctx = match open_for(&adapter, scores, row_lanes, accumulate).map(|mut c| {
            c.set_q_in_workgroup(q_workgroup.then_some(true));
            c
        }) {
            Ok(c) => c,
            Err(e) => {
                // An adapter without cooperative matrices is declared unsupported for that
                // form, not failed.
                let unsupported = matches!(e, posattn::Error::Unavailable { .. });
                println!(
                    "  {}: {e}",
                    if unsupported {
                        "unsupported in the requested form"
                    } else {
                        "could not open the device"
                    }
                );
                report.push(
                    serde_json::json!({"adapter": name, "error": e.to_string(), "cases": []}),
                );
                if unsupported {
                    summary.push((name, 0, 0, cases.len()));
                } else {
                    summary.push((name, 0, 1, 0));
                }
                continue;
            }
        };
        println!(
            "  {:<44} {:<11} {:>9} {:>9} {:>12}",
            "case", "result", "error", "bound", "time"
        );
        let bar = if std::io::stderr().is_terminal() {
            indicatif::ProgressBar::new(cases.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("  {bar:30} {pos}/{len} {msg}")
                .expect("progress template"),
        );
        // Both f16 forms where the adapter has native f16.
        let cases: Vec<_> = check::dtype_matrix(&base_cases, &dtypes, &ctx)
            .into_iter()
            .filter(|c| covered(c) && selection.as_ref().is_none_or(|s| s.matches(c)))
            .collect();
        bar.set_length(cases.len() as u64);
        let started = std::time::Instant::now();
        // On llvmpipe each kernel variant compiles on a device of its own, from a new instance
        // (`check::isolates_kernels`): there, every compile slows the next ones on a device.
        let info = ctx.adapter_info().clone();
        let reopen = || {
            let mut c = open_for(
                &check::reopen_adapter(&info)?,
                scores,
                row_lanes,
                accumulate,
            )?;
            c.set_q_in_workgroup(q_workgroup.then_some(true));
            Ok(c)
        };
        let run = check::run_cases_isolated(&ctx, &cases, threads, reopen, |r| {
            bar.inc(1);
            bar.set_message(r.name.clone());
            if verbose || !matches!(r.status, Status::Pass) {
                bar.suspend(|| print_row(r));
            }
        });
        let results = run.results;
        bar.finish_and_clear();
        let pass = results.iter().filter(|r| r.status == Status::Pass).count();
        let fail = results
            .iter()
            .filter(|r| matches!(r.status, Status::Fail(_)))
            .count();
        let unsup = results.len() - pass - fail;
        let worst = results
            .iter()
            .filter(|r| r.bound > 0.0)
            .map(|r| r.err_gpu / r.bound)
            .fold(0.0f64, f64::max);
        println!(
            "  {pass} passed, {fail} failed, {unsup} unsupported; worst error/bound {worst:.3}"
        );
        // Where the time went: the driver compiling kernels, and the rest (inputs, the f64
        // reference, dispatches and readback).
        let total = started.elapsed().as_secs_f64();
        let (kernels, compile) = (run.kernels, run.compile.as_secs_f64());
        // The first case of each kernel: a driver that compiles at the first dispatch rather
        // than at pipeline creation (llvmpipe) spends its compile time there.
        let mut seen = std::collections::HashSet::new();
        let first: f64 = cases
            .iter()
            .zip(&results)
            .filter(|(c, r)| {
                !matches!(r.status, Status::Unsupported(_))
                    && check::case_kernel(
                        c,
                        |d| ctx.rows_per_invocation(d),
                        c.half_form.unwrap_or(ctx.half_form()),
                    )
                    .is_ok_and(|k| seen.insert(k))
            })
            .map(|(_, r)| r.time.as_secs_f64())
            .sum();
        let first_more = (first - compile).max(0.0);
        // Several devices at once (`run.threads`): the parts are thread time, summed.
        if run.threads > 1 {
            let cases_time: f64 = results.iter().map(|r| r.time.as_secs_f64()).sum();
            println!(
                "  {total:.1} s on {} threads, whose time went to: {compile:.1} s creating \
                 {kernels} pipelines, {first_more:.1} s more in the first case of each kernel \
                 (where a driver that compiles at the first dispatch, as llvmpipe does, \
                 compiles), {:.1} s in the other cases (the references not counted)",
                run.threads,
                (cases_time - first).max(0.0)
            );
        } else {
            println!(
                "  {total:.1} s: {compile:.1} s creating {kernels} pipelines, {first_more:.1} s \
                 more in the first case of each kernel (where a driver that compiles at the \
                 first dispatch, as llvmpipe does, compiles), {:.1} s in the other cases and \
                 the references",
                (total - compile - first_more).max(0.0)
            );
        }
        let uncaptured = run.uncaptured;
        for e in &uncaptured {
            println!("  uncaptured wgpu error: {e}");
        }
        report.push(serde_json::json!({
            "adapter": name,
            "backend": format!("{:?}", ctx.adapter_info().backend),
            "device_type": format!("{:?}", ctx.adapter_info().device_type),
            "driver": ctx.adapter_info().driver,
            "seconds": total,
            "compile_seconds": compile,
            "first_case_extra_seconds": first_more,
            "kernels_compiled": kernels,
            "uncaptured_errors": uncaptured,
            "cases": results.iter().map(|r| {
                let (status, detail) = status_json(&r.status);
                serde_json::json!({
                    "name": r.name,
                    "status": status,
                    "detail": detail,
                    "err_gpu": num_json(r.err_gpu),
                    "err_f32": num_json(r.err_f32),
                    "bound": num_json(r.bound),
                    "time_ms": r.time.as_secs_f64() * 1e3,
                })
            }).collect::<Vec<_>>(),
        }));
        summary.push((name, pass, fail, unsup));
    }
    println!(
        "\n{:<72} {:>6} {:>6} {:>11}",
        "adapter", "passed", "failed", "unsupported"
    );
    for (name, p, f, u) in &summary {
        println!("{name:<72} {p:>6} {f:>6} {u:>11}");
    }
    if let Some(path) = json {
        let doc = serde_json::json!({
            "posattn": env!("CARGO_PKG_VERSION"),
            "tolerance": {"multiple_of_f32_error": check::ERR_MULTIPLE, "floor": check::ERR_FLOOR},
            "adapters": report,
        });
        let text = serde_json::to_string_pretty(&doc).expect("report");
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("could not write {}: {e}", path.display());
            return ExitCode::from(2);
        }
        println!("report written to {}", path.display());
    }
    if summary.iter().any(|s| s.2 > 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `posattn check`'s options.
#[derive(clap::Args)]
struct CheckArgs {
    /// Backend to check (default: WGPU_BACKEND if set, else all).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// Only adapters whose name contains this (case-insensitive).
    #[arg(long)]
    adapter: Option<String>,
    /// A short subset of the matrix.
    #[arg(long)]
    quick: bool,
    /// The whole cross product: every case in every dtype. Without it (and without
    /// `--dtype`), every case runs in f32 and the half dtypes run on the RoPE head_dim-64
    /// cases, which cover the storage paths without compiling every variant three times.
    #[arg(long, conflicts_with = "quick")]
    full: bool,
    /// Only the cases with these attributes: comma-separated KEY=VALUE terms, keys group,
    /// encoding, mask, kv, head_dim, name (e.g. `group=relative_bias,mask=causal`).
    #[arg(long)]
    filter: Option<String>,
    /// Storage dtypes to run every case in: f32, f16, bf16, comma-separated (default: f32
    /// for every case, the half dtypes on the covering subset; see `--full`). On adapters
    /// with native f16, f16 runs both natively and packed.
    #[arg(long)]
    dtype: Option<String>,
    /// Print every case, not only the failures and a summary.
    #[arg(long, short)]
    verbose: bool,
    /// Also write a machine-readable report (adapters, cases, errors, times) to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
    /// How the fused kernel forms its scores: every case runs in that form (two-branch
    /// methods, which only the row form runs, are reported unsupported).
    #[arg(long, value_enum, default_value_t = Scores::Rows)]
    scores: Scores,
    /// Lanes that share each query row of the fused kernel (1, 2, 4 or 8; the lane-split
    /// form, reduced by subgroup operations where the device has them, else through
    /// workgroup memory) instead of the adapter's choice. Two-branch methods and the
    /// score-tile forms keep one lane.
    #[arg(long)]
    row_lanes: Option<u32>,
    /// The arithmetic of the fused kernel's P·V: `f32` (the default), or `f16` (f16
    /// weights, V and accumulators; needs SHADER_F16, reported unsupported elsewhere). Every
    /// case runs in it, bounded by the plain implementation that accumulates in f16 too.
    #[arg(long, default_value = "f32", value_parser = parse_accumulation)]
    accumulate: posattn::Accumulation,
    /// Keep the fused kernel's queries in workgroup memory instead of registers (the form
    /// that frees their registers on GPUs; two-branch methods keep registers). Cases whose
    /// workgroup would exceed the device's workgroup memory are reported unsupported.
    #[arg(long)]
    q_workgroup: bool,
    /// Kernel variants run at once on a CPU adapter (llvmpipe compiles each on one core,
    /// at its first dispatch, on a device of its own): at least 1; default the machine's
    /// available parallelism, at most 4. GPUs run every case on one device.
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long)]
    q: std::path::PathBuf,
    #[arg(long)]
    k: std::path::PathBuf,
    #[arg(long)]
    v: std::path::PathBuf,
    /// Query positions, [batch, seq_q] or [seq_q], int32 or int64 (default: bottom-right).
    #[arg(long)]
    positions_q: Option<std::path::PathBuf>,
    /// Key positions, [batch, seq_k] or [seq_k] (default: 0..seq_k).
    #[arg(long)]
    positions_k: Option<std::path::PathBuf>,
    /// An additive bias, [batch or 1, heads or 1, seq_q, seq_k], f32/f16/f64; −inf hides a key.
    #[arg(long)]
    bias: Option<std::path::PathBuf>,
    /// The run spec (JSON; see the README).
    #[arg(long)]
    spec: std::path::PathBuf,
    /// Where to write the output .npy.
    #[arg(long)]
    out: std::path::PathBuf,
    /// The output's dtype, f32 or f16 (default: q's when q is f32 or f16, else f32). f32 and f16
    /// inputs are uploaded as stored (f64 and integer inputs as f32); compute is f32.
    #[arg(long)]
    out_dtype: Option<String>,
    /// A reference output (e.g. from PyTorch) to compare against: exit 1, naming the element,
    /// unless NaN sits in the same places and both posattn and the reference pass the tolerance
    /// rule against the f64 CPU reference.
    #[arg(long)]
    compare: Option<std::path::PathBuf>,
}

/// Refuses an `--out` that names one of the inputs (it would be overwritten before, or while, it
/// is read).
fn check_out_alias(a: &RunArgs) -> posattn::Result<()> {
    let inputs: [(&str, Option<&std::path::PathBuf>); 8] = [
        ("--q", Some(&a.q)),
        ("--k", Some(&a.k)),
        ("--v", Some(&a.v)),
        ("--positions-q", a.positions_q.as_ref()),
        ("--positions-k", a.positions_k.as_ref()),
        ("--bias", a.bias.as_ref()),
        ("--spec", Some(&a.spec)),
        ("--compare", a.compare.as_ref()),
    ];
    for (flag, path) in inputs {
        if let Some(p) = path
            && same_file(&a.out, p)
        {
            return Err(posattn::Error::invalid(
                "out",
                "a path that is none of the inputs",
                format!("{}, the same file as {flag}", a.out.display()),
            ));
        }
    }
    Ok(())
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// A tensor's four dimensions, each at least 1 and below 2^32, named after its flag.
fn dims4(field: &'static str, shape: &[u64]) -> posattn::Result<[u32; 4]> {
    let mut out = [0u32; 4];
    for (o, &x) in out.iter_mut().zip(shape) {
        *o = u32::try_from(x).ok().filter(|&x| x > 0).ok_or_else(|| {
            posattn::Error::invalid(
                field,
                "dimensions [batch, seq, heads, head_dim] each in 1..2^32",
                format!("{shape:?}"),
            )
        })?;
    }
    Ok(out)
}

fn run(a: RunArgs, backend: Option<Backend>, adapter: Option<String>) -> posattn::Result<bool> {
    use posattn::files::{
        parse_npy, parse_positions, parse_spec, read_config, read_limited, write_npy_bytes,
    };
    // Every input is read and checked before anything runs or is written.
    check_out_alias(&a)?;
    let q = parse_npy("q", &read_limited("q", &a.q)?, Some(4))?;
    let k = parse_npy("k", &read_limited("k", &a.k)?, Some(4))?;
    let v = parse_npy("v", &read_limited("v", &a.v)?, Some(4))?;
    let [b, sq, h, d] = dims4("q", &q.shape)?;
    let [kb, sk, hkv, kd] = dims4("k", &k.shape)?;
    if kb != b || kd != d {
        return Err(posattn::Error::invalid(
            "k",
            format!("shape [{b}, seq_k, kv_heads, {d}] to match q"),
            format!("{:?}", k.shape),
        ));
    }
    if v.shape != k.shape {
        return Err(posattn::Error::invalid(
            "v",
            format!("the shape of k, {:?}", k.shape),
            format!("{:?}", v.shape),
        ));
    }
    let probe = posattn::AttentionSpec::default()
        .with_batch(b)
        .with_seq_q(sq)
        .with_seq_k(sk)
        .with_heads(h)
        .with_head_dim(d)
        .with_kv_heads(hkv);
    let (dq, dk) = probe.default_positions();
    let positions =
        |field, path: &Option<std::path::PathBuf>, seq: u32, default: Vec<i32>| match path {
            Some(p) => parse_positions(field, &read_limited(field, p)?, b as u64, seq as u64),
            None => Ok(default),
        };
    let pq = positions("positions_q", &a.positions_q, sq, dq)?;
    let pk = positions("positions_k", &a.positions_k, sk, dk)?;
    let max_pos = pq.iter().chain(&pk).copied().max().unwrap_or(0) as i64;
    let text = String::from_utf8(read_config("spec", &a.spec)?)
        .map_err(|_| posattn::Error::invalid("spec", "UTF-8 JSON", "bytes that are not UTF-8"))?;
    let dir = a.spec.parent().unwrap_or(std::path::Path::new("."));
    let mut spec = parse_spec(&text, [b, sq, sk, h, hkv, d], dir, max_pos)?;
    let bias = match &a.bias {
        Some(p) => {
            let t = parse_npy("bias", &read_limited("bias", p)?, Some(4))?;
            let s = &t.shape;
            let fits = |dim: u64, full: u32| dim == 1 || dim == full as u64;
            if !(fits(s[0], b) && fits(s[1], h) && s[2] == sq as u64 && s[3] == sk as u64) {
                return Err(posattn::Error::invalid(
                    "bias",
                    format!("shape [{b} or 1, {h} or 1, {sq}, {sk}]"),
                    format!("{s:?}"),
                ));
            }
            spec.bias = Some(posattn::BiasLayout {
                broadcast_batch: s[0] == 1,
                broadcast_heads: s[1] == 1,
            });
            Some(t.data)
        }
        None => None,
    };
    let reference = match &a.compare {
        Some(_) if matches!(spec.position, posattn::PositionEncoding::Custom(_)) => {
            // The CPU reference runs a custom scheme through its Rust twins, which a spec file
            // cannot carry: say so rather than compare against a reference without the hooks.
            return Err(posattn::Error::invalid(
                "compare",
                "a built-in position encoding (the CPU reference runs a custom scheme only \
                 through Rust twins: see examples/custom_scheme.rs)",
                "position.type custom",
            ));
        }
        Some(p) => {
            let r = parse_npy("compare", &read_limited("compare", p)?, Some(4))?;
            if r.shape != q.shape {
                return Err(posattn::Error::invalid(
                    "compare",
                    format!("the output's shape {:?}", q.shape),
                    format!("{:?}", r.shape),
                ));
            }
            Some(r)
        }
        None => None,
    };
    let ((q_dt, q_bytes), (k_dt, k_bytes), (v_dt, v_bytes)) =
        (q.storage(), k.storage(), v.storage());
    let out_dtype = match &a.out_dtype {
        Some(t) => posattn::Dtype::parse("out_dtype", t)?,
        None => q_dt,
    };
    if out_dtype == posattn::Dtype::Bf16 {
        return Err(posattn::Error::invalid(
            "out_dtype",
            "f32 or f16 (numpy has no bf16 dtype)",
            "bf16",
        ));
    }
    spec.dtypes = posattn::Dtypes {
        q: q_dt,
        k: k_dt,
        v: v_dt,
        out: out_dtype,
    };
    let ctx = Context::with_options(&options(backend, adapter)?)?;
    eprintln!(
        "running on {} (storage {})",
        ctx.describe(),
        spec.dtypes.name()
    );
    let plan = posattn::Attention::new(&ctx, &spec)?;
    let out_bytes = plan.run_bytes(
        &ctx,
        &q_bytes,
        &k_bytes,
        &v_bytes,
        Some(&pq),
        Some(&pk),
        bias.as_deref(),
    )?;
    write_npy_bytes(&a.out, &q.shape, out_dtype, &out_bytes)?;
    let out = out_dtype.decode("out", &out_bytes)?;
    println!("wrote {} ({:?})", a.out.display(), q.shape);
    let Some(reference) = reference else {
        return Ok(true);
    };
    let r64 = posattn::harness::reference::attention_with_bias::<f64>(
        &spec,
        &q.data,
        &k.data,
        &v.data,
        &pq,
        &pk,
        bias.as_deref(),
    );
    let mut r32 = posattn::harness::reference::attention_with_bias::<f32>(
        &spec,
        &q.data,
        &k.data,
        &v.data,
        &pq,
        &pk,
        bias.as_deref(),
    );
    // The plain implementation stores its output in the output's dtype too (check's rule).
    r32.iter_mut().for_each(|x| *x = out_dtype.round(*x));
    let failures = compare_with_reference(&q.shape, &out, &reference.data, &r64, &r32);
    if failures.is_empty() {
        println!("posattn and the given reference agree within the tolerance rule");
        Ok(true)
    } else {
        for f in &failures {
            println!("DISAGREE: {f}");
        }
        Ok(false)
    }
}

/// `run --compare`: posattn's output against a given reference (from PyTorch, say). Three
/// things must hold, and each failure names an element:
/// - NaN in the same places in posattn's output, the given reference and the f64 reference;
/// - posattn within the tolerance rule against the f64 reference (`check::compare`, with this
///   crate's plain f32 CPU reference as the f32 implementation the rule is relative to);
/// - the given reference within the same rule: it is an implementation in f32 (or better)
///   too, and one that is further from the f64 truth does not agree with posattn whatever
///   posattn's own error. Then `|posattn − reference|` is at most the sum of the two errors.
fn compare_with_reference(
    shape: &[u64],
    ours: &[f32],
    theirs: &[f32],
    r64: &[f64],
    r32: &[f32],
) -> Vec<String> {
    let at = |i: usize| {
        let mut idx = vec![0u64; shape.len()];
        let mut rest = i as u64;
        for (slot, &dim) in idx.iter_mut().zip(shape).rev() {
            *slot = rest % dim.max(1);
            rest /= dim.max(1);
        }
        format!("element {idx:?}")
    };
    let mut failures = Vec::new();
    for (who, xs) in [("posattn", ours), ("the given reference", theirs)] {
        if let Some(i) = (0..r64.len()).find(|&i| xs[i].is_nan() != r64[i].is_nan()) {
            failures.push(format!(
                "{}: {who} {} where the f64 reference is {} (NaN placement must match exactly)",
                at(i),
                xs[i],
                r64[i]
            ));
        }
    }
    let worst = |xs: &[f32]| -> (usize, f64) {
        (0..r64.len())
            .filter(|&i| !r64[i].is_nan() && !xs[i].is_nan())
            .map(|i| (i, (xs[i] as f64 - r64[i]).abs()))
            .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a })
    };
    let (_, err_ours, err_f32, bound) = check::compare(ours, r64, r32);
    let (_, err_theirs, _, _) = check::compare(theirs, r64, r32);
    let (direct_at, direct) = (0..r64.len())
        .filter(|&i| !ours[i].is_nan() && !theirs[i].is_nan())
        .map(|i| (i, (ours[i] as f64 - theirs[i] as f64).abs()))
        .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
    println!(
        "max |posattn − reference| = {direct:.3e} at {}",
        at(direct_at)
    );
    println!(
        "against the f64 CPU reference: posattn {err_ours:.3e}, given reference {err_theirs:.3e}, \
         each allowed {bound:.3e} ({}× the plain f32 CPU error {err_f32:.3e} + {:e} relative)",
        check::ERR_MULTIPLE,
        check::ERR_FLOOR
    );
    for (who, xs, err) in [
        ("posattn", ours, err_ours),
        ("the given reference", theirs, err_theirs),
    ] {
        if err > bound {
            let (i, _) = worst(xs);
            failures.push(format!(
                "{who} differs from the f64 reference by {err:.3e} > {bound:.3e} at {} ({} vs {})",
                at(i),
                xs[i],
                r64[i]
            ));
        }
    }
    if direct > 2.0 * bound {
        failures.push(format!(
            "posattn and the given reference differ by {direct:.3e} > {:.3e} (both errors \
             allowed) at {}: {} vs {}",
            2.0 * bound,
            at(direct_at),
            ours[direct_at],
            theirs[direct_at]
        ));
    }
    failures
}

struct DecodeBench {
    caches: Vec<u32>,
    batches: Vec<u32>,
    dtypes: Vec<Dtype>,
    runs: usize,
    prefill_max: u32,
    keys_rotated: bool,
    splits: Option<u32>,
    read_ahead: Option<bool>,
    /// Forced lanes per key, each timed beside the adapter's choice.
    lanes: Vec<u32>,
    /// P·V arithmetic: every row again in each of these beyond f32.
    accumulate: Vec<posattn::Accumulation>,
    /// Keys per softmax step: every row again in each of these beyond 1.
    keys_per_step: Vec<u32>,
}

/// The statistic `bench` reports (`--fastest`), set once before it measures.
static FASTEST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn statistic() -> posattn::harness::timing::Statistic {
    use posattn::harness::timing::Statistic;
    if FASTEST.load(std::sync::atomic::Ordering::Relaxed) {
        Statistic::Fastest
    } else {
        Statistic::Median
    }
}

/// The reported duration of a measurement's runs (see [`statistic`]).
fn pick(t: &[std::time::Duration]) -> std::time::Duration {
    statistic().of(t)
}

/// `posattn bench --decode`: a table per adapter, one row per batch and cache length.
fn bench_decode(
    backend: Option<Backend>,
    adapter: Option<String>,
    cfg: &DecodeBench,
    json_path: Option<&std::path::Path>,
) -> posattn::Result<()> {
    let (caches, batches, runs, prefill_max) =
        (&cfg.caches, &cfg.batches, cfg.runs, cfg.prefill_max);
    use posattn::harness::decode::{CopyRoof, DecodeSetup, bench_spec};
    use posattn::harness::timing::time_encoded;
    let opts = options(backend, adapter)?;
    let adapters = enumerate_adapters(&opts);
    if adapters.is_empty() {
        return Err(posattn::Error::NoAdapter(no_adapter(&opts)));
    }
    for &l in &cfg.lanes {
        if !posattn::kernel::DECODE_LANES_CHOICES.contains(&l) {
            return Err(posattn::Error::invalid(
                "lanes",
                format!("one of {:?}", posattn::kernel::DECODE_LANES_CHOICES),
                l,
            ));
        }
    }
    for &k in &cfg.keys_per_step {
        if !posattn::kernel::DECODE_KEYS_PER_STEP_CHOICES.contains(&k) {
            return Err(posattn::Error::invalid(
                "keys_per_step",
                format!("one of {:?}", posattn::kernel::DECODE_KEYS_PER_STEP_CHOICES),
                k,
            ));
        }
    }
    let key_runs: Vec<u32> = std::iter::once(1)
        .chain(cfg.keys_per_step.iter().copied().filter(|&k| k != 1))
        .collect();
    // The adapter's choice, then each forced count; each in f32 arithmetic, then in the other
    // arithmetic asked for; each at one key a step, then at the other counts asked for.
    let lane_runs: Vec<Option<u32>> = std::iter::once(None)
        .chain(cfg.lanes.iter().map(|&l| Some(l)))
        .collect();
    let acc_runs: Vec<posattn::Accumulation> = std::iter::once(posattn::Accumulation::F32)
        .chain(
            cfg.accumulate
                .iter()
                .copied()
                .filter(|&a| a != posattn::Accumulation::F32),
        )
        .collect();
    let mut rows = Vec::new();
    for a in adapters {
        let mut ctx = Context::from_adapter(&a)?;
        println!("\n{}", ctx.describe());
        // The roof: a plain copy of 64 MiB, timed like the kernels.
        let roof = CopyRoof::new(&ctx, 64 << 20)?;
        let _ = time_encoded(&ctx, 1, |e| {
            roof.encode(e);
            Ok(())
        })?;
        let (clock, t) = time_encoded(&ctx, runs, |e| {
            roof.encode(e);
            Ok(())
        })?;
        let roof_gbps = roof.bytes_moved() as f64 / pick(&t).as_secs_f64() / 1e9;
        println!(
            "  copy roof {roof_gbps:.2} GB/s (read + write), {clock}, {} of {runs} runs",
            statistic()
        );
        println!(
            "  {:>5} {:>6} {:>5} {:>6} {:>13} {:>12} {:>8} {:>7} {:>14} {:>8}",
            "batch",
            "cache",
            "dtype",
            "splits",
            "lanes",
            "us/token",
            "GB/s",
            "% roof",
            "prefill us",
            "speedup"
        );
        for &batch in batches.iter() {
            for &cache in caches.iter() {
                let (acc_runs, key_runs) = (&acc_runs, &key_runs);
                let combos = cfg.dtypes.iter().flat_map(|d| {
                    lane_runs.iter().flat_map(move |l| {
                        acc_runs
                            .iter()
                            .flat_map(move |a| key_runs.iter().map(move |k| (d, l, a, k)))
                    })
                });
                for (&dt, &forced, &acc, &keys) in combos {
                    ctx.set_decode_lanes(forced)?;
                    ctx.set_decode_keys_per_step(Some(keys))?;
                    if let Err(e) = ctx.set_accumulation(acc) {
                        println!("  {batch:>5} {cache:>6} {:>5} unavailable: {e}", dt.name());
                        continue;
                    }
                    let mut spec = bench_spec(batch, cache);
                    spec.attention.dtypes = posattn::Dtypes::all(dt);
                    spec.keys_rotated = cfg.keys_rotated;
                    spec.splits = cfg.splits;
                    spec.read_ahead = cfg.read_ahead;
                    let dname = dt.name();
                    let plan = match posattn::DecodePlan::new(&ctx, &spec) {
                        Ok(p) => p,
                        Err(e @ posattn::Error::Unavailable { .. }) => {
                            println!("  {batch:>5} {cache:>6} {dname:>5} unavailable: {e}");
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    let setup = DecodeSetup::new(&ctx, &spec)?;
                    let bufs = setup.buffers();
                    let _ = time_encoded(&ctx, 1, |e| plan.encode(&ctx, e, &bufs))?;
                    let (_, t) = time_encoded(&ctx, runs, |e| plan.encode(&ctx, e, &bufs))?;
                    let s = pick(&t).as_secs_f64();
                    // Per token per layer: the step serves `batch` tokens.
                    let us = s * 1e6 / batch as f64;
                    let kv_bytes = 2.0 * spec.cache_len() as f64 * dt.size() as f64;
                    let gbps = kv_bytes / s / 1e9;
                    // The prefill kernel at seq_q = 1 on the same buffers, in f32 (it is slow
                    // there), beside the adapter's own lanes only.
                    let prefill_us = if cache <= prefill_max
                        && dt == Dtype::F32
                        && forced.is_none()
                        && keys == 1
                        && acc == posattn::Accumulation::F32
                    {
                        let p = posattn::Attention::new(&ctx, &spec.attention)?;
                        let pb = setup.prefill_buffers();
                        let _ = time_encoded(&ctx, 1, |e| p.encode(&ctx, e, &pb))?;
                        let (_, t) = time_encoded(&ctx, runs.min(2), |e| p.encode(&ctx, e, &pb))?;
                        Some(pick(&t).as_secs_f64() * 1e6 / batch as f64)
                    } else {
                        None
                    };
                    let k = plan.kernel();
                    let lanes = format!(
                        "{}{}{}{}",
                        k.lanes,
                        match k.lane_reduce {
                            posattn::kernel::LaneReduce::Workgroup if k.lanes > 1 => " wg",
                            posattn::kernel::LaneReduce::Add => " add",
                            posattn::kernel::LaneReduce::Shuffle => " xor",
                            posattn::kernel::LaneReduce::Workgroup => "",
                        },
                        if k.half_acc { " acc16" } else { "" },
                        if k.keys_per_step > 1 {
                            format!(" ks{}", k.keys_per_step)
                        } else {
                            String::new()
                        }
                    );
                    println!(
                        "  {batch:>5} {cache:>6} {dname:>5} {:>6} {lanes:>13} {us:>12.1} {gbps:>8.2} {:>6.1}% {:>14} {:>8}",
                        plan.splits(),
                        100.0 * gbps / roof_gbps,
                        prefill_us.map_or("-".into(), |p| format!("{p:.1}")),
                        prefill_us.map_or("-".into(), |p| format!("{:.1}x", p / us)),
                    );
                    rows.push(serde_json::json!({
                        "adapter": ctx.describe(),
                        "clock": clock.to_string(),
                        "batch": batch,
                        "cache": cache,
                        "dtype": dname,
                        "keys_rotated": cfg.keys_rotated,
                        "splits": plan.splits(),
                        "read_ahead": k.read_ahead,
                        "lanes": k.lanes,
                        "lane_reduce": format!("{:?}", k.lane_reduce),
                        "lanes_source": ctx.decode_lanes_source(spec.attention.head_dim),
                        "accumulation": acc.name(),
                        "keys_per_step": k.keys_per_step,
                        "us_per_token": us,
                        "gbps": gbps,
                        "roof_gbps": roof_gbps,
                        "prefill_kernel_us": prefill_us,
                    }));
                }
            }
        }
        ctx.set_decode_lanes(None)?;
        ctx.set_decode_keys_per_step(None)?;
        ctx.set_accumulation(posattn::Accumulation::F32)?;
    }
    if let Some(path) = json_path {
        write_json(path, &rows)?;
    }
    Ok(())
}

/// Writes benchmark rows as a JSON array.
fn write_json(path: &std::path::Path, rows: &[serde_json::Value]) -> posattn::Result<()> {
    let text = serde_json::to_string_pretty(rows)
        .map_err(|e| posattn::Error::invalid("json", "serialisable rows", e))?;
    std::fs::write(path, text).map_err(|e| {
        posattn::Error::invalid(
            "json",
            "a writable file",
            format!("{}: {e}", path.display()),
        )
    })
}

/// Seeded random f32 Q, K, V and O buffers for `spec` (storage only: for timing).
/// The shape `bench` and `tune` time: causal RoPE (theta 10000, half layout), batch 1, 8 heads.
fn prefill_bench_spec(seq: u32, head_dim: u32) -> posattn::AttentionSpec {
    posattn::AttentionSpec::default()
        .with_seq_len(seq)
        .with_heads(8)
        .with_head_dim(head_dim)
        .with_position(posattn::PositionEncoding::Rope(posattn::Rope::new(10000.0)))
}

fn random_qkvo(
    ctx: &Context,
    spec: &posattn::AttentionSpec,
    seed: u64,
) -> (wgpu::Buffer, wgpu::Buffer, wgpu::Buffer, wgpu::Buffer) {
    use wgpu::util::DeviceExt;
    let mut rng = check::SplitMix::new(seed);
    let mut mk = |len: usize| {
        ctx.device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(&rng.vec(len, 1.0)),
                usage: wgpu::BufferUsages::STORAGE,
            })
    };
    (
        mk(spec.q_len()),
        mk(spec.kv_len()),
        mk(spec.kv_len()),
        mk(spec.q_len()),
    )
}

#[allow(clippy::too_many_arguments)]
fn bench(
    backend: Option<Backend>,
    adapter: Option<String>,
    seqs: &[u32],
    head_dims: &[u32],
    runs: usize,
    json_path: Option<&std::path::Path>,
    scores: Scores,
    row_lanes: &[u32],
    blocks: &[u32],
    accumulate: &[posattn::Accumulation],
    q_workgroup: bool,
) -> posattn::Result<()> {
    if let Some(&b) = blocks
        .iter()
        .find(|b| !posattn::kernel::BLOCK_Q_CHOICES.contains(b))
    {
        return Err(posattn::Error::invalid(
            "block_q",
            format!("each one of {:?}", posattn::kernel::BLOCK_Q_CHOICES),
            b,
        ));
    }
    if let Some(&l) = row_lanes
        .iter()
        .find(|l| !posattn::kernel::ROW_LANES_CHOICES.contains(l))
    {
        return Err(posattn::Error::invalid(
            "row_lanes",
            format!("each one of {:?}", posattn::kernel::ROW_LANES_CHOICES),
            l,
        ));
    }
    if head_dims.is_empty() || seqs.is_empty() {
        return Err(posattn::Error::invalid(
            if seqs.is_empty() { "seq" } else { "head_dim" },
            "at least one value",
            "none",
        ));
    }
    // Checked before any adapter opens, so that a typo costs no roof measurement.
    let supported = posattn::spec::SUPPORTED_HEAD_DIMS;
    if let Some(&d) = head_dims.iter().find(|d| !supported.contains(d)) {
        return Err(posattn::Error::invalid(
            "head_dim",
            format!("one of {supported:?}"),
            d,
        ));
    }
    use posattn::harness::roof::MatmulRoof;
    use posattn::harness::timing::time_encoded;
    let opts = options(backend, adapter)?;
    let adapters = enumerate_adapters(&opts);
    if adapters.is_empty() {
        return Err(posattn::Error::NoAdapter(no_adapter(&opts)));
    }
    let mut rows = Vec::new();
    for a in adapters {
        // The score tile asked for, if this adapter runs it; the main table is the row form.
        let (mut ctx, tile) = match open_for(&a, scores, None, posattn::Accumulation::F32) {
            Ok(mut c) => {
                let t = c.score_tile();
                c.set_score_tile(posattn::ScoreTile::Rows)?;
                (c, (t != posattn::ScoreTile::Rows).then_some(t))
            }
            Err(e @ posattn::Error::Unavailable { .. }) => {
                println!("\n  score tile unavailable on this adapter: {e}");
                (Context::from_adapter(&a)?, None)
            }
            Err(e) => return Err(e),
        };
        println!("\n{}", ctx.describe());
        // The roof: the best plain WGSL matmul on this adapter, checked, then timed.
        let roof = posattn::harness::roof::MatmulRoof::new(&ctx, MatmulRoof::default_side(&ctx))?;
        roof.verify(&ctx)?;
        let tiles = roof.measure_by(&ctx, runs, statistic())?;
        let roof_gflops = tiles.iter().map(|t| t.1).fold(0.0, f64::max);
        let each: Vec<String> = tiles.iter().map(|(t, g)| format!("{t} {g:.1}")).collect();
        println!(
            "  matmul roof {roof_gflops:.1} GFLOP/s (f32, n = {}: {}); times: {} of {runs} runs",
            roof.n(),
            each.join(", "),
            statistic()
        );
        for &head_dim in head_dims {
            println!("\n  head_dim {head_dim}");
            println!(
                "  {:>6} {:>11} {:>9} {:>6} {:>11} {:>9} {:>7} {:>10} {:>12}",
                "seq",
                "fused ms",
                "GFLOP/s",
                "/roof",
                "unfused ms",
                "GFLOP/s",
                "speed",
                "fused MiB",
                "unfused MiB"
            );
            for &seq in seqs {
                let spec = prefill_bench_spec(seq, head_dim);
                let (q, k, v, o) = random_qkvo(&ctx, &spec, seq as u64);
                let bufs = posattn::AttentionBuffers::new(&q, &k, &v, &o);
                let io = (q.size() + k.size() + v.size() + o.size()) as f64;
                let mib = |b: f64| b / (1024.0 * 1024.0);
                let gf = |ms: f64| spec.flops() / (ms * 1e-3) / 1e9;
                let fused = match posattn::Attention::new(&ctx, &spec) {
                    Ok(f) => f,
                    Err(e @ posattn::Error::Unavailable { .. }) => {
                        println!("  {seq:>6} fused kernel unavailable: {e}");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let (_, _) = time_encoded(&ctx, 1, |e| fused.encode(&ctx, e, &bufs))?; // warm-up
                let (clock, t) = time_encoded(&ctx, runs, |e| fused.encode(&ctx, e, &bufs))?;
                let f_ms = pick(&t).as_secs_f64() * 1e3;
                let mut unfused_gflops = None;
                let line = match posattn::harness::Unfused::new(&ctx, &spec) {
                    Ok(u) => {
                        let _ = time_encoded(&ctx, 1, |e| u.encode(&ctx, e, &bufs))?;
                        let (_, t) = time_encoded(&ctx, runs, |e| u.encode(&ctx, e, &bufs))?;
                        let u_ms = pick(&t).as_secs_f64() * 1e3;
                        unfused_gflops = Some(gf(u_ms));
                        format!(
                            "{u_ms:>11.3} {:>9.1} {:>6.2}x {:>10.1} {:>12.1}",
                            gf(u_ms),
                            u_ms / f_ms,
                            mib(io + fused.own_bytes() as f64),
                            mib(io + u.own_bytes() as f64)
                        )
                    }
                    Err(e) => format!("  unfused unavailable: {e}"),
                };
                println!(
                    "  {seq:>6} {f_ms:>11.3} {:>9.1} {:>5.2}x {line}  ({clock})",
                    gf(f_ms),
                    gf(f_ms) / roof_gflops
                );
                rows.push(serde_json::json!({
                    "adapter": ctx.describe(),
                    "seq": seq,
                    "head_dim": head_dim,
                    "dtype": "f32",
                    "scores": "rows",
                    "row_lanes": ctx.row_lanes(head_dim),
                    "block_q": fused.kernel().block_q,
                    "accumulation": "f32",
                    "q_workgroup": fused.kernel().q_shared,
                    "fused_gflops": gf(f_ms),
                    "unfused_gflops": unfused_gflops,
                    "roof_gflops": roof_gflops,
                }));
            }
            for (seq, form, key, ms) in bench_dtypes(
                &mut ctx,
                seqs,
                head_dim,
                runs,
                tile,
                row_lanes,
                blocks,
                accumulate,
                q_workgroup,
            )? {
                let spec = prefill_bench_spec(seq, head_dim);
                rows.push(serde_json::json!({
                "adapter": ctx.describe(),
                "seq": seq,
                "head_dim": head_dim,
                "dtype": form.split(' ').next(),
                "form": form,
                "scores": if form.contains("tile") || form.contains("coop") { form.split(' ').nth(1) } else { Some("rows") },
                "row_lanes": key.row_lanes(),
                "block_q": key.block_q,
                "accumulation": if key.half_acc { "f16" } else { "f32" },
                "q_workgroup": key.q_shared,
                "fused_gflops": spec.flops() / (ms * 1e-3) / 1e9,
                "unfused_gflops": null,
                "roof_gflops": roof_gflops,
            }));
            }
        }
    }
    if let Some(path) = json_path {
        write_json(path, &rows)?;
    }
    Ok(())
}

/// One column of `bench_dtypes`' table: how its plan is made.
#[derive(Clone, Copy)]
struct Form {
    name: &'static str,
    dtype: posattn::Dtype,
    half: posattn::HalfForm,
    tile: posattn::ScoreTile,
    /// Lanes per query row.
    lanes: u32,
    /// Query rows per workgroup (`None`: the context's rule).
    block: Option<u32>,
    acc: posattn::Accumulation,
    /// Queries in workgroup memory.
    q_shared: bool,
}

impl Form {
    /// The row form in `dtype` (f16 packed) with `lanes` per row, f32 P·V, queries in
    /// registers, the context's query block.
    fn rows(name: &'static str, dtype: posattn::Dtype, lanes: u32) -> Form {
        Form {
            name,
            dtype,
            half: posattn::HalfForm::Packed,
            tile: posattn::ScoreTile::Rows,
            lanes,
            block: None,
            acc: posattn::Accumulation::F32,
            q_shared: false,
        }
    }
}

/// The fused kernel with every tensor stored in each dtype (f16 in both forms where the adapter
/// has native f16), then in f32 with each of `lanes` per query row and each of `blocks` query
/// rows per workgroup, with P·V in f16 arithmetic (`accumulate`) and with the queries in
/// workgroup memory (`q_workgroup`), at the same shapes, timed alternately in one run so that
/// load from other processes affects the forms alike; speed is relative to f32. Returns (seq,
/// form, the variant its plan built, ms) of every form but the first.
#[allow(clippy::too_many_arguments)]
fn bench_dtypes(
    ctx: &mut Context,
    seqs: &[u32],
    head_dim: u32,
    runs: usize,
    tile: Option<posattn::ScoreTile>,
    lanes: &[u32],
    blocks: &[u32],
    accumulate: &[posattn::Accumulation],
    q_workgroup: bool,
) -> posattn::Result<Vec<(u32, &'static str, posattn::kernel::KernelKey, f64)>> {
    let mut out = Vec::new();
    use posattn::ScoreTile;
    use posattn::harness::timing::time_encoded;
    use posattn::{Accumulation, Dtype, HalfForm};
    use wgpu::util::DeviceExt;
    let own = ctx.row_lanes(head_dim);
    let mut forms = vec![
        Form::rows("f32", Dtype::F32, own),
        Form::rows("f16 packed", Dtype::F16, own),
        Form::rows("bf16", Dtype::Bf16, own),
    ];
    if ctx.has_native_f16() {
        forms.insert(
            1,
            Form {
                half: HalfForm::Native,
                ..Form::rows("f16 native", Dtype::F16, own)
            },
        );
    }
    // The score tile asked for, in f32 and the adapter's f16 storage; a P·V tile product
    // form beside its score-product-only form, for the A/B.
    let tiles: Vec<ScoreTile> = match tile {
        Some(t) if t.pv() => vec![t.without_pv(), t],
        Some(t) => vec![t],
        None => Vec::new(),
    };
    for t in tiles {
        let half = ctx.half_form();
        let (f32_name, f16_name) = match t {
            ScoreTile::Emulated => ("f32 tile", "f16 tile"),
            ScoreTile::EmulatedPv => ("f32 tilepv", "f16 tilepv"),
            ScoreTile::Coop8 => ("f32 coop8", "f16 coop8"),
            ScoreTile::Coop8Pv => ("f32 coop8pv", "f16 coop8pv"),
            ScoreTile::Coop16Pv => ("f32 coop16pv", "f16 coop16pv"),
            _ => ("f32 coop16", "f16 coop16"),
        };
        forms.push(Form {
            tile: t,
            ..Form::rows(f32_name, Dtype::F32, 1)
        });
        forms.push(Form {
            tile: t,
            half,
            ..Form::rows(f16_name, Dtype::F16, 1)
        });
    }
    // The lane-split form (f32, the context's rows per invocation).
    for &l in lanes {
        let name = match l {
            1 => "f32 lanes1",
            2 => "f32 lanes2",
            4 => "f32 lanes4",
            _ => "f32 lanes8",
        };
        forms.push(Form::rows(name, Dtype::F32, l));
    }
    // Query rows per workgroup (f32, the context's rows and lanes).
    for &b in blocks {
        let name = match b {
            64 => "f32 bq64",
            128 => "f32 bq128",
            _ => "f32 bq256",
        };
        forms.push(Form {
            block: Some(b),
            ..Form::rows(name, Dtype::F32, own)
        });
    }
    // P·V in f16 arithmetic (f32 and the adapter's f16 storage), the context's rows and lanes;
    // reported unavailable without SHADER_F16.
    if accumulate.contains(&Accumulation::F16) {
        let half = ctx.half_form();
        for (name, d, h) in [
            ("f32 acc16", Dtype::F32, HalfForm::Packed),
            ("f16 acc16", Dtype::F16, half),
        ] {
            forms.push(Form {
                half: h,
                acc: Accumulation::F16,
                ..Form::rows(name, d, own)
            });
        }
    }
    // The queries in workgroup memory (f32, the context's rows and lanes, 64-row query blocks:
    // a GPU's, and the smallest query tile).
    if q_workgroup {
        forms.push(Form {
            block: Some(posattn::kernel::BLOCK_Q),
            q_shared: true,
            ..Form::rows("f32 qwg", Dtype::F32, own)
        });
    }
    println!(
        "
  fused kernel by storage dtype (median ms of {runs}, rounds interleaved; speed vs f32)"
    );
    print!("  {:>6}", "seq");
    for f in &forms {
        print!(" {:>18}", f.name);
    }
    println!();
    for &seq in seqs {
        let base = prefill_bench_spec(seq, head_dim);
        let mut rng = check::SplitMix::new(seq as u64);
        let (q, k, v) = (
            rng.vec(base.q_len(), 1.0),
            rng.vec(base.kv_len(), 1.0),
            rng.vec(base.kv_len(), 1.0),
        );
        let mut setups = Vec::new();
        for f in &forms {
            let (name, d) = (f.name, f.dtype);
            let spec = base.clone().with_dtype(d);
            ctx.set_score_tile(f.tile)?;
            ctx.set_row_lanes(Some(f.lanes))?;
            ctx.set_block_q(f.block)?;
            ctx.set_q_in_workgroup(Some(f.q_shared));
            let plan = ctx
                .set_accumulation(f.acc)
                .and_then(|()| posattn::Attention::with_half_form(ctx, &spec, f.half));
            ctx.set_q_in_workgroup(None);
            ctx.set_score_tile(ScoreTile::Rows)?;
            ctx.set_row_lanes(None)?;
            ctx.set_block_q(None)?;
            ctx.set_accumulation(Accumulation::F32)?;
            // A form this adapter cannot run (`Unavailable`) is reported and left out of the
            // row; the others are still timed. Any other error is the caller's.
            match plan {
                Ok(plan) => {
                    let mk = |x: &[f32]| {
                        ctx.device()
                            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                                label: None,
                                contents: &d.encode(x),
                                usage: wgpu::BufferUsages::STORAGE,
                            })
                    };
                    let bufs = (mk(&q), mk(&k), mk(&v), mk(&q));
                    setups.push(Some((plan, bufs, Vec::new())));
                }
                Err(e @ posattn::Error::Unavailable { .. }) => {
                    println!("  {seq:>6} {name}: {e}");
                    setups.push(None);
                }
                Err(e) => return Err(e),
            }
        }
        // Warm-up, then rounds of one timed run per form.
        for round in 0..=runs {
            for (plan, (q, k, v, o), times) in setups.iter_mut().flatten() {
                let bufs = posattn::AttentionBuffers::new(&*q, &*k, &*v, &*o);
                let (_, t) = time_encoded(ctx, 1, |e| plan.encode(ctx, e, &bufs))?;
                if round > 0 {
                    times.extend(t);
                }
            }
        }
        let f32_ms = setups[0].as_ref().map(|s| pick(&s.2).as_secs_f64() * 1e3);
        print!("  {seq:>6}");
        for (setup, &Form { name, .. }) in setups.iter().zip(&forms) {
            let Some((plan, _, t)) = setup else {
                print!(" {:>18}", "-");
                continue;
            };
            let ms = pick(t).as_secs_f64() * 1e3;
            match f32_ms {
                Some(f) => print!(" {:>18}", format!("{ms:.2} ({:.2}x)", f / ms)),
                None => print!(" {:>18}", format!("{ms:.2}")),
            }
            if name != "f32" {
                // The plan's own variant: a form that does not fit keeps its default.
                out.push((seq, name, plan.kernel(), ms));
            }
        }
        println!();
    }
    Ok(out)
}

/// Candidate rows per invocation at `head_dim`: every buildable count whose queries and
/// accumulators stay within 2 × 1024 floats per invocation on a CPU adapter (past that, compile
/// times on the software drivers only grow), and within 2 × 256 on a GPU, where a row's floats
/// are registers: on an H200 two rows at head_dim 64 already ran 2.7× slower than one, 8 rows
/// 29× slower, and the 4- and 8-row variants at head_dim 128 kept `tune` past a minute.
///
/// Lanes per row (the lane-split form) join the candidates where the device has subgroups: each
/// lane holds `rows × head_dim / lanes` channels, within the same budget, and a workgroup
/// (`block_q / rows × lanes` invocations, `Context::block_q`) of at most 256. GPUs try 2, 4
/// and 8 lanes; CPU adapters only 2, since on lavapipe 4 and 8 ran slower than 2 at head
/// sizes 64 and 128 and each candidate costs a compile there (BENCHMARKS.md, "The lane-split
/// form and more rows per invocation").
fn tune_candidates(ctx: &Context, spec: &posattn::AttentionSpec) -> Vec<(u32, u32, bool)> {
    let cpu = ctx.adapter_info().device_type == wgpu::DeviceType::Cpu;
    let subgroup_lanes = |l: u32| ctx.row_lane_reduce(l) != posattn::kernel::LaneReduce::Workgroup;
    candidates_for(spec.head_dim, cpu, ctx.block_q(spec), subgroup_lanes)
}

/// [`tune_candidates`] given whether the adapter is a CPU, its query rows per workgroup
/// (`Context::block_q`) and which lane counts its subgroups can sum: (rows, lanes, queries in
/// workgroup memory). On GPUs every (rows, lanes) whose queries take at least 128 registers a
/// lane is tried again with them in workgroup memory (`KernelKey::with_q_shared`), after the
/// register forms; CPU adapters read workgroup memory lane by lane and keep them in registers.
fn candidates_for(
    head_dim: u32,
    cpu: bool,
    block_q: u32,
    subgroup_lanes: impl Fn(u32) -> bool,
) -> Vec<(u32, u32, bool)> {
    let floats = if cpu { 1024 } else { 256 };
    let mut out = Vec::new();
    for &lanes in posattn::kernel::ROW_LANES_CHOICES {
        // CPU adapters: at most 2 lanes (4 and 8 ran slower than 2 at every size measured).
        let usable = lanes == 1
            || ((!cpu || lanes == 2)
                && subgroup_lanes(lanes)
                && (head_dim / 4).is_multiple_of(lanes));
        if !usable {
            continue;
        }
        for &r in posattn::kernel::ROWS_CHOICES {
            let per_lane = r * head_dim / lanes;
            let invocations = block_q / r * lanes;
            if (r == 1 && lanes == 1) || (per_lane <= floats && invocations <= 256) {
                out.push((r, lanes, false));
            }
        }
    }
    if !cpu {
        let shared: Vec<_> = out
            .iter()
            .filter(|c| c.0 * head_dim / c.1 >= 128)
            .map(|c| (c.0, c.1, true))
            .collect();
        out.extend(shared);
    }
    out
}

/// What `posattn tune` measures (see `Command::Tune`).
struct TuneArgs {
    head_dims: Vec<u32>,
    seq: Option<u32>,
    cache: Option<u32>,
    runs: usize,
    file: Option<std::path::PathBuf>,
    decode_keys: bool,
}

fn tune(backend: Option<Backend>, adapter: Option<String>, args: TuneArgs) -> posattn::Result<()> {
    let TuneArgs {
        head_dims,
        seq,
        cache,
        runs,
        file,
        decode_keys,
    } = args;
    let head_dims = &head_dims[..];
    use posattn::harness::timing::time_encoded;
    use posattn::tune::{TuneEntry, TuneFile, TuneKey};
    let path = match file.or_else(posattn::tune::default_path) {
        Some(p) => p,
        None => {
            return Err(posattn::Error::invalid(
                "tune file",
                "a path (--file, POSATTN_TUNE_FILE or a home folder)",
                "none",
            ));
        }
    };
    for &d in head_dims {
        if !posattn::SUPPORTED_HEAD_DIMS.contains(&d) {
            return Err(posattn::Error::invalid(
                "head_dim",
                format!("one of {:?}", posattn::SUPPORTED_HEAD_DIMS),
                d,
            ));
        }
    }
    let opts = options(backend, adapter)?;
    let adapters = enumerate_adapters(&opts);
    if adapters.is_empty() {
        return Err(posattn::Error::NoAdapter(no_adapter(&opts)));
    }
    let mut stored = TuneFile::read(&path)?;
    for a in adapters {
        let mut ctx = Context::from_adapter(&a)?;
        let cpu = ctx.adapter_info().device_type == wgpu::DeviceType::Cpu;
        let n = seq.unwrap_or(if cpu { 512 } else { 2048 });
        println!(
            "\n{}\n  causal RoPE, batch 1, 8 heads, seq {n}",
            ctx.describe()
        );
        let mut rows = std::collections::BTreeMap::new();
        let mut lanes = std::collections::BTreeMap::new();
        let mut q_shared = std::collections::BTreeMap::new();
        let mut measured = std::collections::BTreeMap::new();
        for &d in head_dims {
            let spec = prefill_bench_spec(n, d);
            let (q, k, v, o) = random_qkvo(&ctx, &spec, d as u64);
            let mut times = Vec::new();
            for (r, l, qs) in tune_candidates(&ctx, &spec) {
                ctx.set_rows_per_invocation(Some(r))?;
                ctx.set_row_lanes(Some(l))?;
                ctx.set_q_in_workgroup(Some(qs));
                let place = if qs { " q in workgroup" } else { "" };
                // A candidate must compute attention before its speed counts: a small causal
                // RoPE case with a partial last tile, against the f64 reference.
                let case = check::Case::new(
                    format!("tune_d{d}_r{r}_l{l}{}", if qs { "_qwg" } else { "" }),
                    posattn::AttentionSpec::default()
                        .with_seq_len(77)
                        .with_heads(2)
                        .with_head_dim(d)
                        .with_position(posattn::PositionEncoding::Rope(posattn::Rope::new(
                            10000.0,
                        ))),
                );
                let result = check::run_case(&ctx, &case);
                if result.status != Status::Pass {
                    println!(
                        "  d{d} rows {r} lanes {l}{place}: not used ({:?})",
                        result.status
                    );
                    continue;
                }
                let plan = posattn::Attention::new(&ctx, &spec)?;
                let bufs = posattn::AttentionBuffers::new(&q, &k, &v, &o);
                time_encoded(&ctx, 1, |e| plan.encode(&ctx, e, &bufs))?;
                let (_, t) = time_encoded(&ctx, runs, |e| plan.encode(&ctx, e, &bufs))?;
                let ms = posattn::harness::timing::median(&t).as_secs_f64() * 1e3;
                println!(
                    "  d{d} rows {r} lanes {l}{place}: {ms:.3} ms ({:.1} GFLOP/s)",
                    spec.flops() / (ms * 1e-3) / 1e9
                );
                times.push((r, l, qs, ms));
            }
            let Some(&(best, best_l, best_qs, best_ms)) =
                times.iter().min_by(|a, b| a.3.total_cmp(&b.3))
            else {
                return Err(posattn::Error::invalid(
                    "tune candidates",
                    format!("at least one rows count passing the reference at head_dim {d}"),
                    "none",
                ));
            };
            println!(
                "  d{d}: rows {best}, lanes {best_l}, queries in {} ({best_ms:.3} ms)",
                if best_qs {
                    "workgroup memory"
                } else {
                    "registers"
                }
            );
            rows.insert(d, best);
            lanes.insert(d, best_l);
            q_shared.insert(d, best_qs);
            measured.insert(d, times);
        }
        ctx.set_rows_per_invocation(None)?;
        ctx.set_row_lanes(None)?;
        ctx.set_q_in_workgroup(None);
        let cache = cache.unwrap_or(if cpu { 2048 } else { 8192 });
        // The prefill choice is stored before decode is measured, so that a run cut short
        // (a time limit, a failing decode candidate) keeps it; decode's joins it after.
        let mut entry = TuneEntry {
            key: TuneKey::of(ctx.adapter_info()),
            rows,
            lanes,
            q_shared,
            measured,
            shape: (8, n),
            decode_lanes: Default::default(),
            decode_keys: Default::default(),
            decode_measured: Default::default(),
            decode_shape: (32, 8, 1, cache),
        };
        stored.upsert(entry.clone());
        stored.write(&path)?;
        println!("  prefill choice stored in {}", path.display());
        let decode = tune_decode(&mut ctx, head_dims, cache, runs, decode_keys)?;
        entry.decode_lanes = decode.0;
        entry.decode_keys = decode.1;
        entry.decode_measured = decode.2;
        stored.upsert(entry);
        stored.write(&path)?;
    }
    println!("\nstored in {}", path.display());
    Ok(())
}

/// Per-head-size decode lanes and keys per step, and the measurements behind them.
type DecodeTuning = (
    std::collections::BTreeMap<u32, u32>,
    std::collections::BTreeMap<u32, u32>,
    std::collections::BTreeMap<u32, Vec<(u32, u32, f64)>>,
);

/// `posattn tune`'s decode part: every lanes-per-key candidate at each head size at one key a
/// step, then on GPUs (or with `--decode-keys`) the best lanes and the next larger count at 2
/// and 4 keys a step (CPU adapters, whose decode time is the per-lane reads of K and V, keep 1:
/// BENCHMARKS.md), each checked against the f64 reference on a small GQA step with a ragged
/// second sequence, then timed on Llama-3-8B's heads (32 query, 8 KV, RoPE) at batch 1 against
/// `cache` keys, f32.
fn tune_decode(
    ctx: &mut Context,
    head_dims: &[u32],
    cache: u32,
    runs: usize,
    keys_on_cpu: bool,
) -> posattn::Result<DecodeTuning> {
    use posattn::harness::decode::{DecodeCase, DecodeSetup, bench_spec, run_decode_case};
    use posattn::harness::timing::time_encoded;
    use posattn::kernel::{DECODE_LANES_CHOICES, decode_lanes_at_most};
    println!("  decode: 32 query heads, 8 KV heads, RoPE, batch 1, cache {cache}, f32");
    let mut chosen = std::collections::BTreeMap::new();
    let mut chosen_keys = std::collections::BTreeMap::new();
    let mut measured = std::collections::BTreeMap::new();
    let more_keys = keys_on_cpu || ctx.adapter_info().device_type != wgpu::DeviceType::Cpu;
    for &d in head_dims {
        let mut spec = bench_spec(1, cache);
        spec.attention = spec.attention.with_head_dim(d);
        let setup = DecodeSetup::new(ctx, &spec)?;
        let bufs = setup.buffers();
        let mut times: Vec<(u32, u32, f64)> = Vec::new();
        // One lane per key holds a whole head per row in registers: not a candidate.
        let lane_candidates: Vec<(u32, u32)> = DECODE_LANES_CHOICES
            .iter()
            .filter(|&&l| l > 1 && decode_lanes_at_most(d, l) == l)
            .map(|&l| (l, 1))
            .collect();
        let mut candidates = lane_candidates.clone();
        let (mut i, mut extended) = (0, false);
        loop {
            // After the lanes candidates, on GPUs: the best lanes, and the next larger count
            // (fewer registers a lane for the step's keys), at more keys a step.
            if more_keys && !extended && i == lane_candidates.len() {
                extended = true;
                if let Some(&(bl, _, _)) = times.iter().min_by(|a, b| a.2.total_cmp(&b.2)) {
                    let wider = lane_candidates.iter().map(|c| c.0).find(|&l| l > bl);
                    for l in std::iter::once(bl).chain(wider) {
                        candidates.extend([(l, 2), (l, 4)]);
                    }
                }
            }
            let Some(&(l, keys)) = candidates.get(i) else {
                break;
            };
            i += 1;
            ctx.set_decode_lanes(Some(l))?;
            ctx.set_decode_keys_per_step(Some(keys))?;
            let mut small = bench_spec(2, 300);
            small.attention = small.attention.with_head_dim(d);
            let case = DecodeCase::new(
                format!("tune_decode_d{d}_l{l}_ks{keys}"),
                small,
                vec![(1, 300), (1, 129)],
            );
            let result = run_decode_case(ctx, &case);
            if result.status != Status::Pass {
                println!(
                    "  decode d{d} lanes {l} keys {keys}: not used ({:?})",
                    result.status
                );
                continue;
            }
            let plan = posattn::DecodePlan::new(ctx, &spec)?;
            time_encoded(ctx, 1, |e| plan.encode(ctx, e, &bufs))?;
            let (_, t) = time_encoded(ctx, runs, |e| plan.encode(ctx, e, &bufs))?;
            let us = posattn::harness::timing::median(&t).as_secs_f64() * 1e6;
            let k = plan.kernel();
            println!(
                "  decode d{d} lanes {l} keys {keys} ({:?}, {} splits): {us:.1} us",
                k.lane_reduce,
                plan.splits()
            );
            times.push((l, keys, us));
        }
        ctx.set_decode_lanes(None)?;
        ctx.set_decode_keys_per_step(None)?;
        let Some(&(best, best_keys, best_us)) = times.iter().min_by(|a, b| a.2.total_cmp(&b.2))
        else {
            return Err(posattn::Error::invalid(
                "tune candidates",
                format!("at least one decode lanes count passing the reference at head_dim {d}"),
                "none",
            ));
        };
        println!("  decode d{d}: lanes {best}, {best_keys} keys a step ({best_us:.1} us)");
        chosen.insert(d, best);
        chosen_keys.insert(d, best_keys);
        measured.insert(d, times);
    }
    Ok((chosen, chosen_keys, measured))
}

/// The adapter's cooperative-matrix configurations (`Features::EXPERIMENTAL_COOPERATIVE_MATRIX`).
fn describe_coop(a: &wgpu::Adapter) -> String {
    if !a
        .features()
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
    {
        return "no".into();
    }
    let props = a.cooperative_matrix_properties();
    if props.is_empty() {
        return "feature present, no configurations".into();
    }
    let tile = match posattn::ScoreTile::coop_for(a.features(), &props) {
        Some(t) => {
            format!("score tile {t:?} (opt-in: POSATTN_COOPERATIVE_MATRIX=1, `--scores coop`)")
        }
        None => "no f16 × f16 → f32 configuration of 8 or 16: no cooperative score tile".into(),
    };
    let configs: Vec<String> = props.iter().map(|p| format!("{p:?}")).collect();
    format!("{}; {tile}", configs.join("; "))
}

fn info(backend: Option<Backend>) -> ExitCode {
    let opts = match options(backend, None) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let adapters = enumerate_adapters(&opts);
    if adapters.is_empty() {
        eprintln!("{}", no_adapter(&opts));
        return ExitCode::from(2);
    }
    for a in adapters {
        let info = a.get_info();
        let l = a.limits();
        let f = a.features();
        println!("{}", describe_adapter(&info));
        println!(
            "  workgroup storage {} B, invocations/workgroup {}, workgroups/dim {}",
            l.max_compute_workgroup_storage_size,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroups_per_dimension
        );
        println!(
            "  storage binding {} B, buffer {} B, storage buffers/stage {}",
            l.max_storage_buffer_binding_size,
            l.max_buffer_size,
            l.max_storage_buffers_per_shader_stage
        );
        let has = |x: wgpu::Features| if f.contains(x) { "yes" } else { "no" };
        println!(
            "  f16 {}, subgroups {} (size {}..{}), timestamps {} (inside encoders {})",
            has(wgpu::Features::SHADER_F16),
            has(wgpu::Features::SUBGROUP),
            info.subgroup_min_size,
            info.subgroup_max_size,
            has(wgpu::Features::TIMESTAMP_QUERY),
            has(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS)
        );
        println!("  cooperative matrices: {}", describe_coop(&a));
        // The fused variant each head size gets: the stored tuning, else the heuristic (what
        // `Context::rows_per_invocation` returns when nothing overrides it).
        let stored = posattn::tune::stored(&info);
        let (tuned, tuned_lanes) = (&stored.rows, &stored.lanes);
        let classes: Vec<String> = posattn::SUPPORTED_HEAD_DIMS
            .iter()
            .map(|&d| {
                let mut lanes = match tuned_lanes.get(&d) {
                    Some(&l) if l > 1 => format!(" x {l} lanes"),
                    _ => String::new(),
                };
                if stored.q_shared.get(&d) == Some(&true) {
                    lanes += ", q in workgroup memory";
                }
                match tuned.get(&d) {
                    Some(r) => format!("d{d} {r}{lanes} (tuned)"),
                    None => format!("d{d} {}", posattn::kernel::default_rows(&info, d)),
                }
            })
            .collect();
        println!(
            "  prefill rows per invocation, and lanes per row where more than one and the \
             queries' placement where not registers ({}): {}",
            if tuned.is_empty() {
                "heuristic; `posattn tune` measures them"
            } else {
                "tuned where marked, else heuristic"
            },
            classes.join(", ")
        );
        // The decode kernel's lanes per key and their sum (what a decode plan builds when
        // nothing overrides it; Context requests subgroups wherever the adapter has them).
        let subgroups = f.contains(wgpu::Features::SUBGROUP);
        let decode: Vec<String> = posattn::SUPPORTED_HEAD_DIMS
            .iter()
            .map(|&d| {
                let wish = stored.decode_lanes.get(&d).copied();
                let (l, reduce) = posattn::kernel::decode_lane_plan(d, subgroups, &info, wish);
                let how = match reduce {
                    posattn::kernel::LaneReduce::Workgroup if l > 1 => Some("workgroup sum"),
                    posattn::kernel::LaneReduce::Workgroup => None,
                    posattn::kernel::LaneReduce::Add => Some("subgroupAdd"),
                    posattn::kernel::LaneReduce::Shuffle => Some("butterflies"),
                };
                let notes: Vec<&str> = how.into_iter().chain(wish.map(|_| "tuned")).collect();
                if notes.is_empty() {
                    format!("d{d} {l}")
                } else {
                    format!("d{d} {l} ({})", notes.join("; "))
                }
            })
            .collect();
        println!(
            "  decode lanes per key ({}): {}",
            if stored.decode_lanes.is_empty() {
                "adapter rule; `posattn tune` measures them"
            } else {
                "tuned where marked, else the adapter rule"
            },
            decode.join(", ")
        );
        // Keys per softmax step: 1 unless tuned.
        let keys: Vec<String> = posattn::SUPPORTED_HEAD_DIMS
            .iter()
            .filter_map(|&d| stored.decode_keys.get(&d).map(|k| format!("d{d} {k}")))
            .collect();
        println!(
            "  decode keys per step: {}",
            if keys.is_empty() {
                "1 (`posattn tune` measures 2 and 4 on GPUs)".to_string()
            } else {
                format!("{} (tuned), else 1", keys.join(", "))
            }
        );
    }
    match posattn::tune::default_path() {
        Some(p) => println!("tuning file: {}", p.display()),
        None => println!("tuning file: none (POSATTN_TUNE_FILE is empty or no home folder)"),
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Bench { fastest, .. } = &cli.command {
        FASTEST.store(*fastest, std::sync::atomic::Ordering::Relaxed);
    }
    match cli.command {
        Command::Check(args) => check(args),
        Command::Info { backend } => info(backend),
        Command::Tune {
            backend,
            adapter,
            head_dim,
            seq,
            cache,
            runs,
            file,
            decode_keys,
        } => match tune(
            backend,
            adapter,
            TuneArgs {
                head_dims: head_dim,
                seq,
                cache,
                runs: runs.max(1),
                file,
                decode_keys,
            },
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Plot { scheme, out } => match posattn::plot::draw(&scheme, &out) {
            Ok(()) => {
                println!("wrote {}", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Shaders {
            out,
            lang,
            filter,
            threads,
        } => shaders(&out, lang, &filter, threads),
        Command::Bench {
            backend,
            adapter,
            seq,
            runs,
            decode: true,
            cache,
            batch,
            prefill_max,
            keys_rotated,
            splits,
            read_ahead,
            dtype,
            json,
            scores,
            head_dim,
            row_lanes,
            block_q,
            lanes,
            accumulate,
            q_workgroup,
            keys_per_step,
            fastest: _,
        } => {
            let _ = seq;
            if q_workgroup {
                eprintln!(
                    "error: invalid `--q-workgroup`: expected it with prefill only (the decode \
                     kernel has no query tile), got it with --decode"
                );
                return ExitCode::from(2);
            }
            if !row_lanes.is_empty() {
                eprintln!(
                    "error: invalid `--row-lanes`: expected it with prefill only (the decode \
                     kernel chooses its lanes per key), got it with --decode"
                );
                return ExitCode::from(2);
            }
            if !block_q.is_empty() {
                eprintln!(
                    "error: invalid `--block-q`: expected it with prefill only (the decode \
                     kernel has no query blocks), got it with --decode"
                );
                return ExitCode::from(2);
            }
            if head_dim != [64] {
                eprintln!(
                    "error: invalid `--head-dim`: expected it with prefill only (decode runs \
                     Llama-3-8B's 128), got it with --decode"
                );
                return ExitCode::from(2);
            }
            if scores != Scores::Rows {
                eprintln!(
                    "error: invalid `--scores`: expected it with prefill only (the decode kernel \
                     has one form), got it with --decode"
                );
                return ExitCode::from(2);
            }
            let dtypes = match dtype
                .iter()
                .map(|t| Dtype::parse("dtype", t.trim()))
                .collect::<posattn::Result<Vec<_>>>()
            {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            match bench_decode(
                backend,
                adapter,
                &DecodeBench {
                    caches: cache,
                    batches: batch,
                    dtypes,
                    runs: runs.max(1),
                    prefill_max,
                    keys_rotated,
                    splits,
                    read_ahead,
                    lanes,
                    accumulate,
                    keys_per_step,
                },
                json.as_deref(),
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Bench {
            backend,
            adapter,
            seq,
            runs,
            json,
            scores,
            head_dim,
            row_lanes,
            block_q,
            lanes,
            accumulate,
            q_workgroup,
            keys_per_step,
            ..
        } => {
            if !keys_per_step.is_empty() {
                eprintln!(
                    "error: invalid `--keys-per-step`: expected it with --decode only (keys per \
                     softmax step of the decode kernel)"
                );
                return ExitCode::from(2);
            }
            if !lanes.is_empty() {
                eprintln!(
                    "error: invalid `--lanes`: expected it with --decode only (lanes per key; \
                     the prefill kernel's lanes per row are `--row-lanes`)"
                );
                return ExitCode::from(2);
            }
            match bench(
                backend,
                adapter,
                &seq,
                &head_dim,
                runs.max(1),
                json.as_deref(),
                scores,
                &row_lanes,
                &block_q,
                &accumulate,
                q_workgroup,
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Run {
            args,
            backend,
            adapter,
        } => match run(args, backend, adapter) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
    }
}

#[cfg(test)]
mod tune_tests {
    use super::candidates_for;

    #[test]
    fn tune_candidates_follow_the_register_budget_and_the_subgroups() {
        // A CPU adapter: up to 1024 floats, at most 2 lanes (where its subgroups sum them).
        assert_eq!(
            candidates_for(64, true, posattn::kernel::CPU_BLOCK_Q, |_| false),
            [(1, 1, false), (2, 1, false), (4, 1, false), (8, 1, false)]
        );
        assert_eq!(
            candidates_for(256, true, posattn::kernel::CPU_BLOCK_Q, |_| true),
            [
                (1, 1, false),
                (2, 1, false),
                (4, 1, false),
                (1, 2, false),
                (2, 2, false),
                (4, 2, false),
                (8, 2, false)
            ]
        );
        // A GPU without subgroups: one lane, 256 floats; both again with the queries in
        // workgroup memory (128 and 256 floats of them).
        assert_eq!(
            candidates_for(128, false, posattn::kernel::BLOCK_Q, |_| false),
            [(1, 1, false), (2, 1, false), (1, 1, true), (2, 1, true)]
        );
        // A GPU with subgroups of 32 at head size 128: lanes 2 (up to 4 rows), 4 (up to 8),
        // 8 (from 2 rows: one row would be 512 invocations).
        // Then those holding at least 128 floats of queries a lane, with them in workgroup
        // memory.
        let c = candidates_for(128, false, posattn::kernel::BLOCK_Q, |l| l <= 32);
        let pairs: Vec<_> = c.iter().filter(|c| !c.2).map(|c| (c.0, c.1)).collect();
        assert_eq!(
            pairs,
            [
                (1, 1),
                (2, 1),
                (1, 2),
                (2, 2),
                (4, 2),
                (1, 4),
                (2, 4),
                (4, 4),
                (8, 4),
                (2, 8),
                (4, 8),
                (8, 8)
            ]
        );
        let shared: Vec<_> = c.iter().filter(|c| c.2).map(|c| (c.0, c.1)).collect();
        assert_eq!(
            shared,
            [(1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 4), (8, 8)]
        );
        assert!(c.iter().position(|c| c.2).unwrap() == pairs.len());
        // Head size 80 (20 vec4s): no 8 lanes; subgroups of 4: no 8 either way.
        assert!(
            !candidates_for(80, false, posattn::kernel::BLOCK_Q, |_| true)
                .iter()
                .any(|c| c.1 == 8)
        );
        assert!(
            !candidates_for(64, false, posattn::kernel::BLOCK_Q, |l| l <= 4)
                .iter()
                .any(|c| c.1 == 8)
        );
    }
}
