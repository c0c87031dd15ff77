"""Planning inline prefills on a multiplexing worker (docs/algorithm.md, Rule 2) without letting a decode fall behind.

An inline runs as k mixed steps (decode batch + one prefill chunk) with predicted times ŝ_1..ŝ_k
(cost model x safety factor). A decode r keeps every token on time iff, for each planned step j,
    S_j <= A_r + (j-1)·tpot_r − slack_margin,      S_j = ŝ_1 + ... + ŝ_j,
where A_r is r's slack at the plan's start (a request that starts decoding during the plan, at the
end of step m, has A_r = S_m − (m−1)·tpot_r: one TPOT of slack at its first token). The chunk of
each step is the largest bucket whose mixed step satisfies every r (the "budget" of the step).
Constraints are grouped by TPOT SLO so a step costs O(#distinct SLOs), not O(batch).

The same `pick_chunk` decides the chunk of the next real step (batcher), so plans and runs agree.
`InlineFrontier` plans a newcomer of any length on one worker state in O(log steps): while the
prompt has more left than a step can take, every prompt gets the same chunk at that step, so the
plan is one shared sequence of steps, cut at the step where the rest fits. `QueuedPlan` plans the
inlines already queued on a worker, and a short prompt's jump ahead of them (docs/algorithm.md, The short-prompt lane).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from tropical_jax.sched.monitor import Monitor, WorkerState, decode_ctx, slack
from tropical_jax.sched.request import Request
from tropical_jax.sched.step_limits import StepLimits, step_limits

# A queued inline that fits no chunk plans a decode-only step (banking slack); after this many in a
# row the estimate assumes the smallest chunk runs, so a plan always ends.
_MAX_IDLE_STEPS = 64


@dataclass
class PlanState:
    """A plan of mixed steps on one worker so far: what its decodes read and the slack they keep
    (min_a: the smallest A_r per TPOT SLO, in the notation above)."""

    t0: float                     # when the plan's first step starts (the step in flight ends)
    num_decodes: int = 0          # decodes in each planned step (in-transit ones included)
    decode_tokens: int = 0        # KV tokens they read
    elapsed: float = 0.0          # planned time so far, S_j above (safety factor included)
    steps: int = 0                # steps planned so far, j above
    min_a: dict[float, float] = field(default_factory=dict)  # tpot -> min A_r over decodes with that SLO
    limits: StepLimits | None = None  # how long a step may be, by when it starts (sched/step_limits.py)
    # Index of the bucket the last pick_chunk chose: where the next search starts (a prompt's steps
    # mostly take the bucket of the step before; None: the middle one). Any start gives the same answer.
    bucket_hint: int | None = None

    def copy(self) -> "PlanState":
        return PlanState(self.t0, self.num_decodes, self.decode_tokens, self.elapsed, self.steps, dict(self.min_a),
                         self.limits, self.bucket_hint)

    def cap(self, elapsed: float) -> float:
        """Longest step starting `elapsed` seconds into the plan that the step limits allow."""
        return math.inf if self.limits is None else self.limits.cap(self.t0 + elapsed)

    def add_decode(self, a: float, tpot: float, ctx: int) -> None:
        if a < self.min_a.get(tpot, math.inf):
            self.min_a[tpot] = a
        self.num_decodes += 1
        self.decode_tokens += ctx

    def budget(self, margin: float) -> float:
        """Longest next step (s) that keeps every decode's token of that step on time (and the cap)."""
        return step_budget(self.min_a, self.steps, self.elapsed, self.cap(self.elapsed), margin)

    def min_slack_left(self) -> float:
        """Smallest slack of any decode after the steps planned so far (inf without decodes)."""
        if not self.min_a:
            return math.inf
        return min(a + self.steps * tp for tp, a in self.min_a.items()) - self.elapsed

    def advance(self, seconds: float) -> None:
        self.elapsed += seconds
        self.steps += 1
        self.decode_tokens += self.num_decodes  # every decode cached one more token


def step_budget(min_a: dict[float, float], steps: int, elapsed: float, cap: float, margin: float) -> float:
    """PlanState.budget of a plan with `steps` steps taking `elapsed` seconds so far (j and S_j above)."""
    if not min_a:
        return cap
    least = math.inf
    for tp, a in min_a.items():
        v = a + steps * tp  # A_r + (next step - 1)·tpot
        if v < least:
            least = v
    least = least - margin - elapsed
    return cap if cap < least else least


def step_room(mon: Monitor, st: PlanState, steps: int, elapsed: float) -> tuple[float, float]:
    """Longest step (s, before the safety factor) that may start `elapsed` into plan st as its step
    number `steps` + 1: within the tightest decode's slack and the step limits. Second, the longest
    without the arrival guard (the same unless that guard binds): the arrival guard never refuses the
    smallest bucket the rest allows, or an inline could wait for as long as a P worker stays busy."""
    cfg, limits = mon.cfg, st.limits
    handoff, arrival = (math.inf, math.inf) if limits is None else limits.caps(st.t0 + elapsed)
    budget = step_budget(st.min_a, steps, elapsed, handoff, cfg.slack_margin)
    sf = cfg.safety_factor
    return (arrival / sf, budget / sf) if arrival < budget else (budget / sf, budget / sf)


def chunk_room(mon: Monitor, st: PlanState, steps: int, elapsed: float, ctx: int, decode_tokens: int) -> int:
    """Largest chunk (tokens, at most the largest bucket) a step of plan st may carry when it starts
    `elapsed` into the plan as its step number `steps` + 1 (step_room)."""
    room, without_arrival = step_room(mon, st, steps, elapsed)
    max_chunk, top, decodes = mon.cost.max_chunk, mon.big_chunk, st.num_decodes
    cmax = max_chunk(ctx, decodes, decode_tokens, room, top)
    smallest = mon.cfg.chunk_buckets[0]
    if cmax < smallest and without_arrival > room:
        cmax = min(smallest, max_chunk(ctx, decodes, decode_tokens, without_arrival, top))
    return cmax


def bucket_floor(buckets: tuple[int, ...], n: int) -> int:
    """Largest bucket <= n (0 if none)."""
    i = bisect.bisect_right(buckets, n)
    return buckets[i - 1] if i else 0


def pick_chunk(mon: Monitor, st: PlanState, remaining: int, ctx: int, check_slack: bool) -> tuple[int, float]:
    """The rest of the prompt if it fits the step's room (and the largest bucket), else the largest
    bucket that fits: bucket_floor(chunk_room) with the rest of the prompt allowed too. Returns
    (chunk tokens, predicted step time with safety factor); (0, 0.0) when none fits.

    Plans call this for every step (hundreds of thousands of times a simulated run): rather than
    solve for the largest chunk, it tries buckets from the one the step before chose, whose time it
    needs anyway (t_mixed grows with the chunk, so the first that fits from above is the largest).
    """
    t_mixed, sf = mon.cost.t_mixed, mon.cfg.safety_factor
    decodes, tokens = st.num_decodes, st.decode_tokens
    if not check_slack:
        c = min(remaining, mon.big_chunk)
        return (c, t_mixed(c, ctx, decodes, tokens) * sf) if c > 0 else (0, 0.0)
    room, without_arrival = step_room(mon, st, st.steps, st.elapsed)
    buckets = mon.cfg.chunk_buckets
    i = st.bucket_hint  # becomes the largest bucket that fits (-1: none), t its time
    if i is None:
        i = (len(buckets) - 1) // 2
    t = t_mixed(buckets[i], ctx, decodes, tokens)
    if t <= room:
        while i + 1 < len(buckets):
            up = t_mixed(buckets[i + 1], ctx, decodes, tokens)
            if up > room:
                break
            i, t = i + 1, up
    else:
        i -= 1
        while i >= 0:
            t = t_mixed(buckets[i], ctx, decodes, tokens)
            if t <= room:
                break
            i -= 1
    st.bucket_hint = i if i > 0 else 0
    if i >= 0 and remaining <= buckets[i]:
        return (remaining, t_mixed(remaining, ctx, decodes, tokens) * sf) if remaining > 0 else (0, 0.0)
    if i + 1 < len(buckets) and remaining < buckets[i + 1]:  # the rest may fit between two buckets
        rest = t_mixed(remaining, ctx, decodes, tokens)
        if rest <= room:
            return remaining, rest * sf
    if i >= 0:
        return buckets[i], t * sf
    if without_arrival > room:  # the arrival guard alone refuses every bucket: the smallest may still go
        for c in (remaining, buckets[0]):
            if c <= buckets[0]:
                t = t_mixed(c, ctx, decodes, tokens)
                if t <= without_arrival:
                    return c, t * sf
    return 0, 0.0


def is_short(mon: Monitor, r: Request) -> bool:
    """Short prompts skip the slack check (docs/algorithm.md, Rule 2): their stall is below noise."""
    return r.prefill_target < mon.cfg.short_prompt_tokens


def start_state(mon: Monitor, w: WorkerState, now: float) -> PlanState:
    """Decode constraints on w when its step in flight ends (decodes in that step get their token then).

    A prefill whose last chunk is in flight is still in w.queue; queued_state joins it to the batch.
    """
    st = PlanState(t0=w.free_at(now, mon.cfg.safety_factor), limits=step_limits(mon, w, now))
    in_flight = w.busy.decodes if w.busy is not None else ()
    in_step = {id(r) for r in in_flight}
    for r in w.decoding:
        n = r.n_out + (1 if id(r) in in_step else 0)
        st.add_decode(r.first_token_time + r.tpot_slo * n - st.t0, r.tpot_slo, r.prompt_len + n)
    for r in w.incoming:
        st.add_decode(slack(r, st.t0), r.tpot_slo, decode_ctx(r))
    return st


def plan_prefill(mon: Monitor, st: PlanState, r: Request, start: int, deadline: float = math.inf) -> bool:
    """Plan r's prefill from token `start` onto st (mutated), strictly: every step must carry a chunk
    that keeps every decode on time, and the plan must end by `deadline`; returns False as soon as it
    cannot. `join` r afterwards if it is to decode. (Inlines already admitted are planned by
    plan_tokens, non-strict.)"""
    return plan_tokens(mon, st, r, start, True, deadline) == r.prefill_target and st.t0 + st.elapsed <= deadline


def plan_tokens(mon: Monitor, st: PlanState, r: Request, start: int, strict: bool, stop_after: float) -> int:
    """plan_prefill's steps, stopping once the plan ends after `stop_after` (checked after each chunk,
    so a non-strict plan may resume from there) or, strict, at a step that fits no chunk. Returns the
    tokens of r planned (r.prefill_target when all are)."""
    target = r.prefill_target
    check = not is_short(mon, r)
    sf = mon.cfg.safety_factor
    ctx, idle = start, 0
    while ctx < target:
        c, s = pick_chunk(mon, st, target - ctx, ctx, check)
        if c == 0:
            if strict:
                return ctx
            idle += 1
            if idle > _MAX_IDLE_STEPS or st.num_decodes == 0:
                c = min(mon.cfg.chunk_buckets[0], target - ctx)
                s = mon.cost.t_mixed(c, ctx, st.num_decodes, st.decode_tokens) * sf
            else:
                st.advance(mon.cost.t_decode(st.num_decodes, st.decode_tokens) * sf)
                continue
        idle = 0
        st.advance(s)
        ctx += c
        if st.t0 + st.elapsed > stop_after:
            return ctx
    return ctx


def least_time(mon: Monitor, tokens: int, start: int, decodes: int, decode_tokens: int) -> float:
    """A lower bound (s, safety factor included) on any plan's steps for tokens [start, start + tokens)
    of a prompt beside `decodes` or more decodes reading `decode_tokens` or more (CostModel.min_chunked_time),
    less a margin for the rounding of a step-by-step sum: a plan that must end later can be refused unmade."""
    least = mon.cost.min_chunked_time(tokens, start, mon.big_chunk, decodes, decode_tokens)
    return least * mon.cfg.safety_factor * (1 - 1e-9) - 1e-9


def join(st: PlanState, r: Request) -> None:
    """r, whose prefill the plan just finished, decodes from now on: a new request has one TPOT of
    slack at its first token; a recompute keeps the slack it had (its tokens were due all along)."""
    if r.recompute_len:
        a = r.first_token_time + r.tpot_slo * r.n_out - st.t0 - st.steps * r.tpot_slo
        st.add_decode(a, r.tpot_slo, decode_ctx(r))
    else:
        st.add_decode(st.elapsed - (st.steps - 1) * r.tpot_slo, r.tpot_slo, r.prompt_len + 1)


def jump_position(w: WorkerState) -> int:
    """Where a jumper joins w's queue: after recomputes and earlier jumpers, ahead of the other inlines,
    started ones too (a started inline resumes from its cached tokens, as on a P worker)."""
    k = 0
    for q in w.queue:
        if not (q.recompute_len or q.jumped):
            break
        k += 1
    return k


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
        self.starts = self._starts[self.position:]
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
            if stop_after < math.inf and st.t0 + st.elapsed + self._least_time(self._rest()) > stop_after:
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

    def _rest(self) -> list[tuple[Request, int]]:
        """The queued prefills not yet planned, each with the token its plan starts from."""
        return [(self._queue[i], self._ctx if i == self._next else self._starts[i])
                for i in range(self._next, len(self._queue))]

    def _least_time(self, prefills: list[tuple[Request, int]]) -> float:
        """A lower bound (s) on how much longer the plan of these prefills ((request, token its plan
        starts from), in order) takes, planned on from here: least_time of each, beside the decodes the
        plan has now and those of the prefills before it."""
        st = self._st
        least, decodes, tokens = 0.0, st.num_decodes, st.decode_tokens
        for q, start in prefills:
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
        for q, start, on_time in zip(self.overtaken, self.starts, self.on_time):  # replanned behind r
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
