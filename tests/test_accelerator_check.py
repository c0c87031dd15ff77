"""python -m bench.accelerator_check: the smoke run of every part passes and its summary has the promised structure;
a part past its limit is killed and recorded while the run goes on; chips and model shapes are chosen right."""

import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from bench.accelerator_check import PARTS
from bench.accelerators import peaks_for
from bench.check_engine import shapes as engine_shapes
from bench.check_kernels import DECODE, HEADS, PAGE_SIZES, RAGGED
from bench.check_parts import MODELS, param_count, pick_model
from pallas_kernels.decode_attention import paged_decode_gpu, paged_decode_tpu
from pallas_kernels.ragged_attention import ragged_paged_attention_gpu, ragged_paged_attention_tpu
from pallas_kernels.triton_check import TRITON_TARGET
from tropical_jax.config import EngineConfig

ROOT = Path(__file__).resolve().parents[1]
CHECK = [str(ROOT / "bench" / "accelerator_check.sh")]  # the wrapper, so that it is tested too


def run_check(*args, timeout=900):
    return subprocess.run([*CHECK, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.subprocess
def test_smoke_run_passes_every_part(tmp_path):
    # The limits are for an unshared 2-core machine; a VM shared with other jobs runs 2-3x slower.
    r = run_check("--smoke", "--out", str(tmp_path), "--time-scale", "3")
    summary = json.loads((tmp_path / "accelerator_check.json").read_text())
    parts = summary["parts"]
    assert list(parts) == [p.name for p in PARTS], r.stdout
    assert {n: p["status"] for n, p in parts.items()} == {p.name: "passed" for p in PARTS}, r.stdout + r.stderr
    assert r.returncode == 0 and summary["passed"] and summary["mode"] == "smoke"

    env = parts["environment"]["results"]
    assert env["device"]["platform"] == "cpu" and env["versions"]["jax"]
    kernels = parts["kernels"]["results"]
    for section in ("decode", "ragged"):  # both variants, interpreted, within tolerance of the reference
        assert {name.split()[0] for name in kernels[section]} == {"gpu", "tpu"}
        assert all(row["ok"] and row["max_abs_error"] <= row["tolerance"] for row in kernels[section].values())
    assert kernels["kv_write"]["exact"] and kernels["decode_bandwidth"][0]["kernel_s"] > 0
    assert kernels["decode_goal"]["result"].startswith("not measured")  # interpreted: no hardware claim
    for backend in ("pallas", "reference"):
        engine = parts[f"engine-{backend}"]["results"]
        assert engine["model"]["attention_backend"] == backend and engine["compiles_after_warmup"] == 0
        assert set(engine["prefill_tokens_per_s"]) == {"64", "192"} and engine["decode_tokens_per_s"]["4"] > 0
    assert parts["transformers"]["results"]["decode_tokens_per_s"]["4"] > 0
    server = parts["server"]["results"]
    assert server["layout"]["cluster"] == "1P1M" and server["burst"]["completion_tokens"] == [16] * 12
    assert server["metrics"]["workers"] == ["P0", "M0"] and server["metrics"]["generated_tokens"] >= 192

    md = (tmp_path / "accelerator_check.md").read_text()
    assert md.startswith("    python -m bench.accelerator_check --smoke")
    assert "| engine-pallas | passed |" in md and "compiles after warmup" in md
    for part in PARTS:  # each part kept its own results and log
        assert (tmp_path / "accelerator_check_parts" / f"{part.name}.json").exists()


@pytest.mark.subprocess
def test_a_part_past_its_limit_is_killed_and_recorded(tmp_path):
    # 0.01 x the limits: the environment part gets 0.3 s (less than importing JAX), and then less than a
    # second of the budget (1.2 s) is left, too little to start another part.
    r = run_check("--smoke", "--parts", "environment,kernels,transformers", "--out", str(tmp_path),
                  "--time-scale", "0.01", timeout=120)
    summary = json.loads((tmp_path / "accelerator_check.json").read_text())
    assert r.returncode == 1 and not summary["passed"]
    assert list(summary["parts"]) == ["environment", "kernels", "weights", "transformers"]  # weights: needed
    assert summary["parts"]["environment"]["status"] == "timed out"
    assert summary["parts"]["environment"]["exit_code"] is None
    assert [p["status"] for p in list(summary["parts"].values())[1:]] == ["not run"] * 3
    assert "| environment | timed out |" in (tmp_path / "accelerator_check.md").read_text()


@pytest.mark.subprocess
def test_a_full_run_without_an_accelerator_stops_after_the_environment(tmp_path):
    r = run_check("--parts", "environment,kernels", "--out", str(tmp_path), timeout=120)
    parts = json.loads((tmp_path / "accelerator_check.json").read_text())["parts"]
    assert r.returncode == 1 and parts["environment"]["status"] == "failed"
    assert "JAX sees no GPU or TPU" in parts["environment"]["failures"][0]
    assert parts["kernels"] == {"status": "not run", "reason": "no GPU or TPU", "limit_s": 70}


def test_help_names_every_part_and_its_limit():
    out = run_check("--help", timeout=60).stdout
    for part in PARTS:
        assert f"{part.name:17s} {part.limit_s:4d} s ({part.smoke_limit_s} s with --smoke)" in out


@pytest.mark.parametrize("kind,chip", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", None),
    ("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"), ("TPU v5", "TPU v5p"), ("TPU v5p", "TPU v5p"),
    ("TPU v6 lite", "TPU v6e"), ("TPU7x", None), ("cpu", None)])
def test_peaks_by_device_kind(kind, chip):
    peaks = peaks_for(kind)
    assert peaks["chip"] == chip
    assert (peaks["hbm_bytes_per_s"] is None) == (chip is None)


def test_model_shapes_fit_the_device():
    assert 8.0e9 < param_count(MODELS["llama-3-8b"]) < 8.1e9  # Llama-3-8B: 8.03B parameters
    assert 3.2e9 < param_count(MODELS["llama-3.2-3b"]) < 3.25e9
    assert pick_model(80 * 2**30, smoke=False) == "llama-3-8b"  # H100
    assert pick_model(16 * 2**30, smoke=False) == "llama-3.2-3b"  # TPU v5e
    assert pick_model(None, smoke=True) == "tiny"


def _lower(platform, fn, *args):
    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)] if platform == "cuda" else []
    jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)


@pytest.mark.slow
def test_full_run_kernel_shapes_lower_for_gpu_and_tpu():
    """What a first GPU/TPU run will compile, lowered here: the kernels part's full cases, and the engine part's
    ragged step (2048-token chunk, 8 prompt segments, a padding row and 128 decodes) with its page size per
    platform; with pages of 16 the TPU step would not fit its SMEM table budget."""
    sds = jax.ShapeDtypeStruct
    heads = HEADS["full"]
    kvh, h, d = heads["kv_heads"], heads["kv_heads"] * heads["groups"], heads["head_dim"]

    def ragged(tokens, seqs, pages, ps):
        pool = sds((4096, ps, kvh, d), jnp.bfloat16)
        i32 = lambda *s: sds(s, jnp.int32)  # noqa: E731
        return sds((tokens, h, d), jnp.bfloat16), pool, pool, i32(seqs, pages), i32(seqs), i32(seqs + 1), i32(1)

    def engine_step(shapes_for):
        full = engine_shapes({"smoke": False}, shapes_for)
        rows = EngineConfig().max_prefill_seqs + 1 + max(full["batches"])  # prompt segments, padding, decodes
        ps = full["page_size"]
        return ragged(full["chunk"] + max(full["batches"]), rows, -(-full["max_model_len"] // ps), ps)

    for platform in ("cuda", "tpu"):
        decode, step = (paged_decode_gpu, ragged_paged_attention_gpu) if platform == "cuda" else \
            (paged_decode_tpu, ragged_paged_attention_tpu)
        for ps in PAGE_SIZES["full"]:
            for _, lengths, context in DECODE["full"]:
                q, k_pool, v_pool, tables, lengths_arg, *_ = ragged(len(lengths), len(lengths), context // ps, ps)
                _lower(platform, decode, q, k_pool, v_pool, tables, lengths_arg)
            for _, _, tokens, max_seqs, context in RAGGED["full"]:
                _lower(platform, step, *ragged(tokens, max_seqs, context // ps, ps))
        _lower(platform, step, *engine_step("tpu" if platform == "tpu" else "gpu"))
    with pytest.raises(ValueError, match="SMEM"):  # the GPU's pages of 16 on TPU
        _lower("tpu", ragged_paged_attention_tpu, *engine_step("gpu"))
