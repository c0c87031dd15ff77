"""The engine on its own thread; HTTP threads talk to it only through queues.

`submit` enqueues a request and returns a `RequestHandle` whose queue receives token events
from the engine thread. Engine errors in one step fail the requests of that step, not the
server: the loop keeps running.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    pass


@dataclass
class RequestHandle:
    request_id: str
    prompt_len: int
    ttft_slo: float
    tpot_slo: float
    events: queue.Queue = field(default_factory=queue.Queue)  # (token_ids, text_delta, finish_reason|None)
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    n_out: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def tpot(self) -> float:
        if self.n_out <= 1:
            return 0.0
        return (self.last_token_time - self.first_token_time) / (self.n_out - 1)

    @property
    def slo_met(self) -> bool:
        return self.ttft is not None and self.ttft <= self.ttft_slo and self.tpot <= self.tpot_slo


class EngineClient:
    def __init__(self, llm, max_queue: int = 256, queue_timeout: float | None = None, on_finish=None):
        self.llm = llm
        self.engine = llm.engine
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.on_finish = on_finish  # callable(handle, finish_reason) for metrics
        self.handles: dict[str, RequestHandle] = {}
        self._wake = threading.Condition()
        self._stop = False
        self.draining = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # -- HTTP side --------------------------------------------------------------------------
    def submit(self, request_id, prompt_ids, params: SamplingParams, ttft_slo, tpot_slo) -> RequestHandle:
        with self._wake:
            if len(self.engine.waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            handle = RequestHandle(request_id, len(prompt_ids), ttft_slo, tpot_slo)
            self.handles[request_id] = handle
            try:
                self.engine.add_request(prompt_ids, params, request_id=request_id, on_output=self._on_output)
            except Exception:
                del self.handles[request_id]
                raise
            self._wake.notify()
        return handle

    def abort(self, request_id) -> None:
        self.engine.abort(request_id)
        with self._wake:
            self._wake.notify()

    def state(self) -> dict:
        e = self.engine
        return {"workers": [{
            "name": "C0", "role": "colocated",
            "queue": len(e.waiting), "running": e.num_active,
            "kv_pages_used": e.allocator.num_used, "kv_pages_total": e.allocator.num_pages,
            "preemptions": e.num_preemptions,
        }], "in_flight": len(self.handles), "draining": self.draining}

    def idle(self) -> bool:
        return not self.handles

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # -- engine thread ----------------------------------------------------------------------
    def _on_output(self, seq, token_ids, text):
        h = self.handles.get(seq.request_id)
        if h is None:
            return
        now = time.monotonic()
        if token_ids:
            if h.first_token_time is None:
                h.first_token_time = now
            h.last_token_time = now
            h.n_out += len(token_ids)
        h.events.put((token_ids, text, seq.finish_reason))
        if seq.finish_reason is not None:
            self.handles.pop(seq.request_id, None)
            if self.on_finish is not None:
                self.on_finish(h, seq.finish_reason)

    def _expire_queued(self):
        if self.queue_timeout is None:
            return
        now = time.monotonic()
        for seq in list(self.engine.waiting):
            h = self.handles.get(seq.request_id)
            if h is not None and seq.num_preemptions == 0 and now - h.arrival > self.queue_timeout:
                self.engine.abort(seq.request_id)
                h.events.put(([], "", "queue_timeout"))
                self.handles.pop(seq.request_id, None)
                if self.on_finish is not None:
                    self.on_finish(h, "queue_timeout")

    def _loop(self):
        while True:
            with self._wake:
                while not self._stop and not self.engine.has_work() and not self.engine._aborted:
                    self._wake.wait(timeout=0.5)
                if self._stop:
                    return
            self._expire_queued()
            try:
                self.engine.step()
            except Exception:
                log.exception("engine step failed; failing the requests in it")
                self._fail_all_active()

    def _fail_all_active(self):
        """A step raised: end the requests it involved with an error instead of hanging them."""
        e = self.engine
        victims = list(e.running) + ([e.prefilling] if e.prefilling is not None else [])
        for seq in victims:
            e.abort(seq.request_id)
            h = self.handles.pop(seq.request_id, None)
            if h is not None:
                h.events.put(([], "", "error"))
