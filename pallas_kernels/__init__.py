"""Pallas paged-attention kernels, each beside its pure-jnp reference.

Engine layout everywhere: K/V pools [num_pages, page_size, kv_heads, head_dim], int32 block
tables, scale 1/sqrt(head_dim), f32 softmax. Entry points (variant chosen by platform or `impl=`):

    paged_decode_attention(q[B,H,D], k_pool, v_pool, block_tables[B,P], lengths[B])
    ragged_paged_attention(q[T,H,D], k_pool, v_pool, block_tables[S,P], kv_lens[S],
                           cu_q_lens[S+1], num_seqs[1])
    write_kv(k_pool, v_pool, new_k[T,KVH,D], new_v, slots[T]);  slot_mapping(...)

Modules: decode_attention, ragged_attention, kv_write (reference + TPU + GPU variants),
dispatch (selection), _tpu / _common (shared pieces).
"""
from .dispatch import IMPLS, paged_decode_attention, ragged_paged_attention, resolve, write_kv
from .kv_write import slot_mapping

__all__ = ["IMPLS", "paged_decode_attention", "ragged_paged_attention", "resolve", "write_kv",
           "slot_mapping"]
