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
    cfg = EngineConfig(max_model_len=100, page_size=16, max_num_seqs=3)
    assert cfg.pages_per_seq == 7 and cfg.total_pages == 21 and cfg.batch_sizes == (1, 2, 3)
    with pytest.raises(ValueError, match="num_pages=2 cannot hold even one sequence"):
        EngineConfig(max_model_len=100, page_size=16, num_pages=2)
