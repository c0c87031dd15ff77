"""Workloads from the packaged trace copies, custom JSONL files, and the arrival processes."""

import json

import numpy as np
import pytest

from tropical_jax.sim.workloads import DATA, WORKLOADS, arrival_times, load_trace, make_requests

# Full-trace sizes and means (input, output) of the public traces (tropical_jax/data/README.md); HumanEval's
# are its character means / 3, the tokens-per-character estimate the package uses (no Llama tokenizer).
TRACE_STATS = {
    "mooncake-conversation": (12031, 12035.1, 342.6), "mooncake-synthetic": (3993, 15325.5, 149.1),
    "azure-code": (8819, 2047.8, 27.9), "azure-conv": (19366, 1154.7, 211.1),
    "arxiv-summarization": (28257, 2588.1, 291.4), "humaneval": (164, 450.6 / 3, 180.9 / 3),
}
TIMED = {"mooncake-conversation": 3.401, "mooncake-synthetic": 3.907, "azure-code": 2.567, "azure-conv": 5.53}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workloads_load_from_the_package_with_the_trace_statistics(name):
    times, ins, outs = load_trace(name)
    n, mean_in, mean_out = TRACE_STATS[name]
    assert len(ins) == len(outs) == n and ins.min() >= 1 and outs.min() >= 1
    assert ins.mean() == pytest.approx(mean_in, abs=0.2) and outs.mean() == pytest.approx(mean_out, abs=0.2)
    if name in TIMED:
        assert np.all(np.diff(times) >= 0) and n / (times[-1] - times[0]) == pytest.approx(TIMED[name], rel=0.01)
    else:
        assert times is None


def test_packaged_data_stays_small_and_licensed():
    assert sum(f.stat().st_size for f in DATA.iterdir()) < 2_000_000
    assert {"README.md", "Mooncake-LICENSE-APACHE", "AzurePublicDataset-LICENSE-CC-BY-4.0", "vidur-LICENSE-MIT",
            "human-eval-LICENSE-MIT"} <= {f.name for f in DATA.iterdir()}


def test_cap_and_same_seed_same_workload():
    a = make_requests("mooncake-conversation", 500, 2.0, seed=3, max_input_len=4096)
    b = make_requests("mooncake-conversation", 500, 2.0, seed=3, max_input_len=4096)
    c = make_requests("mooncake-conversation", 500, 2.0, seed=4, max_input_len=4096)
    key = lambda rs: [(r.arrival, r.prompt_len, r.output_len) for r in rs]  # noqa: E731
    assert key(a) == key(b) and key(a) != key(c)
    assert max(r.prompt_len for r in a) == 4096 and sum(r.prompt_len == 4096 for r in a) > 100  # 45% are > 8k
    assert all(r.max_tokens == r.output_len >= 1 and r.ttft_slo is None and r.tpot_slo == 0.1 for r in a)


def test_poisson_and_gamma_arrivals_have_the_rate_and_cv():
    rng = np.random.default_rng(0)
    for cv in (0.5, 2.0, 4.0):
        gaps = np.diff(arrival_times(40000, 4.0, "gamma", rng, cv=cv))
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1) and 1 / gaps.mean() == pytest.approx(4.0, rel=0.05)
    poisson = np.diff(arrival_times(40000, 4.0, "poisson", rng))
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.05)
    assert 1 / poisson.mean() == pytest.approx(4.0, rel=0.03)
    with pytest.raises(ValueError, match="rate must be positive"):
        arrival_times(10, 0.0, "poisson", rng)
    with pytest.raises(ValueError, match="unknown arrival"):
        make_requests("azure-code", 10, 1.0, arrival="uniform")


def test_trace_replay_keeps_order_and_shape_and_scales_to_the_rate():
    times, ins, _ = load_trace("azure-code")
    replay = make_requests("azure-code", 300, 5.0, arrival="trace")
    assert [r.prompt_len for r in replay] == list(ins[:300])  # seed 0: the trace's first 300, in order
    at = np.array([r.arrival for r in replay])
    assert at[0] == 0 and at[-1] == pytest.approx(299 / 5.0)  # mean rate 5 req/s
    np.testing.assert_allclose(at, (times[:300] - times[0]) * at[-1] / (times[299] - times[0]))  # same shape
    # Another seed replays another contiguous stretch of the trace, in order.
    other = [r.prompt_len for r in make_requests("azure-code", 300, 5.0, arrival="trace", seed=1)]
    starts = [s for s in np.flatnonzero(ins == other[0]) if list(np.take(ins, range(s, s + 300), mode="wrap")) == other]
    assert starts and starts[0] > 0
    with pytest.raises(ValueError, match="no timestamps"):
        make_requests("arxiv-summarization", 10, 1.0, arrival="trace")


def test_trace_replay_wraps_a_short_trace(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"timestamp": 1000 * t, "input_length": 10 + t, "output_length": 2}) + "\n"
                            for t in range(5)))
    reqs = make_requests(str(path), 12, 2.0, arrival="trace")
    assert [r.prompt_len for r in reqs] == [10, 11, 12, 13, 14] * 2 + [10, 11]
    assert np.all(np.diff([r.arrival for r in reqs]) > 0) and reqs[-1].arrival == pytest.approx(11 / 2.0)


def test_custom_jsonl_workloads(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text('{"input_length": 100, "output_length": 5}\n\n{"input_length": 40000, "output_length": 0}\n')
    times, ins, outs = load_trace(str(path))
    assert times is None and list(ins) == [100, 40000] and list(outs) == [5, 0]
    reqs = make_requests(str(path), 50, 1.0, max_input_len=32768, seed=1)
    assert {r.prompt_len for r in reqs} == {100, 32768} and min(r.output_len for r in reqs) == 1  # >= 1 token
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_length": 100}\n')
    with pytest.raises(ValueError, match="output_length"):
        load_trace(str(bad))
    with pytest.raises(ValueError, match="unknown workload 'nope'"):
        load_trace("nope")
