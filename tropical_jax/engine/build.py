"""build_engine(): the one way an engine is made, for LLM(...) and the server alike.

Reads the model's shape and tokenizer, starts the workers (in this process, or as Ray actors) and
compiles the steps of each one's role, then finds the scheduler's cost model: the profile given, else
a cached profile of this model, mesh, backend and buckets, else one timed now on a warmed worker's own
compiled steps (no executables beyond the workers'; cluster/profile_cache.py) and cached. A cluster with a P and
an M or D worker also times its own KV page copy.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import jax
import jax.numpy as jnp

from ..cluster.profile_cache import cluster_profile
from ..config import ClusterConfig, EngineConfig
from ..model.loader import load_tokenizer, model_path, read_config
from ..model.sharding import check_tensor_parallel
from ..sched.cost_model import CostModel
from ..sched.config import PolicyConfig
from .core import Engine

log = logging.getLogger(__name__)


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


def build_engine(model, cfg: EngineConfig, cluster: ClusterConfig = ClusterConfig(), warmup: bool = True,
                 progress: bool = True) -> Engine:
    """model: a checkpoint directory (None: the embedded default model). The engine's config settles
    bucket_set "auto" for the workers' platform; Engine.cfg holds the result."""
    spec = cluster.spec()
    policy = cluster.policy_config(cfg.max_prefill_seqs)
    model_config = read_config(model)
    model_config.check_context(cfg.max_model_len)
    for w in spec.workers:
        check_tensor_parallel(model_config, w.tp)
    if cluster.backend == "ray":  # once the options are known to be good: this connects to Ray
        from ..cluster.ray_backend import workers_platform

        platform = workers_platform(cluster.ray_address)
    else:
        platform = jax.default_backend()
    chosen = "" if cfg.bucket_set != "auto" else f", auto on {platform}"
    cfg = cfg.for_platform(platform)
    log.info("step buckets: chunks %s, batches %s, contexts %s tokens (bucket set %s%s)",
             ",".join(map(str, cfg.chunk_sizes)), ",".join(map(str, cfg.batch_sizes)),
             ",".join(str(p * cfg.page_size) for p in cfg.context_pages), cfg.bucket_set, chosen)
    policy = engine_policy(policy, cfg)
    tokenizer = load_tokenizer(model_path(model))
    dtype = jnp.dtype(cfg.dtype)
    if cluster.backend == "ray":
        from ..cluster.ray_backend import ray_workers

        workers = ray_workers(model, spec, cfg, dtype, cluster.ray_address, progress, policy)
    else:
        from ..cluster.workers import local_workers

        workers = local_workers(model, spec, cfg, dtype, policy)
    if warmup:
        for w in workers.values():
            w.warmup(progress)
    if cluster.profile is not None:
        cost = CostModel.from_json(cluster.profile)
    else:  # cached, else timed on a warmed worker (Ray: the driver's devices are not the workers')
        cost = CostModel.from_json(cluster_profile(model, spec, workers, cfg, policy, progress,
                                                   cache=cluster.backend == "local"))
    eos = set(model_config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    engine = Engine(workers, spec, policy, cost, cfg, tokenizer, eos, model_config.vocab_size, cluster.backend,
                    cluster.tpot_slo_ms / 1000)
    if cluster.profile is None:  # a measured profile's transfer is a constant: time this cluster's own copy
        handoff = engine.measure_handoff(cost.kv_bytes_per_token)
        if handoff is not None:
            engine.scheduler.set_profile(replace(cost, bandwidth_Bps=handoff["bandwidth_GBps"] * 1e9,
                                                 transfer_latency=handoff["latency_ms"] * 1e-3))
    return engine

