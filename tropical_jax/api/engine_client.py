"""The server's side of the engine: an inbox, one engine thread, and a stream handle per request.

An HTTP thread validates a request, then `submit` puts it on the inbox and returns a
`RequestHandle`; its events come back on the handle's queue. Aborts go through the inbox too. The
engine thread admits and aborts, and runs the steps itself when the engine is `inline` (the single
worker); a cluster's own worker threads run theirs. Every change of a request arrives through the
engine's one callback (`_on_event`, engine/protocol.py), on whichever thread made it: nothing polls.
The api talks to the engine only through that protocol.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..engine.protocol import EngineEvent, ServingEngine

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclass
class RequestHandle:
    """What an HTTP thread holds of a request: its events, and its sched.Request (timings, SLOs, path)
    once the engine admitted it."""
    request_id: str
    prompt_ids: list[int]
    params: object  # SamplingParams
    asked_ttft_slo: float | None  # s; None: the engine's default
    asked_tpot_slo: float | None
    events: queue.Queue = field(default_factory=queue.Queue)  # (token_ids, text_delta, finish_reason|None)
    arrival: float = field(default_factory=time.monotonic)  # the engine's clock
    request: object = None  # sched.Request
    n_out: int = 0
    finish_reason: str | None = None

    def _of_request(self, name):
        return None if self.request is None else getattr(self.request, name)

    prompt_len = property(lambda self: len(self.prompt_ids))
    ttft = property(lambda self: self._of_request("ttft"))
    queueing = property(lambda self: self._of_request("queueing"))
    path = property(lambda self: self._of_request("path"))
    ttft_slo = property(lambda self: self._of_request("ttft_slo") or self.asked_ttft_slo)
    tpot_slo = property(lambda self: self._of_request("tpot_slo") or self.asked_tpot_slo)

    @property
    def tpot(self) -> float:
        return self._of_request("tpot") or 0.0

    @property
    def transfer(self) -> float | None:
        """KV handoff seconds (requests prefilled on a P worker)."""
        r = self.request
        return r.transfer_time if r is not None and r.path == "prefill" and r.n_out >= 1 else None

    @property
    def slo_met(self) -> bool:
        return self.ttft is not None and self.ttft <= self.ttft_slo and self.tpot <= self.tpot_slo


class EngineClient:
    def __init__(self, engine: ServingEngine, max_queue: int = 256, on_finish=None):
        self.engine = engine
        self.max_queue = max_queue
        self.on_finish = on_finish  # callable(handle, finish_reason), for metrics
        self.handles: dict[str, RequestHandle] = {}  # in flight
        self.unscheduled: set[str] = set()  # submitted, prefill not started: the queue max_queue bounds
        self.draining = False
        self.broken: str | None = None  # set when the engine can no longer serve (health turns 503)
        self._inbox: list[tuple[str, object]] = []
        self._wake = threading.Condition()
        self._stop = False
        engine.on_event = self._on_event
        engine.start()  # a cluster's worker threads; the single worker is stepped by our thread
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- HTTP threads -----------------------------------------------------------------------
    def submit(self, request_id, prompt_ids, params, ttft_slo=None, tpot_slo=None) -> RequestHandle:
        handle = RequestHandle(request_id, list(prompt_ids), params, ttft_slo, tpot_slo)
        with self._wake:
            if len(self.unscheduled) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self.handles[request_id] = handle
            self.unscheduled.add(request_id)
            self._inbox.append(("add", handle))
            self._wake.notify()
        return handle

    def abort(self, request_id, reason: str = "abort") -> None:
        """Stop a request and free its pages; its client sees `reason` (e.g. "shutdown" on a drain
        timeout) if it is still reading."""
        with self._wake:
            self._inbox.append(("abort", (request_id, reason)))
            self._wake.notify()

    def state(self) -> dict:
        """The engine's workers and counters, and this client's queue."""
        state = self.engine.snapshot()
        state.update(in_flight=len(self.handles), queued=len(self.unscheduled), draining=self.draining,
                     broken=self.broken)
        return state

    def idle(self) -> bool:
        return not self.handles

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # -- events (any engine thread) ---------------------------------------------------------
    def _on_event(self, event: EngineEvent) -> None:
        if event.kind == "failed":
            self.broken = event.text
            for rid in list(self.handles):
                self._end(self.handles.get(rid), "error")
            return
        r = event.request
        h = self.handles.get(r.id)
        if h is None:
            return  # already ended (e.g. the engine failed it)
        h.request = r
        if event.kind == "scheduled":
            self.unscheduled.discard(h.request_id)
            return
        h.n_out += len(event.token_ids)
        if r.done:  # bookkeeping first: a client that has its answer sees it in /metrics
            self._end(h, r.finish_reason, event.token_ids, event.text)
        else:
            h.events.put((list(event.token_ids), event.text, None))

    def _end(self, h: RequestHandle | None, reason: str, token_ids=(), text: str = "") -> None:
        if h is None or self.handles.pop(h.request_id, None) is None:
            return  # ended twice: counted once
        h.finish_reason = reason
        self.unscheduled.discard(h.request_id)
        if self.on_finish is not None:
            try:
                self.on_finish(h, reason)
            except Exception:
                log.exception("on_finish failed for %s", h.request_id)
        h.events.put((list(token_ids), text, reason))

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self):
        ready = False  # an inline engine may have a step to run
        e = self.engine
        while True:
            with self._wake:
                if not self._inbox and not self._stop and not (ready and e.inline and not self.broken):
                    self._wake.wait(timeout=e.seconds_to_timer() if e.inline and not self.broken else None)
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
            for kind, item in inbox:
                if kind == "abort":
                    rid, reason = item
                    self._end(self.handles.get(rid), reason)  # first: the engine ends it as a plain "abort"
                    e.abort(rid)
                elif self.broken:  # nothing can run: end what slipped in before 503s began
                    self._end(item, "error")
                else:
                    try:
                        item.request = e.add_request(item.request_id, item.prompt_ids, item.params,
                                                     item.asked_ttft_slo, item.asked_tpot_slo, item.arrival)
                    except Exception:  # validated already, so this is a bug: fail this request only
                        log.exception("could not admit %s", item.request_id)
                        self._end(item, "error")
            if e.inline and not self.broken:
                try:
                    ready = e.run_once()
                except Exception:  # the step's requests ended with "error"; the engine logged it
                    ready = True
