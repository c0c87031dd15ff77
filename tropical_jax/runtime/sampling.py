"""On-device sampling, one row per sequence: greedy, temperature, top-k, top-p, per-request seed.

The key of a row is fold_in(key(seed), n), n = tokens that request has generated so far, so a
seeded request draws the same tokens whatever it is batched with (and after a preemption).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits, temperature, top_k, top_p, seeds, steps):
    """logits f32[R, V]; temperature/top_p f32[R]; top_k/steps int32[R] (top_k <= 0: off); seeds uint32[R]."""
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    keep = jnp.arange(vocab)[None, :] < k[:, None]
    ranked = jnp.where(keep, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    keep &= (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    ranked = jnp.where(keep, ranked, -jnp.inf)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, steps)
    choice = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, ranked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature == 0, greedy, sampled)
