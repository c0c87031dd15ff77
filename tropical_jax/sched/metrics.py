"""Serving metrics over finished requests, and goodput by bisection over the arrival rate.

Attainment counts every request: rejected and unfinished ones are misses (docs/algorithm.md, Metrics and
goodput). Goodput is the highest rate whose attainment is >= the target (DistServe's convention), found by
bisection on a monotone-ish curve; the whole attainment-vs-rate curve is returned with it.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np

from .request import Request

LENGTH_CLASSES = (("<2k", 0, 2048), ("2-8k", 2048, 8192), ("8-16k", 8192, 16384), (">=16k", 16384, math.inf))


def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else None


def length_class(prompt_len: int) -> str:
    return next(name for name, lo, hi in LENGTH_CLASSES if lo <= prompt_len < hi)


def record(r: Request) -> dict:
    """One request's outcome as a flat dict (times in seconds): what a per-request trace file holds."""
    return {"id": r.id, "arrival": r.arrival, "prompt_len": r.prompt_len, "n_out": r.n_out, "path": r.path,
            "prefill_worker": r.prefill_worker, "decode_worker": r.decode_worker, "ttft": r.ttft, "tpot": r.tpot,
            "queueing": r.queueing, "transfer": r.transfer_time, "ttft_slo": r.ttft_slo, "tpot_slo": r.tpot_slo,
            "attained": r.attained, "rejected": r.rejected, "late": r.late}


def miss_breakdown(requests: Iterable[Request]) -> dict:
    """Why and where requests missed: by cause and by path (where the prefill ran), with the median
    TTFT overshoot (ttft / ttft_slo) of the TTFT misses. By length class: see summarize()."""
    missed = [r for r in requests if not r.attained]
    causes: dict[str, int] = {}
    by_path: dict[str, int] = {}
    for r in missed:
        if r.rejected:
            cause = "rejected"
        elif r.finish_time is None:
            cause = "unfinished"
        else:
            cause = {(False, True): "ttft", (True, False): "tpot", (False, False): "ttft+tpot"}[
                (r.ttft_attained, r.tpot_attained)]
        causes[cause] = causes.get(cause, 0) + 1
        by_path[str(r.path)] = by_path.get(str(r.path), 0) + 1
    over = [r.ttft / r.ttft_slo for r in missed if r.ttft is not None and not r.ttft_attained]
    return {"missed": len(missed), "by_cause": causes, "by_path": by_path, "ttft_overshoot_p50": _pct(over, 50)}


def summarize(requests: Iterable[Request]) -> dict:
    """Attainment, percentiles (seconds), and misses by prompt-length class."""
    reqs = list(requests)
    n = len(reqs)
    if n == 0:
        raise ValueError("no requests to summarize")
    ttft = [r.ttft for r in reqs if r.ttft is not None]
    tpot = [r.tpot for r in reqs if r.finish_time is not None and r.tpot is not None]
    queue = [r.queueing for r in reqs if r.queueing is not None]
    transfer = [r.transfer_time for r in reqs if r.path == "prefill" and r.finish_time is not None]
    misses = {}
    for name, _, _ in LENGTH_CLASSES:
        cls = [r for r in reqs if length_class(r.prompt_len) == name]
        if cls:
            missed = sum(not r.attained for r in cls)
            misses[name] = {"requests": len(cls), "missed": missed, "miss_rate": missed / len(cls)}
    return {
        "num_requests": n,
        "attainment": sum(r.attained for r in reqs) / n,
        "ttft_attainment": sum(r.ttft_attained for r in reqs) / n,
        "tpot_attainment": sum(r.tpot_attained for r in reqs) / n,
        "ttft_p50": _pct(ttft, 50), "ttft_p90": _pct(ttft, 90), "ttft_p99": _pct(ttft, 99),
        "tpot_p50": _pct(tpot, 50), "tpot_p90": _pct(tpot, 90), "tpot_p99": _pct(tpot, 99),
        "queue_p90": _pct(queue, 90),
        "transfer_p90": _pct(transfer, 90),
        "inline_fraction": sum(r.path == "inline" for r in reqs) / n,
        "rejected": sum(r.rejected for r in reqs),
        "misses_by_length": misses,
    }


def goodput(attainment_at: Callable[[float], float], *, lo: float, hi: float, target: float = 0.9,
            rel_tol: float = 0.02, max_iter: int = 20, progress: Callable[[float, float], None] | None = None,
            prefetch: Callable[[list[float]], None] | None = None):
    """Highest rate in [lo, hi] with attainment_at(rate) >= target, by bisection.

    The bracket is widened first (hi doubled while it still meets the target, lo halved while it
    misses). Returns (goodput, curve) with curve = sorted [[rate, attainment], ...] of every
    point evaluated; goodput is 0.0 when even the lowest rate tried misses the target.
    `prefetch`, if given, is told before each evaluation the rate about to be asked for and then the
    rates the search asks for next on either outcome (the likelier first), so an evaluator with
    spare workers can start them; the search and its answer do not depend on it."""
    curve: dict[float, float] = {}

    def at(rate, *after):
        if rate not in curve:
            if prefetch is not None:
                prefetch([rate, *after])
            curve[rate] = attainment_at(rate)
            if progress is not None:
                progress(rate, curve[rate])
        return curve[rate]

    for _ in range(max_iter):
        if at(hi, lo, (lo + hi) / 2, hi * 2) < target:  # lo may be known already: then the midpoint
            break
        lo, hi = hi, hi * 2
    else:
        return hi, sorted(map(list, curve.items()))
    floor = lo / 1024
    while at(lo, lo / 2, (lo + hi) / 2) < target:
        if lo <= floor:
            return 0.0, sorted(map(list, curve.items()))
        lo, hi = lo / 2, lo
    for _ in range(max_iter):
        if hi - lo <= rel_tol * lo:
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid, (mid + hi) / 2, (lo + mid) / 2) >= target else (lo, mid)
    return lo, sorted(map(list, curve.items()))


def mean_sd(values) -> tuple[float, float]:
    v = np.asarray(list(values), float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
