"""The real multi-worker engine: the shared scheduler driving worker threads on their own meshes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from model_helpers import save_tiny_hf
from tropical_jax import LLM, SamplingParams
from tropical_jax.sched.cost_model import CostModel

ENGINE = dict(max_model_len=64, page_size=4, max_num_seqs=4, max_chunk_tokens=16, compilation_cache_dir=None,
              progress=False)
SP = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def profile(decode_ms=5.0):
    """A hand-made cost model (ms): cheap prefill; decode steps of `decode_ms`."""
    return {"units": "ms", "prefill": {"c2": 0.0, "c1": 0.05, "c0": 2.0},
            "decode": {"d0": decode_ms, "d1": 0.1, "d2": 0.0}, "kv_bytes_per_token": 1024,
            "transfer": {"bandwidth_GBps": 5.0, "latency_ms": 1.0}}


def make_setup(tmp_path_factory, engine):
    """A tiny HF llama on disk, six prompts, and the single in-process worker's greedy tokens for them (planned
    with the hand-made profile: the tokens do not depend on it, and the worker need not time its own steps)."""
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_hf(path, "llama", max_position_embeddings=128)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(0, 128, n))) for n in (5, 11, 17, 3, 30, 8)]
    single = LLM(str(path), profile=profile(), **engine)
    ref = [o.token_ids for o in single.generate(prompt_token_ids=prompts, sampling_params=SP)]
    return str(path), prompts, ref


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory, ENGINE)


# Every prompt must finish here: planned runs without shedding (on a slow or busy host a queued prompt would
# turn hopeless against the profile's step times and be rejected).
@pytest.mark.parametrize("cluster,policy", [("1P1M", "tropical"), *[
    pytest.param(*case, marks=pytest.mark.slow) for case in [
        ("1P1D", "disaggregated"), ("2C", "colocated"), ("1P1M", "planned:max_prefill_seqs=4,shed=false"),
        ("2C", "chunked:max_prefill_seqs=4")]]])
def test_clusters_give_single_worker_tokens_and_free_every_page(setup, cluster, policy):
    path, prompts, ref = setup
    llm = LLM(path, cluster=cluster, policy=policy, profile=profile(), **ENGINE)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SP)
    assert [o.token_ids for o in outs] == ref
    assert llm.engine.pages_used() == 0
    sched = llm.engine.scheduler
    if "max_prefill_seqs" in policy:  # prompts arrive together: some steps pack several (counted per step)
        assert sched.counters["packed_steps"] >= 1
    c = sched.counters
    if cluster != "2C":
        assert c["transfers"] >= 1  # prefills ran on P and moved their KV


@pytest.mark.slow
def test_failed_handoff_recomputes_on_the_decode_worker(setup):
    path, prompts, ref = setup
    llm = LLM(path, cluster="1P1M", policy="tropical", profile=profile(), **ENGINE)
    llm.engine.handoffs.fail = True
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=SP)
    assert [o.token_ids for o in outs] == ref
    c = llm.engine.scheduler.counters
    assert c["transfer_failures"] >= 1 and c["recomputes"] == c["transfer_failures"]
    assert llm.engine.pages_used() == 0


@pytest.mark.slow
def test_inlines_happen_only_when_slack_allows(setup):
    path, prompts, ref = setup
    # Decode steps of 5 ms against a 100 ms TPOT: plenty of slack, so prefer=multiplex inlines.
    roomy = LLM(path, cluster="1P1M", policy="tropical:prefer=multiplex", profile=profile(5.0), **ENGINE)
    outs = roomy.generate(prompt_token_ids=prompts, sampling_params=SP)
    assert [o.token_ids for o in outs] == ref and roomy.engine.scheduler.counters["inline"] >= 1
    # Decode steps of 95 ms: over the 0.85 x TPOT watermark, so nothing may be inlined.
    tight = LLM(path, cluster="1P1M", policy="tropical:prefer=multiplex", profile=profile(95.0), **ENGINE)
    outs = tight.generate(prompt_token_ids=prompts, sampling_params=SP)
    assert [o.token_ids for o in outs] == ref
    assert tight.engine.scheduler.counters["inline"] == 0 and tight.engine.scheduler.counters["prefill"] == 6


@pytest.mark.slow
@pytest.mark.subprocess
def test_profile_cli_writes_a_profile_the_simulator_accepts(tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, "-m", "tropical_jax.profile", "--out", str(out), "--max-model-len", "64",
                        "--page-size", "8", "--max-num-seqs", "4", "--max-chunk-tokens", "32"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    prof = json.loads(out.read_text())
    cost = CostModel.from_json(prof)
    assert cost.t_prefill(64) > cost.t_prefill(16) > 0 and cost.t_decode(4, 256) > 0
    sim = subprocess.run([sys.executable, "-m", "tropical_jax.sim", "run", "--workload", "humaneval", "--profile",
                          str(out), "--cluster", "2C", "--policy", "colocated", "--rate", "5", "--num-requests", "50",
                          "--max-input-len", "48", "--json"], capture_output=True, text=True, timeout=300)
    assert sim.returncode == 0, sim.stderr[-2000:]
    assert json.loads(sim.stdout)["num_requests"] == 50


def test_page_copies_do_not_wait_on_the_host_for_a_step_in_flight():
    """A worker's lock covers launching a step, not waiting for its tokens: a KV handoff read from or
    written to a worker whose step is still running is queued behind it (JAX orders them on the
    device) instead of blocking the handoff thread until the step ends. The step here is a fake whose
    tokens arrive only when released; the copies must complete meanwhile, with the right pages."""
    import threading

    import jax.numpy as jnp

    from tropical_jax.cluster.workers import InProcessWorker, PageCopier

    release = threading.Event()

    class Pending:
        def __array__(self, dtype=None, copy=None):
            assert release.wait(timeout=30)
            return np.array([7], np.int32)

    class FakeExecutor:
        kv_cache = [(jnp.arange(4 * 3.0).reshape(4, 3), jnp.zeros((4, 3)))]

        def launch(self, inputs):
            return Pending()

    worker = object.__new__(InProcessWorker)
    worker.executor, worker.copier, worker.lock = FakeExecutor(), PageCopier(2, 4), threading.Lock()
    out = {}
    stepping = threading.Thread(target=lambda: out.update(tokens=worker.step(None)))
    stepping.start()
    copying = threading.Thread(target=lambda: (out.update(read=worker.read_pages([2])),
                                               worker.write_pages([1], out["read"])))
    copying.start()
    copying.join(timeout=10)
    assert not copying.is_alive(), "the page copy waited for the step in flight"
    assert stepping.is_alive() and "tokens" not in out
    k, v = worker.executor.kv_cache[0]
    assert np.array_equal(np.asarray(k[1]), [6.0, 7.0, 8.0]) and np.array_equal(np.asarray(k[2]), [6.0, 7.0, 8.0])
    release.set()
    stepping.join(timeout=10)
    assert out["tokens"].tolist() == [7]
