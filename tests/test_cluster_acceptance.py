"""Acceptance for the multi-worker engine: hundreds of requests under every policy leave every page free and
compile nothing after warmup; larger layouts and tensor-parallel workers give the single worker's tokens.

The persistent compilation cache (LLM's default) keeps reruns quick; loading an executable from it counts
as a compile (runtime.executor.compile_count), so it cannot hide one."""

import json
import subprocess
import sys

import numpy as np
import pytest

from model_helpers import save_tiny_hf
from tropical_jax import LLM, SamplingParams

# The acceptance runs; tests/test_cluster_engine.py checks the same engine quickly.
pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

ENGINE = dict(max_model_len=64, page_size=4, max_num_seqs=4, max_chunk_tokens=16, chunk_buckets=[8, 16],
              batch_buckets=[1, 4], progress=False)
PROFILE = {"units": "ms", "prefill": {"c2": 0.0, "c1": 0.05, "c0": 2.0}, "decode": {"d0": 5.0, "d1": 0.1, "d2": 0.0},
           "kv_bytes_per_token": 1024, "transfer": {"bandwidth_GBps": 5.0, "latency_ms": 1.0}}

SCRIPT = """
import json, sys
import numpy as np
from tropical_jax import LLM, SamplingParams
from tropical_jax.runtime.executor import compile_count
path, engine, profile = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
rng = np.random.default_rng(0)
out = {}
for cluster, policy in [("1P1M", "tropical"), ("1P1M", "planned"), ("2C", "colocated"), ("2C", "chunked"),
                        ("1P1D", "disaggregated")]:
    llm = LLM(path, cluster=cluster, policy=policy, profile=profile, **engine)
    before = compile_count()
    finished = 0
    for part in range(2):  # two waves of 50: the second finds workers that have served and freed
        lengths = rng.integers(1, 40, 50)
        params = [SamplingParams(max_tokens=int(rng.integers(1, 8)), temperature=float(rng.choice([0, 0.8])),
                                 top_k=int(rng.choice([-1, 5])), seed=i, ignore_eos=True) for i in range(50)]
        prompts = [list(map(int, rng.integers(0, 128, n))) for n in lengths]
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        assert all(len(o.token_ids) == p.max_tokens for o, p in zip(outs, params) if o.token_ids), cluster
        finished += sum(o.finish_reason in ("stop", "length") for o in outs)
    sched = llm.engine.scheduler
    out[f"{cluster} {policy}"] = {"compiles": compile_count() - before,
                                  "pages_used": {n: w.alloc.num_used for n, w in sched.workers.items()},
                                  "finished": finished,
                                  "rejected": sched.counters["rejected"], "live": sched.live}
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_hf(path, "llama", max_position_embeddings=128)
    return str(path)


def test_500_requests_across_policies_free_every_page_and_compile_nothing_after_warmup(tiny):
    # A fresh process, so in-process caches of other engines cannot hide a recompile.
    r = subprocess.run([sys.executable, "-c", SCRIPT, tiny, json.dumps(ENGINE), json.dumps(PROFILE)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert len(res) == 5
    for name, v in res.items():
        assert v["compiles"] == 0, (name, v)
        assert set(v["pages_used"].values()) == {0}, (name, v)
        assert v["live"] == 0 and v["finished"] + v["rejected"] == 100, (name, v)


@pytest.mark.parametrize("cluster", ["2P2M", "P:tp2,M:tp2"])
def test_larger_and_tensor_parallel_layouts_give_the_single_worker_tokens(tiny, cluster):
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(0, 128, n))) for n in (5, 11, 17, 3, 30, 8, 22, 14)]
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ref = [o.token_ids for o in LLM(tiny, **ENGINE).generate(prompt_token_ids=prompts, sampling_params=sp)]
    llm = LLM(tiny, cluster=cluster, policy="tropical", profile=PROFILE, **ENGINE)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=sp)
    assert [o.token_ids for o in outs] == ref
    sched = llm.engine.scheduler
    assert all(w.alloc.num_used == 0 for w in sched.workers.values())
    if cluster == "2P2M":  # both prefill workers and both decode workers served
        used = {o.request.prefill_worker for o in outs} | {o.request.decode_worker for o in outs}
        assert {"P0", "P1", "M0", "M1"} <= used, used
