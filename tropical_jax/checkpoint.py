"""`python -m tropical_jax.checkpoint convert HF_DIR OUT_DIR [--dtype bfloat16]`: a local Hugging Face
directory to our orbax checkpoint (the format: model/checkpoint.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax.numpy as jnp

from .model.checkpoint import save_checkpoint
from .model.loader import load_model


def convert(hf_dir, out_dir, dtype="float32") -> Path:
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
