"""The window bound (docs/policies.md, The bound): hand-computed traces, and no policy the simulator runs
serving more than it allows."""

import json

import pytest

from tropical_jax.sched.config import PolicyConfig
from tropical_jax.sched.cost_model import CostModel
from tropical_jax.sched.metrics import summarize
from tropical_jax.sched.request import Request
from tropical_jax.sched.window_bound import StepFloor, served_fraction
from tropical_jax.sim.cli import load_profile, main
from tropical_jax.sim.simulator import simulate
from tropical_jax.sim.workloads import make_requests


def profile_json(d0=20.0):
    return {"units": "ms", "prefill": {"c2": 0.0, "c1": 1.0, "c0": 0.0}, "decode": {"d0": d0, "d1": 0.0, "d2": 0.0},
            "kv_bytes_per_token": 1, "transfer": {"bandwidth_GBps": 1000, "latency_ms": 0.0}}


def cost(d0=20.0):
    """Prefill 1 ms per token, no fixed cost: a prompt of L tokens takes L ms and must start by 2L ms
    at TTFT scale 2; decode steps cost d0 ms whatever their batch."""
    return CostModel.from_json(profile_json(d0))


def burst(workers, class_floor=None):
    # At t = 0: a 4,000-token prompt (4 s of prefill, deadline 8 s) and three of 500 tokens (0.5 s
    # each, deadline 1 s), one token each. The work fits the horizon (5.5 s of 8 s on one worker), so
    # a bound on work alone serves all four; in [0, 1] one worker fits only two of the short ones.
    reqs = [Request(0, 0.0, 4000, 1, output_len=1)] + [Request(i, 0.0, 500, 1, output_len=1) for i in (1, 2, 3)]
    return served_fraction(reqs, cost(), workers, ttft_scale=2.0, class_floor=class_floor)


def test_burst_of_deadlines_is_tighter_than_the_work():
    assert burst(1) == pytest.approx(3 / 4)
    assert burst(2) == pytest.approx(1.0)  # [0, 1] on two workers holds the three short prompts
    # Serving at least 60% of the prompts under 2k (1.8 of 3) is possible, 70% (2.1) is not.
    assert burst(1, class_floor=0.6) == pytest.approx(3 / 4)
    assert burst(1, class_floor=0.7) == 0.0


def test_decode_steps_fixed_cost_must_fit_the_requests_time():
    # 100 tokens of prompt (0.1 s, deadline 0.5 s) and 11 output tokens: 10 decode steps of 200 ms
    # each (2 s of fixed cost) by the last token's deadline 0.5 + 10 x 0.1 = 1.5 s: 2.1 s of work in
    # 1.5 s on one worker, so at most 1.5 / 2.1 = 5/7 of it.
    r = Request(0, 0.0, 100, 11, output_len=11)
    assert served_fraction([r], cost(d0=200.0), 1, ttft_scale=5.0, tpot_slo=0.1, block_s=0.5) == pytest.approx(5 / 7)
    assert served_fraction([r], cost(d0=20.0), 1, ttft_scale=5.0, tpot_slo=0.1, block_s=0.5) == pytest.approx(1.0)


def test_step_floor_is_the_cheapest_form_of_each_cost():
    f = StepFloor.of(load_profile("a100-llama2-70b-tp4"))
    c = load_profile("a100-llama2-70b-tp4")
    # Derived chunks: splitting a prompt costs the same quadratic as running it whole.
    assert f.prefill2 == pytest.approx(c.prefill["c2"] * 1e-3) and f.prefill1 == pytest.approx(c.prefill["c1"] * 1e-3)
    assert f.fixed == pytest.approx(c.decode["d0"] * 1e-3)
    assert f.prefill2 * 4096**2 + f.prefill1 * 4096 <= c.t_prefill(4096)


def test_step_floor_takes_a_fitted_mixed_step_when_cheaper_and_refuses_negative_terms():
    mixed = {"m0": 5.0, "mc2": 0.5, "mcx": 0.4, "mc1": 2.0, "mb": 0.0, "mt": 0.0}
    c = CostModel.from_json({**profile_json(), "mixed": mixed})
    f = StepFloor.of(c)
    # prefill c2 = 0, c1 = 1 (derived chunk k2 = kx = 0, k1 = 1); the mixed step's quadratic is
    # min(mc2, mcx/2) = 0.2 but its chunk form is cheaper (0); decode d0 = 20 ms against m0 = 5 ms.
    assert (f.prefill2, f.prefill1, f.fixed) == pytest.approx((0.0, 1e-3, 5e-3))
    # A step's time is at least the floors of what it holds, in each form the simulator runs.
    for C, ctx, B, T in [(64, 0, 3, 900), (512, 256, 1, 10), (1, 0, 8, 8)]:
        assert c.t_mixed(C, ctx, B, T) >= f.prefill2 * C * (C + 2 * ctx) + f.prefill1 * C + f.fixed \
            + f.token1 * B + f.token_ctx * T
    with pytest.raises(ValueError, match=">= 0"):
        StepFloor.of(CostModel.from_json({**profile_json(), "mixed": {**mixed, "mcx": -0.1}}))


@pytest.mark.parametrize("policy, cluster", [("planned", "1P1M"), ("colocated", "2C"), ("disaggregated", "1P1D")])
def test_no_policy_serves_more_than_the_bound(policy, cluster):
    # Above the goodput of every policy: the program's attainment is below 1, and no simulated
    # schedule of the same 200 requests beats it.
    profile = load_profile("a100-internlm2.5-20b-tp2")
    for rate in (2.5, 4.0):
        trace = lambda: make_requests("mooncake-conversation", 200, rate, seed=0, max_input_len=32768)  # noqa: E731
        lp = served_fraction(trace(), profile, 2)
        res = simulate(trace(), cluster, PolicyConfig.parse(policy, shed=True), profile, seed=0)
        assert summarize(res.requests)["attainment"] <= lp < 1.0


def test_cli_window_bound(capsys):
    args = ["bound", "--workload", "arxiv-summarization", "--profile", "a100-llama2-70b-tp4", "--max-input-len",
            "4096", "--num-requests", "100", "--window", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)["window"]
    assert out["met_rps"] < out["bound_rps"] <= out["met_rps"] * 1.011
    assert [v for r, v in out["curve"] if r == out["met_rps"]][0] >= 0.9
    assert [v for r, v in out["curve"] if r == out["bound_rps"]][0] < 0.9
    assert main(args + ["--class-floor", "0.8"]) == 0
    floor = json.loads(capsys.readouterr().out)["window"]
    assert floor["class_floor"] == 0.8 and floor["bound_rps"] <= out["bound_rps"]


@pytest.mark.parametrize("extra, message", [([], "add --window"), (["--window"], "in [0, 1]")])
def test_cli_class_floor_needs_the_window_and_a_fraction(capsys, extra, message):
    args = ["bound", "--workload", "arxiv-summarization", "--profile", "a100-llama2-70b-tp4", "--num-requests", "20",
            "--class-floor", "1.5", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("policy, cluster", [("planned", "1P1M"), ("chunked", "2C"), ("disaggregated", "1P1D")])
def test_every_simulated_step_and_served_request_fits_the_programs_constraints(policy, cluster):
    # The program's premises, checked on a schedule the simulator makes: every step lasts at least the
    # floors of what it holds, and a served request's chunks add up to its prompt's quadratic inside its
    # TTFT time while its n_out − 1 decode steps lie inside its last token's time. Then the schedule,
    # spread over time, is a solution of the program with x = served, and the program cannot be lower.
    profile = load_profile("a100-internlm2.5-20b-tp2")
    floor = StepFloor.of(profile)
    reqs = make_requests("mooncake-conversation", 120, 1.2, seed=0, max_input_len=32768)
    steps = []

    def observe(event, now, *payload):
        if event == "step_start":
            worker, plan = payload
            steps.append([now, worker, [(c.request, c.start, c.length) for c in plan.chunks], list(plan.decodes),
                          plan.decode_tokens])
        elif event == "step_end":  # the step in flight on that worker: its start becomes (start, end)
            step = next(s for s in steps if s[1] == payload[0])
            step[:2] = [(step[0], now), None]

    res = simulate(reqs, cluster, PolicyConfig.parse(policy, shed=True), profile, seed=0, observer=observe)
    prefill_work, decode_steps = {}, {}
    assert all(worker is None for _, worker, *_ in steps)  # every step ended
    for (start, end), _, chunks, decodes, ctx in steps:
        work = sum(floor.prefill2 * n * (n + 2 * s) + floor.prefill1 * n for _, s, n in chunks)
        if decodes:
            work += floor.fixed + floor.token1 * len(decodes) + floor.token_ctx * ctx
        assert work <= (end - start) * (1 + 1e-9)
        for r, s, n in chunks:
            prefill_work.setdefault(r.id, []).append((start, end, n * (n + 2 * s)))
        for r in decodes:
            decode_steps.setdefault(r.id, []).append((start, end))
    served = [r for r in res.requests if r.attained]
    assert len(served) > 60, len(served)
    for r in served:
        deadline = r.arrival + r.ttft_slo
        first = [(s, e, w) for s, e, w in prefill_work[r.id] if e <= r.first_token_time]  # not a recompute after
        assert sum(w for *_, w in first) >= r.prompt_len**2
        assert all(r.arrival <= s and e <= deadline + 1e-9 for s, e, _ in first)
        mine = decode_steps.get(r.id, [])
        assert len(mine) >= r.output_len - 1
        assert all(r.arrival <= s and e <= deadline + (r.output_len - 1) * r.tpot_slo + 1e-9 for s, e in mine)
