"""Rate evaluations of a goodput search, run in worker processes ahead of need.

Bisection asks for one rate at a time. With spare cores, the rates it will ask for next (on either
outcome of the current one) run meanwhile, so the search needs fewer rounds of wall time. Its points
and its answer are those of a sequential search: the simulator is deterministic, so a rate's result
is the same whichever process ran it, and results the search never asks for are dropped.
"""

from __future__ import annotations

import multiprocessing
from typing import Callable


class RatePool:
    """`pool(rate)` returns evaluate(rate); `pool.prefetch(rates)` starts rates on free workers.
    evaluate must pickle (a module-level function, or a partial of one). jobs=1: no processes."""

    def __init__(self, evaluate: Callable, jobs: int = 1):
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.evaluate, self.jobs = evaluate, jobs
        # forkserver: workers do not inherit the parent's threads (a progress bar's monitor) or locks.
        self._pool = multiprocessing.get_context("forkserver").Pool(jobs) if jobs > 1 else None
        self._started: dict = {}  # rate -> AsyncResult

    def prefetch(self, rates) -> None:
        """Start the first of `rates` (the one asked for next) and as many of the rest as there are
        idle workers; a result still running for a rate no longer wanted keeps its worker until done."""
        if self._pool is None:
            return
        busy = sum(not r.ready() for r in self._started.values())
        for i, rate in enumerate(rates):
            if rate not in self._started and (i == 0 or busy < self.jobs):
                self._started[rate] = self._pool.apply_async(self.evaluate, (rate,))
                busy += 1

    def __call__(self, rate):
        if self._pool is None:
            return self.evaluate(rate)
        self.prefetch([rate])
        return self._started[rate].get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()  # speculative runs still going are not waited for
            self._pool.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
