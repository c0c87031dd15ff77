"""The monitor: per-worker state the dispatcher and the batchers read.

Per worker: its local prefill queue, the step in flight and its predicted end, the decode batch,
requests whose KV is in transit to it, and its KV pages (a PageAllocator and one BlockTable per
request). Banked TPOT slack is a function of a request and the time (docs/algorithm.md, Banked slack).
"""

from __future__ import annotations

import math
from collections import deque

from tropical_jax.kv.allocator import BlockTable, PageAllocator
from tropical_jax.sched.config import PolicyConfig, WorkerSpec
from tropical_jax.sched.cost_model import CostModel
from tropical_jax.sched.plan import StepPlan
from tropical_jax.sched.request import Request

RECENT_ARRIVALS = 32  # how many latest arrivals say which first-token waits are likely


def slack(r: Request, now: float) -> float:
    """Time left before r's next token is due if r is to stay on track (docs/algorithm.md, Banked slack)."""
    return r.first_token_time + r.tpot_slo * r.n_out - now


def min_slack(requests: list[Request], now: float) -> dict[float, float]:
    """TPOT SLO -> the smallest slack at `now` of the requests with that SLO (PlanState.min_a)."""
    out: dict[float, float] = {}
    for r in requests:
        tpot = r.tpot_slo
        a = r.first_token_time + tpot * r.n_out - now  # slack(r, now), inlined: once per decode per step
        if a < out.get(tpot, math.inf):
            out[tpot] = a
    return out


def decode_ctx(r: Request) -> int:
    """KV tokens a decode step of r reads (the cached ones plus the token it feeds)."""
    return r.prompt_len + r.n_out


def local_key(mon: "Monitor", r: Request, rem: float) -> tuple:
    """Order of a worker's local prefill queue and of the dispatcher's waiting list (rem: predicted
    remaining prefill time, used by sjf)."""
    order = mon.cfg.queue_order
    if order == "sjf":
        return (rem, r.arrival, mon.seq[r])
    if order == "edf":
        return (r.deadline, r.arrival, mon.seq[r])
    return (r.arrival, mon.seq[r])


class WorkerState:
    def __init__(self, spec: WorkerSpec, num_pages: int, page_size: int):
        self.name = spec.name
        self.role = spec.role
        self.spec = spec
        self.alloc = PageAllocator(num_pages, page_size)
        self.tables: dict[Request, BlockTable] = {}
        self.busy: StepPlan | None = None
        # Prefills assigned here and not finished. P and C: served in the local order. M and D:
        # recomputes first, then inlines in the order they were admitted (their plans assume it), except
        # that short prompts may jump the ones not yet started (docs/algorithm.md, The short-prompt lane;
        # multiplex.jump_position).
        self.queue: list[Request] = []
        self.decoding: list[Request] = []   # decode batch, in the order requests joined it
        self.incoming: list[Request] = []   # KV in transit to this worker
        self.handoff: list[Request] = []    # P: prefilled, waiting for a destination with room
        self.rem: dict[Request, float] = {}  # predicted remaining prefill time (s, no safety factor) of queued requests
        self.version = 0  # bumped at every change (touch); the dispatcher caches its plans per version

    def touch(self) -> None:
        self.version += 1

    # ---------------- time ----------------
    def free_at(self, now: float, safety_factor: float = 1.0) -> float:
        """Predicted time the step in flight ends (now if idle), its predicted time x safety_factor."""
        b = self.busy
        return max(now, b.start + b.predicted * safety_factor) if b is not None else now

    def inflight_tokens(self, r: Request) -> int:
        """Prefill tokens of r in the chunk now running here (0 if none)."""
        b = self.busy
        return sum(c.length for c in b.chunks if c.request is r) if b is not None else 0

    def outstanding_prefill(self, now: float) -> float:
        """Predicted prefill time still to do here: the step in flight plus the queue (s, no safety factor)."""
        return self.free_at(now) - now + sum(self.rem.values())

    def decode_load(self) -> int:
        """KV tokens of the decode batch, requests in transit to here included."""
        return sum([r.prompt_len + r.n_out for r in (*self.decoding, *self.incoming)])  # decode_ctx, inlined

    # ---------------- KV pages ----------------
    def can_admit(self, tokens: int, watermark: float) -> bool:
        """Would `tokens` more tokens of a new sequence keep page usage within the watermark?"""
        a = self.alloc
        return a.num_used + a.pages_for(tokens) <= watermark * a.num_pages

    def reserve(self, r: Request, tokens: int) -> bool:
        """Grow r's block table here to `tokens` tokens; False (nothing changed) if pages run out."""
        t = self.tables.get(r)
        if t is None:
            t = self.tables[r] = BlockTable()
        return t.ensure(self.alloc, tokens)

    def release(self, r: Request) -> None:
        t = self.tables.pop(r, None)
        if t is not None:
            t.release(self.alloc)


class Monitor:
    """All workers' state plus what every decision needs: the cost model and the policy's knobs."""

    def __init__(self, workers: list[WorkerState], cost: CostModel, cfg: PolicyConfig):
        self.workers = {w.name: w for w in workers}
        self.cost = cost
        self.cfg = cfg
        self.big_chunk = cfg.chunk_buckets[-1]
        self._by_roles: dict[tuple[str, ...], list[WorkerState]] = {}
        self._orders: dict[str, tuple[int, tuple[tuple[tuple, float, Request], ...]]] = {}  # local_order's, per worker
        # Per live request: submission order (deterministic tie-breaks) and isolated prefill time.
        self.seq: dict[Request, int] = {}
        self.iso: dict[Request, float] = {}
        # First-token waits (TTFT SLO less isolated prefill) of the latest arrivals (sched/step_limits.py).
        self._recent_waits: deque[float] = deque(maxlen=RECENT_ARRIVALS)
        self._shortest_wait: float | None = None  # min(recent_waits), once per arrival

    def of_role(self, *roles: str) -> list[WorkerState]:
        got = self._by_roles.get(roles)
        if got is None:
            got = self._by_roles[roles] = [w for w in self.workers.values() if w.role in roles]
        return got

    def local_order(self, w: WorkerState) -> tuple[tuple[tuple, float, Request], ...]:
        """w's queued prefills in its local order as (local_key, remaining time, request). Kept per
        w.version, so whatever changes w.rem touches w once it is done, before anything reads the order
        again: the dispatcher, the batcher and the M workers' step limits read a worker's order far more
        often than it changes."""
        hit = self._orders.get(w.name)
        if hit is None or hit[0] != w.version:
            order = tuple(sorted((local_key(self, r, rem), rem, r) for r, rem in w.rem.items()))
            hit = self._orders[w.name] = (w.version, order)
        return hit[1]

    def chunk_limit(self, w: WorkerState) -> int | None:
        """Largest prefill chunk worker w runs alone (None: the whole rest of the prompt)."""
        if w.role == "C":
            return self.cfg.chunked_budget if self.cfg.policy == "chunked" else self.cfg.token_budget
        if w.role == "P" and self.cfg.chunk == "whole":
            return None
        return self.big_chunk

    def remaining_time(self, w: WorkerState, r: Request) -> float:
        """Predicted time (no safety factor) to finish r's prefill alone on w, after the chunk in flight."""
        start = r.prefilled + w.inflight_tokens(r)
        limit = self.chunk_limit(w)
        target = r.prefill_target
        if start >= target:
            return 0.0
        if limit is None:
            return self.cost.t_chunk(target - start, start)
        return self.cost.t_prefill_chunked(target, limit, start)

    def set_cost(self, cost: CostModel) -> None:
        """Plan with `cost` from now on (running recalibration): every cached prediction is redone."""
        self.cost = cost
        for r in self.iso:
            self.iso[r] = self.isolated_prefill(r)
        for w in self.workers.values():
            for r in w.rem:
                w.rem[r] = self.remaining_time(w, r)
            w.touch()

    def isolated_prefill(self, r: Request) -> float:
        """Isolated prefill time of r on a P worker (chunks of the largest bucket, or the whole prompt
        with chunk=whole), no safety factor."""
        whole = self.cfg.chunk == "whole"
        return self.cost.t_prefill_chunked(r.prompt_len, r.prompt_len if whole else self.big_chunk)

    def shortest_wait(self) -> float:
        """The shortest first-token wait among the latest arrivals of one step's prompt (s, safety factor
        included)."""
        if self._shortest_wait is None:  # read at every M worker step and decision, changed per arrival
            self._shortest_wait = min(self._recent_waits, default=math.inf)
        return self._shortest_wait

    def track(self, r: Request, seq: int) -> None:
        self.seq[r] = seq
        self.iso[r] = self.isolated_prefill(r)
        # Only prompts that prefill in one step count: a longer one waits for its own steps anyway.
        one_step = r.prompt_len <= self.big_chunk
        self._recent_waits.append(r.deadline - r.arrival - self.iso[r] * self.cfg.safety_factor if one_step else math.inf)
        self._shortest_wait = None

    def forget(self, r: Request) -> None:
        self.seq.pop(r, None)
        self.iso.pop(r, None)
