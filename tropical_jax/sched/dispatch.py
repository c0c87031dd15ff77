"""Dispatch: where does a waiting request's prefill run (docs/algorithm.md, Dispatch).

`TropicalDispatcher` applies rules 1-3 to one waiting request at a time; `BaselineDispatcher`
places every request at once by least outstanding work (colocated, chunked, disaggregated).
Dispatchers only read the monitor and return a `Decision`; the scheduler applies it. Each worker's
queue simulation (rule 1) or inline frontier (rule 2) is computed once per state of that worker
(WorkerState.version, and the time while the worker is idle) and shared by every waiting request.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

from tropical_jax.sched.monitor import Monitor, WorkerState, local_key
from tropical_jax.sched.inline_plans import QueuedPlan
from tropical_jax.sched.request import PATH_COLOCATED, PATH_INLINE, PATH_PREFILL, Request

WAIT = "wait"


@dataclass
class Decision:
    action: str             # PATH_PREFILL | PATH_INLINE | PATH_COLOCATED | WAIT
    worker: str | None
    reason: str = ""
    late: bool = False              # placed best effort: its own deadline was out of reach
    position: int | None = None     # inline jumping queued inlines: its place in the worker's queue


class _PQueue:
    """A P worker's queue in its local order, for inserting a newcomer in O(log n) (rule 1)."""

    def __init__(self, mon: Monitor, w: WorkerState, now: float):
        sf = mon.cfg.safety_factor
        # The chunk in flight finishes first: its predicted time x safety factor, from its start.
        self.t0 = w.free_at(now, sf)
        order = mon.local_order(w)
        self.keys = [k for k, _, _ in order]
        self.prefix = prefix = [0.0, *itertools.accumulate(rem * sf for _, rem, _ in order)]
        # margin[p]: how much later every protected request at position >= p may finish. A request
        # already late in the current order cannot be saved and is not protected (docs/algorithm.md, Rule 1); nor, but
        # for a late newcomer, one shorter than protect_tokens (`margin_all` protects every one).
        n, least = len(order), mon.cfg.protect_tokens
        self.margin, self.margin_all = [math.inf] * (n + 1), [math.inf] * (n + 1)
        kept = kept_all = math.inf  # the running minima, from the back of the queue
        for i in range(n - 1, -1, -1):
            r = order[i][2]
            m = r.deadline - (self.t0 + prefix[i + 1])
            if m >= 0:
                kept_all = m if m < kept_all else kept_all
                if least is not None and r.prompt_len >= least:
                    kept = m if m < kept else kept
            self.margin_all[i], self.margin[i] = kept_all, kept
        self.outstanding = self.t0 - now + self.prefix[-1]

    def insert(self, key: tuple, x: float, late: bool = False) -> tuple[bool, float]:
        """(the protected queued requests all still on time, newcomer's predicted finish) for a newcomer
        taking x seconds; a late newcomer may make no queued request late."""
        p = bisect.bisect_left(self.keys, key)
        return x <= (self.margin_all if late else self.margin)[p], self.t0 + self.prefix[p] + x


class TropicalDispatcher:
    def __init__(self, mon: Monitor):
        self.mon = mon
        self._cache: dict[str, tuple[tuple, object]] = {}
        self._committed: dict[str, tuple[tuple, int, int]] = {}  # per M/D worker: decode_room's batch
        self._now = None

    def begin_pass(self, now: float) -> None:
        self._now = now

    def _state_key(self, w: WorkerState) -> tuple:
        # Plans start when w is free (start_state, _PQueue): now if idle or if its step in flight has
        # overrun its predicted end, so then they also depend on the time. An M worker's step limits
        # (sched/step_limits.py) read recent arrivals and when each P worker is free, with and without
        # the safety factor, and its prefilled requests waiting to be handed over land "now".
        now, sf = self._now, self.mon.cfg.safety_factor
        key = (w.version, w.free_at(now, sf))
        if w.role == "M" and (self.mon.cfg.handoff_guard or self.mon.cfg.arrival_guard):
            key += (self.mon.shortest_wait(), *((p.version, p.free_at(now, sf), p.free_at(now),
                                                 now if p.handoff else None) for p in self.mon.of_role("P")))
        return key

    def _plans(self, w: WorkerState, make):
        """make(mon, w, now), made again only when w's state key has changed (one per worker)."""
        key = self._state_key(w)
        hit = self._cache.get(w.name)
        if hit is None or hit[0] != key:
            hit = self._cache[w.name] = (key, make(self.mon, w, self._now))
        return hit[1]

    def _pq(self, w: WorkerState) -> _PQueue:
        return self._plans(w, _PQueue)

    def _queued(self, w: WorkerState) -> QueuedPlan:
        return self._plans(w, QueuedPlan)

    def reads(self, r: Request, w: WorkerState) -> bool:
        """May deciding r read w's state? Rule 2 refuses a prompt over max_multiplex_tokens before it
        reads an M worker, unless decode_commit_watermark has rule 1 read every M worker's batch;
        rule 1 reads every prefill worker. Fast-forward (sched/fast_forward.py) relies on this: a rule
        that starts reading another worker must say so here."""
        cfg = self.mon.cfg
        cap = cfg.max_multiplex_tokens
        return not (w.role == "M" and cap is not None and r.prompt_len > cap and cfg.decode_commit_watermark is None)

    def late_at(self, r: Request) -> float:
        """From this time on no worker can serve r by its deadline: even an idle P worker is too late."""
        return r.deadline - self.mon.iso[r] * self.mon.cfg.safety_factor

    def is_late(self, r: Request, now: float) -> bool:
        return now >= self.late_at(r)

    def decode_room(self, w: WorkerState, r: Request) -> bool:
        """Would r's decode keep the step of w's batch within decode_commit_watermark x its TPOT, counting
        every request placed to decode on w: its batch, its queued inlines, and its share of what the
        prefill workers hold (the decodes that end meanwhile are not known, so not counted). An empty
        batch always has room."""
        mon = self.mon
        x = mon.cfg.decode_commit_watermark
        if x is None:
            return True
        key = (w.version, *(p.version for p in mon.of_role("P")))
        hit = self._committed.get(w.name)
        if hit is None or hit[0] != key:
            pending = [q for p in mon.of_role("P") for q in (*p.queue, *p.handoff)]
            share = 1 / len(mon.of_role("M", "D"))
            n = len(w.decoding) + len(w.incoming) + len(w.queue) + share * len(pending)
            tokens = w.decode_load() + sum(q.prompt_len for q in w.queue) + share * sum(q.prompt_len for q in pending)
            hit = self._committed[w.name] = (key, round(n + 1), int(tokens + n + 1))
        _, n, tokens = hit
        if n == 1:  # an empty batch takes anyone: waiting would not make its step shorter
            return True
        return mon.cost.t_decode(n, tokens + r.prompt_len) * mon.cfg.safety_factor <= x * r.tpot_slo

    # ---------------- rule 1 ----------------
    def rule1(self, r: Request, late: bool, why: list | None, spare_all: bool = False) -> list[tuple[float, float, str]]:
        """Eligible P workers as (outstanding prefill time, first token, name); spare_all: making any
        queued request late bars a worker, whatever protect_tokens says."""
        mon = self.mon
        iso = mon.iso[r]
        key = local_key(mon, r, iso)
        x = iso * mon.cfg.safety_factor
        out = []
        # Without a decode_commit_watermark every batch has room: the loop is spared (once per decision).
        watermark = mon.cfg.decode_commit_watermark
        if watermark is not None and not any(self.decode_room(m, r) for m in mon.of_role("M", "D")):
            why is not None and why.append("no decode batch has room for it")
            return out
        for w in mon.of_role("P"):
            q = self._pq(w)
            ok, finish = q.insert(key, x, late or spare_all)
            if not ok:
                why is not None and why.append(f"{w.name}: would make a queued request late")
            elif not late and finish > r.deadline:
                why is not None and why.append(f"{w.name}: first token {finish:.3f} > deadline {r.deadline:.3f}")
            else:
                out.append((q.outstanding, finish, w.name))
        return out

    # ---------------- rule 2 ----------------
    def rule2(self, r: Request, late: bool, why: list | None, beat: float = math.inf
              ) -> list[tuple[float, float, str, int | None]]:
        """Eligible M workers as (min slack left after the plan, first token, name, queue position if
        it jumps the queued inlines, else None). A plan behind the queued inlines that would end after
        `beat` (another worker's first token) need not be made: it is left out as if too late."""
        mon, cfg = self.mon, self.mon.cfg
        L = r.prompt_len
        out = []
        for w in mon.of_role("M"):
            if cfg.max_multiplex_tokens is not None and L > cfg.max_multiplex_tokens:
                why is not None and why.append(f"{w.name}: prompt {L} > max_multiplex_tokens {cfg.max_multiplex_tokens}")
                continue
            if not w.can_admit(L + 1, cfg.memory_watermark):
                why is not None and why.append(f"{w.name}: KV memory over the {cfg.memory_watermark:.0%} watermark")
                continue
            if not self.decode_room(w, r):
                why is not None and why.append(f"{w.name}: no room in its decode batch")
                continue
            queued = self._queued(w)
            deadline = math.inf if late else r.deadline
            cut = min(deadline, beat)
            jump = cfg.jump_tokens is not None and L <= cfg.jump_tokens and bool(queued.overtaken)
            if why is None and not jump and queued.too_late_for(r, cut):
                continue  # no plan behind the queued inlines ends by then (nor need the rest of theirs be made)
            base = queued.full
            tpot = min([r.tpot_slo, *base.min_a])
            step = mon.cost.t_decode(base.num_decodes + 1, base.decode_tokens + L + 1) * cfg.safety_factor
            if step > cfg.decode_latency_watermark * tpot:
                why is not None and why.append(
                    f"{w.name}: decode step {step * 1e3:.1f} ms > {cfg.decode_latency_watermark} x TPOT {tpot * 1e3:.0f} ms")
                continue
            if jump:
                p = queued.plan_jump(r, deadline)
                if p.ok:
                    out.append((p.min_slack_left, p.end, w.name, queued.position))
                    continue
                why is not None and why.append(f"{w.name}: {p.reason}")
            p = queued.frontier.plan(r, cut, explain=why is not None)
            if not p.ok:
                why is not None and why.append(f"{w.name}: {p.reason}")
                continue
            out.append((p.min_slack_left, p.end, w.name, None))
        return out

    # ---------------- rules 1-3 ----------------
    def decide(self, r: Request, now: float, explain: bool) -> Decision:
        why = [] if explain else None
        late = self.is_late(r, now)
        if not late:
            # harmless_first: first every queued prompt is protected; only if that places r nowhere,
            # rule 1 again with protect_tokens's protection alone (rule 2 makes no queued prompt late).
            cfg = self.mon.cfg
            spare = cfg.harmless_first and cfg.protect_tokens != 0
            d = self._choose(r, why, spare)
            if d is None and spare:
                d = self._p_choice(r, why)
            return d or Decision(WAIT, None, "; ".join(why) if why else "")
        # Best effort: wherever the first token comes soonest without making anyone else late.
        cands = [(f, n, PATH_PREFILL, None) for _, f, n in self.rule1(r, True, why)]
        cands += [(f, n, PATH_INLINE, pos) for _, f, n, pos in self.rule2(r, True, why)]
        if not cands:
            return Decision(WAIT, None, "late; " + "; ".join(why) if why else "", late=True)
        f, name, path, pos = min(cands, key=lambda c: c[:3])
        return Decision(path, name, f"late, best effort: first token {f:.3f} (deadline {r.deadline:.3f})" if explain else "",
                        late=True, position=pos)

    def _choose(self, r: Request, why, spare_all: bool) -> Decision | None:
        """Rules 1 and 2 in `prefer` order, or for prefer=finish (docs/algorithm.md, Earliest first token)
        the best P and the best M compared by predicted first token, ties to P (no decode is stalled)."""
        prefer = self.mon.cfg.prefer
        if prefer == "prefill":
            return self._p_choice(r, why, spare_all) or self._m_choice(r, why)
        if prefer == "multiplex":
            return self._m_choice(r, why) or self._p_choice(r, why, spare_all)
        p = self._p_choice(r, why, spare_all)
        p_end = math.inf if p is None else min(f for _, f, n in self._last_p if n == p.worker)
        # One M worker wins only by a plan that ends before p's first token: planning past it is spared.
        # (With several, the one with most slack is chosen first, whatever its end: each is planned up
        # to r's deadline, as rule 2 does, not up to p's first token.)
        m = self._m_choice(r, why, p_end if why is None and len(self.mon.of_role("M")) == 1 else math.inf)
        if p is None or m is None:
            return p or m
        m_end = next(f for _, f, n, _ in self._last_m if n == m.worker)
        return m if m_end < p_end else p

    def _p_choice(self, r: Request, why, spare_all: bool = False) -> Decision | None:
        el = self._last_p = self.rule1(r, False, why, spare_all)
        if not el:
            return None
        out, f, name = min(el)
        return Decision(PATH_PREFILL, name, f"rule 1: first token {f:.3f} <= deadline {r.deadline:.3f}, "
                        f"outstanding {out:.3f} s" if why is not None else "")

    def _m_choice(self, r: Request, why, beat: float = math.inf) -> Decision | None:
        el = self._last_m = self.rule2(r, False, why, beat)
        if not el:
            return None
        # Largest minimum slack left; ties to the earlier plan end, then the worker name.
        left, f, name, pos = min(el, key=lambda e: (-e[0], e[1], e[2]))
        jump = "" if pos is None else f", jumps the queued inlines to position {pos}"
        return Decision(PATH_INLINE, name, f"rule 2: plan ends {f:.3f} <= deadline {r.deadline:.3f}, "
                        f"min slack left {left:.3f} s{jump}" if why is not None else "", position=pos)


class BaselineDispatcher:
    """colocated / chunked: the C worker with least outstanding work; disaggregated: the P worker with
    least outstanding prefill time. Requests never wait in the dispatcher (they queue at the worker)."""

    def __init__(self, mon: Monitor):
        self.mon = mon
        self.role, self.path = ("P", PATH_PREFILL) if mon.cfg.policy == "disaggregated" else ("C", PATH_COLOCATED)

    def begin_pass(self, now: float) -> None:
        pass

    def reads(self, r: Request, w: WorkerState) -> bool:
        return True  # requests never wait here

    def decide(self, r: Request, now: float, explain: bool) -> Decision:
        w = min(self.mon.of_role(self.role), key=lambda w: (w.outstanding_prefill(now), w.decode_load(), w.name))
        return Decision(self.path, w.name, "least outstanding work" if explain else "")


def make_dispatcher(mon: Monitor):
    return TropicalDispatcher(mon) if mon.cfg.multiplexing else BaselineDispatcher(mon)
