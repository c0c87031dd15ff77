"""KV handoffs between workers: a finished prefill's pages copied from its P worker to the M or D
worker the scheduler chose, read from the source handle and written by the destination's. A failed
copy makes the destination recompute the prefill (the scheduler's transfer_done(ok=False)).

The reads of the handoffs a step started are launched by that worker's thread right after the step
(`stage_reads`), so they run on its device before its next step; the writes run on the handoff
thread, so a P worker goes on with its next prefill meanwhile (the simulator's model too).
"""

from __future__ import annotations

import logging
from collections import deque

from ..cluster.profile import measure_transfer

log = logging.getLogger(__name__)


class Handoffs:
    def __init__(self, scheduler, workers: dict, now):
        self.scheduler, self.workers, self.now = scheduler, workers, now
        self.fail = False  # tests force the recompute path
        self._staged: deque = deque()  # (transfer, payload read on the source's thread)

    def stage_reads(self) -> None:
        self._staged.extend((t, self._read(t)) for t in self.scheduler.take_transfers())

    def run(self) -> int:
        """Finish the staged handoffs and run any others the scheduler has started; returns how many."""
        staged = []
        while self._staged:
            staged.append(self._staged.popleft())
        staged += [(t, self._read(t)) for t in self.scheduler.take_transfers()]
        for t, payload in staged:
            ok = payload is not None
            if ok:
                try:
                    src, dst = (self.scheduler.block_table(w, t.request).pages for w in (t.src, t.dst))
                    self._write(t.dst, src, dst, payload)
                except Exception:
                    log.exception("KV transfer of %s failed; recomputing on %s", t.request.id, t.dst)
                    ok = False
            self.scheduler.transfer_done(t, self.now(), ok)
        return len(staged)

    def measure(self, spec, page_size: int, kv_bytes_per_token: int, max_pages: int) -> dict | None:
        """The cluster's own P -> M (or D) page copy, timed and fitted (the cost model's transfer
        section); None without such a pair. Not cached: it depends on the pair of meshes and the
        backend, and takes well under a second."""
        src = spec.by_role("P")
        dst = spec.by_role("M") + spec.by_role("D")
        if not (src and dst):
            return None
        a, b = src[0].name, dst[0].name
        return measure_transfer(lambda s, d: self._write(b, s, d, self.workers[a].read_pages(s)), page_size,
                                kv_bytes_per_token, max_pages)

    def _read(self, t):
        """The source pages of handoff t (a device payload), or None if the read failed."""
        if self.fail:
            return None
        try:
            return self.workers[t.src].read_pages(self.scheduler.block_table(t.src, t.request).pages)
        except Exception:
            log.exception("KV read of %s failed; recomputing on %s", t.request.id, t.dst)
            return None

    def _write(self, dst: str, src_pages, dst_pages, payload):
        """Write a payload read from src_pages into dst_pages (as many as both have)."""
        self.workers[dst].write_pages(dst_pages[:len(src_pages)], payload)
