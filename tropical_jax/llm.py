"""Offline API: `LLM(...).generate(...)`, in the style of vLLM."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from .config import EngineConfig
from .model.loader import load_model
from .model.sharding import make_mesh
from .runtime.engine import Engine
from .runtime.executor import ModelExecutor
from .runtime.sequence import Sequence
from .sampling_params import SamplingParams


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str


class LLM:
    def __init__(self, model=None, *, max_model_len: int = 1024, page_size: int = 16, num_pages: int | None = None,
                 dtype: str = "float32", attention_backend: str = "reference", max_num_seqs: int = 32,
                 max_chunk_tokens: int = 256, max_prefill_seqs: int = 8, chunk_buckets=None, batch_buckets=None,
                 context_buckets=None, tensor_parallel: int = 1,
                 compilation_cache_dir: str | None = "~/.cache/tropical_jax/xla", warmup: bool = True,
                 progress: bool = True, cluster: str | None = None, policy: str | None = None, profile=None,
                 backend: str = "local", ray_address: str | None = None):
        """cluster: None for one in-process worker, or a layout such as "1P1M", "2C", "1P1D",
        "P:tp2,M:tp2" run by the shared scheduler under `policy` (None: by the cluster's roles,
        sched.config.default_policy: planned for P+M); `profile` is its cost model (a
        JSON path or dict; None: measured on these devices at startup). backend: "local" (the
        cluster's workers in this process) or "ray" (each worker a Ray actor; `ray_address` None
        starts or joins a local Ray, see tropical_jax/cluster/ray_backend.py)."""
        if backend not in ("local", "ray"):
            raise ValueError(f"backend must be 'local' or 'ray', got {backend!r}")
        if backend == "ray" and cluster is None:
            raise ValueError("backend='ray' runs a cluster's workers as Ray actors: pass cluster= (e.g. '1P1M'); "
                             "the single worker runs in-process")
        self.engine_config = EngineConfig(
            max_model_len=max_model_len, page_size=page_size, num_pages=num_pages, dtype=dtype,
            attention_backend=attention_backend, max_num_seqs=max_num_seqs, max_chunk_tokens=max_chunk_tokens,
            max_prefill_seqs=max_prefill_seqs,
            chunk_buckets=tuple(chunk_buckets) if chunk_buckets else None,
            batch_buckets=tuple(batch_buckets) if batch_buckets else None,
            context_buckets=tuple(context_buckets) if context_buckets else None,
            compilation_cache_dir=compilation_cache_dir)
        self.cluster = None
        if cluster is not None:
            from .cluster.engine import ClusterEngine
            from .sched.config import default_policy

            policy = policy or default_policy(cluster)

            from .sched.cost_model import CostModel

            # No profile: the cached one, else timed on a warmed worker (cluster/profile_cache.py).
            cost = CostModel.from_json(profile) if profile is not None else None
            # A measured profile's transfer is a constant: the cluster times its own copy. A given one is kept.
            self.cluster = ClusterEngine(model, cluster, policy, cost, self.engine_config, jnp.dtype(dtype), progress,
                                         backend=backend, ray_address=ray_address, time_transfer=profile is None)
            self.model_config, self.tokenizer = self.cluster.model_config, self.cluster.tokenizer
            self.model_config.check_context(max_model_len)
            return
        mesh = make_mesh(jax.devices()[:tensor_parallel]) if tensor_parallel > 1 else None
        self.model_config, graphdef, params, self.tokenizer = load_model(model, jnp.dtype(dtype), mesh)
        self.model_config.check_context(max_model_len)
        self.executor = ModelExecutor(self.model_config, graphdef, params, self.engine_config, mesh)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.engine = Engine(self.executor, self.tokenizer, eos)
        if warmup:
            self.executor.warmup(progress)

    def close(self) -> None:
        """Release the engine: workers (a cluster's Ray actors too), KV pools and compiled steps, whose
        memory mappings (about 300 each on the CPU backend) go back to the process. Also on leaving
        `with LLM(...) as llm:`. The LLM cannot generate afterwards."""
        if self.cluster is not None:
            self.cluster.close()
        self.cluster = self.engine = self.executor = None
        gc.collect()  # the executables sit in reference cycles (jitted closures)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts=None, sampling_params=None, prompt_token_ids=None) -> list[RequestOutput]:
        if self.cluster is None and self.engine is None:
            raise RuntimeError("this LLM was closed (LLM.close()); create a new one")
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts (text) or prompt_token_ids")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt_token_ids")
            prompt_token_ids = [self.tokenizer.encode(p) for p in prompts]
        elif prompt_token_ids and isinstance(prompt_token_ids[0], int):
            prompt_token_ids = [prompt_token_ids]
        n = len(prompt_token_ids)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * n
        if len(sampling_params) != n:
            raise ValueError(f"got {len(sampling_params)} sampling_params for {n} prompts")
        # Validate every prompt before admitting any, so a bad one leaves nothing half-queued.
        for ids in prompt_token_ids:
            if len(ids) >= self.engine_config.max_model_len:
                raise ValueError(f"prompt of {len(ids)} tokens does not fit max_model_len="
                                 f"{self.engine_config.max_model_len}")
        if self.cluster is not None:
            seqs = [Sequence([int(t) for t in ids], sp) for ids, sp in zip(prompt_token_ids, sampling_params)]
            self.cluster.start()
            try:
                self.cluster.run_until_done([self.cluster.submit(s) for s in seqs])
            finally:
                self.cluster.stop()
            for s in seqs:
                s.finish_reason = s.finish_reason or "length"
        else:
            seqs = [self.engine.add_request(ids, sp) for ids, sp in zip(prompt_token_ids, sampling_params)]
            while self.engine.has_work():
                self.engine.step()
        return [RequestOutput(s.prompt_ids, list(s.output_ids), s.text, s.finish_reason) for s in seqs]

