"""Per-worker batching: which prefill chunk and which decodes make up a worker's next step.

- P (prefill): one prefill at a time, chunks of the largest bucket, the local queue order at every
  chunk boundary (SJF = SRPT: a shorter job overtakes at a boundary).
- M (multiplexing) and D (decode): the decode batch plus, when a prefill is queued here (an inline,
  or a recompute of lost KV), one chunk: the largest bucket whose mixed step keeps every decode on
  time (multiplex.pick_chunk); none fits -> a decode-only step that banks slack. D workers only get
  recomputes.
- C under `colocated` (vLLM default): a waiting prefill runs alone (decodes pause), the whole prompt
  or chunks of at most token_budget.
- C under `chunked` (Sarathi-Serve): decodes plus one prefill chunk filling the token budget. One
  chunk per step, not several prompts: the engine's device step holds at most one chunk.
Memory: a prefill starts only if its pages keep usage under the memory watermark; a decode that
cannot grow preempts the latest-arrived decode on its worker (recomputed later, as vLLM does).
"""

from __future__ import annotations

from typing import Callable

from tropical_jax.sched.monitor import Monitor, WorkerState, decode_ctx, local_key, slack
from tropical_jax.sched.multiplex import PlanState, is_short, pick_chunk
from tropical_jax.sched.plan import Chunk, StepPlan
from tropical_jax.sched.request import Request


class Batcher:
    def __init__(self, mon: Monitor, on_preempt: Callable[[WorkerState, Request, float], None]):
        self.mon = mon
        self.on_preempt = on_preempt

    def next_step(self, w: WorkerState, now: float) -> StepPlan | None:
        if w.role == "P":
            return self._prefill_only(w, now, self._p_pick(w))
        if w.role in ("M", "D"):
            return self._multiplex(w, now)
        if self.mon.cfg.policy == "chunked":
            return self._chunked(w, now)
        return self._colocated(w, now)

    # ---------------- helpers ----------------
    def _p_pick(self, w: WorkerState) -> Request | None:
        if not w.queue:
            return None
        return min(w.queue, key=lambda r: local_key(self.mon, r, w.rem[r]))

    def _c_pick(self, w: WorkerState) -> Request | None:
        """Colocated worker: a recompute first, then a prefill in progress, then the local order."""
        for r in w.queue:
            if r.recompute_len:
                return r
        for r in w.queue:
            if r.prefilled:
                return r
        return self._p_pick(w)

    def _admit(self, w: WorkerState, r: Request) -> bool:
        """Pages for r's prefill on w (allocated once, at its first chunk). Off P workers, the pages must
        keep usage under the memory watermark (headroom for decodes to grow) — except a recompute on
        a worker with nothing else decoding, which must always be able to go on."""
        if r in w.tables:
            return True
        need = r.prefill_target + (0 if w.role == "P" else 1)
        if w.role != "P" and not w.can_admit(need, self.mon.cfg.memory_watermark) \
                and not (r.recompute_len and not w.decoding):
            return False
        return w.reserve(r, need)

    def _decodes(self, w: WorkerState, now: float) -> list[Request]:
        """The decode batch, each with a page for the token it is about to write. When pages run out,
        the latest-arrived decode is preempted (its KV dropped, recomputed later), as vLLM does."""
        i = 0
        while i < len(w.decoding):
            r = w.decoding[i]
            if w.reserve(r, decode_ctx(r)):
                i += 1
                continue
            v = max(range(len(w.decoding)), key=lambda k: self.mon.seq[w.decoding[k]])
            victim = w.decoding.pop(v)
            if v < i:
                i -= 1
            w.release(victim)
            victim.recompute_len = victim.prompt_len + victim.n_out - 1
            victim.prefilled = 0
            n_rec = sum(1 for q in w.queue if q.recompute_len)
            w.queue.insert(n_rec, victim)
            w.rem[victim] = self.mon.remaining_time(w, victim)
            self.on_preempt(w, victim, now)
        return w.decoding[:self.mon.cfg.max_batch]

    def _plan(self, w: WorkerState, now: float, chunk: Chunk | None, decodes: list[Request]) -> StepPlan | None:
        if chunk is None and not decodes:
            return None
        T = sum(decode_ctx(r) for r in decodes)
        c = self.mon.cost
        t = c.t_mixed(chunk.length, chunk.start, len(decodes), T) if chunk else c.t_decode(len(decodes), T)
        return StepPlan(w.name, chunk, decodes, T, t, now)

    @staticmethod
    def _chunk(r: Request, length: int) -> Chunk:
        return Chunk(r, r.prefilled, length, r.prefilled + length >= r.prefill_target, bool(r.recompute_len))

    # ---------------- roles ----------------
    def _prefill_only(self, w: WorkerState, now: float, r: Request | None) -> StepPlan | None:
        if r is None or not self._admit(w, r):
            return None
        limit = self.mon.chunk_limit(w)
        rest = r.prefill_target - r.prefilled
        return self._plan(w, now, self._chunk(r, rest if limit is None else min(limit, rest)), [])

    def _multiplex(self, w: WorkerState, now: float) -> StepPlan | None:
        decodes = self._decodes(w, now)
        chunk = None
        if w.queue:
            r = w.queue[0]
            if self._admit(w, r):
                st = PlanState(t0=now, cap=self.mon.handoff_cap(w))
                for d in decodes:
                    st.add_decode(slack(d, now), d.tpot_slo, decode_ctx(d))
                for d in w.incoming:  # they get their next token after this step at the earliest
                    st.add_decode(slack(d, now), d.tpot_slo, decode_ctx(d))
                st.B, st.T = len(decodes), sum(decode_ctx(d) for d in decodes)
                c, _ = pick_chunk(self.mon, st, r.prefill_target - r.prefilled, r.prefilled, not is_short(self.mon, r))
                if c:
                    chunk = self._chunk(r, c)
        return self._plan(w, now, chunk, decodes)

    def _colocated(self, w: WorkerState, now: float) -> StepPlan | None:
        r = self._c_pick(w)
        if r is not None and self._admit(w, r):
            return self._prefill_only(w, now, r)  # prefill priority: decodes pause
        return self._plan(w, now, None, self._decodes(w, now))

    def _chunked(self, w: WorkerState, now: float) -> StepPlan | None:
        decodes = self._decodes(w, now)
        room = self.mon.cfg.chunked_budget - len(decodes)
        chunk = None
        r = self._c_pick(w)
        if r is not None and room > 0 and self._admit(w, r):
            chunk = self._chunk(r, min(room, r.prefill_target - r.prefilled))
        return self._plan(w, now, chunk, decodes)
