//! Decode against a KV cache: one new query per sequence, Llama-3-8B heads (32 query, 8 KV,
//! head_dim 128, RoPE), batch 1 and 4, cache 512 … 32768 (`POSATTN_DECODE_CACHES`, comma
//! separated, changes the list). Criterion reports K/V bytes read per second; the copy kernel
//! `copy_roof` (64 MiB, read + write) is measured in the same run as the adapter's roof.
//! `posattn bench --decode` prints the same figures as a table with the prefill kernel's.

mod common;

use common::{contexts, group, short_name};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use posattn::DecodePlan;
use posattn::harness::decode::{CopyRoof, DecodeSetup, bench_spec};
use posattn::harness::timing::time_encoded;

fn bench(c: &mut Criterion) {
    let caches: Vec<u32> = std::env::var("POSATTN_DECODE_CACHES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![512, 1024, 2048, 4096, 8192, 16384, 32768]);
    for ctx in contexts() {
        let mut g = group(c, format!("decode/{}", short_name(&ctx)));
        let roof = CopyRoof::new(&ctx, 64 << 20).expect("copy kernel");
        g.throughput(Throughput::Bytes(roof.bytes_moved()));
        g.bench_function("copy_roof", |b| {
            b.iter(|| {
                time_encoded(&ctx, 1, |e| {
                    roof.encode(e);
                    Ok(())
                })
                .expect("copy")
            })
        });
        for batch in [1u32, 4] {
            for &cache in &caches {
                let spec = bench_spec(batch, cache);
                let plan = match DecodePlan::new(&ctx, &spec) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("batch {batch} cache {cache}: {e}");
                        continue;
                    }
                };
                let setup = DecodeSetup::new(&ctx, &spec).expect("buffers");
                let bufs = setup.buffers();
                g.throughput(Throughput::Bytes(2 * spec.cache_len() as u64 * 4));
                g.bench_with_input(
                    BenchmarkId::new(format!("b{batch}"), cache),
                    &cache,
                    |b, _| {
                        b.iter(|| {
                            time_encoded(&ctx, 1, |e| plan.encode(&ctx, e, &bufs)).expect("decode")
                        })
                    },
                );
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
