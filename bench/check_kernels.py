"""Part 2 of the accelerator check: every Pallas kernel against its jnp reference, and its speed.

Correctness runs on poisoned inputs (pallas_kernels.testing: slots no live token owns hold NaN), so a kernel
that reads past a length fails by NaN, not by a rounding error; max abs error must stay within
pallas_kernels.testing.TOL. Speed: paged decode over full-length sequences (bench/attention_bandwidth.py's
cells: achieved bytes/s of K, V, q and output, as % of the chip's HBM peak, and the speedup over the
reference), and ragged steps (unique KV bytes/s as % of HBM peak, attention FLOP/s as % of bf16 peak).
A case whose jnp reference would not fit in device memory runs the kernel only and says so.
Kernel variants: the platform's own (Triton on GPU, Mosaic on TPU); on a CPU both, interpreted.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from bench.accelerators import device_info
from bench.attention_bandwidth import bench_cell, goal_check, timeit
from pallas_kernels.kv_write import write_kv_reference, write_kv_tpu
from pallas_kernels.testing import TOL, decode_case, ragged_case

HEADS = {"full": dict(kv_heads=8, groups=4, head_dim=128), "smoke": dict(kv_heads=2, groups=2, head_dim=128)}
# Decode: (name, lengths, context the tables span). Ragged: (name, [(q_len, kv_len)], tokens, max_seqs, context).
DECODE = {"full": [("mixed lengths to 32k", [32768, 1, 4097, 0, 12345, 777, 32753, 2000], 32768)],
          "smoke": [("mixed lengths", [64, 1, 0, 33], 64)]}
RAGGED = {"full": [("decodes to 32k", [(1, 32768), (1, 20000), (1, 1), (1, 31000), (1, 4097)], 8, 8, 32768),
                   ("chunks and decodes to 8k", [(96, 8192), (16, 16), (1, 8000), (1, 5), (1, 4096)], 128, 8, 8192),
                   ("2k chunk on a 6k prefix beside 16 decodes", [(2048, 8192)] + [(1, 4096)] * 16, 2064, 17, 8192)],
          "smoke": [("chunks and decodes", [(24, 40), (8, 8), (1, 60), (1, 3)], 40, 6, 64)]}
PAGE_SIZES = {"full": (16, 32), "smoke": (16,)}
# (batch, context, page size) cells of bench/attention_bandwidth.py; 64 x 4k is its goal cell.
BANDWIDTH = {"full": [(1, 32768, 16), (8, 32768, 16), (64, 4096, 16), (64, 4096, 32), (128, 2048, 16)],
             "smoke": [(2, 64, 16)]}
REFERENCE_SHARE = 0.3  # of device memory a reference's gathered copies may take


def variants(platform: str) -> list[str]:
    return {"gpu": ["gpu"], "tpu": ["tpu"]}.get(platform, ["gpu", "tpu"])


def reference_bytes(rows: int, context: int, heads: dict) -> int:
    """What a reference gathers for `rows` query rows over `context` keys: K, V, V in f32 and its masked
    copy per kv head, scores and weights per query head (4 + 4 + ... bytes)."""
    kvh, g, d = heads["kv_heads"], heads["groups"], heads["head_dim"]
    return rows * context * (kvh * d * 12 + kvh * g * 12)


def _max_error(out, ref) -> float:
    diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))
    return float(np.nanmax(diff)) if np.isfinite(diff).all() else float("nan")


def _check(record, name, out, ref, dtype) -> dict:
    err = _max_error(out, ref)
    row = {"max_abs_error": err, "tolerance": TOL[dtype], "ok": bool(err <= TOL[dtype])}
    if not row["ok"]:
        record.fail(f"{name}: max abs error {err} over {TOL[dtype]} (nan: a masked or unowned slot was read)")
    return row


def ragged_work(seqs, heads) -> tuple[int, float]:
    """(unique KV bytes, attention FLOPs) of a ragged call: every sequence's KV once; each query token
    attends to the keys up to its position (2 FLOPs a multiply-add, QK and PV)."""
    kvh, g, d = heads["kv_heads"], heads["groups"], heads["head_dim"]
    kv_bytes = sum(kv for _, kv in seqs) * kvh * d * 2 * 2
    visible = sum(q * kv - q * (q - 1) // 2 for q, kv in seqs)
    return kv_bytes, 4.0 * kvh * g * d * visible


def _speed(fn, args, iters, work, peaks) -> dict:
    seconds = timeit(jax.jit(fn), *args, iters=iters)
    kv_bytes, flops = work
    row = {"seconds": seconds, "kv_bytes_per_s": kv_bytes / seconds, "flops_per_s": flops / seconds}
    if peaks["hbm_bytes_per_s"]:
        row["fraction_of_hbm_peak"] = row["kv_bytes_per_s"] / peaks["hbm_bytes_per_s"]
        row["fraction_of_bf16_peak"] = row["flops_per_s"] / peaks["bf16_flops"]
    return row


def run(settings: dict, record) -> None:
    mode = "smoke" if settings["smoke"] else "full"
    info = device_info()
    heads, dtype, memory = HEADS[mode], jnp.bfloat16, info["memory_bytes"]
    iters = 2 if settings["smoke"] else 10
    fits = (lambda n: memory is None or n <= REFERENCE_SHARE * memory)
    record["setup"] = {"device_kind": info["device_kind"], "chip": info["chip"], "dtype": "bfloat16", **heads,
                       "variants": variants(info["platform"]), "interpreted": info["platform"] not in ("gpu", "tpu")}
    decode, ragged = {}, {}
    for impl in variants(info["platform"]):
        run_kernel = dict(impl=impl)
        for ps in PAGE_SIZES[mode]:
            for name, lengths, context in DECODE[mode]:
                key = f"{impl} decode page{ps}: {name}"
                args = decode_case(lengths, **heads, page_size=ps, pages_per_seq=context // ps, dtype=dtype)
                out = jax.jit(lambda *a: pk.paged_decode_attention(*a, **run_kernel))(*args)
                ref = pk.paged_decode_attention(*args, impl="reference")
                decode[key] = _check(record, key, out, ref, dtype)
                record["decode"] = decode
            for name, seqs, tokens, max_seqs, context in RAGGED[mode]:
                key = f"{impl} ragged page{ps}: {name}"
                args = ragged_case(seqs, num_tokens=tokens, max_seqs=max_seqs, **heads, page_size=ps,
                                   pages_per_seq=context // ps, dtype=dtype)
                kernel = (lambda *a: pk.ragged_paged_attention(*a, **run_kernel))
                row = {}
                if fits(reference_bytes(tokens, context, heads)):
                    ref = pk.ragged_paged_attention(*args, impl="reference")
                    row = _check(record, key, jax.jit(kernel)(*args), ref, dtype)
                else:
                    row["reference"] = f"skipped: needs ~{reference_bytes(tokens, context, heads) / 2**30:.0f} GiB"
                row["speed"] = _speed(kernel, args, iters, ragged_work(seqs, heads), info)
                ragged[key] = row
                record["ragged"] = ragged
    record["kv_write"] = kv_write(record, info, heads, iters)
    cells = []
    for batch, context, ps in BANDWIDTH[mode]:
        a = types.SimpleNamespace(**heads, page_size=ps, dtype=dtype, impl="auto", iters=iters,
                                  skip_reference=False)
        cell = {"page_size": ps, **bench_cell(batch, context, a, memory)}
        if info["hbm_bytes_per_s"] and "kernel_bytes_per_s" in cell:
            cell["fraction_of_peak"] = cell["kernel_bytes_per_s"] / info["hbm_bytes_per_s"]
        cells.append(cell)
        record["decode_bandwidth"] = cells
    record["decode_goal"] = goal_check(cells, info["hbm_bytes_per_s"], info["platform"] not in ("gpu", "tpu"))


def kv_write(record, info, heads, iters) -> dict:
    """The TPU KV-write kernel against the jnp scatter (exact: it only moves bytes). GPUs have no such
    kernel (XLA's scatter is the GPU path), so there it is not run."""
    if info["platform"] == "gpu":
        return {"skipped": "no GPU kernel: the fused jnp scatter is the GPU path"}
    kvh, d = heads["kv_heads"], heads["head_dim"]
    rng = np.random.default_rng(0)
    k_pool, v_pool, new_k, new_v = (jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
                                    for shape in [(64, 16, kvh, d)] * 2 + [(32, kvh, d)] * 2)
    slots = rng.permutation(64 * 16)[:32].astype(np.int32)
    slots[::7] = -1  # dropped rows (padding)
    slots = jnp.asarray(slots)
    interpret = info["platform"] != "tpu"
    fn = jax.jit(lambda *a: write_kv_tpu(*a, interpret=interpret))
    args = (k_pool, v_pool, new_k, new_v, slots)
    got, want = fn(*args), write_kv_reference(*args)
    exact = all(bool(jnp.array_equal(g, w)) for g, w in zip(got, want))
    if not exact:
        record.fail("write_kv_tpu differs from the jnp scatter")
    return {"exact": exact, "interpreted": interpret, "tokens": 32,
            "kernel_seconds": timeit(fn, *args, iters=iters),
            "scatter_seconds": timeit(jax.jit(write_kv_reference), *args, iters=iters)}
