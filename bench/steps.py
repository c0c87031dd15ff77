"""Random-weight Llama shapes, transformers beside them, and single engine steps timed on them.

Shared by engine_micro, attention_ab and decode_bound, which compare the engine with transformers (or with
itself under other attention code) on the same weights in one process.
"""

from __future__ import annotations

import time

import jax.numpy as jnp

CONFIGS = {
    # the embedded default's shape
    "default-5M": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2),
    "llama-55M": dict(vocab_size=16000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4),
}

# The engine every benchmark here builds on these shapes: the fine buckets (steps padded no further than
# to the next power of two), as an accelerator would run, so padding does not blur the comparisons.
ENGINE = dict(max_model_len=512, page_size=16, max_chunk_tokens=256, bucket_set="fine", compilation_cache_dir=None)

# The steps an executor() compiles and attention_ab times: (chunk tokens, decode batch, decode context tokens).
SHAPES = {"decode_b8_ctx84": (0, 8, 84), "decode_b32_ctx84": (0, 32, 84), "prefill_c128": (128, 0, None),
          "mixed_c64_b8": (64, 8, None)}


def save_hf(cfg: dict, path: str):
    """A transformers Llama with seeded random weights, saved to `path` -> (the model, its parameter count)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, max_position_embeddings=1024,
                                                                   eos_token_id=None, bos_token_id=None)).eval()
    model.save_pretrained(path)
    n_params = sum(p.numel() for p in model.parameters())
    return model, n_params


def hf_generate_s(model, prompts, new_tokens) -> float:
    """Seconds of transformers' greedy generate of exactly `new_tokens` tokens for every prompt."""
    import torch

    ids = torch.tensor(prompts, device=model.device)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def context_pages(ex, tokens) -> int:
    """The context bucket (in pages) a step over `tokens` runs in: the smallest that holds them."""
    need = -(-tokens // ex.cfg.page_size)
    return min(p for p in ex.cfg.context_pages if p >= need)


def executor(path, attention):
    """An executor on the checkpoint at `path` whose steps trace `attention`'s backends (llama.py looks them up
    when it traces); SHAPES are compiled now, under that attention code."""
    from tropical_jax.config import EngineConfig
    from tropical_jax.model import llama
    from tropical_jax.model.loader import load_model
    from tropical_jax.runtime.executor import ModelExecutor

    cfg, graphdef, params, _ = load_model(path, jnp.float32, None, with_tokenizer=False)
    ex = ModelExecutor(cfg, graphdef, params, EngineConfig(max_num_seqs=32, **ENGINE))
    saved, llama.get_backend = llama.get_backend, attention.get_backend
    try:
        for c, b, tokens in SHAPES.values():
            ex.time_step(c, b, context_pages(ex, tokens or c), tokens)
    finally:
        llama.get_backend = saved
    return ex


def mean_ms(ex, c, b, p, tokens, reps: int) -> float:
    """Mean ms of `reps` calls of one step (executor.time_step: every row live)."""
    start = time.perf_counter()
    for _ in range(reps):
        ex.time_step(c, b, p, tokens)
    return (time.perf_counter() - start) / reps * 1000
