"""Fast-forward: run a worker's repeated decode-only steps in one call, as a simulator wants.

Most steps of a simulated run are a worker decoding the same batch again, one token further, while
nothing waits anywhere. One by one, each such step is a step_done (every decode gets its token, a
dispatch pass that finds nothing to do) and a next_step (a page for every decode crossing a page
boundary, the same batch again). `fast_forward` does a stretch of them at once, with the very same
effects: tokens, token times, pages in the same order, recalibration, worker versions. It stops
before the first step that would end a request, preempt a decode, or end at or after `until` (the
caller's next event that could read or change this worker), and leaves that step in flight,
planned by next_step as one by one.

A part of Scheduler (sched/scheduler.py), kept apart so that file stays the calls and the dispatch
loop; it reads and writes the scheduler's own state.
"""

from __future__ import annotations

import math
from typing import Callable

from tropical_jax.sched.cost_model import CostModel
from tropical_jax.sched.plan import StepPlan
from tropical_jax.sched.request import Request


class FastForward:
    def fast_forward(self, worker: str, until: float, decode_ends: Callable[[float, int, int, float, int], list[float]],
                     steps_left: Callable[[list[Request]], int]) -> tuple[StepPlan | None, int]:
        """Run the decode-only step in flight on `worker` and the ones that repeat its batch to their
        ends, as step_done (with nothing finished) and next_step would, while each ends before
        `until` and at most steps_left(batch) of them (the driver's count of steps before a request
        of the batch stops). decode_ends(start, B, T, until, most): the real end times of such
        steps (CostModel.decode_ends).

        The caller guarantees that nothing happens before `until` that reads this worker: no arrival,
        transfer, or handoff from a prefill worker (earliest_handoff); other workers' steps may end
        meanwhile, unless recalibration runs (every step feeds one recalibrator, in order). The step
        in flight may end at the very time of the call (the caller's event for it, not yet done).
        Returns the step then in flight (None: the worker turned idle) and how many steps were
        started; (the step in flight, 0) when a dispatch pass, a timer or shedding may act before it
        ends, or it is not decodes only."""
        with self._lock:
            w = self.mon.workers[worker]
            plan = w.busy
            if plan is None or plan.chunks or w.queue:
                return plan, 0
            batch = plan.decodes
            most = min(steps_left(batch), min([r.max_tokens - r.n_out for r in batch]) - 1)
            if most <= 0 or batch != w.decoding[:self.mon.cfg.max_batch] or not self._quiet(worker):
                return plan, 0
            if self._timer is not None:  # a waiting request turns late, or a queue timeout
                until = min(until, self._timer)
            if self._shed_at:  # shedding looks at the queues again then
                until = min(until, self._shed_at[0][0])
            # The step in flight and those repeating its batch, each reading one more token per decode.
            ends = decode_ends(plan.start, len(batch), plan.decode_tokens, until, most)
            ends = ends[:self._grow_pages(w, batch, len(ends))]
            if not ends:
                return plan, 0
            k = len(ends)
            if self.recalibrator is not None:
                start, per_step = plan.start, self.recalibrator.profile.t_decode
                for i, end in enumerate(ends):
                    self._recalibrated(self.recalibrator.observe_time(
                        "decode", per_step(len(batch), plan.decode_tokens + i * len(batch)), end - start))
                    start = end
            last = ends[-1]
            for r in batch:  # k tokens each
                r.n_out += k
                r.last_token_time = last
            w.busy = None
            w.version += 2 * k - 1  # a touch at each step's end and at each start but the next one
            nxt = self.next_step(worker, last)
            return nxt, k - (nxt is None)

    def earliest_handoff(self, worker: str, step_end: float, cost: CostModel) -> float:
        """No handoff from prefill worker `worker`, whose step in flight ends at step_end, before this
        time, if no request arrives meanwhile and steps take `cost`'s times: step_end when requests
        wait for a place (the pass at its end may queue one here), or when `cost` is not the model its
        queue's remaining times (WorkerState.rem) were predicted with; else each queued prompt still
        needs its remaining prefill, in steps one after another, so none ends before step_end plus the
        shortest of them (inf: none queued; step_end when the step in flight ends a prompt, whose
        remaining time is then 0). That holds because P workers chunk as the remaining times assume:
        a prompt's first segment in a step is min(its rest, the chunk limit) and the prompts packed
        behind it finish there, and a packed step takes no less than its own segment alone (chunk
        times grow with the chunk and its context)."""
        with self._lock:
            w = self.mon.workers[worker]
            if self.waiting or cost is not self.mon.cost or min(cost.chunk.values()) < 0:
                return step_end
            # A margin for rounding: the clock adds the steps one at a time, the sum here is taken first.
            return max(step_end, (step_end + min(w.rem.values(), default=math.inf)) * (1 - 1e-9))

    def _quiet(self, worker: str) -> bool:
        """Would the dispatch passes at the ends of `worker`'s decode steps do nothing until the next
        timer: no handoff or transfer to start (a landing is not yet an event the caller knows), no
        abort, and every request waiting for a place decided as at the last pass because what its
        decision reads stands still: no worker but the prefill workers (Dispatcher.reads; the others
        step meanwhile), whose steps were all in flight then and still are (their ends are events),
        nor the planning model (no recalibration)?"""
        if self._aborting or self._transfers:
            return False
        prefill = self.mon.of_role("P")
        if any(p.handoff for p in prefill):
            return False
        if not self.waiting:
            return True
        others = self.mon.of_role("M", "D", "C")
        return self.recalibrator is None and all(p.busy is not None for p in prefill) \
            and self._passed == tuple(p.version for p in prefill) \
            and not any(self.dispatcher.reads(r, w) for _, r in self.waiting for w in others)

    @staticmethod
    def _grow_pages(w, batch: list[Request], k: int) -> int:
        """Give the decodes of steps 1..k-1 after the step in flight their pages (the same pages, in
        the same order, as next_step would one step at a time). Returns how many steps can end
        before one would have to preempt (k if none): the step that cannot get all its pages is
        left to next_step."""
        page, alloc, tables = w.alloc.page_size, w.alloc, w.tables
        grows = []  # (step, place in the batch): that decode's table needs a page when that step starts
        for place, r in enumerate(batch):
            step = len(tables[r].pages) * page - (r.prompt_len + r.n_out) + 1  # past what the step in flight reads
            while step < k:
                grows.append((step, place))
                step += page
        grows.sort()
        if len(grows) > alloc.num_free:
            k = grows[alloc.num_free][0]
            grows = [g for g in grows if g[0] < k]
        for (_, place), p in zip(grows, alloc.allocate(len(grows))):  # as if allocated one by one
            w.tables[batch[place]].pages.append(p)
        return k
