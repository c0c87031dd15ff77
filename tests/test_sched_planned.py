"""Policy `planned` (docs/algorithm.md, The planned policy): defaults, earliest-first-token routing, shedding;
the work bound."""

import pytest

from sched_helpers import decoding, queued
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
    assert (planned.prefer, planned.max_multiplex_tokens, planned.shed, planned.protect_tokens) == ("finish", None, True, None)
    assert (planned.handoff_guard, planned.arrival_guard, planned.decode_commit_watermark) == (True, True, 1.0)
    paper = PolicyConfig.parse("tropical")
    assert (paper.prefer, paper.max_multiplex_tokens, paper.shed, paper.protect_tokens) == ("prefill", 8192, False, 0)
    assert (paper.handoff_guard, paper.arrival_guard, paper.decode_commit_watermark) == (False, False, None)
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
    # The step-overhead bound: some worker steps every 100 ms at 20 ms fixed cost (0.2 of a worker),
    # and a token costs only its own 1 ms: (2 - 0.2) / (0.1 + 9 x 0.001) s.
    assert b["step_bound_rps"] == pytest.approx(1.8 / 0.109)
    assert b["bound_rps_at_target"] == pytest.approx(b["bound_rps"])  # equal requests: none is cheaper to leave
    # At 50% attainment of one 1000-token and one 3000-token request only the 1000-token one must be
    # served: 0.1 + 0.01125 s of work per two arrivals.
    half = work_bound([1000, 3000], [10, 10], COST, num_workers=2, tpot_slo=0.1, attainment=0.5)
    assert half["bound_rps_at_target"] == pytest.approx(2 / (0.11125 / 2))
    assert half["step_bound_rps_at_target"] == pytest.approx(1.8 / (0.109 / 2))
    with pytest.raises(ValueError, match="misses the TPOT SLO"):
        work_bound([10], [5], COST, 1, tpot_slo=0.01)


def test_long_prompt_inlined_in_many_chunks_keeps_every_decode_on_time():
    # P0 has five 15k prompts queued (~7.5 s); a 20k newcomer is inlined on M0 beside two decodes with
    # 0.3 s and 0.15 s banked. Its plan takes many mixed steps, each sized to the tightest decode's
    # slack. Running M0's steps at their predicted times, every decode token is on time and the
    # first token lands when the plan said.
    now = 10.0
    sched = Scheduler("1P1M", "planned:chunk_buckets=256/512/1024/2048/4096,safety_factor=1", COST)
    busy = [Request(f"p{i}", now, 15000, 4, ttft_slo=100.0, output_len=4) for i in range(5)]
    for b in busy:
        queued(sched, "P0", b)
    decs = [decoding(sched, "M0", 3000, 0.3, now), decoding(sched, "M0", 500, 0.15, now, tpot=0.08)]
    r = Request("long", now, 20000, 4, ttft_slo=100.0, output_len=4)
    sched.mon.track(r, 99)
    sched.dispatcher.begin_pass(now)
    (_, planned_end, _, _), = sched.dispatcher.rule2(r, False, None)
    sched.mon.forget(r)
    sched.submit(r, now)
    assert r.path == "inline" and r.prefill_worker == "M0"
    t, chunks = now, []
    while r.first_token_time is None:
        plan = sched.next_step("M0", t)
        t = plan.end
        for d in plan.decodes:  # its next token is due at first + tpot * n_out
            assert t <= d.first_token_time + d.tpot_slo * d.n_out + 1e-9, (d.id, len(chunks))
        chunks += [c.length for c in plan.chunks]
        sched.step_done("M0", plan, t)
    assert sum(chunks) == 20000 and len(chunks) >= 8 and max(chunks) < 20000
    assert len(set(chunks)) > 1  # chunk sizes follow the slack budget, not one fixed size
    assert r.first_token_time == pytest.approx(planned_end, abs=1e-9)
    assert all(d.n_out > 5 for d in decs)


def test_finish_prefers_the_prefill_worker_when_its_first_token_comes_earlier():
    # M0 already has a 9k inline queued: a 5k newcomer would finish after it there, but at once on
    # the idle P0 -> P0, although M0 is eligible.
    sched = Scheduler("1P1M", "planned:chunk_buckets=512/4096,jump_tokens=none", COST)
    queued(sched, "M0", Request(0, 0.0, 9000, 4, ttft_slo=100.0, output_len=4))
    r = Request(1, 0.0, 5000, 4, ttft_slo=100.0, output_len=4)
    sched.mon.track(r, 1)
    sched.dispatcher.begin_pass(0.0)
    (_, p_end, _), = sched.dispatcher.rule1(r, False, None)
    (_, m_end, _, pos), = sched.dispatcher.rule2(r, False, None)
    assert m_end > p_end and pos is None
    sched.mon.forget(r)
    sched.submit(r, 0.0)
    assert r.prefill_worker == "P0" and r.path == "prefill"


def lane(jump_tokens="2048", x_slo=5.0, j_slo=2.0):
    """1M (inlines only): a 9k inline X queued on idle M0 at t=0, then a 1k prompt J. The lane alone: with
    the arrival guard, J's wait would also cap the steps of X's plan."""
    sched = Scheduler("1M", f"planned:chunk_buckets=256/1024/4096,jump_tokens={jump_tokens},arrival_guard=false",
                      COST, record_decisions=True)
    x = Request("X", 0.0, 9000, 4, ttft_slo=x_slo, output_len=4)
    sched.submit(x, 0.0)
    assert x.path == "inline" and sched.workers["M0"].queue == [x]
    j = Request("J", 0.0, 1000, 4, ttft_slo=j_slo, output_len=4)
    sched.submit(j, 0.0)
    return sched, x, j


def test_short_prompt_jumps_a_long_inline_that_stays_on_time():
    # X alone: 0.1 ms/token + 10 ms per chunk -> 9000 tokens in 3 chunks, ends ~0.93 s (deadline 5 s).
    # J (0.11 s) jumps: first in M0's queue; X, replanned behind J, still ends by its deadline.
    sched, x, j = lane()
    w = sched.workers["M0"]
    assert j.path == "inline" and j.jumped and w.queue == [j, x] and sched.counters["jumped"] == 1
    from tropical_jax.sched.inline_plans import QueuedPlan
    sched.dispatcher.begin_pass(0.0)
    after = QueuedPlan(sched.mon, w, 0.0)
    assert after.full.t0 + after.full.elapsed <= x.deadline
    # A second short prompt goes behind the first jumper, still ahead of X.
    j2 = Request("J2", 0.0, 500, 4, ttft_slo=2.0, output_len=4)
    sched.submit(j2, 0.0)
    assert w.queue == [j, j2, x]
    # Run M0: J's first token comes first, X's on time.
    t = 0.0
    while x.first_token_time is None:
        plan = sched.next_step("M0", t)
        t = plan.end
        sched.step_done("M0", plan, t)
    assert j.first_token_time < j2.first_token_time < x.first_token_time <= x.deadline


def test_short_prompt_does_not_jump_an_inline_it_would_make_late():
    # X's deadline (0.95 s) leaves ~0.02 s of margin: J (0.11 s) may not overtake it. Behind X, J's
    # first token (~1 s) misses its 0.5 s SLO, so J waits (1M has no P worker).
    sched, x, j = lane(x_slo=0.95, j_slo=0.5)
    assert not j.jumped and j.path is None and sched.workers["M0"].queue == [x]
    assert sched.counters["waited"] == 1 and sched.counters["jumped"] == 0
    reason = next(d.reason for d in sched.decisions if d.request == "J")
    assert "jump: delays a queued inline past its margin" in reason


def test_jump_lane_is_a_knob():
    # The same state as the jump test, lane off: J plans behind X (its 2 s SLO allows it).
    sched, x, j = lane(jump_tokens="none")
    assert j.path == "inline" and not j.jumped and sched.workers["M0"].queue == [x, j]
    # Prompts over jump_tokens never jump.
    sched, x, j = lane(jump_tokens="999")
    assert not j.jumped and sched.workers["M0"].queue == [x, j]


def test_planned_places_a_short_prompt_ahead_of_a_long_one_it_makes_late():
    # P0 runs a 20k prompt (2.01 s x safety factor 1.02 = 2.05 s, from t=0); queued behind it a 10k one
    # (1.03 s) due at 3.1 s, planned to end at 3.08. A 4k prompt arriving now (0.42 s, SJF puts it first)
    # would push the 10k one to 3.50 s: the paper's rule 1 refuses it (it waits), planned places it (its
    # own first token 2.47 s is before its deadline 2.5 s) and lets
    # the 10k prompt turn late: one request late instead of one turned away, and the late one is shed
    # once hopeless, freeing its time for others.
    def cluster(policy):
        sep = "," if ":" in policy else ":"
        sched = Scheduler("1P1M", policy + sep + "chunk_buckets=32768,max_multiplex_tokens=0,shed=false", COST)
        submit_all(sched, [Request(0, 0.0, 20000, 4, ttft_slo=100.0, output_len=4)])
        sched.next_step("P0", 0.0)
        submit_all(sched, [Request(1, 0.0, 10000, 4, ttft_slo=3.1, output_len=4)])
        return sched
    for policy, placed in (("tropical", False), ("planned", True)):
        sched = cluster(policy)
        short = Request(2, 0.0, 4000, 4, ttft_slo=2.5, output_len=4)
        sched.submit(short, 0.0)
        assert (short.prefill_worker == "P0") is placed, policy
    # protect_tokens=N protects queued prompts of at least N tokens only: the 10k one is protected by
    # 8192 (the 4k newcomer waits), not by 16384.
    for least, placed in ((8192, False), (16384, True)):
        sched = cluster(f"planned:protect_tokens={least}")
        short = Request(2, 0.0, 4000, 4, ttft_slo=2.5, output_len=4)
        sched.submit(short, 0.0)
        assert (short.prefill_worker == "P0") is placed, least


def test_short_prompt_jumps_an_inline_already_started():
    # X has run its first chunk (4096 tokens, 0.4196 s) when J arrives: J still goes first (a started
    # inline resumes from its cached tokens, as on a P worker); X, replanned behind J, ends on time.
    sched = Scheduler("1M", "planned:chunk_buckets=256/1024/4096", COST)
    x = Request("X", 0.0, 9000, 4, ttft_slo=5.0, output_len=4)
    sched.submit(x, 0.0)
    plan = sched.next_step("M0", 0.0)
    sched.step_done("M0", plan, plan.end)
    assert x.prefilled == 4096
    j = Request("J", plan.end, 1000, 4, ttft_slo=2.0, output_len=4)
    sched.submit(j, plan.end)
    assert j.jumped and sched.workers["M0"].queue == [j, x]
    t = plan.end
    while x.first_token_time is None:
        plan = sched.next_step("M0", t)
        t = plan.end
        sched.step_done("M0", plan, t)
    assert j.first_token_time < x.first_token_time <= x.deadline
    assert j.first_token_time == pytest.approx(0.4196 + 0.11)  # its 1000 tokens right after X's chunk


@pytest.mark.parametrize("held,placed", [(2, True), (3, False)])
def test_decode_commit_watermark_places_only_what_the_decode_batch_can_carry(held, placed):
    # Decode step 20 ms + 10 ms per request: a 100 ms TPOT carries 8. M0 decodes 5 and P0 holds `held`
    # prompts that will decode there: a newcomer makes 8 (100 ms: placed) or 9 (110 ms: it waits, for
    # both workers, where it costs itself alone instead of every member a late token).
    from test_sched_decisions import NOW, decoding
    cost = CostModel.from_json({"units": "ms", "prefill": {"c2": 0.0, "c1": 0.1, "c0": 10.0},
                                "decode": {"d0": 20.0, "d1": 10.0, "d2": 0.0}, "kv_bytes_per_token": 1,
                                "transfer": {"bandwidth_GBps": 1000, "latency_ms": 0.0}, "kv_capacity_tokens": 10**7})
    for knob, expect in (("", placed), (",decode_commit_watermark=none", True)):
        sched = Scheduler("1P1M", "planned:safety_factor=1,shed=false" + knob, cost, record_decisions=True)
        for _ in range(5):
            decoding(sched, "M0", slack=5)
        for i in range(held):
            queued(sched, "P0", Request(f"Q{i}", NOW, 1000, 4, ttft_slo=5.0, output_len=4))
        r = Request("N", NOW, 100, 4, ttft_slo=5.0, output_len=4)
        sched.submit(r, NOW)
        assert (r.path is not None) is expect, knob
        if not expect:
            reason = next(d.reason for d in sched.decisions if d.request == "N")
            assert "no decode batch has room for it" in reason and "M0: no room in its decode batch" in reason


@pytest.mark.parametrize("harmless_first", [True, False])
def test_harmless_first_places_where_no_queued_prompt_turns_late(harmless_first):
    # P0 runs a 20k prompt (2.05 s with the safety factor), a 10k one due at 3.1 s queued behind it
    # (ends 3.08 s); M0 runs a 21k inline (ends 2.152 s). A 4k newcomer due at 3.0 s gets its first
    # token at 2.468 s on P0 (0.418 s), where SJF puts it ahead of the 10k prompt and makes that one
    # late (3.50 s), or at 2.689 s on M0 in 512-token chunks once the inline ends (the inlined request
    # then decodes: a 4k chunk would spend its TPOT), harming no one. Earliest first token alone picks
    # P0; harmless_first picks M0. Where no worker can take the newcomer without harm, it still pushes
    # the queued prompt late (test_planned_places_a_short_prompt_ahead_of_a_long_one_it_makes_late).
    sched = Scheduler("1P1M", "planned:chunk_buckets=512/32768,jump_tokens=none,shed=false,handoff_guard=false,"
                      f"arrival_guard=false,harmless_first={harmless_first}", COST, record_decisions=True)
    for r, w in ((Request(0, 0.0, 20000, 4, ttft_slo=100.0, output_len=4), "P0"),
                 (Request(1, 0.0, 21000, 4, ttft_slo=100.0, output_len=4), "M0")):
        sched.submit(r, 0.0)
        sched.next_step(w, 0.0)
        assert r.prefill_worker == w
    queued_10k = Request(2, 0.0, 10000, 4, ttft_slo=3.1, output_len=4)
    sched.submit(queued_10k, 0.0)
    assert queued_10k.prefill_worker == "P0" and "first token 3.080" in sched.decisions[-1].reason
    newcomer = Request(3, 0.0, 4000, 4, ttft_slo=3.0, output_len=4)
    sched.submit(newcomer, 0.0)
    expected = ("M0", "plan ends 2.689") if harmless_first else ("P0", "first token 2.468")
    assert newcomer.prefill_worker == expected[0] and expected[1] in sched.decisions[-1].reason
