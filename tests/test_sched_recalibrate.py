"""Running recalibration: the scheduler plans with decode and mixed step times scaled by the median
real/predicted ratio of recent steps (sched/recalibrate.py), hand-computed and in the simulator."""

import math
import random
import statistics

import pytest

from tropical_jax.sched.config import PolicyConfig
from tropical_jax.sched.cost_model import CostModel
from tropical_jax.sched.metrics import summarize
from tropical_jax.sched.plan import Chunk, StepPlan
from tropical_jax.sched.recalibrate import MIN_STEPS, Recalibrator
from tropical_jax.sched.request import Request
from tropical_jax.sim.simulator import simulate

PROFILE = {"units": "ms", "prefill": {"c2": 1.8e-6, "c1": 0.095, "c0": 19.0},
           "decode": {"d0": 22.0, "d1": 0.16, "d2": 5e-5}, "kv_bytes_per_token": 196608,
           "transfer": {"bandwidth_GBps": 25.0, "latency_ms": 2.0}}
MIXED = {"m0": 25.0, "mc2": 2e-6, "mcx": 1e-6, "mc1": 0.1, "mb": 0.2, "mt": 6e-5}
COST = CostModel.from_json(PROFILE)


def decode_plan(b=4, t=400):
    return StepPlan("M0", [], [Request(i, 0.0, 100, 10) for i in range(b)], t, 0.0, 0.0)


def mixed_plan():
    return StepPlan("M0", [Chunk(Request(9, 0.0, 300, 10), 0, 300, True, False)], [Request(0, 0.0, 100, 10)], 101,
                    0.0, 0.0)


def test_median_of_the_window_as_statistics_computes_it():
    rec = Recalibrator(COST, window=20)
    rng = random.Random(0)
    predicted = COST.t_decode(4, 400)
    for i in range(300):  # repeats and a window that slides: the sorted copy must follow exactly
        rec.observe_time("decode", predicted, predicted * rng.choice([0.5, 1.0, 1.0 + rng.random(), 3.0]))
        assert rec.median("decode") == statistics.median(rec.ratios["decode"])
    assert len(rec.ratios["decode"]) == 20


def test_decode_factor_is_the_median_ratio_once_enough_steps_are_seen():
    rec = Recalibrator(COST, window=64)
    real = 2 * COST.t_decode(4, 400)
    assert all(rec.observe(decode_plan(), real) is None for _ in range(MIN_STEPS - 1))
    model = rec.observe(decode_plan(), real)
    assert model is not None
    assert model.t_decode(8, 1000) == pytest.approx(2 * COST.t_decode(8, 1000))
    assert model.t_chunk(256, 100) == COST.t_chunk(256, 100)  # prefill times stay as profiled
    assert model.t_prefill(500) == COST.t_prefill(500)
    # A few very slow steps (a GC pause) do not move the median; the profile itself is never changed.
    assert all(rec.observe(decode_plan(), 10 * real) is None for _ in range(3))
    assert rec.factors["decode"] == pytest.approx(2.0)
    assert COST.t_decode(8, 1000) == pytest.approx((22.0 + 0.16 * 8 + 5e-5 * 1000) * 1e-3)


def test_small_drift_and_prefill_steps_leave_the_planning_model_alone():
    rec = Recalibrator(COST, window=64)
    assert all(rec.observe(decode_plan(), 1.01 * COST.t_decode(4, 400)) is None for _ in range(2 * MIN_STEPS))
    chunk = StepPlan("P0", [Chunk(Request(1, 0.0, 512, 4), 0, 512, True, False)], [], 0, 0.0, 0.0)
    assert all(rec.observe(chunk, 3 * COST.t_chunk(512)) is None for _ in range(2 * MIN_STEPS))
    assert rec.factors == {"decode": 1.0}  # this profile derives mixed steps: they follow decode


def test_mixed_steps_get_their_own_factor_when_the_profile_has_them():
    cost = CostModel.from_json({**PROFILE, "mixed": MIXED})
    rec = Recalibrator(cost, window=32)
    plan = mixed_plan()
    real = 1.5 * cost.t_mixed(300, 0, 1, 101)
    models = [rec.observe(plan, real) for _ in range(MIN_STEPS)]
    assert models[:-1] == [None] * (MIN_STEPS - 1) and models[-1] is not None
    assert models[-1].t_mixed(128, 64, 8, 900) == pytest.approx(1.5 * cost.t_mixed(128, 64, 8, 900))
    assert models[-1].t_decode(8, 900) == cost.t_decode(8, 900)
    # The window forgets: 32 steps at the profile's own speed bring the factor back to 1.
    back = [rec.observe(plan, real / 1.5) for _ in range(32)]
    assert rec.factors["mixed"] == pytest.approx(1.0)
    assert back[-1] is None and any(m is not None for m in back)


def test_window_must_hold_enough_steps():
    for bad in (-2, 1, MIN_STEPS - 1):
        with pytest.raises(ValueError, match="recalibrate_steps"):
            PolicyConfig(policy="planned", recalibrate_steps=bad)
    assert PolicyConfig.parse("chunked:recalibrate_steps=16").recalibrate_steps == 16
    assert PolicyConfig(policy="planned").recalibrate_steps == 64
    assert PolicyConfig(policy="chunked").recalibrate_steps == 0


def workload(n, rate, tpot_slo, seed=0):
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        L = min(6000, int(rng.lognormvariate(math.log(800), 0.8)) + 1)
        o = 20 + rng.randint(0, 40)
        out.append(Request(i, t, L, o, None, tpot_slo, o))
    return out


def test_planned_on_a_machine_slower_than_its_profile_keeps_decodes_on_time_once_recalibrated():
    """Decode steps really take 1.6x the profile's time and the TPOT SLO is 40 ms (a batch's step ~35 ms
    really). Planning with the profile, inlines spend slack the decodes do not have; recalibrated, the
    scheduler sees the real step times and stops inlining where they would be late. Shedding is off:
    it would reject the requests the late decodes starve, hiding what recalibration changes."""
    machine = COST.scaled({"decode": 1.6})
    reqs = workload(200, 3.0, 0.04)
    runs = {rs: simulate(reqs, "1P1M", f"planned:recalibrate_steps={rs},shed=false", COST, executor_cost=machine,
                         kv_capacity_tokens=200_000) for rs in (0, 32)}
    off, on = (summarize(runs[rs].requests) for rs in (0, 32))
    assert runs[0].counters.get("recalibrations", 0) == 0 and runs[32].counters.get("recalibrations", 0) >= 1
    assert runs[32].scheduler.mon.cost.t_decode(8, 2000) == pytest.approx(1.6 * COST.t_decode(8, 2000))
    assert runs[0].scheduler.mon.cost is COST
    assert on["tpot_attainment"] >= off["tpot_attainment"] + 0.05
    assert on["attainment"] >= off["attainment"] + 0.05
    # Default TTFT SLOs are scaled from the profile as given, not from the recalibrated model.
    for r in runs[32].requests:
        assert r.ttft_slo == pytest.approx(5.0 * COST.t_prefill(r.prompt_len))


def test_recalibration_changes_nothing_on_a_machine_that_matches_its_profile():
    reqs = workload(150, 3.0, 0.06, seed=1)
    a, b = (simulate(reqs, "1P1M", f"planned:recalibrate_steps={rs}", COST, kv_capacity_tokens=200_000)
            for rs in (0, 64))
    assert b.counters.get("recalibrations", 0) == 0
    assert [(r.ttft, r.finish_time) for r in a.requests] == [(r.ttft, r.finish_time) for r in b.requests]


def test_server_metrics_export_the_factors_the_scheduler_plans_with():
    from tropical_jax.api.metrics import ServerMetrics

    res = simulate(workload(120, 3.0, 0.04), "1P1M", "planned:recalibrate_steps=32", COST,
                   executor_cost=COST.scaled({"decode": 1.6}), kv_capacity_tokens=200_000)
    state = {"workers": [], "dispatch": dict(res.scheduler.counters),
             "step_time_factors": dict(res.scheduler.recalibrator.factors)}
    text = ServerMetrics(state=lambda: state).render().decode()
    line = next(x for x in text.splitlines() if x.startswith('tropical_step_time_factor{kind="decode"}'))
    assert float(line.split()[-1]) == pytest.approx(1.6)
    assert 'tropical_dispatch_total{path="recalibrations"}' in text
    off = ServerMetrics(state=lambda: {"workers": [], "dispatch": {}}).render().decode()
    assert "tropical_step_time_factor{" not in off


def test_a_new_profile_replaces_predictions_slos_and_the_recalibration_baseline():
    """set_profile (the machine measured again): queued predictions, later default TTFT SLOs and the
    recalibrator's reference all follow the new profile; recalibration starts over from factor 1."""
    from tropical_jax.sched.scheduler import Scheduler

    sched = Scheduler("1P1M", "planned:recalibrate_steps=16", COST, kv_capacity_tokens=200_000)
    first = Request(0, 0.0, 800, 10, None, 0.1)
    sched.submit(first, 0.0)
    for _ in range(MIN_STEPS):  # steps 2x the profile's: the decode factor moves to 2
        sched.recalibrator.observe(decode_plan(), 2 * COST.t_decode(4, 400))
    assert sched.recalibrator.factors["decode"] == pytest.approx(2.0)
    slower = COST.scaled({"prefill": 1.5, "decode": 1.5})
    sched.set_profile(slower)
    assert sched.mon.iso[first] == pytest.approx(1.5 * COST.t_prefill_chunked(800, sched.mon.big_chunk))
    assert sched.recalibrator.factors["decode"] == 1.0 and sched.recalibrator.profile is slower
    later = Request(1, 0.01, 500, 10, None, 0.1)
    sched.submit(later, 0.01)
    assert later.ttft_slo == pytest.approx(sched.cfg.ttft_scale * 1.5 * COST.t_prefill(500))
    assert first.ttft_slo == pytest.approx(sched.cfg.ttft_scale * COST.t_prefill(800))  # given when it came
