"""PyTorch's scaled_dot_product_attention on the same shapes as benches/attention.rs, for the
device comparison in BENCHMARKS.md: batch 1, 8 heads, head_dim 64, causal, RoPE (HF half layout,
theta 10000) applied the way Hugging Face does before SDPA.

Usage: python3 benches/torch_sdpa.py [--head-dim 64,128] 512 1024 2048 4096
Prints one markdown row per (dtype, head_dim, seq): SDPA alone and RoPE + SDPA, the median of 20
CUDA-event timed runs after the GPU has been kept busy for 0.2 s (see `timed`), GFLOP/s counted
as 4·b·h·s²·d / 2 (causal).

Decode (the shapes of `posattn bench --decode`): python3 benches/torch_sdpa.py --decode 512 8192
One new query per sequence against a cache of the given lengths, Llama-3-8B heads (32 query, 8 KV,
head_dim 128), batch 1 and 4, SDPA with GQA: µs per token and the K/V bytes read per second,
with the cache stored rotated ("SDPA") and with every key rotated in the step ("RoPE + SDPA").
"""
import sys

import torch
import torch.nn.functional as F

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def rope(x, pos, theta=10000.0):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos[:, None].float() * inv[None, :]
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos()[None, None].to(x.dtype), emb.sin()[None, None].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def timed(fn, iters=20, settle_s=0.2, run_ms=1.0):
    """Median milliseconds per call. The GPU is first kept busy with `fn` for `settle_s` (its
    clocks idle low and rise under sustained work), then each of `iters` CUDA-event timed runs
    calls `fn` back to back as many times as fill about `run_ms`, like posattn's timing."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < settle_s:
        fn()
        n += 1
        if n % 8 == 0:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    reps = max(1, min(256, int(run_ms / max(a.elapsed_time(b), 1e-3)) + 1))
    times = []
    for _ in range(iters):
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / reps)
    times.sort()
    return times[len(times) // 2]


def decode(caches):
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| dtype | batch | cache | SDPA µs/token | SDPA GB/s | RoPE + SDPA µs/token | RoPE + SDPA GB/s |")
    print("|---|---|---|---|---|---|---|")
    hq, hkv, d = 32, 8, 128
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for b in (1, 4):
            for n in caches:
                g = torch.Generator(device=dev).manual_seed(n)
                q = torch.randn(b, hq, 1, d, device=dev, dtype=dtype, generator=g)
                k, v = (torch.randn(b, hkv, n, d, device=dev, dtype=dtype, generator=g) for _ in range(2))
                pos = torch.arange(n, device=dev)
                qpos = pos[-1:]
                step = lambda kk: F.scaled_dot_product_attention(q, kk, v, enable_gqa=True)
                t_sdpa = timed(lambda: step(k))
                t_full = timed(lambda: F.scaled_dot_product_attention(
                    rope(q, qpos), rope(k, pos), v, enable_gqa=True))
                kv_bytes = 2 * b * hkv * n * d * k.element_size()
                name = str(dtype).replace("torch.", "")
                print(
                    f"| {name} | {b} | {n} | {t_sdpa * 1e3 / b:.1f} | {kv_bytes / t_sdpa / 1e6:.0f} | "
                    f"{t_full * 1e3 / b:.1f} | {kv_bytes / t_full / 1e6:.0f} |"
                )


def main():
    if sys.argv[1:2] == ["--decode"]:
        decode([int(s) for s in sys.argv[2:]] or [512, 1024, 2048, 4096, 8192, 16384, 32768])
        return
    args = sys.argv[1:]
    dims = [64]
    if args[:1] == ["--head-dim"]:
        dims = [int(d) for d in args[1].split(",")]
        args = args[2:]
    seqs = [int(s) for s in args] or [512, 1024, 2048, 4096]
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| dtype | head_dim | seq | SDPA ms | SDPA GFLOP/s | RoPE + SDPA ms | RoPE + SDPA GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for dtype, d, s in ((t, d, s) for t in (torch.float32, torch.float16) for d in dims for s in seqs):
        b, h = 1, 8
        g = torch.Generator(device=dev).manual_seed(s)
        q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=dtype, generator=g) for _ in range(3))
        pos = torch.arange(s, device=dev)
        flops = 4 * b * h * s * s * d / 2
        t_sdpa = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        t_full = timed(
            lambda: F.scaled_dot_product_attention(rope(q, pos), rope(k, pos), v, is_causal=True)
        )
        name = str(dtype).replace("torch.", "")
        print(
            f"| {name} | {d} | {s} | {t_sdpa:.3f} | {flops / t_sdpa / 1e6:.0f} | "
            f"{t_full:.3f} | {flops / t_full / 1e6:.0f} |"
        )


if __name__ == "__main__":
    main()
