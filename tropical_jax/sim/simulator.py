"""The simulator: an event loop that drives the real scheduler with a virtual clock and a cost-model executor.

    from tropical_jax.sim.simulator import simulate
    res = simulate(requests, "1P1M", "tropical", cost_model, noise=0.0, seed=0)
    res.requests      # copies of the input requests with their outcome recorded (same order), see sched/request.py
    res.counters      # dispatch counters: prefill / inline / colocated / waited / rejected / late / transfers / ...

`requests` are not modified (each is copied with its inputs only), so one workload can be simulated
under several policies. Requests need `output_len` (else they run to max_tokens). A request whose
`ttft_slo` is None gets policy.ttft_scale x cost_model.t_prefill(prompt_len).

Events: arrivals, step ends, transfer ends, and scheduler timers (queue timeouts, requests turning
late). After each event every idle worker is asked for its next step. A worker that only decodes while
nothing else can read it runs that stretch of steps in one call (Scheduler.fast_forward): the same
results, far fewer events. A run that ends with requests neither finished nor rejected raises
RuntimeError (a scheduler bug, never a silent loss).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from tropical_jax.sched.config import ClusterSpec, PolicyConfig
from tropical_jax.sched.cost_model import CostModel
from tropical_jax.sched.request import Request
from tropical_jax.sched.scheduler import DecisionRecord, Scheduler
from tropical_jax.sim.clock import VirtualClock
from tropical_jax.sim.executor import CostModelExecutor

_STEP, _XFER, _TICK = 0, 1, 2


@dataclass
class SimResult:
    requests: list[Request]
    counters: dict[str, int]
    decisions: list[DecisionRecord] | None
    end_time: float           # virtual seconds at the last event
    steps: int                # device steps simulated
    wall_s: float             # real seconds the simulation took
    stopped_early: bool       # max_misses was exceeded: the run stopped, unfinished requests count as missed
    scheduler: Scheduler      # final state (all pages should be free)


def fresh(r: Request) -> Request:
    """A copy of r with its inputs only (no recorded outcome)."""
    return Request(r.id, r.arrival, r.prompt_len, r.max_tokens, r.ttft_slo, r.tpot_slo, r.output_len,
                   r.prompt_token_ids, sheddable=r.sheddable)


def _quiet_until(heap: list, arrival: float, strict: bool, prefill_workers: set[str],
                 earliest_handoff: Callable[[str, float], float]) -> float:
    """Until when nothing can read or change a worker that only decodes (Scheduler.fast_forward): the
    next arrival, transfer, timer, or the earliest time a prefill worker may hand a prompt (of its
    step in flight, or a later one) to a decoding worker, earliest_handoff(worker, end of that step);
    other workers' steps touch only their own worker. strict (every step must be seen in order:
    recalibration, max_misses): the next event of any kind."""
    until = arrival
    for t, _, kind, payload in heap:
        if t < until:
            if strict or kind != _STEP:
                until = t
            elif payload[0] in prefill_workers:
                until = min(until, earliest_handoff(payload[0], t))
    return until


def simulate(requests: Iterable[Request], cluster: str | ClusterSpec, policy: str | PolicyConfig,
             cost_model: CostModel, *, noise: float = 0.0, seed: int = 0, executor_cost: CostModel | None = None,
             kv_capacity_tokens: int | None = None, page_size: int = 16, transfer_failure_rate: float = 0.0,
             record_decisions: bool = False, observer: Callable | None = None,
             progress: bool = False, max_misses: int | None = None, fast_forward: bool = True) -> SimResult:
    """Simulate serving `requests` on `cluster` under `policy`.

    cost_model: what the scheduler predicts with. executor_cost: what steps really take (default the
    same model; a different one measures the effect of a wrong profile). noise: multiplicative
    lognormal noise on every step and transfer (sigma). kv_capacity_tokens: KV tokens per worker
    (default the profile's kv_capacity_tokens). observer(event, now, *payload), if given, sees
    ("start", scheduler), ("step_start", worker, plan), ("step_end", worker, plan),
    ("transfer_end", transfer, ok). max_misses: stop as soon as more than this many requests have
    certainly missed an SLO (rejected, a late first token, or a finished request over its TPOT SLO);
    the result then has stopped_early=True. A goodput search with target attainment a over n requests
    can pass max_misses = floor((1 - a) * n): a run that stops early is below the target for sure.
    fast_forward: run stretches of decode-only steps in one call (Scheduler.fast_forward) wherever that
    provably changes nothing (never with an observer, noise or contention); False runs every step
    through step_done and next_step (the same results, slower).
    """
    t_wall = time.perf_counter()
    out = [fresh(r) for r in requests]
    reqs = sorted(out, key=lambda r: r.arrival)
    sched = Scheduler(cluster, policy, cost_model, kv_capacity_tokens=kv_capacity_tokens, page_size=page_size,
                      record_decisions=record_decisions)
    ex = CostModelExecutor(executor_cost or cost_model, noise, seed, transfer_failure_rate)
    clock = VirtualClock(reqs[0].arrival if reqs else 0.0)
    advance = clock.advance_to  # refuses to go back in time
    hands_off = bool(sched.mon.of_role("P"))  # only prefill workers hand KV over
    prefill_workers = {w.name for w in sched.mon.of_role("P")}
    fast = fast_forward and observer is None and ex.exact
    strict = max_misses is not None or sched.recalibrator is not None
    workers = list(sched.workers.items())
    heap: list = []
    seq = 0
    tick_at = None
    steps = 0
    i, n = 0, len(reqs)
    missed: set[Request] = set()   # certainly missed an SLO (max_misses)
    deadlines: list = []           # (deadline, i, request) of requests whose TTFT is not judged yet
    stopped = False
    if observer is not None:
        observer("start", clock.now(), sched)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=f"simulate {sched.cfg.policy} {sched.cluster}", unit="req", leave=False)

    def earliest_handoff(w: str, step_end: float) -> float:
        return sched.earliest_handoff(w, step_end, ex.cost)

    def forward(w: str, others: list[float]) -> tuple:
        """Scheduler.fast_forward of w's decode-only step in flight, up to the next event that could
        read w (strict: the next event of any kind, `others` (steps starting now) included)."""
        until = _quiet_until(heap, reqs[i].arrival if i < n else math.inf, strict, prefill_workers, earliest_handoff)
        if strict:  # nor a request's TTFT turning missed
            until = min([until, *others] + ([deadlines[0][0]] if deadlines else []))
        return sched.fast_forward(w, until, ex.cost.decode_ends, ex.steps_left)

    while True:
        t_next = heap[0][0] if heap else None
        if i < n and (t_next is None or reqs[i].arrival <= t_next):
            r = reqs[i]
            i += 1
            advance(r.arrival)
            now = r.arrival
            sched.submit(r, now)
            if max_misses is not None:
                heapq.heappush(deadlines, (r.deadline, i, r))
            if bar is not None:
                bar.update(1)
        elif heap:
            t, _, kind, payload = heapq.heappop(heap)
            advance(t)
            now = t
            if kind == _STEP:
                w, plan = payload
                fin = ex.finished(plan)
                # It may have ended as one of a stretch with nothing else to do (not if a request stops).
                if fast and not plan.chunks and not fin:
                    nxt, k = forward(w, [])
                    if nxt is not plan:
                        steps += k
                        if nxt is not None:
                            heapq.heappush(heap, (nxt.start + ex.step_time(nxt, False, sched.mon.cost), seq, _STEP,
                                                  (w, nxt)))
                            seq += 1
                        continue
                sched.step_done(w, plan, now, fin)
                if max_misses is not None:
                    missed.update(r for r in fin if r.tpot > r.tpot_slo)
                if observer is not None:
                    observer("step_end", now, w, plan)
            elif kind == _XFER:
                tr, ok = payload
                sched.transfer_done(tr, now, ok)
                if observer is not None:
                    observer("transfer_end", now, tr, ok)
            else:
                if tick_at == t:
                    tick_at = None
                sched.tick(now)
        else:
            break
        if max_misses is not None:
            while deadlines and deadlines[0][0] < now:
                r = heapq.heappop(deadlines)[2]
                if not r.rejected and (r.first_token_time is None or r.first_token_time > r.deadline):
                    missed.add(r)
        if max_misses is not None and len(missed) + sched.counters["rejected"] > max_misses:
            stopped = True
            break
        started = [(w, plan) for w, state in workers if state.busy is None
                   and (plan := sched.next_step(w, now)) is not None]
        ends = [now + ex.step_time(plan, ex.cost.contention != 1.0 and sched.others_busy(w), sched.mon.cost)
                for w, plan in started]
        for j, (w, plan) in enumerate(started):
            steps += 1
            if observer is not None:
                observer("step_start", now, w, plan)
            end = ends[j]
            if fast and not plan.chunks:
                nxt, k = forward(w, ends[:j] + ends[j + 1:])
                if nxt is not plan:
                    steps += k
                    plan = nxt
                    end = None if nxt is None else nxt.start + ex.step_time(nxt, False, sched.mon.cost)
            if plan is not None:
                heapq.heappush(heap, (end, seq, _STEP, (w, plan)))
                seq += 1
        for tr in (sched.take_transfers() if hands_off else ()):
            dur, ok = ex.transfer(tr)
            heapq.heappush(heap, (now + dur, seq, _XFER, (tr, ok)))
            seq += 1
        timer = sched.next_timer()
        if timer is not None and timer > now and (tick_at is None or timer < tick_at):
            tick_at = timer
            heapq.heappush(heap, (timer, seq, _TICK, None))
            seq += 1

    if bar is not None:
        bar.close()
    if sched.live and not stopped:
        stuck = [r.id for r in reqs if not r.done][:10]
        raise RuntimeError(f"simulation ended with {sched.live} requests unserved (e.g. {stuck}); scheduler state: "
                           + "; ".join(f"{w.name}: queue {len(w.queue)}, decoding {len(w.decoding)}, "
                                       f"incoming {len(w.incoming)}, handoff {len(w.handoff)}"
                                       for w in sched.workers.values())
                           + f"; waiting {len(sched.waiting)}")
    return SimResult(out, dict(sched.counters), sched.decisions, clock.now(), steps,
                     time.perf_counter() - t_wall, stopped, sched)
