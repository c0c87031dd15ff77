"""How long a multiplexing worker's steps may last beyond what its decodes' slack allows
(docs/algorithm.md, Step limits): two guards, each a knob.

- `handoff_guard`: a request a prefill worker finishes lands on the M worker mid-step, and gets its
  second token only after that step, in a step of its own: both must fit in its TPOT from its first
  token. Landing times are predicted from each P worker's queue in its local order, so a step that
  ends before the next request lands owes it nothing.
- `arrival_guard`: a new prompt waits for the first worker to end its step. While no prefill worker
  will be free in time, the M worker keeps its step within the shortest first-token wait among recent
  arrivals (their TTFT SLO less their own prefill), so such a prompt still finds a worker in time.

Both bound a step by when it starts, so the same limits serve the real next step (batcher) and
every step of a plan (multiplex).
"""

from __future__ import annotations

import bisect
import math

from tropical_jax.sched.monitor import Monitor, WorkerState
from tropical_jax.sched.request import Request


class StepLimits:
    def __init__(self, landings: list[tuple[float, float]], prefill_busy: list[tuple[float, float]], wait: float):
        """landings: (when a request lands, latest end of the step it lands in); prefill_busy: per P
        worker (its step in flight ends, its queue ends); wait: the shortest first-token wait to keep."""
        landings.sort()
        self.lands = [t for t, _ in landings]
        self.ends = [e for _, e in landings]
        for i in range(len(self.ends) - 2, -1, -1):  # a step spanning several landings ends by the earliest end
            self.ends[i] = min(self.ends[i], self.ends[i + 1])
        self.prefill_busy = prefill_busy
        self.wait = wait

    def cap(self, start: float) -> float:
        """Longest step (s, safety factor included) starting at `start` (inf: no limit)."""
        return min(self.caps(start))

    def caps(self, start: float) -> tuple[float, float]:
        """The handoff guard's and the arrival guard's longest step starting at `start`.

        Every step a plan weighs asks this (hundreds of thousands of times a simulated run), hence
        the arrival cap written out here rather than in a helper."""
        lands = self.lands
        handoff = self.ends[bisect.bisect_right(lands, start)] - start if lands and start < lands[-1] else math.inf
        wait = self.wait
        if wait == math.inf:
            return handoff, math.inf
        covered = start  # a prompt arriving by then finds a P worker free in time
        for step_end, queue_end in self.prefill_busy:
            if start >= queue_end or (step_end <= start + wait and queue_end <= step_end):
                return handoff, math.inf  # that P worker is idle then, or becomes idle in time
            if start < step_end <= start + wait and step_end > covered:
                covered = step_end  # its next step is long: it covers until this one ends
        return handoff, covered + wait - start


def step_limits(mon: Monitor, w: WorkerState, now: float) -> StepLimits | None:
    """The limits on M worker w's steps from now on; None if there are none (both guards off, another
    role, no handoff to come and no short prompt among recent arrivals)."""
    cfg = mon.cfg
    if w.role != "M" or not (cfg.handoff_guard or cfg.arrival_guard):
        return None
    sf, cost = cfg.safety_factor, mon.cost
    coming: list[tuple[Request, float, float]] = []  # (request, its first token, its earliest first token)
    prefill_busy = []
    for p in mon.of_role("P"):
        # The queue finishes in its local order, after the step in flight: predicted with the safety
        # factor for when each request lands, without it for its earliest first token.
        late = p.free_at(now, sf)
        if cfg.arrival_guard:
            prefill_busy.append((late, late + sf * sum(p.rem.values())))
        if not cfg.handoff_guard:
            continue
        early = p.free_at(now)
        for r in p.handoff:  # prefilled, waiting for a destination with room: may land at once
            coming.append((r, now, r.first_token_time))
        for _, rem, r in mon.local_order(p):
            late, early = late + rem * sf, early + rem
            coming.append((r, late, early))
    landings: list[tuple[float, float]] = []
    if coming:  # w's batch is read only then: once per step of w, it is worth sparing
        batch, load = len(w.decoding) + len(w.incoming) + 1, w.decode_load() + 1
        for r, first_token, earliest in coming:
            lands = first_token + cost.t_transfer(r.prompt_len) * sf
            end = earliest + r.tpot_slo - cost.t_decode(batch, load + r.prompt_len) * sf
            if end >= lands:  # else its second token is late whatever w does
                landings.append((lands, end))
    wait = mon.shortest_wait() if cfg.arrival_guard else math.inf
    return StepLimits(landings, prefill_busy, wait) if landings or wait < math.inf else None
