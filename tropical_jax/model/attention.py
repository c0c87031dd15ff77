"""Paged attention for one step (a prefill chunk and a decode batch), with a backend switch.

The reference backend is plain jnp. The chunk gathers its segments' pages and runs a masked softmax. The
decode batch walks its pages a block at a time with an online softmax, stopping after the longest
sequence of the batch: a step reads the context it has, not the whole context bucket, and each
block's gathered keys stay in cache (at batch 32 on CPU, 3x faster than one softmax over the
bucket). The "pallas" backend hands the whole step to the kernels in `pallas_kernels` (which also
write K/V).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._common import NEG, finish, online_softmax_update
from pallas_kernels.engine_adapter import chunk_layout, step_slots
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


DECODE_BLOCK_TOKENS = 32  # keys per iteration of the decode loop (rounded to whole pages)


def decode_attention(q, k_pool, v_pool, block_tables, positions, mask):
    """q [B, H, D]; tables [B, P]; row i attends to its tokens 0..positions[i] (none if not mask[i]).
    Returns [B, H, D]; rows that attend to nothing are zeros.

    A block's keys and values stay token-major as gathered ([B, T, kvh, D]) and the dots say which
    axes they contract: XLA CPU fuses the gather into the layout each dot wants. Transposing them
    head-major first cost a copy more (whole decode steps at batch 8 and 32 5-10% slower:
    bench/results/attention_ab.md)."""
    b, heads, dim = q.shape
    page_size, kvh = k_pool.shape[1], k_pool.shape[2]
    lengths = jnp.where(mask, positions + 1, 0)
    pages = max(1, DECODE_BLOCK_TOKENS // page_size)
    block = pages * page_size
    tables = jnp.pad(block_tables, ((0, 0), (0, -block_tables.shape[1] % pages)))
    qg = q.reshape(b, kvh, heads // kvh, dim).astype(jnp.float32) / jnp.sqrt(jnp.float32(dim))

    def weigh(p, values):
        return jnp.einsum("bhgt,bthd->bhgd", p, values)

    def step(carry):
        i, m, l, acc = carry
        ids = jax.lax.dynamic_slice_in_dim(tables, i * pages, pages, axis=1)
        visible = i * block + jnp.arange(block) < lengths[:, None]  # [b, t]
        keys, values = (_gather(pool, ids).astype(jnp.float32) for pool in (k_pool, v_pool))
        values = jnp.where(visible[:, :, None, None], values, 0.0)  # rows past a length never reach the sum
        s = jnp.einsum("bhgd,bthd->bhgt", qg, keys)
        return (i + 1, *online_softmax_update(m, l, acc, s, visible[:, None, None, :], values, weigh))

    rows = (b, kvh, heads // kvh)
    blocks = (jnp.max(lengths) + block - 1) // block
    init = (jnp.int32(0), jnp.full(rows + (1,), NEG), jnp.zeros(rows + (1,)), jnp.zeros(rows + (dim,)))
    _, _, l, acc = jax.lax.while_loop(lambda c: c[0] < blocks, step, init)
    return finish(l, acc).reshape(b, heads, dim).astype(q.dtype)


def chunk_attention(q, k_pool, v_pool, batch: StepBatch):
    """q [C, H, D] of the chunk's segments -> [C, H, D] (padding rows zeros).

    The pages the segments read are gathered back to back (segment i's first
    ceil((start + len) / page_size) pages; together they fit the context bucket, which the host
    ensures), each key tagged with its segment and position: one segment costs what one prompt
    always did, and packed segments cost no more than one of their total length."""
    page_size = k_pool.shape[1]
    tables, starts, lens = batch.chunk_block_tables, batch.chunk_starts, batch.chunk_lens
    n, p = tables.shape
    seg, pos, valid = chunk_layout(batch)
    used = jnp.where(lens > 0, (starts + lens + page_size - 1) // page_size, 0)
    ends = jnp.cumsum(used)
    j = jnp.arange(p)
    page_seg = jnp.minimum(jnp.searchsorted(ends, j, side="right", method="compare_all"), n - 1)
    page_index = jnp.clip(j - (ends[page_seg] - used[page_seg]), 0, p - 1)
    pages = tables[page_seg, page_index]
    key_seg = jnp.repeat(jnp.where(j < ends[-1], page_seg, -1), page_size)
    key_pos = (page_index[:, None] * page_size + jnp.arange(page_size)).reshape(-1)
    keys, values = _gather(k_pool, pages[None]), _gather(v_pool, pages[None])
    mask = (key_seg[None, :] == seg[:, None]) & (key_pos[None, :] <= pos[:, None]) & valid[:, None]
    return _attend(q[None], keys, values, mask[None])[0]


def reference_attention(q, k, v, k_pool, v_pool, batch: StepBatch):
    """q [C+B, H, D]; k/v [C+B, kvh, D] (new tokens, already rotated). Returns (out, k_pool, v_pool)."""
    k_pool, v_pool = write_kv(k_pool, v_pool, k, v, batch)
    c = batch.chunk_size
    outs = []
    if c:
        outs.append(chunk_attention(q[:c], k_pool, v_pool, batch))
    if batch.batch_size:
        outs.append(decode_attention(q[c:], k_pool, v_pool, batch.dec_block_tables, batch.dec_positions,
                                     batch.dec_mask))
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
