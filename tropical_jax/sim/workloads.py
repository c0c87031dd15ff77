"""Workloads: request lengths from real traces, with Poisson, Gamma or replayed arrivals.

Named workloads load from the package's own compact copies (tropical_jax/data), so they work
wherever the package is installed; any JSONL file with `input_length`, `output_length` and an
optional `timestamp` (ms) works too. Deterministic given the seed.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np

from ..sched.request import Request

DATA = Path(__file__).resolve().parents[1] / "data"
WORKLOADS = {
    "mooncake-conversation": "mooncake_conversation",
    "mooncake-synthetic": "mooncake_synthetic",
    "azure-code": "azure_code",
    "azure-conv": "azure_conv",
    "arxiv-summarization": "arxiv_summarization",
    "humaneval": "humaneval",
}
ARRIVALS = ("poisson", "gamma", "trace")


def load_trace(name: str) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """-> (arrival seconds or None, input lengths, output lengths) in trace order."""
    if name in WORKLOADS:
        with gzip.open(DATA / f"{WORKLOADS[name]}.csv.gz", "rt") as f:
            rows = csv.reader(f)
            columns = dict(zip(next(rows), zip(*rows)))  # header -> that column's texts
        times = columns["arrival_s"]
        arrivals = None if not times[0] else np.array(times, float)
        return arrivals, np.array(columns["input_length"], np.int64), np.array(columns["output_length"], np.int64)
    path = Path(name)
    if not path.exists():
        raise ValueError(f"unknown workload {name!r}: choose one of {', '.join(WORKLOADS)} or a JSONL path")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    try:
        inputs = np.array([int(r["input_length"]) for r in rows])
        outputs = np.array([int(r["output_length"]) for r in rows])
    except KeyError as e:
        raise ValueError(f"{path}: every line needs input_length and output_length (missing {e})") from None
    arrivals = np.array([r["timestamp"] / 1000 for r in rows], float) if all("timestamp" in r for r in rows) else None
    return arrivals, inputs, outputs


def arrival_times(n: int, rate: float, kind: str, rng: np.random.Generator, cv: float = 1.0,
                  trace: np.ndarray | None = None) -> np.ndarray:
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if kind == "poisson":
        gaps = rng.exponential(1 / rate, n)
    elif kind == "gamma":
        if cv <= 0:
            raise ValueError(f"--cv must be positive, got {cv}")
        shape = 1 / cv**2  # CV of a Gamma(k, θ) is 1/sqrt(k); mean kθ = 1/rate
        gaps = rng.gamma(shape, 1 / (rate * shape), n)
    elif kind == "trace":
        if trace is None:
            raise ValueError("this workload has no timestamps: use --arrival poisson or gamma")
        t = np.asarray(trace[:n], float) - trace[0]
        span = t[-1] if len(t) > 1 and t[-1] > 0 else 1.0
        # Keep the trace's shape (bursts), rescaled so the mean rate is `rate`.
        return t * ((len(t) - 1) / rate) / span if len(t) > 1 else t
    else:
        raise ValueError(f"unknown arrival process {kind!r}: choose one of {', '.join(ARRIVALS)}")
    return np.cumsum(gaps) - gaps[0]


def make_requests(workload: str, num_requests: int, rate: float, *, arrival: str = "poisson", cv: float = 1.0,
                  seed: int = 0, max_input_len: int | None = None, max_output_len: int | None = None,
                  tpot_slo: float = 0.1, ttft_slo: float | None = None) -> list[Request]:
    """Sample `num_requests` requests: lengths drawn from the trace at random (Poisson/Gamma), or a
    contiguous stretch of it in order with its own timestamps rescaled to `rate` (trace replay)."""
    times, inputs, outputs = load_trace(workload)
    rng = np.random.default_rng(seed)
    if arrival == "trace":
        if times is None:
            raise ValueError(f"workload {workload!r} has no timestamps: use --arrival poisson or gamma")
        # The seed picks where in the trace the window starts (seed 0: at the beginning), so seeds
        # give different stretches of the same trace; the trace wraps around if it is too short.
        start = int(rng.integers(0, len(inputs))) if seed else 0
        pos = start + np.arange(num_requests)
        idx = pos % len(inputs)
        trace_t = times[idx] + (pos // len(inputs)) * (times[-1] + 1)
        at = arrival_times(num_requests, rate, "trace", rng, trace=trace_t)
    else:
        idx = rng.integers(0, len(inputs), num_requests)
        at = arrival_times(num_requests, rate, arrival, rng, cv)
    ins = inputs[idx]
    if max_input_len is not None:
        ins = np.minimum(ins, max_input_len)
    outs = np.maximum(outputs[idx], 1)
    if max_output_len is not None:
        outs = np.minimum(outs, max_output_len)
    return [Request(id=i, arrival=a, prompt_len=n_in, max_tokens=n_out, ttft_slo=ttft_slo, tpot_slo=tpot_slo,
                    output_len=n_out) for i, (a, n_in, n_out) in enumerate(zip(at.tolist(), ins.tolist(), outs.tolist()))]
