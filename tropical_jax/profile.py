"""`python -m tropical_jax.profile --model PATH --cluster 1P1M --out FILE.json`: time this engine's own steps on
this machine's devices and write the cost-model JSON the scheduler and the simulator both accept.

The profile is also stored in the profile cache (tropical_jax/cluster/profile_cache.py), so an
`LLM(cluster=...)` started later with the same model, mesh, backend and buckets reuses it."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import EngineConfig
from .options import add_options, fields_of


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tropical_jax.profile", description=__doc__.splitlines()[0],
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="local HF or orbax directory (default: the embedded model)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cluster", default=None,
                    help="the cluster the profile is for, e.g. 1P1M or P:tp2,M:tp2: its workers' mesh is timed")
    ap.add_argument("--no-progress", action="store_true", default=False)
    add_options(ap, EngineConfig, "engine (the server's flags: the profile is for the engine they make)")
    a = ap.parse_args(argv)
    from .cluster.profile_cache import cluster_tp, identity, measure, store
    from .sched.cost_model import CostModel

    tp = cluster_tp(a.cluster) if a.cluster else 1
    flags = os.environ.get("XLA_FLAGS", "")
    if tp > 1 and "xla_force_host_platform_device_count" not in flags:
        # On a CPU host, emulate the devices the mesh needs (before JAX starts); other platforms ignore it.
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={tp}".strip()
    cfg = EngineConfig(**{f.name: getattr(a, f.name) for f in fields_of(EngineConfig) if f.name in a})
    profile = measure(a.model, cfg, tp, progress=not a.no_progress)
    CostModel.from_json(profile)  # refuse to write a profile the scheduler could not use
    with open(a.out, "w") as f:
        json.dump(profile, f, indent=1)
    cached = store(profile, identity(a.model, cfg, tp))
    print(f"wrote {a.out} (cached as {cached})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
