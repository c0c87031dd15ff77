"""Paged attention for one step (a prefill chunk and a decode batch), with a backend switch.

The reference backend gathers each sequence's pages and runs a masked softmax in plain jnp. The
"pallas" backend hands the whole step to the kernels in `pallas_kernels` (which also write K/V).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.engine_adapter import step_slots
from pallas_kernels.kv_write import write_kv_reference

from .step_batch import StepBatch


def write_kv(k_pool, v_pool, k, v, batch: StepBatch):
    """Scatter this step's K/V ([C+B, kvh, hd]) into the pools ([pages, page_size, kvh, hd]).

    Indexed by (page, offset), never through a flat [pages * page_size] view: XLA CPU turns a
    one-token scatter into the flat view into a dynamic-update-slice plus a copy of the whole pool
    (192 vs 6 ms a decode step at batch 1 with 2048 pages)."""
    return write_kv_reference(k_pool, v_pool, k, v, step_slots(batch, k_pool.shape[1]))


def _attend(q, keys, values, mask):
    """q [N, q_len, H, D], keys/values [N, K, kvh, D], mask [N, q_len, K] -> [N, q_len, H, D]."""
    n, q_len, heads, dim = q.shape
    kvh = keys.shape[2]
    qg = q.reshape(n, q_len, kvh, heads // kvh, dim).astype(jnp.float32)
    scores = jnp.einsum("nqhgd,nkhd->nhgqk", qg, keys.astype(jnp.float32)) / jnp.sqrt(jnp.float32(dim))
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0.0)  # rows with no visible key give zeros, not NaN
    out = jnp.einsum("nhgqk,nkhd->nqhgd", probs, values.astype(jnp.float32))
    return out.reshape(n, q_len, heads, dim).astype(q.dtype)


def _gather(pool, block_tables):
    """pool [pages, page_size, kvh, D], tables [N, P] -> [N, P * page_size, kvh, D]."""
    g = pool[block_tables]
    return g.reshape(block_tables.shape[0], -1, *pool.shape[2:])


def reference_attention(q, k, v, k_pool, v_pool, batch: StepBatch):
    """q [C+B, H, D]; k/v [C+B, kvh, D] (new tokens, already rotated). Returns (out, k_pool, v_pool)."""
    k_pool, v_pool = write_kv(k_pool, v_pool, k, v, batch)
    c = batch.chunk_size
    outs = []
    if c:
        keys = _gather(k_pool, batch.chunk_block_table[None])
        values = _gather(v_pool, batch.chunk_block_table[None])
        q_pos = batch.chunk_start + jnp.arange(c)
        k_pos = jnp.arange(keys.shape[1])
        mask = k_pos[None, :] <= q_pos[:, None]
        outs.append(_attend(q[None, :c], keys, values, mask[None])[0])
    if batch.batch_size:
        keys = _gather(k_pool, batch.dec_block_tables)
        values = _gather(v_pool, batch.dec_block_tables)
        k_pos = jnp.arange(keys.shape[1])
        mask = (k_pos[None, :] <= batch.dec_positions[:, None]) & batch.dec_mask[:, None]
        outs.append(_attend(q[c:, None], keys, values, mask[:, None])[:, 0])
    return jnp.concatenate(outs), k_pool, v_pool


def pallas_attention(q, k, v, k_pool, v_pool, batch: StepBatch):
    from pallas_kernels.engine_adapter import step_attention  # imported lazily: only this backend needs it

    return step_attention(q, k, v, k_pool, v_pool, batch)


BACKENDS = {"reference": reference_attention, "pallas": pallas_attention}


def get_backend(name: str):
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention_backend {name!r}; choose one of {sorted(BACKENDS)}") from None
