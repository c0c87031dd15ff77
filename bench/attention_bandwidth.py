"""Decode-attention bandwidth: Pallas kernel vs device peak vs the jnp reference.

    python -m bench.attention_bandwidth                      # full grid on a GPU/TPU: batch 1-256 x context 512-32k
    python -m bench.attention_bandwidth --batches 1,4 --contexts 512,1024   # what a CPU can afford

Bytes counted are the ones decode must move: K and V of every cached token plus q and the
output. Achieved bandwidth = bytes / median wall time of the jitted call. Writes
<out>.json (machine, settings, every cell, the issue-4 goal check) and <out>.png.
On CPU the kernels run under the Pallas interpreter: the numbers say how fast the *interpreter*
is, nothing about the hardware, and the JSON and the plot say so.

(Not named kernels.py: transformers' optional `import kernels`, the Hugging Face kernels package, would find
that file instead whenever bench/ comes first on sys.path, and fail.)
"""
import argparse
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from bench.accelerators import device_info
from pallas_kernels.decode_attention import paged_decode_reference
from pallas_kernels.kv_write import write_kv_reference, write_kv_tpu

GOAL = {"batch": 64, "context": 4096, "fraction_of_peak": 0.7, "speedup_vs_reference": 2.0}


def machine():
    info = device_info()
    return {"platform": info["platform"], "device_kind": info["device_kind"], "num_devices": info["num_devices"],
            "jax": jax.__version__, "host": platform.machine(), "cpu_count": os.cpu_count(),
            "peak_hbm_bytes_per_s": info["hbm_bytes_per_s"], "memory_bytes": info["memory_bytes"]}


def timeit(fn, *args, iters):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_inputs(batch, context, a):
    """Full-length sequences on randomly scattered pages (the realistic case for a paged cache)."""
    pages_per_seq = math.ceil(context / a.page_size)
    num_pages = batch * pages_per_seq
    rng = np.random.default_rng(0)
    tables = rng.permutation(num_pages).reshape(batch, pages_per_seq).astype(np.int32)
    key = jax.random.key(0)
    pool = (num_pages, a.page_size, a.kv_heads, a.head_dim)
    k = jax.random.normal(key, pool, a.dtype)
    v = jax.random.normal(jax.random.fold_in(key, 1), pool, a.dtype)
    q = jax.random.normal(jax.random.fold_in(key, 2), (batch, a.kv_heads * a.groups, a.head_dim), a.dtype)
    return q, k, v, jnp.asarray(tables), jnp.full((batch,), context, jnp.int32)


def bench_cell(batch, context, a, mem_limit):
    itemsize = jnp.dtype(a.dtype).itemsize
    kv_bytes = 2 * batch * context * a.kv_heads * a.head_dim * itemsize
    qo_bytes = 2 * batch * a.kv_heads * a.groups * a.head_dim * itemsize
    cell = {"batch": batch, "context": context, "bytes": kv_bytes + qo_bytes}
    # pools + the reference's gathered copy (and its f32 upcast of V) must fit comfortably
    if mem_limit and kv_bytes * 4 > 0.8 * mem_limit:
        cell["skipped"] = "does not fit in device memory"
        return cell
    args = decode_inputs(batch, context, a)
    kernel = jax.jit(lambda *x: pk.paged_decode_attention(*x, impl=a.impl))
    t_kernel = timeit(kernel, *args, iters=a.iters)
    cell.update(kernel_s=t_kernel, kernel_bytes_per_s=cell["bytes"] / t_kernel)
    if not a.skip_reference:
        t_ref = timeit(jax.jit(paged_decode_reference), *args, iters=a.iters)
        cell.update(reference_s=t_ref, reference_bytes_per_s=cell["bytes"] / t_ref,
                    speedup_vs_reference=t_ref / t_kernel)
    return cell


def bench_kv_write(batch, a):
    """Decode-step KV write (one token per sequence): fused jnp scatter vs the TPU DMA kernel."""
    num_pages = max(64, 4 * batch)
    pool = jnp.zeros((num_pages, a.page_size, a.kv_heads, a.head_dim), a.dtype)
    new = jnp.ones((batch, a.kv_heads, a.head_dim), a.dtype)
    slots = jnp.asarray(np.random.default_rng(0).permutation(num_pages * a.page_size)[:batch], jnp.int32)
    row = {"tokens": batch,
           "jnp_scatter_s": timeit(jax.jit(write_kv_reference), pool, pool, new, new, slots, iters=a.iters)}
    interpret = jax.default_backend() != "tpu"
    tpu = jax.jit(lambda *x: write_kv_tpu(*x, interpret=interpret))
    row["tpu_kernel_s"] = timeit(tpu, pool, pool, new, new, slots, iters=a.iters)
    row["tpu_kernel_interpreted"] = interpret
    return row


def goal_check(cells, peak, interpreted):
    cell = next((c for c in cells if c["batch"] == GOAL["batch"] and c["context"] == GOAL["context"]
                 and "kernel_s" in c), None)
    if interpreted or cell is None or peak is None:
        return {**GOAL, "result": "not measured (needs a GPU/TPU run of this cell)"}
    frac = cell["kernel_bytes_per_s"] / peak
    speedup = cell.get("speedup_vs_reference")
    ok = frac >= GOAL["fraction_of_peak"] and (speedup or 0) >= GOAL["speedup_vs_reference"]
    return {**GOAL, "fraction_of_peak_measured": frac, "speedup_measured": speedup,
            "result": "met" if ok else "not met"}


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["cells"] if "kernel_s" in c]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, batch in enumerate(sorted({c["batch"] for c in cells})):
        row = sorted((c for c in cells if c["batch"] == batch), key=lambda c: c["context"])
        x = [c["context"] for c in row]
        color = f"C{i}"
        ax.plot(x, [c["kernel_bytes_per_s"] / 1e9 for c in row], "o-", color=color,
                label=f"kernel, batch {batch}")
        if all("reference_bytes_per_s" in c for c in row):
            ax.plot(x, [c["reference_bytes_per_s"] / 1e9 for c in row], "x--", color=color,
                    label=f"jnp reference, batch {batch}")
    peak = result["machine"]["peak_hbm_bytes_per_s"]
    if peak:
        ax.axhline(peak / 1e9, color="k", lw=1, label="HBM peak")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("achieved bandwidth (GB/s)")
    m = result["machine"]
    title = (f"paged decode attention on {m['device_kind']}, "
             f"kernel variant: {result['settings']['impl_resolved']}")
    if result["interpreted"]:
        title += "\nCPU: Pallas INTERPRETER only - not a hardware measurement"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(prog="python -m bench.attention_bandwidth", description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,4,16,64,256")
    p.add_argument("--contexts", default="512,1024,2048,4096,8192,16384,32768")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--impl", default="auto", choices=pk.IMPLS)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--out", default=None, help="path prefix (default bench/results/attention_bandwidth_<platform>)")
    a = p.parse_args()
    a.dtype = jnp.dtype(a.dtype)
    info = machine()
    impl, interpret = pk.resolve(a.impl)
    interpreted = bool(interpret)
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"attention_bandwidth_{info['platform']}")
    cells = []
    for batch in map(int, a.batches.split(",")):
        for context in map(int, a.contexts.split(",")):
            cell = bench_cell(batch, context, a, info["memory_bytes"])
            cells.append(cell)
            print(json.dumps(cell), flush=True)
    result = {
        "what": "paged decode attention: achieved HBM bandwidth, Pallas kernel vs jnp reference",
        "interpreted": interpreted,
        "note": ("CPU run: the Pallas kernels were run by the interpreter, so these numbers measure "
                 "interpretation only. No GPU/TPU hardware run was made." if interpreted else
                 "hardware run"),
        "machine": info,
        "settings": {"kv_heads": a.kv_heads, "groups": a.groups, "head_dim": a.head_dim,
                     "page_size": a.page_size, "dtype": a.dtype.name, "impl": a.impl,
                     "impl_resolved": impl + (" (interpreted)" if interpreted else ""),
                     "iters": a.iters, "timing": "median wall time of jitted call"},
        "goal": goal_check(cells, info["peak_hbm_bytes_per_s"], interpreted),
        "kv_write": [bench_kv_write(b, a) for b in map(int, a.batches.split(","))],
        "cells": cells,
    }
    for c in cells:
        if "kernel_bytes_per_s" in c and info["peak_hbm_bytes_per_s"]:
            c["fraction_of_peak"] = c["kernel_bytes_per_s"] / info["peak_hbm_bytes_per_s"]
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, out + ".png")
    print(f"wrote {out}.json and {out}.png; goal: {result['goal']['result']}")


if __name__ == "__main__":
    main()
