"""Regenerate tropical_jax/profiles/*.json from our fitted latency numbers.

    python -m tropical_jax.sim.make_profiles --fits cost_model_fits.json

The fits file and where its numbers come from: docs/profiles.md. Every number's origin is written
into the profile's "source" field.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "profiles"
GB = 1e9
# Model shapes from the models' Hugging Face configs (num_hidden_layers, num_key_value_heads,
# hidden_size / num_attention_heads), fp16 KV: KV bytes per token = 2 · layers · kv_heads · head_dim · 2.
SHAPES = {
    "llama2_70b": {"hf_config": "meta-llama/Llama-2-70b-hf", "num_layers": 80, "num_kv_heads": 8, "head_dim": 128,
                   "dtype_bytes": 2},
    "internlm2_5_20b": {"hf_config": "internlm/internlm2_5-20b-chat", "num_layers": 48, "num_kv_heads": 8,
                        "head_dim": 128, "dtype_bytes": 2},
}


def kv_bytes(model: str, fits_value: int) -> int:
    m = SHAPES[model]
    kvb = 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * m["dtype_bytes"]
    if kvb != fits_value:
        raise SystemExit(f"{model}: model shape gives {kvb} KV bytes/token, cost_model_fits.json says {fits_value}")
    return kvb


def kv_capacity(gpus: int, weights_gb: float, kv_bytes_per_token: int, usable=0.9) -> int:
    """KV tokens one worker holds: 90% of its GPUs' 80 GB, minus fp16 weights."""
    return int((gpus * 80 * usable - weights_gb) * GB / kv_bytes_per_token)


def main():
    ap = argparse.ArgumentParser(description="Regenerate tropical_jax/profiles/*.json from the latency fits.")
    ap.add_argument("--fits", required=True, help="cost_model_fits.json (docs/profiles.md)")
    fits = json.loads(Path(ap.parse_args().fits).read_text())
    rec = fits["recommended_sim_defaults"]
    bw = rec["kv_transfer"]["a100_intra_node_nvlink_GBps"]
    sw_pre = fits["splitwise_measured_end_to_end"]["prefill_batch1"]["llama2-70b/a100-80gb/tp4"]
    sw_dec = fits["splitwise_measured_end_to_end"]["decode_step"]["llama2-70b/a100-80gb/tp4"]
    kv70 = kv_bytes("llama2_70b", rec["kv_bytes_per_token"]["llama2_70b"])
    llama = {
        "name": "a100-llama2-70b-tp4", "units": "ms",
        "source": ("prefill and decode: Splitwise measurements on A100-80GB TP4 (vLLM, 2023), fitted in "
                   "cost_model_fits.json (docs/profiles.md) splitwise_measured_end_to_end (prefill_batch1 and "
                   "decode_step llama2-70b/a100-80gb/tp4); no mixed-step data: t_mixed = t_chunk + t_decode - "
                   "min(c0, d0); chunk derived from prefill; KV bytes/token from the model shape (= recommended_sim_defaults."
                   "kv_bytes_per_token); transfer "
                   f"{bw} GB/s = A100 intra-node NVLink send/recv slope (Vidur), 1 ms latency assumed; KV capacity "
                   "= 90% of 4x80 GB minus 140 GB fp16 weights"),
        "prefill": {"c2": sw_pre["a_per_L2"], "c1": sw_pre["b_per_L"], "c0": sw_pre["c"]},
        "decode": {"d0": sw_dec["e"], "d1": sw_dec["d"], "d2": sw_dec["k"]},
        "kv_bytes_per_token": kv70,
        "model": SHAPES["llama2_70b"],
        "transfer": {"bandwidth_GBps": bw, "latency_ms": 1.0},
        "kv_capacity_tokens": kv_capacity(4, 140, kv70),
    }
    tp2 = rec["internlm2_5_20b_a100_tp2"]
    kv20 = kv_bytes("internlm2_5_20b", rec["kv_bytes_per_token"]["internlm2_5_20b"])
    decode_points = []
    for key, ms in tp2["decode_ms_at"].items():  # "B16_sumctx64K": B and the summed context
        b, ctx = key.split("_")
        tokens = int(ctx.replace("sumctx", "").replace("ctx", "").replace("K", "")) * 1024
        batch = int(b[1:])
        decode_points.append([batch, tokens if "sumctx" in ctx else tokens * batch, ms])
    intern = {
        "name": "a100-internlm2.5-20b-tp2", "units": "ms",
        "source": ("prefill and decode: least-squares fits of the TP2 points in cost_model_fits.json "
                   "(docs/profiles.md) recommended_sim_defaults.internlm2_5_20b_a100_tp2 (Vidur operator "
                   "profiles + analytic attention + all-reduce), not derived from the TP1 entry; no mixed-step "
                   "data: t_mixed = t_chunk + t_decode - min(c0, d0); chunk derived from prefill; KV bytes/token from "
                   "the model shape; transfer "
                   f"{bw} GB/s A100 NVLink (Vidur send/recv), 1 ms latency assumed; KV capacity = 90% of 2x80 GB "
                   "minus 40 GB fp16 weights"),
        "prefill": {"points": [[int(k), v] for k, v in tp2["prefill_ms_at"].items()]},
        "decode": {"points": decode_points},
        "kv_bytes_per_token": kv20,
        "model": SHAPES["internlm2_5_20b"],
        "transfer": {"bandwidth_GBps": bw, "latency_ms": 1.0},
        "kv_capacity_tokens": kv_capacity(2, 40, kv20),
    }
    OUT.mkdir(exist_ok=True)
    for p in (llama, intern):
        (OUT / f"{p['name']}.json").write_text(json.dumps(p, indent=1) + "\n")


if __name__ == "__main__":
    main()
