"""Run one step on the device: the closed set of bucketed, jitted executables over donated KV pools.

A step is an optional prefill chunk (up to max_prefill_seqs prompt segments, packed) plus a
decode batch (the shapes the model's StepBatch describes). Metadata is built on the host in numpy,
padded to the step's buckets, and sampling happens inside the same executable, so only the sampled
token ids come back.
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ..config import EngineConfig, ModelConfig
from ..model.llama import init_kv_cache, make_forward
from ..model.sharding import kv_sharding
from ..model.step_batch import StepBatch
from . import map_budget
from .map_budget import cache_hits, compile_count
from .sampling import sample

log = logging.getLogger(__name__)

# The kinds of step a worker may run: a prefill chunk alone, a decode batch alone, both in one step.
STEP_KINDS = ("prefill", "decode", "mixed")
# Compiling releases the GIL: warmup lowers on its own thread while these compile.
COMPILE_THREADS = max(1, min(4, os.cpu_count() or 1))
BUCKET_ADVICE = (" (--bucket-set coarse, or fewer sizes in --batch-buckets, --chunk-buckets and --context-buckets, "
                 "e.g. --batch-buckets 1,8,32 --context-buckets 1024; LLM(bucket_set=..., batch_buckets=..., ...))")


def enable_compilation_cache(directory: str | None) -> None:
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def smallest_bucket(sizes, n) -> int:
    """The smallest of sorted bucket `sizes` that holds n."""
    i = bisect.bisect_left(sizes, n)
    if i == len(sizes):
        raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")
    return sizes[i]


class ModelExecutor:
    def __init__(self, model_cfg: ModelConfig, graphdef, params, engine_cfg: EngineConfig, mesh=None):
        # "auto" buckets settle for the devices the steps run on (the default backend without a mesh).
        platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
        engine_cfg = engine_cfg.for_platform(platform)
        self.model_cfg, self.cfg, self.params = model_cfg, engine_cfg, params
        enable_compilation_cache(engine_cfg.compilation_cache_dir)
        self.chunk_sizes = engine_cfg.chunk_sizes
        self.batch_sizes = engine_cfg.batch_sizes
        sharding = kv_sharding(model_cfg, mesh) if mesh is not None else None
        self.kv_cache = init_kv_cache(model_cfg, engine_cfg.total_pages, engine_cfg.page_size,
                                      jnp.dtype(engine_cfg.dtype), sharding)
        forward = make_forward(graphdef, engine_cfg.attention_backend)

        # The step takes the parameters as a flat list: flattening an NNX state on every call costs
        # about 1 ms of host time a step.
        self._param_leaves, param_tree = jax.tree.flatten(params)

        def step(param_leaves, kv_cache, batch, temperature, top_k, top_p, seeds, steps):
            logits, kv_cache = forward(jax.tree.unflatten(param_tree, param_leaves), kv_cache, batch)
            return sample(logits, temperature, top_k, top_p, seeds, steps), kv_cache

        self._step = jax.jit(step, donate_argnums=(1,))

    # -- shapes -----------------------------------------------------------------------------
    def step_shapes(self, kinds=STEP_KINDS) -> list[tuple[int, int, int]]:
        """Every (chunk bucket, batch bucket, context pages) of these kinds this executor may run."""
        return step_shapes(self.cfg, kinds)

    def warmup(self, progress: bool = True, kinds=STEP_KINDS, name: str = "the engine") -> None:
        """Compile (or load from the persistent cache) every step of these kinds, after checking that
        their memory mappings fit (runtime/map_budget.py). A step outside them still runs: it compiles
        when first asked for."""
        shapes = self.step_shapes(kinds)
        map_budget.check(len(shapes), self.model_cfg.num_layers, f"{name}'s warmup", BUCKET_ADVICE)
        start, compiled, loaded = time.perf_counter(), compile_count(), cache_hits()
        lowered = (self._step.lower(self._param_leaves, self.kv_cache, *pad_inputs(self.cfg, c, b, p, [], []))
                   for c, b, p in shapes)
        with ThreadPoolExecutor(COMPILE_THREADS) as pool:
            for _ in tqdm(pool.map(lambda step: step.compile(), lowered), total=len(shapes),
                          desc="warmup: compiling steps", disable=not progress, unit="exe"):
                pass
        loaded = cache_hits() - loaded
        log.info("%s: %d step executables ready in %.1f s (%d compiled, %d loaded from the compilation cache)",
                 name, len(shapes), time.perf_counter() - start, compile_count() - compiled - loaded, loaded)

    # -- running ----------------------------------------------------------------------------
    def time_step(self, c, b, p, decode_tokens=None, chunk=None) -> np.ndarray:
        """Run a step of these buckets as full as they can be, or with decode rows of `decode_tokens`
        tokens of context and a chunk of (start, tokens) (for profiling: full_inputs)."""
        return self.execute(full_inputs(self.cfg, c, b, p, decode_tokens, chunk))

    def execute(self, inputs: "StepInputs") -> np.ndarray:
        """Run prepared host metadata (step_inputs): the call a remote worker receives."""
        return np.asarray(self.launch(inputs))

    def launch(self, inputs: "StepInputs") -> jax.Array:
        """Start the step and return its sampled ids, still on the device (JAX dispatches
        asynchronously): the pools are replaced by the step's outputs at once, so a page copy launched
        after this call runs after the step."""
        tokens, self.kv_cache = self._step(self._param_leaves, self.kv_cache, *inputs)
        return tokens


def step_shapes(cfg: EngineConfig, kinds=STEP_KINDS) -> list[tuple[int, int, int]]:
    """(chunk bucket, batch bucket, context pages) of each step of these kinds; 0: that part absent."""
    shapes = [(c, 0) for c in cfg.chunk_sizes] if "prefill" in kinds else []
    shapes += [(0, b) for b in cfg.batch_sizes] if "decode" in kinds else []
    if "mixed" in kinds and cfg.mixed_steps:
        shapes += [(c, b) for c in cfg.chunk_sizes for b in cfg.batch_sizes]
    return [(c, b, p) for c, b in shapes for p in cfg.context_pages]


class StepInputs(NamedTuple):
    """Everything one step needs from the host: small numpy arrays, picklable (Ray ships them)."""
    batch: StepBatch
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seeds: np.ndarray
    steps: np.ndarray


def prompt_steps(cfg: EngineConfig, length: int) -> list[tuple[int, int, tuple[int, int]]]:
    """The (chunk bucket, context pages, (start, tokens)) steps that prefill a prompt of `length` tokens
    alone: largest chunks from its start, each in the context bucket that holds it."""
    top, steps = cfg.chunk_sizes[-1], []
    for start in range(0, length, top):
        n = min(top, length - start)
        pages = smallest_bucket(cfg.context_pages, -(-(start + n) // cfg.page_size))
        steps.append((smallest_bucket(cfg.chunk_sizes, n), pages, (start, n)))
    return steps


def chunk_pages(cfg: EngineConfig, chunks) -> int:
    """Pages a chunk's segments read, together (they must fit one context bucket)."""
    return sum(-(-(start + length) // cfg.page_size) for _, start, length in chunks)


def split_tokens(cfg: EngineConfig, tokens: np.ndarray, chunks) -> tuple[np.ndarray, np.ndarray]:
    """A step's sampled ids -> (one per chunk segment, one per decode row)."""
    s = cfg.max_prefill_seqs if chunks else 0
    return tokens[:len(chunks)], tokens[s:]


def step_inputs(cfg: EngineConfig, chunks, decodes) -> StepInputs:
    """The step's buckets chosen from `cfg`, its metadata padded to them (no device involved)."""
    if len(chunks) > cfg.max_prefill_seqs:
        raise ValueError(f"{len(chunks)} chunk segments exceed max_prefill_seqs={cfg.max_prefill_seqs}")
    c = smallest_bucket(cfg.chunk_sizes, sum(n for _, _, n in chunks)) if chunks else 0
    b = smallest_bucket(cfg.batch_sizes, len(decodes)) if decodes else 0
    pages = max([chunk_pages(cfg, chunks)] + [-(-s.num_tokens // cfg.page_size) for s in decodes])
    p = smallest_bucket(cfg.context_pages, pages)
    return pad_inputs(cfg, c, b, p, chunks, decodes)


def pad_inputs(cfg: EngineConfig, c, b, p, chunks, decodes) -> StepInputs:
    """Metadata of a (chunk bucket c, batch bucket b, context pages p) step; c or b 0: part absent."""
    n = cfg.max_prefill_seqs
    # Sampled rows: one per segment slot (in chunk steps), then one per decode slot.
    r = (n if c else 0) + b
    temperature, top_p = np.zeros(r, np.float32), np.ones(r, np.float32)
    top_k, seeds, steps = np.zeros(r, np.int32), np.zeros(r, np.uint32), np.zeros(r, np.int32)

    def sample_row(i, seq):
        sp = seq.params
        temperature[i], top_p[i], top_k[i] = sp.temperature, sp.top_p, sp.top_k
        seeds[i], steps[i] = seq.seed, len(seq.output_ids)

    ct, ctab = np.zeros(c, np.int32), np.zeros((n, p), np.int32)
    cs, cl = np.zeros(n, np.int32), np.zeros(n, np.int32)
    offset = 0
    for i, (seq, start, length) in enumerate(chunks):
        ct[offset:offset + length] = seq.all_ids[start:start + length]
        offset += length
        cs[i], cl[i] = start, length
        ctab[i, :min(p, len(seq.block_table.pages))] = seq.block_table.pages[:p]
        sample_row(i, seq)
    dt, dp = np.zeros(b, np.int32), np.zeros(b, np.int32)
    dtab, dm = np.zeros((b, p), np.int32), np.zeros(b, bool)
    for i, seq in enumerate(decodes):
        dt[i], dp[i], dm[i] = seq.last_token, seq.num_tokens - 1, True
        dtab[i, :min(p, len(seq.block_table.pages))] = seq.block_table.pages[:p]
        sample_row(r - b + i, seq)
    batch = StepBatch(ct, cs, cl, ctab, dt, dp, dtab, dm)
    return StepInputs(batch, temperature, top_k, top_p, seeds, steps)


def full_inputs(cfg: EngineConfig, c, b, p, decode_tokens=None, chunk=None) -> StepInputs:
    """A (c, b, p) step with every row live: the chunk fills c tokens ending at the context bucket
    (or, with chunk=(start, tokens), holds `tokens` prompt tokens from `start` on, as a prompt's
    chunk does), each decode row reads `decode_tokens` (default: the whole bucket) from its own pages.
    Attention reads only the context live rows have, so padding rows would time a step that reads
    nothing. Greedy; the tokens are junk."""
    inputs = pad_inputs(cfg, c, b, p, [], [])
    tokens = p * cfg.page_size
    pages = (np.arange((b + 1) * p, dtype=np.int32) % cfg.total_pages).reshape(b + 1, p)
    batch = inputs.batch  # its arrays are fresh: the first segment slot takes the chunk
    batch.chunk_starts[0], batch.chunk_lens[0] = chunk or (max(0, tokens - c), min(c, tokens))
    batch.chunk_block_tables[0] = pages[0]
    batch = batch._replace(
        dec_positions=np.full(b, (decode_tokens or tokens) - 1, np.int32), dec_block_tables=pages[1:],
        dec_mask=np.ones(b, bool))
    return inputs._replace(batch=batch)
