"""Calibrating a measured profile to the steps as a cluster really runs them (bench/engine_slo.py).

The profiler times each step alone; in a cluster the workers share the machine's cores. `StepWatch`
records every step's real and predicted time and the host time after it; `scaled_profile` scales each
kind of step by its median real/predicted ratio and adds that host time.
"""

from __future__ import annotations

import numpy as np

from tropical_jax.sched.cost_model import CostModel


def step_kind(plan) -> str:
    return "mixed" if plan.chunk is not None and plan.decodes else ("prefill" if plan.chunk is not None else "decode")


class StepWatch(list):
    """(kind, real s, predicted s) of every step the engine runs from now on, and the host time a busy worker
    spends after each kind of step before the next (`gaps`: (kind, s); a prefill's KV copy to its decode
    worker runs there, waiting for that worker's step to end; tokens are appended; the next step is planned).
    Wraps the engine's scheduler's next_step and step_done."""

    def __init__(self, eng):
        super().__init__()
        self.gaps: list[tuple[str, float]] = []
        sched = eng.scheduler
        nxt, done = sched.next_step, sched.step_done
        last_end: dict = {}

        def next_step(worker, now):
            plan = nxt(worker, now)
            if plan is None:
                last_end.pop(worker, None)  # idle: the next gap is not overhead
            elif worker in last_end:
                kind, end = last_end.pop(worker)
                self.gaps.append((kind, now - end))
            return plan

        def step_done(worker, plan, now, finished=()):
            self.append((step_kind(plan), now - plan.start, plan.predicted))
            out = done(worker, plan, now, finished)
            last_end[worker] = (step_kind(plan), now)
            return out

        sched.next_step, sched.step_done = next_step, step_done

    def clear(self):
        super().clear()
        self.gaps.clear()


def step_ratio(seen, kind: str | None = None) -> float | None:
    """Median real/predicted step time (of one kind of step, or all)."""
    r = [real / pred for k, real, pred in seen if pred > 0 and kind in (None, k)]
    return float(np.median(r)) if r else None


def mean_gaps_ms(gaps) -> dict:
    return {k: float(np.mean([g for kk, g in gaps if kk == k])) * 1e3 if any(kk == k for kk, _ in gaps) else 0.0
            for k in ("prefill", "decode", "mixed")}


def scaled_profile(cost: CostModel, factors: dict, gap_ms: dict) -> dict:
    """The measured profile with each kind of step's time x its factor, plus the host time between steps
    (the steps as the cluster ran them)."""
    d = cost.to_dict()
    for sec, kind in (("prefill", "prefill"), ("chunk", "prefill"), ("decode", "decode"), ("mixed", "mixed")):
        if sec in d:
            d[sec] = {k: v * factors[kind] for k, v in d[sec].items()}
    for sec, const, kind in (("prefill", "c0", "prefill"), ("chunk", "k0", "prefill"), ("decode", "d0", "decode"),
                             ("mixed", "m0", "mixed")):
        if sec in d:
            d[sec][const] += gap_ms[kind]
    text = ", ".join(f"{k} x {factors[k]:.2f} + {gap_ms[k]:.1f} ms after it" for k in factors)
    d["name"] = f"{d['name']} calibrated ({text})"
    d["source"] = (f"{d['source']}; step times scaled ({text}): the median real/predicted step time of each kind "
                   "in calibration runs of the cluster on this machine (two workers sharing its cores)")
    return d
