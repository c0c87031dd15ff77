"""The scheduler: a passive, thread-safe state machine that a clock and executors drive.

Calls (every one takes `now`, seconds on the caller's clock, and must not go back in time):
    submit(request, now)                 a request arrives; dispatch runs
    abort(request_id, now)               stop a request wherever it is and free its pages (a request in
                                         a step or handoff in flight stops when that ends)
    next_step(worker, now) -> StepPlan   an idle worker asks for its next step (None: nothing to do)
    step_done(worker, plan, now, finished)   the step ran; `finished` = requests that stopped at the
                                         token this step produced (EOS). max_tokens is enforced here.
    take_transfers() -> [Transfer]       KV handoffs P -> M/D the driver must now start
    transfer_done(transfer, now, ok)     a handoff landed (ok) or failed (recompute on the destination)
    tick(now)                            time passed (queue timeouts, requests turning late)
    set_profile(cost)                    plan with another profile from now on
    fast_forward(worker, until, ...)     run a stretch of decode-only steps in one go (sched/fast_forward.py)
    next_timer() -> float | None         when tick should next be called if nothing else happens
The simulator (sim/simulator.py) is an event loop over these calls with a virtual clock; the real
engine calls the very same methods from its worker threads with a wall clock.

Every dispatch decision is counted (`counters`: prefill / inline / colocated / waited / rejected /
late, jumped (short-prompt lane), plus transfers, transfer_failures, recomputes, preemptions,
packed_steps), logged at DEBUG on the "tropical_jax.sched" logger with its reason, and recorded in
`decisions` when asked.

Every change of a request's status (sched/request.py) is reported to `listener(kind, request, now)`,
with kind "scheduled" (its first prefill chunk is planned), "finished", "rejected" or "aborted", on
the thread that made the call that caused it, under the scheduler's lock (a listener must not call
back into the scheduler). How requests end without being served (refused, shed, timed out, aborted):
sched/endings.py.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import math
import threading
from collections import Counter
from dataclasses import dataclass

from tropical_jax.sched.batcher import Batcher
from tropical_jax.sched.config import ClusterSpec, PolicyConfig, parse_cluster
from tropical_jax.sched.cost_model import CostModel
from tropical_jax.sched.dispatch import WAIT, Decision, make_dispatcher
from tropical_jax.sched.endings import RequestEndings
from tropical_jax.sched.fast_forward import FastForward
from tropical_jax.sched.monitor import Monitor, WorkerState, local_key
from tropical_jax.sched.plan import StepPlan, Transfer
from tropical_jax.sched.recalibrate import Recalibrator
from tropical_jax.sched.request import PATH_INLINE, PATH_PREFILL, Request, RequestStatus

log = logging.getLogger("tropical_jax.sched")


@dataclass
class DecisionRecord:
    time: float
    request: int | str
    action: str          # prefill | inline | colocated | wait | rejected | handoff | transfer_failed | preempted
    worker: str | None
    reason: str
    late: bool = False


class Scheduler(RequestEndings, FastForward):
    def __init__(self, cluster: str | ClusterSpec, policy: str | PolicyConfig, cost_model: CostModel, *,
                 kv_capacity_tokens: int | None = None, page_size: int = 16, record_decisions: bool = False,
                 listener=None):
        self.cluster = parse_cluster(cluster)
        self.cfg = PolicyConfig.parse(policy)
        self.cfg.check_cluster(self.cluster)
        cap = kv_capacity_tokens if kv_capacity_tokens is not None else cost_model.kv_capacity_tokens
        if cap is None:
            raise ValueError("KV capacity unknown: give kv_capacity_tokens or put it in the profile")
        num_pages = cap // page_size
        if num_pages <= 0:
            raise ValueError(f"kv_capacity_tokens={cap} holds no page of {page_size} tokens")
        self.cost = cost_model  # the profile as given: default TTFT SLOs are scaled from it
        workers = [WorkerState(spec, num_pages, page_size) for spec in self.cluster.workers]
        self.mon = Monitor(workers, cost_model, self.cfg)
        self.dispatcher = make_dispatcher(self.mon)
        self.batcher = Batcher(self.mon, self._preempted)
        self.recalibrator = Recalibrator(cost_model, self.cfg.recalibrate_steps) if self.cfg.recalibrate_steps else None
        self.waiting: list[tuple[tuple, Request]] = []  # tropical: not yet placed, in queue order
        self.counters: Counter = Counter()
        self.decisions: list[DecisionRecord] | None = [] if record_decisions else None
        self._transfers: list[Transfer] = []
        self._timer: float | None = None
        self._passed: tuple = ()  # prefill workers' versions at the end of the last dispatch pass (fast_forward)
        self._seq = 0
        self._waited: set[Request] = set()  # waiting requests already counted as 'waited'
        self._shed_at: list[tuple[float, int, Request]] = []  # shed: (when it may turn hopeless, seq, request)
        self._lock = threading.RLock()
        self.live = 0  # submitted and neither finished nor rejected
        self.listener = listener  # callable(kind, request, now), see the module docstring
        self._by_id: dict = {}  # live requests by id (abort)
        self._aborting: dict[Request, str] = {}  # to abort -> its finish reason (deferred while in flight)

    # ================= public API =================
    def submit(self, r: Request, now: float) -> None:
        with self._lock:
            if r.prompt_len < 1 or r.max_tokens < 1:
                raise ValueError(f"request {r.id}: prompt_len and max_tokens must be >= 1")
            if r.ttft_slo is None:
                r.ttft_slo = self.cfg.ttft_scale * self.cost.t_prefill(r.prompt_len)
            if r.id in self._by_id:
                raise ValueError(f"request id {r.id!r} is already live")
            self.mon.track(r, self._seq)
            self._seq += 1
            self.live += 1
            self._by_id[r.id] = r
            why = self._never_fits(r) or self._hopeless(r, now)
            if why:
                self._reject(r, now, why)
            elif self.cfg.multiplexing:
                key = local_key(self.mon, r, self.mon.iso[r])
                bisect.insort(self.waiting, (key, r), key=lambda e: e[0])
            else:
                self._apply(r, self.dispatcher.decide(r, now, self._explain), now)
            if self.cfg.shed and r.sheddable and not r.rejected:
                heapq.heappush(self._shed_at, (r.deadline - self._alone(r), self.mon.seq[r], r))
            # An arrival only adds load: of the waiting requests only the newcomer can be placed now.
            self._dispatch(now, only=r)

    def next_step(self, worker: str, now: float) -> StepPlan | None:
        with self._lock:
            w = self.mon.workers[worker]
            if w.busy is not None:
                return None
            plan = self.batcher.next_step(w, now)
            if plan is None:
                return None
            w.busy = plan
            if len(plan.chunks) > 1:
                self.counters["packed_steps"] += 1
            for c in plan.chunks:
                r = c.request
                if r.status is RequestStatus.WAITING:
                    r.status = RequestStatus.PREFILLING
                if r.first_scheduled is None:
                    r.first_scheduled = now
                    self._emit("scheduled", r, now)
                w.rem[r] = self.mon.remaining_time(w, r)
            w.touch()
            return plan

    def step_done(self, worker: str, plan: StepPlan, now: float, finished=()) -> None:
        with self._lock:
            w = self.mon.workers[worker]
            if w.busy is not plan:
                raise ValueError(f"{worker}: step_done for a plan that is not in flight")
            w.busy = None
            stop = set(finished)  # requests hash by identity
            for r in plan.decodes:  # each gets its token (the hottest loop of a simulated run: inline)
                r.n_out += 1
                r.last_token_time = now
                if r.n_out >= r.max_tokens or r in stop:
                    w.decoding.remove(r)
                    self._finish(w, r, now, r in stop)
            for c in plan.chunks:
                r = c.request
                r.prefilled += c.length
                if not c.last:  # w.rem[r] stands: next_step (or set_cost since) counted this chunk as done
                    continue
                w.queue.remove(r)
                w.rem.pop(r, None)
                if c.recompute:
                    r.recompute_len = 0
                    r.prefilled = r.prompt_len
                    w.decoding.append(r)
                else:
                    self._first_token(w, r, now, r in stop)
            w.touch()  # after its queue and w.rem changed (Monitor.local_order)
            self._apply_aborts(now)
            if self.recalibrator is not None:
                self._recalibrated(self.recalibrator.observe(plan, now - plan.start))
            self._dispatch(now)

    def set_profile(self, cost: CostModel) -> None:
        """Plan with a new profile from now on (a machine measured again): default TTFT SLOs of later
        requests are scaled from it, queued predictions are redone, and running recalibration starts
        over against it."""
        with self._lock:
            self.cost = cost
            self.mon.set_cost(cost)
            if self.recalibrator is not None:
                self.recalibrator = Recalibrator(cost, self.cfg.recalibrate_steps)

    def take_transfers(self) -> list[Transfer]:
        with self._lock:
            out, self._transfers = self._transfers, []
            return out

    def transfer_done(self, t: Transfer, now: float, ok: bool = True) -> None:
        with self._lock:
            src, dst, r = self.mon.workers[t.src], self.mon.workers[t.dst], t.request
            src.release(r)
            dst.incoming.remove(r)
            src.touch()
            dst.touch()
            r.transfer_time = now - t.start
            if ok:
                dst.decoding.append(r)
            else:
                # The request must not be lost: redo its prefill on the destination (pages already there).
                self.counters["transfer_failures"] += 1
                self.counters["recomputes"] += 1
                r.recomputed = True
                r.recompute_len = r.prompt_len
                r.prefilled = 0
                dst.queue.insert(sum(1 for q in dst.queue if q.recompute_len), r)
                dst.rem[r] = self.mon.remaining_time(dst, r)
                self._record(now, r, "transfer_failed", dst.name, "recompute the prefill on the destination")
            self._apply_aborts(now)
            self._dispatch(now)

    def abort(self, request_id, now: float, reason: str = "aborted by the client",
              finish_reason: str = "abort") -> bool:
        """Stop a live request and free its pages; False if no live request has this id. One in a step
        or a KV handoff in flight is stopped when that ends (its pages are being written)."""
        with self._lock:
            r = self._by_id.get(request_id)
            if r is None:
                return False
            r.status_reason = reason
            self._aborting[r] = finish_reason
            self._apply_aborts(now)
            self._dispatch(now)
            return True

    def tick(self, now: float) -> None:
        with self._lock:
            self._dispatch(now)

    def next_timer(self) -> float | None:
        with self._lock:
            return self._timer

    @property
    def lock(self):
        """Held by every call; a driver holds it to read several workers' state consistently."""
        return self._lock

    def block_table(self, worker: str, r: Request):
        """r's BlockTable on worker (the real engine builds device metadata from it)."""
        return self.mon.workers[worker].tables[r]

    @property
    def workers(self) -> dict[str, WorkerState]:
        return self.mon.workers

    def others_busy(self, worker: str) -> bool:
        """Does another worker have a step in flight (a step starting on `worker` now shares the host)?"""
        return any(name != worker and w.busy is not None for name, w in self.mon.workers.items())

    # ================= internals =================
    @property
    def _explain(self) -> bool:
        return self.decisions is not None or log.isEnabledFor(logging.DEBUG)

    def _record(self, now: float, r: Request, action: str, worker: str | None, reason: str, late=False) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("t=%.4f req %s -> %s %s (%s)", now, r.id, action, worker or "", reason)
        if self.decisions is not None:
            self.decisions.append(DecisionRecord(now, r.id, action, worker, reason, late))

    def _apply(self, r: Request, d: Decision, now: float) -> None:
        w = self.mon.workers[d.worker]
        if d.action == PATH_INLINE and not w.reserve(r, r.prompt_len + 1):
            raise AssertionError("rule 2 admitted an inline without pages")  # can_admit was checked
        r.path = d.action
        r.prefill_worker = w.name
        if d.action != PATH_PREFILL:
            r.decode_worker = w.name
        r.late = d.late
        if d.position is None:
            w.queue.append(r)
        else:  # the short-prompt lane (docs/algorithm.md): ahead of the queued inlines it overtakes
            w.queue.insert(d.position, r)
            r.jumped = True
            self.counters["jumped"] += 1
        w.rem[r] = self.mon.remaining_time(w, r)
        self.counters[d.action] += 1
        if d.late:
            self.counters["late"] += 1
        w.touch()
        self._record(now, r, d.action, w.name, d.reason, d.late)

    def _first_token(self, w: WorkerState, r: Request, now: float, stop: bool) -> None:
        r.n_out = 1
        r.first_token_time = r.last_token_time = now
        r.status = RequestStatus.DECODING
        if stop or r.max_tokens <= 1:
            self._finish(w, r, now, stop)
        elif w.role == "P":
            w.handoff.append(r)
        else:
            w.decoding.append(r)

    def _finish(self, w: WorkerState, r: Request, now: float, stop: bool) -> None:
        r.finish_time = now
        w.release(r)
        self._end(r, now, RequestStatus.FINISHED, "stop" if stop else "length")

    def _recalibrated(self, model: CostModel | None) -> None:
        """Plan with the recalibrator's new model, if it made one."""
        if model is not None:
            self.mon.set_cost(model)
            self.counters["recalibrations"] += 1

    def _preempted(self, w: WorkerState, r: Request, now: float) -> None:
        r.status = RequestStatus.WAITING
        self.counters["preemptions"] += 1
        self.counters["recomputes"] += 1
        r.recomputed = True
        self._record(now, r, "preempted", w.name, "decode ran out of KV pages")

    def _handoffs(self, now: float) -> None:
        """Send finished prefills to the M/D worker with the least decode load that has room."""
        cfg = self.cfg
        for p in self.mon.of_role("P"):
            while p.handoff:
                r = p.handoff[0]
                need = r.prompt_len + 1
                dests = [w for w in self.mon.of_role("M", "D") if w.can_admit(need, cfg.memory_watermark)]
                if not dests:
                    break  # retried at the next state change (decodes finishing free pages)
                d = min(dests, key=lambda w: (w.decode_load(), w.name))
                p.handoff.pop(0)
                d.reserve(r, need)
                d.incoming.append(r)
                r.decode_worker = d.name
                self._transfers.append(Transfer(r, p.name, d.name, r.prompt_len, now))
                self.counters["transfers"] += 1
                p.touch()
                d.touch()
                if self._explain:
                    self._record(now, r, "handoff", d.name, f"from {p.name}: least decode load with room")

    def _dispatch(self, now: float, only: Request | None = None) -> None:
        if self.cfg.queue_timeout is not None:
            self._timeouts(now)
        if self.cfg.shed:
            self._shed(now)
        self._handoffs(now)
        timer = math.inf
        if self.waiting:
            disp = self.dispatcher
            disp.begin_pass(now)
            explain = self._explain
            keep = []
            for e in self.waiting:
                r = e[1]
                if only is not None and r is not only:
                    keep.append(e)
                    if not disp.is_late(r, now):
                        timer = min(timer, disp.late_at(r))
                    continue
                d = disp.decide(r, now, explain)
                if d.action != WAIT:
                    self._waited.discard(r)
                    self._apply(r, d, now)
                    continue
                keep.append(e)
                if r not in self._waited:
                    self._waited.add(r)
                    self.counters["waited"] += 1
                    self._record(now, r, WAIT, None, d.reason, d.late)
                if not d.late:  # it turns late (best effort) then, even if nothing else happens
                    timer = min(timer, disp.late_at(r))
            self.waiting = keep
        if self.cfg.queue_timeout is not None:
            starts = [r.arrival for _, r in self.waiting]
            starts += [q.arrival for w in self.mon.workers.values() for q in w.queue if q.first_scheduled is None]
            if starts:
                timer = min(timer, min(starts) + self.cfg.queue_timeout)
        self._timer = timer if timer < math.inf else None
        self._passed = tuple(p.version for p in self.mon.of_role("P"))  # what the waiting requests were decided on
