"""The plans rule 2 weighs on a multiplexing worker (docs/algorithm.md, Rule 2), made of the steps
sched/multiplex.py plans.

`InlineFrontier` plans a newcomer of any length on one worker state in O(log steps): while the
prompt has more left than a step can take, every prompt gets the same chunk at that step, so the
plan is one shared sequence of steps, cut at the step where the rest fits. `QueuedPlan` plans the
inlines already queued on a worker, and a short prompt's jump ahead of them (docs/algorithm.md, The short-prompt lane).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from tropical_jax.sched.monitor import Monitor, WorkerState
from tropical_jax.sched.multiplex import (PlanState, bucket_floor, chunk_room, is_short, join, jump_position,
                                          plan_prefill, plan_tokens, start_state)
from tropical_jax.sched.request import Request


def least_time(mon: Monitor, tokens: int, start: int, decodes: int, decode_tokens: int) -> float:
    """A lower bound (s, safety factor included) on any plan's steps for tokens [start, start + tokens)
    of a prompt beside `decodes` or more decodes reading `decode_tokens` or more (CostModel.min_chunked_time),
    less a margin for the rounding of a step-by-step sum: a plan that must end later can be refused unmade."""
    least = mon.cost.min_chunked_time(tokens, start, mon.big_chunk, decodes, decode_tokens)
    return least * mon.cfg.safety_factor * (1 - 1e-9) - 1e-9


class QueuedPlan:
    """w's queued prefills planned in order (non-strict), each joining the batch when done.

    `full`: the state after all of them (where a newcomer's plan starts). For the short-prompt lane
    (docs/algorithm.md): `ahead`, the state after the first `position` entries, which a jumper may not
    overtake; `overtaken`, the rest; `margin`, the smallest deadline margin (deadline - planned
    end) among the overtaken inlines that are on time (inf if none).

    Planned as far as asked (`too_late_for`) and on from there: a newcomer whose deadline the queued
    inlines already pass needs no more of their plan (most of those tried under heavy load)."""

    def __init__(self, mon: Monitor, w: WorkerState, now: float):
        self.mon = mon
        self.position = jump_position(w)
        self._queue = list(w.queue)
        self._starts = [q.prefilled + w.inflight_tokens(q) for q in self._queue]
        self.overtaken = self._queue[self.position:]
        self._st = start_state(mon, w, now)
        self._next, self._ctx = 0, self._starts[0] if self._queue else 0  # where the plan goes on
        self._ahead: PlanState | None = None
        self._margin = math.inf
        self._on_time: list[bool] = []
        self._frontier: InlineFrontier | None = None

    def _plan(self, stop_after: float = math.inf) -> bool:
        """Plan on until every queued prefill is planned (True) or the plan ends after `stop_after`."""
        mon, st = self.mon, self._st
        while self._next < len(self._queue):
            i, q = self._next, self._queue[self._next]
            if i == self.position and self._ahead is None:
                self._ahead = st.copy()
            if stop_after < math.inf and st.t0 + st.elapsed + self._least_time() > stop_after:
                return False  # the rest cannot end by then: no need to plan it step by step (yet)
            self._ctx = plan_tokens(mon, st, q, self._ctx, False, stop_after)
            if self._ctx < q.prefill_target:
                return False
            if i >= self.position:
                m = q.deadline - (st.t0 + st.elapsed)
                self._on_time.append(m >= 0)
                if m >= 0:
                    self._margin = min(self._margin, m)
            join(st, q)
            self._next += 1
            if self._next < len(self._queue):
                self._ctx = self._starts[self._next]
                if st.t0 + st.elapsed > stop_after:  # its last chunk ended past it
                    return False
        return True

    def _least_time(self) -> float:
        """A lower bound (s) on how much longer the plan of the queued prefills not yet planned takes,
        planned on from here: least_time of each from the token its plan starts at, beside the decodes
        the plan has now and those of the prefills before it."""
        st = self._st
        least, decodes, tokens = 0.0, st.num_decodes, st.decode_tokens
        for i in range(self._next, len(self._queue)):
            q, start = self._queue[i], self._ctx if i == self._next else self._starts[i]
            least += least_time(self.mon, q.prefill_target - start, start, decodes, tokens)
            decodes, tokens = decodes + 1, tokens + q.prompt_len  # it joins the batch (join)
        return least

    def _batch_after(self) -> tuple[int, int]:
        """The plan's decode batch (decodes, KV tokens they read) once the queued prefills not yet
        planned have joined it."""
        st, rest = self._st, self._queue[self._next:]
        return st.num_decodes + len(rest), st.decode_tokens + sum(q.prompt_len for q in rest)

    def too_late_for(self, r: Request, deadline: float) -> bool:
        """Is it too late for a plan of r behind the queued prefills to end by `deadline`? (Theirs is
        planned only until `deadline` less the least time that plan takes.)"""
        decodes, tokens = self._batch_after()
        deadline -= least_time(self.mon, r.prefill_target, 0, decodes, tokens)
        return not self._plan(deadline) or self._st.t0 + self._st.elapsed > deadline

    @property
    def full(self) -> PlanState:
        self._plan()
        return self._st

    @property
    def ahead(self) -> PlanState:
        self._plan()
        return self._st if self._ahead is None else self._ahead

    @property
    def margin(self) -> float:
        self._plan()
        return self._margin

    @property
    def on_time(self) -> list[bool]:
        self._plan()
        return self._on_time

    @property
    def frontier(self) -> "InlineFrontier":
        """Newcomers' plans after the queued prefills (made once)."""
        if self._frontier is None:
            self._frontier = InlineFrontier(self.mon, self.full)
        return self._frontier

    def plan_jump(self, r: Request, deadline: float) -> "InlinePlan":
        """r's strict plan ahead of the overtaken inlines: it must end by `deadline`, delay them by at
        most their smallest margin, and (replanned behind it) every one on time must stay on time."""
        mon, a = self.mon, self.ahead
        st = a.copy()
        if not plan_prefill(mon, st, r, 0, deadline):
            return InlinePlan(False, math.inf, -math.inf, st.steps - a.steps, "jump: no plan by the deadline")
        end, left, steps = st.t0 + st.elapsed, st.min_slack_left(), st.steps - a.steps
        if end - (a.t0 + a.elapsed) > self.margin:
            return InlinePlan(False, end, left, steps, f"jump: delays a queued inline past its margin {self.margin:.3f} s")
        join(st, r)
        for q, start, on_time in zip(self.overtaken, self._starts[self.position:], self.on_time):  # replanned behind r
            # One on time must stay so: planned no further than its deadline (past it, r may not jump).
            plan_tokens(mon, st, q, start, False, q.deadline if on_time else math.inf)
            if on_time and st.t0 + st.elapsed > q.deadline:
                return InlinePlan(False, end, left, steps, f"jump: queued inline {q.id} would turn late")
            join(st, q)
        return InlinePlan(True, end, left, steps)


@dataclass
class InlinePlan:
    ok: bool
    end: float              # predicted time of the first token (plan end)
    min_slack_left: float   # smallest decode slack after the plan (inf without decodes)
    steps: int              # steps of the newcomer's plan (or the step that failed)
    reason: str = ""        # why not, if not ok


class InlineFrontier:
    """Strict plans (rule 2) for newcomers of any length on one M worker state (`base`: after the
    inlines already queued). Step j of the shared sequence starts with tokens_done[j-1] tokens done at
    planned_time[j-1]; reach[j-1] is the longest prompt that can finish by step j (a running maximum)."""

    def __init__(self, mon: Monitor, base: PlanState):
        self.mon = mon
        self.base = base
        self.tokens_done = [0]
        self.planned_time = [base.elapsed]
        self.reach: list[int] = []
        self.stuck = False  # a step fits no bucket: the shared sequence ends there

    def _extend(self) -> None:
        mon, b = self.mon, self.base
        sf = mon.cfg.safety_factor
        j = len(self.reach) + 1
        ctx, T = self.tokens_done[-1], b.decode_tokens + (j - 1) * b.num_decodes
        cmax = chunk_room(mon, b, b.steps + j - 1, self.planned_time[-1], ctx, T)
        self.reach.append(max(ctx + cmax, self.reach[-1] if self.reach else 0))
        c = bucket_floor(mon.cfg.chunk_buckets, cmax)
        if c == 0:
            self.stuck = True
            return
        self.tokens_done.append(ctx + c)
        self.planned_time.append(self.planned_time[-1] + mon.cost.t_mixed(c, ctx, b.num_decodes, T) * sf)

    def _least_rest(self, L: int) -> float:
        """Least time (least_time) of the steps a prompt of L tokens needs after those planned so far,
        which it takes too (it is longer than they reach)."""
        b, done = self.base, self.tokens_done[-1]
        return least_time(self.mon, L - done, done, b.num_decodes, b.decode_tokens + len(self.reach) * b.num_decodes)

    def plan(self, r: Request, deadline: float = math.inf, explain: bool = True) -> InlinePlan:
        """r's strict plan after the queued inlines, to end by `deadline`. explain=False: a plan that
        will miss the deadline is given up as soon as that is sure (its end is then not computed)."""
        b = self.base
        if is_short(self.mon, r):  # no slack check: plan it directly
            st = b.copy()
            plan_prefill(self.mon, st, r, 0)
            steps, end, left = st.steps - b.steps, st.t0 + st.elapsed, st.min_slack_left()
        else:
            L = r.prefill_target
            while (not self.reach or self.reach[-1] < L) and not self.stuck:
                if not explain and b.t0 + self.planned_time[-1] + self._least_rest(L) > deadline:
                    return InlinePlan(False, math.inf, -math.inf, len(self.reach), "plan ends after the deadline")
                self._extend()
            if self.reach[-1] < L:
                return InlinePlan(False, math.inf, -math.inf, len(self.reach),
                                  f"no chunk keeps every decode on time (step {len(self.reach)})")
            j = bisect.bisect_left(self.reach, L) + 1
            ctx, T = self.tokens_done[j - 1], b.decode_tokens + (j - 1) * b.num_decodes
            last = self.mon.cost.t_mixed(L - ctx, ctx, b.num_decodes, T) * self.mon.cfg.safety_factor
            s_end = self.planned_time[j - 1] + last
            steps, end = j, b.t0 + s_end
            left = min(a + (b.steps + j) * tp for tp, a in b.min_a.items()) - s_end if b.min_a else math.inf
        if end > deadline:
            return InlinePlan(False, end, left, steps, f"plan ends {end:.3f} > deadline {deadline:.3f}")
        return InlinePlan(True, end, left, steps)
