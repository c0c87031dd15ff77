"""Ragged paged attention: prefill chunks and decode tokens of several sequences in one call.

    q            [T, num_heads, head_dim]   the query tokens of all sequences, back to back
    k/v pool     [num_pages, page_size, kv_heads, head_dim]
    block_tables int32[S, P]
    kv_lens      int32[S]    tokens in the cache for sequence i, *including* its new tokens
                             (their K/V must already be written to the pages)
    cu_q_lens    int32[S+1]  sequence i owns tokens cu_q_lens[i] : cu_q_lens[i+1]
    num_seqs     int32[1]    live sequences; slots from num_seqs on are padding and ignored
    -> out       [T, num_heads, head_dim]

The q tokens of a sequence are its last q_len positions (kv_len - q_len ...), causal among
themselves and over the cached prefix: a prefill chunk has q_len > 1, a decode token q_len == 1.
Tokens past cu_q_lens[num_seqs], and rows with no visible key (kv_len == 0), come out as zeros.
All shapes are fixed; only the int32 metadata changes between steps.
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


def _live_bounds(cu_q_lens, num_seqs):
    """cu_q_lens with padding slots collapsed to empty ranges at the end; and the live token count."""
    n = num_seqs[0]
    total = cu_q_lens[n]
    idx = jnp.arange(cu_q_lens.shape[0])
    return jnp.where(idx <= n, cu_q_lens, total), total


def _token_seq(cu, tokens):
    """Index of the sequence owning each token (ties from empty sequences resolve to the owner)."""
    return jnp.clip(jnp.searchsorted(cu, tokens, side="right") - 1, 0, cu.shape[0] - 2)


def ragged_paged_attention_reference(q, k_pool, v_pool, block_tables, kv_lens, cu_q_lens, num_seqs):
    kvh, g, d, ps = check_pools(q, k_pool, v_pool)
    t_max = q.shape[0]
    s_max, p = block_tables.shape
    cu, total = _live_bounds(cu_q_lens, num_seqs)
    t = jnp.arange(t_max)
    seq = _token_seq(cu, t)
    q_len = cu[seq + 1] - cu[seq]
    pos = kv_lens[seq] - q_len + (t - cu[seq])
    k = k_pool[block_tables].reshape(s_max, p * ps, kvh, d)[seq]
    v = v_pool[block_tables].reshape(s_max, p * ps, kvh, d)[seq]
    qg = q.reshape(t_max, kvh, g, d)
    s = jnp.einsum("thgd,tlhd->thgl", qg, k, preferred_element_type=jnp.float32,
                   precision="highest") / math.sqrt(d)
    col = jnp.arange(p * ps)[None, :]
    valid = (col <= pos[:, None]) & (col < kv_lens[seq][:, None]) & (t < total)[:, None]
    valid = valid[:, None, None, :]
    w = jax.nn.softmax(jnp.where(valid, s, NEG), axis=-1)
    # Slots past a sequence's kv_len may hold anything (even NaN); never let it reach the sum.
    v = jnp.where((col < kv_lens[seq][:, None])[:, :, None, None], v.astype(jnp.float32), 0.0)
    o = jnp.einsum("thgl,tlhd->thgd", w, v, precision="highest")
    o = jnp.where(valid.any(axis=-1, keepdims=True), o, 0.0)
    return o.reshape(q.shape).astype(q.dtype)


def _grouped_rows(q, kvh, groups, tokens):
    """[T, H, D] -> [KVH, tokens * groups, D]: each kv head's queries as one 2D slab (token-major),
    padded with zero tokens and zero heads. Copies q (tiny next to the KV stream) so that the
    kernels see plain 2D tiles."""
    t, h, d = q.shape
    g = h // kvh
    qg = jnp.pad(q.reshape(t, kvh, g, d), ((0, tokens - t), (0, 0), (0, groups - g), (0, 0)))
    return qg.transpose(1, 0, 2, 3).reshape(kvh, tokens * groups, d)


def _ungroup_rows(o, t, h, groups):
    kvh, _, d = o.shape
    o = o.reshape(kvh, -1, groups, d)[:, :t, :h // kvh].transpose(1, 0, 2, 3)
    return o.reshape(t, h, d)


# ----------------------------------------------------------------------------------------- TPU
# Work items: the q blocks are aligned tiles of tq tokens (so plain BlockSpecs move them), and a
# tile may hold the tokens of several sequences. One grid step handles one (tile, sequence)
# pair; consecutive steps on the same tile revisit the same output block, each writing only its
# own rows. There are at most num_tiles + S such pairs, which fixes the grid size.
_QB, _SEQ, _R0, _R1, _POS0, _KV_END, _INIT, _NEXT = range(8)


def _tpu_work_items(cu, total, kv_lens, tq, num_tiles):
    s_max = kv_lens.shape[0]
    n_items = num_tiles + s_max
    lo = jnp.arange(num_tiles, dtype=jnp.int32) * tq
    has_tokens = lo < total
    first = _token_seq(cu, lo)
    last = _token_seq(cu, jnp.minimum(lo + tq, total) - 1)
    count = jnp.where(has_tokens, last - first + 1, 1)
    offset = jnp.cumsum(count) - count
    k = jnp.arange(n_items, dtype=jnp.int32)
    valid = k < jnp.sum(count)
    qb = jnp.where(valid, jnp.clip(jnp.searchsorted(offset, k, side="right") - 1, 0, num_tiles - 1),
                   num_tiles - 1)
    seq_ok = valid & has_tokens[qb]
    seq = jnp.where(seq_ok, first[qb] + k - offset[qb], 0)
    tile_lo = qb * tq
    r0 = jnp.clip(cu[seq] - tile_lo, 0, tq)
    r1 = jnp.where(seq_ok, jnp.clip(cu[seq + 1] - tile_lo, 0, tq), r0)
    pos0 = kv_lens[seq] - (cu[seq + 1] - cu[seq]) + tile_lo - cu[seq]
    kv_end = jnp.where(r1 > r0, jnp.clip(pos0 + r1, 0, kv_lens[seq]), 0)
    init = (valid & (k == offset[qb])).astype(jnp.int32)
    nxt, first_work = _tpu.next_live(kv_end > 0)
    meta = jnp.stack([qb, seq, r0, r1, pos0, kv_end, init, nxt]).astype(jnp.int32)
    return meta, first_work.astype(jnp.int32)


def _ragged_tpu_kernel(meta_ref, tables_ref, first_ref,  # scalar prefetch (SMEM)
                       q_ref, k_hbm, v_hbm, o_ref,
                       k_buf, v_buf, sems, slot_ref, m_ref, l_ref, acc_ref,
                       *, pages_per_seq, groups, scale):
    hblk, item = pl.program_id(0), pl.program_id(1)
    num_hblk, num_items = pl.num_programs(0), pl.num_programs(1)
    _, ppb, ps, hb, _ = k_buf.shape
    bk = ppb * ps
    rows = q_ref.shape[1]
    copier = _tpu.PageBlockCopier(k_hbm, v_hbm, k_buf, v_buf, sems, tables_ref, pages_per_seq)
    kv_end = meta_ref[_KV_END, item]
    seq = meta_ref[_SEQ, item]

    def live_pages(i):
        return cdiv(meta_ref[_KV_END, i], ps)

    @pl.when(meta_ref[_INIT, item] == 1)
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)

    @pl.when(kv_end > 0)
    def _():
        # Same cross-step DMA chain as the decode kernel, over (head block, item) steps with work.
        @pl.when((hblk == 0) & (item == first_ref[0]))
        def _():
            copier.start(seq, hblk, 0, 0, live_pages(item))
            slot_ref[0] = 0

        slot0 = slot_ref[0]
        num_blocks = cdiv(kv_end, bk)
        nxt = meta_ref[_NEXT, item]
        same_hblk = nxt < num_items
        next_item = jnp.where(same_hblk, nxt, first_ref[0])
        next_hblk = jnp.where(same_hblk, hblk, hblk + 1)
        has_next = same_hblk | ((hblk + 1 < num_hblk) & (first_ref[0] < num_items))
        next_seq = meta_ref[_SEQ, jnp.minimum(next_item, num_items - 1)]
        token = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0), groups)
        row_ok = (token >= meta_ref[_R0, item]) & (token < meta_ref[_R1, item])
        pos = meta_ref[_POS0, item] + token
        m_ref[...] = jnp.full_like(m_ref, NEG)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

        def body(j, carry):
            slot = jax.lax.rem(slot0 + j, 2)

            @pl.when(j + 1 < num_blocks)
            def _():
                copier.start(seq, hblk, j + 1, 1 - slot, live_pages(item))

            @pl.when((j + 1 == num_blocks) & has_next)
            def _():
                copier.start(next_seq, next_hblk, 0, 1 - slot, live_pages(next_item))

            copier.wait(seq, hblk, j, slot, live_pages(item))
            col = j * bk + jax.lax.broadcasted_iota(jnp.int32, (rows, bk), 1)
            mask = (col <= pos) & row_ok
            v_ok = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < kv_end
            for h in range(hb):
                k = _tpu.load_head_rows(k_buf.at[slot], h)
                v = jnp.where(v_ok, _tpu.load_head_rows(v_buf.at[slot], h), 0)
                m, l, acc = online_softmax_update(m_ref[h][:, :1], l_ref[h][:, :1], acc_ref[h],
                                                  scores(q_ref[h].astype(k.dtype), k, scale),
                                                  mask, v)
                m_ref[h] = jnp.broadcast_to(m, m_ref.shape[1:])
                l_ref[h] = jnp.broadcast_to(l, l_ref.shape[1:])
                acc_ref[h] = acc
            return carry

        jax.lax.fori_loop(0, num_blocks, body, 0)
        slot_ref[0] = jax.lax.rem(slot0 + num_blocks, 2)
        for h in range(hb):
            out = finish(l_ref[h][:, :1], acc_ref[h]).astype(o_ref.dtype)
            o_ref[h] = jnp.where(row_ok, out, o_ref[h])


def ragged_paged_attention_tpu(q, k_pool, v_pool, block_tables, kv_lens, cu_q_lens, num_seqs, *,
                               q_tile=None, pages_per_block=None, kv_heads_per_block=None,
                               interpret=False):
    kvh, g, d, ps = check_pools(q, k_pool, v_pool)
    t = q.shape[0]
    s_max, pages_per_seq = block_tables.shape
    if s_max * pages_per_seq > _tpu.MAX_SMEM_TABLE_ENTRIES:
        raise ValueError(f"block tables ({s_max}x{pages_per_seq}) exceed the SMEM budget")
    hb = _tpu.heads_per_block(kvh, k_pool.dtype, kv_heads_per_block)
    ppb = _tpu.pages_per_block(ps, hb, d, k_pool.dtype, pages_per_seq, pages_per_block)
    # Tiles of tq tokens: a multiple of 16 keeps tq*G rows on whole (bf16) sublane tiles; about
    # 256 query rows per kv head fill the MXU on prefill without blowing up decode-only tiles.
    tq = q_tile or min(max(16, 256 // g // 16 * 16), cdiv(t, 16) * 16)
    num_tiles = cdiv(t, tq)
    cu, total = _live_bounds(cu_q_lens, num_seqs)
    meta, first = _tpu_work_items(cu, total, kv_lens, tq, num_tiles)
    if tq % 16:
        raise ValueError(f"q_tile={tq} must be a multiple of 16 (whole sublane tiles)")
    qr = _grouped_rows(q, kvh, g, num_tiles * tq)
    spec = pl.BlockSpec((hb, tq * g, d), lambda h, i, meta, *_: (h, meta[_QB, i], 0))
    kernel = functools.partial(_ragged_tpu_kernel, pages_per_seq=pages_per_seq, groups=g,
                               scale=1.0 / math.sqrt(d))
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(kvh // hb, meta.shape[1]),
            in_specs=[spec, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=spec,
            scratch_shapes=_tpu.scratch_shapes(ppb, ps, hb, d, k_pool.dtype, tq * g)),
        out_shape=out_struct(qr.shape, q.dtype, qr, k_pool),
        # Sequential: output tiles are revisited by consecutive items and the DMA chain spans steps.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary", "arbitrary")),
        interpret=interpret,
        name="ragged_paged_attention_tpu",
    )(meta, block_tables.reshape(-1), first, qr, k_pool, v_pool)
    return _ungroup_rows(out, t, q.shape[1], g)


# ----------------------------------------------------------------------------------------- GPU
# Work items: one per (sequence, tile of tq of its own tokens), at most cdiv(T, tq) + S. Programs
# own disjoint rows and write them with a masked store, so they can run in any order.
_T0, _T1, _GPOS0, _GKV_END, _GSEQ, _VALID = range(6)


def _gpu_work_items(cu, kv_lens, tq, n_items):
    q_len = cu[1:] - cu[:-1]
    tiles = (q_len + tq - 1) // tq
    offset = jnp.cumsum(tiles) - tiles
    k = jnp.arange(n_items, dtype=jnp.int32)
    valid = k < jnp.sum(tiles)
    seq = jnp.clip(jnp.searchsorted(offset, k, side="right") - 1, 0, kv_lens.shape[0] - 1)
    t0 = cu[seq] + (k - offset[seq]) * tq
    t1 = jnp.minimum(t0 + tq, cu[seq + 1])
    pos0 = kv_lens[seq] - q_len[seq] + t0 - cu[seq]
    kv_end = jnp.clip(pos0 + t1 - t0, 0, kv_lens[seq])
    return jnp.stack([t0, t1, pos0, kv_end, seq, valid], axis=1).astype(jnp.int32)


def _ragged_gpu_kernel(meta_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, *, tq, groups, ppb, scale):
    item, h = pl.program_id(0), pl.program_id(1)
    ps, d = k_ref.shape[1], k_ref.shape[3]
    bk = ppb * ps
    rows = tq * groups
    t0, t1 = meta_ref[item, _T0], meta_ref[item, _T1]
    kv_end, seq = meta_ref[item, _GKV_END], meta_ref[item, _GSEQ]

    @pl.when(meta_ref[item, _VALID] == 1)
    def _():
        q = q_ref[h, pl.ds(t0 * groups, rows), :]
        token = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0) // groups
        row_ok = token < t1 - t0
        pos = meta_ref[item, _GPOS0] + token

        def body(j, carry):
            # Entries past the live pages may be anything the host left there: read page 0.
            live = (j * ppb + jax.lax.broadcasted_iota(jnp.int32, (ppb,), 0)) * ps < kv_end
            pages = jnp.where(live, tables_ref[seq, pl.ds(j * ppb, ppb)], 0)
            k = k_ref[pages, :, h, :].reshape(bk, d)
            v = v_ref[pages, :, h, :].reshape(bk, d)
            col = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
            v = jnp.where((col < kv_end)[:, None], v, 0)
            mask = (col[None, :] <= pos[:, None]) & row_ok[:, None]
            return online_softmax_update(*carry, scores(q, k.astype(q.dtype), scale), mask, v)

        init = (jnp.full((rows, 1), NEG, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
                jnp.zeros((rows, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, cdiv(kv_end, bk), body, init)
        plgpu.store(o_ref.at[h, pl.ds(t0 * groups, rows), :], finish(l, acc).astype(o_ref.dtype),
                    mask=row_ok[:, None])


def ragged_paged_attention_gpu(q, k_pool, v_pool, block_tables, kv_lens, cu_q_lens, num_seqs, *,
                               q_tile=None, pages_per_block=None, num_warps=4, num_stages=2,
                               interpret=False):
    kvh, g, d, ps = check_pools(q, k_pool, v_pool)
    if d != next_pow2(d) or ps != next_pow2(ps):
        raise NotImplementedError(f"Triton blocks must be powers of two: head_dim={d}, page_size={ps}")
    t, num_heads, _ = q.shape
    s_max, pages_per_seq = block_tables.shape
    groups = next_pow2(g)
    # >= 16 query rows per program (tensor-core dot minimum), ~64 for prefill tiles.
    tq = q_tile or max(next_pow2(cdiv(16, groups)), min(next_pow2(t), max(1, 64 // groups)))
    if tq * groups < 16 or tq != next_pow2(tq):
        raise ValueError(f"q_tile={tq} must be a power of two with q_tile*{groups} >= 16")
    ppb = pages_per_block or max(cdiv(16, ps), min(next_pow2(pages_per_seq), max(1, 64 // ps)))
    if ppb != next_pow2(ppb) or ppb * ps < 16:
        raise ValueError(f"pages_per_block={ppb} must be a power of two with >= 16 tokens")
    tables = jnp.pad(block_tables, ((0, 0), (0, cdiv(pages_per_seq, ppb) * ppb - pages_per_seq)))
    cu, total = _live_bounds(cu_q_lens, num_seqs)
    n_items = cdiv(t, tq) + s_max
    meta = _gpu_work_items(cu, kv_lens, tq, n_items)
    # Room for a full tile starting at the last token.
    qr = _grouped_rows(q, kvh, groups, t + tq)
    kernel = functools.partial(_ragged_gpu_kernel, tq=tq, groups=groups, ppb=ppb,
                               scale=1.0 / math.sqrt(d))
    whole = [pl.BlockSpec(x.shape, lambda i, h, n=x.ndim: (0,) * n)
             for x in (meta, tables, qr, k_pool, v_pool)]
    out = pl.pallas_call(
        kernel,
        grid=(n_items, kvh),
        in_specs=whole,
        out_specs=pl.BlockSpec(qr.shape, lambda i, h: (0, 0, 0)),
        out_shape=out_struct(qr.shape, q.dtype, qr, k_pool),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(meta, tables, qr, k_pool, v_pool)
    out = _ungroup_rows(out, t, num_heads, groups)
    # Rows no program owns (padding tokens) were never written.
    return jnp.where((jnp.arange(t) < total)[:, None, None], out, 0).astype(q.dtype)
