"""Map one engine step (StepBatch, notes/interfaces.md) onto the ragged kernel and the KV write.

A step's query rows are the C chunk rows followed by the B decode rows: q [C + B, H, D]. The
ragged kernel wants back-to-back sequences, so the step becomes S = 2 + B sequences (S = B when
C == 0), all of them "live" with fixed shapes:
    0        the chunk: tokens [0, chunk_len), kv_len = chunk_start + chunk_len
    1        the chunk's padding rows [chunk_len, C), kv_len 0 (rows come out as zeros)
    2 + i    decode slot i: token C + i, kv_len = dec_positions[i] + 1 (0 for a padding row)
Only duck typing on the StepBatch fields: nothing here imports the model.
"""
import jax.numpy as jnp

from .dispatch import ragged_paged_attention, write_kv
from .kv_write import slot_mapping


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
        chunk_table = batch.chunk_block_table[None, :]
        tables = jnp.concatenate([chunk_table, jnp.zeros_like(chunk_table),
                                  batch.dec_block_tables.reshape(b, chunk_table.shape[1])])
        chunk_kv = jnp.reshape(batch.chunk_start + batch.chunk_len, (1,)).astype(jnp.int32)
        kv_lens = jnp.concatenate([chunk_kv, jnp.zeros((1,), jnp.int32), dec_kv])
        head = jnp.stack([jnp.int32(0), jnp.asarray(batch.chunk_len, jnp.int32), jnp.int32(c)])
        cu = jnp.concatenate([head, dec_cu])
    num_seqs = jnp.full((1,), kv_lens.shape[0], jnp.int32)
    return tables.astype(jnp.int32), kv_lens, cu.astype(jnp.int32), num_seqs


def step_slots(batch, page_size):
    """Pool slots of the step's C + B new tokens (-1 for padding rows), for write_kv."""
    c = batch.chunk_tokens.shape[0]
    r = jnp.arange(c, dtype=jnp.int32)
    chunk = slot_mapping(jnp.broadcast_to(batch.chunk_block_table, (c,) + batch.chunk_block_table.shape),
                         batch.chunk_start + r, r < batch.chunk_len, page_size)
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
