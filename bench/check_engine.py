"""Parts 3 and 4 of the accelerator check: the engine, and transformers, on one random-weight checkpoint.

weights:      writes the checkpoint of the chosen real shape (and the server part's small one)
engine:       tropical_jax.LLM in bf16 with one attention backend: warmup compiles, prefill tokens/s of one
              prompt per length, steady decode tokens/s per batch, and the compiles after warmup (must be 0)
transformers: the same checkpoint in torch (bf16, sdpa attention): prefill forward tokens/s and greedy
              generate decode tokens/s at the same lengths and batches, on CUDA (or the CPU in smoke runs)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bench.check_parts import MODELS, Skipped, param_count
from bench.engine_micro import generate_s, steady_decode_s
from bench.steps import hf_generate_s

# What each run measures: prefill prompt lengths, decode batches, the decode prompt length and the decode
# steps timed, and the best of how many rounds; the engine's buckets are exactly these (one chunk and one
# context bucket, every batch: 7 executables in a full run, 3 in a smoke run).
SHAPES = {
    "full": dict(prefill=(2048, 8192), batches=(1, 32, 128), decode_prompt=128, decode_steps=32, chunk=2048,
                 max_model_len=8448, page_size=16, rounds=2),
    "smoke": dict(prefill=(64, 192), batches=(4,), decode_prompt=16, decode_steps=8, chunk=64,
                  max_model_len=256, page_size=16, rounds=1),
}
SERVER_MODEL = {"full": "small-4layer", "smoke": "tiny"}


def shapes(settings: dict, platform: str | None = None) -> dict:
    s = SHAPES["smoke" if settings["smoke"] else "full"]
    if platform == "tpu" and not settings["smoke"]:
        # The TPU ragged kernel keeps a step's block tables in SMEM (64k entries): 137 sequences (8 prompt
        # segments, padding, 128 decodes) x 528 pages of 16 tokens exceed it; pages of 32 fit.
        s = {**s, "page_size": 32}
    return s


def checkpoint(settings: dict, model: str | None = None) -> Path:
    return Path(settings["work_dir"]) / (model or settings["model"])


def run_weights(settings: dict, record) -> None:
    from bench.check_weights import write_checkpoint

    server_model = SERVER_MODEL["smoke" if settings["smoke"] else "full"]
    for name in dict.fromkeys((settings["model"], server_model)):
        start = time.perf_counter()
        info = write_checkpoint(MODELS[name], checkpoint(settings, name))
        record[name] = {**info, "seconds": round(time.perf_counter() - start, 1)}


def _num_pages(s: dict) -> int:
    """Room for the largest decode batch (prompt, the tokens decoded while the batch prefills, the timed
    steps) or the longest prompt, whichever needs more: not max_num_seqs full contexts."""
    ps = s["page_size"]
    per_seq = -(-(s["decode_prompt"] + max(s["batches"]) + s["decode_steps"] + 2) // ps) + 1
    return max(max(s["batches"]) * per_seq, -(-(max(s["prefill"]) + 1) // ps)) + 8


def run_engine(settings: dict, record, backend: str) -> None:
    import jax

    from tropical_jax import LLM
    from tropical_jax.runtime.executor import compile_count

    s = shapes(settings, jax.default_backend())
    vocab = MODELS[settings["model"]]["vocab_size"]
    record["model"] = {"shape": settings["model"], "params": param_count(MODELS[settings["model"]]),
                       "dtype": "bfloat16", "attention_backend": backend, "page_size": s["page_size"]}
    start = time.perf_counter()
    llm = LLM(str(checkpoint(settings)), dtype="bfloat16", attention_backend=backend,
              max_model_len=s["max_model_len"], page_size=s["page_size"], num_pages=_num_pages(s),
              max_num_seqs=max(s["batches"]), max_chunk_tokens=s["chunk"], chunk_buckets=[s["chunk"]],
              batch_buckets=list(s["batches"]), context_buckets=[s["max_model_len"]], compilation_cache_dir=None,
              progress=True)  # the log shows how far warmup got if the part runs out of time
    warm = compile_count()
    record["warmup"] = {"seconds": round(time.perf_counter() - start, 1), "compiles": warm,
                        "executables": len(next(iter(llm.engine.workers.values())).executor.step_shapes())}
    rng = np.random.default_rng(0)
    prefill = {}
    for n in s["prefill"]:
        prompt = rng.integers(0, vocab, (1, n)).tolist()
        best = min(generate_s(llm, prompt, 1) for _ in range(s["rounds"]))
        prefill[str(n)] = round(n / best, 1)
        record["prefill_tokens_per_s"] = prefill
    decode = {}
    for b in s["batches"]:
        prompts = rng.integers(0, vocab, (b, s["decode_prompt"])).tolist()
        best = min(steady_decode_s(llm, prompts, s["decode_steps"]) for _ in range(s["rounds"]))
        decode[str(b)] = round(b * s["decode_steps"] / best, 1)
        record["decode_tokens_per_s"] = decode
    new = compile_count() - warm
    record["compiles_after_warmup"] = new
    if new:
        record.fail(f"{new} compile(s) after warmup: a step shape outside the warmed buckets")


def run_transformers(settings: dict, record) -> None:
    import torch
    import transformers

    if torch.cuda.is_available():
        device = "cuda"
    elif settings["smoke"]:
        device = "cpu"  # the smoke run proves the code path on the CPU
    else:
        raise Skipped(f"torch {torch.__version__} sees no GPU (torch.cuda.is_available() is False)")
    s = shapes(settings)
    start = time.perf_counter()
    model = transformers.LlamaForCausalLM.from_pretrained(checkpoint(settings), dtype=torch.bfloat16).to(device)
    model.eval()
    record["model"] = {"shape": settings["model"], "device": torch.cuda.get_device_name() if device == "cuda"
                       else "cpu", "torch": torch.__version__,
                       "attention": getattr(model.config, "_attn_implementation", None),
                       "load_seconds": round(time.perf_counter() - start, 1)}
    rng = np.random.default_rng(0)
    vocab = MODELS[settings["model"]]["vocab_size"]

    def forward_s(ids):
        with torch.no_grad():
            t0 = time.perf_counter()
            model(ids)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

    prefill = {}
    for n in s["prefill"]:
        ids = torch.tensor(rng.integers(0, vocab, (1, n)), device=device)
        forward_s(ids)  # warm up kernels and allocator
        prefill[str(n)] = round(n / min(forward_s(ids) for _ in range(s["rounds"])), 1)
        record["prefill_tokens_per_s"] = prefill
    decode, steps = {}, s["decode_steps"]
    for b in s["batches"]:
        prompts = rng.integers(0, vocab, (b, s["decode_prompt"])).tolist()
        hf_generate_s(model, prompts, 2)  # warm up
        first = min(hf_generate_s(model, prompts, 1) for _ in range(s["rounds"]))
        full = min(hf_generate_s(model, prompts, 1 + steps) for _ in range(s["rounds"]))
        decode[str(b)] = round(b * steps / max(full - first, 1e-9), 1)
        record["decode_tokens_per_s"] = decode
