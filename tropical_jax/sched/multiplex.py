"""Planning inline prefills on a multiplexing worker (docs/algorithm.md, Rule 2) without letting a decode fall behind.

An inline runs as k mixed steps (decode batch + one prefill chunk) with predicted times ŝ_1..ŝ_k
(cost model x safety factor). A decode r keeps every token on time iff, for each planned step j,
    S_j <= A_r + (j-1)·tpot_r − slack_margin,      S_j = ŝ_1 + ... + ŝ_j,
where A_r is r's slack at the plan's start (a request that starts decoding during the plan, at the
end of step m, has A_r = S_m − (m−1)·tpot_r: one TPOT of slack at its first token). The chunk of
each step is the largest bucket whose mixed step satisfies every r (the "budget" of the step).
Constraints are grouped by TPOT SLO so a step costs O(#distinct SLOs), not O(batch).

The same `pick_chunk` decides the chunk of the next real step (batcher), so plans and runs agree.
The plans rule 2 weighs, of the inlines queued on a worker and of a newcomer, are in
sched/inline_plans.py.
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

    def add_decode(self, a: float, tpot: float, ctx: int) -> None:
        if a < self.min_a.get(tpot, math.inf):
            self.min_a[tpot] = a
        self.num_decodes += 1
        self.decode_tokens += ctx

    def budget(self, margin: float) -> float:
        """Longest next step (s) that keeps every decode's token of that step on time, within the step limits."""
        cap = math.inf if self.limits is None else self.limits.cap(self.t0 + self.elapsed)
        return step_budget(self.min_a, self.steps, self.elapsed, cap, margin)

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
            break
    return ctx


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
