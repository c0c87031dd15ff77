"""Running recalibration: keep the cost model the scheduler plans with in step with the machine.

A profile times each step alone on an idle machine. Serving, steps run beside another worker's on
shared cores or links, clocks and neighbours drift, and a profile made on another day is off by
tens of percent. Plans built on it are then wrong in the worst way: slower steps than predicted
eat the slack an inline was granted, and decodes miss their TPOT. The recalibrator watches every
finished step, keeps the ratio of its real time to the profile's prediction over the last `window`
steps of its kind (prefill, decode, mixed), and scales each kind of step by the median ratio. The
median shrugs off a single slow step (a page fault, a GC pause) and follows a change that lasts.

The profile itself stays as it was: TTFT SLOs scaled from an isolated prefill keep meaning the same
thing, and the simulator's executor keeps its own model of what steps really take.
"""

from __future__ import annotations

import bisect
from collections import deque

from tropical_jax.sched.cost_model import CostModel
from tropical_jax.sched.plan import StepPlan

RECALIBRATED = ("decode", "mixed")  # kinds of step whose times follow the machine (see above)
MIN_STEPS = 16     # steps of a kind before its factor moves off 1
REBUILD_DELTA = 0.02  # a factor moving less than this (relative) leaves the planning model as it is


class Recalibrator:
    def __init__(self, profile: CostModel, window: int):
        self.profile = profile
        # A profile without mixed steps derives them from chunks and decodes: they follow the decode factor.
        kinds = [k for k in RECALIBRATED if k != "mixed" or not profile.mixed_derived]
        self.ratios = {k: deque(maxlen=window) for k in kinds}
        self._sorted = {k: [] for k in kinds}  # the same ratios in order, for the median of every step
        self.factors = {k: 1.0 for k in kinds}  # applied to the planning model now

    def observe(self, plan: StepPlan, real: float) -> CostModel | None:
        """Record a finished step that took `real` seconds; a new planning model when a factor moved."""
        kind = plan.kind
        return self.observe_time(kind, self.profile.t_plan(plan), real) if kind in self.ratios else None

    def observe_time(self, kind: str, predicted: float, real: float) -> CostModel | None:
        """observe() for a step of `kind` the profile predicts takes `predicted` seconds."""
        seen = self.ratios.get(kind)
        if seen is None or predicted <= 0 or real <= 0:
            return None
        ordered = self._sorted[kind]
        if len(seen) == seen.maxlen:  # the oldest ratio leaves the window
            del ordered[bisect.bisect_left(ordered, seen[0])]
        seen.append(real / predicted)
        bisect.insort(ordered, seen[-1])
        if len(seen) < MIN_STEPS:
            return None
        factor = self.median(kind)
        if abs(factor / self.factors[kind] - 1) < REBUILD_DELTA:
            return None
        self.factors[kind] = factor
        return self.profile.scaled(self.factors)

    def median(self, kind: str) -> float:
        """statistics.median of the window's ratios (kept sorted: a median at every step is cheap)."""
        ordered = self._sorted[kind]
        n = len(ordered)
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
