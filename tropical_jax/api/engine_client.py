"""The engine on its own thread; HTTP threads talk to it only through queues.

An HTTP thread validates a request, then `submit` puts it on the inbox and returns a
`RequestHandle`; token events come back on the handle's queue. Aborts go through the inbox too.
Only the engine thread calls into the backend (the single-worker engine or the multi-worker
cluster, see backends.py), and it publishes a snapshot of the engine's state after every step, so
/metrics and /v1/cluster never touch engine objects either. A step that raises fails the requests
it involved, not the server.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclass
class RequestHandle:
    request_id: str
    prompt_ids: list[int]
    params: object  # SamplingParams
    ttft_slo: float
    tpot_slo: float
    events: queue.Queue = field(default_factory=queue.Queue)  # (token_ids, text_delta, finish_reason|None)
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    n_out: int = 0
    path: str | None = None            # where its prefill ran: colocated / prefill / inline
    transfer: float | None = None      # KV handoff seconds (prefill path only)
    finish_reason: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def tpot(self) -> float:
        """DESIGN §5: (last - first) / (n_out - 1); one token: 0 (met)."""
        if self.n_out <= 1:
            return 0.0
        return (self.last_token_time - self.first_token_time) / (self.n_out - 1)

    @property
    def queueing(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def slo_met(self) -> bool:
        return self.ttft is not None and self.ttft <= self.ttft_slo and self.tpot <= self.tpot_slo


class EngineClient:
    """Owns the engine thread. `backend` follows the interface of backends.LocalWorker."""

    def __init__(self, backend, max_queue: int = 256, on_finish=None):
        self.backend = backend
        self.max_queue = max_queue
        self.on_finish = on_finish  # callable(handle, finish_reason), for metrics
        self.handles: dict[str, RequestHandle] = {}  # in flight (the engine thread removes finished ones)
        self.unscheduled: set[str] = set()  # submitted, prefill not started: the queue max_queue bounds
        self.draining = False
        self.broken: str | None = None  # set when the engine can no longer serve (health turns 503)
        self._inbox: list[tuple[str, object]] = []
        self._wake = threading.Condition()
        self._stop = False
        self._snapshot = self._publish()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- HTTP threads -----------------------------------------------------------------------
    def submit(self, request_id, prompt_ids, params, ttft_slo, tpot_slo) -> RequestHandle:
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
        """The latest snapshot (a fresh dict per publish; never mutated afterwards)."""
        return self._snapshot

    def idle(self) -> bool:
        return not self.handles

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # -- engine thread: called by the backend -----------------------------------------------
    def deliver(self, request_id, token_ids, text, reason) -> None:
        """Tokens (and/or the end) of one request. Backends call this from their engine threads."""
        h = self.handles.get(request_id)
        if h is None:
            return  # already finished (e.g. aborted, then the engine emitted its last token)
        now = time.monotonic()
        if token_ids:
            if h.first_token_time is None:
                h.first_token_time = now
            h.last_token_time = now
            h.n_out += len(token_ids)
        if reason is not None:  # bookkeeping first: a client that has its answer sees it in /metrics
            self._finish(h, reason)
        h.events.put((list(token_ids), text, reason))

    def scheduled(self, handle: RequestHandle, when: float) -> None:
        """The request's prefill started (for queueing time and the max_queue bound). Backends call
        this before the request's first token is delivered."""
        if handle.first_scheduled is None:
            handle.first_scheduled = when
        self.unscheduled.discard(handle.request_id)

    def end(self, request_id, reason: str) -> None:
        """Finish a request with no more tokens (timeout, rejection, error, abort)."""
        self.deliver(request_id, [], "", reason)

    def _finish(self, h: RequestHandle, reason: str) -> None:
        if self.handles.pop(h.request_id, None) is None:
            return  # finished twice (an abort racing a cluster worker's last token): count it once
        h.finish_reason = reason
        self.unscheduled.discard(h.request_id)
        if self.on_finish is not None:
            try:
                self.on_finish(h, reason)
            except Exception:
                log.exception("on_finish failed for %s", h.request_id)

    # -- the loop -------------------------------------------------------------------------------
    def _publish(self) -> dict:
        state = self.backend.snapshot()
        state.update(in_flight=len(self.handles), queued=len(self.unscheduled), draining=self.draining,
                     broken=self.broken)
        self._snapshot = state
        return state

    def _loop(self):
        while True:
            with self._wake:
                if not self._inbox and not self._stop and (self.broken or not self.backend.busy()):
                    self._wake.wait(timeout=self.backend.poll_interval)
                if self._stop:
                    return
                inbox, self._inbox = self._inbox, []
            if self.broken is not None:  # nothing can run: end whatever slipped in before 503s began
                for rid in list(self.handles):
                    self.end(rid, "error")
                self._publish()
                continue
            for kind, item in inbox:
                if kind == "add":
                    try:
                        self.backend.add(item, self)
                    except Exception:  # validated already, so this is a bug: fail this request only
                        log.exception("could not admit %s", item.request_id)
                        self.end(item.request_id, "error")
                elif item[0] in self.handles:
                    rid, reason = item
                    self.end(rid, reason)  # first: the backend may end it as a plain "abort"
                    self.backend.abort(rid, self)
            try:
                self.backend.run_once(self)
            except Exception as e:
                log.exception("engine step failed; failing the requests in it")
                self.broken = self.backend.recover(self, e)
                if self.broken:
                    log.error("the engine cannot serve any more: %s", self.broken)
            self._publish()
