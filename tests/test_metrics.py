"""Metrics on hand-computed requests, the miss breakdown, and goodput by bisection."""

import math

import numpy as np
import pytest

from tropical_jax.sched.metrics import goodput, length_class, mean_sd, miss_breakdown, record, summarize
from tropical_jax.sched.request import Request, RequestStatus
from tropical_jax.sim.rate_pool import RatePool


def done(i, arrival, first, last, n_out, prompt=100, ttft_slo=1.0, tpot_slo=0.1, scheduled=None, path="prefill"):
    r = Request(i, arrival, prompt, n_out, ttft_slo, tpot_slo, n_out)
    r.first_scheduled = arrival if scheduled is None else scheduled
    r.first_token_time, r.last_token_time, r.n_out, r.finish_time, r.path = first, last, n_out, last, path
    return r


def hand_built():
    reqs = [
        done(0, 0.0, 0.5, 1.4, 10, scheduled=0.25),               # ttft 0.5, tpot 0.9/9 = 0.1 -> met
        done(1, 1.0, 2.5, 2.5, 1, prompt=3000, path="inline"),   # ttft 1.5 > 1.0 -> missed (one token: tpot 0)
        done(2, 2.0, 2.2, 4.2, 11, prompt=9000),                 # tpot 2.0/10 = 0.2 > 0.1 -> missed
    ]
    rejected = Request(3, 3.0, 20000, 5, 1.0, 0.1, 5)
    rejected.status, rejected.path = RequestStatus.REJECTED, "rejected"  # a status, no longer a flag
    return reqs + [rejected]


def test_summary_on_hand_computed_requests():
    s = summarize(hand_built())
    assert s["num_requests"] == 4 and s["rejected"] == 1
    assert s["attainment"] == 0.25 and s["ttft_attainment"] == 0.5 and s["tpot_attainment"] == 0.5
    # Percentiles over the requests that have the quantity (numpy's linear interpolation).
    assert s["ttft_p50"] == pytest.approx(0.5) and s["ttft_p90"] == pytest.approx(np.percentile([0.5, 1.5, 0.2], 90))
    assert s["ttft_p99"] == pytest.approx(0.5 + 0.98 * 1.0)
    assert s["tpot_p50"] == pytest.approx(0.1) and s["tpot_p90"] == pytest.approx(0.18)
    assert s["queue_p90"] == pytest.approx(np.percentile([0.25, 0.0, 0.0], 90))
    assert s["inline_fraction"] == 0.25
    assert s["misses_by_length"] == {"<2k": {"requests": 1, "missed": 0, "miss_rate": 0.0},
                                     "2-8k": {"requests": 1, "missed": 1, "miss_rate": 1.0},
                                     "8-16k": {"requests": 1, "missed": 1, "miss_rate": 1.0},
                                     ">=16k": {"requests": 1, "missed": 1, "miss_rate": 1.0}}
    with pytest.raises(ValueError):
        summarize([])


def test_miss_breakdown_and_records():
    m = miss_breakdown(hand_built())
    assert m["missed"] == 3
    assert m["by_cause"] == {"ttft": 1, "tpot": 1, "rejected": 1}
    assert m["by_path"] == {"inline": 1, "prefill": 1, "rejected": 1}
    assert m["ttft_overshoot_p50"] == pytest.approx(1.5)
    row = record(hand_built()[0])
    assert row["ttft"] == pytest.approx(0.5) and row["tpot"] == pytest.approx(0.1) and row["queueing"] == 0.25
    assert row["attained"] is True and row["path"] == "prefill"
    assert [length_class(n) for n in (0, 2047, 2048, 8191, 8192, 16384, 10**6)] == \
        ["<2k", "<2k", "2-8k", "2-8k", "8-16k", ">=16k", ">=16k"]


@pytest.mark.parametrize("crossing,lo,hi", [(1.0, 0.1, 0.5), (10.0, 0.1, 0.5), (0.03, 0.1, 0.5)])
def test_goodput_bisection_finds_the_crossing_and_keeps_the_curve(crossing, lo, hi):
    # Attainment falls linearly from 1 at rate 0 to 0 at rate 10x the crossing: it crosses 0.9 there.
    calls = []

    def attainment(r):
        calls.append(r)
        return max(0.0, 1 - 0.1 * r / crossing)

    rate, curve = goodput(attainment, lo=lo, hi=hi, target=0.9, rel_tol=0.01)
    assert rate <= crossing and rate == pytest.approx(crossing, rel=0.01)  # the bracket is widened both ways
    assert curve == sorted(curve) and len(curve) == len(set(calls)) >= 5
    assert all(a == pytest.approx(attainment(r)) for r, a in curve)


def test_goodput_prefetch_announces_each_rate_and_the_next_ones_without_changing_the_search():
    def attainment(r):
        return max(0.0, 1 - 0.1 * r / 1.7)

    hints = []
    plain = goodput(attainment, lo=0.4, hi=1.0, target=0.9, rel_tol=0.01)
    hinted = goodput(attainment, lo=0.4, hi=1.0, target=0.9, rel_tol=0.01, prefetch=hints.append)
    assert hinted == plain
    asked = [h[0] for h in hints]
    assert sorted(asked) == [r for r, _ in plain[1]]  # each evaluated rate announced once, before it ran
    # every rate asked after the first was announced, as a possible next one, with the rate before it
    assert all(nxt in prev[1:] for prev, nxt in zip(hints, asked[1:]))


def test_rate_pool_answers_like_the_function_in_worker_processes():
    with RatePool(math.sqrt, jobs=2) as pool:
        pool.prefetch([16.0, 9.0, 4.0])  # 16 is started, 9 while a worker is idle
        assert pool(9.0) == 3.0 and pool(4.0) == 2.0 and pool(16.0) == 4.0
    assert RatePool(math.sqrt)(25.0) == 5.0  # one job: called in this process
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        RatePool(math.sqrt, jobs=0)


def test_goodput_zero_when_nothing_meets_the_target():
    rate, curve = goodput(lambda r: 0.5, lo=0.1, hi=1.0)
    assert rate == 0.0 and min(r for r, _ in curve) <= 0.1 / 1000


def test_mean_sd():
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5)) and mean_sd([4.0]) == (4.0, 0.0)
