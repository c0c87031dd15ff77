"""Engine micro-benchmark: per-bucket step times, prefill/decode throughput, compile time, and
transformers `generate` on the same weights and batch, side by side in one run (ratios).

    python bench/engine_micro.py [--out bench/results/engine_micro.json] [--configs default-5M] [--batches 1,8]

Prints JSON (and writes it to --out) stating the machine. Both engines run greedy decoding on
the same random-weight HF checkpoint, prompts of equal length (no padding), on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

CONFIGS = {
    # the embedded default's shape
    "default-5M": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2),
    "llama-55M": dict(vocab_size=16000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4),
}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()[:1]]}


def matmul_flops(n=1024, reps=20) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        a = f(a)
    a.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def save_hf(cfg: dict, path: str):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, max_position_embeddings=1024,
                                                                   eos_token_id=None, bos_token_id=None)).eval()
    model.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    return model, n_params


def hf_generate_tps(model, prompts, new_tokens) -> float:
    import torch

    ids = torch.tensor(prompts)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def bench_config(name, cfg, batches, prompt_len, new_tokens, flops):
    from tropical_jax import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as d:
        hf, n_params = save_hf(cfg, d)
        start = time.perf_counter()
        llm = LLM(d, max_model_len=512, page_size=16, max_num_seqs=max(batches), max_chunk_tokens=256,
                  compilation_cache_dir=None, progress=True)
        warmup_s = time.perf_counter() - start
        ex = llm.executor
        steps = {}
        for c, b, p in ex.step_shapes():
            ex._run(c, b, p, None, [])
            t0 = time.perf_counter()
            for _ in range(3):
                ex._run(c, b, p, None, [])
            steps[f"chunk{c}_batch{b}_ctx{p * 16}"] = round((time.perf_counter() - t0) / 3 * 1000, 3)
        rng = np.random.default_rng(0)
        rows = []
        for b in batches:
            prompts = rng.integers(0, cfg["vocab_size"], (b, prompt_len)).tolist()
            sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
            t0 = time.perf_counter()
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
            ours = b * new_tokens / (time.perf_counter() - t0)
            assert all(len(o.token_ids) == new_tokens for o in outs)
            theirs = hf_generate_tps(hf, prompts, new_tokens)
            pre = [rng.integers(0, cfg["vocab_size"], 256).tolist() for _ in range(4)]
            t0 = time.perf_counter()
            llm.generate(prompt_token_ids=pre, sampling_params=SamplingParams(max_tokens=1, temperature=0))
            prefill_tps = 4 * 256 / (time.perf_counter() - t0)
            # Decode FLOPs per token ~ 2 x weights touched (embedding lookup excluded).
            matmul_params = n_params - cfg["vocab_size"] * cfg["hidden_size"]
            rows.append({"batch": b, "decode_tok_s": round(ours, 1), "transformers_tok_s": round(theirs, 1),
                         "ratio_vs_transformers": round(ours / theirs, 2), "prefill_tok_s": round(prefill_tps, 1),
                         "fraction_of_matmul_flops": round(ours * 2 * matmul_params / flops, 4)})
            print(json.dumps({"config": name, **rows[-1]}), flush=True)
    return {"params": n_params, "warmup_s": round(warmup_s, 1), "executables": len(steps),
            "step_ms": steps, "throughput": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/engine_micro.json")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--batches", default="1,8,32,64")
    args = ap.parse_args()
    flops = matmul_flops()
    batches = [int(b) for b in args.batches.split(",")]
    configs = {n: CONFIGS[n] for n in args.configs.split(",")}
    result = {"machine": machine(), "matmul_gflops": round(flops / 1e9, 1), "prompt_len": 32, "new_tokens": 64,
              "dtype": "float32", "note": "end-to-end greedy generate wall time; both engines same weights, "
                                          "same prompts, same batch, one process, CPU",
              "configs": {n: bench_config(n, c, batches, 32, 64, flops) for n, c in configs.items()}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
