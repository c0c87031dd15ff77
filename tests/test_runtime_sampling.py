"""The on-device sampler on logits with a known distribution, and the bucket ladder."""

import jax
import numpy as np
import pytest

from tropical_jax.config import EngineConfig, make_buckets
from tropical_jax.runtime.sampling import sample

PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02], np.float32)
N = 4000


def draw(temperature=1.0, top_k=-1, top_p=1.0):
    logits = np.tile(np.log(PROBS), (N, 1))
    fn = jax.jit(sample)
    out = fn(logits, np.full(N, temperature, np.float32), np.full(N, top_k, np.int32),
             np.full(N, top_p, np.float32), np.arange(N, dtype=np.uint32), np.zeros(N, np.int32))
    return np.asarray(out)


def test_top_k_never_leaves_its_support_and_renormalises():
    got = draw(top_k=3)
    assert set(got) == {0, 1, 2}
    freq = np.bincount(got, minlength=7)[:3] / N
    np.testing.assert_allclose(freq, PROBS[:3] / PROBS[:3].sum(), atol=0.03)


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # Cumulative mass 0.4, 0.65, 0.80: top_p=0.7 keeps exactly tokens 0, 1, 2.
    got = draw(top_p=0.7)
    assert set(got) == {0, 1, 2}
    assert set(draw(top_p=0.3)) == {0}


def test_full_distribution_and_temperature_zero():
    freq = np.bincount(draw(), minlength=7) / N
    np.testing.assert_allclose(freq, PROBS, atol=0.03)
    assert set(draw(temperature=0)) == {0}
    # Low temperature sharpens towards the mode.
    assert (draw(temperature=0.2) == 0).mean() > 0.9


def test_buckets_double_then_grow_linearly():
    assert make_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert make_buckets(1000, 16, linear_from=256) == (16, 32, 64, 128, 256, 512, 768, 1000)
    cfg = EngineConfig(max_model_len=100, page_size=16, max_num_seqs=3, bucket_set="fine")
    assert cfg.pages_per_seq == 7 and cfg.total_pages == 21 and cfg.batch_sizes == (1, 2, 3)
    with pytest.raises(ValueError, match="num_pages=2 cannot hold even one sequence"):
        EngineConfig(max_model_len=100, page_size=16, num_pages=2)


def sorted_support(logits, temperature, top_k, top_p):
    """The textbook rule on a full sort (numpy): top-k ranks, then the smallest prefix reaching top_p."""
    keep = np.zeros_like(logits, bool)
    for i, row in enumerate(logits / temperature[:, None]):
        order = np.argsort(-row)
        k = top_k[i] if 0 < top_k[i] < len(row) else len(row)
        probs = np.exp(row[order[:k]] - row[order[0]])
        probs /= probs.sum()
        n = int(np.sum(np.cumsum(probs) - probs < top_p[i]))
        keep[i, order[:n]] = True
    return keep


def test_bisection_support_equals_the_sorted_rule_on_random_rows():
    from tropical_jax.runtime.sampling import _support

    rng = np.random.default_rng(0)
    r, v = 64, 1000
    logits = (rng.standard_normal((r, v)) * rng.uniform(0.5, 8, (r, 1))).astype(np.float32)
    temperature = rng.uniform(0.3, 2, r).astype(np.float32)
    top_k = rng.choice([-1, 1, 5, 50, 999, 1000, 5000], r).astype(np.int32)
    top_p = rng.choice([0.05, 0.5, 0.9, 0.99, 1.0], r).astype(np.float32)
    got = np.asarray(jax.jit(_support)(logits / temperature[:, None], top_k, top_p))
    want = sorted_support(logits, temperature, top_k, top_p)
    assert (got.sum(1) >= 1).all()
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_a_seeded_row_draws_the_same_whatever_shares_its_step():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 500)).astype(np.float32)
    alone = sample(logits[:1], np.ones(1, np.float32), np.full(1, -1, np.int32), np.ones(1, np.float32),
                   np.full(1, 7, np.uint32), np.full(1, 3, np.int32))
    # Beside a greedy row and two filtering rows: other branches of the sampler run this time.
    shared = sample(logits, np.array([1, 0, 1, 1], np.float32), np.array([-1, 5, 3, -1], np.int32),
                    np.array([1, 1, 1, 0.5], np.float32), np.array([7, 0, 1, 2], np.uint32),
                    np.array([3, 0, 0, 0], np.int32))
    assert int(alone[0]) == int(shared[0])
    assert int(shared[1]) == int(np.argmax(logits[1]))
    assert int(shared[2]) in set(np.argsort(-logits[2])[:3])


def test_greedy_is_numpy_argmax_first_of_ties():
    # Small integer logits make ties common; -inf and large values too.
    rng = np.random.default_rng(3)
    logits = rng.integers(-3, 3, (64, 1000)).astype(np.float32)
    logits[0] = -np.inf
    logits[1, 999] = 1e30
    zeros = np.zeros(64, np.int32)
    got = jax.jit(sample)(logits, np.zeros(64, np.float32), zeros, np.ones(64, np.float32),
                          zeros.astype(np.uint32), zeros)
    np.testing.assert_array_equal(np.asarray(got), np.argmax(logits, axis=-1))
