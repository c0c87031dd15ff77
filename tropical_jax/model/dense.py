"""A dense causal forward over the same modules, for training (no KV cache, no pages)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .rope import apply_rope, inverse_frequencies


def dense_logits(model, tokens):
    """tokens int32[B, T] -> logits f32[B, T, vocab], full causal attention."""
    cfg = model.config
    b, t = tokens.shape
    inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    positions = jnp.arange(t)
    groups = cfg.num_heads // cfg.num_kv_heads
    mask = jnp.tril(jnp.ones((t, t), bool))
    h = model.embed_tokens(tokens)
    rope = jax.vmap(lambda x: apply_rope(x, positions, inv_freq))
    for layer in model.layers:
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = rope(a.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim))
        k = rope(a.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim))
        v = a.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(cfg.head_dim))
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        h = h + a.o_proj(jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.logits(h)
