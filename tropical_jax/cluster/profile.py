"""Profile this engine's own steps on its devices and fit the scheduler's cost model (docs/algorithm.md, Cost model).

    python -m tropical_jax.profile --model PATH --cluster 1P1M --out FILE.json [--max-model-len N ...]

Times, after warmup, prompts alone (one of each chunk bucket's length, and of 2, 4 and 8 largest chunks,
each chunk at its place in the prompt), every batch x context bucket (decode; each at a quarter, half
and all of its context, since attention reads only the context rows have) and mixed steps (every chunk
bucket x the smallest, a middle and the largest batch bucket x the smallest and largest context bucket,
each with the chunk starting a prompt beside rows reading a quarter of the bucket and ending the bucket
beside full rows),
and writes the CostModel JSON that both the scheduler and the simulator accept: points, fitted by least
squares when the profile is loaded. A step's cost depends on its buckets and on how much context its
rows read, so each point is timed with every row live (executor.full_inputs): a mixed step's chunk of C
tokens after ctx tokens of context, decode rows reading t tokens each (T = B x t). Coefficients the
points cannot separate (one batch bucket, fewer than three chunk buckets, a single mixed shape) are
pinned to 0.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from tqdm import tqdm

from ..runtime.executor import prompt_steps


def median_ms(fn, reps: int = 5) -> float:
    """Median wall time of `reps` calls after one unmeasured call, in ms (the median resists a busy host)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _subset(sizes) -> list:
    """Smallest, a middle and the largest of sorted bucket sizes (fewer if there are fewer)."""
    return sorted({sizes[0], sizes[len(sizes) // 2], sizes[-1]})


def _pins(chunks: int, batches: int, contexts: int) -> tuple[dict, dict]:
    """(decode, mixed) coefficients the bucket counts cannot separate, pinned to 0."""
    decode, mixed = {}, {}
    if chunks == batches == contexts == 1:  # two mixed points: context and decode tokens move together
        mixed["mcx"] = 0.0
    if batches == 1:
        decode["d1"] = mixed["mb"] = 0.0
    if chunks < 3:
        mixed["mc2"] = 0.0
    if chunks < 2:
        mixed["mc1"] = 0.0
    return decode, mixed


def profile_executor(executor, progress: bool = True, name: str = "", mixed: bool = True) -> dict:
    cfg = executor.cfg
    ps = cfg.page_size
    top = cfg.context_pages[-1]
    # Prompts of each chunk bucket's length, and of 2, 4 and 8 largest chunks, prefilled as the engine
    # does: each chunk at its place in the prompt (attention reads only the context its rows have).
    cmax = executor.chunk_sizes[-1]
    lengths = list(executor.chunk_sizes) + [k * cmax for k in (2, 4, 8) if k * cmax <= cfg.max_model_len]
    chunks = {length: prompt_steps(cfg, length) for length in lengths}
    shapes = [("prefill", c, 0, p, None, chunk) for c, p, chunk in dict.fromkeys(sum(chunks.values(), []))]
    shapes += [("decode", 0, b, p, t, None) for b in executor.batch_sizes for p in cfg.context_pages
               for t in sorted({max(1, p * ps // 4), p * ps // 2, p * ps})]
    if mixed and cfg.mixed_steps:
        # Each at two places: the chunk starting a prompt beside rows reading a quarter of the bucket, and
        # ending the bucket beside full rows, so that context and decode tokens vary apart from C and B.
        shapes += [("mixed", c, b, p, t, chunk) for c in executor.chunk_sizes for b in _subset(executor.batch_sizes)
                   for p in sorted({cfg.context_pages[0], top}) if c <= p * ps
                   for t, chunk in ((max(1, p * ps // 4), (0, c)), (p * ps, None))]
    chunk_ms, decode, mixed_pts = {}, [], []
    for kind, c, b, p, t, chunk in tqdm(shapes, desc="profiling steps", disable=not progress, unit="step"):
        ms = median_ms(lambda: executor.time_step(c, b, p, t, chunk))
        if kind == "prefill":
            chunk_ms[c, p, chunk] = ms
        elif kind == "decode":
            decode.append([b, b * t, ms])
        else:
            mixed_pts.append([c, chunk[0] if chunk else max(0, p * ps - c), b, b * t, ms])
    prefill = [[length, sum(chunk_ms[step] for step in steps)] for length, steps in chunks.items()]
    while len(prefill) < 3:
        prefill.append([prefill[-1][0] * 2, prefill[-1][1] * 2])
    decode_pins, mixed_pins = _pins(len(executor.chunk_sizes), len(executor.batch_sizes), len(cfg.context_pages))
    decode_fit: dict = {"points": decode}
    if decode_pins:
        decode_fit["fixed"] = decode_pins
    mc = executor.model_cfg
    itemsize = 2 if cfg.dtype == "bfloat16" else 4
    out = {
        "name": name or f"measured-{mc.architecture}-{mc.num_layers}x{mc.hidden_size}",
        "units": "ms",
        "source": ("measured by tropical_jax.cluster.profile on this machine's devices: prompts of each chunk "
                   "bucket and of several largest chunks, chunk by chunk from their start (prefill), batch x "
                   "context buckets at 1/4, 1/2 and all of the context (decode), chunk x batch x context "
                   "buckets (mixed), median of 5 timed runs each"),
        "prefill": {"points": prefill},
        "decode": decode_fit,
        "kv_bytes_per_token": mc.kv_bytes_per_token(itemsize),
        "transfer": {"bandwidth_GBps": 5.0, "latency_ms": 1.0},
        "kv_capacity_tokens": cfg.total_pages * ps,
        "buckets": {"chunk": list(executor.chunk_sizes), "batch": list(executor.batch_sizes),
                    "context_pages": list(cfg.context_pages), "page_size": ps},
    }
    if mixed_pts:
        out["mixed"] = {"points": mixed_pts}
        if mixed_pins:
            out["mixed"]["fixed"] = mixed_pins
    else:
        out["source"] += "; no mixed-step data: t_mixed = t_chunk + t_decode - min(c0, d0)"
    return out


def measure_transfer(copy, page_size: int, kv_bytes_per_token: int, max_pages: int) -> dict:
    """Time copy(src_pages, dst_pages), the cluster's own P -> M handoff, for a few sizes up to
    `max_pages` and fit t = latency + bytes / bandwidth (the cost model's transfer section)."""
    counts = sorted({1, max(1, max_pages // 4), max_pages})
    points = []
    for n in counts:
        pages = list(range(n))
        points.append([n * page_size, median_ms(lambda: copy(pages, pages))])
    tokens, ms = np.array(points, dtype=float).T
    (latency, per_byte), *_ = np.linalg.lstsq(np.stack([np.ones_like(tokens), tokens * kv_bytes_per_token], 1),
                                              ms, rcond=None)
    source = "measured: the cluster's own page copy between its first P and M (or D) worker, median of 5, " \
             "fitted by least squares"
    if per_byte < 1e-9:  # ms per byte: the size made no difference the timer could see
        per_byte, source = 1e-9, source + "; the copy's size changed its time by less than noise: bandwidth " \
                                          "set to 1000 GB/s, the latency carries it"
    return {"bandwidth_GBps": round(1e-6 / per_byte, 4), "latency_ms": round(max(latency, 0.0), 4),
            "points": points, "source": source}
