"""A Hugging Face Llama attention (Llama 3.1 RoPE scaling, GQA, causal) on random weights, dumped
as .npy for `posattn run --compare`: the projected q, k, v before RoPE ([batch, seq, heads, d]),
the positions, and the attention output before o_proj. Also writes the model's config.json.

Versions used for the committed files: transformers 5.17.0, torch 2.11.0, numpy 2.5 (CPU, float32).
Run: python3 tests/golden/gen_llama_attention.py OUT_DIR
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/golden/llama_attention"
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    cfg._attn_implementation = "sdpa"
    attn = LlamaAttention(cfg, layer_idx=0).eval()
    rotary = LlamaRotaryEmbedding(cfg)
    batch, seq = 2, 48
    x = torch.randn(batch, seq, cfg.hidden_size)
    positions = torch.arange(100, 100 + seq)
    pos_ids = positions[None].expand(batch, -1)
    with torch.no_grad():
        cos, sin = rotary(x, pos_ids)
        q = attn.q_proj(x).view(batch, seq, 8, 64)
        k = attn.k_proj(x).view(batch, seq, 2, 64)
        v = attn.v_proj(x).view(batch, seq, 2, 64)
        attn.o_proj = torch.nn.Identity()
        o, _ = attn(x, position_embeddings=(cos, sin), attention_mask=None)
    o = o.view(batch, seq, 8, 64)
    for name, t in [("q", q), ("k", k), ("v", v), ("out", o)]:
        np.save(os.path.join(out, f"{name}.npy"), t.numpy().astype(np.float32))
    np.save(os.path.join(out, "positions.npy"), positions.numpy().astype(np.int64))
    d = cfg.to_dict()
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(d, f, indent=1, default=str)
    print(f"written to {out} with transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
