"""The one engine: the shared scheduler decides every step, the workers run them, and this keeps
each request's tokens (runtime/sequence.py), keyed by its sched.Request.

One worker on this process's devices (the default single worker, a "1C" cluster) is stepped on the
caller's thread (`inline`: LLM.generate's loop, or the server's engine thread calls run_once);
several workers, or workers that are Ray actors, each get a thread that asks the scheduler for its
next step, and a thread runs their KV handoffs (threads.py, handoff.py). Either way a step is: the scheduler's
StepPlan -> host metadata (runtime.executor.step_inputs) -> the worker's device step -> tokens
appended and detokenized -> scheduler.step_done with the requests that hit a stop -> events.

Every change of a request reaches the owner through `on_event` (protocol.EngineEvent); the clock
is time.monotonic() throughout (arrival, scheduling, tokens). The scheduler owns the block tables:
its page accounting is the device layout.
"""

from __future__ import annotations

import logging
import time

from ..config import EngineConfig, context_room
from ..runtime.executor import split_tokens, step_inputs
from ..runtime.sequence import Sequence, append_token
from ..sched.config import PolicyConfig
from ..sched.monitor import slack
from ..sched.request import Request, RequestStatus
from ..sched.scheduler import Scheduler
from .handoff import Handoffs
from .protocol import EngineEvent
from .threads import WorkerThreads

log = logging.getLogger(__name__)

ROLE_NAMES = {"P": "prefill", "M": "multiplexing", "D": "decode", "C": "colocated"}
MAX_CONSECUTIVE_FAILURES = 3  # failed steps in a row, then the device state (donated KV pools) is assumed lost


class Engine:
    def __init__(self, workers: dict, spec, policy: PolicyConfig, cost_model, cfg: EngineConfig, tokenizer,
                 eos_token_ids, vocab_size: int, backend: str = "local", tpot_slo: float = 0.1):
        """workers: warmed-up handles by name (cluster/workers.py); build.build_engine makes them."""
        self.workers, self.spec, self.policy, self.cfg = workers, spec, policy, cfg
        self.tokenizer, self.eos, self.vocab_size = tokenizer, set(eos_token_ids), vocab_size
        self.backend, self.tpot_slo = backend, tpot_slo
        self.scheduler = Scheduler(spec, policy, cost_model, page_size=cfg.page_size,
                                   kv_capacity_tokens=cfg.total_pages * cfg.page_size, listener=self._scheduler_event)
        self.tokens: dict[Request, Sequence] = {}  # live requests' token state
        self.on_event = None
        self.inline = backend == "local" and len(workers) == 1
        self.handoffs = Handoffs(self.scheduler, workers, self.now)
        self.error: str | None = None  # set when the engine can serve no more
        self._failures = 0
        self.threads = WorkerThreads(self)  # several workers, or Ray's: a thread each

    now = staticmethod(time.monotonic)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request_id, prompt_ids, params, ttft_slo=None, tpot_slo=None, arrival=None) -> Request:
        prompt_ids = [int(t) for t in prompt_ids]
        max_tokens = self.validate(prompt_ids, params)
        now = self.now()
        r = Request(request_id, now if arrival is None else min(arrival, now), len(prompt_ids), max_tokens,
                    self.default_ttft_slo(len(prompt_ids)) if ttft_slo is None else ttft_slo,
                    self.tpot_slo if tpot_slo is None else tpot_slo, prompt_token_ids=prompt_ids,
                    sheddable=ttft_slo is not None)  # a default SLO is ours, not the client's: never shed for it
        self.tokens[r] = Sequence(prompt_ids, params)
        try:
            self.scheduler.submit(r, now)
        except ValueError:
            self.tokens.pop(r, None)
            raise
        self.threads.notify()
        return r

    def validate(self, prompt_ids, params) -> int:
        """ValueError for a request this engine cannot take; its max_tokens cut to the context's room."""
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return min(params.max_tokens, context_room(len(prompt_ids), self.cfg.max_model_len))

    def abort(self, request_id, reason: str = "aborted by the client") -> None:
        self.scheduler.abort(request_id, self.now(), reason)
        self.threads.notify()

    def default_ttft_slo(self, prompt_len: int) -> float:
        """The TTFT SLO of a request that names none: ttft_scale x its isolated prefill time, and at least
        the queueing floor (`ttft_floor`)."""
        return max(self.unfloored_ttft_slo(prompt_len), self.ttft_floor)

    def unfloored_ttft_slo(self, prompt_len: int) -> float:
        s = self.scheduler
        return s.cfg.ttft_scale * s.cost.t_prefill(prompt_len)

    @property
    def ttft_floor(self) -> float:
        """The queueing allowance: ttft_scale x the time to prefill a full decode batch of prompts ahead
        of a request (ceil(max_num_seqs / max_prefill_seqs) full chunks), so a burst of short prompts
        can meet its default SLO."""
        full_chunks = -(-self.cfg.max_num_seqs // self.cfg.max_prefill_seqs)
        return full_chunks * self.unfloored_ttft_slo(self.cfg.chunk_sizes[-1])

    def _scheduler_event(self, kind: str, r: Request, now: float) -> None:
        if kind == "finished":
            return  # the step that finished it sends "finished" with its last token (run_step)
        if kind in ("rejected", "aborted"):
            self.tokens.pop(r, None)
        self._emit(EngineEvent(kind, r))

    def _emit(self, event: EngineEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    # -- inline driving ---------------------------------------------------------------------
    def run_once(self) -> bool:
        """Run the single worker's next step on this thread; False if there was none to run."""
        name = next(iter(self.workers))
        plan = self.scheduler.next_step(name, self.now())
        if plan is None:
            self.scheduler.tick(self.now())
            return False
        self.run_step(name, plan)
        return True

    def seconds_to_timer(self) -> float | None:
        timer = self.scheduler.next_timer()
        return None if timer is None else max(0.0, timer - self.now())

    def run_until_done(self, requests, timeout: float = 600.0) -> None:
        """Drive (inline) or wait for (threads, started here unless running already) until every request
        has ended."""
        deadline = time.monotonic() + timeout
        started_here = not self.inline and not self.threads.running
        self.start()
        try:
            while not all(r.done for r in requests):
                if self.error:
                    raise RuntimeError(f"the engine failed: {self.error}")
                if time.monotonic() > deadline:
                    raise TimeoutError("the engine did not finish its requests in time")
                if not self.inline:
                    self.threads.wait(0.05)
                elif not self.run_once():
                    time.sleep(min(0.05, self.seconds_to_timer() or 0.001))
        finally:
            if started_here:
                self.stop()

    # -- one step ---------------------------------------------------------------------------
    def run_step(self, name: str, plan) -> None:
        def bound(r: Request) -> Sequence:  # r's tokens, with its block table on this worker
            seq = self.tokens[r]
            seq.block_table = self.scheduler.block_table(name, r)
            return seq

        chunks = [(bound(c.request), c.start, c.length) for c in plan.chunks]
        decodes = [bound(r) for r in plan.decodes]
        try:
            sampled = self.workers[name].step(step_inputs(self.cfg, chunks, decodes))
        except Exception as e:
            self._step_failed(name, plan, e)
            raise
        chunk_tokens, decode_tokens = split_tokens(self.cfg, sampled, chunks)
        rows = list(zip(plan.decodes, decode_tokens))
        rows += [(c.request, tok) for c, tok in zip(plan.chunks, chunk_tokens) if c.last and not c.recompute]
        new, stopped = [], []
        for r, tok in rows:
            reason, text = append_token(self.tokens[r], int(tok), self.tokenizer, self.eos, self.cfg.max_model_len)
            if reason == "stop":  # max_tokens and the context's end are the scheduler's to enforce
                stopped.append(r)
            new.append((r, int(tok), text))
        self.scheduler.step_done(name, plan, self.now(), stopped)
        self._failures = 0
        for r, tok, text in new:
            ended = r.status is RequestStatus.FINISHED
            if ended:
                self.tokens.pop(r, None)
            self._emit(EngineEvent("finished" if ended else "token", r, [tok], text))

    def _step_failed(self, name: str, plan, error: Exception) -> None:
        """End the step's requests with finish_reason "error" and free their pages; after several
        failures in a row the engine gives up (`error`)."""
        log.exception("a step on %s failed; failing its %d request(s)", name, len(plan.decodes) + len(plan.chunks))
        now = self.now()
        involved = list(plan.decodes) + [c.request for c in plan.chunks]
        for r in involved:
            self.scheduler.abort(r.id, now, f"its step failed: {type(error).__name__}: {error}", "error")
        self.scheduler.step_done(name, plan, now, ())
        for r in involved:  # one the scheduler finished at max_tokens instead ends here
            if r.status is RequestStatus.FINISHED and r in self.tokens:
                self.tokens.pop(r)
                self._emit(EngineEvent("finished", r))
        self._failures += 1
        if self._failures >= MAX_CONSECUTIVE_FAILURES:
            self.give_up(f"{self._failures} steps failed in a row (last: {type(error).__name__}: {error})")

    def give_up(self, why: str) -> None:
        self.error = why
        log.error("the engine cannot serve any more: %s", why)
        for r in list(self.tokens):
            self.scheduler.abort(r.id, self.now(), why, "error")
        self._emit(EngineEvent("failed", None, text=why))
        self.threads.notify()

    def start(self) -> None:
        """Start the workers' threads, unless the owner steps the engine (inline) or they run already;
        until close() they serve whatever is added."""
        if not self.inline and not self.threads.running:
            self.threads.start()

    def stop(self) -> None:
        """Stop the workers' threads (start() again later)."""
        self.threads.stop()

    def close(self) -> None:
        """Stop the threads and release the workers (Ray: kill the actors)."""
        self.stop()
        for w in self.workers.values():
            w.close()
        if self.backend == "ray":
            from ..cluster.ray_backend import disconnect

            disconnect()

    # -- state ------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Workers (role, queue, running, KV pages, smallest banked TPOT slack), policy, dispatch counts."""
        s, now = self.scheduler, self.now()
        with s.lock:
            workers = []
            for name, w in s.workers.items():
                slacks = [slack(r, now) for r in w.decoding if r.first_token_time is not None]
                workers.append({
                    "name": name, "role": ROLE_NAMES[w.role], "queue": len(w.queue), "running": len(w.decoding),
                    "incoming": len(w.incoming), "kv_pages_used": w.alloc.num_used,
                    "kv_pages_total": w.alloc.num_pages, "min_slack_s": round(min(slacks), 6) if slacks else None,
                })
            return {"cluster": str(s.cluster), "policy": s.cfg.policy, "backend": self.backend, "workers": workers,
                    "waiting": len(s.waiting), "dispatch": dict(s.counters),
                    "step_time_factors": dict(rec.factors) if (rec := s.recalibrator) else {}}

    def measure_handoff(self, kv_bytes_per_token: int) -> dict | None:
        """This cluster's own P -> M (or D) page copy, timed and fitted; None without such a pair."""
        return self.handoffs.measure(self.spec, self.cfg.page_size, kv_bytes_per_token, self.cfg.pages_per_seq)

    def pages_used(self) -> int:
        return sum(w.alloc.num_used for w in self.scheduler.workers.values())
