"""The engine's profiler: mixed steps measured and fitted; profiles cached by model, mesh, backend and buckets."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from model_helpers import save_tiny_hf
from tropical_jax import LLM
from tropical_jax.cluster import profile as profile_mod
from tropical_jax.cluster import profile_cache
from tropical_jax.cluster.profile_cache import cached_profile, identity, key_of
from tropical_jax.config import EngineConfig
from tropical_jax.runtime.executor import prompt_steps
from tropical_jax.sched.cost_model import CostModel, ProfileError

BASE = {"units": "ms", "prefill": {"c2": 1e-4, "c1": 0.1, "c0": 10.0}, "decode": {"d0": 8.0, "d1": 0.5, "d2": 1e-3},
        "kv_bytes_per_token": 1024, "transfer": {"bandwidth_GBps": 5.0, "latency_ms": 1.0}}
TRUE = {"m0": 12.0, "mc2": 2e-4, "mcx": 3e-4, "mc1": 0.2, "mb": 0.7, "mt": 2e-3}


def mixed_points(coef, rng=None):
    pts = []
    for c in (16, 32, 64, 128):
        for b in (1, 4, 16):
            for ctx_bucket in (256, 1024):
                ctx, t = ctx_bucket - c, b * ctx_bucket
                ms = (coef["m0"] + coef["mc2"] * c * c + coef["mcx"] * c * ctx + coef["mc1"] * c + coef["mb"] * b
                      + coef["mt"] * t)
                pts.append([c, ctx, b, t, ms * (1 + (rng.normal(0, 0.02) if rng is not None else 0))])
    return pts


def test_mixed_points_are_fitted_and_used_instead_of_the_derivation():
    cm = CostModel.from_json({**BASE, "mixed": {"points": mixed_points(TRUE)}})
    assert not cm.mixed_derived
    for k, v in TRUE.items():
        assert cm.mixed[k] == pytest.approx(v, rel=1e-6, abs=1e-9)
    derived = CostModel.from_json(BASE)
    assert derived.mixed_derived
    c, ctx, b, t = 64, 192, 4, 1024
    truth = (TRUE["m0"] + TRUE["mc2"] * c * c + TRUE["mcx"] * c * ctx + TRUE["mc1"] * c + TRUE["mb"] * b
             + TRUE["mt"] * t) / 1e3
    assert cm.t_mixed(c, ctx, b, t) == pytest.approx(truth)
    assert derived.t_mixed(c, ctx, b, t) == pytest.approx(derived.t_chunk(c, ctx) + derived.t_decode(b, t) - 8e-3)
    # The chunk planner solves the fitted form: the largest chunk within a budget is exact.
    budget = cm.t_mixed(100, 0, 4, 1024)
    assert cm.max_chunk(0, 4, 1024, budget, 256) == 100
    # Noisy measurements still fit within a few percent at the measured shapes.
    noisy = CostModel.from_json({**BASE, "mixed": {"points": mixed_points(TRUE, np.random.default_rng(0))}})
    for c, ctx, b, t, _ in mixed_points(TRUE):
        assert noisy.t_mixed(c, ctx, b, t) == pytest.approx(cm.t_mixed(c, ctx, b, t), rel=0.05)
    assert CostModel.from_json(cm.to_dict()).mixed == pytest.approx(cm.mixed)


def test_pinned_coefficients_fit_points_that_cannot_separate_them():
    one_ctx = [p for p in mixed_points({**TRUE, "mcx": 0.0, "mt": 0.0}) if p[0] + p[1] == 256]
    with pytest.raises(ProfileError, match="rank"):
        CostModel.from_json({**BASE, "mixed": {"points": one_ctx}})
    cm = CostModel.from_json({**BASE, "mixed": {"points": one_ctx, "fixed": {"mcx": 0, "mt": 0}}})
    assert cm.mixed["mb"] == pytest.approx(TRUE["mb"]) and cm.mixed["mt"] == 0.0
    with pytest.raises(ProfileError, match="unknown"):
        CostModel.from_json({**BASE, "mixed": {"points": one_ctx, "fixed": {"bogus": 0}}})


# Few buckets; the persistent compilation cache (LLM's default) makes reruns fast. Compile counts are
# not asserted here, so it cannot hide anything.
ENGINE = dict(max_model_len=64, page_size=4, max_num_seqs=4, max_chunk_tokens=16, chunk_buckets=[16],
              batch_buckets=[1, 4], progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_hf(path, "llama", max_position_embeddings=128)
    return str(path)


@pytest.fixture
def counting(monkeypatch, tmp_path):
    """A fresh profile cache, and a count of the profiler's runs."""
    monkeypatch.setenv("TROPICAL_JAX_PROFILE_CACHE", str(tmp_path / "profiles"))
    calls = []
    real = profile_mod.profile_executor

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(profile_mod, "profile_executor", spy)
    return calls


def test_transfer_fit_recovers_latency_and_bandwidth_of_the_copy(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(profile_mod.time, "perf_counter", lambda: clock[0])
    kv_bytes, page_size = 1000, 16

    def copy(src, dst):  # 2 ms, then 4 GB/s
        assert src == dst
        clock[0] += 2e-3 + len(src) * page_size * kv_bytes / 4e9

    got = profile_mod.measure_transfer(copy, page_size, kv_bytes, max_pages=64)
    assert [t for t, _ in got["points"]] == [16, 256, 1024]
    assert got["latency_ms"] == pytest.approx(2.0, rel=1e-3)
    assert got["bandwidth_GBps"] == pytest.approx(4.0, rel=1e-3)
    CostModel.from_json({**BASE, "transfer": got})  # the scheduler accepts it as it is


class FakeExecutor:
    """What profile_executor reads of an executor; each step advances the fake clock by step_ms(c, b, p,
    decode_tokens, chunk) milliseconds (the profiler times with time.perf_counter, patched to the clock)."""

    model_cfg = SimpleNamespace(architecture="fake", num_layers=1, hidden_size=8, kv_bytes_per_token=lambda _: 64)

    def __init__(self, cfg, step_ms, monkeypatch):
        self.cfg, self.step_ms, self.clock = cfg, step_ms, 0.0
        self.chunk_sizes, self.batch_sizes = cfg.chunk_sizes, cfg.batch_sizes
        monkeypatch.setattr(profile_mod.time, "perf_counter", lambda: self.clock)

    def time_step(self, c, b, p, decode_tokens=None, chunk=None):
        self.clock += 1e-3 * self.step_ms(c, b, p, decode_tokens, chunk)


def test_prompts_are_timed_chunk_by_chunk_from_their_start(monkeypatch):
    cfg = EngineConfig(max_model_len=1024, page_size=16, max_num_seqs=2, max_chunk_tokens=256, chunk_buckets=(64, 256),
                       batch_buckets=(1, 2), context_buckets=(1024,), mixed_steps=False)

    def cost(c, chunk):  # ms: 1 per chunk bucket token, 0.01 per (prompt row, key it sees)
        start, n = chunk
        return c + 0.01 * n * (start + n / 2)

    def step_ms(c, b, p, decode_tokens, chunk):
        assert (chunk is not None) == (b == 0) and p == 64
        return cost(c, chunk) if chunk else 1.0

    ex = FakeExecutor(cfg, step_ms, monkeypatch)
    prof = profile_mod.profile_executor(ex, progress=False)
    # 64 and 256 tokens in one chunk from the start; 512 and 1024 as 2 and 4 chunks of 256, each where it
    # sits in the prompt (before, every chunk was timed at the end of the context bucket).
    want = {64: cost(64, (0, 64)), 256: cost(256, (0, 256))}
    want |= {k * 256: sum(cost(256, (s * 256, 256)) for s in range(k)) for k in (2, 4)}
    assert dict(prof["prefill"]["points"]) == pytest.approx(want)
    assert prompt_steps(cfg, 300) == [(256, 64, (0, 256)), (64, 64, (256, 44))]


@pytest.mark.parametrize("chunks,batches,contexts", [((16,), (1,), (64,)), ((16,), (1, 4), (64,)),
                                                     ((16, 64), (1,), (32, 64)), ((16, 32, 64), (1, 4, 8), (64,))])
def test_every_bucket_set_profiles_a_mixed_model_that_fits(monkeypatch, chunks, batches, contexts):
    cfg = EngineConfig(max_model_len=64, page_size=4, max_num_seqs=batches[-1], max_chunk_tokens=chunks[-1],
                       chunk_buckets=chunks, batch_buckets=batches, context_buckets=contexts)

    def true_ms(c, ctx, b, t):  # the mixed model with every coefficient the points can see
        one_shape = len(chunks) == len(batches) == len(contexts) == 1  # then ctx and t move together
        return 2.0 + 0.05 * c + (0 if one_shape else 1e-3 * c * ctx) + (0.3 * b if len(batches) > 1 else 0) + 2e-3 * t

    def step_ms(c, b, p, decode_tokens, chunk):
        tokens = p * cfg.page_size
        ctx = chunk[0] if chunk else tokens - c
        return true_ms(c, ctx, b, b * (decode_tokens or tokens)) if b else 1.0 + c + ctx

    # Every coefficient the points can see is determined, the rest pinned to 0.
    cm = CostModel.from_json(profile_mod.profile_executor(FakeExecutor(cfg, step_ms, monkeypatch), progress=False))
    for c in chunks:
        for b in batches:
            assert cm.t_mixed(c, 0, b, b * 8) * 1e3 == pytest.approx(true_ms(c, 0, b, b * 8), rel=1e-6)


@pytest.mark.slow
def test_profiler_measures_mixed_steps_and_the_fit_uses_them(tiny, counting):
    cfg = EngineConfig(max_model_len=64, page_size=4, max_num_seqs=4, max_chunk_tokens=16, chunk_buckets=(8, 16),
                       batch_buckets=(1, 4), context_buckets=(32, 64))
    prof, _, hit = cached_profile(tiny, cfg, progress=False)
    assert not hit and counting == [1]
    # Each chunk starting a prompt beside rows reading a quarter of the bucket, and ending each bucket.
    shapes = {(c, ctx, b, t // b) for c, ctx, b, t, _ in prof["mixed"]["points"]}
    assert shapes == {(c, 0, b, 8) for c in (8, 16) for b in (1, 4)} | {(c, 0, b, 16) for c in (8, 16) for b in (1, 4)} \
        | {(c, bucket - c, b, bucket) for c in (8, 16) for b in (1, 4) for bucket in (32, 64)}
    assert prof["mixed"]["fixed"] == {"mc2": 0.0}  # two chunk buckets cannot separate C^2 from C
    # Decode rows read a quarter, half and all of each context bucket (32 and 64 tokens): T is free of B.
    assert {t // b for b, t, _ in prof["decode"]["points"]} == {8, 16, 32, 64} and "fixed" not in prof["decode"]
    cm = CostModel.from_json(prof)
    assert not cm.mixed_derived and cm.t_mixed(16, 16, 4, 128) > 0


@pytest.mark.slow
def test_second_startup_reuses_the_cached_profile_and_new_buckets_miss(tiny, counting, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="tropical_jax")
    first = LLM(tiny, cluster="1P1M", **ENGINE)
    assert counting == [1] and "no cached profile fits" in caplog.text
    caplog.clear()
    second = LLM(tiny, cluster="2C", policy="chunked", **ENGINE)
    assert counting == [1], "the second startup timed the buckets again"
    assert "reusing the cached profile" in caplog.text
    assert second.engine.scheduler.cost.mixed == first.engine.scheduler.cost.mixed
    # 1P1M timed its own P -> M page copy; 2C has no handoff and keeps the profile's constant.
    assert first.engine.scheduler.cost.bandwidth_Bps != second.engine.scheduler.cost.bandwidth_Bps == 5e9
    # Colocated C workers compile no mixed steps, so their profile (without mixed points) is another entry.
    first.close(), second.close()
    LLM(tiny, cluster="2C", policy="colocated", **ENGINE).close()
    assert counting == [1, 1]
    # Other buckets miss the cache (measuring is faked here: the first startup measured for real).
    measured = []
    monkeypatch.setattr(profile_cache, "measure", lambda *a, **k: measured.append(a[1]) or dict(BASE))
    cfg = first.engine_config
    _, _, hit = cached_profile(tiny, EngineConfig(**{**cfg.__dict__, "chunk_buckets": (8, 16)}), progress=False)
    assert not hit and len(measured) == 1
    _, _, hit = cached_profile(tiny, cfg, progress=False)
    assert hit and len(measured) == 1
    # refresh: measured again although a profile fits, and the new one replaces it in the cache.
    prof, path, hit = cached_profile(tiny, cfg, progress=False, refresh=True)
    assert not hit and len(measured) == 2 and json.loads(path.read_text())["decode"] == BASE["decode"]


def test_cache_key_follows_model_mesh_backend_and_buckets(tiny):
    path = tiny
    cfg = EngineConfig(max_model_len=64, page_size=4, max_num_seqs=4, max_chunk_tokens=16)
    key = key_of(identity(path, cfg))
    assert key == key_of(identity(path, EngineConfig(**{**cfg.__dict__, "compilation_cache_dir": None})))
    for change in ({"batch_buckets": (1, 4)}, {"attention_backend": "pallas"}, {"dtype": "bfloat16"},
                   {"page_size": 8}, {"num_pages": 100}):
        assert key_of(identity(path, EngineConfig(**{**cfg.__dict__, **change}))) != key, change
    assert key_of(identity(path, cfg, tp=2)) != key
    import os
    import pathlib

    weights = next(pathlib.Path(path).glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # new weights, same name
    assert key_of(identity(path, cfg)) != key


def test_cache_key_follows_the_code_that_runs_and_times_the_steps(tmp_path, tiny):
    import shutil

    from tropical_jax.cluster.profile_cache import code_digest

    package = Path(profile_cache.__file__).resolve().parents[1]
    assert identity(tiny, EngineConfig(max_model_len=64, page_size=4))["code"] == code_digest(package)
    copy = tmp_path / "tropical_jax"
    for part in ("model", "runtime", "cluster", "api"):
        shutil.copytree(package / part, copy / part)
    shutil.copytree(package.parent / "pallas_kernels", tmp_path / "pallas_kernels")
    digest = code_digest(copy)
    assert digest == code_digest(package)
    with open(copy / "api" / "app.py", "a") as f:  # the server's code times no step
        f.write("# edited\n")
    assert code_digest(copy) == digest
    # What the timed code says of itself (comments, docstrings) is not what it runs: the profile still fits.
    attention = copy / "model" / "attention.py"
    source = attention.read_text()
    first_doc = source.index('"""') + 3
    attention.write_text(source[:first_doc] + "Reworded. " + source[first_doc:] + "# a note\n")
    assert code_digest(copy) == digest
    for timed in (attention, tmp_path / "pallas_kernels" / "_common.py", copy / "cluster" / "profile.py"):
        before = code_digest(copy)
        with open(timed, "a") as f:
            f.write("_A_FASTER_KERNEL = True\n")
        assert code_digest(copy) != before, timed
