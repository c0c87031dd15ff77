"""Measured profiles cached on disk, so a cluster's startup profiles a model on a mesh only once.

    profile, path, hit = cached_profile(model, engine_cfg, tp=1)

The key is a hash of everything a measurement depends on: the code that runs and times the steps
(its syntax tree without docstrings, so new code misses and a reworded comment does not), the
model's identity (resolved path, its config, and the name, size and mtime of every file under it,
so new weights miss), the mesh (tensor parallelism, platform, device kind, JAX version), and the
engine's shapes (buckets, page size, pages, dtype, attention backend, whether mixed steps are timed).
A cluster times its profile on one of its own warmed workers (cluster_profile), so a miss compiles
nothing more. Files live in
$TROPICAL_JAX_PROFILE_CACHE or ~/.cache/tropical_jax/profiles as <key>.json: the ordinary profile
JSON plus `cache_key` and `identity`, so `python -m tropical_jax.sim --profile` reads them as they are.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# The code a profile's times depend on: the steps (model, kernels, executor, sampling) and the profiler.
# Its source is part of the key, so a profile of older code misses (a faster kernel must be timed anew).
_TIMED_CODE = ("model", "runtime", "cluster/profile.py", "cluster/profile_cache.py", "../pallas_kernels")


def code_digest(root: Path = Path(__file__).resolve().parents[1]) -> str:
    """sha256 of the timed code under the package directory `root`: of each file's syntax tree without its
    docstrings (comments never reach the tree), so editing what the code says of itself keeps the profile."""
    files = sorted(f for part in _TIMED_CODE for f in ([root / part] if part.endswith(".py")
                                                        else (root / part).resolve().rglob("*.py")))
    digest = hashlib.sha256()
    for f in files:
        digest.update(ast.dump(_without_docstrings(ast.parse(f.read_bytes()))).encode())
    return digest.hexdigest()


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("TROPICAL_JAX_PROFILE_CACHE", "~/.cache/tropical_jax/profiles")))


def model_identity(model) -> dict:
    from ..model.loader import DEFAULT_CHECKPOINT, OURS_CONFIG

    path = (Path(model) if model is not None else DEFAULT_CHECKPOINT).resolve()
    config = next((path / n for n in (OURS_CONFIG, "config.json") if (path / n).exists()), None)
    files = sorted([str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns]
                   for f in path.rglob("*") if f.is_file())
    return {"path": str(path), "config": json.loads(config.read_text()) if config else None,
            "files_sha256": hashlib.sha256(json.dumps(files).encode()).hexdigest()}


def identity(model, engine_cfg, tp: int = 1, mixed: bool = True) -> dict:
    import jax

    device = jax.devices()[0]
    engine_cfg = engine_cfg.for_platform(device.platform)  # "auto" keys as the buckets it stands for
    engine = dataclasses.asdict(engine_cfg)
    engine.pop("compilation_cache_dir")
    engine.update(chunk_sizes=list(engine_cfg.chunk_sizes), batch_sizes=list(engine_cfg.batch_sizes),
                  context_pages=list(engine_cfg.context_pages), total_pages=engine_cfg.total_pages,
                  mixed_profiled=mixed and engine_cfg.mixed_steps)
    return {"code": code_digest(), "model": model_identity(model),
            "mesh": {"tp": tp, "platform": device.platform, "device_kind": device.device_kind,
                     "jax": jax.__version__},
            "engine": engine}


def key_of(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=list).encode()).hexdigest()[:20]


def measure(model, engine_cfg, tp: int = 1, progress: bool = True) -> dict:
    """Warm up one executor on a mesh of `tp` devices and time its buckets."""
    import jax
    import jax.numpy as jnp

    from ..model.loader import load_model
    from ..model.sharding import make_mesh
    from ..runtime.executor import ModelExecutor
    from .profile import profile_executor

    mesh = make_mesh(jax.devices()[:tp]) if tp > 1 else None
    cfg, graphdef, params, _ = load_model(model, jnp.dtype(engine_cfg.dtype), mesh, with_tokenizer=False)
    executor = ModelExecutor(cfg, graphdef, params, engine_cfg, mesh)
    executor.warmup(progress)
    return profile_executor(executor, progress)


def store(profile: dict, ident: dict) -> Path:
    key = key_of(ident)
    path = cache_dir() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**profile, "cache_key": key, "identity": ident}, indent=1))
    tmp.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    return path


def cached_profile(model, engine_cfg, tp: int = 1, progress: bool = True, refresh: bool = False,
                   measure_now=None, mixed: bool = True) -> tuple[dict, Path, bool]:
    """-> (profile, its cache file, whether it was reused). Profiles and stores when none fits, or
    always with refresh (a profile timed on a busy machine stays too slow until it is replaced).
    measure_now: how to profile (default: a new executor of our own, `measure`); mixed: whether it
    times mixed steps."""
    from ..sched.cost_model import CostModel, ProfileError

    ident = identity(model, engine_cfg, tp, mixed)
    path = cache_dir() / f"{key_of(ident)}.json"
    if path.exists() and not refresh:
        try:
            profile = json.loads(path.read_text())
            CostModel.from_json(profile)
            if profile.get("identity") == json.loads(json.dumps(ident)):
                log.info("reusing the cached profile %s (same model, mesh, backend and buckets)", path)
                return profile, path, True
        except (OSError, json.JSONDecodeError, ProfileError) as e:
            log.warning("ignoring the unusable cached profile %s: %s", path, e)
    log.info("no cached profile fits this model, mesh, backend and buckets: profiling (cache: %s)", path)
    profile = measure_now() if measure_now is not None else measure(model, engine_cfg, tp, progress)
    CostModel.from_json(profile)  # never cache a profile the scheduler could not use
    return profile, store(profile, ident), False


def cluster_profile(model, cluster, workers, engine_cfg, policy=None, progress: bool = True,
                    cache: bool = True) -> dict:
    """The profile a cluster's scheduler runs on: from the cache, else timed on the worker that compiled
    the most kinds of step (M, D or C: the profile's steps are among its warmed executables, so timing
    compiles nothing) and cached. cache=False (Ray: the driver's devices are not the workers') always times."""
    from ..sched.config import parse_cluster
    from .workers import step_kinds

    spec = max(parse_cluster(cluster).workers, key=lambda w: len(step_kinds(w.role, policy)))
    mixed = "mixed" in step_kinds(spec.role, policy)

    def measure_now():
        return workers[spec.name].profile(progress)

    if not cache:
        return measure_now()
    return cached_profile(model, engine_cfg, spec.tp, progress, measure_now=measure_now, mixed=mixed)[0]


def cluster_tp(cluster) -> int:
    """The tensor parallelism to profile a cluster at (its workers share one cost model)."""
    from ..sched.config import parse_cluster

    tps = [w.tp for w in parse_cluster(cluster).workers]
    if len(set(tps)) > 1:
        log.warning("workers of %s differ in tensor parallelism %s; the shared profile is measured at tp=%d",
                    cluster, tps, tps[0])
    return tps[0]
