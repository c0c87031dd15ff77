"""A cluster of workers, each on its own device mesh, driven by the shared scheduler.

The scheduler (tropical_jax.sched, the very code the simulator runs) decides every step; each
worker thread asks it for the next StepPlan, prepares the step's host metadata, runs it on its
worker handle (cluster/workers.py), and reports back with a real clock. The scheduler owns the
block tables (its page accounting IS the device layout). KV handoffs P -> M copy the request's
pages between the workers' pools: read from the source handle, written by the destination's; a
failed copy makes the destination recompute the prefill.

backend="local": every worker in this process on a slice of its devices (`jax.device_put`
between meshes). backend="ray": every worker a Ray actor (cluster/ray_backend.py), pages moving
as host arrays; the scheduler and these loops stay here, on the driver.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import replace

import jax.numpy as jnp

from ..config import EngineConfig
from ..model.loader import load_tokenizer, model_path, read_config
from ..model.sharding import check_tensor_parallel
from ..runtime.executor import split_tokens, step_inputs
from ..runtime.sequence import Sequence, append_token
from ..sched.config import PolicyConfig, parse_cluster
from ..sched.cost_model import CostModel
from ..sched.request import Request
from ..sched.scheduler import Scheduler
from .profile import measure_transfer
from .profile_cache import cluster_profile
from .workers import local_workers

log = logging.getLogger(__name__)

BACKENDS = ("local", "ray")


def engine_policy(policy: str | PolicyConfig, engine_cfg: EngineConfig) -> PolicyConfig:
    """The policy as this engine runs it: the scheduler may only plan steps the engine has executables
    for (chunk and batch buckets, segment slots, context pages)."""
    policy = PolicyConfig.parse(policy)
    top = engine_cfg.chunk_sizes[-1]
    budget = top if policy.token_budget is None else min(policy.token_budget, top)
    return replace(policy, chunk_buckets=engine_cfg.chunk_sizes, token_budget=budget,
                   max_batch=engine_cfg.batch_sizes[-1],
                   max_prefill_seqs=min(policy.max_prefill_seqs, engine_cfg.max_prefill_seqs),
                   max_pack_pages=engine_cfg.context_pages[-1])


class ClusterEngine:
    def __init__(self, model, cluster: str, policy: str | PolicyConfig, cost_model, engine_cfg: EngineConfig,
                 dtype=jnp.float32, progress: bool = True, backend: str = "local", ray_address: str | None = None,
                 time_transfer: bool = False):
        """cost_model: a CostModel, or None for the cached profile of this model and buckets, else one
        timed on a worker (profile_cache.cluster_profile). time_transfer:
        replace its KV-transfer constants by this cluster's own copy, timed (always when measuring)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.spec = parse_cluster(cluster)
        self.policy = engine_policy(policy, engine_cfg)
        self.policy.check_cluster(self.spec)
        self.cfg = engine_cfg
        self.backend = backend
        self.model_config = read_config(model)
        for w in self.spec.workers:
            check_tensor_parallel(self.model_config, w.tp)
        self.tokenizer = load_tokenizer(model_path(model))
        if backend == "ray":
            from .ray_backend import ray_workers

            self.workers = ray_workers(model, self.spec, engine_cfg, dtype, ray_address, progress, self.policy)
        else:
            self.workers = local_workers(model, self.spec, engine_cfg, dtype, self.policy)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos = eos
        self.seqs: dict[Request, Sequence] = {}
        self.fail_transfers = False  # tests force the recompute path
        self._wake = threading.Condition()
        self._events = 0  # state changes notified so far: a loop sleeps only if none came since it looked
        self._staged: deque = deque()  # (transfer, payload read on the source's thread) for the handoff thread
        self._t0 = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._errors: list[BaseException] = []
        for w in self.workers.values():
            w.warmup(progress)
        if cost_model is None:
            cost_model = CostModel.from_json(cluster_profile(model, self.spec, self.workers, engine_cfg, self.policy,
                                                             progress, cache=backend == "local"))
            time_transfer = True
        handoff = self.measure_handoff(cost_model.kv_bytes_per_token) if time_transfer else None
        if handoff is not None:
            cost_model = replace(cost_model, bandwidth_Bps=handoff["bandwidth_GBps"] * 1e9,
                                 transfer_latency=handoff["latency_ms"] * 1e-3)
        self.scheduler = Scheduler(self.spec, self.policy, cost_model, page_size=engine_cfg.page_size,
                                   kv_capacity_tokens=engine_cfg.total_pages * engine_cfg.page_size)

    def measure_handoff(self, kv_bytes_per_token: int) -> dict | None:
        """This cluster's own P -> M (or D) page copy, timed and fitted (the cost model's transfer
        section); None without such a pair. Not cached: it depends on the pair of meshes and the backend,
        and takes well under a second."""
        src = self.spec.by_role("P")
        dst = self.spec.by_role("M") + self.spec.by_role("D")
        if not (src and dst):
            return None
        pair = (src[0].name, dst[0].name)
        return measure_transfer(lambda s, d: self._copy_pages(*pair, s, d), self.cfg.page_size, kv_bytes_per_token,
                                self.cfg.pages_per_seq)

    def close(self):
        """Stop the loops and release the workers (Ray: kill the actors)."""
        self.stop()
        for w in self.workers.values():
            w.close()
        if self.backend == "ray":
            from .ray_backend import disconnect

            disconnect()

    def now(self) -> float:
        return time.monotonic() - self._t0

    # -- requests ---------------------------------------------------------------------------
    def submit(self, seq: Sequence, ttft_slo: float | None = None, tpot_slo: float = 0.1) -> Request:
        limit = self.cfg.max_model_len
        if len(seq.prompt_ids) >= limit:
            raise ValueError(f"prompt of {len(seq.prompt_ids)} tokens does not fit max_model_len={limit}")
        max_tokens = min(seq.params.max_tokens, limit - len(seq.prompt_ids))
        r = Request(seq.request_id, self.now(), len(seq.prompt_ids), max_tokens, ttft_slo, tpot_slo,
                    prompt_token_ids=seq.prompt_ids)
        with self._wake:
            self.seqs[r] = seq
            self.scheduler.submit(r, self.now())
        self._notify()
        return r

    # -- worker loops -----------------------------------------------------------------------
    def start(self):
        self._stop = False
        self._threads = [threading.Thread(target=self._worker_loop, args=(name,), name=f"worker-{name}", daemon=True)
                         for name in self.workers]
        # KV handoffs run on their own thread: a P worker goes on with its next prefill while its last
        # one's pages wait for the destination's step in flight to end (the simulator's model too).
        self._threads.append(threading.Thread(target=self._transfer_loop, name="kv-transfers", daemon=True))
        for t in self._threads:
            t.start()

    def stop(self):
        self._stop = True
        self._notify()
        for t in self._threads:
            t.join(timeout=30)

    def run_until_done(self, requests, timeout: float = 600.0):
        deadline = time.monotonic() + timeout
        with self._wake:
            while not all(r.done for r in requests):
                if self._errors:
                    raise RuntimeError("a worker failed") from self._errors[0]
                if time.monotonic() > deadline:
                    raise TimeoutError("cluster did not finish its requests in time")
                self._wake.wait(timeout=0.05)
                self.scheduler.tick(self.now())

    def _notify(self):
        with self._wake:
            self._events += 1
            self._wake.notify_all()

    def _sleep_unless_notified(self, seen: int, timeout: float = 0.02):
        """Wait for a notification, unless one came after the caller read `seen` (a loop that found
        nothing to do must not sleep through the handoff or step end that arrived meanwhile: that lost
        wakeup cost a handed-over request up to the whole timeout before its next token)."""
        with self._wake:
            if self._events == seen and not self._stop:
                self._wake.wait(timeout=timeout)

    def _worker_loop(self, name: str):
        try:
            while not self._stop:
                seen = self._events
                plan = self.scheduler.next_step(name, self.now())
                if plan is None:
                    self._sleep_unless_notified(seen)
                    self.scheduler.tick(self.now())
                    continue
                finished = self._run_plan(name, plan)
                self.scheduler.step_done(name, plan, self.now(), finished)
                if self.backend == "local":
                    # The reads of the handoffs this step started go before this worker's next step:
                    # launched by the handoff thread they could land behind that step on the device.
                    self._stage_reads()
                self._notify()
        except BaseException as e:  # surface to run_until_done instead of dying silently
            self._failed(f"worker {name}", e)

    def _transfer_loop(self):
        try:
            while not self._stop:
                seen = self._events
                if not self._do_transfers():
                    self._sleep_unless_notified(seen)
        except BaseException as e:
            self._failed("kv-transfers", e)

    def _failed(self, name: str, e: BaseException):
        log.exception("%s failed", name)
        self._errors.append(e)
        self._notify()

    def _run_plan(self, name: str, plan) -> list[Request]:
        def bound(r: Request) -> Sequence:  # r's sequence, with its block table on this worker
            seq = self.seqs[r]
            seq.block_table = self.scheduler.block_table(name, r)
            return seq

        chunks = [(bound(c.request), c.start, c.length) for c in plan.chunks]
        decodes = [bound(r) for r in plan.decodes]
        chunk_tokens, decode_tokens = split_tokens(
            self.cfg, self.workers[name].step(step_inputs(self.cfg, chunks, decodes)), chunks)
        finished = []
        rows = list(zip(plan.decodes, decode_tokens))
        rows += [(c.request, tok) for c, tok in zip(plan.chunks, chunk_tokens) if c.last and not c.recompute]
        for r, tok in rows:
            seq = self.seqs[r]
            reason, text = append_token(seq, int(tok), self.tokenizer, self.eos, self.cfg.max_model_len)
            if reason is not None:
                seq.finish_reason = reason
                finished.append(r)
            if seq.on_output is not None:
                seq.on_output(seq, [int(tok)], text)
        return finished

    # -- KV handoff -------------------------------------------------------------------------
    def _stage_reads(self) -> None:
        """Launch the page reads of the handoffs the scheduler has started (one gather each) and leave
        the rest to the handoff thread: called by a worker right after its step, so the reads run
        on its device before its next step, while it pays only their launch (its notification after
        the step wakes the handoff thread)."""
        self._staged.extend((t, self._read(t)) for t in self.scheduler.take_transfers())

    def _read(self, t):
        """The source pages of handoff t (a device payload), or None if the read failed."""
        if self.fail_transfers:
            return None
        try:
            return self.workers[t.src].read_pages(self.scheduler.block_table(t.src, t.request).pages)
        except Exception:
            log.exception("KV read of %s failed; recomputing on %s", t.request.id, t.dst)
            return None

    def _do_transfers(self) -> int:
        """Finish the handoffs staged by the workers and run any others the scheduler has started
        (write to the destination, report); returns how many."""
        staged = []
        while self._staged:
            staged.append(self._staged.popleft())
        staged += [(t, self._read(t)) for t in self.scheduler.take_transfers()]
        for t, payload in staged:
            ok = payload is not None
            if ok:
                try:
                    src, dst = (self.scheduler.block_table(w, t.request).pages for w in (t.src, t.dst))
                    self._write_pages(t.dst, src, dst, payload)
                except Exception:
                    log.exception("KV transfer of %s failed; recomputing on %s", t.request.id, t.dst)
                    ok = False
            self.scheduler.transfer_done(t, self.now(), ok)
            self._notify()
        return len(staged)

    def _write_pages(self, dst: str, src_pages, dst_pages, payload):
        """Write a payload read from src_pages into dst_pages (as many as both have)."""
        self.workers[dst].write_pages(dst_pages[:len(src_pages)], payload)

    def _copy_pages(self, src: str, dst: str, src_pages, dst_pages):
        self._write_pages(dst, src_pages, dst_pages, self.workers[src].read_pages(src_pages))
