"""Policy `planned` (DESIGN §3b): defaults, earliest-first-token routing, shedding; the work bound."""

import math

import pytest

from tropical_jax.sched.bound import work_bound
from tropical_jax.sched.config import PolicyConfig
from tropical_jax.sched.cost_model import CostModel
from tropical_jax.sched.request import Request
from tropical_jax.sched.scheduler import Scheduler

# Round numbers (ms): prefill 0.1 ms/token + 10; decode 20 + 1/request; no transfer cost to speak of.
COST = CostModel.from_json({"units": "ms", "prefill": {"c2": 0.0, "c1": 0.1, "c0": 10.0},
                            "decode": {"d0": 20.0, "d1": 1.0, "d2": 0.0}, "kv_bytes_per_token": 1,
                            "transfer": {"bandwidth_GBps": 1000, "latency_ms": 0.0}, "kv_capacity_tokens": 10**7})


def test_planned_defaults_and_paper_policy_unchanged():
    planned = PolicyConfig.parse("planned")
    assert (planned.prefer, planned.max_multiplex_tokens, planned.shed) == ("finish", None, True)
    paper = PolicyConfig.parse("tropical")
    assert (paper.prefer, paper.max_multiplex_tokens, paper.shed) == ("prefill", 8192, False)
    assert PolicyConfig.parse("chunked:shed=true").shed is True
    with pytest.raises(ValueError, match="prefer must be"):
        PolicyConfig.parse("planned:prefer=soonest")


def submit_all(sched, reqs, now=0.0):
    for r in reqs:
        sched.submit(r, now)


def test_long_prompt_is_inlined_when_its_plan_ends_first():
    # P0 is busy with a 20k prompt (2.01 s); a new 20k prompt would finish at ~4 s on P0 but at
    # ~2 s inlined on the idle M0 (no decodes there to protect): prefer=finish sends it to M0.
    sched = Scheduler("1P1M", "planned:chunk_buckets=4096", COST)
    first = Request(0, 0.0, 20000, 4, ttft_slo=100.0, output_len=4)
    newcomer = Request(1, 0.0, 20000, 4, ttft_slo=100.0, output_len=4)
    submit_all(sched, [first, newcomer])
    assert first.prefill_worker == "P0" and newcomer.path == "inline" and newcomer.prefill_worker == "M0"
    # The paper's rules never inline a prompt over max_multiplex_tokens: it queues on P0.
    paper = Scheduler("1P1M", "tropical:chunk_buckets=4096", COST)
    a, b = Request(0, 0.0, 20000, 4, ttft_slo=100.0, output_len=4), Request(1, 0.0, 20000, 4, ttft_slo=100.0, output_len=4)
    submit_all(paper, [a, b])
    assert b.prefill_worker == "P0" and b.path == "prefill"


def test_finish_ties_go_to_the_prefill_worker():
    # Both workers idle: same predicted first token on P0 and M0 -> P0 (no decode is stalled).
    sched = Scheduler("1P1M", "planned:chunk_buckets=4096", COST)
    r = Request(0, 0.0, 1000, 4, ttft_slo=10.0, output_len=4)
    sched.submit(r, 0.0)
    assert r.prefill_worker == "P0"


@pytest.mark.parametrize("policy", ["planned", "disaggregated:shed=true"])
def test_shed_exactly_when_prefill_cannot_end_by_the_deadline(policy):
    cluster = "1P1M" if policy == "planned" else "1P1D"
    iso = COST.t_prefill(1000)  # 0.11 s
    sched = Scheduler(cluster, policy, COST)
    just_in = Request(0, 0.0, 1000, 4, ttft_slo=iso, output_len=4)  # now + iso == deadline: kept
    sched.submit(just_in, 0.0)
    hopeless = Request(1, 0.0, 1000, 4, ttft_slo=iso * 0.999, output_len=4)
    sched.submit(hopeless, 0.0)
    assert not just_in.rejected and hopeless.rejected and sched.counters["rejected"] == 1


def test_work_bound_by_hand():
    # Prefill 0.1 ms/token: 1000 tokens -> 0.1 s. Decode step 20 + B ms <= 100 ms -> B* = 80, so a
    # token costs 100/80 = 1.25 ms; 9 tokens after the first -> 11.25 ms. Mean cost 0.11125 s, 2 workers.
    b = work_bound([1000, 1000], [10, 10], COST, num_workers=2, tpot_slo=0.1)
    assert b["decode_batch"] == 80
    assert b["mean_prefill_s"] == pytest.approx(0.1) and b["mean_decode_s"] == pytest.approx(0.01125)
    assert b["bound_rps"] == pytest.approx(2 / 0.11125)
    with pytest.raises(ValueError, match="misses the TPOT SLO"):
        work_bound([10], [5], COST, 1, tpot_slo=0.01)
