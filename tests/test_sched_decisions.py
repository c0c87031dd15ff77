"""Dispatch and batching decisions on hand-built monitor states, one test per condition of docs/algorithm.md
(Dispatch, Per-worker batching).

Cost model with round numbers (ms):  t_prefill(L) = t_chunk(L) = 0.25·L + 10,  t_decode = 20,
mixed (derived, shared overhead min(c0, d0) = 10) = 0.25·C + 20  ->  C=128: 52, 256: 84, 512: 148,
1024: 276.  Chunk buckets (128, 256, 512, 1024); safety factor 1 unless a test says otherwise.
A prefill on a P worker runs in chunks of 1024 (10 ms overhead each): L=2048 -> 532 ms.
"""

import math

import pytest

from sched_helpers import ids as _ids, queued
from tropical_jax.sched.config import PolicyConfig
from tropical_jax.sched.cost_model import CostModel, ProfileError
from tropical_jax.sched.plan import StepPlan
from tropical_jax.sched.request import Request
from tropical_jax.sched.scheduler import Scheduler

PROFILE = {"units": "ms", "prefill": {"c2": 0.0, "c1": 0.25, "c0": 10.0}, "decode": {"d0": 20.0, "d1": 0.0, "d2": 0.0},
           "kv_bytes_per_token": 1000, "transfer": {"bandwidth_GBps": 1.0, "latency_ms": 1.0}}
COST = CostModel.from_json(PROFILE)
NOW = 100.0


def make(cluster="2M", policy="tropical", cost=COST, cap=100_000, **knobs):
    knobs.setdefault("safety_factor", 1.0)
    knobs.setdefault("chunk_buckets", (128, 256, 512, 1024))
    return Scheduler(cluster, PolicyConfig(policy=policy, **knobs), cost, kv_capacity_tokens=cap, page_size=16,
                     record_decisions=True)


def req(L, ttft_slo=5.0, arrival=NOW, tpot=0.1, out=10):
    return Request(next(_ids), arrival, L, out, ttft_slo, tpot, out)


def decoding(s, worker, L=100, slack=0.3, n_out=10, tpot=0.1):
    """Put a request in worker's decode batch whose banked slack at NOW is `slack`."""
    r = req(L, tpot=tpot, arrival=0.0)
    r.n_out = n_out
    r.first_token_time = NOW + slack - tpot * n_out
    r.last_token_time = NOW - 0.001
    r.path = "inline"
    w = s.workers[worker]
    s.mon.track(r, next(_ids))
    assert w.reserve(r, L + n_out - 1)  # the last sampled token is not in the cache yet
    w.decoding.append(r)
    s.live += 1
    return r


def busy_until(s, worker, end):
    s.workers[worker].busy = StepPlan(worker, [], [], 0, end - NOW, NOW)


def placed(s, r):
    s.submit(r, NOW)
    return r.path, r.prefill_worker


# ---------------- cost model ----------------
def test_cost_model_fits_points_and_derives_mixed():
    pts = {str(L): 2e-6 * L * L + 0.1 * L + 20 for L in (512, 1024, 4096, 16384)}
    cm = CostModel.from_json({**PROFILE, "prefill": {"points": pts},
                              "decode": {"points": [[1, 1000, 21.1], [8, 1000, 28.1], [8, 9000, 36.1]]}})
    assert cm.prefill["c2"] == pytest.approx(2e-6) and cm.prefill["c0"] == pytest.approx(20)
    assert cm.decode["d1"] == pytest.approx(1.0) and cm.decode["d2"] == pytest.approx(0.001)
    assert cm.mixed_derived
    # chunk derived from prefill: attention term c2*((ctx+C)^2 - ctx^2)
    assert cm.t_chunk(1000, 3000) == pytest.approx((2e-6 * (4000**2 - 3000**2) + 100 + 20) / 1e3)
    assert cm.decode["d0"] == pytest.approx(19.1)  # shared overhead: min(c0=20, d0=19.1)
    assert cm.t_mixed(100, 0, 8, 1000) == pytest.approx(cm.t_chunk(100) + cm.t_decode(8, 1000) - 0.0191)
    assert cm.t_transfer(1000) == pytest.approx(0.001 + 1000 * 1000 / 1e9)


def test_decode_ends_add_each_step_time_to_the_clock_as_the_steps_run():
    cm = CostModel.from_json({**PROFILE, "decode": {"d0": 19.37, "d1": 0.213, "d2": 0.00117}})
    start, clock, ends = 1234.567, 1234.567, []
    for i in range(50):  # step by step, as a simulator without fast-forward runs them: bit for bit the same
        clock += cm.t_decode(7, 9000 + 7 * i)
        ends.append(clock)
    assert cm.decode_ends(start, 7, 9000, math.inf, 50) == ends
    assert cm.decode_ends(start, 7, 9000, math.inf, 20) == ends[:20]  # at most `most`
    assert cm.decode_ends(start, 7, 9000, ends[30], 50) == ends[:30]  # only those ending before `until`


def test_cost_model_kv_bytes_from_model_shape_and_errors(tmp_path):
    d = {k: v for k, v in PROFILE.items() if k != "kv_bytes_per_token"}
    cm = CostModel.from_json({**d, "model": {"num_layers": 48, "num_kv_heads": 8, "head_dim": 128, "dtype_bytes": 2}})
    assert cm.kv_bytes_per_token == 196608
    with pytest.raises(ProfileError, match="not found"):
        CostModel.from_json(tmp_path / "missing.json")
    with pytest.raises(ProfileError, match="kv_bytes_per_token"):
        CostModel.from_json(d)
    with pytest.raises(ProfileError, match="decode"):
        CostModel.from_json({k: v for k, v in PROFILE.items() if k != "decode"})
    with pytest.raises(ProfileError, match="units"):
        CostModel.from_json({**PROFILE, "units": "s"})
    with pytest.raises(ProfileError, match="cannot fit"):
        CostModel.from_json({**PROFILE, "prefill": {"points": [[1, 2.0], [2, 3.0]]}})
    p = tmp_path / "p.json"
    p.write_text(__import__("json").dumps(cm.to_dict()))
    assert CostModel.from_json(p).t_mixed(300, 10, 4, 500) == pytest.approx(cm.t_mixed(300, 10, 4, 500))


# ---------------- rule 1: prefill workers ----------------
def test_rule1_queue_simulation_protects_queued_deadlines():
    s = make("2P1M")
    busy_until(s, "P0", NOW + 0.2)                  # in-flight chunk: 0.2 s left
    queued(s, "P0", req(1000, ttft_slo=0.5))        # 260 ms; alone it ends at 0.46 <= 0.5
    queued(s, "P1", req(1000, ttft_slo=5.0))        # P1 is idle
    r = req(400)                                    # 110 ms, SJF puts it first: P0's queued request would end at 0.57
    assert placed(s, r) == ("prefill", "P1")


def test_rule1_in_flight_chunk_and_own_deadline():
    s = make("1P1M", max_multiplex_tokens=100)     # keep M out of it
    busy_until(s, "P0", NOW + 0.3)
    assert placed(s, req(1000, ttft_slo=0.55)) == (None, None)   # 0.3 + 0.26 = 0.56 > 0.55 -> wait
    s = make("1P1M", max_multiplex_tokens=100)
    busy_until(s, "P0", NOW + 0.3)
    r = req(1000, ttft_slo=0.57)
    assert placed(s, r) == ("prefill", "P0")


def test_rule1_picks_least_outstanding_time_not_tokens():
    s = make("2P1M", max_multiplex_tokens=100)
    queued(s, "P0", req(1200))                      # 1200 tokens, 2 chunks: 320 ms
    for _ in range(40):
        queued(s, "P1", req(1))                     # 40 tokens, 40 x 10.25 ms = 410 ms
    assert placed(s, req(3000, ttft_slo=50)) == ("prefill", "P0")


# ---------------- rule 2: multiplexing workers ----------------
def test_rule2_plan_per_step_and_pick_largest_min_slack_left():
    # M0: decode slack 0.3 -> chunks 1024, 256, 256, 512 (steps 276, 84, 84, 148 ms; budgets 300, 124,
    #     140, 156): plan 0.592 s, min slack left 0.3 + 0.4 - 0.592 = 0.108.
    # M1: decode slack 0.2 -> chunks 512, 512, 256, 256, 256, 256: plan 0.632 s, slack left 0.168.
    s = make("2M")
    decoding(s, "M0", slack=0.3)
    decoding(s, "M1", slack=0.2)
    r = req(2048)
    assert placed(s, r) == ("inline", "M1")
    assert "min slack left 0.168" in s.decisions[-1].reason
    assert "plan ends 100.632" in s.decisions[-1].reason


def test_rule2_slack_checked_at_every_planned_step():
    # tpot 50 ms, slack 57 ms; every 128-chunk step (52 ms) spends 2 ms net: steps 1-3 fit, step 4 does not.
    for L, ok in ((384, True), (512, False)):
        s = make("1M", short_prompt_tokens=0)
        decoding(s, "M0", slack=0.057, tpot=0.05)
        r = req(L)
        s.submit(r, NOW)
        assert (r.path == "inline") == ok, L
        if not ok:
            assert "no chunk keeps every decode on time (step 4)" in s.decisions[-1].reason


def test_rule2_short_prompts_skip_the_slack_check():
    s = make("1M")
    decoding(s, "M0", slack=0.01)                   # no chunk fits 10 ms
    assert placed(s, req(511)) == ("inline", "M0")  # short: stall below noise
    s = make("1M")
    decoding(s, "M0", slack=0.01)
    assert placed(s, req(512)) == (None, None)
    assert s.counters["waited"] == 1


def test_rule2_slack_margin():
    for margin, ok in ((0.0, True), (0.26, False)):  # 600 tokens: 512 + 88; budget 0.3 - margin
        s = make("1M", slack_margin=margin)
        decoding(s, "M0", slack=0.3)
        r = req(600)
        s.submit(r, NOW)
        assert (r.path == "inline") == ok


def test_rule2_max_multiplex_tokens():
    s = make("1P1M")
    busy_until(s, "P0", NOW + 100)                  # P cannot meet anyone's deadline
    assert placed(s, req(8193)) == (None, None)
    assert "max_multiplex_tokens" in s.decisions[-1].reason
    assert placed(s, req(8192, ttft_slo=10)) == ("inline", "M0")
    s = make("1P1M", max_multiplex_tokens=None)
    busy_until(s, "P0", NOW + 100)
    assert placed(s, req(20000, ttft_slo=20)) == ("inline", "M0")


def test_rule2_memory_watermark():
    # 100k tokens = 6250 pages; watermark 90% = 5625. M0 holds 89,009 tokens (5564 pages); +1001 -> 5627.
    s = make("2M")
    decoding(s, "M0", L=89_000, slack=5.0)
    decoding(s, "M1", slack=0.3)                    # M0 would win on slack
    assert placed(s, req(1000)) == ("inline", "M1")
    s = make("2M", memory_watermark=1.0)
    decoding(s, "M0", L=89_000, slack=5.0)
    decoding(s, "M1", slack=0.3)
    assert placed(s, req(1000)) == ("inline", "M0")


def test_rule2_decode_latency_watermark_is_a_fraction_of_tpot():
    # t_decode = 20 ms + 0.001 ms per KV token. Watermark 0.85 x TPOT.
    cost = CostModel.from_json({**PROFILE, "decode": {"d0": 20.0, "d1": 0.0, "d2": 0.001}})
    s = make("2M", cost=cost)
    decoding(s, "M0", L=64_990, slack=5.0)          # with the newcomer: 20 + 66 = 86 ms > 85
    decoding(s, "M1", L=10_000, slack=0.5)
    assert placed(s, req(1000)) == ("inline", "M1")
    s = make("2M", cost=cost)
    decoding(s, "M0", L=64_990, slack=5.0, tpot=0.2)  # same step, TPOT 200 ms for every request
    decoding(s, "M1", L=10_000, slack=0.5, tpot=0.2)
    assert placed(s, req(1000, tpot=0.2)) == ("inline", "M0")
    s = make("2M", cost=cost, decode_latency_watermark=0.5)
    decoding(s, "M0", L=20_000, slack=0.5)          # 20 + 21 = 41 ms <= 50
    decoding(s, "M1", L=30_000, slack=5.0)          # 51 ms > 50 (M1 would win on slack)
    assert placed(s, req(1000)) == ("inline", "M0")
    s = make("1M", cost=cost, decode_latency_watermark=0.5)
    decoding(s, "M0", L=30_000, slack=5.0)
    assert placed(s, req(1000)) == (None, None)


def test_rule2_plan_must_end_by_deadline():
    s = make("1M")
    decoding(s, "M0", slack=0.2)                    # L=2048 plan ends at 0.632 (see above)
    assert placed(s, req(2048, ttft_slo=0.6)) == (None, None)
    s = make("1M")
    decoding(s, "M0", slack=0.2)
    assert placed(s, req(2048, ttft_slo=0.64)) == ("inline", "M0")


def test_rule2_plans_after_inlines_already_queued():
    # M0 idle, no decodes: a queued 4096-token inline runs first, 4 chunk-only steps of 266 ms
    # (1.064 s). It then decodes with one TPOT of slack, so the newcomer's 1024 tokens go in 256-token
    # chunks (84 ms; budgets 100, 116, 132, 148 ms): the plan ends at 1.064 + 4 x 0.084 = 1.4 s.
    s = make("1M")
    queued(s, "M0", req(4096))
    assert placed(s, req(1024, ttft_slo=1.3)) == (None, None)
    s = make("1M")
    queued(s, "M0", req(4096))
    r = req(1024, ttft_slo=1.45)
    assert placed(s, r) == ("inline", "M0")
    assert "plan ends 101.400" in s.decisions[-1].reason


# ---------------- prefer, waiting, timeouts, late ----------------
def test_prefer_prefill_or_multiplex():
    assert placed(make("1P1M"), req(1000)) == ("prefill", "P0")
    assert placed(make("1P1M", prefer="multiplex"), req(1000)) == ("inline", "M0")


def test_waiting_does_not_block_requests_behind():
    s = make("1P1M", queue_order="fcfs")
    busy_until(s, "P0", NOW + 100)
    long_ = req(9000, arrival=NOW - 1)              # P too late, too long to inline: waits at the head
    s.submit(long_, NOW - 1)
    short = req(600)
    s.submit(short, NOW)
    assert long_.path is None and [e[1] for e in s.waiting] == [long_]
    assert (short.path, short.prefill_worker) == ("inline", "M0")
    assert s.counters["waited"] == 1 and s.counters["inline"] == 1


def test_queue_timeout_rejects_and_timer_fires():
    s = make("1P1M", queue_timeout=2.0)
    busy_until(s, "P0", NOW + 100)
    r = req(9000, ttft_slo=50)
    s.submit(r, NOW)
    assert r.path is None and s.next_timer() == pytest.approx(NOW + 2.0)
    s.tick(NOW + 1.9)
    assert not r.rejected
    s.tick(NOW + 2.0)
    assert r.rejected and r.path == "rejected" and s.counters["rejected"] == 1 and not s.waiting
    assert s.live == 0


def test_late_request_best_effort_soonest_first_token():
    # Deadline already out of reach: served where its first token comes soonest.
    s = make("1P1M")
    busy_until(s, "P0", NOW + 1.0)
    r = req(1000, ttft_slo=0.001)
    assert placed(s, r) == ("inline", "M0") and r.late           # M0: 0.26 s, P0: 1.26 s
    assert s.counters["late"] == 1
    s = make("1P1M")
    busy_until(s, "P0", NOW + 1.0)
    r = req(9000, ttft_slo=0.001)                                 # too long to inline
    assert placed(s, r) == ("prefill", "P0") and r.late


def test_late_request_never_makes_another_late():
    s = make("1P1M", max_multiplex_tokens=100)
    queued(s, "P0", req(4000, ttft_slo=1.1))                     # 4 chunks: 1.04 s, on time
    r = req(500, ttft_slo=0.001)                                  # SJF would put it first: 0.135 s -> 1.175 > 1.1
    assert placed(s, r) == (None, None)
    assert "would make a queued request late" in s.decisions[-1].reason
    assert s.next_timer() is None                                 # already late; retried on state changes


def test_request_turns_late_by_timer():
    s = make("1P1M", max_multiplex_tokens=100)
    busy_until(s, "P0", NOW + 10)
    r = req(1000, ttft_slo=1.0)                                   # waits; late from NOW + 1 - 0.26
    s.submit(r, NOW)
    assert r.path is None and s.next_timer() == pytest.approx(NOW + 0.74)
    s.tick(NOW + 0.7)
    assert r.path is None
    s.tick(s.next_timer())
    assert r.path == "prefill" and r.late


def test_safety_factor_scales_predictions():
    for sf, late in ((1.0, False), (1.1, True)):                  # 0.26 s vs 0.286 s, deadline 0.27 s
        s = make("1P1M", max_multiplex_tokens=100, safety_factor=sf)
        r = req(1000, ttft_slo=0.27)
        assert placed(s, r) == ("prefill", "P0") and r.late == late


def test_default_ttft_slo_is_scale_times_isolated_prefill():
    s = make("1P1M", ttft_scale=4.0)
    r = Request(1, NOW, 1000, 5)
    s.submit(r, NOW)
    assert r.ttft_slo == pytest.approx(4 * 0.26) and r.tpot_slo == 0.1


# ---------------- per-worker batching ----------------
@pytest.mark.parametrize("slack,chunk", [(0.3, 1024), (0.2, 512), (0.06, 128), (0.04, None)])
def test_m_step_chunk_is_largest_bucket_within_slack(slack, chunk):
    s = make("1M")
    d = decoding(s, "M0", slack=slack)
    queued(s, "M0", req(2048))
    plan = s.next_step("M0", NOW)
    assert plan.decodes == [d]
    assert (plan.chunks[0].length if plan.chunks else None) == chunk


@pytest.mark.parametrize("guard,pending,cap,chunk", [(False, 100, math.inf, 1024), (True, None, math.inf, 1024),
                                                     (True, 100, 0.115, 256), (True, 4000, 1.12, 1024)])
def test_handoff_guard_ends_the_step_a_handoff_lands_in_within_its_tpot(guard, pending, cap, chunk):
    # P0 (idle) finishes the pending prompt at NOW + 0.25 L + 10 ms: 100 tokens -> 35 ms, landing after a
    # 1.1 ms copy (1 ms + 100 kB at 1 GB/s), inside M0's next step. Its second token comes after that
    # step, in a 20 ms decode step, due 100 ms after its first: the step must end by 35 + 100 - 20 =
    # 115 ms -> 0.25 C + 20 <= 115 -> C <= 380 -> bucket 256. 4000 tokens (4 chunks, 1040 ms) land
    # after any step M0 could run now: the limit is 1040 + 100 - 20 = 1120 ms and the decode's 5 s of
    # slack allows 1024.
    from tropical_jax.sched.step_limits import step_limits
    s = make("1P1M", handoff_guard=guard)
    decoding(s, "M0", slack=5)
    queued(s, "M0", req(2048))
    if pending:
        queued(s, "P0", req(pending, tpot=0.1))
    limits = step_limits(s.mon, s.workers["M0"], NOW)
    assert (math.inf if limits is None else limits.cap(NOW)) == pytest.approx(cap)
    assert s.next_step("M0", NOW).chunks[0].length == chunk


@pytest.mark.parametrize("p_state,cap,chunk", [("idle", math.inf, 1024), ("long step", 0.08, 128),
                                               ("ends soon, then idle", math.inf, 1024),
                                               ("ends soon, then a queue", 0.13, 256)])
def test_arrival_guard_keeps_a_worker_free_for_the_shortest_recent_wait(p_state, cap, chunk):
    # A recent 40-token arrival with a 100 ms TTFT SLO (its prefill 20 ms) may wait 80 ms for a
    # worker. While P0 runs a step past NOW + 80 ms, M0's step must end by then: 0.25 C + 20 <= 80 ->
    # 128. If P0's step ends at NOW + 50 ms and P0 is then idle, P0 serves such an arrival in time;
    # if a queue follows, P0 takes the short prompt at NOW + 50 ms (SJF) and M0 must end by 50 + 80 =
    # 130 ms -> 256.
    from tropical_jax.sched.step_limits import step_limits
    s = make("1P1M", arrival_guard=True)
    decoding(s, "M0", slack=5)
    queued(s, "M0", req(2048))
    s.mon.track(req(40, ttft_slo=0.1), next(_ids))
    if p_state == "long step":
        busy_until(s, "P0", NOW + 0.5)
    elif p_state.startswith("ends soon"):
        busy_until(s, "P0", NOW + 0.05)
        if p_state.endswith("queue"):
            queued(s, "P0", req(4000))
    assert step_limits(s.mon, s.workers["M0"], NOW).cap(NOW) == pytest.approx(cap)
    assert s.next_step("M0", NOW).chunks[0].length == chunk
    # A long prompt's wait never limits a step: its first token waits for its own prefill's steps.
    t = make("1P1M", arrival_guard=True)
    t.mon.track(req(4000, ttft_slo=1.1), next(_ids))
    busy_until(t, "P0", NOW + 0.5)
    assert step_limits(t.mon, t.workers["M0"], NOW) is None  # no limit at all


def test_cached_plans_start_when_a_step_that_overran_its_prediction_ends():
    """A worker's plans are cached while its state stands; they start when its step in flight ends,
    so once that step has run past its predicted end (the real engine's steps vary), they start now."""
    s = make("1P1M")
    busy_until(s, "P0", NOW + 0.1)
    busy_until(s, "M0", NOW + 0.1)
    p, m, d = s.workers["P0"], s.workers["M0"], s.dispatcher
    d.begin_pass(NOW)
    assert d._pq(p).t0 == d._queued(m).full.t0 == NOW + 0.1
    d.begin_pass(NOW + 0.05)  # still within the predicted steps: the same plans
    assert d._pq(p).t0 == d._queued(m).full.t0 == NOW + 0.1
    d.begin_pass(NOW + 0.5)   # both steps overran and are still in flight
    assert d._pq(p).t0 == d._queued(m).full.t0 == NOW + 0.5


def test_cached_m_plans_see_a_prefill_step_that_overran():
    """An M worker's plans under the arrival guard read when the P workers are free; a P step in
    flight that ran past its predicted end keeps its version, so the cache must still see the time."""
    s = make("1P1M", arrival_guard=True)
    s.mon.track(req(40, ttft_slo=0.1), next(_ids))
    busy_until(s, "P0", NOW + 0.5)
    busy_until(s, "M0", NOW + 2.0)
    queued(s, "M0", req(2048))
    d, m = s.dispatcher, s.workers["M0"]
    d.begin_pass(NOW)
    assert d._queued(m).full.limits.prefill_busy[0][0] == pytest.approx(NOW + 0.5 * s.mon.cfg.safety_factor)
    d.begin_pass(NOW + 1.0)  # P0's step is still in flight, past its predicted end; M0's is not
    assert d._queued(m).full.limits.prefill_busy[0][0] == NOW + 1.0


def test_p_worker_srpt_at_chunk_boundary():
    s = make("1P1M", max_multiplex_tokens=100)
    a = req(3000)
    s.submit(a, NOW)
    plan = s.next_step("P0", NOW)
    assert plan.chunks[0].request is a and plan.chunks[0].length == 1024 and not plan.decodes
    b = req(500)
    s.submit(b, NOW + 0.1)                              # shorter than a's remaining 1976 tokens
    assert b.path == "prefill"
    s.step_done("P0", plan, NOW + 0.266)
    plan = s.next_step("P0", NOW + 0.266)
    assert plan.chunks[0].request is b and plan.chunks[0].length == 500 and plan.chunks[0].last


def test_handoff_to_least_loaded_m_with_room_and_failed_transfer_recomputes():
    s = make("1P2M", cap=20_000)                        # 1250 pages, watermark 1125
    decoding(s, "M0", L=4000, slack=5)
    decoding(s, "M1", L=1000, slack=5)                  # less decode load than M0, but a queued
    queued(s, "M1", req(16_000))                        # inline holds 1001 pages: no room for 188 more
    r = req(3000)
    s.submit(r, NOW)
    plan = s.next_step("P0", NOW)
    while not plan.chunks[0].last:
        s.step_done("P0", plan, NOW)
        plan = s.next_step("P0", NOW)
    s.step_done("P0", plan, NOW + 1)
    assert r.first_token_time == NOW + 1 and r.n_out == 1
    (t,) = s.take_transfers()
    assert (t.src, t.dst, t.tokens) == ("P0", "M0", 3000) and r.decode_worker == "M0"
    s.transfer_done(t, NOW + 1.5, ok=False)
    assert r.recomputed and r.transfer_time == pytest.approx(0.5)
    assert s.workers["P0"].alloc.num_used == 0 and s.workers["M0"].queue == [r]
    plan = s.next_step("M0", NOW + 1.5)
    assert plan.chunks[0].request is r and plan.chunks[0].recompute


def test_colocated_prefill_runs_alone_and_chunked_fills_budget():
    s = make("1C", policy="colocated")
    d = decoding(s, "C0")
    r = req(3000)
    s.submit(r, NOW)
    plan = s.next_step("C0", NOW)
    assert plan.chunks[0].request is r and plan.chunks[0].length == 3000 and plan.decodes == []
    s = make("1C", policy="colocated", token_budget=2048)
    decoding(s, "C0")
    s.submit(req(3000), NOW)
    assert s.next_step("C0", NOW).chunks[0].length == 2048
    s = make("1C", policy="chunked", token_budget=512)
    ds = [decoding(s, "C0") for _ in range(3)]
    s.submit(req(3000), NOW)
    plan = s.next_step("C0", NOW)
    assert plan.chunks[0].length == 509 and plan.decodes == ds
    assert d is not None


@pytest.mark.parametrize("order,first", [("fcfs", 0), ("sjf", 1), ("edf", 2)])
def test_disaggregated_prefill_queue_order(order, first):
    s = make("1P1D", policy="disaggregated", queue_order=order)
    busy_until(s, "P0", NOW + 1)
    rs = [req(3000, 10, arrival=NOW), req(500, 5, arrival=NOW + 0.1), req(2000, 1, arrival=NOW + 0.2)]
    for r in rs:
        s.submit(r, r.arrival)
    s.workers["P0"].busy = None
    assert s.next_step("P0", NOW + 1).chunks[0].request is rs[first]


def test_decode_out_of_pages_preempts_youngest():
    s = make("1C", policy="colocated", cap=1600)        # 100 pages of 16
    a = decoding(s, "C0", L=791, n_out=10)              # 800 tokens cached: exactly 50 pages
    b = decoding(s, "C0", L=791, n_out=10)
    plan = s.next_step("C0", NOW)                       # each needs a 51st page: b (youngest) is preempted
    assert plan.decodes == [a] and b.recompute_len == 800 and s.workers["C0"].queue == [b]
    assert s.counters["preemptions"] == 1 and math.isclose(plan.predicted, 0.02)


def test_decode_tokens_drop_a_preempted_decode_counted_before():
    """A victim ahead of the decode that ran out of pages leaves the step: its KV tokens, already counted,
    come off decode_tokens (the predicted step time reads them)."""
    s = make("1C", policy="colocated", cap=1520)        # 95 pages of 16
    a = decoding(s, "C0", L=791, n_out=10)              # 50 pages, full: needs a 51st
    b = decoding(s, "C0", L=700, n_out=10)              # 45 pages, room left in its last: counted first
    s.workers["C0"].decoding[:] = [b, a]
    plan = s.next_step("C0", NOW)                       # a finds no page: b (youngest) is preempted
    assert plan.decodes == [a] and b.recompute_len == 709
    assert plan.decode_tokens == sum(r.prompt_len + r.n_out for r in plan.decodes) == 801


def test_decode_tokens_count_only_the_batch_max_batch_keeps():
    s = make("1C", policy="colocated", max_batch=2)
    rs = [decoding(s, "C0", L=L) for L in (150, 150, 300)]
    plan = s.next_step("C0", NOW)
    assert plan.decodes == rs[:2]
    assert plan.decode_tokens == sum(r.prompt_len + r.n_out for r in plan.decodes) == 320


def test_inline_frontier_equals_step_by_step_plan():
    """The shared-sequence planner gives exactly the step-by-step strict plan, for any prompt length."""
    from tropical_jax.sched.inline_plans import InlineFrontier, QueuedPlan
    from tropical_jax.sched.multiplex import plan_prefill

    cost = CostModel.from_json({**PROFILE, "prefill": {"c2": 2e-6, "c1": 0.1, "c0": 15.0},
                                "decode": {"d0": 20.0, "d1": 0.2, "d2": 5e-5}})
    rng = __import__("random").Random(5)
    checked = 0
    for trial in range(60):
        s = make("1M", cost=cost, short_prompt_tokens=rng.choice([0, 512]), slack_margin=rng.choice([0, 0.01]),
                 safety_factor=rng.choice([1.0, 1.05]), chunk_buckets=rng.choice([(128, 256, 512, 1024, 2048), (64, 500)]))
        for _ in range(rng.randint(0, 6)):
            decoding(s, "M0", L=rng.randint(10, 9000), slack=rng.uniform(-0.02, 0.6), tpot=rng.choice([0.05, 0.1]))
        for _ in range(rng.randint(0, 2)):
            queued(s, "M0", req(rng.randint(1, 3000)))
        s.dispatcher.begin_pass(NOW)
        base = QueuedPlan(s.mon, s.workers["M0"], NOW).full
        front = InlineFrontier(s.mon, base)
        for L in [rng.randint(1, 12_000) for _ in range(8)] + [1, 64, 500, 512, 2048]:
            r = req(L)
            got = front.plan(r)
            st = base.copy()
            ok = plan_prefill(s.mon, st, r, 0)
            assert got.ok == ok, (trial, L)
            if ok:
                assert got.end == pytest.approx(st.t0 + st.elapsed, abs=1e-9)
                assert got.steps == st.steps - base.steps
                assert got.min_slack_left == pytest.approx(st.min_slack_left(), abs=1e-9)
                checked += 1
    assert checked > 200


def test_pick_chunk_matches_chunk_room_and_a_scan_of_the_buckets():
    """pick_chunk (a search from the bucket the step before chose) = the rest of the prompt if it is
    within chunk_room, else bucket_floor(chunk_room): the chunk InlineFrontier plans with (closed form),
    whatever bucket the search starts from and whatever the step limits. Without limits, also the rest
    or the largest bucket whose mixed step fits, found by trying every candidate."""
    from tropical_jax.sched.multiplex import PlanState, bucket_floor, chunk_room, pick_chunk
    from tropical_jax.sched.step_limits import StepLimits

    rng = __import__("random").Random(9)
    buckets = (64, 128, 256, 512, 1024, 2048)
    binding = 0  # cases where the limits change the chunk
    for mixed in (None, {"m0": 25.0, "mc2": 1e-6, "mcx": 3e-6, "mc1": 0.09, "mb": 0.3, "mt": 4e-5}):
        prof = {**PROFILE, "prefill": {"c2": 2e-6, "c1": 0.1, "c0": 15.0}, "decode": {"d0": 20.0, "d1": 0.2, "d2": 5e-5}}
        cost = CostModel.from_json({**prof, "mixed": mixed} if mixed else prof)
        s = make("1M", cost=cost, safety_factor=1.03, chunk_buckets=buckets)
        for _ in range(600):
            limits = None
            if rng.random() < 0.6:
                landings = [(rng.uniform(0, 0.6), rng.uniform(0.1, 0.9)) for _ in range(rng.randint(0, 3))]
                busy = [(rng.uniform(0, 0.5), rng.uniform(0, 1.5)) for _ in range(rng.randint(0, 2))]
                limits = StepLimits(landings, busy, rng.choice([math.inf, rng.uniform(0.01, 0.4)]))
            st = PlanState(t0=0.0, num_decodes=rng.randint(0, 40), decode_tokens=rng.randint(0, 200_000),
                           elapsed=rng.uniform(0, 0.3), steps=rng.randint(0, 5), min_a={0.1: rng.uniform(0, 0.8)},
                           limits=limits, bucket_hint=rng.choice([None, *range(len(buckets))]))
            R, ctx = rng.randint(1, 5000), rng.randint(0, 20_000)
            room = chunk_room(s.mon, st, st.steps, st.elapsed, ctx, st.decode_tokens)
            free = st.copy()
            got = pick_chunk(s.mon, st, R, ctx, True)[0]
            assert got == (R if R <= room else bucket_floor(buckets, room))
            free.limits = None
            want = 0
            for b in reversed(buckets):
                c = min(b, R)
                if cost.t_mixed(c, ctx, free.num_decodes, free.decode_tokens) * 1.03 <= free.budget(0.0):
                    want = c
                    break
            assert pick_chunk(s.mon, free, R, ctx, True)[0] == want
            binding += got != want
    assert binding > 50


def test_requests_no_worker_could_ever_serve_are_rejected_at_once():
    s = make("1P1M", cap=10_000)                       # 625 pages, 562 under the watermark
    r = req(9000)
    s.submit(r, NOW)
    assert r.rejected and s.counters["rejected"] == 1 and s.live == 0
    s = make("1M")
    r = req(9000)                                      # no P worker, too long to inline
    s.submit(r, NOW)
    assert r.rejected and "max_multiplex_tokens" in s.decisions[-1].reason


# ---------------- packed prefills (max_prefill_seqs > 1) ----------------
def chunk_shapes(plan):
    return [(c.request.prompt_len, c.start, c.length, c.last) for c in plan.chunks]


def test_p_worker_packs_prompts_that_finish_in_the_step_in_local_order():
    # SJF order 100, 200, 300, 400, 900: the first four fill 1000 of the 1024-token bucket, 900 does not fit
    # the 24 left and is skipped (P packs only prompts that finish here). Packed: 0.25·1000 + 10 = 260 ms,
    # against 35 + 60 + 85 + 110 = 290 ms one after another.
    s = make("1P1M", max_prefill_seqs=4)
    rs = [req(L) for L in (900, 300, 100, 200, 400)]
    for r in rs:
        queued(s, "P0", r)
    plan = s.next_step("P0", NOW)
    assert chunk_shapes(plan) == [(100, 0, 100, True), (200, 0, 200, True), (300, 0, 300, True), (400, 0, 400, True)]
    assert plan.predicted == pytest.approx(0.260)
    s.step_done("P0", plan, NOW + 0.26)
    assert [(r.n_out, r.first_token_time) for r in rs[1:]] == [(1, NOW + 0.26)] * 4
    assert sorted(t.request.prompt_len for t in s.take_transfers()) == [100, 200, 300, 400]
    assert s.workers["P0"].queue == [rs[0]]
    s = make("1P1M", max_prefill_seqs=2)                 # slots cap the packing
    for L in (300, 100, 200):
        queued(s, "P0", req(L))
    assert chunk_shapes(s.next_step("P0", NOW)) == [(100, 0, 100, True), (200, 0, 200, True)]


def test_p_worker_does_not_pack_when_it_would_make_an_on_time_request_late():
    # a alone ends at 35 ms, on time for its 50 ms deadline; packed with b (85 ms) it would be late.
    s = make("1P1M", max_prefill_seqs=4)
    queued(s, "P0", req(100, ttft_slo=0.05))
    queued(s, "P0", req(200))
    assert chunk_shapes(s.next_step("P0", NOW)) == [(100, 0, 100, True)]
    # Already late either way: packing cannot hurt it, and b gains.
    s = make("1P1M", max_prefill_seqs=4)
    queued(s, "P0", req(100, ttft_slo=0.01))
    queued(s, "P0", req(200))
    assert chunk_shapes(s.next_step("P0", NOW)) == [(100, 0, 100, True), (200, 0, 200, True)]


@pytest.mark.parametrize("L,packs", [(100, True), (500, False)])
def test_p_worker_packs_only_when_the_packed_step_costs_no_more(L, packs):
    # With c2 = 1e-4 ms/token², packing a and b costs 2·a·b·c2 more attention and saves one c0 = 10 ms:
    # two 100-token prompts gain (2 ms more, 10 saved), two 500-token prompts lose (50 ms more).
    cost = CostModel.from_json({**PROFILE, "prefill": {"c2": 1e-4, "c1": 0.25, "c0": 10.0}})
    s = make("1P1M", cost=cost, max_prefill_seqs=4)
    queued(s, "P0", req(L))
    queued(s, "P0", req(L))
    assert len(s.next_step("P0", NOW).chunks) == (2 if packs else 1)


@pytest.mark.parametrize("slack,packed", [(0.3, [100, 200, 300]), (0.1, [100, 200])])
def test_m_worker_packs_inlines_that_finish_while_decodes_stay_on_time(slack, packed):
    # Mixed step 0.25·C + 20 ms (shared 10 ms overhead). Queue order a=100, b=200, c=300, e=900: e never
    # finishes in the 1024-token bucket beside them and is skipped. With 300 ms of decode slack
    # a+b+c fit (170 ms, against 45 + 70 + 95 one after another); with 100 ms, C <= 320: a+b (95 ms).
    s = make("1M", max_prefill_seqs=4)
    decoding(s, "M0", slack=slack)
    for L in (100, 200, 300, 900):
        queued(s, "M0", req(L))
    plan = s.next_step("M0", NOW)
    assert chunk_shapes(plan) == [(L, 0, L, True) for L in packed]
    assert plan.predicted == pytest.approx((0.25 * sum(packed) + 20) / 1000)


def test_m_worker_packs_nothing_behind_a_prompt_that_goes_on():
    # 100 ms of slack: the 900-token head gets the 256 bucket and goes on, so nobody joins it.
    s = make("1M", max_prefill_seqs=4)
    decoding(s, "M0", slack=0.1)
    for L in (900, 100):
        queued(s, "M0", req(L))
    assert chunk_shapes(s.next_step("M0", NOW)) == [(900, 0, 256, False)]


def test_packed_segments_respect_the_context_page_cap():
    # 16-token pages, 20 pages a step: 100 (7 pages) + 150 (10) fit, + 200 (13) would not; 40 (3) still does.
    s = make("1P1M", max_prefill_seqs=8, max_pack_pages=20)
    for L in (200, 150, 100, 40):
        queued(s, "P0", req(L))
    assert chunk_shapes(s.next_step("P0", NOW)) == [(40, 0, 40, True), (100, 0, 100, True), (150, 0, 150, True)]


def test_chunked_and_colocated_pack_prompts_up_to_the_token_budget():
    # Chunked, budget 512, two decodes: 510 prefill tokens = 100 + 300 whole + the first 110 of 400, which
    # goes on first in the next step.
    s = make("1C", policy="chunked", token_budget=512, max_prefill_seqs=4)
    ds = [decoding(s, "C0") for _ in range(2)]
    for L in (400, 100, 300):
        s.submit(req(L), NOW)
    plan = s.next_step("C0", NOW)
    assert plan.decodes == ds
    assert chunk_shapes(plan) == [(100, 0, 100, True), (300, 0, 300, True), (400, 0, 110, False)]
    s.step_done("C0", plan, NOW + 0.2)
    s.submit(req(50), NOW + 0.2)
    assert chunk_shapes(s.next_step("C0", NOW + 0.2))[:2] == [(400, 110, 290, True), (50, 0, 50, True)]
    # Colocated, budget 2048: prefills alone (decodes pause), packed up to the budget.
    s = make("1C", policy="colocated", token_budget=2048, max_prefill_seqs=4)
    decoding(s, "C0")
    for L in (3000, 500, 700):
        s.submit(req(L), NOW)
    plan = s.next_step("C0", NOW)
    assert plan.decodes == [] and chunk_shapes(plan) == [(500, 0, 500, True), (700, 0, 700, True), (3000, 0, 848, False)]
    assert plan.predicted == pytest.approx(0.25 * 2048 / 1000 + 0.010)


def test_packing_knobs_are_checked():
    with pytest.raises(ValueError, match="max_prefill_seqs"):
        PolicyConfig(max_prefill_seqs=0)
    assert PolicyConfig.parse("chunked:max_prefill_seqs=4,max_pack_pages=64").max_pack_pages == 64


def test_arrival_guard_never_refuses_the_smallest_chunk():
    # A recent 40-token arrival with a 50 ms TTFT SLO may wait 30 ms: less than M0's smallest mixed step
    # (128 tokens, 52 ms). With P0 busy for long, M0 still runs that smallest chunk (its decode's slack
    # allows it): else the inline would wait for as long as P0 stays busy.
    s = make("1P1M", arrival_guard=True)
    decoding(s, "M0", slack=5)
    queued(s, "M0", req(2048))
    s.mon.track(req(40, ttft_slo=0.05), next(_ids))
    busy_until(s, "P0", NOW + 0.5)
    assert s.next_step("M0", NOW).chunks[0].length == 128
