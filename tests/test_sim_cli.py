"""`python -m tropical_jax.sim`: run --json keys and ranges, goodput with per-policy clusters and a plot, errors."""

import json
import subprocess
import sys

import pytest

from tropical_jax.sim.cli import main

RUN_KEYS = ("policy cluster workload profile rate num_requests attainment ttft_attainment tpot_attainment ttft_p50 "
            "ttft_p90 ttft_p99 tpot_p50 tpot_p90 tpot_p99 queue_p90 inline_fraction rejected misses_by_length").split()
SMALL = ["--workload", "azure-code", "--profile", "a100-llama2-70b-tp4", "--max-input-len", "4096"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tropical_jax.sim", *args], capture_output=True, text=True, timeout=300)


def test_run_json_has_every_key_in_range():
    r = run_cli("run", *SMALL, "--cluster", "1P1M", "--policy", "tropical", "--rate", "1.5", "--num-requests", "300",
                "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(RUN_KEYS) <= set(out)
    assert out["policy"] == "tropical" and out["cluster"] == "1P1M" and out["num_requests"] == 300
    for k in ("attainment", "ttft_attainment", "tpot_attainment", "inline_fraction"):
        assert 0 <= out[k] <= 1
    assert out["attainment"] <= min(out["ttft_attainment"], out["tpot_attainment"])
    assert 0 < out["ttft_p50"] <= out["ttft_p90"] <= out["ttft_p99"] < 60  # seconds, not ms
    assert 0 < out["tpot_p50"] <= out["tpot_p90"] <= out["tpot_p99"] < 1
    assert out["rejected"] == 0 and out["queue_p90"] >= 0
    assert sum(c["requests"] for c in out["misses_by_length"].values()) == 300
    assert out["counters"]["prefill"] + out["counters"].get("inline", 0) == 300


def test_run_writes_per_request_and_decision_traces(tmp_path, capsys):
    reqs, decisions = tmp_path / "r.jsonl", tmp_path / "d.jsonl"
    assert main(["run", *SMALL, "--policy", "disaggregated", "--rate", "1", "--num-requests", "50", "--json",
                 "--requests-out", str(reqs), "--decisions-out", str(decisions)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cluster"] == "1P1D"  # the policy's default cluster
    rows = [json.loads(line) for line in reqs.read_text().splitlines()]
    assert len(rows) == 50 and sum(r["attained"] for r in rows) / 50 == out["attainment"]
    assert {r["prefill_worker"] for r in rows} == {"P0"} and {r["decode_worker"] for r in rows} == {"D0"}
    actions = {json.loads(line)["action"] for line in decisions.read_text().splitlines()}
    assert {"prefill", "handoff"} <= actions


def test_goodput_json_with_a_cluster_per_policy_and_a_plot(tmp_path, capsys):
    plot = tmp_path / "curves.png"
    assert main(["goodput", *SMALL, "--num-requests", "80", "--policies", "tropical,chunked:token_budget=512",
                 "--cluster", "tropical=1P1M,chunked=2C", "--rate-lo", "0.5", "--rate-hi", "1", "--json",
                 "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["policies"]) == {"tropical", "chunked:token_budget=512"} and out["target"] == 0.9
    for name, cluster in (("tropical", "1P1M"), ("chunked:token_budget=512", "2C")):
        p = out["policies"][name]
        assert p["cluster"] == cluster and p["goodput"] > 0 and 0 < p["fraction_of_bound"] < 2
        rates = [r for r, _ in p["curve"]]
        assert rates == sorted(rates) and all(0 <= a <= 1 for _, a in p["curve"])
        at = dict(p["curve"])
        assert at[p["goodput"]] >= 0.9 and any(a < 0.9 for r, a in p["curve"] if r > p["goodput"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_goodput_early_stop_finds_the_same_goodput_and_marks_lower_bounds(capsys):
    args = ["goodput", *SMALL, "--num-requests", "80", "--seeds", "3", "--policies", "colocated", "--rate-lo", "0.5",
            "--rate-hi", "1", "--json"]
    assert main(args) == 0
    exact = json.loads(capsys.readouterr().out)["policies"]["colocated"]
    assert main(args + ["--early-stop"]) == 0
    fast = json.loads(capsys.readouterr().out)["policies"]["colocated"]
    assert fast["goodput"] == exact["goodput"] and "curve_lower_bound_rates" not in exact
    low, true = fast["curve_lower_bound_rates"], dict(exact["curve"])
    assert low and all(a < 0.9 and a <= true[r] for r, a in fast["curve"] if r in low)


def test_goodput_with_worker_processes_gives_the_same_search(capsys):
    args = ["goodput", *SMALL, "--num-requests", "80", "--seeds", "2", "--policies", "colocated", "--rate-lo", "0.5",
            "--rate-hi", "1", "--early-stop", "--json"]
    outs = []
    for jobs in ("1", "2"):
        assert main(args + ["--jobs", jobs]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert outs[0] == outs[1] and len(outs[0]["policies"]["colocated"]["curve"]) >= 4


@pytest.mark.parametrize("args,message", [
    (["--workload", "nope", "--profile", "a100-llama2-70b-tp4"], "unknown workload 'nope'"),
    (["--workload", "azure-code", "--profile", "missing.json"], "no profile 'missing.json'"),
    (["--workload", "azure-code", "--profile", "a100-llama2-70b-tp4", "--policy", "magic"], "unknown policy"),
    (["--workload", "azure-code", "--profile", "a100-llama2-70b-tp4", "--policy", "tropical", "--cluster", "2C"],
     "policy 'tropical' runs on roles"),
    (["--workload", "arxiv-summarization", "--profile", "a100-llama2-70b-tp4", "--arrival", "trace"], "no timestamps"),
])
def test_bad_input_is_a_clear_error(args, message, capsys):
    assert main(["run", *args, "--rate", "1", "--num-requests", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_bad_profile_file_and_unknown_arrival(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text('{"units": "s"}')
    r = run_cli("run", "--workload", "azure-code", "--profile", str(bad), "--rate", "1", "--num-requests", "5")
    assert r.returncode == 2 and "units" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("run", "--workload", "azure-code", "--profile", "a100-llama2-70b-tp4", "--rate", "1",
                "--arrival", "uniform")
    assert r.returncode == 2 and "invalid choice: 'uniform'" in r.stderr
