"""Golden RoPE frequency tables from Hugging Face transformers' own functions.

Runs `transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS` (and the default RoPE) on a spread of
configurations and writes tests/golden/rope_scaling.json: for each case the config it was given,
the sequence length, the inverse frequencies and the attention factor. tests/scaling.rs compares
the crate's f64 tables against them.

Versions used for the committed file: transformers 5.17.0, torch 2.11.0 (python 3.12).
Run: python3 tests/golden/gen_rope_scaling.py [OUT.json]
"""
import json
import sys

import torch
import transformers
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def default_inv_freq(theta, dim):
    # transformers' default: 1 / theta^(arange(0, dim, 2, int64).float() / dim), in float32.
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def case(name, head_dim, rope_parameters, max_pos=4096, seq_len=None, hidden=None, heads=8):
    return {
        "name": name,
        "head_dim": head_dim,
        "hidden_size": hidden or head_dim * heads,
        "num_attention_heads": heads,
        "max_position_embeddings": max_pos,
        "rope_parameters": rope_parameters,
        "seq_len": seq_len,
    }


CASES = [
    case("default_d64", 64, {"rope_type": "default", "rope_theta": 10000.0}),
    case("default_d128_theta5e5", 128, {"rope_type": "default", "rope_theta": 500000.0}),
    case("linear_f2", 64, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    case("linear_f0.5", 64, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 0.5}),
    case("linear_partial", 64, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0,
                                "partial_rotary_factor": 0.5}),
    case("dynamic_at_init", 64, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 2048),
    case("dynamic_len_2048", 64, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 2048, 2048),
    case("dynamic_len_2049", 64, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 2048, 2049),
    case("dynamic_len_10000", 64, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 2048, 10000),
    case("yarn_f4", 64, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 4096}, 16384),
    case("yarn_betas", 128, {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 8.0,
                             "original_max_position_embeddings": 32768, "beta_fast": 16.0,
                             "beta_slow": 2.0}, 262144),
    case("yarn_no_truncate", 64, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 4096, "truncate": False}, 16384),
    case("yarn_mscale_deepseek", 64, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                      "original_max_position_embeddings": 4096, "mscale": 0.707,
                                      "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}, 163840),
    case("yarn_attention_factor", 64, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 4096,
                                       "attention_factor": 1.5}, 16384),
    case("yarn_partial", 64, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 4096,
                              "partial_rotary_factor": 0.5}, 16384),
    case("yarn_factor_1", 64, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0,
                               "original_max_position_embeddings": 4096}, 4096),
    case("llama3_8b", 128, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}, 131072),
    case("llama3_32", 64, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}, 131072),
    case("proportional_quarter", 256, {"rope_type": "proportional", "rope_theta": 1000000.0,
                                       "partial_rotary_factor": 0.25}, 131072),
    case("proportional_factor8", 256, {"rope_type": "proportional", "rope_theta": 1000000.0,
                                       "partial_rotary_factor": 0.25, "factor": 8.0}, 131072),
]

# LongRoPE in Phi-3's shape: head_dim 96, 48 factors each.
_short = [1.0 + 0.01 * i for i in range(48)]
_long = [1.0 + 0.5 * i for i in range(48)]
for name, seq_len, extra in [
    ("longrope_short", 4096, {}),
    ("longrope_long", 4097, {}),
    ("longrope_at_init", None, {}),
    ("longrope_attention_factor", 8000, {"attention_factor": 1.2}),
    ("longrope_factor_given", 8000, {"factor": 2.0}),
]:
    params = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": _short,
              "long_factor": _long, "original_max_position_embeddings": 4096, **extra}
    CASES.append(case(name, 96, params, 131072, seq_len, hidden=3072, heads=32))


def run(c):
    params = dict(c["rope_parameters"])
    cfg = LlamaConfig(
        hidden_size=c["hidden_size"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_attention_heads"],
        head_dim=c["head_dim"],
        max_position_embeddings=c["max_position_embeddings"],
        rope_parameters=params,
    )
    rope_type = params["rope_type"]
    if rope_type == "default":
        prf = params.get("partial_rotary_factor", 1.0)
        dim = int(c["head_dim"] * prf)
        inv, af = default_inv_freq(params["rope_theta"], dim), 1.0
    else:
        inv, af = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu", seq_len=c["seq_len"])
    return [float(x) for x in inv.to(torch.float64).tolist()], float(af)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/golden/rope_scaling.json"
    results = []
    for c in CASES:
        try:
            inv, af = run(c)
            results.append({**c, "inv_freq": inv, "attention_factor": af})
        except Exception as e:  # recorded, so a failing scheme shows in the file
            results.append({**c, "error": f"{type(e).__name__}: {e}"})
            print(f"{c['name']}: {type(e).__name__}: {e}", file=sys.stderr)
    doc = {
        "generator": "tests/golden/gen_rope_scaling.py",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cases": results,
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"{len(results)} cases written to {out}")


if __name__ == "__main__":
    main()
