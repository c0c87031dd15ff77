"""Ragged paged attention: mixed prefill chunks + decodes, TPU and GPU kernels (interpreted on CPU)
against the jnp reference, and the reference against a per-sequence numpy loop.

Tolerances as for decode: f32 atol 1e-5, bf16 atol 2e-2.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import paged_decode_reference
from pallas_kernels.ragged_attention import (ragged_paged_attention_gpu,
                                             ragged_paged_attention_reference,
                                             ragged_paged_attention_tpu)
from pallas_kernels.testing import TOL, decode_case, ragged_case

# (q_len, kv_len) per live sequence: chunks on a cached prefix (q_len < kv_len), fresh chunks
# (q_len == kv_len), decodes (q_len 1), lengths on and off page boundaries, and a sequence with
# no KV at all (its rows must be zeros). Padding sequence slots and padding tokens follow.
CASES = [
    # kv_heads, groups, head_dim, page_size, pages_per_seq, dtype, num_tokens, max_seqs, seqs
    (2, 4, 64, 8, 6, jnp.float32, 40, 8,
     [(13, 33), (1, 9), (3, 0), (5, 5), (1, 16), (1, 1)]),
    (1, 8, 128, 16, 4, jnp.bfloat16, 56, 6,
     [(30, 30), (17, 33), (1, 48), (1, 7)]),
    (4, 1, 128, 32, 3, jnp.float32, 48, 4,
     [(40, 70), (1, 64), (1, 3)]),
    (2, 2, 64, 16, 3, jnp.bfloat16, 16, 16,
     [(1, n) for n in (16, 17, 1, 33, 48, 5, 32, 9, 2, 15, 31, 40, 8, 24)]),
]


@pytest.mark.slow
@pytest.mark.parametrize("kvh,groups,head_dim,page_size,pages,dtype,tokens,max_seqs,seqs", CASES)
def test_ragged_kernels_match_reference(kvh, groups, head_dim, page_size, pages, dtype, tokens,
                                        max_seqs, seqs):
    args = ragged_case(seqs, num_tokens=tokens, max_seqs=max_seqs, kv_heads=kvh, groups=groups,
                       head_dim=head_dim, page_size=page_size, pages_per_seq=pages, dtype=dtype)
    ref = np.asarray(ragged_paged_attention_reference(*args), np.float32)
    assert np.isfinite(ref).all()
    live = sum(q for q, _ in seqs)
    assert (ref[live:] == 0).all()
    kernels = {
        # small q tiles and page blocks: tiles shared by several sequences, several KV blocks
        "tpu": lambda *a: ragged_paged_attention_tpu(*a, q_tile=16, pages_per_block=2,
                                                     interpret=True),
        "gpu": lambda *a: ragged_paged_attention_gpu(*a, interpret=True),
    }
    for name, fn in kernels.items():
        out = jax.jit(fn)(*args)
        assert out.shape == args[0].shape and out.dtype == dtype, name
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=TOL[dtype], rtol=0,
                                   err_msg=name)


def test_reference_matches_per_sequence_numpy():
    seqs = [(6, 10), (1, 4), (2, 0), (3, 3)]
    q, k, v, bt, kv_lens, cu, n = ragged_case(seqs, num_tokens=14, max_seqs=5, kv_heads=2,
                                              groups=2, head_dim=64, page_size=4, pages_per_seq=3)
    ref = np.asarray(ragged_paged_attention_reference(q, k, v, bt, kv_lens, cu, n))
    q, k, v, bt, kv_lens, cu = map(np.asarray, (q, k, v, bt, kv_lens, cu))
    expected = np.zeros_like(ref)
    for i, (q_len, kv_len) in enumerate(seqs):
        kk = k[bt[i]].reshape(-1, 2, 64)[:kv_len]
        vv = v[bt[i]].reshape(-1, 2, 64)[:kv_len]
        for r in range(q_len):
            pos = kv_len - q_len + r
            if pos < 0:
                continue
            for h in range(4):
                s = kk[:pos + 1, h // 2] @ q[cu[i] + r, h] / 8.0
                w = np.exp(s - s.max())
                expected[cu[i] + r, h] = (w / w.sum()) @ vv[:pos + 1, h // 2]
    np.testing.assert_allclose(ref, expected, atol=1e-5)


def test_decode_only_ragged_equals_decode():
    lengths = [9, 1, 24, 17]
    q, k, v, bt, lens = decode_case(lengths, kv_heads=2, groups=4, head_dim=64, page_size=8,
                                    pages_per_seq=3)
    cu = jnp.arange(5, dtype=jnp.int32)
    out = ragged_paged_attention_reference(q, k, v, bt, lens, cu, jnp.array([4], jnp.int32))
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(paged_decode_reference(q, k, v, bt, lens)), atol=1e-6)
