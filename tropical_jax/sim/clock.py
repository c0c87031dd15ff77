"""Clocks: the scheduler takes `now` from one of these. The simulator's is virtual; the engine's is wall time."""

from __future__ import annotations

import time


class VirtualClock:
    """Simulated time in seconds; only moves forward."""

    def __init__(self, start: float = 0.0):
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"virtual clock cannot go back from {self._now} to {t}")
        self._now = t


class WallClock:
    """Seconds since construction, from a monotonic clock."""

    def __init__(self):
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0
