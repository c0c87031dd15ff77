"""Paged attention for one step (a prefill chunk and a decode batch), with a backend switch.

The reference backend is plain jnp, and both of its parts walk the pages they read a block at a time
with an online softmax, stopping at the last page in use: a step reads the context it has, not the
whole context bucket, and each block's gathered keys stay in cache. The decode batch stops after its
longest sequence (at batch 32 on CPU, 3x faster than one softmax over the bucket). The chunk's
segments read their pages back to back, and each block of query rows walks only the pages its rows
can see, so padding rows and other segments' pages cost nothing (on the CPU's coarse buckets, one
1024-token context, a prompt's prefill costs what it does on the fine ones up to its chunk's
padding: bench/results/bucket_price.md). The "pallas" backend hands the whole step to the kernels
in `pallas_kernels` (which also write K/V).
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


# The chunk's loops: query rows per outer iteration, keys per inner one (rounded to whole pages). On CPU
# whole prefill steps ran within noise of each other from 32 to 128 of either; 256 keys cost short prompts.
CHUNK_ROW_BLOCK = 64
CHUNK_KEY_BLOCK_TOKENS = 64


def _chunk_keys(batch: StepBatch, page_size: int, pad: int):
    """The pages the chunk's segments read, back to back (segment i's first
    ceil((start + len) / page_size) pages; together they fit the context bucket, which the host
    ensures), then `pad` more -> (page ids, each key's segment (-1 where no segment wrote it: past
    a segment's last token or past the last page in use), each key's position in its sequence,
    where each segment's pages begin)."""
    tables, starts, lens = batch.chunk_block_tables, batch.chunk_starts, batch.chunk_lens
    n, p = tables.shape
    used = jnp.where(lens > 0, (starts + lens + page_size - 1) // page_size, 0)
    ends = jnp.cumsum(used)
    j = jnp.arange(p + pad)
    page_seg = jnp.minimum(jnp.searchsorted(ends, j, side="right", method="compare_all"), n - 1)
    page_index = jnp.clip(j - (ends[page_seg] - used[page_seg]), 0, p - 1)
    key_seg = jnp.repeat(jnp.where(j < ends[-1], page_seg, -1), page_size)
    key_pos = (page_index[:, None] * page_size + jnp.arange(page_size)).reshape(-1)
    key_seg = jnp.where(key_pos < (starts + lens)[key_seg], key_seg, -1)
    return tables[page_seg, page_index], key_seg, key_pos, ends - used


def chunk_attention(q, k_pool, v_pool, batch: StepBatch):
    """q [C, H, D] of the chunk's segments -> [C, H, D] (padding rows zeros).

    Each key is tagged with its segment and position (_chunk_keys). The live rows go a block at a
    time, and each row block walks, a block of keys at a time with an online softmax, only the pages
    its rows can see: from its first segment's first page to its last row's page. So a step costs
    the context its segments read, never the rest of the context bucket, and neither the padding
    rows after the segments nor packed segments' pages that only another block's rows read."""
    c, heads, dim = q.shape
    page_size, kvh = k_pool.shape[1], k_pool.shape[2]
    per = max(1, CHUNK_KEY_BLOCK_TOKENS // page_size)
    pages, key_seg, key_pos, first_page = _chunk_keys(batch, page_size, per)
    seg, pos, valid = chunk_layout(batch)
    rows = min(CHUNK_ROW_BLOCK, c)
    live = jnp.sum(batch.chunk_lens)
    pad = -c % rows  # the last row block may run past the chunk
    qg = jnp.pad(q.reshape(c, kvh, heads // kvh, dim).astype(jnp.float32) / jnp.sqrt(jnp.float32(dim)),
                 ((0, pad), (0, 0), (0, 0), (0, 0)))
    row_seg = jnp.pad(jnp.where(valid, seg, -2), (0, pad), constant_values=-2)  # padding rows see no key
    pos = jnp.pad(pos, (0, pad))

    def weigh(probs, values):
        return jnp.einsum("hgct,thd->hgcd", probs, values)

    def row_block(b, out):
        block_q, block_seg, block_pos = (jax.lax.dynamic_slice_in_dim(a, b * rows, rows) for a in (qg, row_seg, pos))
        last = jnp.minimum(b * rows + rows, live) - 1
        lo = first_page[seg[b * rows]]
        hi = first_page[seg[last]] + pos[last] // page_size + 1

        def step(carry):
            i, m, l, acc = carry
            ids = jax.lax.dynamic_slice_in_dim(pages, i, per)
            kseg, kpos = (jax.lax.dynamic_slice_in_dim(a, i * page_size, per * page_size) for a in (key_seg, key_pos))
            visible = (kseg[None, :] == block_seg[:, None]) & (kpos[None, :] <= block_pos[:, None])
            keys, values = (_gather(pool, ids[None])[0].astype(jnp.float32) for pool in (k_pool, v_pool))
            values = jnp.where((kseg >= 0)[:, None, None], values, 0.0)  # stale pool rows never reach the sum
            s = jnp.einsum("chgd,thd->hgct", block_q, keys)
            return (i + per, *online_softmax_update(m, l, acc, s, visible, values, weigh))

        shape = (kvh, heads // kvh, rows)
        init = (lo, jnp.full(shape + (1,), NEG), jnp.zeros(shape + (1,)), jnp.zeros(shape + (dim,)))
        _, _, l, acc = jax.lax.while_loop(lambda carry: carry[0] < hi, step, init)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.einsum("hgcd->chgd", finish(l, acc)), b * rows, 0)

    out = jax.lax.fori_loop(0, (live + rows - 1) // rows, row_block, jnp.zeros(qg.shape))
    return out[:c].reshape(c, heads, dim).astype(q.dtype)


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
