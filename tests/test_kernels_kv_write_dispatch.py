"""KV write (jnp scatter and TPU DMA kernel) and the platform dispatch of pallas_kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels.decode_attention import paged_decode_reference
from pallas_kernels.kv_write import write_kv_reference, write_kv_tpu
from pallas_kernels.ragged_attention import ragged_paged_attention_reference
from pallas_kernels.testing import decode_case, ragged_case


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_kv_tpu_kernel_equals_scatter(dtype):
    num_pages, page_size, kvh, d, t = 12, 8, 2, 64, 21
    rng = np.random.default_rng(0)
    k_pool = jnp.asarray(rng.standard_normal((num_pages, page_size, kvh, d)), dtype)
    v_pool = jnp.asarray(rng.standard_normal((num_pages, page_size, kvh, d)), dtype)
    new_k = jnp.asarray(rng.standard_normal((t, kvh, d)), jnp.float32)
    new_v = -new_k
    slots = rng.permutation(num_pages * page_size)[:t].astype(np.int32)
    slots[[3, 20]] = -1
    ref_k, ref_v = write_kv_reference(k_pool, v_pool, new_k, new_v, jnp.asarray(slots))
    for s, row in zip(slots, np.asarray(new_k.astype(dtype))):  # the reference itself
        if s >= 0:
            np.testing.assert_array_equal(np.asarray(ref_k[s // page_size, s % page_size]), row)
    untouched = np.ones((num_pages, page_size), bool)
    untouched[slots[slots >= 0] // page_size, slots[slots >= 0] % page_size] = False
    np.testing.assert_array_equal(np.asarray(ref_k)[untouched], np.asarray(k_pool)[untouched])
    out_k, out_v = jax.jit(lambda *a: write_kv_tpu(*a, tokens_per_block=8, interpret=True))(
        k_pool, v_pool, new_k, new_v, jnp.asarray(slots))
    np.testing.assert_array_equal(np.asarray(out_k), np.asarray(ref_k))
    np.testing.assert_array_equal(np.asarray(out_v), np.asarray(ref_v))


def test_slot_mapping():
    tables = jnp.array([[5, 2, 7], [1, 0, 3]], jnp.int32)
    slots = pk.slot_mapping(tables, jnp.array([9, 3]), jnp.array([True, False]), page_size=4)
    assert slots.tolist() == [7 * 4 + 1, -1]  # position 9 = page entry 2 (page 7), offset 1


def test_resolve_by_platform():
    assert pk.resolve("auto", platform="tpu") == ("tpu", False)
    assert pk.resolve("auto", platform="gpu") == ("gpu", False)
    assert pk.resolve("auto", platform="cpu") == ("gpu", True)
    assert pk.resolve("tpu", platform="gpu") == ("tpu", True)
    assert pk.resolve("reference", platform="cpu") == ("reference", False)
    with pytest.raises(ValueError):
        pk.resolve("tpu", interpret=False, platform="cpu")
    with pytest.raises(ValueError):
        pk.resolve("triton")


@pytest.mark.slow
def test_public_entry_points_on_cpu():
    d_args = decode_case([5, 0, 19], kv_heads=2, groups=2, head_dim=64, page_size=8, pages_per_seq=3)
    ref = np.asarray(paged_decode_reference(*d_args))
    for impl in ("auto", "tpu", "gpu", "reference"):
        out = pk.paged_decode_attention(*d_args, impl=impl)
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, err_msg=impl)
    r_args = ragged_case([(4, 10), (1, 3)], num_tokens=8, max_seqs=3, kv_heads=2, groups=2,
                         head_dim=64, page_size=8, pages_per_seq=2)
    out = pk.ragged_paged_attention(*r_args)
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(ragged_paged_attention_reference(*r_args)), atol=1e-5)
    k_pool, v_pool = d_args[1], d_args[2]
    new = jnp.ones((2, 2, 64))
    k2, _ = pk.write_kv(k_pool, v_pool, new, new, jnp.array([0, -1], jnp.int32))
    assert (np.asarray(k2[0, 0]) == 1).all()
