"""Per-worker batching: which prefill chunk and which decodes make up a worker's next step.

- P (prefill): chunks of the largest bucket, the local queue order at every chunk boundary (SJF =
  SRPT: a shorter job overtakes at a boundary). With max_prefill_seqs > 1, prompts that finish in
  this step join the first one's chunk (back to back, as the engine packs them) while the chunk has
  tokens, slots and context pages left, if the packed step costs no more than its segments one after
  another (so nobody queued behind waits longer than the dispatcher planned) and makes no packed
  request that was on time late.
- M (multiplexing) and D (decode): the decode batch plus, when a prefill is queued here (an inline,
  or a recompute of lost KV), one chunk: the largest bucket whose mixed step keeps every decode on
  time (multiplex.pick_chunk); none fits -> a decode-only step that banks slack. With
  max_prefill_seqs > 1, when that chunk finishes its prompt, queued prompts that finish in the step
  join it as on P workers, if the packed mixed step still keeps every decode on time. D workers only
  get recomputes.
- C under `colocated` (vLLM default): waiting prefills run alone (decodes pause), whole prompts or
  chunks, up to token_budget tokens (and max_prefill_seqs prompts) a step.
- C under `chunked` (Sarathi-Serve): decodes plus prefill chunks filling the token budget, up to
  max_prefill_seqs prompts (the last one may be cut short and go on in the next step).
Memory: a prefill starts only if its pages keep usage under the memory watermark; a decode that
cannot grow preempts the latest-arrived decode on its worker (recomputed later, as vLLM does).
"""

from __future__ import annotations

import math
import sys
from typing import Callable

from tropical_jax.sched.monitor import Monitor, WorkerState, min_slack
from tropical_jax.sched.multiplex import PlanState, is_short, pick_chunk
from tropical_jax.sched.plan import Chunk, StepPlan, packed_shape
from tropical_jax.sched.request import Request
from tropical_jax.sched.step_limits import step_limits


class Batcher:
    def __init__(self, mon: Monitor, on_preempt: Callable[[WorkerState, Request, float], None]):
        self.mon = mon
        self.on_preempt = on_preempt

    def next_step(self, w: WorkerState, now: float) -> StepPlan | None:
        if w.role == "P":
            return self._prefill_only(w, now, self._local_order(w))
        if w.role in ("M", "D"):
            return self._multiplex(w, now)
        if self.mon.cfg.policy == "chunked":
            return self._chunked(w, now)
        return self._colocated(w, now)

    # ---------------- helpers ----------------
    def _local_order(self, w: WorkerState) -> list[Request]:
        return [r for _, _, r in self.mon.local_order(w)]

    def _c_order(self, w: WorkerState) -> list[Request]:
        """Colocated worker: recomputes first, then prefills in progress, then the local order."""
        recomputes = [r for r in w.queue if r.recompute_len]
        going = [r for r in w.queue if r.prefilled and not r.recompute_len]
        return recomputes + going + [r for r in self._local_order(w) if not r.recompute_len and not r.prefilled]

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

    def _decodes(self, w: WorkerState, now: float) -> tuple[list[Request], int]:
        """The decode batch, each with a page for the token it is about to write, and the KV tokens it
        reads (StepPlan.decode_tokens). When pages run out, the latest-arrived decode is preempted (its
        KV dropped, recomputed later), as vLLM does."""
        i = tokens = 0
        decoding, tables, page = w.decoding, w.tables, w.alloc.page_size
        n = len(decoding)
        while i < n:
            r = decoding[i]
            need = r.prompt_len + r.n_out  # decode_ctx(r)
            t = tables.get(r)
            # w.reserve's common case inlined (the hottest loop of a step): its last page has room.
            if (t is None or need > len(t.pages) * page) and not w.reserve(r, need):
                v = max(range(n), key=lambda k: self.mon.seq[decoding[k]])
                victim = decoding.pop(v)
                n -= 1
                if v < i:
                    i -= 1
                    tokens -= victim.prompt_len + victim.n_out
                w.release(victim)
                victim.recompute_len = victim.prompt_len + victim.n_out - 1
                victim.prefilled = 0
                n_rec = sum(1 for q in w.queue if q.recompute_len)
                w.queue.insert(n_rec, victim)
                w.rem[victim] = self.mon.remaining_time(w, victim)
                w.touch()  # before _c_order reads the local order
                self.on_preempt(w, victim, now)
                continue
            i += 1
            tokens += need
        batch = decoding[:self.mon.cfg.max_batch]
        if len(batch) < len(decoding):
            tokens = sum([r.prompt_len + r.n_out for r in batch])
        return batch, tokens

    def _plan(self, w: WorkerState, now: float, chunks: list[Chunk], decodes: tuple[list[Request], int] | None = None
              ) -> StepPlan | None:
        """The step of these prefill chunks and this decode batch (as _decodes gives it; none if not
        given), if any."""
        batch, tokens = decodes if decodes is not None else ([], 0)  # a list of its own for every plan
        if not chunks and not batch:
            return None
        cost = self.mon.cost
        plan = StepPlan(w.name, chunks, batch, tokens, 0.0, now)
        plan.predicted = cost.t_plan(plan) if chunks else cost.t_decode(len(batch), tokens)
        return plan

    @staticmethod
    def _chunk(r: Request, length: int) -> Chunk:
        return Chunk(r, r.prefilled, length, r.prefilled + length >= r.prefill_target, bool(r.recompute_len))

    def _pack(self, w: WorkerState, now: float, order: list[Request], budget: int, first: tuple[Chunk, ...] = (),
              step_time: Callable[[int, int], float] | None = None, limit: float = math.inf) -> list[Chunk]:
        """This step's prefill segments: `first` (already chosen), or else the first request of `order`
        that gets its pages, cut to `budget` tokens; then the next ones while tokens, segment slots and
        context pages last. Workers that keep their queue order (P, M, D: `step_time(C, ctx)` given)
        pack behind the first segment only prompts that finish in this step, each keeping its place,
        and only as _packs_on_time allows."""
        cfg = self.mon.cfg
        chunks = list(first)
        pages = sum(w.alloc.pages_for(c.start + c.length) for c in chunks)
        for r in order:
            if budget <= 0 or len(chunks) == cfg.max_prefill_seqs:
                break
            rest = r.prefill_target - r.prefilled
            if chunks and step_time and rest > budget:
                continue
            c = self._chunk(r, min(rest, budget))
            need = pages + w.alloc.pages_for(c.start + c.length)
            if chunks and ((cfg.max_pack_pages is not None and need > cfg.max_pack_pages)
                           or (step_time and not self._packs_on_time(now, chunks + [c], step_time, limit))):
                continue
            if not self._admit(w, r):
                break  # first come, first served for pages: it waits, and so do those behind it
            chunks.append(c)
            pages, budget = need, budget - c.length
        return chunks

    def _packs_on_time(self, now: float, segs: list[Chunk], step_time: Callable[[int, int], float],
                       limit: float) -> bool:
        """May these segments run packed? The packed step must cost no more than the segments one
        after another (so nobody queued behind waits longer than the dispatcher planned) and at most
        `limit` (s, safety factor included: what keeps the worker's decodes on time), and no request
        on time that way may be late packed."""
        sf, packed, alone = self.mon.cfg.safety_factor, step_time(*packed_shape(segs)), 0.0
        for c in segs:
            alone += step_time(c.length, c.start)
            after = 0.0 if c.last else self.mon.cost.t_prefill_chunked(c.request.prefill_target, self.mon.big_chunk,
                                                                        c.start + c.length)
            deadline = c.request.deadline
            if now + (packed + after) * sf > deadline >= now + (alone + after) * sf:
                return False
        return packed <= alone and packed * sf <= limit

    # ---------------- roles ----------------
    def _prefill_only(self, w: WorkerState, now: float, order: list[Request]) -> StepPlan | None:
        limit = self.mon.chunk_limit(w)
        step_time = self.mon.cost.t_chunk if w.role == "P" else None
        return self._plan(w, now, self._pack(w, now, order, sys.maxsize if limit is None else limit,
                                             step_time=step_time))

    def _multiplex(self, w: WorkerState, now: float) -> StepPlan | None:
        decodes = batch, tokens = self._decodes(w, now)
        chunks = []
        if w.queue:
            r = w.queue[0]
            if self._admit(w, r):
                st = PlanState(t0=now, limits=step_limits(self.mon, w, now))
                # In-transit decodes get their next token after this step at the earliest.
                st.min_a = min_slack(batch + w.incoming, now)
                st.num_decodes, st.decode_tokens = len(batch), tokens
                c, _ = pick_chunk(self.mon, st, r.prefill_target - r.prefilled, r.prefilled, not is_short(self.mon, r))
                head = self._chunk(r, c) if c else None
                if head and head.last:  # other inlines that finish here may join it, decodes kept on time
                    chunks = self._pack(w, now, w.queue[1:], self.mon.big_chunk - c, (head,),
                                        lambda C, ctx: self.mon.cost.t_mixed(C, ctx, st.num_decodes, st.decode_tokens),
                                        st.budget(self.mon.cfg.slack_margin))
                elif head:
                    chunks = [head]
        return self._plan(w, now, chunks, decodes)

    def _colocated(self, w: WorkerState, now: float) -> StepPlan | None:
        plan = self._prefill_only(w, now, self._c_order(w)) if w.queue else None  # prefill priority: decodes pause
        return plan if plan is not None else self._plan(w, now, [], self._decodes(w, now))

    def _chunked(self, w: WorkerState, now: float) -> StepPlan | None:
        decodes = batch, _ = self._decodes(w, now)
        room = self.mon.cfg.chunked_budget - len(batch)
        chunks = self._pack(w, now, self._c_order(w), room) if room > 0 and w.queue else []
        return self._plan(w, now, chunks, decodes)
