"""The threads of an engine whose workers are not stepped by its owner: several workers in this
process, or Ray actors. Each worker gets a thread that asks the scheduler for its next step and runs
it (Engine.run_step); with more than one worker a thread runs the KV handoffs (handoff.py). A loop
with nothing to do sleeps until something changes (a request, a step's end, a handoff) or the
scheduler's next timer.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class WorkerThreads:
    def __init__(self, engine):
        self.engine = engine
        self._wake = threading.Condition()
        self._events = 0  # notifications so far: a loop sleeps only if none came since it looked
        self._threads: list[threading.Thread] = []
        self._stop = False

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        e = self.engine
        self._stop = False
        self._threads = [threading.Thread(target=self._worker_loop, args=(name,), name=f"worker-{name}", daemon=True)
                         for name in e.workers]
        if len(e.workers) > 1:
            self._threads.append(threading.Thread(target=self._handoff_loop, name="kv-handoffs", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop = True
        self.notify()
        for t in self._threads:
            t.join(timeout=30)
        self._threads = []

    def notify(self) -> None:
        with self._wake:
            self._events += 1
            self._wake.notify_all()

    def wait(self, timeout: float | None = None) -> None:
        """Sleep until the next notification (or `timeout`, or the scheduler's next timer)."""
        self._sleep_unless_notified(self._events, timeout)

    def _sleep_unless_notified(self, seen: int, timeout: float | None = None) -> None:
        """Wait for a notification (or the scheduler's next timer), unless one came after the caller
        read `seen`: a loop that found nothing to do must not sleep through the handoff or step end
        that arrived meanwhile."""
        timer = self.engine.seconds_to_timer()
        timeout = min(t for t in (timeout, timer, 1.0) if t is not None)
        with self._wake:
            if self._events == seen and not self._stop:
                self._wake.wait(timeout=max(timeout, 1e-3))

    def _worker_loop(self, name: str) -> None:
        e = self.engine
        while not self._stop and not e.error:
            seen = self._events
            plan = e.scheduler.next_step(name, e.now())
            if plan is None:
                self._sleep_unless_notified(seen)
                e.scheduler.tick(e.now())
                continue
            try:
                e.run_step(name, plan)
            except Exception:
                pass  # its requests have ended with "error"; the engine counted the failure
            if e.backend == "local":
                # The reads of the handoffs this step started go before this worker's next step:
                # launched by the handoff thread they could land behind that step on the device.
                e.handoffs.stage_reads()
            self.notify()

    def _handoff_loop(self) -> None:
        e = self.engine
        try:
            while not self._stop:
                seen = self._events
                if e.handoffs.run():
                    self.notify()
                else:
                    self._sleep_unless_notified(seen)
        except BaseException as err:
            log.exception("the KV handoff thread failed")
            e.give_up(f"KV handoffs failed: {type(err).__name__}: {err}")
