"""`python -m tropical_jax.profile --model PATH --cluster 1P1M --out FILE.json`: time this engine's own steps on
this machine's devices and write the cost-model JSON the scheduler and the simulator both accept.

The profile is also stored in the profile cache (tropical_jax/cluster/profile_cache.py), so an
`LLM(cluster=...)` started later with the same model, mesh, backend and buckets reuses it."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import BUCKET_SETS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tropical_jax.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="local HF or orbax directory (default: the embedded model)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cluster", default=None,
                    help="the cluster the profile is for, e.g. 1P1M or P:tp2,M:tp2: its workers' mesh is timed")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--num-pages", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-chunk-tokens", type=int, default=256)
    ap.add_argument("--bucket-set", choices=BUCKET_SETS, default="auto",
                    help="the engine's bucket sizes (auto: coarse on CPU, fine on GPU and TPU)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--attention-backend", choices=["reference", "pallas"], default="reference")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    from .cluster.profile_cache import cluster_tp, identity, measure, store
    from .config import EngineConfig
    from .sched.cost_model import CostModel

    tp = cluster_tp(a.cluster) if a.cluster else 1
    flags = os.environ.get("XLA_FLAGS", "")
    if tp > 1 and "xla_force_host_platform_device_count" not in flags:
        # On a CPU host, emulate the devices the mesh needs (before JAX starts); other platforms ignore it.
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={tp}".strip()
    cfg = EngineConfig(max_model_len=a.max_model_len, page_size=a.page_size, num_pages=a.num_pages,
                       max_num_seqs=a.max_num_seqs, max_chunk_tokens=a.max_chunk_tokens, bucket_set=a.bucket_set, dtype=a.dtype,
                       attention_backend=a.attention_backend)
    profile = measure(a.model, cfg, tp, progress=not a.no_progress)
    CostModel.from_json(profile)  # refuse to write a profile the scheduler could not use
    with open(a.out, "w") as f:
        json.dump(profile, f, indent=1)
    cached = store(profile, identity(a.model, cfg, tp))
    print(f"wrote {a.out} (cached as {cached})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
