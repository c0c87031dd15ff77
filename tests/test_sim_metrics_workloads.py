"""Metrics on hand-computed requests, goodput bisection, workloads from packaged traces, the sim CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tropical_jax.sched.metrics import goodput, summarize
from tropical_jax.sched.request import Request
from tropical_jax.sim.workloads import WORKLOADS, arrival_times, load_trace, make_requests


def done(i, arrival, first, last, n_out, prompt=100, ttft_slo=1.0, tpot_slo=0.1, scheduled=None):
    r = Request(i, arrival, prompt, n_out, ttft_slo, tpot_slo, n_out)
    r.first_scheduled = arrival if scheduled is None else scheduled
    r.first_token_time, r.last_token_time, r.n_out, r.finish_time = first, last, n_out, last
    return r


def test_summary_on_hand_computed_requests():
    reqs = [
        done(0, 0.0, 0.5, 1.4, 10),               # ttft 0.5, tpot 0.1 -> met
        done(1, 1.0, 2.5, 2.5, 1, prompt=3000),    # ttft 1.5 > 1.0 -> missed (tpot 0 with one token)
        done(2, 2.0, 2.2, 4.2, 11, prompt=9000),  # tpot 0.2 > 0.1 -> missed
    ]
    rejected = Request(3, 3.0, 20000, 5, 1.0, 0.1, 5)
    rejected.rejected = True
    s = summarize(reqs + [rejected])
    assert s["attainment"] == 0.25 and s["ttft_attainment"] == 0.5 and s["tpot_attainment"] == 0.5
    assert s["rejected"] == 1
    assert s["ttft_p50"] == pytest.approx(0.5) and s["tpot_p50"] == pytest.approx(0.1)
    assert s["ttft_p90"] == pytest.approx(np.percentile([0.5, 1.5, 0.2], 90))
    assert s["misses_by_length"] == {"<2k": {"requests": 1, "missed": 0, "miss_rate": 0.0},
                                     "2-8k": {"requests": 1, "missed": 1, "miss_rate": 1.0},
                                     "8-16k": {"requests": 1, "missed": 1, "miss_rate": 1.0},
                                     ">=16k": {"requests": 1, "missed": 1, "miss_rate": 1.0}}


def test_goodput_bisection_finds_the_crossing_and_keeps_the_curve():
    # Attainment falls linearly from 1 at rate 0 to 0 at rate 10: it crosses 0.9 at rate 1.0.
    rate, curve = goodput(lambda r: max(0.0, 1 - r / 10), lo=0.1, hi=0.5, target=0.9, rel_tol=0.01)
    assert rate == pytest.approx(1.0, rel=0.02) and rate <= 1.0
    assert len(curve) >= 5 and curve == sorted(curve)
    assert goodput(lambda r: 0.5, lo=0.1, hi=1.0)[0] == 0.0


# Means of the full traces, from shared/data/derived/trace_stats.json (12,031 / 3,993 requests).
TRACE_MEANS = {"mooncake-conversation": (12035.1, 342.6), "mooncake-synthetic": (15325.5, 149.1)}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workloads_load_from_the_package(name):
    times, ins, outs = load_trace(name)
    assert len(ins) == len(outs) > 100 and ins.min() >= 1 and outs.min() >= 0
    if name in TRACE_MEANS:
        assert ins.mean() == pytest.approx(TRACE_MEANS[name][0], abs=0.1)
        assert outs.mean() == pytest.approx(TRACE_MEANS[name][1], abs=0.1)
    if times is not None:
        assert np.all(np.diff(times) >= 0)


def test_cap_seed_and_arrival_processes():
    a = make_requests("mooncake-conversation", 500, 2.0, seed=3, max_input_len=4096)
    b = make_requests("mooncake-conversation", 500, 2.0, seed=3, max_input_len=4096)
    assert max(r.prompt_len for r in a) == 4096
    assert [(r.arrival, r.prompt_len, r.output_len) for r in a] == [(r.arrival, r.prompt_len, r.output_len) for r in b]
    rng = np.random.default_rng(0)
    gaps = np.diff(arrival_times(20000, 4.0, "gamma", rng, cv=2.0))
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.1) and 1 / gaps.mean() == pytest.approx(4.0, rel=0.05)
    poisson = np.diff(arrival_times(20000, 4.0, "poisson", rng))
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.05)
    replay = make_requests("azure-code", 300, 5.0, arrival="trace")
    times, ins, _ = load_trace("azure-code")
    assert [r.prompt_len for r in replay] == list(ins[:300])  # trace order kept
    assert replay[-1].arrival == pytest.approx(299 / 5.0)  # rescaled to the requested mean rate
    with pytest.raises(ValueError, match="no timestamps"):
        make_requests("arxiv-summarization", 10, 1.0, arrival="trace")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tropical_jax.sim", *args], capture_output=True, text=True, timeout=300)


def test_cli_run_json_has_every_key_in_range():
    r = run_cli("run", "--workload", "azure-code", "--profile", "a100-llama2-70b-tp4", "--cluster", "1P1M",
                "--policy", "tropical", "--rate", "1.0", "--num-requests", "300", "--max-input-len", "4096", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    keys = ("policy cluster workload profile rate num_requests attainment ttft_attainment tpot_attainment ttft_p50 "
            "ttft_p90 ttft_p99 tpot_p50 tpot_p90 tpot_p99 queue_p90 inline_fraction rejected misses_by_length").split()
    assert set(keys) <= set(out)
    for k in ("attainment", "ttft_attainment", "tpot_attainment", "inline_fraction"):
        assert 0 <= out[k] <= 1
    assert out["ttft_p50"] <= out["ttft_p90"] <= out["ttft_p99"] and out["num_requests"] == 300


@pytest.mark.parametrize("args,message", [
    (["--workload", "nope", "--profile", "a100-llama2-70b-tp4"], "unknown workload 'nope'"),
    (["--workload", "azure-code", "--profile", "missing.json"], "no profile 'missing.json'"),
    (["--workload", "azure-code", "--profile", "a100-llama2-70b-tp4", "--policy", "magic"], "unknown policy"),
    (["--workload", "azure-code", "--profile", "a100-llama2-70b-tp4", "--policy", "tropical", "--cluster", "2C"],
     "policy 'tropical' runs on roles"),
])
def test_cli_bad_input_is_a_clear_error(args, message):
    r = run_cli("run", *args, "--rate", "1", "--num-requests", "20")
    assert r.returncode == 2 and message in r.stderr, r.stderr
