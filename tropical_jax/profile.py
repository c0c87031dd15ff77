"""`python -m tropical_jax.profile --model PATH --out FILE.json`: time this engine's own steps on
this machine's devices and write the cost-model JSON the scheduler and the simulator both accept."""

from __future__ import annotations

import argparse
import json
import sys

import jax.numpy as jnp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tropical_jax.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="local HF or orbax directory (default: the embedded model)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-chunk-tokens", type=int, default=256)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--attention-backend", choices=["reference", "pallas"], default="reference")
    a = ap.parse_args(argv)
    from .cluster.profile import profile_executor
    from .config import EngineConfig
    from .model.loader import load_model
    from .runtime.executor import ModelExecutor
    from .sched.cost_model import CostModel

    cfg = EngineConfig(max_model_len=a.max_model_len, page_size=a.page_size, max_num_seqs=a.max_num_seqs,
                       max_chunk_tokens=a.max_chunk_tokens, dtype=a.dtype, attention_backend=a.attention_backend)
    model_cfg, graphdef, params, _ = load_model(a.model, jnp.dtype(a.dtype), with_tokenizer=False)
    executor = ModelExecutor(model_cfg, graphdef, params, cfg)
    executor.warmup()
    profile = profile_executor(executor)
    CostModel.from_json(profile)  # refuse to write a profile the scheduler could not use
    with open(a.out, "w") as f:
        json.dump(profile, f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
