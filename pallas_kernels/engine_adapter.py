"""Map one engine step (the model's StepBatch) onto the ragged kernel and the KV write.

A step's query rows are the C chunk rows followed by the B decode rows: q [C + B, H, D]. The
chunk holds up to N segments (prompts of different sequences) back to back. The ragged kernel
wants back-to-back sequences, so the step becomes N + 1 + B sequences (B when C == 0), all of
them "live" with fixed shapes:
    i < N    chunk segment i: its chunk_lens[i] tokens, kv_len = chunk_starts[i] + chunk_lens[i]
    N        the chunk's padding rows [sum(chunk_lens), C), kv_len 0 (rows come out as zeros)
    N+1+i    decode slot i: token C + i, kv_len = dec_positions[i] + 1 (0 for a padding row)
Only duck typing on the StepBatch fields: nothing here imports the model.
"""
import jax.numpy as jnp

from .dispatch import ragged_paged_attention, write_kv
from .kv_write import slot_mapping


def chunk_layout(batch):
    """Each chunk token's (segment, position in its sequence, valid): padding tokens are invalid."""
    c, n = batch.chunk_tokens.shape[0], batch.chunk_lens.shape[0]
    ends = jnp.cumsum(batch.chunk_lens)
    t = jnp.arange(c, dtype=jnp.int32)
    seg = jnp.minimum(jnp.searchsorted(ends, t, side="right", method="compare_all"), n - 1).astype(jnp.int32)
    pos = batch.chunk_starts[seg] + t - (ends[seg] - batch.chunk_lens[seg])
    return seg, pos.astype(jnp.int32), t < ends[-1]


def step_metadata(batch):
    """-> (block_tables int32[S, P], kv_lens int32[S], cu_q_lens int32[S+1], num_seqs int32[1])."""
    c = batch.chunk_tokens.shape[0]
    b = batch.dec_tokens.shape[0]
    dec_kv = jnp.where(batch.dec_mask, batch.dec_positions + 1, 0).astype(jnp.int32)
    dec_cu = c + jnp.arange(1, b + 1, dtype=jnp.int32)
    if c == 0:
        tables, kv_lens = batch.dec_block_tables, dec_kv
        cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), dec_cu])
    else:
        chunk_tables = batch.chunk_block_tables
        p = chunk_tables.shape[1]
        tables = jnp.concatenate([chunk_tables, jnp.zeros((1, p), chunk_tables.dtype),
                                  batch.dec_block_tables.reshape(b, p)])
        chunk_kv = (batch.chunk_starts + batch.chunk_lens).astype(jnp.int32)
        kv_lens = jnp.concatenate([chunk_kv, jnp.zeros((1,), jnp.int32), dec_kv])
        ends = jnp.cumsum(batch.chunk_lens).astype(jnp.int32)
        cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends, jnp.full((1,), c, jnp.int32), dec_cu])
    num_seqs = jnp.full((1,), kv_lens.shape[0], jnp.int32)
    return tables.astype(jnp.int32), kv_lens, cu.astype(jnp.int32), num_seqs


def step_slots(batch, page_size):
    """Pool slots of the step's C + B new tokens (-1 for padding rows), for write_kv."""
    seg, pos, valid = chunk_layout(batch)
    chunk = slot_mapping(batch.chunk_block_tables[seg], pos, valid, page_size)
    dec = slot_mapping(batch.dec_block_tables, batch.dec_positions, batch.dec_mask, page_size)
    return jnp.concatenate([chunk, dec])


def step_attention(q, new_k, new_v, k_pool, v_pool, batch, *, impl="auto", interpret=None,
                   write_impl="auto"):
    """One layer's attention for a step: write the step's K/V, then attend.

    q [C+B, H, D]; new_k/new_v [C+B, KVH, D]; pools donated by the caller's jit.
    -> (out [C+B, H, D], k_pool, v_pool). Padding rows of the output are zeros."""
    slots = step_slots(batch, k_pool.shape[1])
    k_pool, v_pool = write_kv(k_pool, v_pool, new_k, new_v, slots, impl=write_impl)
    out = ragged_paged_attention(q, k_pool, v_pool, *step_metadata(batch), impl=impl,
                                 interpret=interpret)
    return out, k_pool, v_pool
