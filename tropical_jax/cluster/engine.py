"""A cluster of workers in one process, each on its own device mesh, driven by the shared scheduler.

The scheduler (tropical_jax.sched, the very code the simulator runs) decides every step; each
worker thread asks it for the next StepPlan, runs it on its ModelExecutor, and reports back with a
real clock. The scheduler owns the block tables (its page accounting IS the device layout). KV
handoffs P -> M copy the request's pages between the workers' pools (`jax.device_put` to the
destination's sharding); a failed copy makes the destination recompute the prefill.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np

from ..config import EngineConfig
from ..model.loader import load_model
from ..model.sharding import make_mesh
from ..runtime.executor import ModelExecutor
from ..runtime.sequence import Sequence, append_token
from ..sched.config import PolicyConfig, parse_cluster
from ..sched.request import Request
from ..sched.scheduler import Scheduler

log = logging.getLogger(__name__)


def carve_meshes(cluster, devices=None):
    """One mesh per worker, taking `tp` consecutive devices each."""
    devices = list(devices if devices is not None else jax.devices())
    need = sum(w.tp for w in cluster.workers)
    if need > len(devices):
        raise ValueError(f"cluster {cluster} needs {need} devices, {len(devices)} available")
    meshes, i = {}, 0
    for w in cluster.workers:
        meshes[w.name] = make_mesh(devices[i:i + w.tp])
        i += w.tp
    return meshes


class _PageCopier:
    """Fixed-shape page gather/scatter (padded to a full block table) so handoffs never recompile."""

    def __init__(self, pages_per_seq: int):
        self.width = pages_per_seq
        self.gather = jax.jit(lambda pool, idx: pool[idx])
        self.scatter = jax.jit(lambda pool, idx, vals: pool.at[idx].set(vals, mode="drop"), donate_argnums=(0,))

    def indices(self, pages, num_pages: int, fill: int) -> np.ndarray:
        idx = np.full(self.width, fill, np.int32)
        idx[:len(pages)] = pages
        return idx


class ClusterEngine:
    def __init__(self, model, cluster: str, policy: str | PolicyConfig, cost_model, engine_cfg: EngineConfig,
                 dtype=jnp.float32, progress: bool = True):
        self.spec = parse_cluster(cluster)
        # The scheduler may only plan chunks the engine has executables for.
        top = engine_cfg.chunk_sizes[-1]
        policy = PolicyConfig.parse(policy)
        budget = top if policy.token_budget is None else min(policy.token_budget, top)
        self.policy = replace(policy, chunk_buckets=engine_cfg.chunk_sizes, token_budget=budget,
                              max_batch=engine_cfg.batch_sizes[-1])
        self.policy.check_cluster(self.spec)
        self.cfg = engine_cfg
        meshes = carve_meshes(self.spec)
        self.executors: dict[str, ModelExecutor] = {}
        for w in self.spec.workers:
            self.model_config, graphdef, params, self.tokenizer = load_model(model, dtype, meshes[w.name])
            self.executors[w.name] = ModelExecutor(self.model_config, graphdef, params, engine_cfg, meshes[w.name])
        self.meshes = meshes
        self.scheduler = Scheduler(self.spec, self.policy, cost_model, page_size=engine_cfg.page_size,
                                   kv_capacity_tokens=engine_cfg.total_pages * engine_cfg.page_size)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos = eos
        self.copier = _PageCopier(engine_cfg.pages_per_seq)
        self.locks = {name: threading.Lock() for name in self.executors}  # one step or copy at a time per pool
        self.seqs: dict[Request, Sequence] = {}
        self.fail_transfers = False  # tests force the recompute path
        self._wake = threading.Condition()
        self._t0 = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._stop = False
        self._errors: list[BaseException] = []
        for name, ex in self.executors.items():
            ex.warmup(progress)
        self._warm_copies()

    def now(self) -> float:
        return time.monotonic() - self._t0

    def _warm_copies(self):
        names = list(self.executors)
        for src, dst in zip(names, names[1:] + names[:1]):
            self._copy_pages(src, dst, [], [])

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
            self._wake.notify_all()
        return r

    # -- worker loops -----------------------------------------------------------------------
    def start(self):
        self._stop = False
        self._threads = [threading.Thread(target=self._worker_loop, args=(name,), name=f"worker-{name}", daemon=True)
                         for name in self.executors]
        for t in self._threads:
            t.start()

    def stop(self):
        with self._wake:
            self._stop = True
            self._wake.notify_all()
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

    def _worker_loop(self, name: str):
        try:
            while not self._stop:
                plan = self.scheduler.next_step(name, self.now())
                if plan is None:
                    with self._wake:
                        self._wake.wait(timeout=0.02)
                    self.scheduler.tick(self.now())
                    continue
                finished = self._run_plan(name, plan)
                self.scheduler.step_done(name, plan, self.now(), finished)
                self._do_transfers()
                with self._wake:
                    self._wake.notify_all()
        except BaseException as e:  # surface to run_until_done instead of dying silently
            log.exception("worker %s failed", name)
            self._errors.append(e)
            with self._wake:
                self._wake.notify_all()

    def _run_plan(self, name: str, plan) -> list[Request]:
        sched = self.scheduler
        chunk = None
        if plan.chunk is not None:
            c = plan.chunk
            seq = self.seqs[c.request]
            seq.block_table = sched.block_table(name, c.request)
            chunk = (seq, c.start, c.length)
        decodes = []
        for r in plan.decodes:
            seq = self.seqs[r]
            seq.block_table = sched.block_table(name, r)
            decodes.append(seq)
        with self.locks[name]:
            tokens = self.executors[name].run(chunk, decodes)
        finished = []
        rows = list(zip(plan.decodes, tokens[1:] if chunk is not None else tokens))
        if plan.chunk is not None and plan.chunk.last and not plan.chunk.recompute:
            rows.append((plan.chunk.request, tokens[0]))
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
    def _do_transfers(self):
        for t in self.scheduler.take_transfers():
            ok = not self.fail_transfers
            if ok:
                try:
                    src_pages = self.scheduler.block_table(t.src, t.request).pages
                    dst_pages = self.scheduler.block_table(t.dst, t.request).pages
                    self._copy_pages(t.src, t.dst, src_pages, dst_pages)
                except Exception:
                    log.exception("KV transfer of %s failed; recomputing on %s", t.request.id, t.dst)
                    ok = False
            self.scheduler.transfer_done(t, self.now(), ok)

    def _copy_pages(self, src: str, dst: str, src_pages, dst_pages):
        n = min(len(src_pages), len(dst_pages))
        sx, dx = self.executors[src], self.executors[dst]
        src_idx = self.copier.indices(src_pages[:n], self.cfg.total_pages, 0)
        dst_idx = self.copier.indices(dst_pages[:n], self.cfg.total_pages, self.cfg.total_pages)  # padding dropped
        with self.locks[src]:
            moved = [(self.copier.gather(k, src_idx), self.copier.gather(v, src_idx)) for k, v in sx.kv_cache]
        with self.locks[dst]:
            new = []
            for (k, v), (mk, mv) in zip(dx.kv_cache, moved):
                mk = jax.device_put(mk, k.sharding)
                mv = jax.device_put(mv, v.sharding)
                new.append((self.copier.scatter(k, dst_idx, mk), self.copier.scatter(v, dst_idx, mv)))
            dx.kv_cache = new
