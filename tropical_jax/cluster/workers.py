"""Worker handles: what a cluster worker loop talks to, wherever the worker's devices live.

A handle has four calls, the same for every backend:
    step(inputs) -> sampled ids   run one prepared step (runtime.executor.StepInputs: small host arrays)
    read_pages(pages) -> payload  the K/V of those pages, every layer; opaque to the caller
    write_pages(pages, payload)   put a payload read from another worker into these pages
    warmup(progress)              compile the steps its role runs, and the page copies
plus profile(progress) (a cost-model JSON measured on the worker's devices) and close().

A worker compiles only the kinds of step the scheduler plans for its role (step_kinds): a P worker's
15 prefill executables instead of all 123 with the default buckets. Every compiled executable holds
about 300 memory mappings on the CPU backend, so local_workers checks the whole cluster's set against
the process's limit before loading anything (runtime/map_budget.py).

InProcessWorker holds a mesh carved from this process's devices; its payloads stay on device
and are `jax.device_put` to the destination's sharding. The Ray backend (ray_backend.py) runs an
InProcessWorker inside an actor and ships payloads as host numpy arrays.
"""

from __future__ import annotations

import threading

import jax
import numpy as np

from ..config import EngineConfig
from ..model.loader import load_model, read_config
from ..model.sharding import make_mesh
from ..runtime import map_budget
from ..runtime.executor import BUCKET_ADVICE, STEP_KINDS, ModelExecutor, StepInputs, step_shapes

PAGE_COPIES = 2  # the gather and the scatter: executables of every worker that hands KV over (not C)


def step_kinds(role: str, policy=None) -> tuple[str, ...]:
    """The kinds of step the scheduler plans for a worker of this role (sched/batcher.py): P runs
    prefill chunks alone; M and D decode batches, with a chunk beside them (an inline prefill or a
    recompute) or alone; C runs prefills and decodes apart under `colocated`, together under `chunked`."""
    if role == "P":
        return ("prefill",)
    if role == "C" and getattr(policy, "policy", None) != "chunked":
        return ("prefill", "decode")
    return STEP_KINDS


def cluster_executables(cluster, engine_cfg: EngineConfig, policy=None) -> dict[str, int]:
    """Executables each worker of the cluster compiles at warmup."""
    return {w.name: len(step_shapes(engine_cfg, step_kinds(w.role, policy))) + (PAGE_COPIES if w.role != "C" else 0)
            for w in cluster.workers}


def carve_devices(cluster, devices=None) -> dict[str, list]:
    """The devices of each worker: `tp` consecutive ones each."""
    devices = list(devices if devices is not None else jax.devices())
    need = sum(w.tp for w in cluster.workers)
    if need > len(devices):
        raise ValueError(f"cluster {cluster} needs {need} devices, {len(devices)} available")
    out, i = {}, 0
    for w in cluster.workers:
        out[w.name] = devices[i:i + w.tp]
        i += w.tp
    return out


class PageCopier:
    """Fixed-shape page gather/scatter (padded to a full block table) so handoffs never recompile.
    Each is one executable over every layer's pools (pytrees of (K, V) per layer): a handoff costs
    the host three launches, not three per pool."""

    def __init__(self, pages_per_seq: int, num_pages: int):
        self.width, self.num_pages = pages_per_seq, num_pages
        self.gather = jax.jit(lambda pools, idx: jax.tree.map(lambda pool: pool[idx], pools))
        self.scatter = jax.jit(lambda pools, idx, vals: jax.tree.map(lambda pool, v: pool.at[idx].set(v, mode="drop"),
                                                                     pools, vals), donate_argnums=(0,))

    def indices(self, pages, fill: int) -> np.ndarray:
        idx = np.full(self.width, fill, np.int32)
        idx[:len(pages)] = pages
        return idx

    def pad(self, vals):
        """Host arrays of fewer pages than a block table, padded to it (padding rows are dropped)."""
        if isinstance(vals, np.ndarray) and vals.shape[0] < self.width:
            full = np.zeros((self.width,) + vals.shape[1:], vals.dtype)
            full[:vals.shape[0]] = vals
            return full
        return vals


class InProcessWorker:
    """One worker in this process: its mesh, model, KV pools and page copies. One call at a time
    touches its pools (steps donate them; a handoff may write them from another worker's thread)."""

    def __init__(self, model, dtype, engine_cfg: EngineConfig, devices, kinds=STEP_KINDS, name: str = "worker",
                 copies: bool = True):
        # One worker on the default device (the single worker at tp=1) needs no mesh: its arrays and
        # executables are those of a plain single-device program.
        self.devices = list(devices)
        self.mesh = None if self.devices == jax.devices()[:1] else make_mesh(devices)
        model_config, graphdef, params, _ = load_model(model, dtype, self.mesh, with_tokenizer=False)
        self.executor = ModelExecutor(model_config, graphdef, params, engine_cfg, self.mesh)
        self.copier = PageCopier(engine_cfg.pages_per_seq, engine_cfg.total_pages)
        self.lock = threading.Lock()
        self.kinds, self.name, self.copies = tuple(kinds), name, copies

    def warmup(self, progress: bool = True) -> None:
        with self.lock:
            self.executor.warmup(progress, self.kinds, f"worker {self.name}")
        if self.copies:  # a colocated worker never hands KV over: no page copies to compile
            self.write_pages([], self.read_pages([]))  # compiles the gather and the scatter

    def step(self, inputs: StepInputs) -> np.ndarray:
        # The lock covers the launch, not the wait for the result: a KV handoff to or from this
        # worker is queued behind the step in flight instead of waiting for it on the host.
        with self.lock:
            tokens = self.executor.launch(inputs)
        return np.asarray(tokens)

    def read_pages(self, pages) -> list[tuple[jax.Array, jax.Array]]:
        idx = self.copier.indices(pages, 0)
        with self.lock:
            return self.copier.gather(self.executor.kv_cache, idx)

    def host_pages(self, pages) -> list[tuple[np.ndarray, np.ndarray]]:
        """read_pages as host arrays of just these pages: what crosses between processes."""
        n = len(pages)
        return [(np.asarray(k)[:n], np.asarray(v)[:n]) for k, v in self.read_pages(pages)]

    def write_pages(self, pages, payload) -> None:
        idx = self.copier.indices(pages, self.copier.num_pages)  # padding indices are out of range: dropped
        with self.lock:
            pools = self.executor.kv_cache
            vals = jax.device_put([tuple(self.copier.pad(x) for x in kv) for kv in payload],
                                  [(k.sharding, v.sharding) for k, v in pools])
            self.executor.kv_cache = [tuple(kv) for kv in self.copier.scatter(pools, idx, vals)]

    def profile(self, progress: bool = True) -> dict:
        from .profile import profile_executor

        with self.lock:
            return profile_executor(self.executor, progress, mixed="mixed" in self.kinds)

    def close(self) -> None:
        """Drop the model, pools and executables (their memory mappings go back once collected)."""
        self.executor = self.copier = None


def local_workers(model, cluster, engine_cfg: EngineConfig, dtype, policy=None,
                  devices=None) -> dict[str, InProcessWorker]:
    """One InProcessWorker per cluster worker, each on its own slice of this process's devices, once
    the executables of all of them are known to fit the process's memory mappings."""
    slices = carve_devices(cluster, devices)
    per_worker = cluster_executables(cluster, engine_cfg, policy)
    counts = ", ".join(f"{name} {n}" for name, n in per_worker.items())
    map_budget.check(sum(per_worker.values()), read_config(model).num_layers,
                     f"cluster {cluster} ({counts} executables)",
                     BUCKET_ADVICE + ", fewer workers in one process (or --backend ray: a process each)")
    return {w.name: InProcessWorker(model, dtype, engine_cfg, slices[w.name], step_kinds(w.role, policy), w.name,
                                    copies=w.role != "C") for w in cluster.workers}
