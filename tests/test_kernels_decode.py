"""Paged decode attention: TPU and GPU kernels (interpreted on CPU) against the jnp reference.

Tolerances: f32 atol 1e-5 (same math, different summation order); bf16 atol 2e-2 (the kernels
feed bf16 probabilities to the PV matmul and round the output to bf16, eps 2^-8; a masking or
paging bug moves outputs by O(0.1-1)).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import (paged_decode_gpu, paged_decode_reference,
                                             paged_decode_tpu)
from pallas_kernels.testing import TOL, decode_case


def _lengths(batch, page_size, pages_per_seq):
    """Cycle through: on a page boundary, off it, padding slot, a single token, the full table."""
    full = page_size * pages_per_seq
    pattern = [2 * page_size, 2 * page_size + 3, 0, 1, full, page_size - 1]
    return [pattern[i % len(pattern)] for i in range(batch)] if batch > 1 else [full - 5]


# (batch, kv_heads, groups, head_dim, page_size, pages_per_seq, dtype): together they cover
# batch 1-16, GQA groups 1/2/4/8, head_dim 64/128, page sizes 8/16/32, f32 and bf16.
CASES = [
    (1, 1, 8, 128, 32, 3, jnp.float32),
    *[pytest.param(*case, marks=pytest.mark.slow) for case in [
        (6, 2, 4, 64, 8, 5, jnp.bfloat16),
        (16, 2, 1, 64, 16, 4, jnp.float32),
        (7, 4, 2, 128, 16, 3, jnp.bfloat16),
        (4, 2, 8, 64, 32, 3, jnp.bfloat16),
        (5, 1, 2, 128, 8, 6, jnp.float32)]],
]


@pytest.mark.parametrize("batch,kvh,groups,head_dim,page_size,pages,dtype", CASES)
def test_decode_kernels_match_reference(batch, kvh, groups, head_dim, page_size, pages, dtype):
    args = decode_case(_lengths(batch, page_size, pages), kv_heads=kvh, groups=groups,
                       head_dim=head_dim, page_size=page_size, pages_per_seq=pages, dtype=dtype)
    ref = np.asarray(paged_decode_reference(*args), np.float32)
    assert np.isfinite(ref).all()
    lengths = np.asarray(args[4])
    assert (ref[lengths == 0] == 0).all()
    kernels = {
        # two-page blocks so that sequences span several blocks and the DMA chain is exercised
        "tpu": lambda *a: paged_decode_tpu(*a, pages_per_block=2, interpret=True),
        "gpu": lambda *a: paged_decode_gpu(*a, pages_per_block=max(1, 16 // page_size),
                                           interpret=True),
    }
    for name, fn in kernels.items():
        out = jax.jit(fn)(*args)
        assert out.shape == args[0].shape and out.dtype == dtype, name
        out = np.asarray(out, np.float32)
        np.testing.assert_allclose(out, ref, atol=TOL[dtype], rtol=0, err_msg=name)
        assert (out[lengths == 0] == 0).all(), name


@pytest.mark.slow
def test_gpu_split_k_matches_unsplit():
    """Flash-decoding splits must merge to the same result, including splits with no tokens."""
    args = decode_case([3, 40, 0, 17], kv_heads=2, groups=2, head_dim=64, page_size=8,
                       pages_per_seq=6)
    ref = np.asarray(paged_decode_reference(*args))
    for splits in (1, 3, 6):
        out = paged_decode_gpu(*args, pages_per_block=1, num_splits=splits, interpret=True)
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0, err_msg=str(splits))


@pytest.mark.slow
def test_tpu_kv_head_blocks_and_batch_split(monkeypatch):
    """Several kv-head grid steps, and a batch split into several calls (SMEM budget)."""
    from pallas_kernels import _tpu
    monkeypatch.setattr(_tpu, "MAX_SMEM_TABLE_ENTRIES", 8)  # two sequences per call
    args = decode_case([9, 0, 16, 31], kv_heads=16, groups=1, head_dim=64, page_size=8,
                       pages_per_seq=4)
    out = paged_decode_tpu(*args, kv_heads_per_block=8, pages_per_block=1, interpret=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(paged_decode_reference(*args)),
                               atol=1e-5, rtol=0)


def test_reference_matches_numpy():
    q, k, v, bt, lengths = decode_case([5, 0, 12], kv_heads=2, groups=2, head_dim=64, page_size=4,
                                       pages_per_seq=4, poison=False)
    ref = np.asarray(paged_decode_reference(q, k, v, bt, lengths))
    q, k, v, bt = map(np.asarray, (q, k, v, bt))
    for b, n in enumerate(np.asarray(lengths)):
        if n == 0:
            assert (ref[b] == 0).all()
            continue
        kk = k[bt[b]].reshape(-1, 2, 64)[:n]
        vv = v[bt[b]].reshape(-1, 2, 64)[:n]
        for h in range(4):
            s = kk[:, h // 2] @ q[b, h] / 8.0
            w = np.exp(s - s.max())
            np.testing.assert_allclose(ref[b, h], (w / w.sum()) @ vv[:, h // 2], atol=1e-5)
