"""How a request leaves the scheduler without being served to its end: refused at arrival (it can
never fit, or is hopeless), shed once hopeless while it waits, timed out (queue_timeout), or aborted;
and the one exit every ending goes through (`_end`: status, finish reason, listener).

A part of Scheduler (sched/scheduler.py), kept apart so that file stays the calls and the dispatch
loop; it reads and writes the scheduler's own state.
"""

from __future__ import annotations

import heapq

from tropical_jax.sched.monitor import WorkerState
from tropical_jax.sched.request import PATH_REJECTED, Request, RequestStatus


class RequestEndings:
    def _never_fits(self, r: Request) -> str:
        """Why no worker of this cluster could ever serve r ('' if some could)."""
        cfg = self.cfg
        w = next(iter(self.mon.workers.values()))  # all workers have the same KV capacity
        if w.alloc.pages_for(r.prompt_len + 1) > cfg.memory_watermark * w.alloc.num_pages:
            return f"prompt of {r.prompt_len} tokens exceeds a worker's KV memory (below the watermark)"
        if cfg.multiplexing and not self.mon.of_role("P"):  # only inlines can serve it
            if cfg.max_multiplex_tokens is not None and r.prompt_len > cfg.max_multiplex_tokens:
                return "no prefill worker and the prompt exceeds max_multiplex_tokens"
            alone = self.mon.cost.t_decode(1, r.prompt_len + 1) * cfg.safety_factor
            if alone > cfg.decode_latency_watermark * r.tpot_slo:
                return "no prefill worker and even alone its decode step exceeds the decode latency watermark"
        return ""

    def _alone(self, r: Request) -> float:
        """r's prefill alone from token 0: on the worker whose queue holds it, or on a prefill worker
        while it waits for a place (predicted, s)."""
        w = self.mon.workers[r.prefill_worker] if r.prefill_worker is not None else None
        return self.mon.iso[r] if w is None else w.rem[r]

    def _hopeless(self, r: Request, now: float) -> str:
        """With shed on: a request whose prefill, started now alone, cannot end by its deadline (never
        one whose TTFT SLO is a server default: Request.sheddable)."""
        if self.cfg.shed and r.sheddable and now + self._alone(r) > r.deadline:
            return f"shed: prefill alone {self._alone(r):.3f} s cannot end by the deadline {r.deadline:.3f}"
        return ""

    def _shed(self, now: float) -> None:
        """The one shedding rule, for every policy: a request whose prefill has not started is rejected
        (a miss) once it is hopeless, wherever it waits: the dispatcher's waiting list or any worker's
        queue. Requests are looked at only from the time they may have turned hopeless on."""
        heap, again = self._shed_at, []
        while heap and heap[0][0] <= now:
            _, seq, r = heapq.heappop(heap)
            if r.done or r.first_scheduled is not None:
                continue
            why = self._hopeless(r, now)
            if not why:  # its queue's prefill time differs from the one it was filed under
                again.append((r.deadline - self._alone(r), seq, r))
            elif r.prefill_worker is None:
                self._unwait(r)
                self._reject(r, now, why)
            else:
                self._drop_queued(self.mon.workers[r.prefill_worker], r, now, why)
        for e in again:
            heapq.heappush(heap, e)

    def _drop_queued(self, w: WorkerState, r: Request, now: float, reason: str,
                     finish_reason: str = "rejected") -> None:
        """Reject r, queued on w and not started."""
        w.queue.remove(r)
        w.rem.pop(r, None)
        w.release(r)
        self._reject(r, now, reason, finish_reason)
        w.touch()

    def _unwait(self, r: Request) -> None:
        """Take r out of the dispatcher's waiting list."""
        self.waiting = [e for e in self.waiting if e[1] is not r]
        self._waited.discard(r)

    def _emit(self, kind: str, r: Request, now: float) -> None:
        if self.listener is not None:
            self.listener(kind, r, now)

    def _end(self, r: Request, now: float, status: RequestStatus, finish_reason: str) -> None:
        """r leaves the scheduler: its status and reason recorded, the listener told."""
        r.status, r.finish_reason = status, finish_reason
        self.live -= 1
        self.mon.forget(r)
        self._by_id.pop(r.id, None)
        self._aborting.pop(r, None)
        self._emit(status.value, r, now)

    def _reject(self, r: Request, now: float, reason: str, finish_reason: str = "rejected") -> None:
        r.path = PATH_REJECTED
        r.status_reason = reason
        self.counters["rejected"] += 1
        self._record(now, r, "rejected", None, reason)
        self._end(r, now, RequestStatus.REJECTED, finish_reason)

    def _apply_aborts(self, now: float) -> None:
        """End the requests marked for abort that no step or handoff in flight touches."""
        for r in list(self._aborting):
            if any(r in w.incoming or (w.busy is not None and (r in w.busy.decodes or any(
                    c.request is r for c in w.busy.chunks))) for w in self.mon.workers.values()):
                continue  # its pages are being written: stopped when that ends
            self._unwait(r)
            for w in self.mon.workers.values():
                for where in (w.queue, w.decoding, w.handoff):
                    if r in where:
                        where.remove(r)
                w.rem.pop(r, None)
                w.release(r)
                w.touch()
            self.counters["aborted"] += 1
            self._record(now, r, "aborted", None, r.status_reason)
            self._end(r, now, RequestStatus.ABORTED, self._aborting[r])

    def _timeouts(self, now: float) -> None:
        limit = self.cfg.queue_timeout
        if self.waiting:
            keep = []
            for e in self.waiting:
                if now >= e[1].arrival + limit:
                    self._waited.discard(e[1])
                    self._reject(e[1], now, f"not started within queue_timeout {limit} s", "queue_timeout")
                else:
                    keep.append(e)
            self.waiting = keep
        for w in self.mon.workers.values():
            for r in [q for q in w.queue if q.first_scheduled is None and now >= q.arrival + limit]:
                self._drop_queued(w, r, now, f"not started within queue_timeout {limit} s", "queue_timeout")
