"""Shared test helpers: tiny HF checkpoints on disk and a minimal paged runner for the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tropical_jax.model.llama import init_kv_cache, make_forward
from tropical_jax.model.sharding import kv_sharding
from tropical_jax.model.step_batch import StepBatch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def save_tiny_hf(path, arch="llama", seed=0, **overrides):
    import torch
    import transformers

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    kw = dict(TINY)
    if arch == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kw)).eval()
    model.save_pretrained(path)
    return model


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


class PagedRunner:
    """Runs steps on contiguous per-sequence pages: sequence s owns pages [s*P, (s+1)*P)."""

    def __init__(self, cfg, graphdef, params, num_seqs=4, page_size=4, max_len=64, dtype=jnp.float32,
                 backend="reference", mesh=None):
        self.cfg, self.params, self.page_size = cfg, params, page_size
        self.pages_per_seq = -(-max_len // page_size)
        sharding = kv_sharding(cfg, mesh) if mesh is not None else None
        self.kv = init_kv_cache(cfg, num_seqs * self.pages_per_seq, page_size, dtype, sharding)
        self.forward = jax.jit(make_forward(graphdef, backend))

    def table(self, s):
        return np.arange(s * self.pages_per_seq, (s + 1) * self.pages_per_seq, dtype=np.int32)

    def step(self, chunk=None, decodes=(), chunk_bucket=None, batch_bucket=None, chunks=None):
        """chunk: (seq, start, tokens), or chunks: several packed; decodes: [(seq, position, token)].
        Returns logits rows: one per chunk segment, then one per decode slot."""
        p = self.pages_per_seq
        chunks = chunks if chunks is not None else ([chunk] if chunk is not None else [])
        n = max(1, len(chunks))
        c = 0 if not chunks else (chunk_bucket or sum(len(t) for _, _, t in chunks))
        b = batch_bucket or len(decodes)
        ct = np.zeros(c, np.int32)
        cs, cl, ctab = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros((n, p), np.int32)
        offset = 0
        for i, (seq, start, toks) in enumerate(chunks):
            ct[offset:offset + len(toks)] = toks
            offset += len(toks)
            cs[i], cl[i], ctab[i] = start, len(toks), self.table(seq)
        dt, dp, dtab, dm = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros((b, p), np.int32), np.zeros(b, bool)
        for i, (seq, pos, tok) in enumerate(decodes):
            dt[i], dp[i], dtab[i], dm[i] = tok, pos, self.table(seq), True
        batch = StepBatch(*map(jnp.asarray, (ct, cs, cl, ctab, dt, dp, dtab, dm)))
        logits, self.kv = self.forward(self.params, self.kv, batch)
        return np.asarray(logits)
