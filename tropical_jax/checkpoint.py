"""Our checkpoint format (orbax) and `python -m tropical_jax.checkpoint convert HF_DIR OUT_DIR`.

Layout of OUT_DIR: tropical_config.json (ModelConfig), params/ (orbax StandardCheckpointer),
and the tokenizer files copied from the source. Restore goes straight into the target sharding.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def save_checkpoint(out_dir, cfg, params, tokenizer_dir=None) -> Path:
    from .model.loader import OURS_CONFIG

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / OURS_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=1))
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(out / "params", nnx.to_pure_dict(params), force=True)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.exists():
                shutil.copy(src, out / name)
    return out


def restore_params(params_dir: Path, abstract_state, mesh, dtype, cfg):
    """Restore into `abstract_state`'s structure, each array already on its target sharding."""
    from .model.sharding import param_shardings

    pure = nnx.to_pure_dict(abstract_state)
    if mesh is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=sharding), pure)
    else:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s),
                              pure, param_shardings(pure, mesh, cfg))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(Path(params_dir).resolve(), target)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return abstract_state


def convert(hf_dir, out_dir, dtype="float32") -> Path:
    from .model.loader import load_model

    cfg, _, params, _ = load_model(hf_dir, dtype=jnp.dtype(dtype), with_tokenizer=False)
    return save_checkpoint(out_dir, cfg, params, tokenizer_dir=hf_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tropical_jax.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a local Hugging Face directory to our orbax checkpoint")
    c.add_argument("hf_dir")
    c.add_argument("out_dir")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    try:
        out = convert(args.hf_dir, args.out_dir, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
