"""StepBatch -> KV write + ragged kernel, checked row by row against the decode reference: row r
of chunk segment i attends like a decode token at length chunk_starts[i] + r + 1 on its table."""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import paged_decode_reference
from pallas_kernels.engine_adapter import step_attention

PAGE, P, KVH, G, D = 8, 4, 2, 2, 64


class StepBatch(NamedTuple):  # the fields of the interface, built here without the model
    chunk_tokens: jax.Array
    chunk_starts: jax.Array
    chunk_lens: jax.Array
    chunk_block_tables: jax.Array
    dec_tokens: jax.Array
    dec_positions: jax.Array
    dec_block_tables: jax.Array
    dec_mask: jax.Array


def _batch(c, chunk_starts, chunk_lens, dec_positions, dec_mask):
    n, b = len(chunk_lens), len(dec_positions)
    pages = np.random.default_rng(1).permutation(64)[:(n + b) * P].reshape(n + b, P)
    return StepBatch(jnp.zeros((c,), jnp.int32), jnp.asarray(chunk_starts, jnp.int32),
                     jnp.asarray(chunk_lens, jnp.int32), jnp.asarray(pages[:n], jnp.int32),
                     jnp.zeros((b,), jnp.int32), jnp.asarray(dec_positions, jnp.int32),
                     jnp.asarray(pages[n:], jnp.int32), jnp.asarray(dec_mask))


@pytest.mark.parametrize("c,chunk_starts,chunk_lens,dec_positions,dec_mask", [
    (16, [5], [11], [7, 15, 0, 20], [True, True, False, True]),  # chunk + decodes + a padding row
    (16, [5, 0, 0, 0], [4, 0, 7, 3], [7, 20], [True, True]),  # packed segments, one slot empty
    (0, [0], [0], [3, 8, 31], [True, True, True]),                # decode-only step
])
def test_step_attention_matches_per_row_reference(c, chunk_starts, chunk_lens, dec_positions,
                                                  dec_mask):
    batch = _batch(c, chunk_starts, chunk_lens, dec_positions, dec_mask)
    rows = c + len(dec_positions)
    rng = np.random.default_rng(0)
    k_pool = jnp.asarray(rng.standard_normal((64, PAGE, KVH, D)), jnp.float32)
    v_pool = jnp.asarray(rng.standard_normal((64, PAGE, KVH, D)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((rows, KVH * G, D)), jnp.float32)
    new_k = jnp.asarray(rng.standard_normal((rows, KVH, D)), jnp.float32)
    new_v = -new_k
    out, k2, v2 = jax.jit(step_attention)(q, new_k, new_v, k_pool, v_pool, batch)

    tables, lengths = [], []
    for i, (start, length) in enumerate(zip(chunk_starts, chunk_lens)):
        tables += [batch.chunk_block_tables[i]] * length
        lengths += [start + r + 1 for r in range(length)]
    tables += [batch.chunk_block_tables[0]] * (c - sum(chunk_lens))  # padding rows: nothing
    lengths += [0] * (c - sum(chunk_lens))
    for i, pos in enumerate(dec_positions):
        tables.append(batch.dec_block_tables[i])
        lengths.append(pos + 1 if dec_mask[i] else 0)
    for r, (table, n) in enumerate(zip(tables, lengths)):
        if n:  # the new token's K/V landed in its slot
            page, off = int(table[(n - 1) // PAGE]), (n - 1) % PAGE
            np.testing.assert_array_equal(np.asarray(k2[page, off]), np.asarray(new_k[r]))
            np.testing.assert_array_equal(np.asarray(v2[page, off]), np.asarray(new_v[r]))
    expected = paged_decode_reference(q, k2, v2, jnp.stack(tables), jnp.asarray(lengths, jnp.int32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=0)
    assert (np.asarray(out)[np.asarray(lengths) == 0] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("impl,write_impl", [("gpu", "auto"), ("tpu", "tpu")])
def test_step_attention_under_shard_map(impl, write_impl):
    """Tensor parallel as the engine runs it: heads and KV pools split over `model`, metadata
    replicated, kernels inside shard_map (check_vma on)."""
    from functools import partial
    from jax.sharding import NamedSharding, PartitionSpec as Spec

    mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
    heads, pool = Spec(None, "model", None), Spec(None, None, "model", None)
    batch = _batch(8, [3, 0], [4, 2], [3, 8, 31], [True, False, True])
    rng = np.random.default_rng(0)
    k_pool = jnp.asarray(rng.standard_normal((64, PAGE, KVH, D)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((11, KVH * G, D)), jnp.float32)
    new = jnp.asarray(rng.standard_normal((11, KVH, D)), jnp.float32)
    fn = partial(step_attention, impl=impl, write_impl=write_impl)
    sharded = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(heads,) * 3 + (pool, pool, Spec()),
                                    out_specs=(heads, pool, pool)))

    def put(x, spec):
        return jax.device_put(x, NamedSharding(mesh, spec))

    out, k2, _ = sharded(put(q, heads), put(new, heads), put(new, heads), put(k_pool, pool),
                         put(-k_pool, pool), jax.tree.map(lambda x: put(x, Spec()), batch))
    ref, k_ref, _ = step_attention(q, new, new, k_pool, -k_pool, batch, impl="reference")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(k_ref))
