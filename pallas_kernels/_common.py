"""Pieces shared by every attention kernel and reference: shape checks and the flash update."""
import math

import jax
import jax.numpy as jnp
import numpy as np

# Finite "minus infinity": masked scores use it so that max/exp never see inf - inf.
NEG = -0.7 * float(np.finfo(np.float32).max)


def cdiv(a, b):
    """Ceil division of non-negative ints. Traced values use lax.div (truncating, exact here):
    jnp's floor division lowers through `sign`, whose Mosaic rule asks the local TPU for its
    generation and so cannot be cross-lowered from a CPU host."""
    if isinstance(a, int) and isinstance(b, int):
        return -(-a // b)
    return jax.lax.div(a + b - 1, b)


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def check_pools(q, k_pool, v_pool):
    """Validate q [..., H, D] against pools [N, page_size, KVH, D]; return (KVH, G, D, page_size)."""
    if k_pool.shape != v_pool.shape or k_pool.dtype != v_pool.dtype:
        raise ValueError(f"k/v pools differ: {k_pool.shape} {k_pool.dtype} vs {v_pool.shape} {v_pool.dtype}")
    if k_pool.ndim != 4:
        raise ValueError(f"pools must be [num_pages, page_size, kv_heads, head_dim], got {k_pool.shape}")
    _, page_size, kv_heads, head_dim = k_pool.shape
    num_heads = q.shape[-2]
    if q.shape[-1] != head_dim:
        raise ValueError(f"q head_dim {q.shape[-1]} != pool head_dim {head_dim}")
    if num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} not a multiple of kv_heads {kv_heads}")
    return kv_heads, num_heads // kv_heads, head_dim, page_size


def online_softmax_update(m, l, acc, s, mask, v, weigh=None):
    """One flash-attention step over a block of keys, for any leading batch dims [...].

    m, l: [..., R, 1] f32 running max / denominator; acc: [..., R, D] f32 unnormalised output;
    s: [..., R, T] f32 scaled scores; mask: broadcastable to s, bool; v: [..., T, D] with masked rows
    already zeroed (stale pool memory may hold NaNs, and 0 * NaN would poison acc).
    weigh(p, v) -> [..., R, D] f32, where v is laid out otherwise (default: v as above).
    Masked probabilities are forced to exactly 0, so a row that has seen no valid key keeps
    l == 0 and the caller can emit zeros for it.
    """
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, NEG), axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    return m_new, l_new, alpha * acc + (weigh or _weigh_batched)(p, v)


def _weigh_batched(p, v):
    """p [..., R, T] . v [..., T, D] in f32."""
    n, batch = p.ndim, tuple(range(p.ndim - 2))
    return jax.lax.dot_general(p.astype(v.dtype), v, (((n - 1,), (n - 2,)), (batch, batch)),
                               preferred_element_type=jnp.float32)


def finish(l, acc):
    """Normalise the flash accumulator; rows with no valid key come out as zeros."""
    return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)


def scores(q, k, scale):
    """q [R, D] . k [T, D]^T in f32, scaled."""
    return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32) * scale


def out_struct(shape, dtype, *like):
    """A pallas_call output type. Inside shard_map (check_vma=True) outputs must say over which
    mesh axes they vary: as the most-varying of `like` (q and the pools vary over `model`)."""
    mat = max((jax.typeof(x).mat for x in like), key=lambda m: len(m.varying))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
