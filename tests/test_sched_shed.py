"""Shedding, one rule for every policy: with shed on, a request whose prefill has not started is
rejected (a miss) once, started now alone where it waits, it could no longer meet its TTFT; and the
named baselines (sched/baselines.py), DistServe's whole-prompt FCFS prefill among them."""

import json

import pytest

from tropical_jax.sched.baselines import BASELINES, resolve
from tropical_jax.sched.config import PolicyConfig
from tropical_jax.sched.cost_model import CostModel
from tropical_jax.sched.request import Request
from tropical_jax.sim.cli import main
from tropical_jax.sim.simulator import simulate

# Round numbers (ms): a prompt takes 1 ms per token whatever its chunks (no fixed or quadratic cost);
# a decode step 10 ms; transfers free.
COST = CostModel.from_json({"units": "ms", "prefill": {"c2": 0.0, "c1": 1.0, "c0": 0.0},
                            "decode": {"d0": 10.0, "d1": 0.0, "d2": 0.0}, "kv_bytes_per_token": 1,
                            "transfer": {"bandwidth_GBps": 1e6, "latency_ms": 0.0}, "kv_capacity_tokens": 10**7})


def two_prompts(second_slo: float):
    """A 1000-token prompt at t=0 (SLO 5 s), and a second 1000-token one just after with its own TTFT SLO."""
    return [Request(0, 0.0, 1000, 1, ttft_slo=5.0, output_len=1),
            Request(1, 0.001, 1000, 1, ttft_slo=second_slo, output_len=1)]


@pytest.mark.parametrize("policy,cluster", [("colocated:queue_order=fcfs", "1C"), ("distserve", "1P1D"),
                                            ("chunked:queue_order=fcfs,token_budget=4096", "1C")])
def test_a_queued_prompt_is_shed_once_hopeless_and_served_without_shed(policy, cluster):
    # The first prompt runs 0-1 s; the second waits in the worker's queue and needs 1 s alone, so
    # with a 1.5 s SLO (deadline 1.501) it is hopeless from 0.501 s: shed at the first event after
    # that (the first prompt's step ending at 1 s). Without shed it is served at 2.001 s, a miss.
    sep = "," if ":" in policy else ":"
    shed = simulate(two_prompts(1.5), cluster, policy + sep + "shed=true", COST, record_decisions=True)
    kept = simulate(two_prompts(1.5), cluster, policy + sep + "shed=false", COST)
    assert shed.requests[1].rejected and shed.counters["rejected"] == 1
    (rec,) = [d for d in shed.decisions if d.action == "rejected"]
    assert rec.time == pytest.approx(1.0) and rec.reason.startswith("shed: prefill alone 1.000 s")
    assert shed.requests[0].ttft == pytest.approx(1.0) and shed.requests[0].attained
    assert not kept.requests[1].rejected and kept.requests[1].ttft == pytest.approx(2.0 - 0.001 + 0.0)
    assert not kept.requests[1].attained and kept.counters.get("rejected", 0) == 0


def test_a_prompt_that_can_still_make_it_or_has_started_is_never_shed():
    # SLO 2.1 s: at 1 s it needs 1 s more, deadline 2.101 -> kept, and met.
    ok = simulate(two_prompts(2.1), "1C", "colocated:queue_order=fcfs,shed=true", COST)
    assert not ok.requests[1].rejected and ok.requests[1].attained
    # Chunked steps of 256 tokens beside a decode take 266 ms: a 1000-token prompt with a 1.02 s SLO
    # fits alone (1 s) when it arrives and starts at once, then falls behind (its 4 steps take 1.034 s).
    # Once started it is never shed: served, a miss.
    reqs = [Request(0, 0.0, 10, 200, ttft_slo=5.0, output_len=200), Request(1, 0.02, 1000, 1, ttft_slo=1.02, output_len=1)]
    res = simulate(reqs, "1C", "chunked:token_budget=256,shed=true", COST)
    late = res.requests[1]
    assert not late.rejected and late.ttft > late.ttft_slo and res.counters.get("rejected", 0) == 0


def test_distserve_runs_whole_prompts_first_come_first_served():
    # A 8000-token prompt at 0 and a 100-token one at 0.1 s. DistServe as published: the short one
    # waits for the whole long prefill (8 s), then takes 0.1 s. The preemptive SJF variant (chunks of
    # 4096) runs it at the long prompt's first chunk boundary (4.096 s).
    reqs = [Request(0, 0.0, 8000, 1, ttft_slo=100.0, output_len=1), Request(1, 0.1, 100, 1, ttft_slo=100.0, output_len=1)]
    whole = simulate(reqs, "1P1D", "distserve", COST)
    srpt = simulate(reqs, "1P1D", "distserve-srpt", COST)
    assert whole.requests[1].first_token_time == pytest.approx(8.1)
    assert whole.requests[0].first_token_time == pytest.approx(8.0)
    assert srpt.requests[1].first_token_time == pytest.approx(4.196)
    assert srpt.requests[0].first_token_time == pytest.approx(8.1)
    assert whole.steps < srpt.steps  # one step per prompt against two chunks + one


def test_baseline_names_resolve_to_policies_with_their_knobs():
    assert resolve("distserve") == "disaggregated:queue_order=fcfs,chunk=whole"
    assert PolicyConfig.parse("distserve:shed=true").shed is True
    assert PolicyConfig.parse("vllm").queue_order == "fcfs" and PolicyConfig.parse("vllm").policy == "colocated"
    assert {PolicyConfig.parse(b).policy for b in BASELINES} == {"colocated", "chunked", "disaggregated"}
    with pytest.raises(ValueError, match="chunk must be"):
        PolicyConfig.parse("disaggregated:chunk=half")


def run_cli(capsys, *args):
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_overloaded_colocated_sheds_with_shed_only(capsys):
    cmd = ["run", "--workload", "mooncake-conversation", "--profile", "a100-internlm2.5-20b-tp2", "--cluster", "2C",
           "--policy", "colocated", "--rate", "1.2", "--max-input-len", "32768"]
    shed, kept = run_cli(capsys, *cmd, "--shed"), run_cli(capsys, *cmd, "--no-shed")
    assert shed["rejected"] > 0 and kept["rejected"] == 0
    assert shed["attainment"] > kept["attainment"] and shed["ttft_p99"] < kept["ttft_p99"]


def test_goodput_curves_differ_with_and_without_shed(capsys):
    cmd = ["goodput", "--workload", "mooncake-conversation", "--profile", "a100-internlm2.5-20b-tp2", "--policies",
           "vllm,distserve", "--num-requests", "100", "--max-input-len", "32768", "--rate-lo", "0.5", "--rate-hi", "1.0",
           "--early-stop"]
    shed, kept = run_cli(capsys, *cmd, "--shed"), run_cli(capsys, *cmd, "--no-shed")
    for name in ("vllm", "distserve"):
        assert shed["policies"][name]["cluster"] == kept["policies"][name]["cluster"]
        assert shed["policies"][name]["curve"] != kept["policies"][name]["curve"]
    assert shed["policies"]["distserve"]["cluster"] == "1P1D" and shed["policies"]["vllm"]["cluster"] == "2C"
