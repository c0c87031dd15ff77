"""CostModel.min_chunked_time: a lower bound on any chunked prefill's steps, which lets rule 2 skip
planning queued inlines step by step when they cannot end by a deadline (sched/multiplex.py)."""

import random

import pytest

from tropical_jax.sched.cost_model import CostModel

BASE = {"units": "ms", "prefill": {"c2": 2e-6, "c1": 0.09, "c0": 19.0}, "decode": {"d0": 22.0, "d1": 0.16, "d2": 5e-5},
        "kv_bytes_per_token": 1, "transfer": {"bandwidth_GBps": 100, "latency_ms": 1.0}}
DERIVED = CostModel.from_json(BASE)
# A fitted mixed step whose sum(c²) coefficient is negative (mc2 < mcx / 2): the bound takes its largest sum.
MIXED = CostModel.from_json({**BASE, "mixed": {"m0": 25.0, "mc2": 1e-6, "mcx": 4e-6, "mc1": 0.08, "mb": 0.2, "mt": 1e-4}})
FITTED_CHUNK = CostModel.from_json({**BASE, "chunk": {"k2": 3e-6, "kx": 1e-6, "k1": 0.1, "k0": 15.0}})


def random_steps(cost, rng, tokens, start, most, B, T, largest=False):
    """Summed t_mixed of one random chunking of [start, start + tokens), with decodes that only grow
    and decode-only steps between chunks; largest: chunks of `most` (the last the rest), none between."""
    total, ctx, end = 0.0, start, start + tokens
    while ctx < end:
        if B and not largest and rng.random() < 0.2:
            total += cost.t_decode(B, T)
        else:
            c = min(most if largest else rng.randint(1, most), end - ctx)
            total += cost.t_mixed(c, ctx, B, T)
            ctx += c
        B, T = B + rng.choice((0, 0, 1)), T + B + rng.randint(0, 500)
    return total


@pytest.mark.parametrize("cost", [DERIVED, MIXED, FITTED_CHUNK], ids=["derived", "mixed", "fitted-chunk"])
def test_no_chunking_beats_the_bound(cost):
    rng = random.Random(0)
    for _ in range(400):
        tokens, start, most = rng.randint(1, 40000), rng.choice((0, rng.randint(0, 20000))), rng.choice((512, 2048, 4096))
        B, T = rng.choice((0, rng.randint(1, 64))), rng.randint(0, 10**5)
        T = T if B else 0
        least = cost.min_chunked_time(tokens, start, most, B, T)
        assert 0 < least <= random_steps(cost, rng, tokens, start, most, B, T) * (1 + 1e-12)
        assert least <= random_steps(cost, rng, tokens, start, most, B, T, largest=True) * (1 + 1e-12)


def test_bound_is_tight_for_whole_chunks_of_the_derived_model():
    # Without a chunk section, a chunk costs k2·((ctx + c)² − ctx²) + k1·c + k0: the bound is the
    # plan of the largest chunks exactly.
    tokens, most, B, T = 20000, 4096, 8, 8000
    steps = [(c, ctx) for ctx in range(0, tokens, most) for c in [min(most, tokens - ctx)]]
    planned = sum(DERIVED.t_mixed(c, ctx, B, T) for c, ctx in steps)
    assert DERIVED.min_chunked_time(tokens, 0, most, B, T) == pytest.approx(planned, rel=1e-12)


def test_no_bound_from_a_negative_coefficient():
    odd = CostModel.from_json({**BASE, "mixed": {"m0": -5.0, "mc2": 1e-6, "mcx": 2e-6, "mc1": 0.08, "mb": 0.2, "mt": 1e-4}})
    assert odd.min_chunked_time(1000, 0, 512, 4, 100) == 0.0


def test_queued_inlines_too_late_for_a_newcomer_behind_them():
    # Two inlines queued on M0 beside a decode; a 6k newcomer. too_late_for(newcomer, cut) may say
    # "too late" before the queued plan reaches the cut, but only where the newcomer's own plan behind
    # them indeed ends after it; its frontier plan, given up early without an explanation, agrees.
    from sched_helpers import decoding, queued
    from tropical_jax.sched.inline_plans import QueuedPlan
    from tropical_jax.sched.request import Request
    from tropical_jax.sched.scheduler import Scheduler

    cost = CostModel.from_json({**BASE, "kv_capacity_tokens": 10**6})
    sched = Scheduler("1M", "planned:chunk_buckets=256/1024/4096,arrival_guard=false", cost)
    decoding(sched, "M0", 2000, 0.2, 0.0)
    for i, L in enumerate((9000, 5000)):
        queued(sched, "M0", Request(f"q{i}", 0.0, L, 4, ttft_slo=100.0, output_len=4))
    r = Request("new", 0.0, 6000, 4, ttft_slo=100.0, output_len=4)
    w = sched.workers["M0"]
    queue_end = QueuedPlan(sched.mon, w, 0.0).full
    new_end = QueuedPlan(sched.mon, w, 0.0).frontier.plan(r).end
    queue_end = queue_end.t0 + queue_end.elapsed
    earlier = 0
    for k in range(1, 200):
        cut = new_end * k / 100
        too_late = QueuedPlan(sched.mon, w, 0.0).too_late_for(r, cut)
        assert not too_late or new_end > cut  # never refuses a plan that ends by the cut
        assert QueuedPlan(sched.mon, w, 0.0).frontier.plan(r, cut, explain=False).ok == (new_end <= cut)
        earlier += too_late and cut >= queue_end
    assert earlier > 0  # the newcomer's least time decided some cuts the queued plan alone does not
