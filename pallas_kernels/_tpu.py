"""TPU (Mosaic) building blocks shared by the decode and ragged kernels.

Layout. The engine's pools are [num_pages, page_size, kv_heads, head_dim]. On TPU the two minor
dims (kv_heads, head_dim) are the tiled ones, so one kv head of a page is a strided set of rows,
not a contiguous tile. We therefore DMA whole pages for a block of kv heads (all of them, or a
slice that is a multiple of the sublane tile) and pull one head's rows out of VMEM with a strided
load. Transposing the pools to head-major would make per-head DMAs contiguous, but it would mean a
second layout in the engine (or a full pool copy per step); the strided VMEM load is cheap next
to the HBM traffic that decode is bound by.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


# Scalar-prefetched block tables live in SMEM (about 1 MiB on current chips, shared with the
# other scalars); calls whose tables are larger are split along the sequence axis.
MAX_SMEM_TABLE_ENTRIES = 64 * 1024
# Budget for the K/V double buffers (2 slots x K and V) in VMEM; the scoped default is 16 MiB
# on v5e and 32 MiB on v6e.
KV_BUFFER_BYTES = 8 * 1024 * 1024


def sublane_packing(dtype) -> int:
    """Rows packed into one 32-bit sublane word (1 for f32, 2 for bf16)."""
    return max(1, 4 // jnp.dtype(dtype).itemsize)


def heads_per_block(kv_heads: int, dtype, requested: int | None) -> int:
    """KV heads DMA'd together. A slice of the tiled kv-head dim must be whole sublane tiles."""
    hb = kv_heads if requested is None else requested
    tile = 8 * sublane_packing(dtype)
    if kv_heads % hb or (hb != kv_heads and hb % tile):
        raise ValueError(f"kv_heads_per_block={hb} must divide kv_heads={kv_heads} and be a "
                         f"multiple of {tile} (the sublane tile) unless it is all of them")
    if sublane_packing(dtype) == 2 and hb > 1 and hb % 2:
        raise NotImplementedError(f"TPU kernels need an even number of kv heads per block for "
                                  f"16-bit KV (got {hb}): two heads share a sublane word")
    return hb


def pages_per_block(page_size, hb, head_dim, dtype, pages_per_seq, requested):
    """KV pages per compute block: ~512 tokens, within the VMEM double-buffer budget."""
    if requested is not None:
        return requested
    per_page = 4 * page_size * hb * head_dim * jnp.dtype(dtype).itemsize
    return max(1, min(pages_per_seq, 512 // page_size, KV_BUFFER_BYTES // per_page))


def load_head_rows(buf_ref, h: int):
    """Rows of kv head `h` from a VMEM buffer [..., hb, D] as a [tokens, D] array (h static)."""
    *lead, hb, d = buf_ref.shape
    n = 1
    for x in lead:
        n *= x
    flat = buf_ref.reshape(n * hb, d)
    if hb == 1:
        return flat[...]
    if sublane_packing(buf_ref.dtype) == 1:
        return flat[pl.ds(h, n, stride=hb), :]
    # 16-bit KV: heads 2i and 2i+1 share a 32-bit word (low and high half). Mosaic cannot do a
    # strided load of packed rows, so load the words and split them (bf16 is the top half of f32).
    words = flat.bitcast(jnp.uint32)
    w = words[pl.ds(h // 2, n, stride=hb // 2), :] if hb > 2 else words[...]
    w = w << 16 if h % 2 == 0 else w & jnp.uint32(0xFFFF0000)
    return pltpu.bitcast(w, jnp.float32).astype(buf_ref.dtype)


class PageBlockCopier:
    """Double-buffered DMA of one block of KV pages (all heads of one head block) into VMEM.

    A block is `ppb` consecutive entries of a sequence's block table; pages past the live ones
    are neither copied nor waited for (the kernels mask those rows, and zero V there).
    """

    def __init__(self, k_hbm, v_hbm, k_buf, v_buf, sems, tables_ref, pages_per_seq):
        self.k_hbm, self.v_hbm, self.k_buf, self.v_buf = k_hbm, v_hbm, k_buf, v_buf
        self.sems, self.tables, self.pages_per_seq = sems, tables_ref, pages_per_seq
        _, self.ppb, _, self.hb, _ = k_buf.shape

    def _each(self, seq, head_block, blk, slot, live_pages, op):
        heads = pl.ds(head_block * self.hb, self.hb)
        for i in range(self.ppb):
            pos = blk * self.ppb + i

            @pl.when(pos < live_pages)
            def _():
                page = self.tables[seq * self.pages_per_seq + pos]
                for src, dst, kv in ((self.k_hbm, self.k_buf, 0), (self.v_hbm, self.v_buf, 1)):
                    copy = pltpu.make_async_copy(src.at[page, :, heads, :], dst.at[slot, i],
                                                 self.sems.at[kv, slot])
                    getattr(copy, op)()

    def start(self, seq, head_block, blk, slot, live_pages):
        self._each(seq, head_block, blk, slot, live_pages, "start")

    def wait(self, seq, head_block, blk, slot, live_pages):
        self._each(seq, head_block, blk, slot, live_pages, "wait")


def scratch_shapes(ppb, page_size, hb, head_dim, kv_dtype, rows):
    """K/V double buffers, their semaphores, the slot of the prefetched block, and flash state
    (m and l lane-replicated to 128 lanes, as Mosaic wants whole lanes)."""
    buf = pltpu.VMEM((2, ppb, page_size, hb, head_dim), kv_dtype)
    return [buf, buf, pltpu.SemaphoreType.DMA((2, 2)), pltpu.SMEM((1,), jnp.int32),
            pltpu.VMEM((hb, rows, 128), jnp.float32), pltpu.VMEM((hb, rows, 128), jnp.float32),
            pltpu.VMEM((hb, rows, head_dim), jnp.float32)]


def split_rows(n_rows: int, pages_per_seq: int) -> int:
    """Sequences per pallas_call so that the flat block table fits in SMEM."""
    return max(1, min(n_rows, MAX_SMEM_TABLE_ENTRIES // pages_per_seq))


def next_live(live):
    """For each i, the smallest j > i with live[j] (len(live) if none); and the first live index.

    Used to prefetch the first KV block of the next grid step that has work, across grid steps.
    """
    n = live.shape[0]
    idx = jnp.where(live, jnp.arange(n, dtype=jnp.int32), n)
    # suffix minimum over j >= i, shifted to j > i
    suffix = jax.lax.cummin(idx, reverse=True)
    nxt = jnp.concatenate([suffix[1:], jnp.full((1,), n, jnp.int32)])
    return nxt, suffix[:1]

