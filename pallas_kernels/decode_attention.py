"""Paged decode attention: one query token per sequence, GQA, pages via block tables.

    q            [B, num_heads, head_dim]
    k/v pool     [num_pages, page_size, kv_heads, head_dim]   (the engine's layout)
    block_tables int32[B, P]    page ids of each sequence (entries past its length are ignored)
    lengths      int32[B]       tokens in the cache for each sequence; 0 marks a padding slot
    -> out       [B, num_heads, head_dim] in q's dtype; padding slots are zeros.
Scale is 1/sqrt(head_dim); softmax in f32, online over blocks of pages.

Three implementations with one contract: `paged_decode_reference` (pure jnp gather + masked
softmax), `paged_decode_tpu` (Mosaic: tables by scalar prefetch, manual double-buffered DMA) and
`paged_decode_gpu` (Triton: pointer gathers through the block table, optional split-K).
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from . import _tpu
from ._common import (NEG, cdiv, check_pools, finish, next_pow2, online_softmax_update, out_struct,
                      scores)


def paged_decode_reference(q, k_pool, v_pool, block_tables, lengths):
    kvh, g, d, ps = check_pools(q, k_pool, v_pool)
    b, p = block_tables.shape
    k = k_pool[block_tables].reshape(b, p * ps, kvh, d)
    v = v_pool[block_tables].reshape(b, p * ps, kvh, d)
    qg = q.reshape(b, kvh, g, d)
    s = jnp.einsum("bhgd,bthd->bhgt", qg, k, preferred_element_type=jnp.float32,
                   precision="highest") / math.sqrt(d)
    live = jnp.arange(p * ps)[None, :] < lengths[:, None]
    valid = live[:, None, None, :]
    w = jax.nn.softmax(jnp.where(valid, s, NEG), axis=-1)
    # Slots past a sequence's length may hold anything (even NaN); never let it reach the sum.
    v = jnp.where(live[:, :, None, None], v.astype(jnp.float32), 0.0)
    o = jnp.einsum("bhgt,bthd->bhgd", w, v, precision="highest")
    o = jnp.where((lengths > 0)[:, None, None, None], o, 0.0)
    return o.reshape(q.shape).astype(q.dtype)


# ----------------------------------------------------------------------------------------- TPU

def _decode_tpu_kernel(lengths_ref, tables_ref, next_ref, first_ref,  # scalar prefetch (SMEM)
                       q_ref, k_hbm, v_hbm, o_ref,
                       k_buf, v_buf, sems, slot_ref, m_ref, l_ref, acc_ref,
                       *, pages_per_seq, groups, scale):
    b, hblk = pl.program_id(0), pl.program_id(1)
    num_seqs, num_hblk = pl.num_programs(0), pl.num_programs(1)
    _, ppb, ps, hb, _ = k_buf.shape
    bk = ppb * ps
    copier = _tpu.PageBlockCopier(k_hbm, v_hbm, k_buf, v_buf, sems, tables_ref, pages_per_seq)
    length = lengths_ref[b]

    def live_pages(seq):
        return cdiv(lengths_ref[seq], ps)

    @pl.when(length == 0)
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)

    @pl.when(length > 0)
    def _():
        # Every live step prefetches the first block of the next live step, so only the very
        # first one starts its own; slot_ref says which buffer that prefetch went to.
        @pl.when((b == first_ref[0]) & (hblk == 0))
        def _():
            copier.start(b, hblk, 0, 0, live_pages(b))
            slot_ref[0] = 0

        slot0 = slot_ref[0]
        num_blocks = cdiv(length, bk)
        same_seq = hblk + 1 < num_hblk
        next_seq = jnp.where(same_seq, b, next_ref[b])
        next_hblk = jnp.where(same_seq, hblk + 1, 0)
        has_next = same_seq | (next_ref[b] < num_seqs)
        m_ref[...] = jnp.full_like(m_ref, NEG)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

        def body(j, carry):
            slot = jax.lax.rem(slot0 + j, 2)

            @pl.when(j + 1 < num_blocks)
            def _():
                copier.start(b, hblk, j + 1, 1 - slot, live_pages(b))

            @pl.when((j + 1 == num_blocks) & has_next)
            def _():
                copier.start(next_seq, next_hblk, 0, 1 - slot, live_pages(next_seq))

            copier.wait(b, hblk, j, slot, live_pages(b))
            col_ok = j * bk + jax.lax.broadcasted_iota(jnp.int32, (groups, bk), 1) < length
            row_ok = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < length
            for h in range(hb):
                k = _tpu.load_head_rows(k_buf.at[slot], h)
                v = jnp.where(row_ok, _tpu.load_head_rows(v_buf.at[slot], h), 0)
                q = q_ref[pl.ds(h * groups, groups), :].astype(k.dtype)
                m, l, acc = online_softmax_update(m_ref[h][:, :1], l_ref[h][:, :1], acc_ref[h],
                                                  scores(q, k, scale), col_ok, v)
                m_ref[h] = jnp.broadcast_to(m, m_ref.shape[1:])
                l_ref[h] = jnp.broadcast_to(l, l_ref.shape[1:])
                acc_ref[h] = acc
            return carry

        jax.lax.fori_loop(0, num_blocks, body, 0)
        slot_ref[0] = jax.lax.rem(slot0 + num_blocks, 2)
        for h in range(hb):
            o_ref[pl.ds(h * groups, groups), :] = finish(
                l_ref[h][:, :1], acc_ref[h]).astype(o_ref.dtype)


def paged_decode_tpu(q, k_pool, v_pool, block_tables, lengths, *, pages_per_block=None,
                     kv_heads_per_block=None, interpret=False):
    """Grid (sequence, kv-head block); the page blocks of a sequence are an in-kernel loop
    bounded by its length (a grid axis over all P pages would cost a step per padded block),
    double-buffered, and the last block also prefetches the next grid step's first block."""
    kvh, g, d, ps = check_pools(q, k_pool, v_pool)
    batch, pages_per_seq = block_tables.shape
    hb = _tpu.heads_per_block(kvh, k_pool.dtype, kv_heads_per_block)
    ppb = _tpu.pages_per_block(ps, hb, d, k_pool.dtype, pages_per_seq, pages_per_block)
    rows = _tpu.split_rows(batch, pages_per_seq)
    call = functools.partial(_decode_tpu_call, k_pool=k_pool, v_pool=v_pool, hb=hb, ppb=ppb,
                             interpret=interpret)
    outs = [call(q[i:i + rows], block_tables[i:i + rows], lengths[i:i + rows])
            for i in range(0, batch, rows)]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs)


def _decode_tpu_call(q, block_tables, lengths, *, k_pool, v_pool, hb, ppb, interpret):
    batch, num_heads, d = q.shape
    _, ps, kvh, _ = k_pool.shape
    g = num_heads // kvh
    # q as [B, H, 1, D] with the unit dim squeezed by the BlockSpec: the kernel sees [hb*G, D]
    # with one row per tile, which Mosaic accepts for any G (same trick as jax's TPU
    # paged_attention, which also launches q in f32 in that case).
    q_dtype = q.dtype if g % 8 == 0 else jnp.float32
    qk = q.reshape(batch, num_heads, 1, d).astype(q_dtype)
    spec = pl.BlockSpec((None, hb * g, None, d), lambda b, h, *_: (b, h, 0, 0))
    nxt, first = _tpu.next_live(lengths > 0)
    kernel = functools.partial(_decode_tpu_kernel, pages_per_seq=block_tables.shape[1],
                               groups=g, scale=1.0 / math.sqrt(d))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(batch, kvh // hb),
            in_specs=[spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=spec,
            scratch_shapes=_tpu.scratch_shapes(ppb, ps, hb, d, k_pool.dtype, g)),
        out_shape=out_struct(qk.shape, q_dtype, qk, k_pool),
        # Sequential on purpose: the DMA chain runs across grid steps.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        interpret=interpret,
        name="paged_decode_tpu",
    )(lengths, block_tables.reshape(-1), nxt, first, qk, k_pool, v_pool)
    return out.reshape(q.shape).astype(q.dtype)


# ----------------------------------------------------------------------------------------- GPU

def _decode_gpu_kernel(tables_ref, lengths_ref, q_ref, k_ref, v_ref, acc_out, m_out, l_out,
                       *, ppb, blocks_per_split, scale):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ps, d = k_ref.shape[1], k_ref.shape[3]
    bk = ppb * ps
    length = lengths_ref[b]
    q = q_ref[...]
    rows = q.shape[0]
    first = split * blocks_per_split
    num_blocks = jnp.clip(cdiv(length, bk) - first, 0, blocks_per_split)

    def body(i, carry):
        j = first + i
        # Entries past the live pages may be anything the host left there: read page 0 instead.
        live = (j * ppb + jax.lax.broadcasted_iota(jnp.int32, (ppb,), 0)) * ps < length
        pages = jnp.where(live, tables_ref[b, pl.ds(j * ppb, ppb)], 0)
        k = k_ref[pages, :, h, :].reshape(bk, d)
        v = v_ref[pages, :, h, :].reshape(bk, d)
        ok = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0) < length
        v = jnp.where(ok[:, None], v, 0)
        mask = jnp.broadcast_to(ok[None, :], (rows, bk))
        return online_softmax_update(*carry, scores(q, k.astype(q.dtype), scale), mask, v)

    init = (jnp.full((rows, 1), NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    acc_out[...] = acc
    m_out[...] = m[:, 0]
    l_out[...] = l[:, 0]


def combine_splits(acc, m, l):
    """Merge split-K partials: acc [S, ..., R, D], m/l [S, ..., R] -> normalised [..., R, D]."""
    m_all = jnp.max(m, axis=0)
    w = jnp.exp(m - m_all[None])
    l_all = jnp.sum(w * l, axis=0)
    return finish(l_all[..., None], jnp.sum(w[..., None] * acc, axis=0))


def paged_decode_gpu(q, k_pool, v_pool, block_tables, lengths, *, pages_per_block=None,
                     num_splits=None, num_warps=4, num_stages=2, interpret=False):
    """Grid (sequence, kv head, split). Each program gathers whole pages of its kv head through
    the block table; query heads of a group are padded to >= 16 rows (tensor-core dot minimum).
    With few (sequence, head) programs the page range is split (flash-decoding) so that every
    SM streams KV; the partial softmaxes are merged in jnp."""
    kvh, g, d, ps = check_pools(q, k_pool, v_pool)
    batch, pages_per_seq = block_tables.shape
    if d != next_pow2(d) or ps != next_pow2(ps):
        raise NotImplementedError(f"Triton blocks must be powers of two: head_dim={d}, page_size={ps}")
    rows = max(16, next_pow2(g))
    ppb = pages_per_block or max(1, min(next_pow2(pages_per_seq), max(1, 64 // ps)))
    ppb = max(ppb, cdiv(16, ps))  # dot needs >= 16 keys
    if ppb != next_pow2(ppb):
        raise ValueError(f"pages_per_block={ppb} must be a power of two (Triton block)")
    total_blocks = cdiv(pages_per_seq, ppb)
    if num_splits is None:  # aim for ~2 programs per SM on a 132-SM H100
        num_splits = max(1, min(total_blocks, 264 // max(1, batch * kvh)))
    blocks_per_split = cdiv(total_blocks, num_splits)
    padded_pages = num_splits * blocks_per_split * ppb
    tables = jnp.pad(block_tables, ((0, 0), (0, padded_pages - pages_per_seq)))
    qg = jnp.pad(q.reshape(batch, kvh, g, d), ((0, 0), (0, 0), (0, rows - g), (0, 0)))
    kernel = functools.partial(_decode_gpu_kernel, ppb=ppb, blocks_per_split=blocks_per_split,
                               scale=1.0 / math.sqrt(d))
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(batch, kvh, num_splits),
        in_specs=[
            pl.BlockSpec(tables.shape, lambda b, h, s: (0, 0)),
            pl.BlockSpec(lengths.shape, lambda b, h, s: (0,)),
            pl.BlockSpec((None, None, rows, d), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec(k_pool.shape, lambda b, h, s: (0, 0, 0, 0)),
            pl.BlockSpec(v_pool.shape, lambda b, h, s: (0, 0, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, d), lambda b, h, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0)),
        ],
        out_shape=[out_struct((num_splits, batch, kvh, rows, d), jnp.float32, qg, k_pool),
                   out_struct((num_splits, batch, kvh, rows), jnp.float32, qg, k_pool),
                   out_struct((num_splits, batch, kvh, rows), jnp.float32, qg, k_pool)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="paged_decode_gpu",
    )(tables, lengths, qg, k_pool, v_pool)
    out = combine_splits(acc, m, l)[:, :, :g]
    return out.reshape(q.shape).astype(q.dtype)
