"""PyTorch's scaled_dot_product_attention on the same shapes as benches/attention.rs, for the
device comparison in BENCHMARKS.md: batch 1, 8 heads, head_dim 64, causal, RoPE (HF half layout,
theta 10000) applied the way Hugging Face does before SDPA.

Usage: python3 benches/torch_sdpa.py 512 1024 2048 4096
Prints one markdown row per (dtype, seq): SDPA alone and RoPE + SDPA, median of 50 CUDA-event
timed runs after 10 warm-ups, GFLOP/s counted as 4·b·h·s²·d / 2 (causal).
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


def timed(fn, iters=50, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    seqs = [int(s) for s in sys.argv[1:]] or [512, 1024, 2048, 4096]
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| dtype | seq | SDPA ms | SDPA GFLOP/s | RoPE + SDPA ms | RoPE + SDPA GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float16):
        for s in seqs:
            b, h, d = 1, 8, 64
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
                f"| {name} | {s} | {t_sdpa:.3f} | {flops / t_sdpa / 1e6:.0f} | "
                f"{t_full:.3f} | {flops / t_full / 1e6:.0f} |"
            )


if __name__ == "__main__":
    main()
