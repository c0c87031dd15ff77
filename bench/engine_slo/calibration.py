"""Calibrating a measured profile to the steps as a cluster really runs them (bench.engine_slo).

The profiler times each step alone; in a cluster the workers share the machine's cores. `StepWatch`
records every step's real and predicted time, whether another worker ran a step when it started, and
the host time after it. `calibrate` gives each kind of step its median real/predicted ratio among the
steps that started alone, and the contention: how much longer the others ran (the profile's contention
factor, which the simulator applies to steps that start beside another); `scaled_profile` applies them
and adds that host time.
"""

from __future__ import annotations

import numpy as np

from tropical_jax.sched.cost_model import CostModel

from tropical_jax.sched.plan import STEP_KINDS as KINDS


class StepWatch(list):
    """(kind, real s, predicted s, shared) of every step the engine runs from now on, and the host time a busy worker
    spends after each kind of step before the next (`gaps`: (kind, s); a P worker launches the page reads of the
    handoffs its prefills start there; tokens are appended; the next step is planned).
    predicted: by `reference` when given (a fixed profile, whatever the scheduler planned with), else the plan's own.
    Wraps the engine's scheduler's next_step and step_done."""

    def __init__(self, eng, reference: CostModel | None = None):
        super().__init__()
        self.gaps: list[tuple[str, float]] = []
        sched = eng.scheduler
        nxt, done = sched.next_step, sched.step_done
        last_end: dict = {}
        shared: dict = {}

        def next_step(worker, now):
            plan = nxt(worker, now)
            if plan is not None:
                shared[worker] = sched.others_busy(worker)
            if plan is None:
                last_end.pop(worker, None)  # idle: the next gap is not overhead
            elif worker in last_end:
                kind, end = last_end.pop(worker)
                self.gaps.append((kind, now - end))
            return plan

        def step_done(worker, plan, now, finished=()):
            predicted = plan.predicted if reference is None else reference.t_plan(plan)
            self.append((plan.kind, now - plan.start, predicted, shared.pop(worker, False)))
            out = done(worker, plan, now, finished)
            last_end[worker] = (plan.kind, now)
            return out

        sched.next_step, sched.step_done = next_step, step_done

    def clear(self):
        super().clear()
        self.gaps.clear()


def step_ratio(seen, kind: str | None = None, shared: bool | None = None, min_steps: int = 1) -> float | None:
    """Median real/predicted step time (of one kind of step, or all; of steps that started beside
    another worker's, alone, or either); None with fewer than min_steps such steps."""
    r = [real / pred for k, real, pred, sh in seen if pred > 0 and kind in (None, k) and shared in (None, sh)]
    return float(np.median(r)) if len(r) >= min_steps else None


def calibrate(seen, min_steps: int = 20) -> tuple[dict, float]:
    """(factors, contention). factors: per kind of step, the median real/predicted of the steps that started
    alone; contention: the median, over steps that started beside another worker's, of real / (predicted x its
    kind's factor). A kind with fewer than min_steps alone steps takes the median real/predicted of the ones that
    started beside another divided by the contention (an inline runs mostly while the P worker is busy: that is
    when it is chosen), or with too few of those as well, all alone steps' median."""
    factors = {k: step_ratio(seen, k, False, min_steps) for k in KINDS}
    known = {k: f for k, f in factors.items() if f is not None}
    shared = contention(seen, known) if known else 1.0
    overall = step_ratio(seen, shared=False, min_steps=min_steps) or step_ratio(seen)
    for k in KINDS:
        if factors[k] is None:
            beside = step_ratio(seen, k, True, min_steps)
            factors[k] = beside / shared if beside is not None else overall
    return factors, shared


def contention(seen, factors: dict) -> float:
    """Median over steps of the kinds in `factors` that started beside another worker's of real / (predicted x
    its kind's factor)."""
    r = [real / (pred * factors[k]) for k, real, pred, sh in seen if sh and pred > 0 and k in factors]
    return float(np.median(r)) if r else 1.0


def mean_gaps_ms(gaps) -> dict:
    return {k: float(np.mean([g for kk, g in gaps if kk == k])) * 1e3 if any(kk == k for kk, _ in gaps) else 0.0
            for k in KINDS}


def scaled_profile(cost: CostModel, factors: dict, gap_ms: dict, shared_factor: float = 1.0) -> dict:
    """The measured profile with each kind of step's time x its factor, plus the host time between steps
    (the steps as the cluster ran them), and the contention factor of steps beside another's."""
    d = cost.scaled(factors).to_dict()
    for sec, const, kind in (("prefill", "c0", "prefill"), ("chunk", "k0", "prefill"), ("decode", "d0", "decode"),
                             ("mixed", "m0", "mixed")):
        if sec in d:
            d[sec][const] += gap_ms[kind]
    text = ", ".join(f"{k} x {factors[k]:.2f} + {gap_ms[k]:.1f} ms after it" for k in factors)
    d["name"] = f"{d['name']} calibrated ({text}; x {shared_factor:.2f} beside another worker's step)"
    d["source"] = (f"{d['source']}; step times scaled ({text}): the median real/predicted time of each kind of "
                   "step that started alone, in calibration runs of the cluster on this machine (two workers "
                   f"sharing its cores); a step that started beside another worker's took x {shared_factor:.2f} "
                   "(median), the contention factor")
    d["contention"] = {"factor": shared_factor}
    return d


def calibrated_profile(raw: CostModel, steps, gaps, transfer: dict) -> tuple[dict, dict, dict]:
    """(profile, factors, host gaps in ms): `raw` scaled to the steps a StepWatch saw (calibrate), plus the mean
    host time after each kind of step (what the time between steps costs throughput) and the handoff measured on
    the cluster's own workers."""
    factors, shared_factor = calibrate(steps)
    gap_ms = mean_gaps_ms(gaps)
    return {**scaled_profile(raw, factors, gap_ms, shared_factor), "transfer": transfer}, factors, gap_ms


def machine_speed(worker, cost: CostModel, batch: int, reps: int = 7) -> dict:
    """How fast the machine runs right now against the profile `cost`, timed alone on one idle worker (as the
    profile was): a decode step of `batch` rows reading half the context bucket each, and a prefill chunk of
    the largest bucket ending at the context bucket; real/predicted each, and `factor`, their geometric mean.
    It writes junk K/V into free pages: call it only while the worker serves nothing."""
    from tropical_jax.cluster.profile import median_ms

    ex = worker.executor
    pages = ex.cfg.context_pages[-1]
    tokens, chunk = pages * ex.cfg.page_size, ex.chunk_sizes[-1]
    with worker.lock:
        decode = median_ms(lambda: ex.time_step(0, batch, pages, tokens // 2), reps) / 1e3
        prefill = median_ms(lambda: ex.time_step(chunk, 0, pages), reps) / 1e3
    d = decode / cost.t_decode(batch, batch * (tokens // 2))
    p = prefill / cost.t_chunk(chunk, tokens - chunk)
    return {"decode": d, "prefill": p, "factor": float(np.sqrt(d * p))}
