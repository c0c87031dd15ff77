"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) in Flax NNX, run one paged step at a time.

`build_model` returns the NNX module; `make_forward(graphdef)` gives the pure function
forward(params, kv_cache, batch) that the runtime jits: nnx.split happens once, never per call.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.engine_adapter import chunk_layout

from ..config import ModelConfig
from .attention import get_backend
from .rope import apply_rope, inverse_frequencies
from .step_batch import StepBatch


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def _linear(din, dout, bias, dtype, rngs):
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs,
                      kernel_init=nnx.initializers.normal(0.02))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = _linear(d, cfg.num_heads * hd, cfg.attention_bias, dtype, rngs)
        self.k_proj = _linear(d, cfg.num_kv_heads * hd, cfg.attention_bias, dtype, rngs)
        self.v_proj = _linear(d, cfg.num_kv_heads * hd, cfg.attention_bias, dtype, rngs)
        self.o_proj = _linear(cfg.num_heads * hd, d, False, dtype, rngs)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, False, dtype, rngs)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, False, dtype, rngs)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, False, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)


class LlamaModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype,
                                      rngs=rngs, embedding_init=nnx.initializers.normal(0.02))
        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, rngs)

    def logits(self, h):
        h = self.norm(h)
        if self.lm_head is None:
            return self.embed_tokens.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def step(self, kv_cache, batch: StepBatch, attention_backend: str = "reference"):
        """One paged step. Returns (logits f32[(N if C else 0) + B, vocab], kv_cache)."""
        cfg = self.config
        attend = get_backend(attention_backend)
        inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        c = batch.chunk_size
        tokens = jnp.concatenate([batch.chunk_tokens, batch.dec_tokens])
        positions = jnp.concatenate([chunk_layout(batch)[1], batch.dec_positions])
        n = tokens.shape[0]
        h = self.embed_tokens(tokens)
        new_cache = []
        for layer, (k_pool, v_pool) in zip(self.layers, kv_cache):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = apply_rope(a.q_proj(x).reshape(n, cfg.num_heads, cfg.head_dim), positions, inv_freq)
            k = apply_rope(a.k_proj(x).reshape(n, cfg.num_kv_heads, cfg.head_dim), positions, inv_freq)
            v = a.v_proj(x).reshape(n, cfg.num_kv_heads, cfg.head_dim)
            out, k_pool, v_pool = attend(q, k, v, k_pool, v_pool, batch)
            h = h + a.o_proj(out.reshape(n, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            new_cache.append((k_pool, v_pool))
        # Logits only where a token is sampled: each chunk segment's last token and each decode row.
        rows = jnp.arange(c, n)
        if c:
            rows = jnp.concatenate([jnp.maximum(jnp.cumsum(batch.chunk_lens) - 1, 0), rows])
        return self.logits(h[rows]), new_cache


def build_model(cfg: ModelConfig, dtype=jnp.float32, seed: int = 0) -> LlamaModel:
    return LlamaModel(cfg, dtype, rngs=nnx.Rngs(seed))


def make_forward(graphdef, attention_backend: str = "reference"):
    """Pure forward(params, kv_cache, batch) -> (logits, kv_cache) for jax.jit."""

    def forward(params, kv_cache, batch: StepBatch):
        model = nnx.merge(graphdef, params)
        return model.step(kv_cache, batch, attention_backend)

    return forward


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype=jnp.float32, sharding=None):
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    # Always committed to a device: step outputs are, and a committed/uncommitted mismatch between
    # warmup's first call and serving would be a different executable (a recompile while serving).
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    make = jax.jit(partial(jnp.zeros, shape, dtype), out_shardings=sharding)
    return [(make(), make()) for _ in range(cfg.num_layers)]
