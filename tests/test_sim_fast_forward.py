"""Fast-forward (Scheduler.fast_forward, used by the simulator) changes nothing: every policy, run with
stretches of decode-only steps done in one go and run step by step, gives the same requests (every
field), counters, step count, KV pages (the free lists in the same order) and recalibration."""

import dataclasses
import random

import pytest

from test_sim_core import COST, POLICIES, workload
from tropical_jax.sched.request import Request
from tropical_jax.sched.scheduler import Scheduler
from tropical_jax.sim.cli import load_profile
from tropical_jax.sim.simulator import simulate
from tropical_jax.sim.workloads import make_requests


class Counted(list):
    """Steps started by each fast_forward call; `waiting`: those started while requests waited."""
    waiting = 0


@pytest.fixture
def fast_steps(monkeypatch):
    counted = Counted()
    real = Scheduler.fast_forward

    def counting(self, *args):
        waiting = bool(self.waiting)
        plan, k = real(self, *args)
        counted.append(k)
        counted.waiting += k if waiting else 0
        return plan, k

    monkeypatch.setattr(Scheduler, "fast_forward", counting)
    return counted


def state(res):
    rec = res.scheduler.recalibrator
    return ([dataclasses.astuple(r) for r in res.requests], dict(res.counters), res.steps, res.end_time,
            res.stopped_early, [w.alloc._free for w in res.scheduler.workers.values()],
            rec and ({k: list(v) for k, v in rec.ratios.items()}, rec.factors))


def same_either_way(reqs, cluster, policy, fast_steps, cost=COST, **kw):
    fast = simulate(reqs, cluster, policy, cost, **kw)
    assert sum(fast_steps) > 0, "nothing was fast-forwarded: the case tests nothing"
    assert state(fast) == state(simulate(reqs, cluster, policy, cost, fast_forward=False, **kw))
    return fast


@pytest.mark.parametrize("policy,cluster", POLICIES, ids=[p for p, _ in POLICIES])
def test_same_outcome_step_by_step(policy, cluster, fast_steps):
    # Small KV memory (preemptions), failed transfers, long outputs (long stretches of decodes).
    reqs = workload(150, rate=2.0, seed=5, mean_out=150)
    res = same_either_way(reqs, cluster, policy, fast_steps, kv_capacity_tokens=60_000, transfer_failure_rate=0.1)
    assert res.counters.get("rejected", 0) < len(reqs)


def test_same_while_long_prompts_wait(fast_steps):
    """tropical: prompts over max_multiplex_tokens wait for the prefill worker while the M worker
    decodes on (their decisions never read it), until they turn late or the prefill worker's step ends."""
    rng = random.Random(11)
    reqs, t = [], 0.0
    for i in range(150):  # 40% of the prompts over 8192 tokens
        t += rng.expovariate(0.8)
        out = rng.randint(50, 300)
        reqs.append(Request(i, t, rng.randint(9000, 20000) if rng.random() < 0.4 else rng.randint(100, 3000),
                            out, None, 0.1, out))
    res = same_either_way(reqs, "1P1M", "tropical", fast_steps, kv_capacity_tokens=400_000)
    assert fast_steps.waiting > 0 and res.counters["waited"] > 0 and res.counters["late"] > 0


def test_same_on_a_trace_where_short_prompts_wait(fast_steps):
    """Mooncake under load: short prompts wait too, and an M worker's decodes (banking slack) may
    let one inline, so those pin the M worker to step-by-step (Dispatcher.reads)."""
    reqs = make_requests("mooncake-conversation", 300, 1.2, seed=0, max_input_len=32768)
    res = same_either_way(reqs, "1P1M", "tropical", fast_steps, load_profile("a100-internlm2.5-20b-tp2"))
    assert fast_steps.waiting > 0 and res.counters["waited"] > 0


def test_same_with_preemptions(fast_steps):
    reqs = workload(120, rate=4.0, seed=7, max_len=4000, mean_out=600)
    res = same_either_way(reqs, "2C", "chunked", fast_steps, kv_capacity_tokens=20_000)
    assert res.counters["preemptions"] > 0


def test_same_with_recalibration_that_moves(fast_steps):
    """Steps really take 30% longer than the profile says: the recalibrator rebuilds the planning model."""
    reqs = workload(150, rate=1.5, seed=3, mean_out=150)
    res = same_either_way(reqs, "1P1M", "planned", fast_steps, executor_cost=COST.scaled({"decode": 1.3, "mixed": 1.3}),
                          kv_capacity_tokens=200_000)
    assert res.counters["recalibrations"] > 0


@pytest.mark.parametrize("policy,cluster", [("colocated", "2C"), ("planned", "1P1M")])
def test_same_when_stopped_early(policy, cluster, fast_steps):
    reqs = workload(200, rate=10.0, seed=2, mean_out=150)  # planned attains 161, colocated 35
    res = same_either_way(reqs, cluster, policy, fast_steps, kv_capacity_tokens=200_000, max_misses=30)
    assert res.stopped_early


@pytest.mark.parametrize("policy,cluster", [("disaggregated", "2P1D"), ("tropical", "1P1M"),
                                            ("disaggregated:max_prefill_seqs=4", "1P1D")])
def test_same_past_prefill_steps_that_end_no_prompt(policy, cluster, fast_steps, monkeypatch):
    """Long prompts prefill in many steps: a decoding worker's stretch runs past those that hand
    nothing over (Scheduler.earliest_handoff), up to the shortest remaining prefill queued."""
    crossed = []
    real = Scheduler.earliest_handoff

    def counting(self, worker, step_end, cost):
        bound = real(self, worker, step_end, cost)
        crossed.append(bound > step_end)
        return bound

    monkeypatch.setattr(Scheduler, "earliest_handoff", counting)
    reqs = workload(150, rate=1.0, seed=100, max_len=30_000, mean_out=200)
    same_either_way(reqs, cluster, policy, fast_steps, kv_capacity_tokens=200_000)
    assert sum(crossed) > 10
