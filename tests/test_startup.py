"""Startup within the process's memory-mapping limit: each worker compiles the steps of its role, the check
refuses an over-budget warmup in seconds (before compiling anything), and LLM.close() gives mappings back."""

import os
import subprocess
import sys
import time

import pytest

from model_helpers import save_tiny_hf
from tropical_jax import LLM, SamplingParams
from tropical_jax.cluster.workers import cluster_executables
from tropical_jax.config import ClusterConfig, EngineConfig
from tropical_jax.runtime import map_budget
from tropical_jax.runtime.executor import compile_count
from tropical_jax.runtime.map_budget import MappingBudgetError, mappings_in_use
from tropical_jax.sched.config import PolicyConfig, parse_cluster

ENGINE = dict(max_model_len=64, page_size=4, max_num_seqs=4, max_chunk_tokens=16, chunk_buckets=[8, 16],
              batch_buckets=[1, 4], context_buckets=[64], progress=False)
PROFILE = {"units": "ms", "prefill": {"c2": 0.0, "c1": 0.05, "c0": 2.0}, "decode": {"d0": 5.0, "d1": 0.1, "d2": 0.0},
           "kv_bytes_per_token": 1024, "transfer": {"bandwidth_GBps": 5.0, "latency_ms": 1.0}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_hf(path, "llama", max_position_embeddings=128)
    return str(path)


def limit_leaving(monkeypatch, executables: float):
    """Pretend vm.max_map_count leaves room for about this many more executables in this process."""
    room = map_budget.HEADROOM + int(executables * map_budget.per_executable(2))
    monkeypatch.setenv("TROPICAL_JAX_MAX_MAP_COUNT", str(mappings_in_use() + room))


def test_each_role_compiles_only_the_steps_it_runs():
    fine = EngineConfig(bucket_set="fine")  # the accelerators' default: 5 chunk x 6 batch x 3 context
    assert cluster_executables(parse_cluster("1P1M"), fine, PolicyConfig.parse("planned")) == {"P0": 17, "M0": 125}
    # C workers never hand KV over, so they compile no page copies (the gather and the scatter).
    assert cluster_executables(parse_cluster("2C"), fine, PolicyConfig.parse("colocated")) == {"C0": 33, "C1": 33}
    assert cluster_executables(parse_cluster("2C"), fine, PolicyConfig.parse("chunked")) == {"C0": 123, "C1": 123}
    # The single worker (1C under chunked) compiles every kind: 5 + 6 + 30 shapes x 3 contexts.
    assert cluster_executables(parse_cluster("1C"), fine, ClusterConfig().policy_config(8)) == {"C0": 123}
    assert cluster_executables(parse_cluster("1P1D"), fine, PolicyConfig.parse("disaggregated")) == {"P0": 17,
                                                                                                    "D0": 125}
    # The CPU's default, 2 chunk x 3 batch x 1 context: (2 + 3 + 6) x 1 for all kinds, 2 prefills for P.
    coarse = EngineConfig().for_platform("cpu")
    assert cluster_executables(parse_cluster("1C"), coarse, ClusterConfig().policy_config(8)) == {"C0": 11}
    assert cluster_executables(parse_cluster("1P1M"), coarse, PolicyConfig.parse("planned")) == {"P0": 4, "M0": 13}


def test_the_default_buckets_are_coarse_on_cpu_fine_elsewhere_and_explicit_ones_win():
    cpu = EngineConfig().for_platform("cpu")
    assert cpu.bucket_set == "coarse" and (cpu.chunk_sizes, cpu.batch_sizes) == ((64, 256), (1, 8, 32))
    assert cpu.context_pages == (cpu.pages_per_seq,)  # one context bucket: the whole max_model_len
    for accelerator in ("gpu", "tpu"):
        fine = EngineConfig().for_platform(accelerator)
        assert fine.bucket_set == "fine" and fine.chunk_sizes == (16, 32, 64, 128, 256)
        assert fine.batch_sizes == (1, 2, 4, 8, 16, 32) and fine.context_pages == (16, 32, 64)
    # A set named explicitly is kept on any platform; explicit sizes override their dimension only.
    assert EngineConfig(bucket_set="fine").for_platform("cpu").batch_sizes == (1, 2, 4, 8, 16, 32)
    mixed = EngineConfig(batch_buckets=[1, 2, 4], context_buckets=[512, 1024]).for_platform("cpu")
    assert (mixed.chunk_sizes, mixed.batch_sizes, mixed.context_pages) == ((64, 256), (1, 2, 4), (32, 64))
    # The coarse sizes never exceed small limits.
    small = EngineConfig(max_model_len=64, page_size=4, max_num_seqs=4, max_chunk_tokens=16).for_platform("cpu")
    assert (small.chunk_sizes, small.batch_sizes, small.context_pages) == ((16,), (1, 4), (16,))
    with pytest.raises(ValueError, match="for_platform"):  # "auto" has no sizes until the platform is known
        EngineConfig().chunk_sizes
    with pytest.raises(ValueError, match="bucket_set must be one of"):
        EngineConfig(bucket_set="tiny")


def test_an_engine_on_cpu_runs_the_coarse_set_unless_told_otherwise(tiny):
    limits = dict(max_model_len=64, page_size=4, max_num_seqs=4, max_chunk_tokens=16, progress=False,
                  profile=PROFILE, warmup=False)
    with LLM(tiny, **limits) as llm:
        cfg = llm.engine_config
        assert cfg.bucket_set == "coarse" and cfg.batch_sizes == (1, 4) and llm.engine.policy.max_batch == 4
    with LLM(tiny, batch_buckets=[1, 2, 4], **limits) as llm:
        assert llm.engine_config.batch_sizes == (1, 2, 4)
    with LLM(tiny, bucket_set="fine", **limits) as llm:
        assert llm.engine_config.batch_sizes == (1, 2, 4)


def test_over_budget_warmup_fails_in_seconds_before_compiling(tiny, monkeypatch):
    limit_leaving(monkeypatch, 3)  # the single worker needs 2 + 2 + 4 = 8 steps
    before, start = compile_count(), time.monotonic()
    with pytest.raises(MappingBudgetError) as e:
        LLM(tiny, **ENGINE)
    # Allocating the pools compiles a tiny helper or two; not one of the 8 steps.
    assert time.monotonic() - start < 30 and compile_count() - before <= 2
    msg = str(e.value)
    assert "8 compiled executables" in msg and "vm.max_map_count" in msg and "sysctl" in msg
    assert "--batch-buckets" in msg and "LLM.close()" in msg


def test_cluster_checks_every_workers_steps_before_loading_any(tiny, monkeypatch):
    limit_leaving(monkeypatch, 12)  # P0: 2 prefills + 2 copies; M0: 8 steps + 2 copies
    before = compile_count()
    with pytest.raises(MappingBudgetError, match=r"cluster 1P1M \(P0 4, M0 10 executables\)"):
        LLM(tiny, cluster="1P1M", policy="planned", profile=PROFILE, **ENGINE)
    assert compile_count() - before <= 2


def test_the_profile_is_timed_on_the_warmed_decode_worker_compiling_nothing_more(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("TROPICAL_JAX_PROFILE_CACHE", str(tmp_path))
    before, base = compile_count(), mappings_in_use()
    llm = LLM(tiny, cluster="1P1M", policy="planned", **ENGINE)  # no profile: timed now, then cached
    steps = 4 + 10
    # Besides the steps and page copies, only a few tiny helpers compile (pool zeros, the copy's timing).
    assert steps <= compile_count() - before < steps + 10
    assert len(list(tmp_path.glob("*.json"))) == 1
    out = llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    held = mappings_in_use() - base
    llm.close()  # both workers' steps and page copies are given back
    assert mappings_in_use() - base < held / 4


def test_close_gives_the_mappings_back_and_a_second_engine_fits_or_fails_up_front(tiny, monkeypatch):
    base = mappings_in_use()
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with LLM(tiny, **ENGINE) as first:
        want = first.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=params)[0].token_ids
        held = mappings_in_use() - base
        assert held > 8 * 200  # eight steps of a few hundred mappings each
        # A second engine while the first is alive: refused before it compiles, the first unharmed.
        limit_leaving(monkeypatch, 6)
        with pytest.raises(MappingBudgetError):
            LLM(tiny, **ENGINE)
        assert first.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=params)[0].token_ids == want
    assert mappings_in_use() - base < held / 4
    with pytest.raises(RuntimeError, match="closed"):
        first.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=params)
    # With the first closed, the same room fits the second.
    second = LLM(tiny, **ENGINE)
    assert second.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=params)[0].token_ids == want
    second.close()


@pytest.mark.subprocess
def test_server_over_budget_exits_in_seconds_with_the_fix(tiny):
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tropical_jax.serve", "--port", "0", "--model", tiny,
                        "--cluster", "1P1M", "--max-model-len", "64", "--page-size", "4"],
                       env={**os.environ, "TROPICAL_JAX_MAX_MAP_COUNT": "3000"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert time.monotonic() - start < 60
    assert "vm.max_map_count" in r.stderr and "sysctl" in r.stderr and "LLVM" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize("flags,steps", [([], {"C0": 11}),
                                         (["--cluster", "1P1M", "--policy", "planned"], {"P0": 2, "M0": 11})])
def test_default_servers_come_up_and_log_their_ready_time(tmp_path, flags, steps):
    """The default single worker and the documented 1P1M command (on two emulated CPU devices) with the
    default buckets (the CPU's coarse set), from a cold compilation cache: no LLVM abort, each worker
    logs the steps it compiled, and the ready line reports time, executables and mappings."""
    from serve_helpers import ServerProcess

    server = ServerProcess(*flags, "--compilation-cache-dir", str(tmp_path / "xla"), timeout=1500,
                           env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                                "TROPICAL_JAX_PROFILE_CACHE": str(tmp_path / "profiles")})
    try:
        assert server.get("/health").status_code == 200
        log = "".join(server.lines)
        buckets = "step buckets: chunks 64,256, batches 1,8,32, contexts 1024 tokens (bucket set coarse, auto on cpu)"
        assert buckets in log
        for worker, count in steps.items():
            assert f"worker {worker}: {count} step executables ready in" in log
        assert "ready in" in log and "executables compiled or loaded" in log and "memory mappings" in log
        r = server.post("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8})
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
    finally:
        server.stop()
